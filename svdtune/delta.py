"""Delta files in memory and on disk: `DeltaFile`, `read_delta`, and the one validator of their content.

A delta file is a checksummed safetensors file (see `svdtune.container` and
docs/format.md): one tensor per adapted layer, keyed by the layer's qualified
module name, holding its k deltas; optionally one tensor per fully trained
parameter, keyed by the parameter's qualified name, and per persistent buffer
of those parameters' modules (format version 2); and a header that says which
base weights the deltas belong to (see `svdtune.fingerprint`); each layer's
record and its rules are in `svdtune.records`.

`from_tensors` is the one validator: reading a file, checking an in-memory
`DeltaFile` and writing one (`DeltaFile.save`) all go through it, so svdtune never
writes a file it would refuse. Its limits are listed in docs/format.md ("Limits").
"""

from __future__ import annotations

import collections
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter

import torch
from torch import Tensor

from svdtune import container
from svdtune.arguments import as_metadata, as_path
from svdtune.errors import SvdtuneError
from svdtune.fingerprint import (  # noqa: F401  (re-exported: svdtune.delta.check_base etc.)
    FLOATS, TOP_SIGMA, Fingerprint, check_base, fingerprint, fingerprint_mismatch, weight_sha256,
)
from svdtune.values import all_finite
from svdtune.records import MAX_NAME, VERSION_4_CLASSES, LayerDelta, layer_from_record, record_of

FORMAT = "svdtune.delta"
FORMAT_VERSION = 4  # the newest: 2 adds "buffers", 3 a fingerprint's "basis", 4 "part", "svd" and new layer kinds
READ_VERSIONS = (1, 2, 3, 4)  # each file is written with the lowest version that holds it
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's legacy format: a pickled magic number first
REWRITE = "the file is damaged or hand-edited: write it again"


@dataclass(frozen=True)
class DeltaFile:
    """The content of a delta file (what `read_delta` returns and `combine` builds).

    Attributes:
        layers: {qualified layer name: LayerDelta}, in file order.
        params: {qualified parameter name: tensor} of fully trained parameters.
        metadata: the user's metadata (str -> str).
        svdtune_version: the svdtune version that wrote it.
        buffers: {qualified buffer name: tensor}, the persistent buffers of the modules
            whose parameters are in ``params`` (e.g. BatchNorm running statistics).
    """

    layers: dict[str, LayerDelta]
    params: dict[str, Tensor] = field(default_factory=dict, repr=False)
    metadata: dict[str, str] = field(default_factory=dict)
    svdtune_version: str = ""
    buffers: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write this delta to ``path`` (atomically: the old file or the new one, never half).

        The content is checked first by the same rules `read_delta` applies, so the file
        written always reads back.

        Raises:
            SvdtuneError: ``path`` does not end with ``.safetensors``, or the content breaks a
                rule of the format (a non-finite delta or scale, an unknown mode, a rank larger
                than the layer, a layer and a parameter sharing a name, metadata not str -> str...).
            OSError: the file cannot be written (e.g. its folder does not exist).

        Example:
            >>> svdtune.combine(["a.safetensors", "b.safetensors"], [0.5, 0.5]).save("ab.safetensors")
        """
        path = as_path(path, "path")
        container.check_destination(path)
        with container.paused_gc():
            tensors, metadata = to_tensors(self)
            from_tensors(tensors, metadata, f"the delta to write to {path!r}", "svdtune does not write such a file")
            chunks = container.encode(tensors, metadata)
        if len(chunks[1]) > container.MAX_HEADER:
            raise SvdtuneError(f"the delta to write to {path!r} needs a {len(chunks[1])}-byte header, over the "
                               f"{container.MAX_HEADER}-byte limit; save fewer or shorter names and metadata.")
        container.atomic_write(path, chunks)


def read_delta(path: str | os.PathLike) -> DeltaFile:
    """Read and verify a delta file without any model.

    The header is read first: a file that is not a delta (a checkpoint, a plain
    safetensors state dict) is refused from its first bytes and header alone, without
    reading its data. Only a regular file is opened (not a FIFO, device or folder).

    Args:
        path: a file written by `save_delta` or `DeltaFile.save`.

    Returns:
        The `DeltaFile`.

    Raises:
        SvdtuneError: the file is missing, truncated, corrupted, not safetensors,
            not an svdtune delta, from a newer format version, or inconsistent.

    Example:
        >>> delta = svdtune.read_delta("task.safetensors")
        >>> {name: layer.rank for name, layer in delta.layers.items()}
    """
    path = as_path(path, "the delta file path")  # never an int: open(5) would read file descriptor 5
    what = repr(path)
    parsed = []

    def refuse_other_kinds(header: dict) -> None:
        parsed.append(True)
        kind = _header_kind(header)
        if kind is not None:
            raise _not_a_delta(what, kind)

    with container.paused_gc():
        try:
            tensors, metadata = container.read(path, what, check_header=refuse_other_kinds)
        except SvdtuneError:
            kind = None if parsed else _other_kind(path)  # no safetensors header: a checkpoint?
            if kind is None:  # a damaged svdtune file, or unrecognisable: the container's message says so
                raise
            raise _not_a_delta(what, kind) from None
        return from_tensors(tensors, metadata, what)


def _other_kind(path: str | os.PathLike) -> str | None:
    """What the file at ``path`` is if recognisably another kind of file (e.g. "a torch.save checkpoint"), else None.

    Only its first bytes and its safetensors header (if any) are read, from a regular file.
    """
    try:
        with container.open_regular(path, repr(os.fspath(path))) as handle:
            start = handle.read(4096)
            header = _safetensors_header(handle, start)
    except (SvdtuneError, OSError):
        return None
    if start.startswith(ZIP_MAGIC):
        return "a torch.save checkpoint" if _first_zip_member(start).endswith(b"data.pkl") else "a zip archive"
    if start.startswith(b"\x80") and TORCH_LEGACY_MAGIC in start[:32]:  # at byte 2, or 11 after a protocol 4+ frame
        return "a torch.save checkpoint (legacy format)"
    return None if header is None else _header_kind(header)


def _header_kind(header: dict) -> str | None:
    """What a file with this safetensors header is if recognisably not an svdtune file, else None."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or metadata.get("format") == FORMAT or container.CHECKSUM in metadata:
        return None  # malformed, or written by svdtune (and maybe damaged since): checked in full
    return "a safetensors file without svdtune delta metadata (a plain state dict?)"


def _first_zip_member(start: bytes) -> bytes:
    """The name of the first member of a zip file, from its first local file header (b"" if cut off)."""
    if len(start) < 30:
        return b""
    (length,) = struct.unpack_from("<H", start, 26)
    return start[30:30 + length] if len(start) >= 30 + length else b""


def _safetensors_header(handle, start: bytes) -> dict | None:
    """The JSON header of the safetensors file open as ``handle`` (first bytes ``start``), or None if it has none."""
    if len(start) < 8:
        return None
    try:
        return container.read_header(handle, "")[0]
    except SvdtuneError:
        return None


def _not_a_delta(what: str, kind: str) -> SvdtuneError:
    return SvdtuneError(f"{what} is {kind}, not an svdtune delta file; pass the delta file (written by svdtune.save_delta) "
                        "here: did you swap BASE and DELTA?")


def as_delta_file(source: str | os.PathLike | DeltaFile) -> DeltaFile:
    """``source`` read with `read_delta`, or an in-memory `DeltaFile` checked exactly as a file is.

    Raises:
        SvdtuneError: as `read_delta`, naming the layer or entry that is wrong.
    """
    if isinstance(source, DeltaFile):
        with container.paused_gc():
            return from_tensors(*to_tensors(source), "the in-memory DeltaFile", "fix the DeltaFile")
    return read_delta(source)


def format_version(delta: DeltaFile) -> int:
    """The lowest version that holds ``delta``, so that older svdtune reads what it can."""
    layers = delta.layers.values()
    if any(layer.part is not None or layer.svd is not None or layer.layer_class in VERSION_4_CLASSES
           for layer in layers if isinstance(layer.layer_class, str)):
        return 4
    if any(isinstance(layer.fingerprint, Fingerprint) and layer.fingerprint.basis for layer in layers):
        return 3
    return 2 if delta.buffers else 1


def to_tensors(delta: DeltaFile) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The (tensors, metadata) that represent ``delta`` in a file (unchecked: see `from_tensors`).

    Raises:
        SvdtuneError: a field of ``delta`` has the wrong type, two entries share a name, or a tensor has
            no values to write (meta device, sparse).
    """
    layers, params, buffers = (_table(getattr(delta, kind), kind, kind_type)
                               for kind, kind_type in (("layers", LayerDelta), ("params", Tensor), ("buffers", Tensor)))
    for name, layer in layers.items():
        if not isinstance(layer.delta, Tensor):
            raise SvdtuneError(f"layer {name!r}: LayerDelta.delta must be a tensor, got {type(layer.delta).__name__}.")
    clash = _repeated([*layers, *params, *buffers])
    if clash:
        raise SvdtuneError(f"{clash[0]!r} names two of a layer, a parameter and a buffer; a delta file needs distinct keys.")
    user = as_metadata(delta.metadata)
    version = format_version(delta)
    from svdtune import __version__

    metadata = {
        "format": FORMAT,
        "format_version": str(version),
        "svdtune_version": delta.svdtune_version if isinstance(delta.svdtune_version, str) and delta.svdtune_version
        else __version__,
        "layers": _json_text({name: record_of(layer) for name, layer in layers.items()}),
        "params": _json_text(sorted(params)),
        "metadata": json.dumps(user, sort_keys=True),
    }
    if version >= 2:
        metadata["buffers"] = _json_text(sorted(buffers))
    tensors = {name: layer.delta.detach() for name, layer in layers.items()}
    tensors.update({name: value.detach() for name, value in {**params, **buffers}.items()})
    blank = next((name for name, tensor in tensors.items() if tensor.layout != torch.strided or tensor.is_meta), None)
    if blank is not None:
        raise SvdtuneError(f"{blank!r} is a {tensors[blank].layout} tensor on the {tensors[blank].device.type} device; "
                           "a delta file holds dense tensors with values: materialize it (or .to_dense()) first.")
    return tensors, metadata


def _table(value: object, kind: str, kind_type: type) -> dict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, kind_type) for k, v in value.items()):
        raise SvdtuneError(f"DeltaFile.{kind} must map names (str) to {kind_type.__name__} objects.")
    return dict(value)


def _json_text(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def from_tensors(tensors: dict[str, Tensor], metadata: dict[str, str], what: str, fix: str = REWRITE) -> DeltaFile:
    """The one validator: check the content of a delta file (read or to be written) and build its `DeltaFile`.

    Args:
        tensors: name -> tensor, as decoded from the file (or to be encoded).
        metadata: the ``__metadata__`` strings.
        what: how to name the file in messages.
        fix: what the user should do, ending each message.

    Raises:
        SvdtuneError: naming the layer or entry that is wrong.
    """
    def bad(why: str) -> SvdtuneError:
        return SvdtuneError(f"{what}: {why}; {fix}.")

    if metadata.get("format") != FORMAT:
        raise _not_a_delta(what, f"a safetensors file (format={metadata.get('format')!r:.80})")
    version = metadata.get("format_version", "")
    if version not in {str(v) for v in READ_VERSIONS}:  # "03", "³" or "1e3" are not versions
        raise SvdtuneError(f"{what} uses delta format version {version!r:.40} (svdtune {metadata.get('svdtune_version', '?')!r:.40}); "
                           f"this svdtune reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}: "
                           "install the svdtune version that wrote it.")
    version = int(version)
    records, params, user = (_json(metadata, key, bad) for key in ("layers", "params", "metadata"))
    buffers = _json(metadata, "buffers", bad) if version >= 2 else []  # version 1 has no buffers
    if not isinstance(records, dict) or not _names(params) or not _names(buffers) or not isinstance(user, dict):
        raise bad("it has malformed layers/params/buffers/metadata entries")
    if not container.is_str_map(user):
        raise bad("it has user metadata that is not str -> str")
    names = [*records, *params, *buffers]
    _check_names(names, bad)
    _check_tensor_names(set(tensors), names, what)
    layers = {name: layer_from_record(name, record, tensors[name], version, bad) for name, record in records.items()}
    _check_version(layers, version, bad)
    trained = {kind: dict(zip(listed, map(tensors.__getitem__, listed)))
               for kind, listed in (("parameter", params), ("buffer", buffers))}
    for kind, values in trained.items():
        _check_all_values(kind, values, bad)
    return DeltaFile(layers, trained["parameter"], user, metadata.get("svdtune_version", ""), trained["buffer"])


def _check_version(layers: dict[str, LayerDelta], version: int, bad) -> None:
    """A file says the version its content needs (older readers would misread it)."""
    for name, layer in layers.items():
        if version < 3 and layer.fingerprint.basis:
            raise bad(f"layer {name!r} records a singular basis, which format version {version} does not have")
        if version < 4 and layer.layer_class in VERSION_4_CLASSES:
            raise bad(f"layer {name!r} is a {layer.layer_class}, a layer kind of format version 4, in a version {version} file")


def _check_all_values(kind: str, values: dict[str, Tensor], bad) -> None:
    """`_check_values` for every tensor of ``values``: the dtypes in one pass, the values of the tensors that
    have any (a file can hold very many zero-size buffers); tensor by tensor only to name the first one wrong."""
    tensors = values.values()
    floats = kind != "parameter" or set(map(attrgetter("dtype"), tensors)) <= _FLOATS
    sized = [tensor for tensor in compress(tensors, map(Tensor.numel, tensors)) if tensor.is_floating_point()]
    if floats and all(map(all_finite, sized)):
        return
    for name, tensor in values.items():
        _check_values(kind, name, tensor, bad)


_FLOATS = set(FLOATS)


def _check_values(kind: str, name: str, tensor: Tensor, bad) -> None:
    """Parameters are floats; every float value in a delta file is finite."""
    if kind == "parameter" and tensor.dtype not in FLOATS:
        raise bad(f"parameter {name!r} has dtype {tensor.dtype}, not a float")
    if not all_finite(tensor):
        raise bad(f"{kind} {name!r} holds NaN or infinity")


def _check_names(names: list[str], bad) -> None:
    """Names are what ``named_modules()``/``named_parameters()`` give: dotted parts, printable, bounded."""
    if not names or _all_valid_names(names):
        return
    for name in names:  # find the first invalid name, for the message
        if not (0 < len(name) <= MAX_NAME and name.isprintable() and name != "__metadata__"
                and "" not in name.split(".")):
            raise bad(f"the name {name[:80]!r} is not a module, parameter or buffer name (non-empty dotted parts "
                      f"of printable characters, at most {MAX_NAME} characters, not '__metadata__')")


def _all_valid_names(names: list[str]) -> bool:
    """The per-name rules of `_check_names` for all names at once, in C: a character is printable
    wherever it stands, and joined with "\n" (never printable), an empty dotted part shows as "..",
    ".\n", "\n." or a "." at either end."""
    joined = "\n".join(names)
    return (0 < min(map(len, names)) and max(map(len, names)) <= MAX_NAME and "".join(names).isprintable()
            and "__metadata__" not in names and ".." not in joined and ".\n" not in joined and "\n." not in joined
            and not joined.startswith(".") and not joined.endswith("."))


def _names(value: object) -> bool:
    return isinstance(value, list) and (set(map(type, value)) <= _STR or all(isinstance(n, str) for n in value))


_STR = {str}  # the item types of a list of plain strings


def _repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted (linear in the names, plus sorting the repeats)."""
    return sorted(name for name, count in collections.Counter(names).items() if count > 1)


def _check_tensor_names(tensors: set[str], names: list[str], what: str) -> None:
    """Every tensor is named exactly once in the header's layers, params and buffers (linear time)."""
    listed = set(names)
    extra, missing = tensors - listed, listed - tensors
    wrong = extra or missing or (_repeated(names) if len(listed) != len(names) else ())
    if wrong:
        raise SvdtuneError(f"{what}: tensor {min(wrong)!r} does not match the layer/parameter/buffer "
                           "lists of the header; write the file again.")


def _json(metadata: dict[str, str], key: str, bad):
    try:
        return json.loads(metadata.get(key, ""), object_pairs_hook=container.unique_keys)
    except container.DuplicateKeyError as error:
        raise bad(f"header entry {key!r} is ambiguous: {error}") from None
    except (ValueError, RecursionError):  # also an integer of more than 4300 digits
        raise bad(f"header entry {key!r} is missing or not JSON") from None
