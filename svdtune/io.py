"""Saving a model's deltas to a file and loading them back: `save_delta`, `load_delta`.

`load_delta` checks the whole file against the model first (layers, classes,
shapes, ranks, modes, base-weight fingerprints, parameters) and computes every
decomposition it needs; only then does it change the model, in steps that
cannot fail. So when it raises, the model is exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdtune import container
from svdtune.cache import decompose_named
from svdtune.config import SpectralConfig
from svdtune.decompose import SUPPORTED_TYPES, Decomposition
from svdtune.basis import basis_of, repeated_pairs
from svdtune.delta import DeltaFile, LayerDelta, as_delta_file, check_base, fingerprint
from svdtune.errors import SvdtuneError
from svdtune.randomized import RandomizedSVD
from svdtune.layers import DELTA, SpectralLayer, spectrum_shift
from svdtune.offline import warn_if_basis_dependent
from svdtune.model import (
    _check_adaptable, adapt_layers, adapted_layers, check_not_shared, join_name, own_persistent_buffers, root_record,
    trainable_modules, unwrap, warn_if_buffers_changed,
)


def save_delta(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the model's deltas (and fully trained parameters) to a small safetensors file.

    The file holds, per adapted layer, its k deltas plus its class, weight shape,
    mode, scale and a fingerprint of its base weight; also every other parameter
    with ``requires_grad`` (e.g. of ``trainable`` modules), and the persistent
    buffers of the modules holding those (e.g. BatchNorm running statistics).
    It is written atomically.

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
    model = unwrap(model)
    adapted = list(adapted_layers(model))
    if not adapted:
        raise SvdtuneError("the model has no svdtune layers to save; call svdtune.apply(model, targets=...) and train first.")
    metadata = dict(metadata or {})
    container.check_metadata(metadata)  # before any work
    container.check_destination(path)
    with torch.no_grad():
        layers = {name: _layer_delta(name, layer) for name, layer in adapted}
    deltas = {id(layer._parameters[DELTA]) for _, layer in adapted}
    params = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()
              if p.requires_grad and id(p) not in deltas}
    buffers = _trained_buffers(model, params)
    warn_if_buffers_changed(model, set(buffers))
    DeltaFile(layers, params, metadata, buffers=buffers).save(path)


def _trained_buffers(model: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The persistent buffers of the modules whose parameters are saved and of every module inside
    a ``trainable`` module (e.g. BatchNorm running statistics, also of a BatchNorm without affine)."""
    modules = dict(model.named_modules())
    owners = sorted({name.rpartition(".")[0] for name in params} | trainable_modules(model))
    return {join_name(owner, name): buffer.detach().to("cpu", copy=True)
            for owner in owners for name, buffer in own_persistent_buffers(modules[owner])}


def _layer_delta(name: str, layer: SpectralLayer) -> LayerDelta:
    if layer.base_weight.requires_grad:
        raise SvdtuneError(f"layer {name!r} trains its base weight too, which a delta file cannot hold; "
                           f"freeze {name}.weight, or merge and save the whole model instead.")
    delta, config = layer._parameters[DELTA].detach().to("cpu", copy=True), layer._spectral.config
    if not bool(torch.isfinite(delta).all()):
        raise SvdtuneError(f"layer {name!r} has non-finite deltas; training diverged: lower the learning rate.")
    class_name = layer._spectral.original_class.__name__
    factors = layer._factors()
    pairs = repeated_pairs(factors.sigma, layer._shift(factors), factors.next_sigma)
    stamp = dataclasses.replace(fingerprint(layer.base_weight, factors.sigma), basis=basis_of(factors.U, factors.Vh, pairs))
    return LayerDelta(class_name, tuple(layer.base_weight.shape), config.mode, config.scale, stamp, delta, factors.svd)


@dataclass(eq=False)
class _Step:
    """What loading does to one layer, decided before anything changes."""

    layer: nn.Module
    config: SpectralConfig
    delta: Tensor
    adapted: bool  # the layer holds an svdtune adapter already
    factors: Decomposition | None = None  # a plain layer is decomposed once its base weight is known to match
    svd: RandomizedSVD | None = None  # the method the file records (None: the exact SVD)


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
            the model holds different adapters; a parameter or buffer is missing or
            has another shape. The model is unchanged when it is raised.

    Example:
        >>> model = load_my_pretrained_model()
        >>> svdtune.load_delta(model, "task.safetensors")
    """
    wrapper, model = model, unwrap(model)
    delta = as_delta_file(source)
    adapted = dict(adapted_layers(model))
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    if adapted:
        steps = {name: _adapted_step(name, record, adapted, set(delta.layers)) for name, record in delta.layers.items()}
    else:
        modules = dict(model.named_modules())
        steps = {name: _plain_step(name, record, modules) for name, record in delta.layers.items()}
        check_not_shared(model, {name: step.layer for name, step in steps.items()})
    params = _param_targets(model, delta)
    buffers = _targets("buffer", dict(model.named_buffers()), delta.buffers)
    _check_fingerprints(delta, steps, strict, cache_dir)  # hashes first, then the SVDs
    record = {} if adapted else root_record(model)
    # Nothing above changed the model; nothing below can fail.
    _apply_steps(model, steps, cache_dir, record)
    with torch.no_grad():
        for name, value in delta.params.items():
            params[name].copy_(value)
            params[name].requires_grad_(True)
        for name, value in delta.buffers.items():
            buffers[name].copy_(value)
    return wrapper


def _plain_step(name: str, record: LayerDelta, modules: dict[str, nn.Module]) -> _Step:
    layer = modules.get(name)
    if layer is None or not name:
        close = [n for n in modules if n and n.split(".")[-1] == name.split(".")[-1]][:3]
        hint = f" (it has {', '.join(close)})" if close else ""
        raise SvdtuneError(f"layer {name!r} of the delta file is missing from the model{hint}; "
                           "load the delta into the base model it was trained on.")
    _check_class(name, type(layer) if isinstance(layer, SUPPORTED_TYPES) else None, type(layer).__name__, record)
    _check_adaptable(name, layer)
    _check_shape(name, tuple(layer._parameters["weight"].shape), record)
    rank = None if record.rank == record.max_rank else record.rank
    config = SpectralConfig(mode=record.mode, rank=rank, scale=record.scale)
    return _Step(layer, config, record.delta, adapted=False, svd=record.svd)


def _adapted_step(name: str, record: LayerDelta, adapted: dict[str, SpectralLayer], wanted: set[str]) -> _Step:
    extra = sorted(set(adapted) - wanted)
    layer = adapted.get(name)
    if layer is None or extra:
        raise SvdtuneError(
            f"the model already holds svdtune adapters on other layers than the delta file "
            f"({name if layer is None else extra[0]!r} differs); call svdtune.restore(model) first, "
            "or load the delta into a fresh base model."
        )
    config = layer._spectral.config
    original = layer._spectral.original_class
    _check_class(name, original, original.__name__, record)
    _check_shape(name, tuple(layer.base_weight.shape), record)
    rank = layer._parameters[DELTA].numel()
    if rank != record.rank or config.mode != record.mode:
        raise SvdtuneError(
            f"layer {name!r} already holds a different adapter (rank {rank}, mode {config.mode}; the file has "
            f"rank {record.rank}, mode {record.mode}); call svdtune.restore(model) first, or load into a fresh base model."
        )
    factors = layer._factors()
    if factors.svd != record.svd:
        raise SvdtuneError(
            f"layer {name!r} was decomposed by {_method(factors.svd)} but the delta file's basis by {_method(record.svd)}, "
            "so its deltas would meet other singular vectors; call svdtune.restore(model) first, or load into a fresh base model."
        )
    config = dataclasses.replace(config, scale=record.scale)
    return _Step(layer, config, record.delta, adapted=True, factors=factors, svd=record.svd)


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
    """Check every base weight's hash before any SVD (a wrong base fails fast), then decompose."""
    for name, step in steps.items():
        check_base(name, delta.layers[name].fingerprint, step.layer._parameters["weight"],
                   lambda: _factors(name, step, cache_dir).sigma, strict,
                   "load the delta into the base model it was trained on", "loading")
    for name, step in steps.items():
        record, factors = delta.layers[name], _factors(name, step, cache_dir)
        with torch.no_grad():
            shift = spectrum_shift(factors.sigma, record.delta.to(factors.sigma), record.scale, record.mode)
        warn_if_basis_dependent(name, factors, shift, record.fingerprint)


def _factors(name: str, step: _Step, cache_dir: str | None) -> Decomposition:
    """The step's decomposition, computed on first use."""
    if step.factors is None:
        step.factors = decompose_named(name, step.layer._parameters["weight"], step.config.rank, cache_dir, step.svd)
    return step.factors


def _param_targets(model: nn.Module, delta: DeltaFile) -> dict[str, Tensor]:
    base_weights = {f"{name}.weight" for name in delta.layers}
    params = {name: p for name, p in model.named_parameters()
              if name not in base_weights and name.rsplit(".", 1)[-1] != DELTA}
    return _targets("parameter", params, delta.params)


def _targets(kind: str, found: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's tensors that ``values`` are copied into, each checked to exist with the same shape."""
    for name, value in values.items():
        target = found.get(name)
        if target is None:
            hint = " (or is a base weight of a tuned layer)" if kind == "parameter" else ""
            raise SvdtuneError(f"{kind} {name!r} of the delta file is missing from the model{hint}; "
                               "load the delta into the model it was trained with.")
        if tuple(target.shape) != tuple(value.shape):
            raise SvdtuneError(f"{kind} {name!r} has shape {list(target.shape)} in the model but {list(value.shape)} "
                               "in the delta file; load the delta into the model it was trained with.")
    return {name: found[name] for name in values}


def _apply_steps(model: nn.Module, steps: dict[str, _Step], cache_dir: str | None, record: dict[str, object]) -> None:
    """Adapt the plain layers as `svdtune.apply` would, then set every layer's deltas and config."""
    plan = [(step.layer, step.factors, step.config) for step in steps.values() if not step.adapted]
    if plan:
        adapt_layers(model, plan, cache_dir, record)
    for step in steps.values():
        step.layer._spectral.config = step.config
        with torch.no_grad():  # the copy bumps the delta's version: a cached W' is rebuilt
            step.layer._parameters[DELTA].copy_(step.delta)
