"""Memory options of adapted layers: where the frozen base weight W lives, and whether W' is cached.

`set_memory` chooses, per model, two things each adapted layer otherwise does by default:

- ``offload_base``: a full-rank layer keeps its frozen W in CPU memory (pinned when CUDA is
  available) instead of on its device. Its training forward then never reads W (the factorized
  path, ((x Vh^T) * sigma') U^T, or W' = U diag(sigma') Vh for the kinds that build W'), and
  everything that needs W itself (the no-grad W', `merge`, ``layer.weight`` without autograd) copies
  it to the device for that use (`resident`, the one place that does). ``model.to(...)``, ``.cuda()``,
  ``.half()``... move and cast the factors and deltas as usual and leave W in CPU memory, cast to the
  target dtype (`kept_on_host`). A layer below full rank keeps W on its device: its low-rank forward
  computes W x on every step.
- ``cache_weights``: without autograd a layer reads W' from a cache, one weight-sized tensor per
  layer on its device, rebuilt when the deltas change (the default); with the cache off, each
  no-grad forward rebuilds W' (exactly: W + U diag(sigma' - sigma) Vh) and frees it after use.

The options live in the layer's state (`MemoryOptions`), so they survive ``copy.deepcopy`` and
pickling, and go away with `svdtune.restore` and `svdtune.merge`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdtune.errors import SvdtuneError
from svdtune.sharding import refuse_sharded


@dataclass(frozen=True)
class MemoryOptions:
    """An adapted layer's memory options (see `set_memory`).

    Attributes:
        offload: the base weights are kept in CPU memory, not on the layer's device.
        cache: the no-grad W' is cached on the layer's device until the deltas change.
    """

    offload: bool = False
    cache: bool = True


DEFAULT = MemoryOptions()

def set_memory(model: nn.Module, *, offload_base: bool | None = None, cache_weights: bool | None = None) -> nn.Module:
    """Choose where the adapted layers keep their frozen base weights, and whether they cache W'.

    With ``offload_base=True``, a full-rank layer (``apply(rank=None)``, or a rank of at least
    min(m, n)) holds only U, sigma, Vh and its deltas on its device: for a square layer about 2x W
    instead of 3x. Call it before or after ``model.to(device)``; either way W ends in CPU memory.

    Args:
        model: a model passed through `svdtune.apply` (or `svdtune.load_delta`); every adapted layer
            it holds now is set (layers adapted later get the defaults).
        offload_base: True: keep each full-rank layer's base weight W in CPU memory (pinned when CUDA
            is available; moved there now if it is on a device), so its training forward never reads
            W and whatever needs W (the no-grad W', `merge`, `svdtune.restore`) copies it to the device
            for that use. Layers below full rank keep W on their device (their low-rank forward
            computes W x), with a warning naming them. False: copy W back to the device of the
            layer's deltas. None (default): leave as it is.
        cache_weights: True (what `apply` sets): without autograd, W' is built once and cached on the
            layer's device (one weight-sized tensor per layer) until the deltas, weight or scale
            change. False: each no-grad forward (and each read of ``layer.weight``) rebuilds W' and
            frees it after use, which costs 2mnk multiply-adds per layer and call. None: leave as it is.

    Returns:
        The same model.

    Raises:
        SvdtuneError: the model has no svdtune layers; an option is not True, False or None;
            ``offload_base=True`` on a model with no full-rank layer, on a layer whose base
            weight is trainable, or on a model sharded by FSDP2. The model is unchanged when it is raised.

    Warns:
        UserWarning: with ``offload_base=True``, naming the layers below full rank that keep W on
            their device.

    Example:
        >>> svdtune.apply(model, targets=["fc1", "fc2"])        # rank=None: full rank
        >>> svdtune.set_memory(model, offload_base=True, cache_weights=False)
        >>> model.to("cuda")                                     # W stays in (pinned) CPU memory
    """
    from svdtune.walk import _require_adapted, unwrap  # (walk imports layers, which imports this module)

    for what, value in (("offload_base", offload_base), ("cache_weights", cache_weights)):
        if value is not None and not isinstance(value, bool):
            raise SvdtuneError(f"{what}={value!r:.40} must be True, False or None (leave the setting as it is).")
    if offload_base:  # FSDP2 places every parameter itself (its own CPUOffloadPolicy offloads shards)
        refuse_sharded(unwrap(model), "offload the base weights of", "use fully_shard(..., offload_policy="
                       "CPUOffloadPolicy()) to keep the shards in CPU memory.")
    layers = _require_adapted(unwrap(model), "set memory options for")
    if offload_base:
        _check_offloadable(layers)
    plan = []  # (layer, its new options, {parameter name: its new tensor}), all allocated before any layer changes
    for _, layer in layers:
        now = options(layer)
        offload = now.offload if offload_base is None else offload_base and _full_rank(layer)
        cache = now.cache if cache_weights is None else cache_weights
        target = torch.device("cpu") if offload else _device(layer)
        moves = {n: _placed(layer._parameters[n], target) for n in layer._params()} if offload != now.offload else {}
        plan.append((layer, MemoryOptions(offload, cache), moves))
    for layer, chosen, moves in plan:
        fresh = layer._stamps() == layer._spectral.stamps
        for name, tensor in moves.items():
            _set_values(layer, name, tensor)
        if fresh:  # the same weights, moved: nothing to decompose again
            layer._spectral.stamps = layer._stamps()
        layer._spectral.memory = chosen
        layer._clear_cache()
    return model


def _check_offloadable(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse trainable base weights and a model without a full-rank layer; warn about layers below full rank."""
    for name, layer in layers:
        trained = [p for p in layer._params() if layer._parameters[p].requires_grad and _full_rank(layer)]
        if trained:
            raise SvdtuneError(f"layer {name!r} trains its base weight {trained[0]!r}, which offload_base=True would "
                               "keep frozen in CPU memory; freeze it (requires_grad_(False)) or leave offload_base unset.")
    partial = [name for name, layer in layers if not _full_rank(layer)]
    if len(partial) == len(layers):
        raise SvdtuneError(f"offload_base=True found no full-rank layer ({len(layers)} layers, e.g. {partial[0]!r}, have "
                           "rank < min(m, n)): a low-rank layer computes W x every step, so W stays on its device; "
                           "adapt with rank=None to offload.")
    if partial:
        warnings.warn(f"offload_base=True leaves {len(partial)} of {len(layers)} adapted layers with their base weight on "
                      f"their device: they are below full rank, and their forward computes W x ({partial[:5]}"
                      f"{' ...' if len(partial) > 5 else ''}); svdtune.report(model).memory shows where each W is.",
                      UserWarning, stacklevel=3)


def _full_rank(layer: nn.Module) -> bool:
    return all(layer.spectral_factors(part).full_rank for part in layer.spectral_parts())


def _set_values(layer: nn.Module, name: str, tensor: Tensor) -> None:
    """Make ``tensor`` the values of the parameter ``name``: the same Parameter object where torch allows
    (CPU and CUDA tensors), else a new Parameter with the same ``requires_grad`` (as ``nn.Module.to`` does)."""
    param = layer._parameters[name]
    if torch._has_compatible_shallow_copy_type(param, tensor):
        with torch.no_grad():
            param.data = tensor
    else:
        layer._parameters[name] = nn.Parameter(tensor, requires_grad=param.requires_grad)


def _device(layer: nn.Module) -> torch.device:
    """Where the layer computes: the device of its deltas (and factors)."""
    return layer.spectral_delta(layer.spectral_parts()[0]).device


def _placed(param: Tensor, device: torch.device) -> Tensor:
    """``param``'s values on ``device`` (in pinned memory for the CPU when CUDA is available)."""
    tensor = param.detach().to(device)
    return _pinned(tensor) if device.type == "cpu" else tensor


def _pinned(tensor: Tensor) -> Tensor:
    """``tensor`` in page-locked memory when CUDA is available (fast, asynchronous copies to the GPU), else as is."""
    if torch.cuda.is_available() and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def options(layer: nn.Module) -> MemoryOptions:
    """The layer's options (the defaults for a layer unpickled from before they existed)."""
    return getattr(layer._spectral, "memory", DEFAULT)


def offloaded(layer: nn.Module) -> bool:
    """True if the layer keeps its base weights in CPU memory."""
    return options(layer).offload


def caches(layer: nn.Module) -> bool:
    """True if the layer caches its no-grad W'."""
    return options(layer).cache


def resident(layer: nn.Module, param: str) -> Tensor:
    """The base weight ``param`` where the layer computes: the parameter itself, or for an offloaded
    layer a new copy on the deltas' device, used once and freed (the caller may write into it).

    This is the one place an offloaded W is read for computing.
    """
    weight = layer._parameters[param]
    if not offloaded(layer):
        return weight
    return weight.detach().to(_device(layer), copy=True, non_blocking=weight.is_pinned())


def build_base(layer: nn.Module, param: str) -> Tensor | None:
    """What W' = W + U diag(shift) Vh is built on: `resident`, or None for an offloaded layer while
    autograd records its forward (W' is then U diag(sigma') Vh, from the factors alone: W is not read)."""
    if offloaded(layer) and layer._needs_graph():
        return None
    return resident(layer, param)


@contextlib.contextmanager
def kept_on_host(layer: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Around ``nn.Module._apply(fn)`` of an offloaded layer: its base weights are not given to ``fn``;
    afterwards each stays in CPU memory, cast to the dtype ``fn`` gives (``fn`` of an empty CPU
    tensor of its dtype tells). A CPU-to-CPU ``fn`` (``.float()``, ``.cpu()``) is applied as is."""
    names = layer._params() if offloaded(layer) else ()
    held = {name: layer._parameters[name] for name in names}
    for name in held:
        layer._parameters[name] = None  # nn.Module._apply skips None; the key keeps its place in the state dict
    try:
        yield
    finally:
        layer._parameters.update(held)
    with torch.no_grad():
        for param in held.values():
            probe = fn(torch.empty(0, dtype=param.dtype))
            tensor = fn(param) if probe.device.type == "cpu" else param.to(dtype=probe.dtype)
            tensor = _pinned(tensor)
            if tensor is not param:
                param.data = tensor  # CPU to CPU: always the same Parameter object


def follow_deltas(layer: nn.Module) -> None:
    """Put an offloaded layer's factors, just decomposed from its W in CPU memory, on its deltas' device."""
    if not offloaded(layer):
        return
    device = _device(layer)
    for part in layer.spectral_parts():
        factors = layer._held_factors(part)
        if factors.U.device != device:
            moved = {name: getattr(factors, name).detach().to(device) for name in ("U", "sigma", "Vh")}
            layer._set_factors(part, dataclasses.replace(factors, **moved))


def bring_back(layer: nn.Module, replaced: dict[str, Tensor]) -> None:
    """Before an offloaded layer is unadapted: copy its base weights that are not ``replaced`` back
    to the deltas' device (bit for bit; the same Parameter objects, see `_set_values`)."""
    if not offloaded(layer):
        return
    device = _device(layer)
    for name in layer._params():
        if name not in replaced:
            _set_values(layer, name, layer._parameters[name].detach().to(device))
