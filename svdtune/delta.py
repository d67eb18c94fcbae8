"""Delta files in memory and on disk: `DeltaFile`, `read_delta`, base-weight fingerprints.

A delta file is a checksummed safetensors file (see `svdtune.container` and
docs/format.md): one tensor per adapted layer, keyed by the layer's qualified
module name, holding its k deltas; optionally one tensor per fully trained
parameter, keyed by the parameter's qualified name, and per persistent buffer
of those parameters' modules (format version 2); and a header that says which
base weights the deltas belong to.

Fingerprint rule: a base weight is identified by the SHA-256 of its values
converted to float32 (little-endian, C order) and by its top singular values.
Moving a model to another device, or to a wider dtype (bf16/fp16 -> fp32 -> fp64),
keeps the hash. If the hash differs *and* the weight's dtype differs from the one
recorded (e.g. fp32 -> fp16), the weights match when each recorded top singular
value is within 4 * eps(coarser dtype) * sigma_max of the current one.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from svdtune import container
from svdtune.basis import PROBES, Basis
from svdtune.config import MODES, finite_number
from svdtune.errors import SvdtuneError

FORMAT = "svdtune.delta"
FORMAT_VERSION = 3  # the newest: 2 adds "buffers", 3 a fingerprint's "basis"; each file gets the lowest it needs
READ_VERSIONS = (1, 2, 3)
TOP_SIGMA = 4  # singular values kept in a fingerprint
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's legacy format: a pickled magic number first
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the base weight a delta was trained on.

    Attributes:
        sha256: hex SHA-256 of the weight converted to float32, little-endian, C order.
        top_sigma: its largest singular values (up to 4), descending.
        dtype: the weight's dtype when it was fingerprinted, e.g. "float32".
        basis: the training SVD's vectors where the result depends on them, one `Basis` per run
            of repeated singular values (ascending, disjoint); empty if there are none.
    """

    sha256: str
    top_sigma: tuple[float, ...]
    dtype: str
    basis: tuple[Basis, ...] = ()


@dataclass(frozen=True)
class LayerDelta:
    """The deltas of one layer and what they were trained on.

    Attributes:
        layer_class: the layer's original class name, e.g. "Linear", "Conv2d".
        weight_shape: the base weight's shape.
        mode: "shift" or "scale" (see `SpectralConfig`).
        scale: the strength the deltas are applied with (1.0 = as trained).
        fingerprint: the base weight's `Fingerprint`.
        delta: (k,) the deltas of the top k singular values, a float tensor.
    """

    layer_class: str
    weight_shape: tuple[int, ...]
    mode: str
    scale: float
    fingerprint: Fingerprint
    delta: Tensor = field(repr=False)

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

        Raises:
            SvdtuneError: ``path`` does not end with ``.safetensors``, a layer and a parameter
                share a name, or metadata is not str -> str.
            OSError: the file cannot be written (e.g. its folder does not exist).

        Example:
            >>> svdtune.combine(["a.safetensors", "b.safetensors"], [0.5, 0.5]).save("ab.safetensors")
        """
        container.check_destination(path)
        container.atomic_write(path, container.encode(*to_tensors(self)))


def weight_sha256(weight: Tensor) -> str:
    """Hex SHA-256 of ``weight`` as float32 bytes (device- and upcast-independent)."""
    return hashlib.sha256(container.tensor_bytes(weight.detach().to(torch.float32))).hexdigest()


def fingerprint(weight: Tensor, sigma: Tensor) -> Fingerprint:
    """The Fingerprint of a base weight, given its (top) singular values."""
    top = tuple(float(s) for s in sigma[:TOP_SIGMA].to(torch.float32).tolist())
    return Fingerprint(weight_sha256(weight), top, str(weight.dtype).removeprefix("torch."))


def fingerprint_mismatch(expected: Fingerprint, weight: Tensor, top_sigma) -> str | None:
    """Why ``weight`` is not the base weight of ``expected``, or None if it is.

    Args:
        expected: the recorded fingerprint.
        weight: the candidate base weight.
        top_sigma: a callable returning its descending singular values (called only
            when the dtype differs and the hash cannot decide).
    """
    digest = weight_sha256(weight)
    if digest == expected.sha256:
        return None
    now = str(weight.dtype).removeprefix("torch.")
    reason = f"its base weight differs from the one the delta was trained on (sha256 {digest[:12]} != {expected.sha256[:12]})"
    if now == expected.dtype or not expected.top_sigma:
        return reason
    sigma = top_sigma()[: len(expected.top_sigma)].to(torch.float64).cpu()
    recorded = torch.tensor(expected.top_sigma, dtype=torch.float64)
    eps = max(_eps(now), _eps(expected.dtype))
    if sigma.shape == recorded.shape and bool(((sigma - recorded).abs() <= 4 * eps * recorded[0]).all()):
        return None
    return f"{reason}, and its top singular values differ beyond {expected.dtype}->{now} rounding"


def check_base(name: str, expected: Fingerprint, weight: Tensor, top_sigma: Callable[[], Tensor], strict: bool,
               use: str, action: str) -> None:
    """Raise (strict) or warn if ``weight`` is not the base weight the layer's delta was trained on.

    Args:
        name: the layer, for the message.
        expected: the fingerprint recorded in the delta file.
        weight: the candidate base weight.
        top_sigma: a callable returning its descending singular values, called only when
            the hash cannot decide alone (the dtype differs): so a wrong base costs no SVD.
        strict: raise SvdtuneError; else warn and go on.
        use: what to do instead, e.g. "load the delta into the base model it was trained on".
        action: what strict=False goes on with, e.g. "loading".
    """
    reason = fingerprint_mismatch(expected, weight, top_sigma)
    if reason is None:
        return
    if strict:
        raise SvdtuneError(f"layer {name!r}: {reason}; {use}, or pass strict=False to go on anyway.")
    warnings.warn(f"layer {name!r}: {reason}; {action} anyway (strict=False).", UserWarning, stacklevel=4)


def _eps(dtype_name: str) -> float:
    dtype = {str(d).removeprefix("torch."): d for d in FLOATS}.get(dtype_name, torch.float32)
    return torch.finfo(dtype).eps


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
    what, parsed = repr(os.fspath(path)), []

    def refuse_other_kinds(header: dict) -> None:
        parsed.append(True)
        kind = _header_kind(header)
        if kind is not None:
            raise _not_a_delta(what, kind)

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
        return from_tensors(*to_tensors(source), "the in-memory DeltaFile")
    return read_delta(source)


def format_version(delta: DeltaFile) -> int:
    """The lowest version that holds ``delta``, so that older svdtune reads what it can."""
    if any(layer.fingerprint.basis for layer in delta.layers.values()):
        return 3
    return 2 if delta.buffers else 1


def to_tensors(delta: DeltaFile) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The (tensors, metadata) that represent ``delta`` in a file."""
    clash = _repeated([*delta.layers, *delta.params, *delta.buffers])
    if clash:
        raise SvdtuneError(f"{clash[0]!r} names two of a layer, a parameter and a buffer; a delta file needs distinct keys.")
    container.check_metadata(delta.metadata)
    records = {name: _record(layer) for name, layer in delta.layers.items()}
    from svdtune import __version__

    metadata = {
        "format": FORMAT,
        "format_version": str(format_version(delta)),
        "svdtune_version": delta.svdtune_version or __version__,
        "layers": json.dumps(records, separators=(",", ":")),
        "params": json.dumps(sorted(delta.params)),
        "metadata": json.dumps(dict(delta.metadata), sort_keys=True),
    }
    if int(metadata["format_version"]) >= 2:
        metadata["buffers"] = json.dumps(sorted(delta.buffers))
    tensors = {name: layer.delta.detach() for name, layer in delta.layers.items()}
    tensors.update({name: value.detach() for name, value in {**delta.params, **delta.buffers}.items()})
    return tensors, metadata


def _record(layer: LayerDelta) -> dict:
    fp = layer.fingerprint
    return {
        "class": layer.layer_class,
        "weight_shape": list(layer.weight_shape),
        "rank": layer.rank,
        "mode": layer.mode,
        "scale": float(layer.scale),
        "fingerprint": {"sha256": fp.sha256, "top_sigma": list(fp.top_sigma), "dtype": fp.dtype,
                        **({"basis": [_basis_record(b) for b in fp.basis]} if fp.basis else {})},
    }


def _basis_record(basis: Basis) -> dict:
    return {"columns": list(basis.columns), "sha256": basis.sha256, "probes": list(basis.probes)}


def from_tensors(tensors: dict[str, Tensor], metadata: dict[str, str], what: str) -> DeltaFile:
    """Check the content of a decoded file and build its `DeltaFile`.

    Raises:
        SvdtuneError: naming the layer or entry that is wrong.
    """
    if metadata.get("format") != FORMAT:
        raise _not_a_delta(what, f"a safetensors file (format={metadata.get('format')!r})")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) not in READ_VERSIONS:
        raise SvdtuneError(f"{what} uses delta format version {version!r} (svdtune {metadata.get('svdtune_version', '?')}); "
                           f"this svdtune reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}: "
                           "install the svdtune version that wrote it.")
    records, params, user = (_json(metadata, key, what) for key in ("layers", "params", "metadata"))
    buffers = _json(metadata, "buffers", what) if int(version) >= 2 else []  # version 1 has no buffers
    if not isinstance(records, dict) or not _names(params) or not _names(buffers) or not isinstance(user, dict):
        raise SvdtuneError(f"{what} has malformed layers/params/buffers/metadata entries; write the file again.")
    if not container.is_str_map(user):
        raise SvdtuneError(f"{what} has user metadata that is not str -> str; write the file again.")
    _check_tensor_names(set(tensors), [*records, *params, *buffers], what)
    layers = {name: _layer(name, record, tensors[name], what) for name, record in records.items()}
    if int(version) < 3 and any(layer.fingerprint.basis for layer in layers.values()):
        raise SvdtuneError(f"{what} records a singular basis, which format version {version} does not have; write the file again.")
    for name in params:
        if tensors[name].dtype not in FLOATS:
            raise SvdtuneError(f"{what}: parameter {name!r} has dtype {tensors[name].dtype}, not a float; write the file again.")
    return DeltaFile(layers, {n: tensors[n] for n in params}, user, metadata.get("svdtune_version", ""),
                     {n: tensors[n] for n in buffers})


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


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


def _json(metadata: dict[str, str], key: str, what: str):
    try:
        return json.loads(metadata.get(key, ""))
    except (ValueError, RecursionError):
        raise SvdtuneError(f"{what}: header entry {key!r} is missing or not JSON; write the file again.") from None


def _layer(name: str, record: object, delta: Tensor, what: str) -> LayerDelta:
    def bad(why: str) -> SvdtuneError:
        return SvdtuneError(f"{what}: layer {name!r} {why}; the file is damaged or hand-edited: write it again.")

    keys = {"class", "weight_shape", "rank", "mode", "scale", "fingerprint"}
    if not isinstance(record, dict) or set(record) != keys:
        raise bad(f"has a malformed record (expected the keys {sorted(keys)})")
    shape, rank, scale, fp = record["weight_shape"], record["rank"], record["scale"], record["fingerprint"]
    if not (isinstance(shape, list) and len(shape) >= 2 and all(_positive(s) for s in shape)):
        raise bad(f"has an invalid weight shape {shape!r}")
    if not (_positive(rank) and rank <= min(shape[0], math.prod(shape[1:]))):
        raise bad(f"has rank {rank!r}, impossible for a weight of shape {shape}")
    if record["mode"] not in MODES or not isinstance(record["class"], str):
        raise bad(f"has mode {record['mode']!r} or class {record['class']!r}, which svdtune does not know")
    if finite_number(scale) is None:
        raise bad(f"has scale {scale!r}, not a finite number")
    if delta.dtype not in FLOATS or tuple(delta.shape) != (rank,):
        raise bad(f"has a delta tensor of shape {tuple(delta.shape)} and dtype {delta.dtype}, expected ({rank},) float")
    if not bool(torch.isfinite(delta).all()):
        raise bad("has non-finite deltas (NaN or infinity)")
    return LayerDelta(record["class"], tuple(shape), record["mode"], float(scale), _fingerprint(fp, rank, bad), delta)


def _positive(value: object) -> bool:
    return _natural(value) and value >= 1


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fingerprint(fp: object, rank: int, bad) -> Fingerprint:
    if not isinstance(fp, dict) or set(fp) - {"basis"} != {"sha256", "top_sigma", "dtype"}:
        raise bad("has a malformed fingerprint")
    sha, top, dtype = fp["sha256"], fp["top_sigma"], fp["dtype"]
    valid_top = isinstance(top, list) and len(top) <= TOP_SIGMA and all(finite_number(s) is not None and s >= 0 for s in top)
    if not (_is_sha256(sha) and valid_top and dtype in {str(d).removeprefix("torch.") for d in FLOATS}):
        raise bad("has a malformed fingerprint")
    runs = fp.get("basis", [])
    if "basis" in fp and not (isinstance(runs, list) and runs):
        raise bad("has a malformed fingerprint basis")
    basis = tuple(_basis(run, rank, bad) for run in runs)
    columns = [c for run in basis for c in run.columns]
    if columns != sorted(set(columns)):
        raise bad(f"has fingerprint basis runs that overlap or are out of order ({[list(run.columns) for run in basis]})")
    return Fingerprint(sha, tuple(float(s) for s in top), dtype, basis)


def _basis(basis: object, rank: int, bad) -> Basis:
    fields = isinstance(basis, dict) and set(basis) == {"columns", "sha256", "probes"}
    columns, probes = (basis.get("columns"), basis.get("probes")) if fields else (None, None)
    if not (isinstance(columns, list) and columns and all(_natural(c) for c in columns) and isinstance(probes, list)):
        raise bad("has a malformed fingerprint basis")
    consecutive = columns == list(range(columns[0], columns[0] + len(columns)))
    if not consecutive or columns[-1] >= rank or not _is_sha256(basis["sha256"]):
        raise bad(f"has a fingerprint basis with columns {columns} not consecutive below rank {rank}, or a bad hash")
    if not all(finite_number(p) is not None for p in probes) or len(probes) != 2 * PROBES * len(columns):
        raise bad(f"has a fingerprint basis whose probes are not {2 * PROBES * len(columns)} finite numbers")
    return Basis(tuple(columns), basis["sha256"], tuple(float(p) for p in probes))


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
