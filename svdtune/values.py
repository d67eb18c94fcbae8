"""What a delta file's values become in the model, checked before anything changes.

Every value that reaches a model is checked in the model's dtype, on the model's device: deltas and
float tensors must stay finite after the cast (1e39 into float32 overflows), integer and bool
tensors must hold each value exactly with its sign (a cast between signed and unsigned integers
wraps around), complex values reach only complex tensors, and a BatchNorm ``running_var`` is >= 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from svdtune.errors import SvdtuneError

if TYPE_CHECKING:
    from svdtune.records import LayerDelta


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity in a float or complex tensor (float8 through float32, which holds each of its
    values: ``isfinite`` has no float8 kernel); integers and bools are always finite."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize == 1:
        tensor = tensor.to(torch.float32)
    return bool(torch.isfinite(tensor).all())


def overlapping(tensor: Tensor) -> bool:
    """Whether two elements of a (strided) tensor share memory, e.g. stride 0 (``expand``).

    Dims sorted by stride: each stride must reach past everything the smaller ones span.
    (A few exotic interleaved layouts that do not overlap are counted as overlapping.)
    """
    if tensor.numel() <= 1:
        return False
    span = 1  # elements spanned by the dims so far, from the first to the last, inclusive
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def delta_value(name: str, record: LayerDelta, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The file's deltas as the model will hold them, refused if they overflow its dtype (1e39 in float32)."""
    value = record.delta.to(device=device, dtype=dtype)
    if not all_finite(value):
        raise SvdtuneError(f"layer {name!r}: the delta file's deltas do not fit the model's {dtype} (they overflow to "
                           "infinity); load the delta into a model of the dtype it was trained in.")
    return value


def targets(model: nn.Module, kind: str, found: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (the model's tensor, the file's value as that tensor will hold it)}, each checked to exist with
    the same shape, on a real device, and to hold the value exactly (integers) or finitely (floats)."""
    targets = {}
    for name, value in values.items():
        target = found.get(name)
        if target is None:
            hint = " (or is a base weight of a tuned layer)" if kind == "parameter" else ""
            raise SvdtuneError(f"{kind} {name!r} of the delta file is missing from the model{hint}; "
                               "load the delta into the model it was trained with.")
        if tuple(target.shape) != tuple(value.shape):
            raise SvdtuneError(f"{kind} {name!r} has shape {list(target.shape)} in the model but {list(value.shape)} "
                               "in the delta file; load the delta into the model it was trained with.")
        targets[name] = (target, _value(model, kind, name, target, value))
    return targets


def _value(model: nn.Module, kind: str, name: str, target: Tensor, value: Tensor) -> Tensor:
    """``value`` cast to ``target``'s dtype and device, refused unless the cast keeps what it means."""
    def refuse(why: str) -> SvdtuneError:
        return SvdtuneError(f"{kind} {name!r}: {why}; load the delta into the model it was trained with.")

    if target.is_meta:
        raise refuse("the model's tensor is on the meta device and cannot receive values; materialize the model first")
    if overlapping(target):
        raise refuse(f"the model's tensor of shape {list(target.shape)} has strides {list(target.stride())}, so its "
                     "elements share memory (e.g. an expand) and cannot each take a value; make it .contiguous()")
    if kind == "parameter" and not target.is_floating_point():
        raise refuse(f"the model's parameter is {target.dtype}, which cannot be trained (requires_grad needs a float)")
    if value.is_complex() and not target.is_complex():
        raise refuse(f"the delta file holds complex values, which the model's {target.dtype} tensor cannot hold")
    cast = value.to(device=target.device, dtype=target.dtype)
    if not _holds_exactly(value, cast):
        raise refuse(f"the delta file's values do not fit the model's {target.dtype} (overflow, NaN or a fraction)")
    owner, _, leaf = name.rpartition(".")
    if leaf == "running_var" and isinstance(model.get_submodule(owner), nn.modules.batchnorm._NormBase):
        if not bool((cast >= 0).all()):
            raise refuse("a running variance must be >= 0")
    return cast


def _holds_exactly(value: Tensor, cast: Tensor) -> bool:
    """Whether ``cast`` (``value`` cast to the model's dtype) still means ``value``: finite into a float;
    into an integer or bool, every value held exactly and its sign kept (a cast between signed and unsigned
    integers wraps around, and the cast back unwraps it)."""
    if cast.is_floating_point() or cast.is_complex():
        return all_finite(cast)
    same = bool(value.to(cast.device).eq(cast.to(value.dtype)).all())
    if _unsigned(cast.dtype) and not _unsigned(value.dtype):
        return same and not bool((value < 0).any())
    if _unsigned(value.dtype) and not _unsigned(cast.dtype):
        return same and not bool((cast < 0).any())
    return same


def _unsigned(dtype: torch.dtype) -> bool:
    return dtype == torch.bool or (not dtype.is_floating_point and not dtype.is_complex and torch.iinfo(dtype).min == 0)
