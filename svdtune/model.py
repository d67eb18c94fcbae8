"""Whole-model operations: apply, trainable_parameters, report, set_scale, merge, restore."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from svdtune import container
from svdtune.config import SpectralConfig
from svdtune.cache import decompose_named
from svdtune.decompose import SUPPORTED_TYPES, Decomposition
from svdtune.errors import SvdtuneError
from svdtune.integrations import guard
from svdtune.layers import DELTA, SpectralLayer, adapt, check_finite_merge, unadapt
from svdtune.report import Report, build_report
from svdtune.targets import as_patterns, select

# What the first apply records on the root model (its __dict__), for merge, restore and save_delta:
_FLAGS = "_svdtune_requires_grad"  # {parameter name: requires_grad before apply}
_BUFFERS = "_svdtune_buffers"  # {persistent buffer name: (dtype, sha256 of its bytes)} at apply
_TRAINABLE = "_svdtune_trainable"  # names of the modules apply(trainable=...) keeps fully trainable
_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel`` wrappers,
    so that layer names carry no ``_orig_mod.``/``module.`` prefix (a delta then fits the plain model)."""
    return _wrapper_chain(model)[-1]


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """[model, the module it wraps, ..., the innermost module that is no wrapper]."""
    chain = [model]
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported once anything was compiled
    while True:
        if eval_frame is not None and isinstance(chain[-1], eval_frame.OptimizedModule):
            chain.append(chain[-1]._orig_mod)
        elif isinstance(chain[-1], _PARALLEL):
            chain.append(chain[-1].module)
        else:
            return chain


def apply(
    model: nn.Module,
    targets: str | Iterable[str],
    exclude: str | Iterable[str] = (),
    rank: int | None = None,
    mode: str = "shift",
    *,
    trainable: str | Iterable[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Adapt the selected layers in place: freeze everything, train one delta per singular value.

    Each selected ``nn.Linear``/``nn.ConvNd``/``nn.ConvTransposeNd`` (or subclass)
    keeps its object identity, class ancestry and state-dict keys, and gains a
    parameter ``svd_delta`` of zeros, so the model's output is unchanged until
    training. Every other parameter is frozen, except those of ``trainable`` modules.

    Args:
        model: any module; changed in place.
        targets: glob patterns over ``named_modules()`` names; a pattern also
            matches a trailing dotted part of a name (``"fc*"`` selects ``head.fc2``).
        exclude: patterns (same rule) of layers to leave alone.
        rank: tune only the top ``rank`` singular values of each layer (capped at the
            layer's min(m, n)); only those singular vectors are stored. None: all.
        mode: "shift" (sigma' = relu(sigma + s*delta), SVDiff) or "scale"
            (sigma' = sigma * (1 + s*delta)).
        trainable: patterns of modules whose own parameters stay fully trainable
            (e.g. a new head); they must not be targets.
        cache_dir: a folder to store and reuse decompositions in (keyed by the
            weight's bytes, shape, dtype, rank and algorithm); None computes every SVD.

    Returns:
        The same model object.

    Raises:
        SvdtuneError: a pattern selects nothing (the message lists similar names),
            a layer is already adapted or cannot be (lazy, parametrized, non-finite
            weight), a layer is both a target and trainable, or bad rank/mode. The
            model is unchanged when it is raised.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> model = svdtune.apply(model, targets=["0", "2"])
        >>> optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=1e-3)
    """
    parallel = [type(m).__name__ for m in _wrapper_chain(model) if isinstance(m, _PARALLEL)]
    if parallel:
        raise SvdtuneError(f"apply got a model wrapped in {parallel[0]}, which records its parameters when built, so "
                           "deltas added now would not be synchronised; call apply on the model first, then wrap it.")
    wrapper, model = model, unwrap(model)
    config = SpectralConfig(mode=mode, rank=rank)
    targets, exclude = as_patterns(targets, "targets"), as_patterns(exclude, "exclude")
    layers = select(model, targets, exclude, SUPPORTED_TYPES, "targets")
    if not layers:
        raise SvdtuneError(
            f"targets={list(targets)} with exclude={list(exclude)} leaves no layer to adapt; "
            "name at least one layer, e.g. targets=['fc*']."
        )
    free = _select_trainable(model, as_patterns(trainable, "trainable"), layers)
    record = root_record(model)
    for name, layer in layers.items():
        _check_adaptable(name, layer)
    check_not_shared(model, layers)
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    weights = {name: layer._parameters["weight"] for name, layer in layers.items()}
    factors = {name: decompose_named(name, weight, rank, cache_dir) for name, weight in weights.items()}
    # Nothing above changed the model; nothing below can fail.
    adapt_layers(model, [(layer, factors[name], config) for name, layer in layers.items()], cache_dir, record)
    for module in free.values():
        module.requires_grad_(True)
    model.__dict__[_TRAINABLE] = sorted({*model.__dict__.get(_TRAINABLE, ()), *free})
    return wrapper


def root_record(model: nn.Module) -> dict[str, object]:
    """What the first `apply` on ``model`` records on it, computed before anything changes;
    {} if it was adapted before (then later calls freeze only the layers they adapt)."""
    if _FLAGS in model.__dict__:
        return {}
    return {
        _FLAGS: {name: p.requires_grad for name, p in model.named_parameters()},
        _BUFFERS: {name: _digest(b) for name, b in persistent_buffers(model) if b.device.type != "meta"},
        _TRAINABLE: [],
    }


def _digest(tensor: Tensor) -> tuple[str, str]:
    return str(tensor.dtype), hashlib.sha256(container.tensor_bytes(tensor)).hexdigest()


def adapt_layers(
    model: nn.Module, plan: list[tuple[nn.Module, Decomposition, SpectralConfig]], cache_dir: str | None,
    record: dict[str, object],
) -> None:
    """Adapt layers already checked and decomposed: the part of `apply` that cannot fail.

    With a `root_record` (the first time), it is stored on the model and the whole model is frozen.
    """
    if record:
        model.__dict__.update(record)
        model.requires_grad_(False)
        guard.install(model)  # warns on save_pretrained of the unmerged model
    for layer, factors, config in plan:
        layer.requires_grad_(False)
        adapt(layer, factors, config, cache_dir)


def _select_trainable(model: nn.Module, patterns: tuple[str, ...], layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    if not patterns:
        return {}
    modules = select(model, patterns, (), (nn.Module,), "trainable")
    for name, module in modules.items():
        clash = [n for n, m in module.named_modules(prefix=name) if n in layers or isinstance(m, SpectralLayer)]
        if clash:
            raise SvdtuneError(
                f"{clash[0]!r} is both a target and inside trainable module {name!r}; "
                "a layer is either spectrally tuned or fully trained: drop it from one list."
            )
    return modules


def _check_adaptable(name: str, layer: nn.Module) -> None:
    if isinstance(layer, SpectralLayer):
        raise SvdtuneError(
            f"layer {name!r} is already adapted by svdtune; exclude it, or call svdtune.restore(model) first."
        )
    weight = layer._parameters.get("weight")
    if not isinstance(weight, nn.Parameter):
        raise SvdtuneError(
            f"layer {name!r} has no plain 'weight' parameter (parametrized or weight-normed?); "
            "remove the parametrization first or exclude the layer."
        )
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise SvdtuneError(f"layer {name!r} is lazy and not initialized yet; run one forward pass before apply.")
    if weight.is_meta:
        raise SvdtuneError(
            f"layer {name!r} is on the meta device and has no values to decompose; "
            "materialize and load the weights first (model.to_empty(device=...) and load_state_dict)."
        )


def check_not_shared(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Refuse a layer reachable under two names, or whose weight is tied to another parameter:
    adapting it under one name would leave the other copy (and its checkpoint key) unadapted."""
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    param_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(param), []).append(name)
    for name, layer in layers.items():
        others = [n for n in module_names.get(id(layer), []) if n != name]
        if others:
            raise SvdtuneError(
                f"layer {name!r} is shared: the same module is also {others[0]!r}; svdtune cannot adapt one name "
                "without the other: use separate modules, or exclude both names."
            )
        tied = [n for n in param_names.get(id(layer._parameters["weight"]), []) if n != f"{name}.weight"]
        if tied:
            raise SvdtuneError(
                f"layer {name!r} has its weight tied to {tied[0]!r}; untie it first "
                f"(e.g. {name}.weight = nn.Parameter({name}.weight.detach().clone())) or exclude the layer."
            )


def persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(qualified name, buffer) for every buffer that goes into the state dict."""
    for module_name, module in model.named_modules():
        for name, buffer in own_persistent_buffers(module):
            yield join_name(module_name, name), buffer


def own_persistent_buffers(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, buffer) for the module's own buffers (not its children's) that go into the state dict."""
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


def trainable_modules(model: nn.Module) -> set[str]:
    """The names of the modules `apply(trainable=...)` keeps trainable, and of all modules inside them."""
    names = set()
    for prefix, root in model.named_modules():
        for name in root.__dict__.get(_TRAINABLE, ()):
            top = join_name(prefix, name)
            names.update(join_name(top, inner) for inner, _ in model.get_submodule(top).named_modules())
    return names


def join_name(prefix: str, name: str) -> str:
    """A qualified name: "head" + "0" -> "head.0"; either may be "" (the root)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def warn_if_buffers_changed(model: nn.Module, saved: set[str]) -> None:
    """Warn if persistent buffers outside ``saved`` changed since `apply` (BatchNorm statistics
    updated in train mode): the delta file does not hold them, so a reload would differ.
    A buffer whose dtype changed since (``model.to(dtype)``) cannot be compared and is skipped."""
    for prefix, root in model.named_modules():
        before = root.__dict__.get(_BUFFERS, {})
        named = ((join_name(prefix, name), name, buffer) for name, buffer in persistent_buffers(root))
        changed = [full for full, name, buffer in named if full not in saved and name in before
                   and before[name][0] == str(buffer.dtype) and before[name] != _digest(buffer)]
        if changed:
            warnings.warn(
                f"buffers {changed[:3]} changed since svdtune.apply (e.g. BatchNorm running statistics updated in "
                "train mode) and are not in the delta file, so loading it into the base model gives a different "
                "model; keep frozen BatchNorm layers in eval mode while training, or pass their modules as "
                "apply(..., trainable=[...]) so their statistics are saved.",
                RuntimeWarning, stacklevel=3,
            )
            return


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, SpectralLayer]]:
    """(qualified name, layer) for every svdtune layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            yield name, module


def _require_adapted(model: nn.Module, action: str) -> list[tuple[str, SpectralLayer]]:
    layers = list(adapted_layers(model))
    if not layers:
        raise SvdtuneError(f"the model has no svdtune layers to {action}; call svdtune.apply(model, targets=...) first.")
    return layers


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to give the optimizer: every delta plus the ``trainable`` modules' parameters.

    Args:
        model: a model passed through `apply`.

    Returns:
        The parameters with ``requires_grad=True``, deltas first, each once.

    Raises:
        SvdtuneError: if the model has no svdtune layers.

    Example:
        >>> optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=1e-3)
    """
    layers = _require_adapted(unwrap(model), "train")
    deltas = [layer._parameters[DELTA] for _, layer in layers]
    seen = {id(p) for p in deltas}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    _warn_if_trainable_since_apply(unwrap(model))
    return [p for p in deltas if p.requires_grad] + others


def _warn_if_trainable_since_apply(model: nn.Module) -> None:
    """Warn about trainable parameters that `apply` did not leave trainable: created after it, or unfrozen since.
    E.g. diffusers' fuse_qkv_projections() after apply builds new fused layers from the adapted weights; the
    attention then uses those, fully trainable, and the deltas of to_q/to_k/to_v get no gradient."""
    known, free = set(), trainable_modules(model)
    for prefix, root in model.named_modules():
        known.update(join_name(prefix, name) for name in root.__dict__.get(_FLAGS, ()))
    extra = [name for name, p in model.named_parameters() if p.requires_grad and name.rpartition(".")[2] != DELTA
             and (name not in known or name.rpartition(".")[0] not in free)]
    if extra:
        warnings.warn(
            f"{len(extra)} trainable parameters were created or unfrozen after svdtune.apply (e.g. {extra[:3]}); "
            "they are trained fully and the deltas of layers they replace get no gradient. If a library fused "
            "layers after apply (diffusers' fuse_qkv_projections()), fuse first, then apply; for a new head, "
            "create it before apply and pass apply(..., trainable=[its name]).",
            RuntimeWarning, stacklevel=3,
        )


def report(model: nn.Module) -> Report:
    """A table of the adapted layers: name, type, weight shape, rank, mode, trainable numbers, % of model.

    Args:
        model: any model; fully trainable parameters outside svdtune layers are listed too.

    Returns:
        A `Report`; ``print(report)`` shows the table, ``report.rows`` holds the data.

    Example:
        >>> print(svdtune.report(model))
    """
    return build_report(unwrap(model))


def set_scale(model: nn.Module, scale: float) -> nn.Module:
    """Set the strength s of every layer's deltas (1.0 = as trained, 0.0 = the base model).

    Args:
        model: a model passed through `apply`.
        scale: the new s: any finite number, NumPy scalar or one-element tensor (> 1 extrapolates).

    Returns:
        The same model.

    Raises:
        SvdtuneError: if the model has no svdtune layers or scale is not finite.

    Example:
        >>> svdtune.set_scale(model, 0.8)
    """
    layers = _require_adapted(unwrap(model), "scale")
    configs = [dataclasses.replace(layer._spectral.config, scale=scale) for _, layer in layers]
    for (_, layer), config in zip(layers, configs):
        layer._spectral.config = config
    return model


def singular_values(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The tuned singular values of each layer before and after its deltas.

    Returns:
        {layer name: (sigma, sigma_adapted)}, detached 1-D float tensors of length rank.

    Raises:
        SvdtuneError: if the model has no svdtune layers.
    """
    with torch.no_grad():
        return {
            name: (layer._factors().sigma.clone(), layer.spectrum().clone())
            for name, layer in _require_adapted(unwrap(model), "inspect")
        }


def merge(model: nn.Module) -> nn.Module:
    """Bake the deltas into plain layers of the original classes, in place.

    Every merged weight is computed (in float32 or better) and checked to be
    finite before any layer is changed. Parameters get back the ``requires_grad``
    they had before `apply`.

    Args:
        model: a model passed through `apply`.

    Returns:
        The same model, with no svdtune layers left: save it with ``torch.save`` or
        safetensors and load it into the original architecture without svdtune.

    Raises:
        SvdtuneError: if the model has no svdtune layers or a merged weight is not finite.

    Example:
        >>> svdtune.merge(model)
        >>> torch.save(model.state_dict(), "merged.pt")
    """
    wrapper, model = model, unwrap(model)
    layers = _require_adapted(model, "merge")
    with torch.no_grad():
        weights = {name: layer.merged_weight() for name, layer in layers}
    for name, weight in weights.items():
        check_finite_merge(name, weight)
    for name, layer in layers:
        unadapt(layer, weights[name])
    _restore_flags(model)
    return wrapper


def restore(model: nn.Module) -> nn.Module:
    """Undo `apply`: the original layer classes and their untouched weights, in place.

    The modules are the same objects as before `apply`; their weights are the same
    tensors, bit for bit; parameters get back the ``requires_grad`` they had. The
    deltas are dropped (save them first with `save_delta` if needed); parameters of
    ``trainable`` modules and buffers changed by training keep their new values.

    Returns:
        The same model.

    Raises:
        SvdtuneError: if the model has no svdtune layers.

    Example:
        >>> svdtune.restore(model)
    """
    wrapper, model = model, unwrap(model)
    for _, layer in _require_adapted(model, "restore"):
        unadapt(layer)
    _restore_flags(model)
    return wrapper


def _restore_flags(model: nn.Module) -> None:
    """Give back the requires_grad recorded by `apply`, wherever in the tree it was called."""
    for root in list(model.modules()):
        root.__dict__.pop(_BUFFERS, None)
        root.__dict__.pop(_TRAINABLE, None)
        flags = root.__dict__.pop(_FLAGS, None)
        for name, param in root.named_parameters() if flags is not None else ():
            param.requires_grad_(flags.get(name, param.requires_grad))
