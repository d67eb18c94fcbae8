"""The randomized truncated SVD: accuracy against torch.linalg.svd, the method rule, the cache key,
exactness at init, and the "svd" record of delta files (load_delta, merge_files, combine)."""

from __future__ import annotations

import copy
import io
import json
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from svdtune import cache, container, progress
from svdtune.decompose import choose_svd, decompose
from svdtune.errors import SvdtuneError
from svdtune.randomized import RandomizedSVD
from tests.conftest import randomize_deltas

SHAPE, RANK = (512, 1024), 32  # 32 + 16 <= 512 / 4: "auto" picks the randomized SVD


def orthogonal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q


def spectrum_matrix(kind: str, m: int, n: int) -> torch.Tensor:
    """float32 (m, n) with a named spectrum, as in benchmarks/randomized_accuracy.py."""
    g, r = torch.Generator().manual_seed(0), min(m, n)
    if kind in ("flat", "trained"):  # a Gaussian init, plus 16 power-law spikes for "trained"
        matrix = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
        if kind == "trained":
            matrix += orthogonal(m, 16, g) @ torch.diag(4.0 * torch.arange(1, 17.0, dtype=torch.float64) ** -0.7) @ orthogonal(n, 16, g).T
        return matrix.float()
    if kind == "power":
        s = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    else:  # clustered: 6 clusters of 8 nearly equal values, then a flat tail
        s = torch.full((r,), 0.05, dtype=torch.float64)
        s[:48] = torch.repeat_interleave(0.9 ** torch.arange(6, dtype=torch.float64), 8) * (1 + 1e-4 * torch.randn(48, generator=g, dtype=torch.float64))
        s = s.sort(descending=True).values
    return ((orthogonal(m, r, g) * s) @ orthogonal(n, r, g).T).float()


# The stated accuracy of the default RandomizedSVD (oversample 16, 4 iterations) at rank 32 of 512x1024:
# (every one of the top k, the top 4) singular values within this relative error of the exact ones.
# Measured: power 4.8e-3, 5e-7; trained 3.7e-2, 1.3e-3; flat 3.7e-2, 1.2e-2; clustered 7e-7, 7e-7.
BOUNDS = {"power": (1e-2, 1e-5), "trained": (6e-2, 3e-3), "flat": (6e-2, 3e-2), "clustered": (1e-5, 1e-5)}


@pytest.mark.parametrize("kind", sorted(BOUNDS))
def test_top_singular_values_are_within_the_stated_error_of_the_exact_svd(kind):
    matrix = spectrum_matrix(kind, *SHAPE)
    exact = torch.linalg.svdvals(matrix.double())[:RANK]
    factors = decompose(matrix, RANK)
    assert factors.svd == RandomizedSVD()
    relative = (factors.sigma.double() - exact).abs() / exact
    every, top = BOUNDS[kind]
    assert float(relative.max()) <= every and float(relative[:4].max()) <= top
    # the basis is orthonormal and U diag(sigma) Vh is its projection of the matrix
    U, Vh = factors.U.double(), factors.Vh.double()
    torch.testing.assert_close(U.T @ U, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(U.T @ matrix.double() @ Vh.T, torch.diag(factors.sigma.double()), atol=1e-4, rtol=0)


def test_it_is_deterministic_and_ignores_the_global_seed():
    matrix = spectrum_matrix("power", *SHAPE)
    torch.manual_seed(1)
    first = decompose(matrix, RANK)
    torch.manual_seed(2)
    second = decompose(matrix, RANK)
    assert torch.equal(first.U, second.U) and torch.equal(first.sigma, second.sigma) and torch.equal(first.Vh, second.Vh)
    other_seed = decompose(matrix, RANK, RandomizedSVD(seed=1))
    assert not torch.equal(other_seed.U, first.U)


def test_float64_weights_are_decomposed_in_float64_and_bf16_in_float32():
    matrix = spectrum_matrix("power", *SHAPE)
    assert decompose(matrix.double(), RANK).sigma.dtype == torch.float64
    factors = decompose(matrix.bfloat16(), RANK)
    assert factors.sigma.dtype == torch.float32 and factors.U.dtype == torch.bfloat16 and factors.svd is not None


def test_the_rule_picks_the_randomized_svd_only_far_below_full_rank():
    assert choose_svd((512, 1024), 112) == RandomizedSVD()  # (112 + 16) * 4 <= 512
    assert choose_svd((512, 1024), 113) is None  # (113 + 16) * 4 > 512
    assert choose_svd((256, 4096), 8) is None  # min(m, n) < 512: the exact SVD is cheap
    assert choose_svd((512, 1024), None) is None and choose_svd((512, 1024), 32, "exact") is None
    assert choose_svd((64, 64), 40, "randomized") == RandomizedSVD()  # forced: wherever it fits
    custom = RandomizedSVD(oversample=8, iterations=2, seed=3)
    assert choose_svd((64, 64), 56, custom) is custom
    with pytest.raises(SvdtuneError, match="rank \\+ oversample"):
        choose_svd((64, 64), 60, "randomized")
    with pytest.raises(SvdtuneError, match="not an SVD method"):
        choose_svd((64, 64), 8, "lanczos")
    with pytest.raises(SvdtuneError, match="oversample"):
        RandomizedSVD(oversample=0)


def test_the_cache_key_holds_the_method_and_its_parameters(tmp_path):
    weight = spectrum_matrix("power", *SHAPE)
    keys = {cache.cache_key(weight, RANK, None), cache.cache_key(weight, RANK, RandomizedSVD()),
            cache.cache_key(weight, RANK, RandomizedSVD(oversample=8)), cache.cache_key(weight, RANK, RandomizedSVD(iterations=2)),
            cache.cache_key(weight, RANK, RandomizedSVD(seed=5))}
    assert len(keys) == 5
    stored = cache.decompose_cached(weight, RANK, tmp_path)
    again = cache.decompose_cached(weight, RANK, tmp_path)  # read back from the entry
    assert len(list(tmp_path.iterdir())) == 1 and again.svd == RandomizedSVD()
    assert torch.equal(again.U, stored.U) and torch.equal(again.sigma, decompose(weight, RANK).sigma)
    exact = cache.decompose_cached(weight, RANK, tmp_path, "exact")
    assert exact.svd is None and len(list(tmp_path.iterdir())) == 2
    torch.testing.assert_close(exact.sigma, torch.linalg.svdvals(weight)[:RANK])


def wide_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(512, 640), nn.GELU(), nn.Linear(640, 512)).to(dtype)
    with torch.no_grad():  # trained-like spectra
        for layer in (model[0], model[2]):
            layer.weight.copy_(spectrum_matrix("power", *layer.weight.shape).to(dtype) * 3)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_deltas_give_the_base_model_bit_for_bit(dtype):
    base = wide_model(dtype=dtype)
    x = torch.randn(4, 512, dtype=dtype)
    model = svdtune.apply(copy.deepcopy(base), ["0", "2"], rank=RANK)
    assert all(layer.spectral_factors().svd == RandomizedSVD() for _, layer in svdtune.model.adapted_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    merged = svdtune.merge(model)
    for key, value in base.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def trained(tmp_path, svd="auto"):
    base = wide_model()
    model = svdtune.apply(copy.deepcopy(base), ["0", "2"], rank=RANK, svd=svd)
    randomize_deltas(model, seed=3)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    return base, model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base, trained model, folder with d.safetensors and base.safetensors), svd="auto" (randomized)."""
    folder = tmp_path_factory.mktemp("randomized")
    return (*trained(folder), folder)


def test_a_delta_file_records_the_method_and_load_delta_reproduces_it(saved):
    base, model, tmp_path = saved
    _, metadata = container.read(tmp_path / "d.safetensors", "d")
    record = json.loads(metadata["layers"])["0"]
    assert metadata["format_version"] == "4"
    assert record["svd"] == {"method": "randomized", "oversample": 16, "iterations": 4, "seed": 0}
    loaded = svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")
    for (_, ours), (_, theirs) in zip(svdtune.model.adapted_layers(loaded), svdtune.model.adapted_layers(model)):
        assert ours.spectral_factors().svd == RandomizedSVD()
        assert torch.equal(ours.spectral_factors().U, theirs.spectral_factors().U)
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_exact_file_loads_with_the_exact_svd_even_where_auto_would_not(tmp_path):
    base, model = trained(tmp_path, svd="exact")
    _, metadata = container.read(tmp_path / "d.safetensors", "d")
    assert int(metadata["format_version"]) < 4 and "svd" not in json.loads(metadata["layers"])["0"]
    loaded = svdtune.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")
    assert all(layer.spectral_factors().svd is None for _, layer in svdtune.model.adapted_layers(loaded))
    other = svdtune.apply(copy.deepcopy(base), ["0", "2"], rank=RANK)  # auto: randomized
    with pytest.raises(SvdtuneError, match="decomposed by the randomized SVD .* by the exact SVD"):
        svdtune.load_delta(other, tmp_path / "d.safetensors")


def test_merge_files_uses_the_recorded_method_and_equals_merge(saved, tmp_path):
    _, model, folder = saved
    svdtune.merge_files(folder / "base.safetensors", folder / "d.safetensors", tmp_path / "m.safetensors")
    merged = safetensors.torch.load_file(tmp_path / "m.safetensors")
    expected = svdtune.merge(copy.deepcopy(model)).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)


def test_combine_keeps_the_method_and_refuses_to_mix_methods(saved, tmp_path):
    folder = saved[2]
    mix = svdtune.combine([folder / "d.safetensors"] * 2, [0.5, 0.5])
    assert mix.layers["0"].svd == RandomizedSVD()
    trained(tmp_path, svd=RandomizedSVD(iterations=2))
    with pytest.raises(SvdtuneError, match="svd method"):
        svdtune.combine([folder / "d.safetensors", tmp_path / "d.safetensors"], [0.5, 0.5])


@pytest.mark.parametrize("svd, version, match", [
    ({"method": "lanczos", "oversample": 16, "iterations": 4, "seed": 0}, "4", "svd record"),
    ({"method": "randomized", "oversample": -1, "iterations": 4, "seed": 0}, "4", "oversample"),
    ({"method": "randomized", "oversample": 16, "iterations": 4.0, "seed": 0}, "4", "iterations"),
    ({"method": "randomized", "oversample": 500, "iterations": 4, "seed": 0}, "4", "impossible for shape"),
    ({"method": "randomized", "oversample": 16, "iterations": 4, "seed": 0}, "3", "malformed record"),  # no svd in v3
])
def test_a_bad_svd_record_is_refused(saved, tmp_path, svd, version, match):
    tensors, metadata = container.read(saved[2] / "d.safetensors", "d")
    records = json.loads(metadata["layers"])
    records["0"]["svd"] = svd
    metadata.update(layers=json.dumps(records), format_version=version)
    metadata.pop(container.CHECKSUM, None)
    container.atomic_write(tmp_path / "bad.safetensors", container.encode(tensors, metadata))
    with pytest.raises(SvdtuneError, match=match):
        svdtune.read_delta(tmp_path / "bad.safetensors")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_shows_the_layer_count_on_a_terminal_only(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "REFRESH", 0.0)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.LayerProgress([3.0, 1.0]) as bar:
        bar.advance(3.0)
        bar.advance(1.0)
    assert "layer 2/2" in terminal.getvalue()
    quiet = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    with progress.LayerProgress([1.0], enabled=False) as bar:
        bar.advance(1.0)
    svdtune.apply(wide_model(), ["0", "2"], rank=RANK, progress=False)
    pipe = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress.LayerProgress([1.0]) as bar:
        bar.advance(1.0)
    assert quiet.getvalue() == "" and pipe.getvalue() == ""
