"""save_delta / load_delta / read_delta: round trips, size, atomic writes, and every refusal."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections import OrderedDict

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import svdtune
from svdtune import container
from svdtune.model import adapted_layers
from tests.conftest import randomize_deltas


class Head(nn.Module):
    """CNNIQA's fully connected part, with its layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(100, 800), nn.Linear(800, 800), nn.Linear(800, 1)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Unflatten(1, (5, 2)), nn.Conv1d(5, 4, 2), nn.Flatten(), nn.Linear(4, 3))


def trained(model: nn.Module, targets=("0", "3", "5"), seed: int = 1, **kwargs) -> nn.Module:
    """The model adapted, with random (as if trained) deltas."""
    svdtune.apply(model, list(targets), **kwargs)
    randomize_deltas(model, seed=seed)
    return model


def snapshot(model: nn.Module):
    modules = [(n, type(m), id(m), getattr(m, "_spectral", None) and m._spectral.config) for n, m in model.named_modules()]
    params = [(n, id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    return modules, params, copy.deepcopy(model.__dict__.get("_svdtune_requires_grad"))


def assert_unchanged(model: nn.Module, before) -> None:
    modules, params, flags = snapshot(model)
    assert modules == before[0]
    assert [(n, i, g) for n, i, _, g in params] == [(n, i, g) for n, i, _, g in before[1]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(params, before[1]))
    assert flags == before[2]


def load_or_leave_unchanged(base: nn.Module, path) -> nn.Module | None:
    """load_delta into a copy of ``base``: the loaded copy, or None after a clean SvdtuneError
    that left the copy exactly as it was (any other exception fails the test)."""
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    try:
        svdtune.load_delta(fresh, path)
    except svdtune.SvdtuneError:
        assert_unchanged(fresh, before)
        return None
    return fresh


@pytest.fixture
def saved(tmp_path):
    """(adapted model, its delta file path, a fresh copy of the base model)."""
    base = small()
    model = trained(copy.deepcopy(base))
    path = tmp_path / "task.safetensors"
    svdtune.save_delta(model, path, metadata={"dataset": "unit"})
    return model, path, base


def test_round_trip_into_a_plain_model(saved):
    model, path, base = saved
    svdtune.load_delta(base, path)
    x = torch.randn(2, 6)
    torch.testing.assert_close(base(x), model(x), rtol=0, atol=0)
    assert [n for n, _ in adapted_layers(base)] == ["0", "3", "5"]
    assert {id(p) for p in svdtune.trainable_parameters(base)} == {id(l.svd_delta) for _, l in adapted_layers(base)}


def test_round_trip_keeps_rank_mode_scale_and_metadata(tmp_path):
    model = trained(small(), targets=("3",), rank=2, mode="scale")
    svdtune.apply(model, ["0"], rank=3)
    svdtune.set_scale(model, 0.5)
    svdtune.save_delta(model, tmp_path / "d.safetensors", metadata={"note": "x"})
    loaded = svdtune.read_delta(tmp_path / "d.safetensors")
    assert loaded.metadata == {"note": "x"} and loaded.svdtune_version == svdtune.__version__
    assert {n: (l.rank, l.mode, l.scale) for n, l in loaded.layers.items()} == {"0": (3, "shift", 0.5), "3": (2, "scale", 0.5)}
    fresh = svdtune.load_delta(small(), tmp_path / "d.safetensors")
    assert {n: (l.svd_delta.numel(), l.spectral_config) for n, l in adapted_layers(fresh)} == {
        n: (l.svd_delta.numel(), l.spectral_config) for n, l in adapted_layers(model)}
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_load_into_matching_adapters_copies_the_deltas(saved):
    model, path, base = saved
    svdtune.apply(base, ["0", "3", "5"])
    layers_before = [id(m) for _, m in adapted_layers(base)]
    svdtune.load_delta(base, path)
    assert [id(m) for _, m in adapted_layers(base)] == layers_before
    for (_, a), (_, b) in zip(adapted_layers(base), adapted_layers(model)):
        assert torch.equal(a.svd_delta, b.svd_delta) and a.svd_delta.requires_grad


def test_cnniqa_fc_delta_is_under_8_kb(tmp_path):
    model = trained(Head(), targets=("fc1", "fc2", "fc3"))
    path = tmp_path / "cnniqa.safetensors"
    svdtune.save_delta(model, path, metadata={"dataset": "koniq10k"})
    assert os.path.getsize(path) < 8 * 1024
    assert {n: l.rank for n, l in svdtune.read_delta(path).layers.items()} == {"fc1": 100, "fc2": 800, "fc3": 1}


def test_file_is_plain_safetensors(saved):
    model, path, _ = saved
    tensors = safetensors.torch.load_file(path)
    assert set(tensors) == {"0", "3", "5"} and torch.equal(tensors["3"], model[3].svd_delta.detach())


def test_file_matches_docs_format_md(saved):
    """Read the file with nothing but struct, json and hashlib, as docs/format.md describes it."""
    import hashlib
    import struct

    raw = saved[1].read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert (8 + size) % 8 == 0
    header = json.loads(raw[8:8 + size])
    checksum = header["__metadata__"].pop("checksum")
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert hashlib.sha256(canonical + raw[8 + size:]).hexdigest() == checksum
    meta = header["__metadata__"]
    assert (meta["format"], meta["format_version"], json.loads(meta["params"])) == ("svdtune.delta", "1", [])
    record = json.loads(meta["layers"])["3"]
    assert record["class"] == "Conv1d" and record["weight_shape"] == [4, 5, 2] and record["rank"] == 4
    begin, end = header["3"]["data_offsets"]
    assert torch.equal(torch.frombuffer(bytearray(raw[8 + size + begin:8 + size + end]), dtype=torch.float32),
                       saved[0][3].svd_delta.detach())
    weight = saved[2][3].weight.detach().float().contiguous()
    assert hashlib.sha256(weight.numpy().tobytes()).hexdigest() == record["fingerprint"]["sha256"]


def test_trainable_module_parameters_travel_with_the_deltas(tmp_path):
    base = small()
    model = copy.deepcopy(base)
    svdtune.apply(model, ["0", "3"], trainable=["5"])
    with torch.no_grad():
        model[5].weight.add_(1.0)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert set(svdtune.read_delta(tmp_path / "d.safetensors").params) == {"5.weight", "5.bias"}
    svdtune.load_delta(base, tmp_path / "d.safetensors")
    assert torch.equal(base[5].weight, model[5].weight) and base[5].weight.requires_grad


def test_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    model = trained(small())

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    old = (tmp_path / "d.safetensors").read_bytes()
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        svdtune.save_delta(trained(small(), seed=5), tmp_path / "d.safetensors")
    assert os.listdir(tmp_path) == ["d.safetensors"] and (tmp_path / "d.safetensors").read_bytes() == old


@pytest.mark.parametrize("bad", [{"a": 1}, {1: "a"}])
def test_metadata_must_be_strings(tmp_path, bad):
    with pytest.raises(svdtune.SvdtuneError, match="metadata"):
        svdtune.save_delta(trained(small()), tmp_path / "d.safetensors", metadata=bad)


def test_save_refuses_plain_models_and_trained_base_weights(tmp_path):
    with pytest.raises(svdtune.SvdtuneError, match="no svdtune layers"):
        svdtune.save_delta(small(), tmp_path / "d.safetensors")
    model = trained(small())
    model[3].base_weight.requires_grad_(True)
    with pytest.raises(svdtune.SvdtuneError, match="'3' trains its base weight"):
        svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


# ---- refusals: each names the layer, and leaves the model exactly as it was ----------------


def rewrite(path, edit) -> None:
    """Re-encode a valid file after ``edit(tensors, metadata)`` (so its checksum stays valid)."""
    tensors, metadata = container.read(path)
    edit(tensors, metadata)
    container.atomic_write(path, container.encode(tensors, metadata))


def edit_layer(name, **changes):
    def edit(tensors, metadata):
        layers = json.loads(metadata["layers"])
        layers[name].update(changes)
        metadata["layers"] = json.dumps(layers)
    return edit


def renamed_first_layer(model):
    model.add_module("first", model._modules.pop("0"))
    return model


CASES = {
    "missing layer": (lambda m: renamed_first_layer(m), None, "layer '0' of the delta file is missing"),
    "class mismatch": (lambda m: m.__setitem__(0, nn.Bilinear(6, 6, 10)) or m, None, "'0' is a Bilinear in the model but a Linear"),
    "shape mismatch": (lambda m: m.__setitem__(5, nn.Linear(4, 2)) or m, None, "'5' has weight shape \\[2, 4\\]"),
    "fingerprint": (lambda m: (m[3].weight.data.add_(1e-3), m)[1], None, "layer '3': its base weight differs"),
    "different adapters (rank)": (lambda m: svdtune.apply(m, ["0", "3", "5"], rank=1), None, "different adapter"),
    "different adapters (layers)": (lambda m: svdtune.apply(m, ["0"]), None, "adapters on other layers"),
    "unknown version": (None, lambda t, md: md.update(format_version="5"), "format version '5'"),
    "not a delta": (None, lambda t, md: md.update(format="something"), "not an svdtune delta"),
    "wrong tensor shape": (None, lambda t, md: t.update({"3": torch.zeros(5)}), "layer '3' has a delta tensor of shape \\(5,\\)"),
    "wrong tensor dtype": (None, lambda t, md: t.update({"3": t["3"].to(torch.int32)}), "layer '3' has a delta tensor .*int32"),
    "extra tensor": (None, lambda t, md: t.update({"9": torch.zeros(3)}), "tensor '9' does not match"),
    "params not names": (None, lambda t, md: md.update(params="[[1]]"), "malformed layers/params"),
    "params repeat a layer": (None, lambda t, md: md.update(params='["0"]'), "tensor '0' does not match"),
    "bad rank": (None, edit_layer("0", rank=99), "layer '0' has rank 99"),
    "bad mode": (None, edit_layer("0", mode="spin"), "layer '0' has mode 'spin'"),
    "bad fingerprint dtype": (None, edit_layer("0", fingerprint={"sha256": "0" * 64, "top_sigma": [], "dtype": "nn"}),
                              "layer '0' has a malformed fingerprint"),
    "non-finite": (None, lambda t, md: t["0"].fill_(float("nan")), "layer '0' has non-finite deltas"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusals_name_the_layer_and_change_nothing(saved, case):
    _, path, base = saved
    change_model, change_file, message = CASES[case]
    if change_model:
        base = change_model(base)
    if change_file:
        rewrite(path, change_file)
    before = snapshot(base)
    with pytest.raises(svdtune.SvdtuneError, match=message):
        svdtune.load_delta(base, path)
    assert_unchanged(base, before)


@pytest.mark.parametrize("content", [b"", b"hello, not a safetensors file at all", b"\xff" * 64])
def test_garbage_files_are_refused(saved, content):
    _, path, base = saved
    path.write_bytes(content)
    before = snapshot(base)
    with pytest.raises(svdtune.SvdtuneError, match="not a valid svdtune safetensors file"):
        svdtune.load_delta(base, path)
    assert_unchanged(base, before)


def test_truncated_and_bit_flipped_files_are_refused(saved):
    _, path, base = saved
    raw = path.read_bytes()
    for damaged in (raw[:-4], raw[: len(raw) // 2], raw[:-1] + bytes([raw[-1] ^ 1])):
        path.write_bytes(damaged)
        with pytest.raises(svdtune.SvdtuneError, match="truncated, corrupted"):
            svdtune.load_delta(base, path)
    with pytest.raises(svdtune.SvdtuneError, match="cannot read"):
        svdtune.load_delta(base, path.with_name("missing.safetensors"))


def test_fingerprint_mismatch_is_a_warning_when_not_strict(saved):
    _, path, base = saved
    with torch.no_grad():
        base[3].weight.add_(1e-3)
    with pytest.warns(UserWarning, match="layer '3': its base weight differs"):
        svdtune.load_delta(base, path, strict=False)
    assert [n for n, _ in adapted_layers(base)] == ["0", "3", "5"]


def test_fingerprint_follows_dtype_and_device_rule(saved):
    model, path, base = saved
    svdtune.load_delta(copy.deepcopy(base).double(), path)  # wider dtype: same float32 hash
    svdtune.load_delta(copy.deepcopy(base).half(), path)  # narrower: top singular values agree
    other = small(seed=7).half()
    with pytest.raises(svdtune.SvdtuneError, match="top singular values differ"):
        svdtune.load_delta(other, path)


# ---- random corruption: a clean error or the exact content, never anything in between ------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_never_half_loads(saved, tmp_path, data):
    model, path, base = saved
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        anywhere, in_data = st.integers(0, len(raw) - 1), st.integers(len(raw) - 52, len(raw) - 1)  # 13 float32 deltas
        position = data.draw(st.one_of(anywhere, in_data))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(raw if cut is None else raw[:cut]))
    fresh = load_or_leave_unchanged(base, broken)
    if fresh is None:
        return
    for (_, loaded), (_, original) in zip(adapted_layers(fresh), adapted_layers(model), strict=True):
        assert torch.equal(loaded.svd_delta, original.svd_delta)
        assert loaded.spectral_config == original.spectral_config


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["class", "weight_shape", "rank", "mode", "scale", "fingerprint"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checksummed_but_malformed_headers_are_refused_cleanly(saved, tmp_path, data):
    """Past the checksum (a file re-signed after editing), every header field is still checked."""
    model, path, base = saved
    tensors, metadata = container.read(path)
    layers = json.loads(metadata["layers"])
    if data.draw(st.booleans()):
        layers[data.draw(st.sampled_from(sorted(layers)))][data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
        metadata["layers"] = json.dumps(layers)
    else:
        metadata[data.draw(st.sampled_from(["layers", "params", "metadata", "format_version"]))] = json.dumps(data.draw(JSON))
    edited = tmp_path / "edited.safetensors"
    container.atomic_write(edited, container.encode(tensors, metadata))
    load_or_leave_unchanged(base, edited)


def test_one_metadata_check_for_every_writer(saved, tmp_path):
    model, path, _ = saved
    errors = []
    for write in (lambda: svdtune.save_delta(model, tmp_path / "a.safetensors", metadata={"a": 1}),
                  lambda: dataclasses.replace(svdtune.read_delta(path), metadata={"a": 1}).save(tmp_path / "b.safetensors"),
                  lambda: container.encode({}, {"a": 1})):
        with pytest.raises(svdtune.SvdtuneError) as caught:
            write()
        errors.append(str(caught.value))
    assert len(set(errors)) == 1 and "str() or json.dumps()" in errors[0]


def test_in_memory_delta_files_are_checked_like_files(saved):
    _, path, base = saved
    good = svdtune.read_delta(path)
    layer = good.layers["0"]
    for delta in (torch.full_like(layer.delta, float("nan")), torch.cat([layer.delta, layer.delta[:1]])):
        bad = dataclasses.replace(good, layers={**good.layers, "0": dataclasses.replace(layer, delta=delta)})
        before = snapshot(base)
        with pytest.raises(svdtune.SvdtuneError, match="in-memory DeltaFile: layer '0'"):
            svdtune.load_delta(base, bad)
        assert_unchanged(base, before)


def test_save_names_the_users_path_and_wants_safetensors(tmp_path):
    model = trained(small())
    missing = tmp_path / "no-such-folder" / "d.safetensors"
    with pytest.raises(FileNotFoundError, match="create it first") as caught:
        svdtune.save_delta(model, missing)
    assert caught.value.filename == str(missing)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(IsADirectoryError):
        svdtune.save_delta(model, tmp_path / "folder.safetensors")
    with pytest.raises(svdtune.SvdtuneError, match="must end with .safetensors"):
        svdtune.save_delta(model, tmp_path / "d.pt")
    svdtune.save_delta(model, tmp_path / "D.SAFETENSORS")
    assert sorted(os.listdir(tmp_path)) == ["D.SAFETENSORS", "folder.safetensors"]


def test_a_wrong_base_fails_on_its_hash_before_any_svd(saved, monkeypatch):
    _, path, _ = saved
    other = small(seed=9)

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran before the fingerprint check")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    with pytest.raises(svdtune.SvdtuneError, match="base weight differs"):
        svdtune.load_delta(other, path)


def bn_head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(body=nn.Linear(6, 8), head=nn.Sequential(OrderedDict(fc=nn.Linear(8, 4), bn=nn.BatchNorm1d(4)))))


def trained_bn_head(base: nn.Module) -> nn.Module:
    """A copy of ``base`` with adapted "body", a trainable head, and running stats from a few training steps."""
    model = svdtune.apply(copy.deepcopy(base), ["body"], trainable=["head"])
    randomize_deltas(model, seed=1)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 6) * 3 + 1)
    return model.eval()


def test_buffers_of_trainable_modules_travel_with_them(tmp_path):
    base = bn_head()
    model = trained_bn_head(base)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    delta = svdtune.read_delta(tmp_path / "d.safetensors")
    assert set(delta.buffers) == {"head.bn.running_mean", "head.bn.running_var", "head.bn.num_batches_tracked"}
    svdtune.load_delta(base, tmp_path / "d.safetensors")
    x = torch.randn(5, 6)
    assert torch.equal(base.eval()(x), model(x))
    assert int(base.head.bn.num_batches_tracked) == 3


def test_buffer_refusals_change_nothing(tmp_path):
    svdtune.save_delta(trained_bn_head(bn_head()), tmp_path / "d.safetensors")
    delta = svdtune.read_delta(tmp_path / "d.safetensors")
    stats = delta.buffers["head.bn.running_mean"]
    for buffers, message in (({**delta.buffers, "head.bn.extra": stats}, "buffer 'head.bn.extra' of the delta file is missing"),
                             ({**delta.buffers, "head.bn.running_mean": stats[:2]}, "buffer 'head.bn.running_mean' has shape")):
        base = bn_head()
        before, running = snapshot(base), base.head.bn.running_mean.clone()
        with pytest.raises(svdtune.SvdtuneError, match=message):
            svdtune.load_delta(base, dataclasses.replace(delta, buffers=buffers))
        assert_unchanged(base, before)
        assert torch.equal(base.head.bn.running_mean, running)


def test_files_without_buffers_stay_version_1(saved, tmp_path):
    _, path, _ = saved
    assert safetensors.safe_open(path, "pt").metadata()["format_version"] == "1"
    svdtune.save_delta(trained_bn_head(bn_head()), tmp_path / "bn.safetensors")
    metadata = safetensors.safe_open(tmp_path / "bn.safetensors", "pt").metadata()
    assert metadata["format_version"] == "2" and json.loads(metadata["buffers"])[0] == "head.bn.num_batches_tracked"


def test_load_delta_refuses_a_base_whose_layer_is_tied(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    svdtune.save_delta(trained(copy.deepcopy(model), targets=("0",)), tmp_path / "d.safetensors")
    model[2].weight = model[0].weight  # tie the base differently than at training time
    with pytest.raises(svdtune.SvdtuneError, match="tied to '2.weight'"):
        svdtune.load_delta(model, tmp_path / "d.safetensors")
    assert type(model[0]) is nn.Linear
