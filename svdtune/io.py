"""Saving a model's deltas to a file and loading them back: `save_delta`, `load_delta`.

`load_delta` checks the whole file against the model first (layers, classes,
shapes, ranks, modes, base-weight fingerprints, parameters, and every value in
the model's dtype) and computes every decomposition it needs; only then does it
change the model, in steps meant not to fail, inside one `all_or_nothing`
transaction that rolls the model back if one does. So when it raises, the model
is exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdtune import container, kinds, values
from svdtune.arguments import as_metadata, as_optional_path, as_path
from svdtune.cache import decompose_named
from svdtune.config import SpectralConfig
from svdtune.decompose import Decomposition, warn_if_slow_svd
from svdtune.basis import basis_of, repeated_pairs
from svdtune.delta import DeltaFile, LayerDelta, as_delta_file
from svdtune.fingerprint import check_base, fingerprint
from svdtune.errors import SvdtuneError
from svdtune.formula import may_overflow, merged_matrix, spectrum_shift
from svdtune.layers import DELTA, SpectralLayer
from svdtune.randomized import RandomizedSVD
from svdtune.sharding import full, refuse_sharded, sharded_tensors, write_on_rank_zero
from svdtune.offline import warn_if_basis_dependent
from svdtune.adapting import _check_adaptable, adapt_layers, check_not_shared, refuse_lazy
from svdtune.walk import (
    adapted_units, factor_ids, join_name, own_persistent_buffers, root_record, trainable_modules, unwrap,
    warn_if_buffers_changed,
)
from svdtune.transaction import Progress, all_or_nothing, writable


def save_delta(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the model's deltas (and fully trained parameters) to a small safetensors file.

    The file holds, per adapted layer, its k deltas plus its class, weight shape,
    mode, scale and a fingerprint of its base weight; also every other parameter
    with ``requires_grad`` (e.g. of ``trainable`` modules), and the persistent
    buffers of the modules holding those (e.g. BatchNorm running statistics).
    It is written atomically. For a model sharded by FSDP2, call it on every rank:
    it gathers what it records (collectives) and rank 0 writes (see `svdtune.sharding`).

    Args:
        model: a model passed through `svdtune.apply`.
        path: the file to write, ending with ``.safetensors``; replaced if it exists.
        metadata: your own notes, str -> str (dataset, commit, ...), shown by ``svdtune inspect``.

    Raises:
        SvdtuneError: the model has no svdtune layers, a delta is not finite, a base
            weight is being trained too, metadata is not str -> str, or ``path`` does not
            end with ``.safetensors``.
        OSError: the file cannot be written, e.g. its folder does not exist (nothing is left under ``path``).

    Example:
        >>> svdtune.save_delta(model, "task.safetensors", metadata={"dataset": "koniq10k"})
    """
    model, path = unwrap(model), as_path(path, "path")
    adapted = list(adapted_units(model))
    if not adapted:
        raise SvdtuneError("the model has no svdtune layers to save; call svdtune.apply(model, targets=...) and train first.")
    metadata = as_metadata(metadata)  # before any work
    container.check_destination(path)
    gathered = bool(sharded_tensors(model))  # FSDP2: every rank gathers, rank 0 writes (svdtune.sharding)
    with torch.no_grad():
        layers = {name: _layer_delta(name, layer, part) for name, layer, part in adapted}
        own = {id(layer.spectral_delta(part)) for _, layer, part in adapted} | factor_ids(model)  # svdtune's
        params = {name: full(p).detach().to("cpu", copy=True) for name, p in model.named_parameters()
                  if p.requires_grad and id(p) not in own}
    buffers = _trained_buffers(model, params)
    warn_if_buffers_changed(model, set(buffers))
    delta = DeltaFile(layers, params, metadata, buffers=buffers)
    if gathered:
        write_on_rank_zero(lambda: delta.save(path), path, adapted[0][1].spectral_delta(adapted[0][2]))
    else:
        delta.save(path)


def _trained_buffers(model: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The persistent buffers of the modules whose parameters are saved and of every module inside
    a ``trainable`` module (e.g. BatchNorm running statistics, also of a BatchNorm without affine)."""
    modules = dict(model.named_modules())
    owners = sorted({name.rpartition(".")[0] for name in params} | trainable_modules(model))
    return {join_name(owner, name): buffer.detach().to("cpu", copy=True)
            for owner in owners for name, buffer in own_persistent_buffers(modules[owner])}


def _layer_delta(name: str, layer: SpectralLayer, part: str) -> LayerDelta:
    """The record of one unit: for a part, of its matrix; else of the weight as stored (Conv1D: (in, out))."""
    unit, config = layer._unit(part), layer._spectral.config
    if layer._parameters[unit.part.param].requires_grad:
        raise SvdtuneError(f"layer {name!r} trains its base weight too, which a delta file cannot hold; freeze "
                           f"{kinds.split_unit(name, part)}.{unit.part.param}, or merge and save the whole model instead.")
    held = layer._factors(part)  # under FSDP2, each gathered whole (svdtune.sharding.full)
    factors = dataclasses.replace(held, U=full(held.U), sigma=full(held.sigma), Vh=full(held.Vh))
    delta, base = full(layer.spectral_delta(part)).detach(), full(layer._parameters[unit.part.param])
    if not values.all_finite(delta):
        raise SvdtuneError(f"layer {name!r} has non-finite deltas; training diverged: lower the learning rate.")
    weight = kinds.matrix(layer._spectral.kind, base, unit.part) if part else base
    shift = spectrum_shift(factors.sigma, delta, config.scale, config.mode)
    pairs = repeated_pairs(factors.sigma, shift, factors.next_sigma)
    stamp = dataclasses.replace(fingerprint(weight, factors.sigma), basis=basis_of(factors.U, factors.Vh, pairs))
    return LayerDelta(layer._spectral.original_class.__name__, tuple(weight.shape), config.mode, config.scale, stamp,
                      delta.to("cpu", copy=True), part or None, factors.svd)


@dataclass(eq=False)
class _Step:
    """What loading does to one layer, decided before anything changes."""

    layer: nn.Module
    part: kinds.Part  # which matrix of the layer the record is of
    config: SpectralConfig
    delta: Tensor
    adapted: bool  # the layer holds an svdtune adapter already
    factors: Decomposition | None = None  # a plain layer is decomposed once its base weight is known to match
    svd: RandomizedSVD | None = None  # the method the file records (None: the exact SVD)

    @property
    def matrix(self) -> Tensor:
        """The base matrix the record's deltas belong to (see `svdtune.kinds.matrix`)."""
        return kinds.matrix(kinds.kind_of(self.layer), self.layer._parameters[self.part.param], self.part)

    @property
    def weight(self) -> Tensor:
        """What the record's fingerprint and shape are of: the part's matrix, or the weight as stored."""
        return self.matrix if self.part.name else self.layer._parameters[self.part.param]


def load_delta(
    model: nn.Module,
    source: str | os.PathLike | DeltaFile,
    strict: bool = True,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Load a delta file into its base model, applying svdtune first if the model is plain.

    On a plain model, exactly the layers named in the file are adapted, with the
    file's rank, mode, scale and SVD method (as `svdtune.apply` would, freezing the rest).
    On a model that already holds the same adapters (same layers, ranks, modes and SVD methods), the
    deltas and scales are copied in. Fully trained parameters in the file are
    copied into the model's parameters of the same names and left trainable; their
    modules' buffers into the model's buffers of the same names.

    Args:
        model: the base model the delta was trained on; changed in place.
        source: a delta file path, or a `DeltaFile` (from `read_delta`/`combine`).
        strict: if False, a base weight that does not match the file's fingerprint
            is loaded anyway, with a warning, instead of raising.
        cache_dir: an SVD cache folder, as for `svdtune.apply`.

    Returns:
        The same model.

    Raises:
        SvdtuneError: the file is damaged or from an unknown version; a layer is
            missing or has another class or shape; a base weight differs (strict);
            the model holds different adapters; a parameter or buffer is missing,
            has another shape, is on the meta device or cannot hold the file's values
            (overflow, NaN, a fraction into an integer); the deltas make a weight
            non-finite; an argument has the wrong type. The model is unchanged when
            it is raised. A model built under ``torch.inference_mode()`` loads too.

    Example:
        >>> model = load_my_pretrained_model()
        >>> svdtune.load_delta(model, "task.safetensors")
    """
    wrapper, model = model, unwrap(model)
    refuse_sharded(model, "load a delta into", "call svdtune.load_delta before fully_shard.")
    refuse_lazy(model, "svdtune.load_delta")
    cache_dir = as_optional_path(cache_dir, "cache_dir")
    delta = as_delta_file(source)
    adapted = {name: (layer, part) for name, layer, part in adapted_units(model)}
    if adapted:
        steps = {name: _adapted_step(name, record, adapted, set(delta.layers)) for name, record in delta.layers.items()}
    else:
        modules = dict(model.named_modules())
        steps = {name: _plain_step(name, record, modules) for name, record in delta.layers.items()}
        _check_whole_layers(steps)
        check_not_shared(model, {kinds.split_unit(name, step.part.name): step.layer for name, step in steps.items()})
    params = values.targets(model, "parameter", _param_candidates(model, delta, steps), delta.params)
    buffers = values.targets(model, "buffer", _persistent_buffers(model, delta), delta.buffers)
    _check_fingerprints(delta, steps, strict, cache_dir)  # hashes first, then the SVDs
    record = {} if adapted else root_record(model)
    written = [target for target, _ in (*params.values(), *buffers.values())]
    written += [step.layer.spectral_delta(step.part.name) for step in steps.values() if step.adapted]
    # Nothing above changed the model; nothing below is meant to fail, and if it does, it is undone.
    with all_or_nothing(model, "svdtune.load_delta", written) as progress:
        _apply_steps(model, steps, cache_dir, record, progress)
        for kind, targets in (("parameter", params), ("buffer", buffers)):
            for name, (target, value) in targets.items():
                progress.current = f"{kind} {name!r}"
                with writable(target):
                    target.copy_(value)
                    if kind == "parameter" and not target.requires_grad:
                        target.requires_grad_(True)
        for step in steps.values():  # inference tensors have no version counter to tell the W' cache
            step.layer._clear_cache()
    return wrapper


def _plain_step(name: str, record: LayerDelta, modules: dict[str, nn.Module]) -> _Step:
    module = kinds.split_unit(name, record.part)
    layer = modules.get(module)
    if layer is None or not module:
        close = [n for n in modules if n and n.split(".")[-1] == module.split(".")[-1]][:3]
        hint = f" (it has {', '.join(close)})" if close else ""
        raise SvdtuneError(f"layer {module!r} of the delta file is missing from the model{hint}; "
                           "load the delta into the base model it was trained on.")
    kind = kinds.kind_of(layer)
    _check_class(name, type(layer) if kind is not None else None, type(layer).__name__, record)
    _check_adaptable(module, layer)
    part = next(p for p in kind.parts(layer) if p.name == (record.part or ""))
    weight = layer._parameters[part.param]
    step = _Step(layer, part, _config(record), values.delta_value(name, record, weight.dtype, weight.device), adapted=False,
                 svd=record.svd)
    _check_shape(name, tuple(step.weight.shape), record)
    return step


def _config(record: LayerDelta) -> SpectralConfig:
    rank = None if record.rank == record.max_rank else record.rank
    return SpectralConfig(mode=record.mode, rank=rank, scale=record.scale)


def _check_whole_layers(steps: dict[str, _Step]) -> None:
    """A layer of several parts (attention) is adapted whole: the file must hold each part, with one rank and mode."""
    by_layer: dict[int, list[tuple[str, _Step]]] = {}
    for name, step in steps.items():
        by_layer.setdefault(id(step.layer), []).append((name, step))
    for group in by_layer.values():
        name, step = group[0]
        module = kinds.split_unit(name, step.part.name)
        parts = [p.name for p in kinds.kind_of(step.layer).parts(step.layer)]
        missing = sorted(set(parts) - {s.part.name for _, s in group})
        if missing:
            raise SvdtuneError(f"the delta file holds {name!r} but not {kinds.unit_name(module, missing[0])!r}; "
                               f"svdtune adapts the parts {parts} of {module!r} together: write the file again.")
        if len({s.config for _, s in group}) > 1:
            raise SvdtuneError(f"the parts of {module!r} have different ranks, modes or scales in the delta file; "
                               "svdtune adapts them with one setting: write the file again.")


def _adapted_step(name: str, record: LayerDelta, adapted: dict[str, tuple[SpectralLayer, str]],
                  wanted: set[str]) -> _Step:
    extra = sorted(set(adapted) - wanted)
    layer, part = adapted.get(name, (None, ""))
    if layer is None or extra:
        raise SvdtuneError(
            f"the model already holds svdtune adapters on other layers than the delta file "
            f"({name if layer is None else extra[0]!r} differs); call svdtune.restore(model) first, "
            "or load the delta into a fresh base model."
        )
    config = layer._spectral.config
    original = layer._spectral.original_class
    _check_class(name, original, original.__name__, record)
    step = _Step(layer, layer._unit(part).part, config, record.delta, adapted=True, factors=layer._factors(part))
    _check_shape(name, tuple(step.weight.shape), record)
    rank = layer.spectral_delta(part).numel()
    if rank != record.rank or config.mode != record.mode:
        raise SvdtuneError(
            f"layer {name!r} already holds a different adapter (rank {rank}, mode {config.mode}; the file has "
            f"rank {record.rank}, mode {record.mode}); call svdtune.restore(model) first, or load into a fresh base model."
        )
    current = layer.spectral_delta(part)
    if current.is_meta:
        raise SvdtuneError(f"layer {name!r} is on the meta device; materialize the model first (model.to_empty(...)).")
    step.delta = values.delta_value(name, record, current.dtype, current.device)
    if step.factors.svd != record.svd:
        raise SvdtuneError(
            f"layer {name!r} was decomposed by {_method(step.factors.svd)} but the delta file's basis by "
            f"{_method(record.svd)}, so its deltas would meet other singular vectors; call svdtune.restore(model) "
            "first, or load into a fresh base model."
        )
    step.config = dataclasses.replace(config, scale=record.scale)
    step.svd = record.svd
    return step


def _method(svd: RandomizedSVD | None) -> str:
    return "the exact SVD" if svd is None else f"the randomized SVD ({svd.describe()})"


def _check_class(name: str, cls: type | None, shown: str, record: LayerDelta) -> None:
    """``cls`` is the layer's (original) class, None if svdtune does not support it; ``shown`` names it."""
    if cls is None or cls.__name__ != record.layer_class:
        raise SvdtuneError(f"layer {name!r} is a {shown} in the model but a {record.layer_class} "
                           "in the delta file; load the delta into the base model it was trained on.")


def _check_shape(name: str, shape: tuple[int, ...], record: LayerDelta) -> None:
    if shape != record.weight_shape:
        raise SvdtuneError(f"layer {name!r} has weight shape {list(shape)} in the model but {list(record.weight_shape)} "
                           "in the delta file; load the delta into the base model it was trained on.")


def _check_fingerprints(delta: DeltaFile, steps: dict[str, _Step], strict: bool, cache_dir: str | None) -> None:
    """Check every base weight's hash before any SVD (a wrong base fails fast), then decompose, and refuse
    deltas that make the adapted weight non-finite in the weight's dtype (as `merge_files` does)."""
    for name, step in steps.items():
        check_base(name, delta.layers[name].fingerprint, step.weight,
                   lambda: _factors(name, step, cache_dir).sigma, strict,
                   "load the delta into the base model it was trained on", "loading")
    for name, step in steps.items():
        record, factors = delta.layers[name], _factors(name, step, cache_dir)
        with torch.no_grad():
            shift = spectrum_shift(factors.sigma, record.delta.to(factors.sigma), record.scale, record.mode)
        warn_if_basis_dependent(name, factors, shift, record.fingerprint)
        weight = step.matrix
        if not _stays_finite(weight, factors, shift):  # as merge_files refuses the same file
            raise SvdtuneError(f"layer {name!r}: its deltas at scale {record.scale:g} make the weight non-finite in "
                               f"{weight.dtype}; check the delta file's deltas and scale.")


def _stays_finite(weight: Tensor, factors: Decomposition, shift: Tensor) -> bool:
    """Whether W' = W + U_k diag(shift) Vh_k is finite in the weight's dtype.

    Cheap first: `svdtune.formula.may_overflow` with max|W| decides without building W'; only
    otherwise is W' built.
    """
    with torch.no_grad():
        if not may_overflow(float(weight.detach().abs().max()), shift, weight.dtype):
            return True
        return values.all_finite(merged_matrix(weight, factors.U[:, :shift.numel()], factors.Vh[:shift.numel()], shift))


def _factors(name: str, step: _Step, cache_dir: str | None) -> Decomposition:
    """The step's decomposition, computed on first use."""
    if step.factors is None:
        warn_if_slow_svd(name, tuple(step.matrix.shape), step.config.rank, step.matrix.device)
        step.factors = decompose_named(name, step.matrix, step.config.rank, cache_dir, step.svd)
    return step.factors


def _persistent_buffers(model: nn.Module, delta: DeltaFile) -> dict[str, Tensor]:
    """The buffers a file may write: those of the state dict, as `save_delta` saves them. A non-persistent
    buffer (a mask, a cache) is the model's own business."""
    persistent = {join_name(name, leaf): buffer for name, module in model.named_modules()
                  for leaf, buffer in own_persistent_buffers(module)}
    hidden = next((name for name, _ in model.named_buffers() if name in delta.buffers and name not in persistent), None)
    if hidden is not None:
        raise SvdtuneError(f"buffer {hidden!r} of the delta file is a non-persistent buffer of the model (not in its "
                           "state dict), which a delta file cannot set; load the delta into the model it was trained with.")
    return persistent


def _param_candidates(model: nn.Module, delta: DeltaFile, steps: dict[str, _Step]) -> dict[str, Tensor]:
    """The parameters a file may write: not a tuned base weight, nor svdtune's own (deltas, frozen factors)."""
    base_weights = {join_name(kinds.split_unit(name, step.part.name), step.part.param) for name, step in steps.items()}
    factors = factor_ids(model)
    return {name: p for name, p in model.named_parameters()
            if name not in base_weights and id(p) not in factors and not name.rsplit(".", 1)[-1].startswith(DELTA)}


def _apply_steps(model: nn.Module, steps: dict[str, _Step], cache_dir: str | None, record: dict[str, object],
                 progress: Progress) -> None:
    """Adapt the plain layers as `svdtune.apply` would, then set every layer's deltas and config."""
    plan: dict[int, tuple[str, nn.Module, dict[str, Decomposition], SpectralConfig]] = {}
    for name, step in steps.items():
        if not step.adapted:
            module = kinds.split_unit(name, step.part.name)
            plan.setdefault(id(step.layer), (module, step.layer, {}, step.config))[2][step.part.name] = step.factors
    if plan:
        adapt_layers(model, list(plan.values()), cache_dir, record, progress)
    for name, step in steps.items():
        progress.current = f"layer {name!r}"
        step.layer._spectral.config = step.config
        delta = step.layer.spectral_delta(step.part.name)
        with writable(delta):  # the copy bumps the delta's version: a cached W' is rebuilt
            delta.copy_(step.delta)
