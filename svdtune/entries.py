"""The tensor entries of a safetensors header: each one checked, the data buffer tiled, the tensors built.

Every key of a header but ``__metadata__`` names a tensor and describes it as
``{"dtype": "F32", "shape": [4, 3], "data_offsets": [begin, end]}``, the offsets
relative to the data buffer. `layout` checks every field of every entry,
`check_tiling` that the entries cover the buffer back to back, and `tensors`
builds them as views of the buffer.

A crafted header can describe hundreds of thousands of tensors. `layout` therefore
checks all entries at once, each rule as one pass over all of them in C
(`_all_entries`); only where a pass fails does it check the entries one by one
(`_entry`), to name the first one that is wrong, in header order, as always. The
passes accept only entries that `_entry` accepts: they are the same rules, some
stricter (exact types), never looser.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from itertools import chain, repeat
from operator import itemgetter

import torch
from torch import Tensor

from svdtune.errors import SvdtuneError

MAX_DIMS = 64  # torch's limit on a tensor's number of dimensions
MAX_SIZE = 2**63  # torch's limit on a tensor's elements (and on each size, and the product of the non-zero sizes)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}  # the names and meanings of safetensors' own dtype table
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
ITEMSIZES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}  # of a tensor's header entry
_INT, _STR, _LIST, _DICT, _TWO = {int}, {str}, {list}, {dict}, {2}  # sets of item types (and lengths) passes expect

Entry = tuple[torch.dtype, tuple[int, ...], int, int]  # (dtype, shape, begin, end)


def damaged(what: str, why: str) -> SvdtuneError:
    """The error for a file that is not a valid svdtune safetensors file, saying ``why``."""
    return SvdtuneError(f"{what} is not a valid svdtune safetensors file: {why}; "
                        "it is truncated, corrupted or another kind of file: write it again from its source.")


def layout(header: dict[str, object], what: str) -> dict[str, Entry]:
    """(dtype, shape, begin, end) of every tensor entry of ``header`` (without ``__metadata__``), each field checked.

    Raises:
        SvdtuneError: for the first entry, in header order, that is malformed, has an unsupported dtype,
            a shape torch cannot hold or a byte count that does not match its shape.
    """
    checked = _all_entries(header)
    if checked is None:
        checked = {name: _entry(name, info, what) for name, info in header.items()}
    return checked


def _all_entries(header: dict[str, object]) -> dict[str, Entry] | None:
    """`layout` of ``header`` by one pass per rule over all entries, or None if any pass fails."""
    infos = list(header.values())
    if not infos:
        return {}
    if set(map(type, infos)) != _DICT or not all(map(operator.eq, map(dict.keys, infos), repeat(ENTRY_KEYS))):
        return None
    codes, shapes, offsets = (list(map(itemgetter(key), infos)) for key in ("dtype", "shape", "data_offsets"))
    if set(map(type, codes)) != _STR or not set(codes).issubset(DTYPES):
        return None
    if {*map(type, shapes), *map(type, offsets)} != _LIST or set(map(len, offsets)) != _TWO:
        return None
    begins, ends = list(map(itemgetter(0), offsets)), list(map(itemgetter(1), offsets))
    numbers = [*chain.from_iterable(shapes), *begins, *ends]
    if set(map(type, numbers)) != _INT or min(numbers) < 0 or max(numbers) >= MAX_SIZE:
        return None  # (offsets of 2**63 or more cannot match a buffer's size either)
    if max(map(len, shapes)) > MAX_DIMS or not all(map(operator.le, begins, ends)):
        return None
    # Every size is below 2**63 and there are at most 64: the products below have at most 4,032 bits.
    if max(map(math.prod, map(filter, repeat(None), shapes))) >= MAX_SIZE:
        return None
    sizes = map(operator.mul, map(math.prod, shapes), map(ITEMSIZES.__getitem__, codes))
    if list(map(operator.sub, ends, begins)) != list(sizes):
        return None
    return dict(zip(header, zip(map(DTYPES.__getitem__, codes), map(tuple, shapes), begins, ends)))


def _entry(name: str, info: object, what: str) -> Entry:
    """(dtype, shape, begin, end) of one tensor entry, each field checked."""
    if type(info) is not dict or info.keys() != ENTRY_KEYS:
        raise damaged(what, f"tensor {name!r} is not described by dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise _unsupported_dtype(what, name, code)
    begin, end = offsets if type(offsets) is list and len(offsets) == 2 else (None, None)
    if not (_ints(shape) and type(begin) is int and type(end) is int and 0 <= begin <= end):  # exact types: no bool
        raise damaged(what, f"tensor {name!r} has a malformed shape or data_offsets")
    if len(shape) > MAX_DIMS:  # first: a product of very many sizes would take long
        raise damaged(what, f"tensor {name!r} has a shape torch cannot hold ({len(shape)} dimensions, sizes {shape[:4]}...)")
    elements = math.prod(shape)
    if (elements or math.prod(filter(None, shape))) >= MAX_SIZE:  # torch's limits hold for the non-zero sizes too
        raise damaged(what, f"tensor {name!r} has a shape torch cannot hold ({len(shape)} dimensions, sizes {shape[:4]}...)")
    if end - begin != elements * dtype.itemsize:
        raise damaged(what, f"tensor {name!r} has {end - begin} bytes for shape {shape} of {code}")
    return dtype, tuple(shape), begin, end


def _unsupported_dtype(what: str, name: str, code: object) -> SvdtuneError:
    if isinstance(code, str) and code.isascii() and code.isprintable() and len(code) <= 32:
        return SvdtuneError(f"{what}: tensor {name!r} has dtype {code}, which svdtune does not support (it reads "
                            f"{', '.join(DTYPES)}); convert that tensor to one of those, e.g. with .to(torch.float32).")
    return damaged(what, f"tensor {name!r} has no valid dtype")


def _ints(values: object) -> bool:
    """A list of non-negative ints (JSON gives exact types: ``type(True) is bool``, not int)."""
    return type(values) is list and (not values or set(map(type, values)) == _INT and min(values) >= 0)


def check_tiling(entries: dict[str, Entry], size: int, what: str) -> None:
    """The tensors must cover the data buffer of ``size`` bytes exactly, back to back, with no gap or overlap.

    Raises:
        SvdtuneError: they overlap, leave a gap, or cover less or more than the buffer.
    """
    spans = sorted(map(itemgetter(2, 3), entries.values()))  # (begin, end), ascending
    ends = [0, *map(itemgetter(1), spans)]  # where each tensor must begin, then where the last one ends
    if list(map(itemgetter(0), spans)) != ends[:-1]:
        raise damaged(what, "its tensors overlap or leave gaps in the data")
    if ends[-1] != size:
        raise damaged(what, f"its tensors cover {ends[-1]} bytes of a {size}-byte data buffer")


def tensors(entries: dict[str, Entry], data: memoryview) -> dict[str, Tensor]:
    """The tensors that ``entries`` (checked and tiling ``data``) describe, by name, in header order.

    Each is a view of ``data`` (writable: the tensors share it), or a copy where it is
    misaligned for its dtype; a zero-size tensor is a new empty one.
    """
    whole = torch.frombuffer(data, dtype=torch.uint8) if len(data) else None
    empty: dict[torch.dtype, Callable[[tuple[int, ...]], Tensor]] = {}  # dtype -> new_empty of an empty template
    result = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            make = empty.get(dtype) or empty.setdefault(dtype, torch.empty(0, dtype=dtype).new_empty)
            result[name] = make(shape)
        else:
            result[name] = _view(whole, dtype, shape, begin, end)
    return result


def _view(whole: Tensor, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> Tensor:
    """data[begin:end] as a tensor: a view of the (writable) data buffer ``whole``, or a copy if misaligned."""
    raw = whole[begin:end]
    if begin % dtype.itemsize or raw.data_ptr() % dtype.itemsize:  # safetensors does not align tensors: copy those
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)
