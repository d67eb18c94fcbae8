"""merge_files (no model code) against svdtune.merge, scaling, combine, basis warnings."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from tests.conftest import randomize_deltas

TARGETS = ["0", "3", "5"]


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Unflatten(1, (5, 2)), nn.Conv1d(5, 4, 2), nn.Flatten(), nn.Linear(4, 3))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    randomize_deltas(model, seed=seed)
    return model


@pytest.fixture
def files(tmp_path):
    """(base model, adapted model, base .safetensors, delta file)."""
    base = small()
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = randomize(svdtune.apply(copy.deepcopy(base), TARGETS), seed=1)
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    return base, model, tmp_path / "base.safetensors", tmp_path / "task.safetensors"


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return svdtune.merge(copy.deepcopy(model)).state_dict()


def assert_state_close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_merge_files_equals_merge_on_the_model(files, tmp_path):
    _, model, base_path, delta_path = files
    svdtune.merge_files(base_path, delta_path, tmp_path / "merged.safetensors")
    assert_state_close(safetensors.torch.load_file(tmp_path / "merged.safetensors"), merged_state(model))


@pytest.mark.parametrize("wrap", [False, True])
def test_torch_checkpoints_and_the_params_wrapping(files, tmp_path, wrap):
    base, model, _, delta_path = files
    state = base.state_dict()
    torch.save({"params": state} if wrap else state, tmp_path / "base.pth")
    svdtune.merge_files(tmp_path / "base.pth", delta_path, tmp_path / "merged.safetensors")
    assert_state_close(safetensors.torch.load_file(tmp_path / "merged.safetensors"), merged_state(model))


def test_scale_at_merge_time(files, tmp_path):
    base, model, base_path, delta_path = files
    svdtune.merge_files(base_path, delta_path, tmp_path / "zero.safetensors", scale=0.0)
    assert_state_close(safetensors.torch.load_file(tmp_path / "zero.safetensors"), base.state_dict())
    svdtune.merge_files(base_path, delta_path, tmp_path / "half.safetensors", scale=0.5)
    expected = merged_state(svdtune.set_scale(copy.deepcopy(model), 0.5))
    assert_state_close(safetensors.torch.load_file(tmp_path / "half.safetensors"), expected)


def test_merged_model_loads_into_the_plain_architecture(files, tmp_path):
    _, model, _, _ = files
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    merged = svdtune.merge(copy.deepcopy(model))
    torch.save(merged.state_dict(), tmp_path / "merged.pt")
    safetensors.torch.save_file(merged.state_dict(), tmp_path / "merged.safetensors")
    for state in (torch.load(tmp_path / "merged.pt", weights_only=True), safetensors.torch.load_file(tmp_path / "merged.safetensors")):
        plain = small(seed=3)
        plain.load_state_dict(state)  # strict: exactly the original keys
        assert not any(type(m).__module__.startswith("svdtune") for m in plain.modules())
        with torch.no_grad():
            torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_files_refusals(files, tmp_path):
    base, _, base_path, delta_path = files
    out = tmp_path / "merged.safetensors"
    with pytest.raises(svdtune.SvdtuneError, match="must end with .safetensors"):
        svdtune.merge_files(base_path, delta_path, tmp_path / "merged.pt")
    with pytest.raises(svdtune.SvdtuneError, match="must end with one of"):
        svdtune.merge_files(tmp_path / "base.npz", delta_path, out)
    state = base.state_dict()
    del state["3.weight"]
    safetensors.torch.save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(svdtune.SvdtuneError, match="layer '3' of the delta file has no weight '3.weight'"):
        svdtune.merge_files(tmp_path / "partial.safetensors", delta_path, out)
    torch.save({"params": {**base.state_dict(), "epoch": 3}}, tmp_path / "odd.pth")
    with pytest.raises(svdtune.SvdtuneError, match="entry 'epoch' is not a tensor"):
        svdtune.merge_files(tmp_path / "odd.pth", delta_path, out)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(svdtune.SvdtuneError, match="cannot read base checkpoint"):
        svdtune.merge_files(tmp_path / "junk.pt", delta_path, out)
    assert not out.exists()


def test_merge_files_checks_the_fingerprint(files, tmp_path):
    base, model, _, delta_path = files
    state = base.state_dict()
    state["0.weight"] = state["0.weight"] + 1e-3
    safetensors.torch.save_file(state, tmp_path / "other.safetensors")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(svdtune.SvdtuneError, match="layer '0': its base weight differs"):
        svdtune.merge_files(tmp_path / "other.safetensors", delta_path, out)
    with pytest.warns(UserWarning, match="merging anyway"):
        svdtune.merge_files(tmp_path / "other.safetensors", delta_path, out, strict=False)
    assert out.exists()


def degenerate_model(deltas: list[float]) -> nn.Module:
    """A Linear whose sigma = (2, 2, 2, 2): any basis is a valid SVD of it."""
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.copy_(2 * torch.eye(4))
    base = copy.deepcopy(model)
    svdtune.apply(model, ["0"])
    with torch.no_grad():
        model[0].svd_delta.copy_(torch.tensor(deltas))
    return base, model


def rotated(factors, angle: float = 0.7):
    """The same SVD with singular vectors 0 and 1 rotated into each other (valid for equal sigma)."""
    c, s = math.cos(angle), math.sin(angle)
    R = torch.tensor([[c, -s], [s, c]], dtype=factors.U.dtype)
    U, Vh = factors.U.clone(), factors.Vh.clone()
    U[:, :2], Vh[:2] = factors.U[:, :2] @ R, R.T @ factors.Vh[:2]
    return dataclasses.replace(factors, U=U, Vh=Vh)


def repeated_warnings(action) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return sum("repeated" in str(w.message) for w in caught)


@pytest.mark.parametrize("where", ["merge_files", "load_delta"])
def test_repeated_singular_values_warn_only_when_the_svd_picked_other_vectors(where, tmp_path, monkeypatch):
    base, model = degenerate_model([0.5, -0.2, 0.1, 0.0])
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    basis = svdtune.read_delta(tmp_path / "d.safetensors").layers["0"].fingerprint.basis
    assert [run.columns for run in basis] == [(0, 1, 2, 3)]

    def act():
        if where == "merge_files":
            svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
        else:
            svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")

    assert repeated_warnings(act) == 0  # the same SVD as in training: the deltas mean what they meant
    module = svdtune.offline if where == "merge_files" else svdtune.io
    decompose = module.decompose_named
    monkeypatch.setattr(module, "decompose_named", lambda *args: rotated(decompose(*args)))
    assert repeated_warnings(act) == 1  # another valid SVD: the result differs from training


def test_a_file_without_a_recorded_basis_warns_on_repeated_values(tmp_path):
    base, model = degenerate_model([0.5, -0.2, 0.1, 0.0])
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    record = svdtune.read_delta(tmp_path / "d.safetensors")
    layer = record.layers["0"]
    old = dataclasses.replace(layer, fingerprint=dataclasses.replace(layer.fingerprint, basis=()))
    dataclasses.replace(record, layers={"0": old}).save(tmp_path / "old.safetensors")
    merge = lambda: svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "old.safetensors", tmp_path / "m.safetensors")
    assert repeated_warnings(merge) == 1


def test_equal_deltas_on_repeated_values_record_no_basis_and_stay_version_1(tmp_path):
    _, model = degenerate_model([0.5, 0.5, 0.5, 0.5])
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    _, metadata = svdtune.container.read(tmp_path / "d.safetensors")
    assert metadata["format_version"] == "1"
    assert svdtune.read_delta(tmp_path / "d.safetensors").layers["0"].fingerprint.basis == ()


def test_combine_with_weights_one_zero_is_the_first_delta(files, tmp_path):
    base, model, _, delta_path = files
    other = randomize(svdtune.apply(copy.deepcopy(base), TARGETS), seed=2)
    svdtune.save_delta(other, tmp_path / "other.safetensors")
    first = svdtune.read_delta(delta_path)
    combined = svdtune.combine([delta_path, tmp_path / "other.safetensors"], weights=[1, 0])
    for name, layer in first.layers.items():
        assert torch.equal(combined.layers[name].delta, layer.delta)
        assert combined.layers[name].fingerprint == layer.fingerprint
    half = svdtune.combine([delta_path, tmp_path / "other.safetensors"], weights=[0.5, 0.5])
    expected = 0.5 * (first.layers["3"].delta + svdtune.read_delta(tmp_path / "other.safetensors").layers["3"].delta)
    torch.testing.assert_close(half.layers["3"].delta, expected)
    half.save(tmp_path / "half.safetensors")
    svdtune.load_delta(copy.deepcopy(base), tmp_path / "half.safetensors")


def test_combine_folds_different_scales(files, tmp_path):
    base, model, _, delta_path = files
    svdtune.save_delta(svdtune.set_scale(copy.deepcopy(model), 0.5), tmp_path / "half.safetensors")
    combined = svdtune.combine([delta_path, tmp_path / "half.safetensors"], weights=[1, 1])
    layer = combined.layers["0"]
    assert layer.scale == 1.0
    torch.testing.assert_close(layer.delta, 1.5 * svdtune.read_delta(delta_path).layers["0"].delta)


def test_combine_refuses_unrelated_deltas(files, tmp_path):
    base, _, _, delta_path = files
    ranked = randomize(svdtune.apply(copy.deepcopy(base), TARGETS, rank=2), seed=2)
    svdtune.save_delta(ranked, tmp_path / "ranked.safetensors")
    fewer = randomize(svdtune.apply(copy.deepcopy(base), ["0"]), seed=2)
    svdtune.save_delta(fewer, tmp_path / "fewer.safetensors")
    other_base = randomize(svdtune.apply(small(seed=9), TARGETS), seed=2)
    svdtune.save_delta(other_base, tmp_path / "other.safetensors")
    for path, message in (("ranked", "differs between"), ("fewer", "is in only one of"), ("other", "base weights")):
        with pytest.raises(svdtune.SvdtuneError, match=message):
            svdtune.combine([delta_path, tmp_path / f"{path}.safetensors"], weights=[0.5, 0.5])
    with pytest.raises(svdtune.SvdtuneError, match="one weight per delta"):
        svdtune.combine([delta_path], weights=[0.5, 0.5])


def test_bfloat16_base_round_trip(tmp_path):
    base = small().to(torch.bfloat16)
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = randomize(svdtune.apply(copy.deepcopy(base), TARGETS), seed=4)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert svdtune.read_delta(tmp_path / "d.safetensors").layers["0"].delta.dtype == torch.bfloat16
    loaded = svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    merged = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert all(merged[k].dtype == torch.bfloat16 for k in merged)
    assert_state_close(merged, merged_state(model))


def test_combine_checks_deltas_given_as_a_generator(files, tmp_path):
    base, _, _, delta_path = files
    svdtune.save_delta(randomize(svdtune.apply(copy.deepcopy(base), TARGETS, rank=2), seed=2), tmp_path / "r.safetensors")
    paths = (p for p in (delta_path, tmp_path / "r.safetensors"))
    with pytest.raises(svdtune.SvdtuneError, match="differs between delta 0"):
        svdtune.combine(paths, weights=iter([0.5, 0.5]))


def _bad_deltas(path):
    """In-memory DeltaFiles whose first layer has a NaN delta, or one delta too many."""
    good = svdtune.read_delta(path)
    name, layer = next(iter(good.layers.items()))
    bad = {"nan": layer.delta.clone().fill_(float("nan")), "long": torch.cat([layer.delta, layer.delta[:1]])}
    return name, {why: dataclasses.replace(good, layers={**good.layers, name: dataclasses.replace(layer, delta=d)})
                  for why, d in bad.items()}


def test_in_memory_deltas_are_checked_like_files(files, tmp_path):
    _, _, base_path, delta_path = files
    name, bad = _bad_deltas(delta_path)
    for why, delta in bad.items():
        for use in (lambda: svdtune.merge_files(base_path, delta, tmp_path / "m.safetensors"),
                    lambda: svdtune.combine([delta_path, delta], [0.5, 0.5])):
            with pytest.raises(svdtune.SvdtuneError, match=f"layer {name!r}"):
                use()
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("suffix", [".PT", ".Pth", ".ckpt", ".SAFETENSORS"])
def test_base_suffixes_in_any_case_and_ckpt(files, tmp_path, suffix):
    base, model, _, delta_path = files
    path = tmp_path / f"base{suffix}"
    if suffix == ".SAFETENSORS":
        safetensors.torch.save_file(base.state_dict(), path)
    else:
        torch.save(base.state_dict(), path)
    svdtune.merge_files(path, delta_path, tmp_path / "merged.safetensors")
    assert_state_close(safetensors.torch.load_file(tmp_path / "merged.safetensors"), merged_state(model))


def test_a_wrong_base_fails_on_its_hash_before_any_svd(files, tmp_path, monkeypatch):
    _, _, _, delta_path = files
    safetensors.torch.save_file(small(seed=9).state_dict(), tmp_path / "other.safetensors")

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran before the fingerprint check")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    with pytest.raises(svdtune.SvdtuneError, match="base weight differs"):
        svdtune.merge_files(tmp_path / "other.safetensors", delta_path, tmp_path / "m.safetensors")


def test_merge_files_writes_the_trained_modules_buffers(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(body=nn.Linear(6, 8), head=nn.Sequential(OrderedDict(fc=nn.Linear(8, 4), bn=nn.BatchNorm1d(4)))))
    model = randomize(svdtune.apply(copy.deepcopy(base), ["body"], trainable=["head"]), seed=1)
    model.train()(torch.randn(16, 6) * 3 + 1)
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    assert_state_close(safetensors.torch.load_file(tmp_path / "m.safetensors"), merged_state(model))
    with pytest.raises(svdtune.SvdtuneError, match="parameters or buffers"):
        svdtune.combine([tmp_path / "d.safetensors"], [1.0])


def test_legacy_torch_save_format_is_read_whole(files, tmp_path):
    base, model, _, delta_path = files
    torch.save(base.state_dict(), tmp_path / "base.pt", _use_new_zipfile_serialization=False)
    svdtune.merge_files(tmp_path / "base.pt", delta_path, tmp_path / "merged.safetensors")
    assert_state_close(safetensors.torch.load_file(tmp_path / "merged.safetensors"), merged_state(model))


def test_a_mapped_base_with_misaligned_tensors_merges_and_stays_unchanged_on_disk(files, tmp_path):
    base, model, _, delta_path = files
    # svdtune's own writer orders tensors by name: an odd-length float16 tensor first
    # leaves every float32 tensor after it on an odd address in the file
    state = {"0.bias": base.state_dict()["0.bias"], "00_odd": torch.arange(3, dtype=torch.float16)}
    state = {**base.state_dict(), **state}
    path = tmp_path / "base.safetensors"
    svdtune.container.atomic_write(path, svdtune.container.encode(state, {}))
    before = path.read_bytes()
    svdtune.merge_files(path, delta_path, tmp_path / "merged.safetensors")
    merged = safetensors.torch.load_file(tmp_path / "merged.safetensors")
    assert torch.equal(merged.pop("00_odd"), state["00_odd"])
    assert_state_close(merged, merged_state(model))
    assert path.read_bytes() == before


def test_mapped_tensors_are_private_writable_copies(tmp_path):
    path = tmp_path / "t.safetensors"
    svdtune.container.atomic_write(path, svdtune.container.encode({"a": torch.ones(3), "b": torch.zeros(2, 2)}, {}))
    before = path.read_bytes()
    tensors, _ = svdtune.container.read(path, mapped=True)
    tensors["a"].add_(1)
    assert torch.equal(tensors["a"], torch.full((3,), 2.0)) and torch.equal(tensors["b"], torch.zeros(2, 2))
    assert path.read_bytes() == before


@pytest.mark.parametrize("edit, message", [
    (lambda fp, md: fp["basis"][0].update(columns=[3, 4]), "columns \\[3, 4\\] not consecutive below rank 4"),
    (lambda fp, md: fp["basis"][0].update(columns=[1, 0]), "not consecutive"),
    (lambda fp, md: fp["basis"][0].update(columns=[True]), "malformed fingerprint basis"),
    (lambda fp, md: fp["basis"][0].update(sha256="xyz"), "bad hash"),
    (lambda fp, md: fp.update(basis=[]), "malformed fingerprint basis"),
    (lambda fp, md: fp["basis"].append(dict(fp["basis"][0])), "overlap or are out of order"),
    (lambda fp, md: md.update(format_version="2"), "records a singular basis, which format version 2 does not have"),
    (lambda fp, md: fp["basis"][0].update(probes=[0.1]), "probes are not 16 finite numbers"),
    (lambda fp, md: fp["basis"][0].pop("probes"), "malformed fingerprint basis"),
], ids=["beyond rank", "unordered", "bool column", "bad hash", "empty list", "overlapping runs", "old version",
        "short probes", "no probes"])
def test_a_malformed_basis_is_refused(edit, message, tmp_path):
    _, model = degenerate_model([0.5, -0.2, 0.1, 0.0])
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    tensors, metadata = svdtune.container.read(tmp_path / "d.safetensors")
    records = json.loads(metadata["layers"])
    edit(records["0"]["fingerprint"], metadata)
    metadata["layers"] = json.dumps(records)
    svdtune.container.atomic_write(tmp_path / "d.safetensors", svdtune.container.encode(tensors, metadata))
    with pytest.raises(svdtune.SvdtuneError, match=message):
        svdtune.read_delta(tmp_path / "d.safetensors")


def model_with_spectrum(sigma: list[float], rank: int | None = None, deltas: list[float] | None = None):
    """(base, adapted) Linear with singular values ``sigma`` (repeated ones stay repeated up to
    float32 rounding) in random singular bases, and the given deltas."""
    generator = torch.Generator().manual_seed(3)
    n = len(sigma)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    base = nn.Sequential(nn.Linear(n, n, bias=False))
    with torch.no_grad():
        base[0].weight.copy_((q1 * torch.tensor(sigma, dtype=torch.float64)) @ q2.T)
    model = svdtune.apply(copy.deepcopy(base), ["0"], rank=rank)
    with torch.no_grad():
        model[0].svd_delta.copy_(torch.tensor(deltas))
    return base, model


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_recorded_basis_is_checked_in_another_dtype_too(dtype, tmp_path):
    base, model = model_with_spectrum([3, 2, 2, 1, 0.5, 0.25], deltas=[0, 0.5, -0.5, 0, 0, 0])
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert [run.columns for run in svdtune.read_delta(tmp_path / "d.safetensors").layers["0"].fingerprint.basis] == [(1, 2)]
    other = copy.deepcopy(base).to(dtype)
    assert repeated_warnings(lambda: svdtune.load_delta(other, tmp_path / "d.safetensors")) == 1


def test_a_repeated_pair_across_the_last_tuned_value_is_recorded_and_checked(tmp_path, monkeypatch):
    base, model = model_with_spectrum([3, 2, 2, 1], rank=2, deltas=[0, 0.5])  # sigma_1 tuned, sigma_2 not
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert [run.columns for run in svdtune.read_delta(tmp_path / "d.safetensors").layers["0"].fingerprint.basis] == [(1,)]
    merge = lambda: svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    load = lambda: svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")
    assert repeated_warnings(merge) == 0 and repeated_warnings(load) == 0
    decompose = svdtune.io.decompose_named

    def flipped(*args):  # another valid SVD: vector 1 with the other sign
        factors = decompose(*args)
        U, Vh = factors.U.clone(), factors.Vh.clone()
        U[:, 1], Vh[1] = -U[:, 1], -Vh[1]
        return dataclasses.replace(factors, U=U, Vh=Vh)

    monkeypatch.setattr(svdtune.io, "decompose_named", flipped)
    assert repeated_warnings(load) == 1


def test_combine_keeps_every_recorded_run_and_warns_on_conflicting_ones(tmp_path):
    sigma = [3, 3, 2, 2, 1, 0.5]
    _, a = model_with_spectrum(sigma, deltas=[0.5, -0.5, 0, 0, 0, 0])
    base, b = model_with_spectrum(sigma, deltas=[0, 0, 0.3, -0.3, 0, 0])
    svdtune.save_delta(a, tmp_path / "a.safetensors")
    svdtune.save_delta(b, tmp_path / "b.safetensors")
    mix = svdtune.combine([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], [1.0, 1.0])
    assert [run.columns for run in mix.layers["0"].fingerprint.basis] == [(0, 1), (2, 3)]
    assert repeated_warnings(lambda: svdtune.load_delta(copy.deepcopy(base), mix)) == 0
    layer = svdtune.read_delta(tmp_path / "a.safetensors").layers["0"]
    other_vectors = dataclasses.replace(layer.fingerprint.basis[0], sha256="0" * 64)
    foreign = dataclasses.replace(layer, fingerprint=dataclasses.replace(layer.fingerprint, basis=(other_vectors,)))
    with pytest.warns(RuntimeWarning, match=r"different singular vectors for the repeated singular values \[0, 1\]"):
        svdtune.combine([tmp_path / "a.safetensors", svdtune.DeltaFile({"0": foreign})], [0.5, 0.5])


@pytest.mark.parametrize("weights", [[np.float32(0.5), torch.tensor(0.5)], [np.array(0.5), np.array([0.5])]], ids=["scalars", "arrays"])
def test_combine_takes_numpy_and_tensor_weights(weights, files, tmp_path):
    _, _, _, delta_path = files
    mix = svdtune.combine([delta_path, delta_path], weights)
    first = svdtune.read_delta(delta_path)
    for name, layer in mix.layers.items():
        torch.testing.assert_close(layer.delta, first.layers[name].delta)


def test_inspect_lists_the_recorded_singular_vectors(tmp_path, capsys):
    _, model = model_with_spectrum([3, 2, 2, 1, 0.5, 0.25], deltas=[0, 0.5, -0.5, 0, 0, 0])
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    from svdtune.cli import main

    assert main(["inspect", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "svdtune delta v3" in out and "recorded for repeated singular values: 0 [1, 2]" in out


def test_repeated_values_whose_shifts_differ_immaterially_never_warn(tmp_path, monkeypatch):
    base, model = degenerate_model([0.5, 0.5 + 1e-4, 0.5, 0.5])  # 1e-4 < 1e-3 * sigma_max = 2e-3
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert svdtune.read_delta(tmp_path / "d.safetensors").layers["0"].fingerprint.basis == ()
    decompose = svdtune.io.decompose_named
    monkeypatch.setattr(svdtune.io, "decompose_named", lambda *args: rotated(decompose(*args)))
    assert repeated_warnings(lambda: svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")) == 0


@pytest.mark.parametrize("angle, warns", [(1e-4, False), (0.05, True)])
def test_the_warning_weighs_how_far_the_vectors_turned(angle, warns, tmp_path, monkeypatch):
    base, model = degenerate_model([0.5, -0.2, 0.1, 0.0])  # shifts spread 0.7 around sigma_max = 2
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    decompose = svdtune.io.decompose_named
    monkeypatch.setattr(svdtune.io, "decompose_named", lambda *args: rotated(decompose(*args), angle))
    # a turn of t moves W' by up to 0.7 sin(t): 7e-5 is float noise, 0.035 is not (the limit is 1e-3 * 2)
    assert repeated_warnings(lambda: svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")) == warns


@pytest.mark.parametrize("angle", [1e-5, 1e-3, 0.1, 0.7, 1.2])
def test_turn_angle_recovers_a_rotation_from_the_probes(angle):
    from svdtune.basis import _probes, turn_angle

    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(50, 2, generator=generator, dtype=torch.float64))
    Vh = torch.linalg.qr(torch.randn(40, 2, generator=generator, dtype=torch.float64))[0].T
    c, s = math.cos(angle), math.sin(angle)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    estimate = turn_angle(_probes(U, Vh, (0, 1)), _probes(U @ R, (Vh.T @ R).T, (0, 1)))
    assert estimate == pytest.approx(min(angle, math.pi / 2), rel=1e-6, abs=1e-9)
