"""One layer's record in a delta file: `LayerDelta`, its JSON record, and the rules a record follows.

`record_of` turns a `LayerDelta` into the JSON record written in the header's
``layers`` entry; `layer_from_record` checks a record (read from a file, or just
made by `record_of`: the same rules both ways) and builds the `LayerDelta`.
The rules are listed in docs/format.md ("Metadata" and "Limits").
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, itemgetter

import torch
from torch import Tensor

from svdtune import container, kinds
from svdtune.basis import PROBES, Basis
from svdtune.config import MODES, all_finite_numbers, finite_number
from svdtune.errors import SvdtuneError
from svdtune.fingerprint import FLOAT_NAMES, FLOATS, TOP_SIGMA, Fingerprint
from svdtune.randomized import RandomizedSVD, from_record

MAX_NAME = 4096  # characters in a layer, parameter, buffer or class name
MAX_ELEMENTS = 2**63 - 1  # a weight_shape's product: torch's limit on a tensor's elements
# Known layer classes and their weights' ndim; any other class name (a user subclass) may have any ndim >= 2.
CLASS_NDIM = {kind.name: kind.ndim for kind in kinds.KINDS}
VERSION_4_CLASSES = frozenset(kinds.NEW_IN_VERSION_4)
PARTS = kinds.MHA_PARTS  # a "part" of a MultiheadAttention (format version 4)
SVD_LIMITS = {"oversample": 10**6, "iterations": 100, "seed": 2**31 - 1}  # a randomized "svd" record's maxima
RECORD_KEYS = frozenset({"class", "weight_shape", "rank", "mode", "scale", "fingerprint"})
VERSION_4_KEYS = frozenset({"part", "svd"})  # optional
FINGERPRINT_KEYS = frozenset({"sha256", "top_sigma", "dtype"})  # and optionally "basis"
BASIS_KEYS = frozenset({"columns", "sha256", "probes"})
SHA256 = re.compile("[0-9a-f]{64}")  # lowercase hex, as hashlib's hexdigest() writes it


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
    svd: RandomizedSVD | None = None

    @property
    def rank(self) -> int:
        """k, the number of tuned singular values."""
        return self.delta.numel()

    @property
    def max_rank(self) -> int:
        """min(m, n) of the weight viewed as a matrix (shape[0], rest)."""
        return min(self.weight_shape[0], math.prod(self.weight_shape[1:]))


def record_of(layer: LayerDelta) -> dict:
    """The JSON record of ``layer`` (unchecked: pass it through `layer_from_record`)."""
    fp = layer.fingerprint
    runs = _plain_runs(fp.basis) if isinstance(fp, Fingerprint) else None  # plain already: kept out of _plain
    if isinstance(fp, Fingerprint):
        fp_record = {"sha256": fp.sha256, "top_sigma": fp.top_sigma, "dtype": fp.dtype,
                     **({"basis": [_basis_record(b) for b in fp.basis]} if fp.basis and runs is None else {})}
    else:
        fp_record = fp
    record = {"class": layer.layer_class, "weight_shape": layer.weight_shape, "rank": layer.rank, "mode": layer.mode,
              "scale": layer.scale, "fingerprint": fp_record}
    if layer.part is not None:
        record["part"] = layer.part
    if layer.svd is not None:
        record["svd"] = layer.svd.record() if isinstance(layer.svd, RandomizedSVD) else layer.svd
    record = _plain(record)
    if runs:
        record["fingerprint"]["basis"] = runs
    return record


def _plain_runs(runs: object) -> list[dict] | None:
    """The records of ``runs`` if they are Basis objects of exactly the types a file gives (tuples of ints,
    finite floats, a str), which `_plain` would keep as they are; else None (then `_plain` converts them)."""
    if type(runs) is not tuple or set(map(type, runs)) - {Basis}:
        return None
    columns, probes = list(map(attrgetter("columns"), runs)), list(map(attrgetter("probes"), runs))
    if {*map(type, columns), *map(type, probes)} - _TUPLE or set(map(type, map(attrgetter("sha256"), runs))) - _STR:
        return None
    values = list(chain.from_iterable(probes))
    if set(map(type, chain.from_iterable(columns))) - _INT or set(map(type, values)) - _FLOAT:
        return None
    if not all(map(math.isfinite, values)):
        return None
    return [{"columns": list(run.columns), "sha256": run.sha256, "probes": list(run.probes)} for run in runs]


def _basis_record(basis: object) -> object:
    if not isinstance(basis, Basis):
        return basis
    return {"columns": basis.columns, "sha256": basis.sha256, "probes": basis.probes}


def _plain(value: object) -> object:
    """``value`` as JSON holds it: NumPy and Python numbers as int/float, tuples as lists. What JSON cannot
    hold (NaN, infinity, other objects) becomes its repr, a string, which the validator then refuses by name."""
    kind = type(value)  # fast paths first: a basis has many runs of plain numbers
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)
    if kind is list or kind is tuple:
        types = set(map(type, value))
        if types <= _KEPT or (types == _FLOAT and all(map(math.isfinite, value))):
            return list(value)
        if types <= _PLAIN_SCALARS:
            return [v if type(v) is not float or math.isfinite(v) else repr(v) for v in value]
    if kind is dict and set(map(type, value)) <= _STR:
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bool)):
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


_KEPT = frozenset({int, str, bool, type(None)})  # items `_plain` keeps as they are
_PLAIN_SCALARS = _KEPT | {float}  # and floats, but NaN and infinity
_FLOAT, _STR, _TUPLE = frozenset({float}), frozenset({str}), frozenset({tuple})


def layer_from_record(name: str, record: object, delta: Tensor, version: int,
                      bad: Callable[[str], SvdtuneError]) -> LayerDelta:
    """Check the record and delta tensor of layer ``name`` in a file of format ``version``; build its `LayerDelta`.

    Raises:
        SvdtuneError: ``bad(why)``, naming the layer and what is wrong.
    """
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
    part, svd = _part(name, record, cls, wrong), _svd(record, rank, shape, wrong)
    return LayerDelta(cls, tuple(shape), record["mode"], float(scale), _fingerprint(fp, rank, wrong), delta, part, svd)


def _valid_shape(shape: object) -> bool:
    return (isinstance(shape, list) and 2 <= len(shape) <= container.MAX_DIMS and all(_positive(s) for s in shape)
            and math.prod(shape) <= MAX_ELEMENTS)


def _part(name: str, record: dict, cls: str, wrong) -> str | None:
    """A MultiheadAttention record names its part, and is keyed "<module name>.<part>"; no record of another
    known class has one (a user's subclass of MultiheadAttention is recorded under its own class name)."""
    part = record.get("part")
    if cls != "MultiheadAttention" and "part" not in record:
        return None
    single = cls in CLASS_NDIM and cls != "MultiheadAttention"  # a known kind of one matrix
    if single or part not in PARTS or not name.endswith(f".{part}"):
        raise wrong(f"has part {part!r:.40} and class {cls}: a part, one of {PARTS}, belongs to a MultiheadAttention "
                    "record keyed '<module name>.<part>'")
    return part


def _svd(record: dict, rank: int, shape: list[int], wrong) -> RandomizedSVD | None:
    """The record's randomized SVD parameters, checked to be bounded and reproducible at this rank and shape."""
    if "svd" not in record:
        return None
    svd = record["svd"]
    valid = (isinstance(svd, dict) and set(svd) == {"method", *SVD_LIMITS} and svd["method"] == "randomized"
             and all(_natural(svd[key]) and svd[key] <= limit for key, limit in SVD_LIMITS.items()))
    if not valid:
        raise wrong(f"has an invalid svd record {svd!r:.120} (expected method 'randomized' and integers "
                    + ", ".join(f"0 <= {key} <= {limit}" for key, limit in SVD_LIMITS.items()) + ")")
    try:
        params = from_record(svd)
    except SvdtuneError as error:
        raise wrong(str(error).rstrip(".")) from None
    if rank + params.oversample > min(shape[0], math.prod(shape[1:])):
        raise wrong(f"has a randomized svd of rank {rank} with oversample {params.oversample}, impossible for shape {shape}")
    return params


def _positive(value: object) -> bool:
    return _natural(value) and value >= 1


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fingerprint(fp: object, rank: int, wrong) -> Fingerprint:
    if not isinstance(fp, dict) or fp.keys() - {"basis"} != FINGERPRINT_KEYS:
        raise wrong("has a malformed fingerprint")
    sha, top, dtype = fp["sha256"], fp["top_sigma"], fp["dtype"]
    numbers_ok = isinstance(top, list) and len(top) <= TOP_SIGMA and all_finite_numbers(top) and all(s >= 0 for s in top)
    if not (numbers_ok and all(a >= b for a, b in zip(top, top[1:]))):
        raise wrong(f"has a fingerprint whose top_sigma {top!r:.120} is not up to {TOP_SIGMA} descending finite numbers >= 0")
    if not (_is_sha256(sha) and isinstance(dtype, str) and dtype in FLOAT_NAMES):
        raise wrong("has a malformed fingerprint (sha256 or dtype)")
    runs = fp.get("basis", [])
    if "basis" in fp and not (isinstance(runs, list) and runs):
        raise wrong("has a malformed fingerprint basis")
    basis = _all_runs(runs, rank)
    if basis is None:  # a rule fails for some run: check them one by one, to name the first one wrong
        basis = tuple([_basis(run, rank, wrong) for run in runs])
    # Each run's columns are consecutive (checked in _basis): the runs are disjoint and in order if each
    # ends before the next begins.
    lasts, firsts = [run.columns[-1] for run in basis], [run.columns[0] for run in basis]
    if not all(map(operator.lt, lasts, firsts[1:])):
        raise wrong(f"has fingerprint basis runs that overlap or are out of order ({[list(run.columns) for run in basis]})")
    return Fingerprint(sha, tuple(map(float, top)), dtype, basis)


def _all_runs(runs: list, rank: int) -> tuple[Basis, ...] | None:
    """The `_basis` of every run, each rule checked in one pass over all runs (a file can record very
    many); None if a pass fails. The rules are `_basis`'s, with exact JSON types."""
    if set(map(type, runs)) != _DICT or not all(map(operator.eq, map(dict.keys, runs), repeat(BASIS_KEYS))):
        return None
    columns, shas, probes = (list(map(itemgetter(key), runs)) for key in ("columns", "sha256", "probes"))
    if {*map(type, columns), *map(type, probes)} != _LIST or set(map(type, shas)) != _STR or not all(columns):
        return None
    flat, counts, firsts = list(chain.from_iterable(columns)), list(map(len, columns)), list(map(itemgetter(0), columns))
    if set(map(type, flat)) != _INT or min(flat) < 0 or max(map(itemgetter(-1), columns)) >= rank:
        return None
    if flat != list(chain.from_iterable(map(range, firsts, map(operator.add, firsts, counts)))):  # each consecutive
        return None
    if not all(map(SHA256.fullmatch, shas)) or list(map(len, probes)) != [2 * PROBES * count for count in counts]:
        return None
    if not all_finite_numbers(list(chain.from_iterable(probes))):
        return None
    return tuple(map(Basis, map(tuple, columns), shas, map(tuple, map(map, repeat(float), probes))))


_DICT, _LIST, _INT = frozenset({dict}), frozenset({list}), frozenset({int})


def _basis(basis: object, rank: int, wrong) -> Basis:
    fields = isinstance(basis, dict) and basis.keys() == BASIS_KEYS
    columns, sha, probes = (basis["columns"], basis["sha256"], basis["probes"]) if fields else (None, None, None)
    if not (isinstance(columns, list) and columns and _naturals(columns) and isinstance(probes, list)):
        raise wrong("has a malformed fingerprint basis")
    first = columns[0]
    consecutive = columns == list(range(first, first + len(columns)))
    if not consecutive or columns[-1] >= rank or not (isinstance(sha, str) and SHA256.fullmatch(sha)):
        raise wrong(f"has a fingerprint basis with columns {columns!r:.80} not consecutive below rank {rank}, or a bad hash")
    if len(probes) != 2 * PROBES * len(columns) or not all_finite_numbers(probes):
        raise wrong(f"has a fingerprint basis whose probes are not {2 * PROBES * len(columns)} finite numbers")
    return Basis(tuple(columns), sha, tuple(map(float, probes)))


def _naturals(values: list) -> bool:
    """Every item is an int >= 0 (not a bool); the per-item work runs in C."""
    if set(map(type, values)) == {int}:
        return min(values) >= 0
    return all(_natural(v) for v in values)


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None
