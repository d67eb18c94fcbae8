"""Spectral layers: the one delta formula and the module class that applies it.

An adapted layer is the *same* module object with its class swapped for a
subclass of its original class (as ``torch.nn.utils.parametrize`` does), so:
- ``isinstance(layer, nn.Linear)`` stays true and references to it stay valid;
- the base parameters keep their keys (``weight``, ``bias``) and stay frozen,
  a base checkpoint loads as it is, and ``restore`` only swaps the class back;
- ``layer.weight`` returns the *adapted* weight W' = W + delta_weight, so code
  that reads ``.weight`` directly (``nn.MultiheadAttention`` reading
  ``out_proj.weight``, the fused ``nn.TransformerEncoderLayer`` path, a
  subclass's own ``forward``) sees the deltas instead of silently ignoring them.

The factors U, sigma, Vh are plain tensors moved by ``_apply`` (``.to``,
``.cuda``, ``.half``...), not buffers: they never enter the state dict and
DistributedDataParallel never re-broadcasts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdtune import kernels
from svdtune.config import SpectralConfig
from svdtune.cache import decompose_cached
from svdtune.decompose import Decomposition, svd_dtype, weight_matrix
from svdtune.errors import SvdtuneError

DELTA = "svd_delta"  # parameter name of the trainable deltas: state-dict key "<layer>.svd_delta"


def spectrum_shift(sigma: Tensor, delta: Tensor, scale: float, mode: str) -> Tensor:
    """sigma' - sigma for the adapted spectrum sigma', in sigma's dtype (float32/64).

    "shift": relu(sigma + s*delta) - sigma == max(s*delta, -sigma), written so that
    no cancellation occurs; "scale": sigma*(1 + s*delta) - sigma == sigma*s*delta.
    Both are exactly zero when delta is zero (sigma >= 0).

    At the boundary s*delta == -sigma (e.g. delta = 0 on a zero singular value) the shift
    takes relu's subgradient from the side that lets sigma' grow: the whole gradient passes
    to delta (``torch.maximum`` would split it in half on the tie). A NaN step stays NaN.
    """
    step = delta.to(sigma.dtype) * scale
    if mode == "shift":
        return torch.where(step < -sigma, -sigma, step)
    return sigma * step


def delta_weight(U: Tensor, Vh: Tensor, shift: Tensor) -> Tensor:
    """The weight change as a matrix: U diag(shift) Vh, (m, k) (k,) (k, n) -> (m, n)."""
    return kernels.linear(U * shift.to(U.dtype), Vh.t())  # (U diag(shift)) @ Vh


def merged_weight(base: Tensor, U: Tensor, Vh: Tensor, shift: Tensor) -> Tensor:
    """W' = W + U diag(shift) Vh in the base weight's shape and dtype, accumulated in shift's dtype."""
    work = shift.dtype  # float32, or float64 for float64 weights: never half precision
    change = delta_weight(U.to(work), Vh.to(work), shift)
    return (weight_matrix(base).to(work) + change).reshape(base.shape).to(base.dtype)


def check_finite_merge(name: str, weight: Tensor) -> None:
    """Refuse a merged weight with NaN or infinity (before anything is written or swapped)."""
    if not bool(torch.isfinite(weight).all()):
        raise SvdtuneError(f"merging layer {name!r} gives non-finite weights; check its deltas and scale.")


@dataclass(eq=False)
class SpectralState:
    """Everything an adapted layer holds besides its parameters."""

    config: SpectralConfig
    factors: Decomposition
    original_class: type[nn.Module]
    weight_stamp: tuple[int, int]  # (id, _version) of the base weight when it was decomposed
    cache_dir: str | None = None  # where decompositions are cached on disk (see svdtune.cache)
    cache_key: tuple | None = None
    cached_version: int = 0  # cached_weight._version when it was built
    cached_weight: Tensor | None = field(default=None, repr=False)


class SpectralLayer(nn.Module):
    """Mixin placed first in the MRO of an adapted layer's class. Not built directly:
    `adapt` swaps a supported layer's class to ``Spectral<Class>``."""

    _spectral: SpectralState

    @property
    def weight(self) -> Tensor:
        """The adapted weight W' (same shape and dtype as the base weight)."""
        if self._needs_graph():
            return self.adapted_weight()
        return self._cached_weight()

    @property
    def base_weight(self) -> Tensor:
        """The frozen pretrained weight W, exactly as it was loaded."""
        return self._parameters["weight"]

    @property
    def spectral_config(self) -> SpectralConfig:
        return self._spectral.config

    def spectrum(self) -> Tensor:
        """The adapted singular values sigma' (k,), in float32 (float64 for float64 weights)."""
        factors = self._factors()
        return factors.sigma + self._shift(factors)

    def adapted_weight(self) -> Tensor:
        """W' = W + U diag(sigma' - sigma) Vh, recomputed now (differentiable in the deltas)."""
        factors, base = self._factors(), self.base_weight
        return base + delta_weight(factors.U, factors.Vh, self._shift(factors)).reshape(base.shape)

    def merged_weight(self) -> Tensor:
        """W' in the base weight's dtype, accumulated in float32 (float64 for float64 weights)."""
        factors = self._factors()
        return merged_weight(self.base_weight, factors.U, factors.Vh, self._shift(factors))

    def _shift(self, factors: Decomposition) -> Tensor:
        config = self._spectral.config
        return spectrum_shift(factors.sigma, self._parameters[DELTA], config.scale, config.mode)

    def _needs_graph(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return self._parameters[DELTA].requires_grad or self.base_weight.requires_grad

    def _factors(self) -> Decomposition:
        """The decomposition, recomputed first if the base weight was edited in place
        (e.g. DistributedDataParallel broadcasting rank 0's weights)."""
        state = self._spectral
        if not torch.compiler.is_compiling() and self._weight_stamp() != state.weight_stamp:
            self.redecompose()
        return state.factors

    def _weight_stamp(self) -> tuple[int, int]:
        """Changes when the base weight is replaced or edited in place (not through ``.data``)."""
        base = self.base_weight
        return id(base), base._version

    def redecompose(self) -> None:
        """Decompose the current base weight again (the deltas are kept)."""
        state, base = self._spectral, self.base_weight
        state.factors = decompose_cached(base, state.config.rank, state.cache_dir, state.factors.svd)  # same method
        state.weight_stamp = self._weight_stamp()
        self._clear_cache()

    def _cached_weight(self) -> Tensor:
        """W' without autograd, rebuilt only when the deltas, weight or scale change."""
        if torch.compiler.is_compiling():
            return self.adapted_weight()
        delta, base, state = self._parameters[DELTA], self.base_weight, self._spectral
        key = (delta._version, delta.data_ptr(), base._version, base.data_ptr(), base.dtype, base.device, state.config)
        cached = state.cached_weight
        if state.cache_key != key or cached is None or cached._version != state.cached_version:
            # (re)build, also when someone wrote into the cached tensor; never as an inference
            # tensor, which has no version counter and could not be used outside inference_mode
            with torch.inference_mode(False), torch.no_grad():
                state.cached_weight = cached = self.adapted_weight()
            state.cache_key, state.cached_version = key, cached._version
        return cached

    def _clear_cache(self) -> None:
        self._spectral.cache_key = None
        self._spectral.cached_weight = None

    def _apply(self, fn, recurse=True):
        stale = self._weight_stamp() != self._spectral.weight_stamp
        super()._apply(fn, recurse)
        factors = self._spectral.factors
        factors.U, factors.Vh = fn(factors.U), fn(factors.Vh)
        factors.sigma = factors.sigma.to(factors.U.device, svd_dtype(factors.U.dtype))
        self._spectral.weight_stamp = self._weight_stamp()
        self._clear_cache()
        if stale:  # edited before the move: the factors are of the old weight
            self.redecompose()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        incoming, base, state = state_dict.get(prefix + "weight"), self.base_weight, self._spectral
        factors = None
        if incoming is not None and incoming.shape == base.shape and not torch.equal(incoming.to(base), base):
            try:  # decompose before loading, so a weight without an SVD is not half-loaded
                factors = decompose_cached(incoming.to(base), state.config.rank, state.cache_dir, state.factors.svd)
            except SvdtuneError as error:
                error_msgs.append(f"svdtune layer {prefix[:-1]!r}: new base weight refused: {error}")
                return
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)
        self._clear_cache()
        if len(error_msgs) == errors_before:  # else leave the stamp: the next forward re-decomposes if needed
            state.factors = factors or state.factors
            state.weight_stamp = self._weight_stamp()

    def __getstate__(self):
        self._factors()  # a copy or pickle gets factors of the weight it holds
        return super().__getstate__()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._spectral.weight_stamp = self._weight_stamp()  # the copied weight is a new tensor

    def __reduce_ex__(self, protocol):
        # The Spectral<Class> type is built at run time and cannot be pickled by name:
        # pickle the original class and rebuild the adapted one on load.
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_new_spectral, (self._spectral.original_class,), *rest)

    def extra_repr(self) -> str:
        config, factors = self._spectral.config, self._spectral.factors
        rank = f"{factors.sigma.numel()}/{min(weight_matrix(self.base_weight).shape)}"
        return f"{super().extra_repr()}, svd={config.mode}, rank={rank}, scale={config.scale:g}"

    def _linear_forward(self, input: Tensor) -> Tensor:
        """nn.Linear forward with the cheapest exact path for this call (see `choose_path`)."""
        if not self._needs_graph() or self.base_weight.requires_grad:
            return F.linear(input, self.weight, self.bias)
        factors, base = self._factors(), self.base_weight
        m, n = base.shape
        rows = input.numel() // max(n, 1)
        path = choose_path(rows, m, n, factors.sigma.numel(), factors.full_rank, input.requires_grad)
        if path == "rebuild":
            return kernels.linear(input, self.adapted_weight(), self.bias)
        shift = self._shift(factors)
        projected = kernels.linear(input, factors.Vh)  # (..., n) -> (..., k)
        if path == "factorized":  # W == U diag(sigma) Vh: one path through the factors
            return kernels.linear(projected * (factors.sigma + shift).to(projected.dtype), factors.U, self.bias)
        # low rank: W x + U_k diag(shift) Vh_k x; the rest of W is untouched
        correction = kernels.linear(projected * shift.to(projected.dtype), factors.U)
        return kernels.linear(input, base, self.bias) + correction


def choose_path(rows: int, m: int, n: int, k: int, full_rank: bool, input_grad: bool) -> str:
    """Pick the training forward of a Linear (m, n) with k deltas by multiply-add count.

    "rebuild": W' = W + U diag(shift) Vh, then a dense layer: builds and projects the
    gradient back onto the spectrum (2mnk) plus forward, dW' and maybe dx (rows*m*n each).
    "factorized" (full rank only): ((x Vh^T) * sigma') U^T, two thin matmuls each way.
    "lowrank": W x plus the k-dimensional correction, with W frozen.
    """
    thin = rows * k * (m + n) * 2 - (0 if input_grad else rows * k * n)
    if full_rank:
        costs = {"factorized": thin}
    else:
        costs = {"lowrank": rows * m * n * (2 if input_grad else 1) + thin}
    costs["rebuild"] = 2 * m * n * k + rows * m * n * (3 if input_grad else 2)
    return min(costs, key=costs.get)  # a tie goes to the thin path (measured slightly faster)


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def spectral_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The adapted class for a supported layer class (built once per class)."""
    if cls not in _CLASSES:
        body = {"__module__": __name__, "__qualname__": f"Spectral{cls.__name__}"}
        if issubclass(cls, nn.Linear) and cls.forward is nn.Linear.forward:
            body["forward"] = SpectralLayer._linear_forward  # a custom forward reads .weight instead
        _CLASSES[cls] = type(f"Spectral{cls.__name__}", (SpectralLayer, cls), body)
    return _CLASSES[cls]


def _new_spectral(original_class: type[nn.Module]) -> nn.Module:
    cls = spectral_class(original_class)
    return cls.__new__(cls)


def adapt(module: nn.Module, factors: Decomposition, config: SpectralConfig, cache_dir: str | None = None) -> None:
    """Turn a supported layer into a spectral layer in place, with zero deltas."""
    base = module._parameters["weight"]
    state = SpectralState(config, factors, type(module), (id(base), base._version), cache_dir)
    delta = torch.zeros(factors.sigma.numel(), dtype=base.dtype, device=base.device)
    module.__class__ = spectral_class(type(module))
    module.__dict__["_spectral"] = state
    module.register_parameter(DELTA, nn.Parameter(delta))


def unadapt(module: SpectralLayer, weight: Tensor | None = None) -> nn.Module:
    """Give a spectral layer its original class back; with ``weight``, as its new base weight."""
    state = module._spectral
    del module._parameters[DELTA]
    del module.__dict__["_spectral"]
    module.__class__ = state.original_class
    if weight is not None:
        old = module._parameters["weight"]
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=old.requires_grad)
    return module
