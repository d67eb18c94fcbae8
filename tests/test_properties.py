"""Property-based tests over random layer kinds, shapes, ranks, modes and dtypes."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import svdtune
from tests.conftest import randomize_deltas
from tests.test_layers import dense_reference, plain_copy_with_weight

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def layers(draw):
    """(layer, input batch) of a random supported kind and shape."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    kind = draw(st.sampled_from(["linear", "conv", "transposed"]))
    if kind == "linear":
        n, m = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return nn.Linear(n, m, bias=draw(st.booleans())), torch.randn(draw(st.integers(1, 4)), n)
    dims = draw(st.integers(1, 3 if kind == "conv" else 2))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    size = draw(st.integers(kernel, kernel + 3))
    x = torch.randn(2, cin, *([size] * dims))
    if kind == "conv":
        padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
        padding = draw(st.integers(0, min(1, size - 1))) if padding_mode != "zeros" else draw(st.integers(0, 2))
        return CONVS[dims](cin, cout, kernel, stride=stride, padding=padding, groups=groups, padding_mode=padding_mode), x
    out_pad = draw(st.integers(0, stride - 1))
    return TRANSPOSED[dims](cin, cout, kernel, stride=stride, groups=groups, output_padding=out_pad), x


ranks = st.one_of(st.none(), st.integers(1, 6))
modes = st.sampled_from(["shift", "scale"])
property_settings = settings(max_examples=60, deadline=None)  # SVDs of random sizes vary in time


@property_settings
@given(layers(), ranks, modes, st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), st.booleans())
def test_identity_at_init(case, rank, mode, dtype, training):
    layer, x = case
    model = nn.Sequential(layer.to(dtype)).train(training)
    x = x.to(dtype)
    with torch.no_grad():
        expected = model(x)
    svdtune.apply(model, targets=["0"], rank=rank, mode=mode)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@property_settings
@given(layers(), ranks, modes, st.sampled_from([torch.float32, torch.float64]), st.integers(0, 1000))
def test_adapted_forward_equals_dense_formula(case, rank, mode, dtype, seed):
    layer, x = case
    model = nn.Sequential(layer.to(dtype))
    x = x.to(dtype)
    reference_layer = copy.deepcopy(layer)
    svdtune.apply(model, targets=["0"], rank=rank, mode=mode)
    randomize_deltas(model, seed=seed)
    weight = dense_reference(layer, layer.svd_delta, mode)
    reference = plain_copy_with_weight(reference_layer, weight)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, **tol)
    torch.testing.assert_close(model(x), expected, **tol)


@property_settings
@given(layers(), ranks, modes, st.integers(0, 1000))
def test_merge_equals_adapted_and_restore_is_bit_exact(case, rank, mode, seed):
    layer, x = case
    model = nn.Sequential(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svdtune.apply(model, targets=["0"], rank=rank, mode=mode)
    randomize_deltas(model, seed=seed)
    adapted = model(x).detach()
    merged = svdtune.merge(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    svdtune.restore(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ---- hostile delta files: structured headers, any numbers, names and keys (issue 10) ----------

import inspect  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from hypothesis import HealthCheck  # noqa: E402

from svdtune import container  # noqa: E402

SHA = "ab" * 32
hostile_settings = settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                   HealthCheck.too_slow])
numbers_any = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 2**31, 2**63, 2**64, 10**400, -(10**400), 1e308, 5e-324, True, False]),
)
junk = st.one_of(st.none(), st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
values_any = st.one_of(numbers_any, junk)
names_any = st.one_of(
    st.sampled_from(["0", "fc1", "a.b", "", ".", "a..b", "a.", "__metadata__", "x\x1b[31m", "a\nb", "\u202e0", "q.k_proj"]),
    st.text(st.characters(codec="utf-8"), min_size=0, max_size=12),
)
shapes_any = st.lists(st.one_of(st.integers(0, 9), numbers_any), min_size=0, max_size=7)
classes_any = st.one_of(st.sampled_from(["Linear", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention", "Conv1D", "MyLinear",
                                         "", "1x", "Lin ear"]), values_any)


@st.composite
def fingerprints_any(draw):
    fp = {"sha256": draw(st.one_of(st.just(SHA), values_any)),
          "top_sigma": draw(st.one_of(st.lists(numbers_any, max_size=5), values_any)),
          "dtype": draw(st.one_of(st.sampled_from(["float32", "float16", "int8"]), values_any))}
    if draw(st.booleans()):
        runs = [{"columns": draw(st.lists(st.one_of(st.integers(0, 6), numbers_any), max_size=3)),
                 "sha256": SHA, "probes": draw(st.lists(numbers_any, max_size=8))} for _ in range(draw(st.integers(0, 2)))]
        fp["basis"] = runs
    return fp


@st.composite
def records_any(draw):
    record = {"class": draw(classes_any), "weight_shape": draw(st.one_of(shapes_any, values_any)),
              "rank": draw(st.one_of(st.integers(0, 7), numbers_any)), "mode": draw(st.sampled_from(["shift", "scale", "x", 1])),
              "scale": draw(numbers_any), "fingerprint": draw(st.one_of(fingerprints_any(), values_any))}
    for key in draw(st.lists(st.sampled_from(["part", "svd", "extra"]), max_size=2, unique=True)):
        record[key] = draw(st.one_of(st.sampled_from(["q_proj", "v_proj"]), st.just({"method": "randomized", "oversample": 4,
                                     "iterations": 1, "seed": 0}), values_any))
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=1)):
        del record[key]
    return record


def dumps_with_duplicate(value, duplicate: bool) -> str:
    """JSON text (NaN/Infinity tokens allowed); with ``duplicate``, its first object repeats its first key."""
    text = json.dumps(value)
    if duplicate and text.startswith("{") and len(value):
        first = json.dumps(next(iter(value)))
        text = "{" + first + ": null, " + text[1:]
    return text


@st.composite
def hostile_files(draw):
    """(tensors, metadata) of a checksummed safetensors file with a structured, hostile svdtune header."""
    layers = {draw(names_any): draw(records_any()) for _ in range(draw(st.integers(0, 3)))}
    params, buffers = draw(st.lists(names_any, max_size=2)), draw(st.lists(names_any, max_size=2))
    tensors = {}
    for name in [*layers, *params, *buffers]:
        if name and name != "__metadata__" and draw(st.integers(0, 9)):
            dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32, torch.int64]))
            shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
            value = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e39]))
            tensors[name] = torch.full(shape, value, dtype=torch.float64).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    metadata = {"format": draw(st.sampled_from(["svdtune.delta", "svdtune.delta", "pt"])),
                "format_version": draw(st.sampled_from(["1", "2", "3", "4", "5", "\u00b3", "03", "", " 1"])),
                "svdtune_version": draw(st.text(max_size=8)),
                "layers": dumps_with_duplicate(layers, draw(st.booleans())),
                "params": json.dumps(params), "buffers": json.dumps(buffers),
                "metadata": dumps_with_duplicate(draw(st.dictionaries(names_any, st.text(max_size=8), max_size=2)),
                                                  draw(st.booleans()))}
    for key in draw(st.lists(st.sampled_from(sorted(metadata)), max_size=1)):
        del metadata[key]
    return tensors, metadata


@hostile_settings
@given(hostile_files())
def test_structured_hostile_headers_are_refused_cleanly_or_read_back(tmp_path, case):
    tensors, metadata = case
    path, out = tmp_path / "hostile.safetensors", tmp_path / "again.safetensors"
    container.atomic_write(path, container.encode(tensors, metadata))
    start = time.perf_counter()
    try:
        delta = svdtune.read_delta(path)
    except svdtune.SvdtuneError:
        return
    finally:
        assert time.perf_counter() - start < 5.0  # no hang (tiny files; generous for loaded machines)
    delta.save(out)  # what svdtune accepts it can write, and reads back the same
    again = svdtune.read_delta(out)
    assert list(again.layers) == list(delta.layers)
    for name, layer in delta.layers.items():
        other = again.layers[name]
        assert (other.layer_class, other.weight_shape, other.rank, other.mode, other.scale, other.fingerprint,
                other.part, other.svd) == (layer.layer_class, layer.weight_shape, layer.rank, layer.mode, layer.scale,
                                           layer.fingerprint, layer.part, layer.svd)
        assert torch.equal(other.delta, layer.delta)


@st.composite
def layer_deltas_any(draw):
    fingerprint = svdtune.Fingerprint(draw(st.one_of(st.just(SHA), values_any)),
                                      draw(st.one_of(st.lists(numbers_any, max_size=4).map(tuple), values_any)),
                                      draw(st.sampled_from(["float32", "bfloat16", "x"])))
    delta = draw(st.sampled_from([torch.zeros(2), torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.int32),
                                  torch.full((2,), float("nan")), torch.zeros(1, 2), torch.zeros(0)]))
    return svdtune.LayerDelta(draw(classes_any), draw(st.one_of(shapes_any.map(tuple), values_any)),
                              draw(st.sampled_from(["shift", "scale", "warp"])), draw(values_any), fingerprint, delta,
                              draw(st.one_of(st.none(), st.sampled_from(["q_proj"]), values_any)),
                              draw(st.one_of(st.none(), values_any)))


@hostile_settings
@given(st.dictionaries(names_any, layer_deltas_any(), max_size=3),
       st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), values_any))
def test_save_writes_only_files_that_read_back(tmp_path, layers, metadata):
    out = tmp_path / "written.safetensors"
    if out.exists():
        out.unlink()
    try:
        svdtune.DeltaFile(layers, metadata=metadata).save(out)
    except svdtune.SvdtuneError:
        assert not out.exists()
        return
    back = svdtune.read_delta(out)
    assert list(back.layers) == list(layers) and back.metadata == (metadata or {})


# ---- every public function: bad arguments are SvdtuneErrors (or the documented OSError) -------


def _context(tmp_path):
    """Valid arguments for each public function, built fresh (calls change models in place)."""
    from tests.test_io import small, trained

    base = small()
    adapted = trained(small())
    delta_path = tmp_path / "ctx.safetensors"
    if not delta_path.exists():
        svdtune.save_delta(trained(small()), delta_path)
        torch.save(small().state_dict(), tmp_path / "base.pt")
    out = tmp_path / "out.safetensors"
    return {
        svdtune.apply: dict(model=base, targets=["0"], exclude=(), rank=None, mode="shift", trainable=(), cache_dir=None,
                            svd="auto", progress=False),
        svdtune.merge: dict(model=adapted), svdtune.restore: dict(model=adapted), svdtune.report: dict(model=adapted),
        svdtune.set_scale: dict(model=adapted, scale=0.5), svdtune.singular_values: dict(model=adapted),
        svdtune.set_memory: dict(model=adapted, offload_base=True, cache_weights=False),
        svdtune.trainable_parameters: dict(model=adapted),
        svdtune.save_delta: dict(model=adapted, path=out, metadata=None),
        svdtune.load_delta: dict(model=base, source=delta_path, strict=True, cache_dir=None),
        svdtune.read_delta: dict(path=delta_path),
        svdtune.merge_files: dict(base=tmp_path / "base.pt", delta=delta_path, out=out, scale=1.0, strict=True),
        svdtune.combine: dict(deltas=[delta_path], weights=[1.0]),
        svdtune.export_lora: dict(source=delta_path, out_dir=tmp_path / "lora", rank=None, base=tmp_path / "base.pt",
                                  format="peft", prefix="unet", max_rank=None, strict=True, dtype=None),
    }


PUBLIC_FUNCTIONS = [getattr(svdtune, name) for name in svdtune.__all__
                    if inspect.isfunction(getattr(svdtune, name))]
BAD_VALUES = [None, 5, -1, 1.5, float("nan"), 10**400, "", "x", b"\xff", [], {}, [5], {"a": 1}, object(),
              torch.empty(1, device="meta"), torch.ones(2), nn.Linear(2, 2)]


def test_the_table_covers_every_public_function(tmp_path):
    assert set(PUBLIC_FUNCTIONS) == set(_context(tmp_path))
    for function, arguments in _context(tmp_path).items():
        assert list(arguments) == list(inspect.signature(function).parameters), function.__name__


@settings(max_examples=250, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PUBLIC_FUNCTIONS), st.data())
def test_public_functions_raise_only_svdtune_errors_for_bad_arguments(tmp_path, monkeypatch, function, data):
    monkeypatch.chdir(tmp_path)  # a relative path drawn ("x") is written here, not into the checkout
    arguments = _context(tmp_path)[function]
    name = data.draw(st.sampled_from(list(arguments)))
    arguments[name] = data.draw(st.sampled_from(BAD_VALUES))
    try:
        function(**arguments)
    except svdtune.SvdtuneError:
        pass
    except OSError:  # documented for paths that cannot be written or read
        assert name in ("path", "out", "out_dir", "cache_dir")
