"""The on-disk SVD cache: reuse, keys, damaged entries, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import pytest
import torch
from torch import nn

import svdtune
from svdtune import cache
from svdtune.decompose import decompose


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.Conv1d(8, 6, 3))


@pytest.fixture
def svd_calls(monkeypatch):
    """Counts every torch.linalg.svd call made while the test runs."""
    calls = []
    real = torch.linalg.svd

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    return calls


def _entries(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_second_apply_computes_no_svd(tmp_path, svd_calls):
    model = _model()
    svdtune.apply(model, ["0", "2", "3"], cache_dir=tmp_path)
    assert len(svd_calls) == 3 and len(_entries(tmp_path)) == 3
    first = {name: layer.spectral_factors() for name, layer in svdtune.model.adapted_layers(model)}
    svdtune.restore(model)
    svdtune.apply(model, ["0", "2", "3"], cache_dir=tmp_path)
    assert len(svd_calls) == 3, "the warm apply recomputed an SVD"
    for name, layer in svdtune.model.adapted_layers(model):
        again = layer.spectral_factors()
        assert torch.equal(again.U, first[name].U) and torch.equal(again.sigma, first[name].sigma)
        assert torch.equal(again.Vh, first[name].Vh) and again.full_rank == first[name].full_rank


def test_cached_result_equals_direct_decomposition(tmp_path):
    weight = torch.randn(9, 5, dtype=torch.float64)
    cache.decompose_cached(weight, 3, tmp_path)
    stored = cache.decompose_cached(weight, 3, tmp_path)
    direct = decompose(weight, 3)
    assert stored.U.dtype == torch.float64 and stored.sigma.dtype == torch.float64
    assert torch.equal(stored.U, direct.U) and torch.equal(stored.sigma, direct.sigma) and torch.equal(stored.Vh, direct.Vh)
    assert not stored.full_rank and stored.next_sigma == direct.next_sigma
    assert stored.next_sigma == pytest.approx(float(torch.linalg.svdvals(weight)[3]), rel=1e-12)  # (another LAPACK call)
    full = cache.decompose_cached(weight, None, tmp_path), cache.decompose_cached(weight, None, tmp_path)
    assert full[0].next_sigma is None and full[1].next_sigma is None


@pytest.mark.parametrize("value", ["", "nan", "-1", "abc"])
def test_an_entry_with_a_bad_next_sigma_is_recomputed(value, tmp_path):
    weight = torch.randn(9, 5)
    expected = cache.decompose_cached(weight, 2, tmp_path)
    (entry,) = _entries(tmp_path)
    tensors, metadata = svdtune.container.read(tmp_path / entry)
    metadata["next_sigma"] = value
    svdtune.container.atomic_write(tmp_path / entry, svdtune.container.encode(tensors, metadata))
    with pytest.warns(RuntimeWarning, match="next_sigma"):
        again = cache.decompose_cached(weight, 2, tmp_path)
    assert again.next_sigma == expected.next_sigma


def _one_ulp_up(weight: torch.Tensor) -> torch.Tensor:
    changed = weight.clone()
    changed[0, 0] = torch.nextafter(changed[0, 0], torch.tensor(float("inf")))
    return changed


def test_key_depends_on_bytes_shape_dtype_and_rank():
    weight = torch.randn(6, 4)
    keys = {
        cache.cache_key(weight, None),
        cache.cache_key(weight, 2),
        cache.cache_key(weight.reshape(4, 6), None),
        cache.cache_key(weight.double(), None),
        cache.cache_key(_one_ulp_up(weight), None),
    }
    assert len(keys) == 5
    assert cache.cache_key(weight.clone(), None) == cache.cache_key(weight, None)


def test_damaged_entry_is_recomputed_with_a_warning(tmp_path, svd_calls):
    weight = torch.randn(10, 7)
    expected = cache.decompose_cached(weight, None, tmp_path)
    (entry,) = _entries(tmp_path)
    raw = bytearray((tmp_path / entry).read_bytes())
    raw[-5] ^= 0x40  # flip one bit of Vh's data: still a well-formed safetensors file
    (tmp_path / entry).write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum"):
        again = cache.decompose_cached(weight, None, tmp_path)
    assert len(svd_calls) == 2 and torch.equal(again.Vh, expected.Vh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry is sound
        cache.decompose_cached(weight, None, tmp_path)
    assert len(svd_calls) == 2


def test_truncated_entry_is_recomputed(tmp_path):
    weight = torch.randn(5, 5)
    cache.decompose_cached(weight, None, tmp_path)
    (entry,) = _entries(tmp_path)
    (tmp_path / entry).write_bytes((tmp_path / entry).read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match="Recomputing"):
        factors = cache.decompose_cached(weight, None, tmp_path)
    assert torch.equal(factors.sigma, decompose(weight, None).sigma)


def test_unwritable_folder_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="not cached"):
        factors = cache.decompose_cached(torch.randn(4, 3), None, blocker / "cache")
    assert factors.sigma.shape == (3,)


def _fill(folder: str, seed: int) -> None:
    """A worker: decompose the same 12 weights (in a different order per worker), 3 rounds."""
    torch.set_num_threads(1)
    weights = [torch.Generator().manual_seed(i) for i in range(12)]
    weights = [torch.randn(48, 40, generator=g) for g in weights]
    order = list(range(12)) if seed == 0 else list(reversed(range(12)))
    for _ in range(3):
        for i in order:
            cache.decompose_cached(weights[i], None, folder)


def test_two_processes_fill_one_cache(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill, args=(str(tmp_path), seed)) for seed in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(_entries(tmp_path)) == 12, f"stray files: {_entries(tmp_path)}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(12):
            weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(i))
            assert torch.equal(cache.decompose_cached(weight, None, tmp_path).sigma, decompose(weight, None).sigma)


def test_load_delta_uses_the_cache(tmp_path, svd_calls):
    trained = svdtune.apply(_model(), ["0", "2"], cache_dir=tmp_path / "cache")
    svdtune.save_delta(trained, tmp_path / "d.safetensors")
    assert len(svd_calls) == 2
    svdtune.load_delta(_model(), tmp_path / "d.safetensors", cache_dir=tmp_path / "cache")
    assert len(svd_calls) == 2


def test_one_driver_choice_decides_the_svd_and_the_cache_key(monkeypatch):
    from svdtune import decompose as decompose_module

    assert decompose_module.svd_driver(torch.device("cpu")) is None
    assert decompose_module.svd_driver(torch.device("cuda")) == "gesvd"
    weight = torch.randn(5, 4)
    before = cache.cache_key(weight, None)
    monkeypatch.setattr(cache, "svd_driver", lambda device: "gesvdj")
    assert cache.cache_key(weight, None) != before  # the key follows the shared choice


def test_decompose_named_puts_the_layer_name_in_the_error():
    with pytest.raises(svdtune.SvdtuneError, match=r"^layer 'fc1': the weight contains NaN"):
        cache.decompose_named("fc1", torch.full((3, 2), float("nan")), None, None)
