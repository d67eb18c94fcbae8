"""Reading a base checkpoint (a state dict) for `merge_files` and `export_lora`, as an attacker may have made it.

Only a regular file is read; safetensors are memory-mapped, torch checkpoints are loaded with
``weights_only`` (memory-mapped where the format allows), after their zip directory shows they expand
to no more than `MAX_LOGICAL_RATIO` times the file. What could not be written back as it is (sparse
tensors, overlapping views, a size bomb) or was saved from an adapted model is refused, naming the key.
"""

from __future__ import annotations

import os
import re
import zipfile

import torch
from torch import Tensor

from svdtune import container
from svdtune.errors import SvdtuneError
from svdtune.layers import DELTA
from svdtune.values import overlapping

BASE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # matched in any case
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal styling, e.g. the bold in torch.load's messages
MAX_LOGICAL_RATIO = 4  # a torch base's tensors may hold this many times its file size (tied weights share storage)
MAX_LOGICAL_SLACK = 1 << 20  # bytes, for tiny files
DELTA_KEY = re.compile(re.escape(DELTA) + r"(_\w+)?")  # svd_delta, svd_delta_q_proj...: `svdtune.layers.delta_name`


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A base state dict from ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` (``weights_only`` torch.load).

    Suffixes are matched in any case (``.PT`` too). Only a regular file is read; the
    tensors are memory-mapped where the format allows it.

    A checkpoint of the form ``{"params": state_dict}`` (IQA-PyTorch) is unwrapped.

    Rules for a base (each refused with the key named): every entry is a dense tensor of
    a dtype safetensors holds; no tensor's elements overlap in memory (a stride-0
    ``expand`` or an overlapping view: merging would write every repeated element);
    all tensors together hold at most `MAX_LOGICAL_RATIO` times the file's bytes (views sharing
    storage count once per view; for a zip checkpoint, its members' sizes are checked from its
    directory before loading, so compressed members are not expanded); no key is an svdtune delta
    (``*.svd_delta``, ``*.svd_delta_q_proj``...: the checkpoint was saved from an adapted model).

    Raises:
        SvdtuneError: unknown suffix, unreadable or non-regular file, or an entry that breaks a rule above.
    """
    path, what = os.fspath(path), f"base checkpoint {os.fspath(path)!r}"
    if not path.lower().endswith(BASE_SUFFIXES):
        raise SvdtuneError(f"{what} must end with one of {', '.join(BASE_SUFFIXES)}; save the base state dict in one of those.")
    if path.lower().endswith(".safetensors"):
        state = container.read(path, what, require_checksum=False, mapped=True)[0]
    else:
        with container.open_regular(path, what) as handle:  # not a FIFO or device: torch.load would block or grow
            size = os.fstat(handle.fileno()).st_size
            _check_expansion(handle, size, what)
        state = _unwrapped(_torch_load_or_refuse(path, what), what)
        _check_tensors(state, size, what)
    _check_not_adapted(state, what)
    return state


def _check_expansion(handle, size: int, what: str) -> None:
    """Refuse a zip checkpoint whose members would expand past the size bound (compressed zeros: a 130 kB
    file of 128 MiB) from its directory alone, before torch.load allocates them. (torch.save stores members
    uncompressed; a legacy, non-zip checkpoint holds its bytes as they are.)"""
    zipped = handle.read(4) == b"PK\x03\x04"  # a local file header first, as torch.save writes
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        if zipped:  # torch's own zip reader may still read it, and expand what this check cannot see
            raise SvdtuneError(f"{what}: its zip archive's directory cannot be read (damaged or crafted); save the "
                               "state dict again with torch.save.") from None
        return  # not a zip archive: torch.load tells what it is (a legacy checkpoint holds its bytes as they are)
    finally:
        handle.seek(0)
    if _beyond_size_bound(expanded, size):
        raise SvdtuneError(f"{what}: its zip archive expands to {expanded:,} bytes, over {MAX_LOGICAL_RATIO} times the "
                           f"file's {size:,} (compressed members); save the state dict with torch.save, uncompressed.")


def _beyond_size_bound(held: int, file_size: int) -> bool:
    """Whether ``held`` bytes are more than a file of ``file_size`` bytes may expand to."""
    return held > MAX_LOGICAL_RATIO * file_size + MAX_LOGICAL_SLACK


def _torch_load_or_refuse(path: str, what: str) -> object:
    try:
        return _torch_load(path)
    except Exception as error:  # torch.load raises many types; all mean "not a readable checkpoint"
        reason = _load_failure(error)
        raise SvdtuneError(f"cannot read {what}: {reason}; it must be a state dict saved with torch.save.") from None


def _unwrapped(state: object, what: str) -> dict[str, Tensor]:
    """The state dict a torch checkpoint holds ({"params": sd} unwrapped), each entry a str -> tensor."""
    if isinstance(state, dict) and isinstance(state.get("params"), dict):
        state = state["params"]
    if not isinstance(state, dict):
        raise SvdtuneError(f"{what} holds a {type(state).__name__}, not a state dict; save model.state_dict().")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise SvdtuneError(f"{what}: entry {key!r} is not a tensor; save a plain model.state_dict().")
    return state


def _check_tensors(state: dict[str, Tensor], file_size: int, what: str) -> None:
    """Refuse what cannot be written back as it is: sparse or exotic tensors, overlapping views, a size bomb."""
    total = 0
    for key, value in state.items():
        if value.layout != torch.strided or value.dtype not in container.DTYPE_NAMES:
            raise SvdtuneError(f"{what}: tensor {key!r} is a {value.layout} {value.dtype} tensor, which a safetensors "
                               "file cannot hold; save it as a dense tensor of a plain dtype (.to_dense(), .to(...)).")
        if overlapping(value):
            raise SvdtuneError(
                f"{what}: tensor {key!r} of shape {list(value.shape)} has strides {list(value.stride())}, so its "
                "elements share memory (e.g. torch.zeros(1).expand(n)); merging would write every repeated element. "
                "If the full tensor is what you mean, save it with .contiguous() before torch.save.")
        total += value.numel() * value.element_size()
    if _beyond_size_bound(total, file_size):
        raise SvdtuneError(f"{what}: its tensors hold {total:,} bytes, over {MAX_LOGICAL_RATIO} times the file's "
                           f"{file_size:,} (many views of shared storage); save each tensor once (.clone()).")


def _check_not_adapted(state: dict[str, Tensor], what: str) -> None:
    """Refuse a base saved from a model svdtune.apply adapted: its ``*.svd_delta`` keys would not load into the plain model."""
    key = next((key for key in state if DELTA_KEY.fullmatch(key.rsplit(".", 1)[-1])), None)
    if key is not None:
        raise SvdtuneError(
            f"{what} holds the svdtune delta {key!r}: it was saved from a model adapted by svdtune.apply, and a merged "
            "file would not load into the plain model. Save the plain base model's state dict instead (from before "
            "svdtune.apply, or after svdtune.restore(model)), with the deltas in their own file (svdtune.save_delta); "
            "or call svdtune.merge(model) and save that state dict.")


def _load_failure(error: Exception) -> str:
    """A one-line reason from a torch.load error: its first sentence (and the unpickler's), no terminal escapes.

    Example: "Weights only load failed (WeightsUnpickler error: Unsupported global: GLOBAL
    torch.nn.modules.linear.Linear was not an allowed global by default)" for a pickled whole model.
    """
    lines = [" ".join(line.split()) for line in ANSI_ESCAPE.sub("", str(error)).splitlines()]
    lines = [line for line in lines if line]
    if not lines or not any(c.isalpha() for c in lines[0]):  # e.g. EOFError(), KeyError(101) of a damaged file
        return " ".join([type(error).__name__, *lines[:1]])
    reason = _first_sentence(lines[0])
    unpickler = next((line for line in lines[1:] if line.startswith("WeightsUnpickler error:")), None)
    return f"{reason} ({_first_sentence(unpickler)})" if unpickler else reason


def _first_sentence(line: str) -> str:
    """``line`` up to its first sentence end (". ", "! " or "? "), without the final full stop."""
    return re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0].removesuffix(".")


def _torch_load(path: str) -> object:
    """torch.load with weights_only, memory-mapped where the file's format allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # e.g. the legacy (pre-zip) format cannot be mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=True)
