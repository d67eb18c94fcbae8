"""The safetensors container svdtune writes and reads: checksummed, written atomically.

Both delta files (`svdtune.delta`) and SVD cache entries (`svdtune.cache`) are
plain safetensors files (https://github.com/huggingface/safetensors):

    8 bytes    N, the header length, unsigned 64-bit little-endian
    N bytes    the header: UTF-8 JSON, padded with spaces to a multiple of 8
    the rest   the data buffer: every tensor's bytes, little-endian, C order

svdtune adds one entry to the header's ``__metadata__``: ``"checksum"``, the
SHA-256 (hex) of the *canonical header* followed by the data buffer. The
canonical header is the header JSON without the ``checksum`` entry, written
with sorted keys, no whitespace and ASCII-only escapes (Python's
``json.dumps(h, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``).
So any change of a tensor's name, dtype, shape, position or bytes, or of a
metadata value, is detected; whitespace changes are not (they change nothing).

Reading never trusts the file: every size, offset and type is checked, and every
problem is an `SvdtuneError` (never a crash, never a huge allocation).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable

import torch
from torch import Tensor

from svdtune.errors import SvdtuneError

CHECKSUM = "checksum"  # the __metadata__ key svdtune adds
MAX_HEADER = 100 * 1024 * 1024  # bytes; larger headers are refused (as safetensors does)
MAX_DIMS = 64  # torch's limit on a tensor's number of dimensions

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
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice (JSON parsers keep the last one, unseen by the checksum)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A ``json.loads`` object_pairs_hook that refuses duplicate keys with DuplicateKeyError."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DuplicateKeyError(f"the key {repeated!r} appears twice in one JSON object")
    return result


def canonical_json(value: object) -> bytes:
    """The canonical JSON bytes svdtune writes and hashes (sorted keys, no spaces, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def is_str_map(value: object) -> bool:
    """True if ``value`` is a dict from str to str, as safetensors metadata must be."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def check_metadata(metadata: object) -> None:
    """Raise SvdtuneError unless ``metadata`` (to be written) maps str to str."""
    if not is_str_map(metadata):
        raise SvdtuneError("metadata must map str to str; convert the values with str() or json.dumps().")


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor in C order (a copy on CPU if needed)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def encode(tensors: dict[str, Tensor], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """A checksummed safetensors file as a list of byte chunks (header first).

    Args:
        tensors: name -> tensor; stored in sorted name order, back to back.
        metadata: the ``__metadata__`` strings (the checksum is added).

    Returns:
        The chunks to write, in order.

    Raises:
        SvdtuneError: a tensor has a dtype safetensors cannot store, or metadata is not str -> str.
    """
    header: dict[str, object] = {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise SvdtuneError(f"tensor {name!r} has dtype {tensor.dtype}, which svdtune files cannot hold.")
        data = tensor_bytes(tensor)
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        chunks.append(data)
        offset += data.nbytes
    check_metadata(metadata)
    header["__metadata__"] = {k: v for k, v in metadata.items() if k != CHECKSUM}
    digest = hashlib.sha256(canonical_json(header))
    for chunk in chunks:
        digest.update(chunk)
    header["__metadata__"][CHECKSUM] = digest.hexdigest()
    text = canonical_json(header)
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)), text, *chunks]


def decode(raw: bytes, what: str, require_checksum: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse and verify a safetensors file held in memory.

    Args:
        raw: the whole file.
        what: how to name the file in error messages (e.g. its path).
        require_checksum: refuse files without svdtune's checksum.

    Returns:
        (tensors by name, metadata without the checksum).

    Raises:
        SvdtuneError: the bytes are not a complete, intact safetensors file.
    """
    header, data = _split(raw, what)
    metadata = header.pop("__metadata__", {})
    if not is_str_map(metadata):
        raise _damaged(what, "its __metadata__ is not a map of strings")
    layout = {name: _entry(name, info, what) for name, info in header.items()}
    _check_tiling(layout, len(data), what)
    checksum = metadata.pop(CHECKSUM, None)
    if checksum is not None or require_checksum:
        expected = hashlib.sha256(canonical_json({**header, "__metadata__": metadata}))
        expected.update(data)
        if checksum != expected.hexdigest():
            raise _damaged(what, "its checksum does not match its content" if checksum else "it has no svdtune checksum")
    tensors = {name: _tensor(data, *entry) for name, entry in layout.items()}
    return tensors, metadata


def read(path: str | os.PathLike, what: str | None = None, require_checksum: bool = True, mapped: bool = False):
    """`decode` the file at ``path``; a missing or unreadable file is an SvdtuneError too.

    With ``mapped``, the file is memory-mapped copy-on-write instead of read: the
    tensors share the file's pages (loaded as they are touched, never written
    back), so a large base checkpoint is not held in memory twice.
    """
    what = what or repr(os.fspath(path))
    try:
        with open(path, "rb") as handle:
            if mapped and os.fstat(handle.fileno()).st_size >= 8:
                raw = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            else:
                raw = handle.read()
    except OSError as error:
        raise SvdtuneError(f"cannot read {what}: {error.strerror or error}; check the path.") from None
    return decode(raw, what, require_checksum)


def _damaged(what: str, why: str) -> SvdtuneError:
    return SvdtuneError(f"{what} is not a valid svdtune safetensors file: {why}; "
                        "it is truncated, corrupted or another kind of file: write it again from its source.")


def _split(raw: bytes, what: str) -> tuple[dict, memoryview]:
    if len(raw) < 8:
        raise _damaged(what, f"it is only {len(raw)} bytes long")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > min(MAX_HEADER, len(raw) - 8):
        raise _damaged(what, f"its header claims {size} bytes but the file has {len(raw) - 8} after the length")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as error:
        raise _damaged(what, f"its header is ambiguous: {error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _damaged(what, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(what, "its header is not a JSON object")
    return header, memoryview(raw)[8 + size:]


def _entry(name: str, info: object, what: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor entry, each field checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _damaged(what, f"tensor {name!r} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None, info["shape"], info["data_offsets"]
    if dtype is None:
        raise _damaged(what, f"tensor {name!r} has unknown dtype {info['dtype']!r}")
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _damaged(what, f"tensor {name!r} has a malformed shape or data_offsets")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) >= 2**63:  # torch's limits, even for 0 elements
        raise _damaged(what, f"tensor {name!r} has a shape torch cannot hold ({len(shape)} dimensions, sizes {shape[:4]}...)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (offsets[1] - offsets[0]) != math.prod(shape) * itemsize:
        raise _damaged(what, f"tensor {name!r} has {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _ints(values: object) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _check_tiling(layout: dict[str, tuple], size: int, what: str) -> None:
    """The tensors must cover the data buffer exactly, back to back, with no gap or overlap."""
    end = 0
    for _, _, begin, stop in sorted(layout.values(), key=lambda entry: (entry[2], entry[3])):
        if begin != end:
            raise _damaged(what, "its tensors overlap or leave gaps in the data")
        end = stop
    if end != size:
        raise _damaged(what, f"its tensors cover {end} bytes of a {size}-byte data buffer")


def _tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> Tensor:
    """A writable tensor of data[begin:end]: a view of a writable (mapped) buffer, else a copy."""
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    chunk = data[begin:end] if not data.readonly else bytearray(data[begin:end])
    raw = torch.frombuffer(chunk, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:  # safetensors does not align tensors: copy a misaligned one
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def check_destination(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file to write that is not ``*.safetensors`` or has no folder to go in.

    Raises:
        SvdtuneError: the name does not end with ``.safetensors`` (any case).
        OSError: as `atomic_write`, for a missing folder or a folder given as ``path``.
    """
    name = os.fspath(path)
    if not name.lower().endswith(".safetensors"):
        raise SvdtuneError(f"{name!r} must end with .safetensors: svdtune writes safetensors files; rename the output.")
    _check_folder(name)


def _check_folder(path: str) -> None:
    """Name the user's path (not a temporary file) when the destination cannot be created."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"its folder {folder!r} does not exist; create it first (mkdir -p)", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "it is a folder; give a file name inside it", path)


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write a file so that ``path`` is either untouched or complete, never partial.

    The bytes go to a temporary file in the same folder, are flushed to disk
    (fsync), and the file is renamed over ``path`` (``os.replace``, atomic on
    POSIX and Windows). On any failure the temporary file is removed and the
    error propagates.

    Raises:
        OSError: the folder is missing (FileNotFoundError naming ``path``), ``path`` is
            a folder (IsADirectoryError), the folder is not writable, the disk is full, ...
    """
    path = os.fspath(path)
    _check_folder(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable where the OS allows it (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
