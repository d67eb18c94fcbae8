"""All or nothing: a change to a model that is rolled back to its exact prior state if anything raises.

`apply` and `load_delta` check everything first and then change the model in steps
meant not to fail. `all_or_nothing` guards those steps anyway: before them it records
what they can touch, for every module of the model: its class, its own attributes
(svdtune's records included), its parameter, buffer and child tables, svdtune's layer
state; every parameter's ``requires_grad``; and the values of the tensors the steps
will write into (copies of exactly those, no others). On any exception all of it is
put back, and the error is re-raised as an `SvdtuneError` naming the layer or tensor
being changed. Restored objects are the same objects: a reference taken before the
call (to a module, a parameter, its tensor) still points into the model afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdtune.errors import SvdtuneError


@dataclass
class Progress:
    """What a guarded change is doing now, for the error message."""

    current: str = ""  # e.g. "layer 'fc1'" or "parameter 'head.weight'"


@dataclass(eq=False)
class _ModuleState:
    module: nn.Module
    cls: type
    attributes: dict
    tables: dict[str, dict]  # "_parameters", "_buffers", "_modules": their entries
    non_persistent: set
    spectral: dict | None  # the fields of svdtune's layer state, if the module is adapted


class _Snapshot:
    """What a change may touch, recorded so that `restore` can put it back."""

    def __init__(self, model: nn.Module, written: Iterable[Tensor]) -> None:
        self.modules = [_module_state(module) for module in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.values = [(tensor, tensor.detach().clone()) for tensor in written]

    def restore(self) -> None:
        for state in self.modules:
            module = state.module
            module.__class__ = state.cls
            module.__dict__.clear()
            module.__dict__.update(state.attributes)
            for name, entries in state.tables.items():
                table = module.__dict__[name]
                table.clear()
                table.update(entries)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(state.non_persistent)
            if state.spectral is not None:
                module.__dict__["_spectral"].__dict__.update(state.spectral)
        for param, flag in self.flags:  # (before the values: a flag cannot fail to be set back)
            with writable(param):
                param.requires_grad_(flag)
        for tensor, value in self.values:
            with writable(tensor):
                tensor.copy_(value)


def _module_state(module: nn.Module) -> _ModuleState:
    tables = {name: dict(module.__dict__[name]) for name in ("_parameters", "_buffers", "_modules")}
    spectral = module.__dict__.get("_spectral")
    return _ModuleState(module, module.__class__, dict(module.__dict__), tables, set(module._non_persistent_buffers_set),
                        dict(spectral.__dict__) if spectral is not None else None)


def writable(tensor: Tensor) -> contextlib.AbstractContextManager:
    """The mode an in-place change of ``tensor`` needs: inference tensors (of a model built under
    ``torch.inference_mode()``) can be changed only inside it; others under no_grad."""
    return torch.inference_mode() if tensor.is_inference() else torch.no_grad()


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, action: str, written: Iterable[Tensor] = ()) -> Iterator[Progress]:
    """Run the block; if it raises, roll ``model`` back to its state on entry and raise an SvdtuneError.

    Args:
        model: the model the block changes.
        action: what the block does, for the message (e.g. "svdtune.apply").
        written: tensors the block writes into in place (their values are copied first).

    Yields:
        A `Progress`; set ``progress.current`` to what is being changed, so the error names it.

    Raises:
        SvdtuneError: the block raised an Exception (chained as its cause); the model is as it was.
        BaseException: a KeyboardInterrupt or SystemExit from the block, after the rollback.

    Example:
        >>> with all_or_nothing(model, "loading") as progress:
        ...     progress.current = "layer 'fc1'"
        ...     adapt(model.fc1, factors, config)
    """
    snapshot, progress = _Snapshot(model, written), Progress()
    try:
        yield progress
    except BaseException as error:
        try:
            snapshot.restore()
        except Exception as failure:  # never expected: say so rather than claim the model is intact
            raise SvdtuneError(f"{action} failed ({error}) and the model could not be rolled back ({failure}); "
                               "rebuild the model before using it.") from error
        if not isinstance(error, Exception):
            raise
        where = f" at {progress.current}" if progress.current else ""
        raise SvdtuneError(f"{action} failed{where}: {error}; the model was rolled back to its state before the "
                           "call.") from error
