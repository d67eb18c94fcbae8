"""How an adapted layer goes into and out of checkpoints, copies and pickles.

The factor parameters are hidden from the state dict: a checkpoint holds the base
weights and deltas only, and loading neither expects nor writes factors. A new base
weight is decomposed *before* it is loaded, so a weight without an SVD is never half
loaded. A copy or pickle holds factors of the weight it holds, and unpickles as the
run-time ``Spectral<Class>`` type of its original class.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from svdtune import kinds, memory
from svdtune.errors import SvdtuneError


class CheckpointHooks(nn.Module):
    """The state-dict, copy and pickle hooks of `svdtune.layers.SpectralLayer` (its base class)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        self._adopt()  # the factors of the weights held now, first: a weight edited before the load keeps its SVD
        state, kind, new = self._spectral, self._spectral.kind, {}
        assign = local_metadata.get("assign_to_params_buffers", False)  # the weight becomes incoming, as it is
        for part, unit in state.units.items():
            incoming, base = state_dict.get(prefix + unit.part.param), self._parameters[unit.part.param]
            if incoming is None or incoming.shape != base.shape:
                continue
            incoming = incoming if assign else incoming.to(base)
            same = (incoming.dtype, incoming.device) == (base.dtype, base.device) and torch.equal(incoming, base)
            if same and state.stamps:  # (no stamps: out of meta, the factors hold no values yet)
                continue
            try:  # decompose before loading, so a weight without an SVD is not half-loaded
                if self._sharded():
                    raise SvdtuneError("it is sharded by FSDP2: load base weights before apply and fully_shard")
                new[part] = self._decompose(part, kinds.matrix(kind, incoming, unit.part))
            except SvdtuneError as error:
                error_msgs.append(f"svdtune layer {prefix[:-1]!r}: new base weight refused: {error}")
                return
        errors_before = len(error_msgs)
        with self._factors_hidden():  # not in checkpoints: neither expected (missing) nor loaded
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)
        self._clear_cache()
        if len(error_msgs) == errors_before:  # else leave the stamps: the next forward re-decomposes if needed
            for part, factors in new.items():
                self._set_factors(part, factors)
            memory.follow_deltas(self)
            state.stamps = self._stamps()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._factor_names():
            destination.pop(prefix + name, None)

    @contextlib.contextmanager
    def _factors_hidden(self):
        """Take the factor parameters out of ``_parameters`` for a while; put them back in their places
        (the parameters loading replaced, with ``assign=True``, stay replaced)."""
        params = self._parameters
        held, names = dict(params), set(self._factor_names())
        for name in names:
            del params[name]
        self._spectral.loading = True  # assign=True reads the weight (hasattr) before replacing it
        try:
            yield
        finally:
            self._spectral.loading = False
            now = dict(params)
            params.clear()
            params.update((name, held[name] if name in names else now.get(name, held[name])) for name in held)

    def __getstate__(self):
        self._adopt()  # a copy or pickle gets factors of the weight it holds
        state = dict(super().__getstate__())  # without the SVDs of swapped-in weights, which the copy does not hold
        state["_spectral"] = dataclasses.replace(state["_spectral"], foreign=[], checked=())
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._spectral.stamps = self._stamps()  # the copied weight is a new tensor

    def __reduce_ex__(self, protocol):
        # The Spectral<Class> type is built at run time and cannot be pickled by name:
        # pickle the original class and rebuild the adapted one on load.
        from svdtune.swap import new_spectral  # (swap imports this module)

        _, _, *rest = super().__reduce_ex__(protocol)
        return (new_spectral, (self._spectral.original_class,), *rest)
