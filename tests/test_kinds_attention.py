"""nn.MultiheadAttention's q/k/v projections (packed in_proj_weight, or separate weights) against dense references."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.func import functional_call

import svdtune
from conftest import randomize_deltas
from kinds_reference import assert_same_state, reference_matrix, state
from svdtune.errors import SvdtuneError


class Attention(nn.Module):
    """Self-attention around one nn.MultiheadAttention (the root module cannot be a target)."""

    def __init__(self, batch_first: bool = True, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kwargs)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=need_weights)[0]


class Block(nn.Module):
    """torchvision's ViT EncoderBlock in miniature: pre-norm attention (need_weights=False) and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.self_attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """A torchvision-style ViT from plain torch: conv patches, a class token, blocks, heads.head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 16, 4, stride=4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.encoder = nn.Sequential(Block(), Block())
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(16, 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def reference_in_proj(attn: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """The adapted projection weights, each part decomposed separately by torch.linalg.svd (float64)."""
    def delta(part):
        return getattr(attn, f"svd_delta_{part}")
    if attn._qkv_same_embed_dim:
        blocks = attn.base_weight.chunk(3)
        return {"in_proj_weight": torch.cat([reference_matrix(b, delta(p)) for b, p in zip(blocks, ("q_proj", "k_proj", "v_proj"))])}
    return {f"{p}_weight": reference_matrix(attn._parameters[f"{p}_weight"], delta(p)) for p in ("q_proj", "k_proj", "v_proj")}


def plain_with(model: nn.Module, module: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` restored to plain modules, with ``weights`` set on ``module``."""
    plain = copy.deepcopy(model)
    svdtune.restore(plain)
    target = plain.get_submodule(module)
    with torch.no_grad():
        for name, value in weights.items():
            getattr(target, name).copy_(value)
    return plain


def counted(monkeypatch, name: str) -> list[int]:
    """Count the calls of ``torch.<name>`` (a fused kernel), still calling it."""
    calls, kernel = [], getattr(torch, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, name, wrapper)
    return calls


@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_qkv_get_separate_spectra_exact_init_and_match_the_dense_reference(batch_first, monkeypatch):
    model = seeded(lambda: Attention(batch_first))
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    with torch.no_grad():
        before = [model(x, need_weights=w) for w in (False, True)]
    svdtune.apply(model, "attn")
    attn = model.attn
    assert attn.spectral_parts() == ("q_proj", "k_proj", "v_proj") and attn.svd_delta_q_proj.shape == (16,)
    with torch.no_grad():
        assert torch.equal(model(x, need_weights=False), before[0]) and torch.equal(model(x, need_weights=True), before[1])
    randomize_deltas(model)
    plain = plain_with(model, "attn", reference_in_proj(attn))
    calls = counted(monkeypatch, "_native_multi_head_attention")
    with torch.no_grad():
        fast, slow, expected = model(x, need_weights=False), model(x, need_weights=True), plain(x, need_weights=False)
    assert len(calls) == (3 if batch_first else 0)  # the fused path (batch_first only): three calls above
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)  # the fused path sees the deltas
    torch.testing.assert_close(slow, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before[0], atol=1e-3)
    model.train()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # training forward (autograd)


def test_gradients_of_each_part_match_a_dense_reference():
    model = seeded(Attention)
    svdtune.apply(model, "attn", rank=5)
    randomize_deltas(model)
    model.train()
    x = torch.randn(2, 5, 16)
    grad_out = torch.randn(2, 5, 16)
    (model(x) * grad_out).sum().backward()

    attn = model.attn
    deltas = {p: getattr(attn, f"svd_delta_{p}").detach().double().requires_grad_(True) for p in ("q_proj", "k_proj", "v_proj")}
    blocks = []
    for block, part in zip(attn.base_weight.detach().double().chunk(3), deltas):
        U, sigma, Vh = torch.linalg.svd(block, full_matrices=False)
        new = torch.cat([torch.relu(sigma[:5] + deltas[part]), sigma[5:]])
        blocks.append((U * new) @ Vh)
    plain = plain_with(model, "attn", {}).double().train()
    out = functional_call(plain, {"attn.in_proj_weight": torch.cat(blocks)}, (x.double(),))
    (out * grad_out.double()).sum().backward()
    for part, delta in deltas.items():
        torch.testing.assert_close(getattr(attn, f"svd_delta_{part}").grad.double(), delta.grad, rtol=1e-4, atol=1e-5)


def test_separate_qkv_weights_kdim_vdim(tmp_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2, kdim=10, vdim=12)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "base.safetensors")
    q, k, v = torch.randn(3, 2, 16), torch.randn(4, 2, 10), torch.randn(4, 2, 12)
    with torch.no_grad():
        before = model.attn(q, k, v)[0]
    svdtune.apply(model, ["attn", "out_proj"])
    shapes = {row.name: row.weight_shape for row in svdtune.report(model).rows}
    assert shapes == {"attn.q_proj": (16, 16), "attn.k_proj": (16, 10), "attn.v_proj": (16, 12), "attn.out_proj": (16, 16)}
    with torch.no_grad():
        assert torch.equal(model.attn(q, k, v)[0], before)
    randomize_deltas(model)
    expected = reference_in_proj(model.attn)
    plain = plain_with(model, "attn", expected)
    plain.attn.out_proj.weight.data.copy_(model.attn.out_proj.merged_weight())
    torch.testing.assert_close(model.attn(q, k, v)[0], plain.attn(q, k, v)[0], rtol=1e-5, atol=1e-5)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    svdtune.merge(model)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(model.attn, name).double(), value, rtol=1e-5, atol=1e-5)
    svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    offline = safetensors.torch.load_file(tmp_path / "m.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(offline[name], value, rtol=1e-6, atol=1e-6)


def test_transformer_encoder_layer_fast_path_sees_the_deltas(monkeypatch):
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        before = model(x)
    svdtune.apply(model, "*")
    with torch.no_grad():
        assert torch.equal(model(x), before)
    randomize_deltas(model, std=0.2)
    merged = copy.deepcopy(model)
    svdtune.merge(merged)
    calls = counted(monkeypatch, "_transformer_encoder_layer_fwd")
    with torch.no_grad():
        fast = model(x)  # eval + no_grad: torch._transformer_encoder_layer_fwd
        assert len(calls) == 2
        torch.testing.assert_close(fast, merged(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before, atol=1e-3)
    model.train()
    torch.testing.assert_close(model(x), fast, rtol=1e-5, atol=1e-5)


def test_vit_save_load_merge_merge_files_restore(tmp_path):
    model = seeded(ViT)
    images = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="4 LayerNorm"):
        svdtune.apply(model, "*", exclude="heads", rank=6)  # excluding the container excludes heads.head
    assert not isinstance(model.heads.head, svdtune.layers.SpectralLayer)
    randomize_deltas(model)
    with torch.no_grad():
        adapted = model(images)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    meta = safetensors.safe_open(tmp_path / "d.safetensors", "pt").metadata()
    records = json.loads(meta["layers"])
    record = records["encoder.0.self_attention.k_proj"]
    assert meta["format_version"] == "4" and record["part"] == "k_proj" and record["class"] == "MultiheadAttention"
    assert record["weight_shape"] == [16, 16] and "encoder.0.self_attention" not in records

    fresh = seeded(ViT)
    safetensors.torch.save_file(fresh.state_dict(), tmp_path / "base.safetensors")
    svdtune.load_delta(fresh, tmp_path / "d.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(images), adapted)
    svdtune.load_delta(fresh, tmp_path / "d.safetensors")  # into the same adapters again
    svdtune.merge(fresh)
    assert type(fresh.encoder[0].self_attention) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), adapted, rtol=1e-5, atol=1e-5)
    svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    offline = safetensors.torch.load_file(tmp_path / "m.safetensors")
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(offline[name], value, rtol=1e-6, atol=1e-6)

    base = seeded(ViT)
    expected = state(base)
    with pytest.warns(UserWarning):
        svdtune.apply(base, "*")
    svdtune.restore(base)
    assert_same_state(base, expected)
    assert type(base.encoder[1].self_attention) is nn.MultiheadAttention


def test_a_file_without_every_part_is_refused(tmp_path):
    model = seeded(Attention)
    svdtune.apply(model, "attn")
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    delta = svdtune.read_delta(tmp_path / "d.safetensors")
    partial = svdtune.DeltaFile({name: layer for name, layer in delta.layers.items() if not name.endswith("v_proj")})
    fresh = seeded(Attention)
    before = state(fresh)
    with pytest.raises(SvdtuneError, match="not 'attn.v_proj'"):
        svdtune.load_delta(fresh, partial)
    assert_same_state(fresh, before)


def test_new_base_weights_pickling_and_dtype_moves_keep_every_part_consistent(tmp_path):
    model = seeded(Attention)
    svdtune.apply(model, "attn", rank=4)
    randomize_deltas(model)
    x = torch.randn(2, 5, 16)
    other = seeded(Attention, seed=1)
    model.load_state_dict({**model.state_dict(), **other.state_dict()})  # new base weights: every part re-decomposed
    plain = plain_with(model, "attn", reference_in_proj(model.attn))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        torch.testing.assert_close(model.double()(x.double()), plain.double()(x.double()), rtol=1e-6, atol=1e-6)
    assert model.attn.spectral_factors("v_proj").sigma.dtype == torch.float64


def test_public_unit_accessors_rebuild_each_part():
    model = seeded(Attention)
    svdtune.apply(model, "attn", rank=3)
    randomize_deltas(model)
    attn = model.attn
    for name, layer, part in svdtune.model.adapted_units(model):
        factors, shift = layer.spectral_factors(part), layer.spectral_shift(part)
        change = (factors.U * shift) @ factors.Vh
        merged = svdtune.kinds.matrix(attn._spectral.kind, layer.merged_weight("in_proj_weight"), layer._unit(part).part)
        torch.testing.assert_close(layer.base_matrix(part) + change, merged, rtol=1e-6, atol=1e-6)
        assert name == f"attn.{part}"


def test_a_subclass_of_multihead_attention_round_trips_through_a_file(tmp_path):
    class MyAttention(nn.MultiheadAttention):
        pass

    def build():
        torch.manual_seed(0)
        model = nn.Module()
        model.attn = MyAttention(16, 4)
        return model

    model, x = build(), torch.randn(5, 2, 16)
    svdtune.apply(model, "attn", rank=2)
    randomize_deltas(model)
    with torch.no_grad():
        adapted = model.attn(x, x, x)[0]
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert svdtune.read_delta(tmp_path / "d.safetensors").layers["attn.q_proj"].layer_class == "MyAttention"
    fresh = build()
    svdtune.load_delta(fresh, tmp_path / "d.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh.attn(x, x, x)[0], adapted)
