"""Spectral layers: the module class that applies the delta formula (`svdtune.formula`).

An adapted layer is the *same* module object with its class swapped for a
subclass of its original class (as ``torch.nn.utils.parametrize`` does), so:
- ``isinstance(layer, nn.Linear)`` stays true and references to it stay valid;
- the base parameters keep their keys (``weight``, ``bias``) and stay frozen,
  a base checkpoint loads as it is, and ``restore`` only swaps the class back;
- reading an adapted parameter (``layer.weight``; an nn.MultiheadAttention's
  ``in_proj_weight`` or ``q_proj_weight``...) returns the *adapted* weight
  W' = W + delta_weight in the parameter's own layout, so code that reads it
  directly (``F.multi_head_attention_forward``, the fused attention and
  ``nn.TransformerEncoderLayer`` paths, a subclass's own ``forward``) sees the
  deltas instead of silently ignoring them.

A layer holds one *unit* per matrix its kind decomposes (`svdtune.kinds`): one
for most kinds (part "", deltas ``svd_delta``), three for attention (parts
q_proj, k_proj, v_proj, deltas ``svd_delta_q_proj``...), each with its own SVD
of its own (m, n) matrix and its own spectrum.

The factors U, sigma, Vh of each unit are frozen parameters of the layer
(``svd_U``, ``svd_sigma``, ``svd_Vh``; ``svd_U_q_proj``... for a part), hidden
from the state dict (a checkpoint holds the base weights and deltas only; see
`svdtune.checkpoint_hooks`):
as parameters they move with ``.to``/``.cuda``/``.half`` (sigma stays float32,
float64 for float64 weights), DistributedDataParallel broadcasts them once and
never again, and FSDP2's ``fully_shard`` shards them like any parameter, so each
rank holds its share (see `svdtune.sharding`). Every read goes through
`SpectralLayer._factors`, which takes the tensors registered now (FSDP2 swaps in
gathered ones for a forward) and decides which factors go with the weights held
now (`svdtune.tracking`).

Where the base weights live and whether the no-grad W' is cached are the layer's
memory options (`svdtune.memory`, hooks marked ``memory.``): an offloaded W stays
in CPU memory through ``_apply`` and is copied to the device per use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from svdtune import kinds, memory
from svdtune.config import SpectralConfig
from svdtune.checkpoint_hooks import CheckpointHooks
from svdtune.tracking import Stamp, Tracking, in_func_transform
from svdtune.decompose import Decomposition, svd_dtype
from svdtune.randomized import RandomizedSVD
from svdtune.formula import delta_weight, merged_matrix, spectrum_shift

DELTA = "svd_delta"  # parameter name of the trainable deltas: state-dict key "<layer>.svd_delta"
FACTORS = ("U", "sigma", "Vh")  # the frozen factor parameters "svd_U", "svd_sigma", "svd_Vh" (+ "_<part>")


@dataclass(eq=False)
class Unit:
    """One decomposed matrix of an adapted layer, with its own spectrum. Its factors are parameters
    of the layer (`factor_name`); the unit holds what describes them."""

    part: kinds.Part
    full_rank: bool
    next_sigma: float | None = None
    svd: RandomizedSVD | None = None

    def describe(self, factors: Decomposition) -> None:
        self.full_rank, self.next_sigma, self.svd = factors.full_rank, factors.next_sigma, factors.svd


@dataclass(eq=False)
class SpectralState:
    """Everything an adapted layer holds besides its parameters."""

    config: SpectralConfig
    kind: kinds.LayerKind
    original_class: type[nn.Module]
    units: dict[str, Unit]  # part name ("" for a layer's only matrix) -> Unit, in part order
    params: tuple[str, ...]  # the names of the parameters the units are in, in part order
    stamps: tuple[Stamp, ...]  # of the layer's own base weights, then factors, when they were last made to agree
    cache_dir: str | None = None  # where decompositions are cached on disk (see svdtune.cache)
    # parameter name -> (key, version of W' when built, W', copies of inference-tensor deltas): `SpectralLayer._cached_weight`
    cached: dict[str, tuple[tuple, int, Tensor, list]] = field(default_factory=dict, repr=False)
    live: dict[str, Tensor] = field(default_factory=dict, repr=False)  # W' built once for one training forward
    memory: memory.MemoryOptions = field(default_factory=memory.MemoryOptions)  # offloaded W, cached W' (set_memory)
    loading: bool = False  # inside `SpectralLayer._factors_hidden`: reading a weight gives the raw parameter
    checked: tuple[Stamp, ...] = ()  # the last swapped-in weights and factors that passed the probe (svdtune.tracking)
    foreign: list = field(default_factory=list)  # `tracking.Foreign`: SVDs of swapped-in weights, newest first


class SpectralLayer(Tracking, CheckpointHooks):
    """Mixin placed first in the MRO of an adapted layer's class. Not built directly:
    `adapt` swaps a supported layer's class to ``Spectral<Class>``.

    A layer has one unit per part of its kind (`svdtune.kinds`): one for most kinds, part "";
    q_proj, k_proj and v_proj for nn.MultiheadAttention. Methods take the part, default "".
    """

    _spectral: SpectralState

    @property
    def base_weight(self) -> Tensor:
        """The frozen pretrained weight W, exactly as it was loaded (for attention: the first part's parameter)."""
        return self._parameters[self._unit("").part.param]

    @property
    def spectral_config(self) -> SpectralConfig:
        return self._spectral.config

    def spectral_parts(self) -> tuple[str, ...]:
        """The part names of this layer's units: ("",) for most kinds, ("q_proj", "k_proj", "v_proj") for attention."""
        return tuple(self._spectral.units)

    def spectral_delta(self, part: str = "") -> nn.Parameter:
        """The trainable deltas (k,) of a unit."""
        return self._parameters[delta_name(part)]

    def base_matrix(self, part: str = "") -> Tensor:
        """The unit's base matrix (m, n), the one decomposed: a view of its parameter (see `kinds.matrix`)."""
        unit = self._unit(part)
        return kinds.matrix(self._spectral.kind, self._parameters[unit.part.param], unit.part)

    def _matrix_shape(self, part: str = "") -> tuple[int, int]:
        """The (m, n) of a unit's `base_matrix`, from its parameter's shape alone: no data is read (under FSDP2,
        slicing a sharded weight is a collective, which a call on one rank, e.g. ``print(model)``, would hang on)."""
        unit = self._unit(part)
        empty = torch.empty(self._parameters[unit.part.param].shape, device="meta")
        return tuple(kinds.matrix(self._spectral.kind, empty, unit.part).shape)

    def spectral_factors(self, part: str = "") -> Decomposition:
        """A unit's decomposition (U (m, k), sigma (k,), Vh (k, n)) of its `base_matrix`, current with the base weight."""
        return self._factors(part)

    def spectral_shift(self, part: str = "") -> Tensor:
        """sigma' - sigma (k,) of a unit at the current deltas and scale: W' - W = U diag(shift) Vh on its matrix."""
        return self._shift(self._factors(part), part)

    def spectrum(self, part: str = "") -> Tensor:
        """The adapted singular values sigma' (k,), in float32 (float64 for float64 weights)."""
        factors = self._factors(part)
        return factors.sigma + self._shift(factors, part)

    def adapted_weight(self, param: str | None = None) -> Tensor:
        """W' = W + U diag(sigma' - sigma) Vh of a parameter (default: `base_weight`'s), recomputed now
        (differentiable in the deltas), in the parameter's layout. With the base weight offloaded
        (`svdtune.set_memory`) and autograd recording: U diag(sigma') Vh, which does not read W."""
        param = param or self._unit("").part.param
        base, kind = memory.build_base(self, param), self._spectral.kind  # base: W, a copy of it, or None
        matrices = []
        for part, unit in self._units_of(param):
            factors = self._factors(part)
            shift = self._shift(factors, part)
            if base is None:  # full rank: W' from the factors alone
                matrices.append(delta_weight(factors.U, factors.Vh, factors.sigma + shift))
                continue
            change, matrix = delta_weight(factors.U, factors.Vh, shift), kinds.matrix(kind, base, unit.part)
            matrices.append(matrix + change if base is self._parameters[param] else matrix.add_(change))
        return kinds.layout(kind, tuple(self._parameters[param].shape), matrices)

    def merged_weight(self, param: str | None = None) -> Tensor:
        """W' of a parameter in its dtype and layout, accumulated in float32 (float64 for float64 weights)."""
        param = param or self._unit("").part.param
        base, kind = memory.resident(self, param), self._spectral.kind
        matrices = []
        for part, unit in self._units_of(param):
            factors = self._factors(part)
            shift = self._shift(factors, part)
            matrices.append(merged_matrix(kinds.matrix(kind, base, unit.part), factors.U, factors.Vh, shift))
        return kinds.layout(kind, tuple(base.shape), matrices)

    def merged_params(self) -> dict[str, Tensor]:
        """{parameter name: merged W'} for every parameter this layer adapts."""
        return {param: self.merged_weight(param) for param in self._params()}

    def _unit(self, part: str) -> Unit:
        units = self._spectral.units
        return units[part] if part or part in units else next(iter(units.values()))

    def _units_of(self, param: str) -> list[tuple[str, Unit]]:
        return [(part, unit) for part, unit in self._spectral.units.items() if unit.part.param == param]

    def _params(self) -> tuple[str, ...]:
        return self._spectral.params

    def _shift(self, factors: Decomposition, part: str = "") -> Tensor:
        config = self._spectral.config
        return spectrum_shift(factors.sigma, self._parameters[delta_name(self._unit(part).part.name)],
                              config.scale, config.mode)

    def _needs_graph(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        deltas = (self._parameters[delta_name(part)] for part in self._spectral.units)
        return any(d.requires_grad for d in deltas) or any(self._parameters[p].requires_grad for p in self._params())

    def _held_factors(self, part: str = "") -> Decomposition:
        """The factor parameters registered now (no staleness check), never differentiable: frozen even
        when something set their ``requires_grad`` (``model.requires_grad_(True)``). Detached aliases:
        a graph still waiting for its backward keeps the values of its forward when a new SVD later
        writes into the parameters (``_set_factors``)."""
        name = self._unit(part).part.name
        return self._decomposition(name, *(self._parameters[factor_name(f, name)] for f in FACTORS))

    def _decomposition(self, part: str, U: Tensor, sigma: Tensor, Vh: Tensor) -> Decomposition:
        """The unit's `Decomposition` of these factor tensors, detached, with what describes them."""
        unit = self._spectral.units[part]
        return Decomposition(U.detach(), sigma.detach(), Vh.detach(), unit.full_rank, unit.next_sigma, unit.svd)

    def _set_factors(self, part: str, factors: Decomposition) -> None:
        """Register a unit's factors as frozen parameters; a factor already registered keeps its Parameter
        object and gets the new values."""
        unit = self._unit(part)
        unit.describe(factors)
        for f in FACTORS:
            name, tensor = factor_name(f, unit.part.name), getattr(factors, f).detach()
            held = self._parameters.get(name)
            if isinstance(held, nn.Parameter) and torch._has_compatible_shallow_copy_type(held, tensor) \
                    and not held.is_inference():
                held.data = tensor  # the same Parameter object: an optimizer over model.parameters() keeps it
            else:
                self._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def _factor_names(self) -> list[str]:
        return [factor_name(f, part) for part in self._spectral.units for f in FACTORS]

    def _sharded(self) -> bool:
        """Managed by FSDP2's ``fully_shard`` (which marks every module it manages)."""
        return bool(self.__dict__.get("_is_fsdp_managed_module", False))

    def redecompose(self) -> None:
        """Decompose the current base weights again (the deltas are kept).

        Raises:
            SvdtuneError: the layer is sharded by FSDP2 (its factors are FSDP's parameters now).
        """
        self._decompose_own(tuple(self._spectral.units))

    def _adapted_param(self, param: str) -> Tensor:
        """What reading the parameter ``param`` gives: W' (built with autograd when training)."""
        live = self._spectral.live.get(param)
        if live is not None:
            return live
        if self._needs_graph():
            return self.adapted_weight(param)
        return self._cached_weight(param)

    def _cached_weight(self, param: str) -> Tensor:
        """W' without autograd, rebuilt only when the deltas, weight or scale change."""
        if torch.compiler.is_compiling() or self._sharded() or not memory.caches(self) or in_func_transform():
            return self.adapted_weight(param)  # built for this use and freed after (sharded: a W' per layer per rank)
        base, state = self._parameters[param], self._spectral
        deltas = [self._parameters[delta_name(part)] for part, _ in self._units_of(param)]
        # the same tensors (a new one can take a freed one's address), versions and memory, and the same config
        key = (*((Stamp(d), d.data_ptr()) for d in deltas), Stamp(base), base.data_ptr(), base.dtype, base.device,
               state.config)
        entry = state.cached.get(param)
        if entry is None or entry[0] != key or entry[2]._version != entry[1] or not _same_values(entry[3], deltas):
            # (re)build, also when someone wrote into the cached tensor; never as an inference
            # tensor, which has no version counter and could not be used outside inference_mode
            with torch.inference_mode(False), torch.no_grad():
                weight = self.adapted_weight(param)
            kept = [d.clone() if d.is_inference() else None for d in deltas]  # no version counter: keep the values
            entry = state.cached[param] = (key, weight._version, weight, kept)
        return entry[2]

    def _clear_cache(self) -> None:
        self._spectral.cached.clear()

    def _apply(self, fn, recurse=True):
        self._adopt()  # factors of the weights held now, as the layer's own, before they move
        before = [self._parameters[param].dtype for param in self._spectral.params]
        sigmas = {part: self._parameters[factor_name("sigma", part)].data for part in self._spectral.units}
        with memory.kept_on_host(self, fn):  # an offloaded W stays in CPU memory, cast to fn's dtype
            super()._apply(fn, recurse)
        from_meta = any(sigma.is_meta for sigma in sigmas.values())
        for part, sigma in sigmas.items():  # sigma from its own precision, never through fn's half precision
            U = self._parameters[factor_name("U", part)]
            like = {"dtype": svd_dtype(U.dtype), "device": U.device}  # from meta (to_empty): no values to keep
            sigma = torch.empty_like(sigma, **like) if sigma.is_meta else sigma.to(**like)
            self._parameters[factor_name("sigma", part)].data = sigma
        # out of meta (to_empty) nothing has values: no stamps, so the next load or forward decomposes
        self._spectral.stamps = () if from_meta else self._stamps()
        self._clear_cache()
        after = [self._parameters[param].dtype for param in self._spectral.params]
        finer = any(new.is_floating_point and old.is_floating_point and torch.finfo(new).eps < torch.finfo(old).eps
                    for old, new in zip(before, after))
        if finer and not self._sharded() and not from_meta:  # cast to a finer dtype (bf16 -> f32, f32 -> f64):
            self.redecompose()  # factors of the coarser weight would be coarser than it
        return self

    def extra_repr(self) -> str:
        config, units = self._spectral.config, self._spectral.units
        ranks = [f"{part + '=' if part else ''}{self._held_factors(part).sigma.numel()}/"
                 f"{min(self._matrix_shape(part))}" for part in units]
        rank = ranks[0] if len(ranks) == 1 else f"({', '.join(ranks)})"
        text = super().extra_repr()
        return f"{text + ', ' if text else ''}svd={config.mode}, rank={rank}, scale={config.scale:g}"

    def _plain_forward(self, *args, **kwargs):
        """The original class's forward (reading the adapted weight)."""
        return self._spectral.original_class.forward(self, *args, **kwargs)


def _same_values(kept: list[Tensor | None], deltas: list[Tensor]) -> bool:
    """Inference-tensor deltas (no version counter) still hold the values the cached W' was built from."""
    return all(k is None or torch.equal(k, d) for k, d in zip(kept, deltas))


def delta_name(part: str) -> str:
    """The parameter name of a unit's deltas: "svd_delta", or "svd_delta_<part>" (e.g. "svd_delta_q_proj")."""
    return f"{DELTA}_{part}" if part else DELTA


def factor_name(factor: str, part: str) -> str:
    """The parameter name of a unit's factor ("U", "sigma", "Vh"): "svd_U", or "svd_U_<part>"."""
    return f"svd_{factor}_{part}" if part else f"svd_{factor}"


def added_names(parts: tuple[str, ...] | list[str]) -> list[str]:
    """Every parameter name an adapted layer with these parts gains: deltas, then factors."""
    return [delta_name(p) for p in parts] + [factor_name(f, p) for p in parts for f in FACTORS]
