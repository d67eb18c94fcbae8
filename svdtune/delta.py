"""Delta files in memory and on disk: `DeltaFile`, `read_delta`, and the one validator of their content.

A delta file is a checksummed safetensors file (see `svdtune.container` and
docs/format.md): one tensor per adapted layer, keyed by the layer's qualified
module name, holding its k deltas; optionally one tensor per fully trained
parameter, keyed by the parameter's qualified name, and per persistent buffer
of those parameters' modules (format version 2); and a header that says which
base weights the deltas belong to (see `svdtune.fingerprint`).

`from_tensors` is the one validator: reading a file, checking an in-memory
`DeltaFile` and writing one (`DeltaFile.save`) all go through it, so svdtune never
writes a file it would refuse. Its limits are listed in docs/format.md ("Limits").
"""

from __future__ import annotations

import json
import math
import numbers
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from svdtune import container
from svdtune.arguments import as_metadata, as_path
from svdtune.basis import PROBES, Basis
from svdtune.config import MODES, finite_number
from svdtune.errors import SvdtuneError
from svdtune.fingerprint import (  # noqa: F401  (re-exported: svdtune.delta.check_base etc.)
    FLOAT_NAMES, FLOATS, TOP_SIGMA, Fingerprint, check_base, fingerprint, fingerprint_mismatch, weight_sha256,
)

FORMAT = "svdtune.delta"
FORMAT_VERSION = 4  # the newest: 2 adds "buffers", 3 a fingerprint's "basis", 4 "part", "svd" and new layer kinds
READ_VERSIONS = (1, 2, 3, 4)  # each file is written with the lowest version that holds it
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's legacy format: a pickled magic number first
MAX_NAME = 4096  # characters in a layer, parameter, buffer or class name
MAX_ELEMENTS = 2**63 - 1  # a weight_shape's product: torch's limit on a tensor's elements
# Known layer classes and their weights' ndim; any other class name (a user subclass) may have any ndim >= 2.
CLASS_NDIM = {"Linear": 2, "Conv1d": 3, "ConvTranspose1d": 3, "Conv2d": 4, "ConvTranspose2d": 4, "Conv3d": 5,
              "ConvTranspose3d": 5, "Conv1D": 2, "Embedding": 2, "EmbeddingBag": 2, "MultiheadAttention": 2}
VERSION_4_CLASSES = frozenset({"Conv1D", "Embedding", "EmbeddingBag", "MultiheadAttention"})
PARTS = ("q_proj", "k_proj", "v_proj")  # a "part" of a MultiheadAttention (format version 4)
SVD_LIMITS = {"oversample": 10**6, "iterations": 100, "seed": 2**63 - 1}  # a randomized "svd" record's maxima
RECORD_KEYS = frozenset({"class", "weight_shape", "rank", "mode", "scale", "fingerprint"})
VERSION_4_KEYS = frozenset({"part", "svd"})  # optional
REWRITE = "the file is damaged or hand-edited: write it again"


@dataclass(frozen=True)
class LayerDelta:
    """The deltas of one layer and what they were trained on.

    Attributes:
        layer_class: the layer's original class name, e.g. "Linear", "Conv2d".
        weight_shape: the base weight's shape (of the part's matrix, for a ``part``).
        mode: "shift" or "scale" (see `SpectralConfig`).
        scale: the strength the deltas are applied with (1.0 = as trained).
        fingerprint: the base weight's `Fingerprint`.
        delta: (k,) the deltas of the top k singular values, a float tensor.
        part: for a MultiheadAttention, which matrix: "q_proj", "k_proj" or "v_proj"; else None.
        svd: how the basis was computed if not by the exact SVD, e.g. {"method": "randomized",
            "oversample": 10, "iterations": 2, "seed": 0}; None for the exact SVD.
    """

    layer_class: str
    weight_shape: tuple[int, ...]
    mode: str
    scale: float
    fingerprint: Fingerprint
    delta: Tensor = field(repr=False)
    part: str | None = None
    svd: dict[str, object] | None = None

    @property
    def rank(self) -> int:
        """k, the number of tuned singular values."""
        return self.delta.numel()

    @property
    def max_rank(self) -> int:
        """min(m, n) of the weight viewed as a matrix (shape[0], rest)."""
        return min(self.weight_shape[0], math.prod(self.weight_shape[1:]))


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
        tensors, metadata = to_tensors(self)
        from_tensors(tensors, metadata, f"the delta to write to {path!r}", "svdtune does not write such a file")
        chunks = container.encode(tensors, metadata)
        if len(chunks[1]) > container.MAX_HEADER:
            raise SvdtuneError(f"the delta to write to {path!r} needs a {len(chunks[1])}-byte header, over the "
                               f"{container.MAX_HEADER}-byte limit; save fewer or shorter names and metadata.")
        container.atomic_write(path, chunks)


def read_delta(path: str | os.PathLike) -> DeltaFile:
    """Read and verify a delta file without any model.

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
    try:
        tensors, metadata = container.read(path, what)
    except SvdtuneError:
        kind = _other_kind(path)
        if kind is None:  # a damaged svdtune file, or unrecognisable: the container's message says so
            raise
        raise _not_a_delta(what, kind) from None
    return from_tensors(tensors, metadata, what)


def _other_kind(path: str | os.PathLike) -> str | None:
    """What the file at ``path`` is if recognisably another kind of file (e.g. "a torch.save checkpoint"), else None.

    Only its first bytes and its safetensors header (if any) are read.
    """
    try:
        with open(path, "rb") as handle:
            start = handle.read(4096)
            header = _safetensors_header(handle, start)
    except OSError:
        return None
    if start.startswith(ZIP_MAGIC):
        return "a torch.save checkpoint" if _first_zip_member(start).endswith(b"data.pkl") else "a zip archive"
    if start.startswith(b"\x80") and TORCH_LEGACY_MAGIC in start[:32]:  # at byte 2, or 11 after a protocol 4+ frame
        return "a torch.save checkpoint (legacy format)"
    metadata = header.get("__metadata__", {}) if header is not None else None
    if not isinstance(metadata, dict) or metadata.get("format") == FORMAT or container.CHECKSUM in metadata:
        return None  # not safetensors, or written by svdtune and damaged since
    return "a safetensors file without svdtune delta metadata (a plain state dict?)"


def _first_zip_member(start: bytes) -> bytes:
    """The name of the first member of a zip file, from its first local file header (b"" if cut off)."""
    if len(start) < 30:
        return b""
    (length,) = struct.unpack_from("<H", start, 26)
    return start[30:30 + length] if len(start) >= 30 + length else b""


def _safetensors_header(handle, start: bytes) -> dict | None:
    """The JSON header of a safetensors file whose first bytes are ``start``, or None if it has none."""
    if len(start) < 8:
        return None
    (size,) = struct.unpack("<Q", start[:8])
    if size > container.MAX_HEADER:
        return None
    handle.seek(8)
    try:
        header = json.loads(handle.read(size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _not_a_delta(what: str, kind: str) -> SvdtuneError:
    return SvdtuneError(f"{what} is {kind}, not an svdtune delta file; pass the delta file (written by svdtune.save_delta) "
                        "here: did you swap BASE and DELTA?")


def as_delta_file(source: str | os.PathLike | DeltaFile) -> DeltaFile:
    """``source`` read with `read_delta`, or an in-memory `DeltaFile` checked exactly as a file is.

    Raises:
        SvdtuneError: as `read_delta`, naming the layer or entry that is wrong.
    """
    if isinstance(source, DeltaFile):
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
        SvdtuneError: a field of ``delta`` has the wrong type, or two entries share a name.
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
        "layers": _json_text({name: _record(layer) for name, layer in layers.items()}),
        "params": _json_text(sorted(params)),
        "metadata": json.dumps(user, sort_keys=True),
    }
    if version >= 2:
        metadata["buffers"] = _json_text(sorted(buffers))
    tensors = {name: layer.delta.detach() for name, layer in layers.items()}
    tensors.update({name: value.detach() for name, value in {**params, **buffers}.items()})
    return tensors, metadata


def _table(value: object, kind: str, kind_type: type) -> dict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, kind_type) for k, v in value.items()):
        raise SvdtuneError(f"DeltaFile.{kind} must map names (str) to {kind_type.__name__} objects.")
    return dict(value)


def _json_text(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _record(layer: LayerDelta) -> dict:
    fp = layer.fingerprint
    if isinstance(fp, Fingerprint):
        fp_record = {"sha256": fp.sha256, "top_sigma": fp.top_sigma, "dtype": fp.dtype,
                     **({"basis": [_basis_record(b) for b in fp.basis]} if fp.basis else {})}
    else:
        fp_record = fp
    record = {"class": layer.layer_class, "weight_shape": layer.weight_shape, "rank": layer.rank, "mode": layer.mode,
              "scale": layer.scale, "fingerprint": fp_record}
    record.update({key: getattr(layer, key) for key in ("part", "svd") if getattr(layer, key) is not None})
    return _plain(record)


def _basis_record(basis: object) -> object:
    if not isinstance(basis, Basis):
        return basis
    return {"columns": basis.columns, "sha256": basis.sha256, "probes": basis.probes}


def _plain(value: object) -> object:
    """``value`` as JSON holds it: NumPy and Python numbers as int/float, tuples as lists. What JSON cannot
    hold (NaN, infinity, other objects) becomes its repr, a string, which the validator then refuses by name."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = finite_number(value)
        return number if number is not None else repr(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else repr(k): _plain(v) for k, v in value.items()}
    return repr(value)


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
    _check_names([*records, *params, *buffers], bad)
    _check_tensor_names(set(tensors), [*records, *params, *buffers], what)
    layers = {name: _layer(name, record, tensors[name], version, bad) for name, record in records.items()}
    _check_version(layers, version, bad)
    for kind, names in (("parameter", params), ("buffer", buffers)):
        for name in names:
            _check_values(kind, name, tensors[name], bad)
    return DeltaFile(layers, {n: tensors[n] for n in params}, user, metadata.get("svdtune_version", ""),
                     {n: tensors[n] for n in buffers})


def _check_version(layers: dict[str, LayerDelta], version: int, bad) -> None:
    """A file says the version its content needs (older readers would misread it)."""
    for name, layer in layers.items():
        if version < 3 and layer.fingerprint.basis:
            raise bad(f"layer {name!r} records a singular basis, which format version {version} does not have")
        if version < 4 and layer.layer_class in VERSION_4_CLASSES:
            raise bad(f"layer {name!r} is a {layer.layer_class}, a layer kind of format version 4, in a version {version} file")


def _check_values(kind: str, name: str, tensor: Tensor, bad) -> None:
    """Parameters are floats; every float value in a delta file is finite."""
    if kind == "parameter" and tensor.dtype not in FLOATS:
        raise bad(f"parameter {name!r} has dtype {tensor.dtype}, not a float")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise bad(f"{kind} {name!r} holds NaN or infinity")


def _check_names(names: list[str], bad) -> None:
    """Names are what ``named_modules()``/``named_parameters()`` give: dotted parts, printable, bounded."""
    for name in names:
        if not (0 < len(name) <= MAX_NAME and name.isprintable() and name != "__metadata__"
                and "" not in name.split(".")):
            raise bad(f"the name {name[:80]!r} is not a module, parameter or buffer name (non-empty dotted parts "
                      f"of printable characters, at most {MAX_NAME} characters, not '__metadata__')")


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def _repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted(n for n in set(names) if names.count(n) > 1)


def _check_tensor_names(tensors: set[str], names: list[str], what: str) -> None:
    """Every tensor is named exactly once in the header's layers, params and buffers."""
    extra, missing = sorted(tensors - set(names)), sorted(set(names) - tensors)
    twice = _repeated(names)
    if extra or missing or twice:
        raise SvdtuneError(f"{what}: tensor {(extra or missing or twice)[0]!r} does not match the layer/parameter/buffer "
                           "lists of the header; write the file again.")


def _json(metadata: dict[str, str], key: str, bad):
    try:
        return json.loads(metadata.get(key, ""), object_pairs_hook=container.unique_keys)
    except container.DuplicateKeyError as error:
        raise bad(f"header entry {key!r} is ambiguous: {error}") from None
    except (ValueError, RecursionError):  # also an integer of more than 4300 digits
        raise bad(f"header entry {key!r} is missing or not JSON") from None


def _layer(name: str, record: object, delta: Tensor, version: int, bad) -> LayerDelta:
    def wrong(why: str) -> SvdtuneError:
        return bad(f"layer {name!r} {why}")

    keys = RECORD_KEYS | (VERSION_4_KEYS if version >= 4 else frozenset())
    if not isinstance(record, dict) or not RECORD_KEYS <= set(record) <= keys:
        raise wrong(f"has a malformed record (the keys are {sorted(RECORD_KEYS)}"
                    f"{', and optionally part and svd' if version >= 4 else ''})")
    cls, shape, rank, scale, fp = (record[k] for k in ("class", "weight_shape", "rank", "scale", "fingerprint"))
    if not (isinstance(cls, str) and cls.isidentifier() and len(cls) <= MAX_NAME):
        raise wrong(f"has class {cls!r:.80}, not a Python class name")
    if not _valid_shape(shape):
        raise wrong(f"has an invalid weight shape {shape!r:.120}")
    if CLASS_NDIM.get(cls, len(shape)) != len(shape):
        raise wrong(f"is a {cls} with a {len(shape)}-D weight shape {shape}, but a {cls} weight has {CLASS_NDIM[cls]} dimensions")
    if not (_positive(rank) and rank <= min(shape[0], math.prod(shape[1:]))):
        raise wrong(f"has rank {rank!r:.40}, impossible for a weight of shape {shape}")
    if record["mode"] not in MODES:
        raise wrong(f"has mode {record['mode']!r:.40}, which svdtune does not know (one of {MODES})")
    if finite_number(scale) is None:
        raise wrong(f"has scale {scale!r:.40}, not a finite number")
    if delta.dtype not in FLOATS or tuple(delta.shape) != (rank,):
        raise wrong(f"has a delta tensor of shape {tuple(delta.shape)} and dtype {delta.dtype}, expected ({rank},) float")
    if not bool(torch.isfinite(delta).all()):
        raise wrong("has non-finite deltas (NaN or infinity)")
    part, svd = _part(name, record, cls, wrong), _svd(record, wrong)
    return LayerDelta(cls, tuple(shape), record["mode"], float(scale), _fingerprint(fp, rank, wrong), delta, part, svd)


def _valid_shape(shape: object) -> bool:
    return (isinstance(shape, list) and 2 <= len(shape) <= container.MAX_DIMS and all(_positive(s) for s in shape)
            and math.prod(shape) <= MAX_ELEMENTS)


def _part(name: str, record: dict, cls: str, wrong) -> str | None:
    """A MultiheadAttention record names its part, and is keyed "<module name>.<part>"; no other record has one."""
    part = record.get("part")
    if cls != "MultiheadAttention" and "part" not in record:
        return None
    if cls != "MultiheadAttention" or part not in PARTS or not name.endswith(f".{part}"):
        raise wrong(f"has part {part!r:.40} and class {cls}: a part, one of {PARTS}, belongs to a MultiheadAttention "
                    "record keyed '<module name>.<part>'")
    return part


def _svd(record: dict, wrong) -> dict[str, object] | None:
    if "svd" not in record:
        return None
    svd = record["svd"]
    valid = (isinstance(svd, dict) and set(svd) == {"method", *SVD_LIMITS} and svd["method"] == "randomized"
             and all(_natural(svd[key]) and svd[key] <= limit for key, limit in SVD_LIMITS.items()))
    if not valid:
        raise wrong(f"has an invalid svd record {svd!r:.120} (expected method 'randomized' and integers "
                    + ", ".join(f"0 <= {key} <= {limit}" for key, limit in SVD_LIMITS.items()) + ")")
    return dict(svd)


def _positive(value: object) -> bool:
    return _natural(value) and value >= 1


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fingerprint(fp: object, rank: int, wrong) -> Fingerprint:
    if not isinstance(fp, dict) or set(fp) - {"basis"} != {"sha256", "top_sigma", "dtype"}:
        raise wrong("has a malformed fingerprint")
    sha, top, dtype = fp["sha256"], fp["top_sigma"], fp["dtype"]
    numbers_ok = isinstance(top, list) and len(top) <= TOP_SIGMA and all(finite_number(s) is not None and s >= 0 for s in top)
    if not (numbers_ok and all(a >= b for a, b in zip(top, top[1:]))):
        raise wrong(f"has a fingerprint whose top_sigma {top!r:.120} is not up to {TOP_SIGMA} descending finite numbers >= 0")
    if not (_is_sha256(sha) and isinstance(dtype, str) and dtype in FLOAT_NAMES):
        raise wrong("has a malformed fingerprint (sha256 or dtype)")
    runs = fp.get("basis", [])
    if "basis" in fp and not (isinstance(runs, list) and runs):
        raise wrong("has a malformed fingerprint basis")
    basis = tuple(_basis(run, rank, wrong) for run in runs)
    columns = [c for run in basis for c in run.columns]
    if any(a >= b for a, b in zip(columns, columns[1:])):
        raise wrong(f"has fingerprint basis runs that overlap or are out of order ({[list(run.columns) for run in basis]})")
    return Fingerprint(sha, tuple(float(s) for s in top), dtype, basis)


def _basis(basis: object, rank: int, wrong) -> Basis:
    fields = isinstance(basis, dict) and set(basis) == {"columns", "sha256", "probes"}
    columns, probes = (basis.get("columns"), basis.get("probes")) if fields else (None, None)
    if not (isinstance(columns, list) and columns and all(_natural(c) for c in columns) and isinstance(probes, list)):
        raise wrong("has a malformed fingerprint basis")
    consecutive = all(b == a + 1 for a, b in zip(columns, columns[1:]))
    if not consecutive or columns[-1] >= rank or not _is_sha256(basis["sha256"]):
        raise wrong(f"has a fingerprint basis with columns {columns!r:.80} not consecutive below rank {rank}, or a bad hash")
    if len(probes) != 2 * PROBES * len(columns) or not all(finite_number(p) is not None for p in probes):
        raise wrong(f"has a fingerprint basis whose probes are not {2 * PROBES * len(columns)} finite numbers")
    return Basis(tuple(columns), basis["sha256"], tuple(float(p) for p in probes))


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
