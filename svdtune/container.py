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

Reading never trusts the file: only a regular file is opened, its header is read
and checked before its data, every size, offset and type is checked, and every
problem is an `SvdtuneError` (never a crash, never a huge allocation). The tensor
entries are checked and built in `svdtune.entries`; writing is in `svdtune.writing`
(`atomic_write`, re-exported here).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import torch
from torch import Tensor

from svdtune.entries import DTYPE_NAMES, DTYPES, ENTRY_KEYS, MAX_DIMS, check_tiling, layout, tensors  # some re-exported
from svdtune.entries import damaged as _damaged
from svdtune.errors import SvdtuneError
from svdtune.writing import atomic_write, check_destination, check_not_an_input  # re-exported

CHECKSUM = "checksum"  # the __metadata__ key svdtune adds
MAX_HEADER = 100 * 1024 * 1024  # bytes; larger headers are refused (as safetensors does)


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


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a header is parsed, checked or written.

    A 10 MB header is millions of small objects, none of them garbage; the collector would
    walk all of them again and again (half the time of reading such a file). Reference
    counting still frees everything; the collector is resumed (if it was running) on exit.
    """
    running = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if running:
            gc.enable()


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
    if len(raw) < 8:
        raise _damaged(what, f"it is only {len(raw)} bytes long")
    (size,) = struct.unpack("<Q", raw[:8])
    _check_header_size(size, len(raw), what)
    header = _parse_header(bytes(raw[8:8 + size]), what)
    return _decode_data(header, memoryview(raw)[8 + size:], what, require_checksum)


def read(
    path: str | os.PathLike,
    what: str | None = None,
    require_checksum: bool = True,
    mapped: bool = False,
    check_header: Callable[[dict], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`decode` the file at ``path``, reading its header before any tensor data.

    Only a regular file is opened (a FIFO, device or folder is refused before it is
    opened, so nothing blocks or grows without bound). The header is read and parsed
    first; the data buffer (whose size the file's real size bounds) is then read
    into one private buffer that the tensors share, or, with ``mapped``, memory-mapped
    copy-on-write: the tensors share the file's pages (loaded as they are touched,
    never written back), so a large base checkpoint is not held in memory twice.
    Mapping is for short runs such as `merge_files`: a file rewritten in place while
    mapped can change the tensors or stop the process (SIGBUS).

    Args:
        path: the file.
        what: how to name it in errors (default: its path).
        require_checksum: refuse a file without svdtune's checksum.
        mapped: memory-map the data instead of reading it.
        check_header: called with the parsed header (``__metadata__`` included) before
            any tensor data is read; it raises to refuse the file from its header alone.

    Returns:
        (tensors by name, metadata without the checksum).

    Raises:
        SvdtuneError: a missing, unreadable or non-regular file, or one that is not a
            complete, intact safetensors file (or that ``check_header`` refuses).
    """
    what = what or repr(os.fspath(path))
    with open_regular(path, what) as handle:
        header, start = read_header(handle, what)
        if check_header is not None:
            check_header(header)
        data = _read_data(handle, start, what, mapped)
    return _decode_data(header, data, what, require_checksum)


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """``path`` opened for reading in binary mode, if it is a regular file (symlinks followed).

    The type is checked before opening (opening a FIFO would block, a tape device may
    rewind) and again on the open file, in case ``path`` was replaced in between.

    Raises:
        SvdtuneError: the file is missing or unreadable, or is a FIFO, device, socket or folder.
    """
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is None:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            handle = os.fdopen(descriptor, "rb")
            kind = _not_regular(os.fstat(descriptor).st_mode)
            if kind is not None:
                handle.close()
    except OSError as error:
        raise SvdtuneError(f"cannot read {what}: {error.strerror or error}; check the path.") from None
    if kind is not None:
        raise SvdtuneError(f"{what} is {kind}, not a regular file; pass the path of a file.")
    return handle


def _not_regular(mode: int) -> str | None:
    """What a file of this st_mode is, if not a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_header(handle: BinaryIO, what: str) -> tuple[dict, int]:
    """The parsed JSON header of the safetensors file open as ``handle``, and where its data starts.

    Reads the 8-byte length and the header only: at most ``MAX_HEADER`` bytes, and never
    more than the file holds.

    Raises:
        SvdtuneError: the file is too short, its length field is impossible, or its header
            is not a JSON object.
    """
    file_size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise _damaged(what, f"it is only {len(prefix)} bytes long")
    (size,) = struct.unpack("<Q", prefix)
    _check_header_size(size, file_size, what)
    text = handle.read(size)
    if len(text) < size:
        raise _damaged(what, f"it ends inside its {size}-byte header")
    return _parse_header(text, what), 8 + size


def _check_header_size(size: int, file_size: int, what: str) -> None:
    if size > min(MAX_HEADER, file_size - 8):
        raise _damaged(what, f"its header claims {size} bytes but the file has {file_size - 8} after the length")


def _parse_header(text: bytes, what: str) -> dict:
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as error:
        raise _damaged(what, f"its header is ambiguous: {error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _damaged(what, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(what, "its header is not a JSON object")
    return header


def _read_data(handle: BinaryIO, start: int, what: str, mapped: bool) -> memoryview:
    """The data buffer (the file from ``start`` on), writable: mapped copy-on-write, or read into memory."""
    size = os.fstat(handle.fileno()).st_size - start
    if size <= 0:
        return memoryview(bytearray())
    if mapped:
        with contextlib.suppress(OSError, ValueError):  # e.g. a file system without mmap: read it instead
            return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))[start:]
    data = bytearray(size)
    handle.seek(start)
    if handle.readinto(data) != size:  # a regular file returns all it has
        raise _damaged(what, "it became shorter while it was read")
    return memoryview(data)


def _decode_data(header: dict, data: memoryview, what: str, require_checksum: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Check the header's tensor entries against ``data`` and the checksum, then build the tensors."""
    metadata = header.pop("__metadata__", {})
    if not is_str_map(metadata):
        raise _damaged(what, "its __metadata__ is not a map of strings")
    entries = layout(header, what)
    check_tiling(entries, len(data), what)
    checksum = metadata.pop(CHECKSUM, None)
    if checksum is not None or require_checksum:
        expected = hashlib.sha256(canonical_json({**header, "__metadata__": metadata}))
        expected.update(data)
        if checksum != expected.hexdigest():
            raise _damaged(what, "its checksum does not match its content" if checksum else "it has no svdtune checksum")
    return tensors(entries, data), metadata
