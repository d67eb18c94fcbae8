"""Which factors go with the base weights a layer holds now: the staleness rules of an adapted layer.

A layer's own factors (its frozen parameters ``svd_U``, ``svd_sigma``, ``svd_Vh``) belong to its own
base weights, the tensors it held when svdtune last decomposed them (`Stamp`s record which tensors, at
which version). Every read of the factors (`Tracking._factors`) compares what the layer holds now:

- its own weights and factors, unchanged: the factors, at no cost;
- its own weights, edited in place (a DDP broadcast writes weights and factors together; a user edit
  writes the weight alone), or its factors written: kept if the factors were written and pass the
  probe (U diag(sigma) Vh x against W x, `svdtune.cache.check_factors`), else the parts that fail are
  decomposed again into the layer's own factor parameters;
- other weight tensors swapped in (``torch.func.functional_call``; FSDP2's gathered copies): never
  written into the layer's own factors. The factors held with them serve where they pass the probe;
  the parts that fail get an SVD of the swapped-in weight, kept until one of its tensors is freed;
- a move (``.to``), a copy, a pickle or a ``load_state_dict`` first makes the factors of the weights
  held now the layer's own (`Tracking._adopt`);
- inside ``torch.func`` transforms nothing is probed or stamped (their tensors are wrapped and gone
  after the call), and a weight that would need a new SVD is refused.
"""

from __future__ import annotations

import weakref

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


class Tracking(nn.Module):
    """The factor reads of `svdtune.layers.SpectralLayer` (its base class): `_factors` and the rules above."""

    def _factors(self, part: str = "") -> Decomposition:
        """A unit's decomposition for the base weights held now."""
        if not torch.compiler.is_compiling():
            state, stamps = self._spectral, self._stamps()
            if stamps != state.stamps and stamps != state.checked:
                foreign = self._check_current(stamps)
                if foreign is not None:
                    return foreign[self._unit(part).part.name]
        return self._held_factors(part)

    def _check_current(self, stamps: tuple[Stamp, ...]) -> dict[str, Decomposition] | None:
        """Apply the rules of `svdtune.tracking` to what the layer holds now (``stamps``, which differ from
        the layer's own). Returns the factors of a swapped-in weight, or None: the factors held serve."""
        state = self._spectral
        count = len(state.params)
        if not state.stamps:  # out of meta (to_empty): nothing was decomposed yet
            return self._decompose_own(tuple(state.units))
        weights, factors = zip(stamps[:count], state.stamps[:count]), zip(stamps[count:], state.stamps[count:])
        weights, factors = list(weights), list(factors)
        own_factors = all(now.same_tensor(then) for now, then in factors)
        if all(now.same_tensor(then) for now, then in weights):  # the layer's own weights
            edited = {param for param, (now, then) in zip(state.params, weights) if now != then}
            written = all(now != then for now, then in factors)
            if edited and not written:  # the weight alone edited in place
                return self._decompose_own(self._parts_of(edited))
            wrong = self._parts_not_fitting()
            if not wrong:  # written together (a broadcast), or factors swapped in or written that fit
                self._stamp_as(stamps, own=own_factors)
                return None
            if own_factors:  # the layer's own factors, edited: decompose its own weights again
                return self._decompose_own(wrong)
            return self._decompose_swapped_in(stamps[:count], wrong)  # swapped-in factors of another weight
        if state.foreign is not None and state.foreign[0] == stamps[:count]:
            return state.foreign[1]  # this swapped-in weight was decomposed already
        if in_func_transform():  # nothing can be probed: swapped-in factors are trusted, the layer's own are not
            return None if not any(now.same_tensor(then) for now, then in factors) else \
                self._decompose_swapped_in(stamps[:count], tuple(state.units))  # (refused)
        wrong = () if self._sharded() else self._parts_not_fitting()
        if not wrong:
            self._stamp_as(stamps, own=False)
            return None
        return self._decompose_swapped_in(stamps[:count], wrong)

    def _stamp_as(self, stamps: tuple[Stamp, ...], own: bool) -> None:
        """Remember that these tensors go together: as the layer's own, or as a swap that passed."""
        if not in_func_transform():  # (a transform's tensors are its own, gone after it)
            if own:
                self._spectral.stamps = stamps
            else:
                self._spectral.checked = stamps

    def _parts_not_fitting(self) -> tuple[str, ...]:
        """The parts whose factors held now fail the probe against their weights held now. None fails:
        FSDP2's gathered copies (every forward), and inside ``torch.func`` transforms (``vmap`` cannot
        branch on values)."""
        if self._sharded() or in_func_transform():
            return ()
        return tuple(part for part in self._spectral.units
                     if check_factors(self._held_factors(part), self.base_matrix(part)) is not None)

    def _parts_of(self, params: set[str]) -> tuple[str, ...]:
        return tuple(part for part, unit in self._spectral.units.items() if unit.part.param in params)

    def _decompose(self, part: str) -> Decomposition:
        state, unit = self._spectral, self._spectral.units[part]
        return decompose_cached(self.base_matrix(part), state.config.rank, state.cache_dir, unit.svd)

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
        state.stamps, state.checked, state.foreign = self._stamps(), (), None
        self._clear_cache()
        return None

    def _decompose_swapped_in(self, stamps: tuple[Stamp, ...], parts: tuple[str, ...]) -> dict[str, Decomposition]:
        """The factors of a swapped-in weight (an SVD of each part in ``parts``, the held factors of the
        others), kept (not registered) until one of its tensors is freed."""
        self._refuse_in_transform()
        state = self._spectral
        factors = {part: self._decompose(part) if part in parts else self._held_factors(part) for part in state.units}
        entry = state.foreign = (stamps, factors)
        held = weakref.ref(state)
        for stamp in stamps:
            if stamp.ref() is not None:
                weakref.finalize(stamp.ref(), _forget, held, entry)
        self._clear_cache()
        return factors

    def _adopt(self) -> None:
        """Resolve what the layer holds now (`_factors`) and make the factors of a swapped-in weight the
        layer's own: before a move (``.to``), a copy or a pickle, which keep the weight held now."""
        if not self._spectral.stamps:
            return
        self._factors()
        foreign = self._spectral.foreign
        if foreign is not None and foreign[0] == self._stamps()[:len(self._spectral.params)]:
            for part, factors in foreign[1].items():
                self._set_factors(part, factors)
            self._spectral.stamps, self._spectral.checked, self._spectral.foreign = self._stamps(), (), None

    def _refuse_in_transform(self) -> None:
        if in_func_transform():  # an SVD of wrapped tensors would store them in the layer
            raise SvdtuneError(
                f"an svdtune layer ({self._spectral.original_class.__name__}) got a new base weight inside a "
                "torch.func transform, where svdtune cannot decompose it; pass its factors for that weight too "
                "(functional_call with every entry of named_parameters()), or set the weight outside the transform.")

    def _stamps(self) -> tuple[Stamp, ...]:
        """A `Stamp` of each base weight, then of each factor: they change when one is replaced or edited
        in place (not through ``.data``)."""
        names = (*self._spectral.params, *self._factor_names())
        return tuple(map(Stamp, map(self._parameters.__getitem__, names)))


def _forget(held: weakref.ref, entry: tuple) -> None:
    """A swapped-in weight was freed: drop its SVD (unless another took its place)."""
    state = held()
    if state is not None and state.foreign is entry:
        state.foreign = None
