"""Hostile inputs (issue 10, items 4-6 and 11-15): numbers out of range, half-changed models,
non-finite loads, the cross-dtype fingerprint, class/layout rules, the one validator for
writing and reading, argument types. Each refusal is a clean SvdtuneError and changes nothing."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import struct
import warnings

import numpy
import pytest
import torch
from torch import nn

import svdtune
from svdtune import cache, container
from svdtune.decompose import decompose
from tests.conftest import randomize_deltas
from tests.test_io import edit_layer, rewrite, small, trained


def full_state(model: nn.Module):
    """Everything apply/load may touch: per module its class, object, own attribute names and
    tables (parameter/buffer objects), svdtune's config; per parameter its flag and values; buffer values."""
    modules = [(name, id(m), type(m), sorted(m.__dict__), [(k, id(v)) for k, v in m._parameters.items()],
                [(k, id(v)) for k, v in m._buffers.items()], getattr(m, "_spectral", None) and m._spectral.config)
               for name, m in model.named_modules()]
    params = [(n, p.requires_grad, value(p)) for n, p in model.named_parameters()]
    buffers = [(n, value(b)) for n, b in model.named_buffers()]
    return modules, params, buffers, copy.deepcopy(model.__dict__.get("_svdtune_requires_grad"))


def value(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the values; a meta tensor has none (its shape stands in)."""
    return torch.tensor(tensor.shape) if tensor.is_meta else tensor.detach().clone()


def assert_same_state(model: nn.Module, before) -> None:
    modules, params, buffers, flags = full_state(model)
    assert modules == before[0] and flags == before[3]
    assert [(n, g) for n, g, _ in params] == [(n, g) for n, g, _ in before[1]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(params, before[1]))
    assert [n for n, _ in buffers] == [n for n, _ in before[2]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(buffers, before[2]))


def refused(call, model: nn.Module, match: str) -> None:
    """``call()`` raises an SvdtuneError matching ``match`` and leaves ``model`` exactly as it was."""
    before = full_state(model)
    with pytest.raises(svdtune.SvdtuneError, match=match):
        call()
    assert_same_state(model, before)


def raw_safetensors(path, header: dict, data: bytes = b"", header_text: bytes | None = None) -> None:
    """Write a safetensors file whose checksum matches ``header`` (svdtune's rule), optionally with
    ``header_text`` as the literal header bytes (e.g. with a duplicated key the checksum does not see)."""
    metadata = dict(header.get("__metadata__", {}))
    metadata.pop(container.CHECKSUM, None)
    digest = hashlib.sha256(container.canonical_json({**header, "__metadata__": metadata}) + data).hexdigest()
    text = header_text if header_text is not None else container.canonical_json(
        {**header, "__metadata__": {**metadata, container.CHECKSUM: digest}})
    if header_text is not None:
        text = text.replace(b"CHECKSUM", digest.encode())
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture
def saved(tmp_path):
    base = small()
    model = trained(copy.deepcopy(base))
    path = tmp_path / "task.safetensors"
    svdtune.save_delta(model, path)
    return model, path, base


# ---- item 4: numbers out of range ----------------------------------------------------------


@pytest.mark.parametrize("edit, match", [
    (edit_layer("0", scale=10**400), "scale"),
    (edit_layer("0", rank=10**400), "rank"),
    (edit_layer("0", weight_shape=[2**63, 2**63]), "weight shape"),
    (edit_layer("0", fingerprint={"sha256": "0" * 64, "top_sigma": [10**400], "dtype": "float32"}), "top_sigma"),
    (lambda t, md: md.update(format_version="\u00b3"), "format version"),
    (lambda t, md: md.update(format_version="03"), "format version"),
    (lambda t, md: md.update(layers=md["layers"].replace('"scale":1.0', '"scale":1e400')), "scale"),
    (lambda t, md: md.update(layers=md["layers"].replace('"rank":6', '"rank":' + "9" * 5000)), "not JSON"),
])
def test_numbers_out_of_range_are_refused_by_name(saved, edit, match):
    _, path, base = saved
    rewrite(path, edit)
    refused(lambda: svdtune.load_delta(base, path), base, match)
    with pytest.raises(svdtune.SvdtuneError, match=match):
        svdtune.read_delta(path)


def test_probe_of_any_magnitude_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))  # repeated singular values: a basis is recorded
    svdtune.apply(model, ["0"])
    with torch.no_grad():
        model[0].svd_delta.copy_(torch.tensor([0.5, -0.5, 0.2, 0.0]))
    path = tmp_path / "basis.safetensors"
    svdtune.save_delta(model, path)

    def edit(tensors, metadata):
        layers = json.loads(metadata["layers"])
        layers["0"]["fingerprint"]["basis"][0]["probes"][0] = 10**400
        metadata["layers"] = json.dumps(layers)
    rewrite(path, edit)
    with pytest.raises(svdtune.SvdtuneError, match="probes"):
        svdtune.read_delta(path)


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**40, 2**40], [0] * 65])
def test_zero_size_tensor_of_a_shape_torch_cannot_hold_is_refused(saved, tmp_path, shape):
    _, path, _ = saved
    tensors, metadata = container.read(path)
    header = json.loads(container.canonical_json({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}))
    header["__metadata__"] = metadata
    crafted = tmp_path / "crafted.safetensors"
    raw_safetensors(crafted, header)
    with pytest.raises(svdtune.SvdtuneError, match="shape torch cannot hold"):
        svdtune.read_delta(crafted)


@pytest.mark.parametrize("scale", [10**400, -(10**400), float("nan"), torch.empty(1, device="meta"), numpy.float64("inf")],
                         ids=["10**400", "-10**400", "nan", "meta tensor", "numpy inf"])
def test_set_scale_refuses_what_is_not_a_finite_number(saved, scale):
    model = saved[0]
    refused(lambda: svdtune.set_scale(model, scale), model, "scale=.* must be a finite number")


def test_combine_refuses_weights_beyond_float_range(saved):
    _, path, _ = saved
    with pytest.raises(svdtune.SvdtuneError, match="must be finite numbers"):
        svdtune.combine([path, path], [10**400, 1])


# ---- item 5: a failure leaves the model exactly as it was ------------------------------------


def inference_base(base: nn.Module) -> nn.Module:
    with torch.inference_mode():
        model = small()
        model.load_state_dict(base.state_dict())
    return model


def test_apply_refuses_an_inference_mode_model_and_changes_nothing():
    model = inference_base(small())
    refused(lambda: svdtune.apply(model, ["0", "3"]), model, "inference tensors .*load_delta")


def test_load_delta_serves_an_inference_mode_model(saved):
    trained_model, path, base = saved
    model = inference_base(base)
    svdtune.load_delta(model, path)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = trained_model(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    svdtune.merge(model)  # and back to plain layers, with the flags they had
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())
    served = inference_base(base)
    svdtune.restore(svdtune.load_delta(served, path))
    assert all(p.requires_grad for p in served.parameters()) and type(served[0]) is nn.Linear


def test_a_file_parameter_aimed_at_an_integer_parameter_changes_nothing(tmp_path):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        model[1].register_parameter("count", nn.Parameter(torch.zeros(2), requires_grad=False))
        return model
    source = build()
    svdtune.apply(source, ["0"])
    source[1].count.requires_grad_(True)  # trained as a float
    source[1].weight.requires_grad_(True)
    path = tmp_path / "d.safetensors"
    svdtune.save_delta(source, path)
    base = build()
    base[1].count = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    refused(lambda: svdtune.load_delta(base, path), base, "parameter '1.count'.*int64")


def test_a_layer_with_its_own_svd_delta_buffer_changes_nothing():
    model = small()
    model[3].register_buffer("svd_delta", torch.zeros(1))
    refused(lambda: svdtune.apply(model, ["0", "3", "5"]), model, "layer '3' already has an attribute 'svd_delta'")


class Failure(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_apply_rolls_back_whatever_fails_inside(monkeypatch, fail_at):
    model = small()
    calls = []
    adapt = svdtune.adapting.adapt

    def failing(layer, *args):
        calls.append(layer)
        adapt(layer, *args)  # the layer is half changed when the failure comes
        if len(calls) > fail_at:
            raise Failure("disk on fire")
    monkeypatch.setattr(svdtune.adapting, "adapt", failing)
    name = ["0", "3", "5"][fail_at]
    refused(lambda: svdtune.apply(model, ["0", "3", "5"], trainable=["1"] if fail_at else ()), model,
            f"svdtune.apply failed at layer '{name}': disk on fire; the model was rolled back")


@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_load_delta_rolls_back_whatever_fails_inside(tmp_path, monkeypatch, adapted, fail_at):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    source = copy.deepcopy(base)
    svdtune.apply(source, ["0", "2"], trainable=["1"])
    randomize_deltas(source)
    with torch.no_grad():
        source[1].weight.add_(1.0)
        source[1].running_var.add_(2.0)
    path = tmp_path / "d.safetensors"
    svdtune.save_delta(source, path)
    target = copy.deepcopy(base)
    if adapted:
        svdtune.apply(target, ["0", "2"], trainable=["1"])
    calls = []
    writable = svdtune.io.writable

    def failing(tensor):
        calls.append(tensor)
        if len(calls) > fail_at:
            raise Failure("power cut")
        return writable(tensor)
    monkeypatch.setattr(svdtune.io, "writable", failing)
    refused(lambda: svdtune.load_delta(target, path), target, "svdtune.load_delta failed at .*power cut")


# ---- item 6: nothing non-finite reaches the model ---------------------------------------------


def with_delta(path, out, layer: str, delta: torch.Tensor, **changes) -> None:
    record = svdtune.read_delta(path)
    layers = dict(record.layers)
    layers[layer] = dataclasses.replace(layers[layer], delta=delta, **changes)
    dataclasses.replace(record, layers=layers).save(out)


def test_deltas_that_overflow_the_models_dtype_are_refused(saved, tmp_path):
    _, path, base = saved
    out = tmp_path / "big.safetensors"
    with_delta(path, out, "0", torch.full((6,), 1e39, dtype=torch.float64))
    refused(lambda: svdtune.load_delta(base, out), base, "layer '0'.*do not fit the model's torch.float32")

    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(4, 4)).half()
    source = svdtune.apply(copy.deepcopy(half), ["0"])
    svdtune.save_delta(source, tmp_path / "h.safetensors")
    with_delta(tmp_path / "h.safetensors", out, "0", torch.full((4,), 1e5))
    refused(lambda: svdtune.load_delta(half, out), half, "do not fit the model's torch.float16")


def test_load_delta_and_merge_files_agree_on_a_huge_scale(saved, tmp_path):
    _, path, base = saved
    out = tmp_path / "huge.safetensors"
    record = svdtune.read_delta(path).layers["0"]
    with_delta(path, out, "0", record.delta, scale=1e308)
    refused(lambda: svdtune.load_delta(base, out), base, "layer '0'.*non-finite")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    with pytest.raises(svdtune.SvdtuneError, match="layer '0'.*non-finite"):
        svdtune.merge_files(tmp_path / "base.pt", out, tmp_path / "merged.safetensors")


def bn_files(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    source = svdtune.apply(copy.deepcopy(base), ["0"], trainable=["1"])
    path = tmp_path / "bn.safetensors"
    svdtune.save_delta(source, path)
    return base, path


@pytest.mark.parametrize("name, value, match", [
    ("1.weight", torch.tensor([1.0, float("nan"), 1.0]), "parameter '1.weight' holds NaN"),
    ("1.running_var", torch.tensor([1.0, float("inf"), 1.0]), "buffer '1.running_var' holds NaN or infinity"),
    ("1.num_batches_tracked", torch.tensor(float("nan"), dtype=torch.float64), "holds NaN"),
])
def test_non_finite_trained_values_are_refused_on_write_and_read(tmp_path, name, value, match):
    base, path = bn_files(tmp_path)
    record = svdtune.read_delta(path)
    kind = "params" if name in record.params else "buffers"
    changed = dataclasses.replace(record, **{kind: {**getattr(record, kind), name: value}})
    with pytest.raises(svdtune.SvdtuneError, match=match):
        changed.save(tmp_path / "out.safetensors")
    assert not os.path.exists(tmp_path / "out.safetensors")
    rewrite(path, lambda tensors, metadata: tensors.update({name: value}))
    refused(lambda: svdtune.load_delta(base, path), base, match)


@pytest.mark.parametrize("name, value, match", [
    ("1.num_batches_tracked", torch.tensor(2.5, dtype=torch.float64), "do not fit the model's torch.int64"),
    ("1.num_batches_tracked", torch.tensor(1e30), "do not fit the model's torch.int64"),
    ("1.running_var", torch.tensor([1.0, -1.0, 1.0]), "running variance must be >= 0"),
])
def test_buffer_values_must_mean_what_they_say_in_the_model(tmp_path, name, value, match):
    base, path = bn_files(tmp_path)
    rewrite(path, lambda tensors, metadata: tensors.update({name: value}))
    refused(lambda: svdtune.load_delta(base, path), base, match)


def test_a_meta_device_head_does_not_load_silently(tmp_path):
    base, path = bn_files(tmp_path)
    base[1].to_empty(device="meta")
    refused(lambda: svdtune.load_delta(base, path), base, "meta device")


# ---- item 11: a different weight in another dtype is not the base ---------------------------


def test_cross_dtype_rule_compares_the_weight_itself(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(8, 6)
    half = nn.Sequential(nn.Linear(6, 8))
    with torch.no_grad():
        half[0].weight.copy_(weight)
    half = half.half()
    svdtune.apply(half, ["0"])
    randomize_deltas(half)
    path = tmp_path / "h.safetensors"
    svdtune.save_delta(half, path)

    def fp32_model(w):
        model = nn.Sequential(nn.Linear(6, 8))
        with torch.no_grad():
            model[0].weight.copy_(w)
            model[0].bias.copy_(half[0].bias.float())
        return model
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    for other in (rotation @ weight, weight * (1 + 0.02 * torch.randn_like(weight))):
        assert torch.allclose(torch.linalg.svdvals(rotation @ weight), torch.linalg.svdvals(weight), rtol=1e-4)
        model = fp32_model(other)
        refused(lambda: svdtune.load_delta(model, path), model, "also when cast to the float16")
    svdtune.load_delta(fp32_model(weight), path)  # the fp32 weight whose fp16 cast was trained: exact
    svdtune.load_delta(fp32_model(weight.half().float()), path)  # the upcast fp16 weight: same hash


# ---- item 12: class/layout rules and duplicate keys ------------------------------------------


def test_a_record_whose_class_disagrees_with_the_weight_ndim_is_refused_everywhere(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5))
    svdtune.apply(model, ["0"])
    path = tmp_path / "d.safetensors"
    svdtune.save_delta(model, path)
    rewrite(path, edit_layer("0", **{"class": "Conv3d"}))
    with pytest.raises(svdtune.SvdtuneError, match="is a Conv3d with a 2-D weight shape"):
        svdtune.read_delta(path)
    torch.save({"0.weight": torch.randn(5, 4), "0.bias": torch.zeros(5)}, tmp_path / "embedding.pt")
    with pytest.raises(svdtune.SvdtuneError, match="is a Conv3d with a 2-D weight shape"):
        svdtune.merge_files(tmp_path / "embedding.pt", path, tmp_path / "m.safetensors")


def test_duplicate_keys_inside_metadata_json_are_refused(saved):
    _, path, _ = saved
    rewrite(path, lambda t, md: md.update(layers=md["layers"].replace('"mode":"shift"', '"mode":"scale","mode":"shift"')))
    with pytest.raises(svdtune.SvdtuneError, match="'mode' appears twice"):
        svdtune.read_delta(path)


def test_duplicate_keys_in_the_safetensors_header_are_refused(saved, tmp_path):
    _, path, _ = saved
    tensors, metadata = container.read(path)
    header = json.loads(container.canonical_json({}))
    chunks = container.encode(tensors, metadata)
    header = json.loads(bytes(chunks[1]))
    text = container.canonical_json(header).replace(b'"__metadata__":{', b'"__metadata__":{"format":"pt",', 1)
    crafted = tmp_path / "dup.safetensors"
    with open(crafted, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + b"".join(bytes(c) for c in chunks[2:]))
    with pytest.raises(svdtune.SvdtuneError, match="'format' appears twice"):
        svdtune.read_delta(crafted)


@pytest.mark.parametrize("changes, version, match", [
    ({"part": "q_proj"}, "4", "part 'q_proj' and class Linear"),
    ({"class": "MultiheadAttention"}, "4", "part None and class MultiheadAttention"),
    ({"class": "Embedding"}, "3", "layer kind of format version 4"),
    ({"part": "q_proj"}, "3", "malformed record"),
    ({"svd": {"method": "randomized", "oversample": 10, "iterations": 10**9, "seed": 0}}, "4", "invalid svd record"),
    ({"svd": {"method": "exact", "oversample": 1, "iterations": 1, "seed": 0}}, "4", "invalid svd record"),
])
def test_version_4_keys_are_validated(saved, changes, version, match):
    _, path, _ = saved

    def edit(tensors, metadata):
        edit_layer("0", **changes)(tensors, metadata)
        metadata["format_version"] = version
        metadata.setdefault("buffers", "[]")
    rewrite(path, edit)
    with pytest.raises(svdtune.SvdtuneError, match=match):
        svdtune.read_delta(path)


def test_version_4_records_round_trip_with_the_lowest_version(saved, tmp_path):
    _, path, _ = saved
    record = svdtune.read_delta(path)
    mha = dataclasses.replace(record.layers["0"], layer_class="MultiheadAttention", part="k_proj")
    svd = svdtune.RandomizedSVD(oversample=1, iterations=2, seed=7)  # rank 2 + 1 fits the 3 x 4 weight
    five = record.layers["5"]
    layers = {"attn.k_proj": mha, "5": dataclasses.replace(five, svd=svd, delta=five.delta[:2].clone())}
    out = tmp_path / "v4.safetensors"
    svdtune.DeltaFile(layers).save(out)
    back = svdtune.read_delta(out)
    assert container.read(out)[1]["format_version"] == "4"
    assert (back.layers["attn.k_proj"].part, back.layers["5"].svd, back.layers["5"].part) == ("k_proj", svd, None)
    svdtune.DeltaFile({"5": record.layers["5"]}).save(out)
    assert container.read(out)[1]["format_version"] == "1"


# ---- item 13: the SVD cache checks each entry against its weight -------------------------------


def cache_entry_swapped(folder, weight, rank, factors, next_sigma="") -> str:
    """Write ``factors`` as the (checksummed) cache entry of (weight, rank)."""
    key = cache.cache_key(weight, rank)
    path = os.path.join(folder, f"{key}.safetensors")
    tensors = {"U": factors.U, "sigma": factors.sigma, "Vh": factors.Vh}
    container.atomic_write(path, container.encode(tensors, {"format": cache.FORMAT, "key": key, "next_sigma": next_sigma}))
    return path


@pytest.mark.parametrize("case", ["other weight", "nan", "k=3 under full rank", "other weight, truncated"])
def test_cache_entries_not_of_this_weight_are_recomputed(tmp_path, case):
    torch.manual_seed(0)
    weight, other = torch.randn(12, 9), torch.randn(12, 9)
    rank = 3 if case == "other weight, truncated" else None
    if case == "nan":
        bad = decompose(weight, None)
        bad.U = bad.U.clone()
        bad.U[0, 0] = float("nan")
    elif case == "k=3 under full rank":
        bad = decompose(weight, 3)
    else:
        bad = decompose(other, rank)
    cache_entry_swapped(tmp_path, weight, rank, bad, "" if bad.next_sigma is None else repr(bad.next_sigma))
    with pytest.warns(RuntimeWarning, match="not a decomposition of this weight|holds 3 singular triplets"):
        factors = cache.decompose_cached(weight, rank, tmp_path)
    reference = decompose(weight, rank)
    assert torch.equal(factors.U, reference.U) and torch.equal(factors.sigma, reference.sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry passes
        assert torch.equal(cache.decompose_cached(weight, rank, tmp_path).Vh, reference.Vh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, rank", [((1, 7), None), ((64, 20), None), ((20, 64), 5), ((256, 256), None)])
def test_honest_cache_entries_pass_the_check(dtype, shape, rank):
    torch.manual_seed(1)
    for weight in (torch.randn(shape), torch.randn(shape[0], 1) @ torch.randn(1, shape[1]),
                   torch.randn(shape) * torch.logspace(0, -7, shape[1])):
        weight = weight.to(dtype)
        assert cache.check_factors(decompose(weight, rank), weight) is None


# ---- item 14: svdtune never writes a file it would refuse ------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(delta=torch.full((6,), float("nan"))), "non-finite deltas"),
    (dict(scale=float("nan")), "scale 'nan'"),
    (dict(mode="warp"), "mode 'warp'"),
    (dict(delta=torch.zeros(7)), "rank 7, impossible"),
    (dict(delta=torch.zeros(6, dtype=torch.int32)), "dtype torch.int32"),
    (dict(delta=torch.zeros(2, 3)), "shape \\(2, 3\\)"),
    (dict(weight_shape=(10, 6.0)), "invalid weight shape"),
    (dict(layer_class="Lin\near"), "not a Python class name"),
])
def test_save_refuses_what_read_would_refuse(saved, tmp_path, change, match):
    record = svdtune.read_delta(saved[1])
    layer = dataclasses.replace(record.layers["0"], **change)
    out = tmp_path / "out.safetensors"
    with pytest.raises(svdtune.SvdtuneError, match=match):
        dataclasses.replace(record, layers={**record.layers, "0": layer}).save(out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("layers, match", [
    ("bad sha", "malformed fingerprint"),
    ("__metadata__", "not a module, parameter or buffer name"),
    ("a..b", "not a module, parameter or buffer name"),
    ("esc\x1b[31m", "not a module, parameter or buffer name"),
])
def test_save_refuses_bad_fingerprints_and_names(saved, tmp_path, layers, match):
    record = svdtune.read_delta(saved[1])
    layer = record.layers["0"]
    if layers == "bad sha":
        layer, name = dataclasses.replace(layer, fingerprint=dataclasses.replace(layer.fingerprint, sha256="xyz")), "0"
    else:
        name = layers
    with pytest.raises(svdtune.SvdtuneError, match=match):
        svdtune.DeltaFile({name: layer}).save(tmp_path / "out.safetensors")


def test_numpy_numbers_in_a_layer_delta_are_written_as_json_numbers(saved, tmp_path):
    record = svdtune.read_delta(saved[1])
    layer = record.layers["0"]
    numpy_layer = dataclasses.replace(layer, weight_shape=tuple(numpy.int64(s) for s in layer.weight_shape),
                                      scale=numpy.float32(0.5))
    out = tmp_path / "out.safetensors"
    svdtune.DeltaFile({"0": numpy_layer}).save(out)
    back = svdtune.read_delta(out).layers["0"]
    assert (back.weight_shape, back.scale) == (layer.weight_shape, 0.5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make", [lambda: nn.Linear(0, 5), lambda: nn.Linear(5, 0), lambda: nn.Conv2d(3, 0, 1)])
def test_apply_refuses_empty_layers(make):
    model = nn.Sequential(make())
    refused(lambda: svdtune.apply(model, ["0"]), model, "layer '0' has a weight of shape .* no singular values")


# ---- item 15: wrong argument types are SvdtuneErrors -----------------------------------------


def test_wrong_argument_types_are_svdtune_errors(saved, tmp_path):
    model, path, base = saved
    for metadata in ("x", 5, {"a": 1}, {1: "a"}):
        with pytest.raises(svdtune.SvdtuneError, match="metadata must map str to str"):
            svdtune.save_delta(model, tmp_path / "m.safetensors", metadata=metadata)
    for call in (lambda: svdtune.read_delta(5), lambda: svdtune.load_delta(base, path, cache_dir=5),
                 lambda: svdtune.apply(small(), ["0"], cache_dir=5), lambda: svdtune.save_delta(model, 5),
                 lambda: svdtune.set_scale(model, torch.ones(1, device="meta")), lambda: svdtune.report(5),
                 lambda: svdtune.DeltaFile(layers=5).save(tmp_path / "x.safetensors")):
        with pytest.raises(svdtune.SvdtuneError):
            call()
    svdtune.save_delta(model, os.fsencode(tmp_path / "bytes.safetensors"))  # bytes paths work
    assert svdtune.read_delta(os.fsencode(tmp_path / "bytes.safetensors")).layers.keys() == {"0", "3", "5"}


def test_combine_keeps_version_4_keys_and_refuses_mixing_them(saved, tmp_path):
    full = svdtune.read_delta(saved[1]).layers["5"]
    record = dataclasses.replace(full, delta=full.delta[:2].clone())  # rank 2 + oversample 1 fits the 3 x 4 weight
    svd = svdtune.RandomizedSVD(oversample=1, iterations=2, seed=7)
    with_svd = svdtune.DeltaFile({"5": dataclasses.replace(record, svd=svd)})
    combined = svdtune.combine([with_svd, with_svd], [0.5, 0.5])
    assert combined.layers["5"].svd == svd
    with pytest.raises(svdtune.SvdtuneError, match="layer '5' differs"):
        svdtune.combine([with_svd, svdtune.DeltaFile({"5": record})], [0.5, 0.5])


def test_a_weight_near_its_dtypes_largest_value_still_loads(tmp_path):
    half = nn.Sequential(nn.Linear(3, 2)).half()
    with torch.no_grad():
        half[0].weight.copy_(torch.tensor([[65500.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    source = svdtune.apply(copy.deepcopy(half), ["0"])
    with torch.no_grad():
        source[0].svd_delta.copy_(torch.tensor([0.0, 0.5]))  # the cheap bound cannot decide; W' is finite
    svdtune.save_delta(source, tmp_path / "near.safetensors")
    svdtune.load_delta(half, tmp_path / "near.safetensors")
    torch.testing.assert_close(half[0].merged_weight(), source[0].merged_weight())


def test_all_or_nothing_puts_back_everything_a_change_can_touch():
    from svdtune.transaction import all_or_nothing

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    weight, bias = model[0].weight, model[0].bias
    before = full_state(model)
    with pytest.raises(svdtune.SvdtuneError, match="tests failed at layer '0': boom; the model was rolled back"):
        with all_or_nothing(model, "tests", written=[weight, model[1].running_mean]) as progress:
            progress.current = "layer '0'"
            model.__dict__["_svdtune_requires_grad"] = {}
            model[0].__class__ = nn.LazyLinear
            model[0].register_buffer("extra", torch.zeros(1), persistent=False)
            model[0].add_module("child", nn.ReLU())
            model[0].bias = nn.Parameter(torch.ones(3))
            model[1].note = "attribute"
            model.requires_grad_(False)
            with torch.no_grad():
                weight.fill_(7.0)
                model[1].running_mean.fill_(3.0)
            raise Failure("boom")
    assert_same_state(model, before)
    assert model[0].weight is weight and model[0].bias is bias and type(model[0]) is nn.Linear
    assert "extra" not in model[0]._non_persistent_buffers_set and not hasattr(model[1], "note")
