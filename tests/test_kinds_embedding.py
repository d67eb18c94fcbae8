"""nn.Embedding and nn.EmbeddingBag: the (num_embeddings, dim) matrix, against dense references."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from conftest import randomize_deltas
from kinds_reference import assert_same_state, reference_matrix, state
from svdtune import decompose
from svdtune.errors import SvdtuneError


class Tagger(nn.Module):
    def __init__(self, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=padding_idx)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


class Bags(nn.Module):
    def __init__(self, mode: str = "sum", padding_idx: int | None = None) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(25, 6, mode=mode, padding_idx=padding_idx)

    def forward(self, ids, offsets, weights=None):
        return self.bag(ids, offsets, per_sample_weights=weights)


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


IDS = torch.tensor([[0, 3, 7, 0, 29], [5, 5, 1, 0, 12]])
BAG_IDS, OFFSETS = torch.tensor([0, 4, 4, 9, 24, 3, 0, 2]), torch.tensor([0, 3, 3, 6])  # bag 1 is empty


def reference_grad(weight: torch.Tensor, delta: torch.Tensor, lookup, grad_out: torch.Tensor) -> torch.Tensor:
    """d(sum(lookup(W'(delta)) * grad_out))/d delta, with W' built densely in float64."""
    delta = delta.detach().double().requires_grad_(True)
    U, sigma, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    k = delta.numel()
    adapted = (U * torch.cat([torch.relu(sigma[:k] + delta), sigma[k:]])) @ Vh
    (lookup(adapted) * grad_out.double()).sum().backward()
    return delta.grad


@pytest.mark.parametrize("rank", [None, 3])
def test_embedding_exact_init_forward_and_gradients_with_padding(rank):
    model = seeded(Tagger)
    with torch.no_grad():
        model.emb.weight[0].normal_()  # a padding row that is not zero, as a loaded checkpoint may have
        before = model(IDS)
    svdtune.apply(model, "emb", rank=rank)
    assert isinstance(model.emb, nn.Embedding) and model.emb.svd_delta.numel() == (rank or 8)
    with torch.no_grad():
        assert torch.equal(model(IDS), before)
    randomize_deltas(model)
    expected = reference_matrix(model.emb.base_weight, model.emb.svd_delta)
    torch.testing.assert_close(model.emb.merged_weight().double(), expected, rtol=1e-5, atol=1e-6)
    out = model.emb(IDS)  # training: gathered rows of U, never the whole W'
    torch.testing.assert_close(out.double(), F.embedding(IDS, expected), rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    # nn.Embedding semantics: positions holding padding_idx pass no gradient
    reference = reference_grad(model.emb.base_weight, model.emb.svd_delta,
                               lambda w: F.embedding(IDS, w, padding_idx=0), grad_out)
    torch.testing.assert_close(model.emb.svd_delta.grad.double(), reference, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.emb(IDS), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, padding_idx, weighted", [("sum", None, True), ("mean", 4, False), ("max", None, False)])
def test_embedding_bag_forward_and_gradients_match_the_dense_reference(mode, padding_idx, weighted):
    model = seeded(lambda: Bags(mode, padding_idx))
    weights = torch.rand(BAG_IDS.shape) if weighted else None
    with torch.no_grad():
        before = model(BAG_IDS, OFFSETS, weights)
    svdtune.apply(model, "bag", rank=4)
    with torch.no_grad():
        assert torch.equal(model(BAG_IDS, OFFSETS, weights), before)
    randomize_deltas(model)
    bag = model.bag

    def lookup(weight):
        return F.embedding_bag(BAG_IDS, weight, OFFSETS, mode=mode, per_sample_weights=None if weights is None
                               else weights.to(weight.dtype), padding_idx=padding_idx)

    out = model(BAG_IDS, OFFSETS, weights)
    expected = lookup(reference_matrix(bag.base_weight, bag.svd_delta))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    reference = reference_grad(bag.base_weight, bag.svd_delta, lookup, grad_out)
    torch.testing.assert_close(bag.svd_delta.grad.double(), reference, rtol=1e-4, atol=1e-6)


def test_embedding_bag_of_fixed_size_bags_and_last_offset():
    model = seeded(lambda: Bags("sum"))
    model.bag.include_last_offset = True
    svdtune.apply(model, "bag")
    randomize_deltas(model)
    expected = reference_matrix(model.bag.base_weight, model.bag.svd_delta)
    ids = torch.tensor([[1, 2, 3], [4, 4, 0]])
    torch.testing.assert_close(model.bag(ids).double(), F.embedding_bag(ids, expected, mode="sum"), rtol=1e-5, atol=1e-6)
    offsets = torch.tensor([0, 2, 8])  # include_last_offset: two bags
    torch.testing.assert_close(model(BAG_IDS, offsets).double(), F.embedding_bag(
        BAG_IDS, expected, offsets, mode="sum", include_last_offset=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", [Tagger, lambda: Bags("mean")], ids=["Embedding", "EmbeddingBag"])
def test_save_load_merge_merge_files_restore(factory, tmp_path):
    model = seeded(factory)
    name = "emb" if isinstance(model, Tagger) else "bag"
    inputs = (IDS,) if name == "emb" else (BAG_IDS, OFFSETS)
    svdtune.apply(model, name, rank=5)
    randomize_deltas(model)
    with torch.no_grad():
        adapted = model(*inputs)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    meta = safetensors.safe_open(tmp_path / "d.safetensors", "pt").metadata()
    assert meta["format_version"] == "4"
    assert json.loads(meta["layers"])[name]["class"] == type(getattr(model, name)).__bases__[1].__name__

    fresh = seeded(factory)
    safetensors.torch.save_file(fresh.state_dict(), tmp_path / "base.safetensors")
    svdtune.load_delta(fresh, tmp_path / "d.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), adapted)
    svdtune.merge(fresh)
    assert type(getattr(fresh, name)) in (nn.Embedding, nn.EmbeddingBag)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs), adapted, rtol=1e-5, atol=1e-6)
    svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    offline = safetensors.torch.load_file(tmp_path / "m.safetensors")
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(offline[key], value, rtol=1e-6, atol=1e-6)

    base = seeded(factory)
    expected = state(base)
    svdtune.apply(base, name)
    svdtune.restore(base)
    assert_same_state(base, expected)


def test_max_norm_is_refused_with_what_to_do():
    model = seeded(Tagger)
    model.emb.max_norm = 1.0
    with pytest.raises(SvdtuneError, match="max_norm=1.0, which renormalizes"):
        svdtune.apply(model, "emb")
    assert type(model.emb) is nn.Embedding


def test_tied_embeddings_are_refused_saying_how_to_untie():
    model = seeded(Tagger)
    model.out = nn.Linear(8, 30, bias=False)
    model.out.weight = model.emb.weight
    with pytest.raises(SvdtuneError, match=r"tied to .*emb.weight = nn.Parameter\(emb.weight.detach\(\).clone\(\)\).*"
                                           "tie_word_embeddings = False"):
        svdtune.apply(model, "*")


def test_a_full_svd_of_a_huge_matrix_warns_with_its_time_and_rank_k_does_not(monkeypatch):
    monkeypatch.setattr(decompose, "SLOW_SVD_ENTRIES", 100)  # 30 x 8 = 240 entries count as huge
    with pytest.warns(RuntimeWarning, match=r"layer 'emb': a full SVD of its 30 x 8 matrix .* takes about \d+ s.*rank=k"):
        svdtune.apply(seeded(Tagger), "emb")
    with pytest.warns(RuntimeWarning) as record:
        svdtune.apply(seeded(Tagger), "emb", rank=3)
        import warnings
        warnings.warn("sentinel", RuntimeWarning)
    assert [str(w.message) for w in record] == ["sentinel"]


def test_the_time_estimate_follows_the_cost_model():
    small, large = decompose.full_svd_seconds(1000, 100), decompose.full_svd_seconds(4000, 400)
    assert large == pytest.approx(small * 64)  # m * n * min(m, n)
