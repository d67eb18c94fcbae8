"""The class swap: a supported layer becomes ``Spectral<Class>`` in place (`adapt`) and back (`unadapt`).

``Spectral<Class>`` is built once per class, with `SpectralLayer` first in its MRO, a property per
adapted parameter (reading ``layer.weight`` gives W'), and the training forward of its kind
(`svdtune.forwards`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from svdtune import forwards, kinds, memory
from svdtune.config import SpectralConfig
from svdtune.decompose import Decomposition
from svdtune.layers import SpectralLayer, SpectralState, Unit, added_names, delta_name
from svdtune.sharding import is_dtensor

_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _weight_property(param: str) -> property:
    def read(self: SpectralLayer) -> Tensor | None:
        raw = self._parameters[param]
        if is_dtensor(raw) or self._spectral.loading:  # an FSDP2 shard, outside a forward: FSDP2 reads it to
            return raw  # manage it (svdtune.sharding); or loading, with the factors hidden
        if any(unit.part.param == param for unit in self._spectral.units.values()):
            return self._adapted_param(param)
        return raw  # e.g. in_proj_weight (None) of attention with separate q/k/v weights

    return property(read, doc=f"The adapted {param} W' (same shape and dtype as the base weight).")


def spectral_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The adapted class for a supported layer class (built once per class)."""
    if cls not in _CLASSES:
        kind = kinds.kind_of(cls)
        body = {"__module__": __name__, "__qualname__": f"Spectral{cls.__name__}"}
        body.update({param: _weight_property(param) for param in kind.params()})
        forward = forwards.training_forward(kind, cls)
        if forward is not None:  # else the class's own forward reads the adapted weight
            body["forward"] = forward
        _CLASSES[cls] = type(f"Spectral{cls.__name__}", (SpectralLayer, cls), body)
    return _CLASSES[cls]


def new_spectral(original_class: type[nn.Module]) -> nn.Module:
    """An empty instance of ``Spectral<original_class>``, for unpickling (see ``SpectralLayer.__reduce_ex__``)."""
    cls = spectral_class(original_class)
    return cls.__new__(cls)


def adapt(module: nn.Module, factors: dict[str, Decomposition] | Decomposition, config: SpectralConfig,
          cache_dir: str | None = None) -> None:
    """Turn a supported layer into a spectral layer in place, with zero deltas.

    ``factors``: {part name: decomposition of that part's matrix}, or one decomposition for a
    layer of one part.
    """
    kind = kinds.kind_of(module)
    parts = kind.parts(module)
    if isinstance(factors, Decomposition):
        factors = {parts[0].name: factors}
    units = {part.name: Unit(part, factors[part.name].full_rank) for part in parts}
    params = {part.param: module._parameters[part.param] for part in parts}
    state = SpectralState(config, kind, type(module), units, tuple(params), (), cache_dir)
    module.__class__ = spectral_class(type(module))
    module.__dict__["_spectral"] = state
    for part in parts:  # deltas first, then factors: the factors stay the last parameters
        base = params[part.param]
        delta = torch.zeros(factors[part.name].sigma.numel(), dtype=base.dtype, device=base.device)
        module.register_parameter(delta_name(part.name), nn.Parameter(delta))
    for part in parts:
        module._set_factors(part.name, factors[part.name])
    state.stamps = module._stamps()


def unadapt(module: SpectralLayer, weights: dict[str, Tensor] | Tensor | None = None) -> nn.Module:
    """Give a spectral layer its original class back; with ``weights`` ({parameter: tensor}, or one
    tensor for `base_weight`), as its new base weights."""
    state = module._spectral
    if isinstance(weights, Tensor):
        weights = {module._unit("").part.param: weights}
    memory.bring_back(module, weights or {})  # restore: an offloaded W is copied back to the deltas' device
    for name in added_names(list(state.units)):
        del module._parameters[name]
    del module.__dict__["_spectral"]
    module.__class__ = state.original_class
    for param, weight in (weights or {}).items():
        old = module._parameters[param]
        module._parameters[param] = nn.Parameter(weight, requires_grad=old.requires_grad)
    return module
