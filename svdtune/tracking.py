"""Which factors go with the base weights a layer holds now: the staleness rules of an adapted layer.

A layer's own factors (its frozen parameters ``svd_U``, ``svd_sigma``, ``svd_Vh``) belong to its own
base weights, the tensors it held when svdtune last decomposed them (`Stamp`s record which tensors, at
which version). Every read of the factors (`Tracking._factors`) compares what the layer holds now:

- its own weights and factors, unchanged: the factors, at no cost;
- its own weights, edited in place (a DDP broadcast writes weights and factors together; a user edit
  writes the weight alone), or its factors written: kept if the factors were written and pass the
  probe (U diag(sigma) Vh x against W x, `svdtune.cache.check_factors`), else the parts that fail are
  decomposed again into the layer's own factor parameters (factors swapped in alone that fail are
  ignored: the layer's own serve);
- other weight tensors swapped in (``torch.func.functional_call``; FSDP2's gathered copies): never
  written into the layer's own factors. The factors held with them serve where they pass the probe;
  the parts that fail get an SVD of the swapped-in weight, kept until one of its tensors is freed (for
  the `FOREIGN_KEPT` most recent such weights);
- a move (``.to``), a copy, a pickle or a ``load_state_dict`` first makes the factors of the weights
  held now the layer's own (`Tracking._adopt`);
- inside ``torch.func`` transforms nothing is probed or stamped (their tensors are wrapped and gone
  after the call): a new weight is trusted with new factors, and refused with the layer's own factors
  or views of them (``detach()``), since it would need an SVD.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from svdtune import memory
from svdtune.cache import check_factors, decompose_cached
from svdtune.decompose import Decomposition
from svdtune.errors import SvdtuneError


def version_of(tensor: Tensor) -> int:
    """``tensor._version``; 0 for an inference tensor (of a model built under ``torch.inference_mode()``),
    which has no version counter and can be changed in place only inside inference mode."""
    return 0 if tensor.is_inference() else tensor._version


class Stamp:
    """Which tensor a layer held, and its version: equal to a later stamp only if that is the same tensor,
    still alive, at the same version. (Not its ``id``: a tensor that died, e.g. a copy passed to
    ``functional_call``, can leave its id, and its memory, to a new one.)"""

    __slots__ = ("ref", "version")

    def __init__(self, tensor: Tensor | None, version: int = 0) -> None:
        self.ref = weakref.ref(tensor) if tensor is not None else _dead
        self.version = version_of(tensor) if tensor is not None else version

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stamp) and self.same_tensor(other) and self.version == other.version

    def same_tensor(self, other: Stamp) -> bool:
        held = self.ref()
        return held is not None and held is other.ref()

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):  # a copy or pickle holds other tensors: its stamps match nothing
        return Stamp, (None, self.version)


def _dead() -> None:
    return None


def in_func_transform() -> bool:
    """Inside ``torch.func.grad``/``vmap``/``jvp``... (their tensors are wrapped; values cannot steer Python)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


FOREIGN_KEPT = 4  # SVDs of swapped-in weights a layer keeps, the most recent first


@dataclass(eq=False)
class Foreign:
    """The SVD of a swapped-in weight: its stamps, its factors per part, and the finalizers that drop it
    when one of its tensors is freed."""

    stamps: tuple[Stamp, ...]
    factors: dict[str, Decomposition]
    finalizers: list = field(default_factory=list)

    def release(self) -> None:
        for finalizer in self.finalizers:
            finalizer.detach()


class Tracking(nn.Module):
    """The factor reads of `svdtune.layers.SpectralLayer` (its base class): `_factors` and the rules above."""

    def _factors(self, part: str = "") -> Decomposition:
        """A unit's decomposition for the base weights held now."""
        if not torch.compiler.is_compiling():
            state, stamps = self._spectral, self._stamps()
            if stamps != state.stamps and stamps != state.checked:
                factors = self._check_current(stamps)
                if factors is not None:
                    return factors[self._unit(part).part.name]
        return self._held_factors(part)

    def _check_current(self, stamps: tuple[Stamp, ...]) -> dict[str, Decomposition] | None:
        """Apply the rules of `svdtune.tracking` to what the layer holds now (``stamps``, which differ from
        the layer's own). Returns the factors to use instead of those held, or None: those held serve."""
        state = self._spectral
        count = len(state.params)
        if not state.stamps:  # out of meta (to_empty): nothing was decomposed yet
            return self._decompose_own(tuple(state.units))
        weights, factors = list(zip(stamps[:count], state.stamps[:count])), list(zip(stamps[count:], state.stamps[count:]))
        own_factors = all(now.same_tensor(then) for now, then in factors)
        if all(now.same_tensor(then) for now, then in weights):  # the layer's own weights
            return self._check_own_weights(stamps, weights, factors, own_factors)
        kept = next((entry for entry in state.foreign if entry.stamps == stamps[:count]), None)
        if kept is not None:
            return kept.factors  # this swapped-in weight was decomposed already
        if in_func_transform():  # nothing can be probed: new factors are trusted, the layer's own are not
            own_or_views = own_factors or self._aliases_own(factors)
            if own_or_views and (not self._aliases_own(weights) or self._own_weights_edited()):
                self._refuse_in_transform(always=True)
            return None
        wrong = () if self._sharded() else self._parts_not_fitting(tuple(state.units))
        if not wrong:
            self._stamp_as(stamps, own=False)
            return None
        return self._decompose_swapped_in(stamps[:count], wrong)

    def _check_own_weights(self, stamps, weights, factors, own_factors) -> dict[str, Decomposition] | None:
        state = self._spectral
        edited = {param for param, (now, then) in zip(state.params, weights) if now != then}
        written = all(now != then for now, then in factors)
        if edited and not written and in_func_transform():  # nothing can be probed: the edit needs an SVD
            self._refuse_in_transform()
        wrong = self._parts_not_fitting(self._parts_of(edited) if edited and not written else tuple(state.units))
        if not wrong:  # unchanged where it matters, written together (a broadcast), or factors that fit
            self._stamp_as(stamps, own=own_factors)
            return None
        if own_factors:  # the layer's own weights or factors edited: decompose its own weights again
            return self._decompose_own(wrong)
        if not edited:  # factors of another weight swapped in: the layer's own ones serve
            own = self._own_factors()
            if own is not None:
                return own
        return self._decompose_swapped_in(stamps[:len(state.params)], wrong)

    def _stamp_as(self, stamps: tuple[Stamp, ...], own: bool) -> None:
        """Remember that these tensors go together: as the layer's own, or as a swap that passed."""
        if not in_func_transform():  # (a transform's tensors are its own, gone after it)
            if own:
                self._spectral.stamps = stamps
            else:
                self._spectral.checked = stamps

    def _parts_not_fitting(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``parts`` whose factors held now fail the probe against their weights held now. None
        fails: FSDP2's gathered copies (every forward), and inside ``torch.func`` transforms (``vmap``
        cannot branch on values)."""
        if self._sharded() or in_func_transform():
            return ()
        return tuple(part for part in parts if not self._fits(part))

    def _fits(self, part: str) -> bool:
        factors = self._held_factors(part)
        if factors.U.is_meta:  # no values to probe (the deltas' device a stand-in, in tests): decompose
            return False
        weight = self.base_matrix(part)  # (an offloaded W is in CPU memory: probe it where the factors are)
        return check_factors(factors, weight.to(factors.U.device)) is None

    def _parts_of(self, params: set[str]) -> tuple[str, ...]:
        return tuple(part for part, unit in self._spectral.units.items() if unit.part.param in params)

    def _own_factors(self) -> dict[str, Decomposition] | None:
        """The layer's own factors while others are swapped in (alive: the swap holds them), or None."""
        state, count = self._spectral, len(self._spectral.params)
        tensors = [stamp.ref() for stamp in state.stamps[count:]]
        if any(t is None for t in tensors):
            return None
        held = iter(tensors)
        return {part: self._decomposition(part, next(held), next(held), next(held)) for part in state.units}

    def _own_weights_edited(self) -> bool:
        """Whether the layer's own weights (alive: a swap holds them) were edited since it last decomposed them."""
        count = len(self._spectral.params)
        return any(then.ref() is not None and Stamp(then.ref()) != then for then in self._spectral.stamps[:count])

    def _aliases_own(self, pairs: list[tuple[Stamp, Stamp]]) -> bool:
        """Whether some swapped-in tensors (of (now, own) stamp pairs) are views of the layer's own
        (``detach()``), seen through the transform's wrappers."""
        for now, then in pairs:
            tensor, own = now.ref(), then.ref()
            while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
                tensor = torch._C._functorch.get_unwrapped(tensor)
            with contextlib.suppress(RuntimeError):  # (a tensor without storage aliases nothing)
                if tensor is not None and own is not None and tensor.data_ptr() == own.data_ptr():
                    return True
        return False

    def _decompose(self, part: str, matrix: Tensor | None = None) -> Decomposition:
        """An SVD of ``matrix`` (default: the part's base matrix held now) by the layer's rank, cache and method."""
        state, unit = self._spectral, self._spectral.units[part]
        matrix = self.base_matrix(part) if matrix is None else matrix
        return decompose_cached(matrix, state.config.rank, state.cache_dir, unit.svd)

    def _decompose_own(self, parts: tuple[str, ...]) -> None:
        """Decompose the layer's own weights of ``parts`` again, into its own factor parameters."""
        self._refuse_in_transform()
        if self._sharded():
            raise SvdtuneError("a layer sharded by FSDP2 cannot be decomposed again; load the base weights, then "
                               "svdtune.apply, then fully_shard.")
        state = self._spectral
        for part in parts:  # the same method as before
            self._set_factors(part, self._decompose(part))
        memory.follow_deltas(self)  # decomposed from an offloaded W: the factors go to the deltas' device
        state.stamps, state.checked = self._stamps(), ()
        self._clear_cache()
        return None

    def _decompose_swapped_in(self, stamps: tuple[Stamp, ...], parts: tuple[str, ...]) -> dict[str, Decomposition]:
        """The factors of a swapped-in weight (an SVD of each part in ``parts``, the held factors of the
        others), kept (not registered) until one of its tensors is freed, or `FOREIGN_KEPT` newer ones."""
        self._refuse_in_transform()
        state = self._spectral
        entry = Foreign(stamps, {part: self._decompose(part) if part in parts else self._held_factors(part)
                                 for part in state.units})
        held = weakref.ref(state)
        entry.finalizers = [weakref.finalize(stamp.ref(), _forget, held, entry) for stamp in stamps
                            if stamp.ref() is not None]
        state.foreign.insert(0, entry)
        for old in state.foreign[FOREIGN_KEPT:]:
            old.release()
        del state.foreign[FOREIGN_KEPT:]
        self._clear_cache()
        return entry.factors

    def _adopt(self) -> None:
        """Resolve what the layer holds now (`_factors`) and make the factors of a swapped-in weight the
        layer's own: before a move (``.to``), a copy or a pickle, which keep the weight held now."""
        state = self._spectral
        if not state.stamps:
            return
        self._factors()
        now = self._stamps()[:len(state.params)]
        kept = next((entry for entry in state.foreign if entry.stamps == now), None)
        if kept is not None:
            for part, factors in kept.factors.items():
                self._set_factors(part, factors)
            state.stamps, state.checked = self._stamps(), ()
            state.foreign.remove(kept)
            kept.release()

    def _refuse_in_transform(self, always: bool = False) -> None:
        if always or in_func_transform():  # an SVD inside a transform would leave its tensors in the layer
            raise SvdtuneError(
                f"an svdtune layer ({self._spectral.original_class.__name__}) got a new base weight inside a "
                "torch.func transform, where svdtune cannot decompose it; pass its factors for that weight too "
                "(functional_call with every entry of named_parameters()), or set the weight outside the transform "
                "(after an in-place edit, one forward outside it, or layer.redecompose(), decomposes it).")

    def _stamps(self) -> tuple[Stamp, ...]:
        """A `Stamp` of each base weight, then of each factor: they change when one is replaced or edited
        in place (not through ``.data``)."""
        names = (*self._spectral.params, *self._factor_names())
        return tuple(map(Stamp, map(self._parameters.__getitem__, names)))


def _forget(held: weakref.ref, entry: Foreign) -> None:
    """A swapped-in weight was freed: drop its SVD."""
    state = held()
    if state is not None and entry in state.foreign:
        state.foreign.remove(entry)
        entry.release()
