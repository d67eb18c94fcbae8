"""The checks that run over all entries of a file at once agree with checking them one by one.

A crafted header can hold hundreds of thousands of tensors or basis runs, so svdtune
checks them in one pass per rule (issue 10, item 1: benchmarks/crafted_header.py). Each
pass must accept exactly what the one-by-one check accepts, and, where it refuses, the
error must be the one the one-by-one check raises for the first entry that is wrong.
The references here are the one-by-one checks (`entries._entry`, `records._basis`,
`delta._check_values`) and the row-by-row formatting the batched code replaced.
"""

from __future__ import annotations

import dataclasses
import json
import math
from unittest import mock

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import svdtune
from svdtune import entries, records
from svdtune.basis import PROBES, Basis
from svdtune.cli import _tensor_rows, printable
from svdtune.delta import _check_all_values, _check_values
from svdtune.report import table_lines

batched_settings = settings(max_examples=300, deadline=None)

ints_any = st.one_of(st.integers(0, 40), st.integers(-3, 3), st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64, 10**30]))
numbers_any = st.one_of(ints_any, st.booleans(), st.floats(allow_nan=True), st.none(), st.just("1"))
codes_any = st.one_of(st.sampled_from(list(entries.DTYPES)), st.sampled_from(["F4", "f32", "", "\x1b"]), numbers_any,
                      st.lists(st.just("F32"), max_size=1))


def outcome(action):
    """What ``action()`` returns, or the type and message of the SvdtuneError it raises."""
    try:
        return action()
    except svdtune.SvdtuneError as error:
        return (type(error), str(error))


def wrong(why: str) -> svdtune.SvdtuneError:
    return svdtune.SvdtuneError(why)


@st.composite
def tensor_entries(draw):
    """A header entry: usually a valid one (possibly zero-size), else with one field broken."""
    code = draw(st.sampled_from(list(entries.DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    size = math.prod(shape) * entries.DTYPES[code].itemsize
    begin = draw(st.integers(0, 64))
    info = {"dtype": code, "shape": shape, "data_offsets": [begin, begin + size]}
    broken = draw(st.sampled_from([None] * 6 + ["dtype", "shape", "dims", "offsets", "keys", "type", "huge", "negative",
                                                "number"]))
    if broken == "dtype":
        info["dtype"] = draw(codes_any)
    elif broken == "shape":
        info["shape"] = draw(st.one_of(st.lists(numbers_any, max_size=3), numbers_any))
    elif broken == "dims":
        info["shape"] = [draw(st.sampled_from([0, 1]))] * draw(st.integers(64, 66))
    elif broken == "offsets":
        info["data_offsets"] = draw(st.one_of(st.lists(numbers_any, max_size=3), numbers_any))
    elif broken == "keys":
        info[draw(st.sampled_from(["dtype", "extra"]))] = draw(codes_any)
        if draw(st.booleans()):
            del info["shape"]
    elif broken == "type":
        return draw(st.one_of(numbers_any, st.lists(numbers_any, max_size=2)))
    elif broken == "huge":
        info["shape"] = [0, *draw(st.lists(st.sampled_from([2**31, 2**40, 2**63, 2**64]), min_size=1, max_size=3))]
    elif broken == "number":  # a size or an offset of another type, equal to what it replaces (1.0, True)
        field = draw(st.sampled_from(["shape", "data_offsets"] if shape else ["data_offsets"]))
        i = draw(st.integers(0, len(info[field]) - 1))
        info[field][i] = draw(st.sampled_from([float, bool] if info[field][i] in (0, 1) else [float]))(info[field][i])
    elif broken == "negative":  # a negative size beside a zero, or offsets shifted below 0
        if draw(st.booleans()):
            info["shape"] = [0, -1]
        else:
            info["data_offsets"] = [begin - 100, begin - 100 + size]
    shape = info.get("shape")
    numbers = type(shape) is list and set(map(type, shape)) <= {int, float, bool}
    if broken in ("shape", "dims", "huge", "negative") and numbers and draw(st.booleans()):
        size = math.prod(shape) * entries.ITEMSIZES.get(info.get("dtype"), 4)  # the bytes the broken shape needs
        if math.isfinite(size):
            info["data_offsets"] = [begin, begin + int(size)]
    return info


headers = st.dictionaries(st.text(max_size=4), tensor_entries(), min_size=1, max_size=4)


@batched_settings
@given(headers)
def test_all_entries_at_once_accept_and_refuse_as_each_entry_does(header):
    with mock.patch.object(entries, "_all_entries", lambda header: None):  # entry by entry only
        reference = outcome(lambda: entries.layout(header, "f"))
    assert outcome(lambda: entries.layout(header, "f")) == reference
    at_once = entries._all_entries(header)
    assert at_once is None or at_once == reference  # the passes never accept what an entry check refuses


@batched_settings
@given(st.dictionaries(st.text(max_size=4), st.tuples(st.sampled_from(list(entries.DTYPES)),
                                                      st.lists(st.integers(0, 5), max_size=4)), max_size=6))
def test_valid_entries_are_checked_at_once(described):
    """The passes are the path a valid file takes (else a crafted file would be checked entry by entry again)."""
    header, offset = {}, 0
    for name, (code, shape) in described.items():
        size = math.prod(shape) * entries.DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    assert entries._all_entries(header) == {name: entries._entry(name, info, "f") for name, info in header.items()}


def tiling_reference(layout: dict, size: int) -> str | None:
    """The tiling check one tensor at a time (as svdtune 0.x wrote it): the reason it fails, or None."""
    end = 0
    for _, _, begin, stop in sorted(layout.values(), key=lambda entry: (entry[2], entry[3])):
        if begin != end:
            return "its tensors overlap or leave gaps in the data"
        end = stop
    return None if end == size else f"its tensors cover {end} bytes of a {size}-byte data buffer"


@batched_settings
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)), max_size=8), st.integers(0, 30))
def test_tiling_is_checked_as_tensor_by_tensor(spans, size):
    layout = {str(i): (torch.uint8, (length,), begin, begin + length) for i, (begin, length) in enumerate(spans)}
    why = tiling_reference(layout, size)
    expected = None if why is None else (svdtune.SvdtuneError, str(entries.damaged("f", why)))
    assert outcome(lambda: entries.check_tiling(layout, size, "f")) == expected


def test_zero_size_tensors_are_distinct_and_resizable_apart():
    layout = {"a": (torch.float32, (0,), 0, 0), "b": (torch.float32, (0,), 0, 0), "c": (torch.int64, (2, 0), 0, 0)}
    made = entries.tensors(layout, memoryview(bytearray()))
    assert [(t.dtype, tuple(t.shape)) for t in made.values()] == [(torch.float32, (0,)), (torch.float32, (0,)),
                                                                  (torch.int64, (2, 0))]
    made["a"].resize_(3).fill_(1.0)
    made["b"].resize_(3).fill_(2.0)
    assert made["a"].tolist() == [1.0, 1.0, 1.0]  # no storage shared between entries


values = st.sampled_from([torch.zeros(0), torch.zeros(2, 0, dtype=torch.float16), torch.ones(2), torch.tensor(float("nan")),
                          torch.full((3,), float("inf"), dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int32), torch.zeros(2, dtype=torch.complex64)])


@batched_settings
@given(st.sampled_from(["parameter", "buffer"]), st.dictionaries(st.text(max_size=3), values, max_size=5))
def test_values_are_refused_naming_the_first_tensor_wrong(kind, tensors):
    def each() -> None:
        for name, tensor in tensors.items():
            _check_values(kind, name, tensor, wrong)

    assert outcome(lambda: _check_all_values(kind, tensors, wrong)) == outcome(each)


@st.composite
def basis_runs(draw):
    """A list of basis records: usually valid runs in order, else with one field broken."""
    runs, column = [], draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 5))):
        count = draw(st.integers(1, 3))
        probes = draw(st.lists(st.one_of(st.floats(-2, 2), st.integers(-2, 2)), min_size=2 * PROBES * count,
                               max_size=2 * PROBES * count))
        runs.append({"columns": list(range(column, column + count)), "sha256": "ab" * 32, "probes": probes})
        column += count + draw(st.integers(0, 2))
    run = draw(st.sampled_from(runs))
    broken = draw(st.sampled_from([None] * 4 + ["columns", "sha256", "probes", "keys", "type", "gap", "empty", "value",
                                                "length"]))
    if broken == "empty":
        run["columns"] = []
    elif broken == "length":
        run["probes"] = run["probes"][1:] if draw(st.booleans()) else [*run["probes"], 0.5]
    elif broken == "value":  # one probe not a finite number, or one column not a natural number (but equal to it)
        field = draw(st.sampled_from(["probes", "columns"]))
        i = draw(st.integers(0, len(run[field]) - 1))
        column = run[field][i]
        run[field][i] = draw(st.sampled_from([float("inf"), float("nan"), 10**400, "1", None] if field == "probes"
                                             else [-1, float(column), bool(column), str(column)]))
    elif broken in ("columns", "sha256", "probes"):
        run[broken] = draw(st.one_of(numbers_any, st.lists(numbers_any, max_size=3), st.just([]), st.just("AB" * 32),
                                     st.just([float("inf")] * 2 * PROBES), st.just([10**400] * 2 * PROBES)))
    elif broken == "keys":
        run["extra"] = 1
    elif broken == "type":
        runs[runs.index(run)] = draw(numbers_any)
    elif broken == "gap":
        run["columns"] = [run["columns"][0], run["columns"][0] + 2]
    return runs


@batched_settings
@given(basis_runs(), st.integers(1, 30))
def test_all_runs_at_once_accept_and_refuse_as_each_run_does(runs, rank):
    fingerprint = {"sha256": "ab" * 32, "top_sigma": [1.0], "dtype": "float32", "basis": runs}
    with mock.patch.object(records, "_all_runs", lambda runs, rank: None):  # run by run only
        reference = outcome(lambda: records._fingerprint(fingerprint, rank, wrong))
    assert outcome(lambda: records._fingerprint(fingerprint, rank, wrong)) == reference
    at_once = records._all_runs(runs, rank)
    assert at_once is None or at_once == tuple(records._basis(run, rank, wrong) for run in runs)


@batched_settings
@given(basis_runs())
def test_valid_runs_are_checked_at_once(runs):
    valid = outcome(lambda: tuple(records._basis(run, 100, wrong) for run in runs))
    if isinstance(valid, tuple) and valid and isinstance(valid[0], Basis):
        assert records._all_runs(runs, 100) == valid


@st.composite
def bases(draw):
    """Basis objects as a file gives them, some with one field of another type (or a NaN, an infinity)."""
    runs = [Basis(tuple(range(i, i + 2)), "ab" * 32, tuple(draw(st.lists(st.floats(-2, 2), min_size=4, max_size=4))))
            for i in range(0, 2 * draw(st.integers(0, 3)), 2)]
    if runs and draw(st.booleans()):
        i, field = draw(st.integers(0, len(runs) - 1)), draw(st.sampled_from(["columns", "sha256", "probes"]))
        value = draw(st.sampled_from({"columns": [(0, True), (0, 1.0), [0, 1], (0, numpy.int64(1)), (torch.tensor(0),)],
                                      "sha256": [1, None, 1.5, float("nan"), ("ab",), numpy.float64(1)],
                                      "probes": [(float("nan"),), (float("inf"), 1.0), (1,), [1.0], (numpy.float32(1),)]}[field]))
        runs[i] = dataclasses.replace(runs[i], **{field: value})
    return tuple(runs) if draw(st.integers(0, 5)) else list(runs)


@batched_settings
@given(bases())
def test_basis_records_are_what_plain_gives(runs):
    plain, reference = records._plain_runs(runs), records._plain([records._basis_record(run) for run in runs])
    assert plain is None or json.dumps(plain) == json.dumps(reference)  # the same JSON: equal values of the same types


@batched_settings
@given(st.lists(st.tuples(st.text(max_size=5), st.text(max_size=3), st.text(max_size=2)), max_size=5))
def test_table_lines_are_the_rows_padded_cell_by_cell(rows):
    header = ("name", "b", "")
    widths = [max(map(len, column)) for column in zip(header, *rows)]
    expected = ["  ".join(map(str.ljust, row, widths)).rstrip() for row in [header, tuple("-" * w for w in widths), *rows]]
    assert table_lines(header, rows) == expected


@batched_settings
@given(st.dictionaries(st.text(max_size=4), values, max_size=5))
def test_tensor_rows_are_formatted_as_tensor_by_tensor(tensors):
    expected = [(printable(name), "x".join(map(str, value.shape)) or "scalar", str(value.dtype).removeprefix("torch."),
                 f"{value.numel() * value.element_size():,}") for name, value in tensors.items()]
    assert _tensor_rows(tensors) == expected


@pytest.mark.parametrize("name", ["a\nb", "\x1b[31mred", "tab\there", "\u202eevil", "plain"])
def test_a_name_is_escaped_in_the_rows(name):
    rows = _tensor_rows({name: torch.zeros(1), "ok": torch.zeros(0)})
    assert [row[0] for row in rows] == [printable(name), "ok"] and (rows[0][0] == name) == (name == "plain")
