"""transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc; weight stored (in, out)) against dense references."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from kinds_reference import assert_same_state, reference_matrix, state
from svdtune.errors import SvdtuneError

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def gpt2(seed: int = 0) -> nn.Module:
    """A tiny GPT-2 with random weights and an untied lm_head."""
    config = transformers.GPT2Config(n_layer=2, n_embd=24, n_head=4, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config).eval()
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
CONV1D = ["c_attn", "c_proj", "c_fc"]


def test_import_svdtune_does_not_import_transformers():
    code = "import sys, svdtune; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conv1d_layers_are_adapted_and_keep_key_layout_and_exact_init():
    model = gpt2()
    with torch.no_grad():
        before = logits(model, IDS)
    keys = state(model)
    svdtune.apply(model, CONV1D)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Conv1D) and layer.weight.shape == (24, 72)  # still (in, out)
    assert svdtune.report(model).rows[0].type == "Conv1D"
    with torch.no_grad():
        assert torch.equal(logits(model, IDS), before)
    plain = {name: value for name, value in model.state_dict().items() if "svd_delta" not in name}
    assert list(plain) == list(keys) and all(torch.equal(plain[k], keys[k]) for k in keys)
    assert model.transformer.h[0].attn.c_attn.svd_delta.numel() == 24  # min(out, in)


def test_adapted_conv1d_weight_matches_the_dense_reference_of_its_out_in_view():
    model = gpt2()
    svdtune.apply(model, "c_fc", rank=5)
    layer = model.transformer.h[1].mlp.c_fc
    delta = torch.linspace(-0.5, 0.7, 5)
    with torch.no_grad():
        layer.svd_delta.copy_(delta)
    expected = reference_matrix(layer.base_weight.t(), delta).t()  # the (out, in) view, written back (in, out)
    torch.testing.assert_close(layer.merged_weight().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 4])
def test_training_forward_and_gradients_match_a_dense_reference(rank):
    model = gpt2()
    svdtune.apply(model, "c_attn", rank=rank)
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.svd_delta.copy_(torch.randn(layer.svd_delta.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    x = torch.randn(3, 5, 24, requires_grad=True)
    out = layer(x)  # the factorized / low-rank path
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()

    delta = layer.svd_delta.detach().double().requires_grad_(True)
    U, sigma, Vh = torch.linalg.svd(layer.base_weight.detach().t().double(), full_matrices=False)
    k = delta.numel()
    new = torch.cat([torch.relu(sigma[:k] + delta), sigma[k:]])
    weight = ((U * new) @ Vh).t()  # (in, out), as Conv1D stores it
    reference = x.detach().double() @ weight + layer.bias.double()
    (reference * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.svd_delta.grad.double(), delta.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)  # the no-grad path reads W'


def test_save_load_merge_merge_files_restore(tmp_path):
    model = gpt2()
    svdtune.apply(model, CONV1D, rank=6)
    svdtune.trainable_parameters(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("svd_delta"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        adapted = logits(model, IDS)
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    meta = safetensors.safe_open(tmp_path / "d.safetensors", "pt").metadata()
    record = json.loads(meta["layers"])["transformer.h.0.attn.c_attn"]
    assert meta["format_version"] == "4" and record["class"] == "Conv1D" and record["weight_shape"] == [24, 72]

    fresh = gpt2()
    safetensors.torch.save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, tmp_path / "base.safetensors")
    svdtune.load_delta(fresh, tmp_path / "d.safetensors")
    with torch.no_grad():
        assert torch.equal(logits(fresh, IDS), adapted)

    svdtune.merge(fresh)
    assert type(fresh.transformer.h[0].attn.c_attn) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh, IDS), adapted, rtol=1e-5, atol=1e-5)

    svdtune.merge_files(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")
    offline = safetensors.torch.load_file(tmp_path / "m.safetensors")
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(offline[name], value, rtol=1e-6, atol=1e-6)

    base = gpt2()
    expected = state(base)
    svdtune.apply(base, CONV1D)
    svdtune.restore(base)
    assert_same_state(base, expected)
    assert type(base.transformer.h[0].mlp.c_fc) is Conv1D


def test_a_conv1d_delta_is_never_merged_into_another_layout(tmp_path):
    model = gpt2()
    svdtune.apply(model, "h.0.mlp.c_fc")
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    linear = gpt2()
    layer = linear.transformer.h[0].mlp.c_fc
    as_linear = nn.Linear(24, 96)  # the same matrix stored (out, in), as a Linear
    with torch.no_grad():
        as_linear.weight.copy_(layer.weight.t())
    linear.transformer.h[0].mlp.c_fc = as_linear
    with pytest.raises(SvdtuneError, match="is a Linear in the model but a Conv1D in the delta file"):
        svdtune.load_delta(linear, tmp_path / "d.safetensors")
    transposed = {k: v.contiguous() for k, v in gpt2().state_dict().items()}
    transposed["transformer.h.0.mlp.c_fc.weight"] = transposed["transformer.h.0.mlp.c_fc.weight"].t().contiguous()
    safetensors.torch.save_file(transposed, tmp_path / "linear.safetensors")
    with pytest.raises(SvdtuneError, match=r"expects \[24, 96\]"):
        svdtune.merge_files(tmp_path / "linear.safetensors", tmp_path / "d.safetensors", tmp_path / "m.safetensors")


def test_star_on_gpt2_adapts_conv1d_and_embeddings_and_refuses_tied_weights():
    tied = gpt2()
    tied.lm_head.weight = tied.transformer.wte.weight
    with pytest.raises(SvdtuneError, match="tie_word_embeddings"):
        svdtune.apply(tied, "*")
    model = gpt2()
    with pytest.warns(UserWarning, match=r"5 LayerNorm"):
        svdtune.apply(model, "*")
    kinds = {row.type for row in svdtune.report(model).rows}
    assert kinds == {"Conv1D", "Embedding", "Linear"}
    assert "5 LayerNorm" in str(svdtune.report(model))
