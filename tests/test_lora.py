"""export_lora against the real peft and diffusers loaders and a dense reference of the spectral update."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from svdtune.cli import main
from svdtune.delta import DeltaFile, LayerDelta, fingerprint
from tests.conftest import randomize_deltas

peft = pytest.importorskip("peft")


class Toy(nn.Module):
    """Linear and conv layers of every kind PEFT takes, plus an untuned ``head.fc`` that the target ``fc``
    would also catch by PEFT's suffix rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(6, 6, (3, 1), padding=(1, 0), groups=3)
        self.conv1 = nn.Conv1d(6, 5, 3, padding="same")
        self.conv3 = nn.Conv3d(1, 2, 2, stride=(1, 2, 1))
        self.fc = nn.Linear(5, 7)
        self.head = nn.Sequential()
        self.head.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 8, 8) -> (B, 3)
        h = self.grouped(self.conv(x)).flatten(2)  # (B, 6, 16)
        h = self.conv1(h)  # (B, 5, 16)
        h = h + self.conv3(h[:, None, :, :4, None].expand(-1, -1, -1, -1, 2)).mean((1, 2, 3, 4))[:, None, None]
        return self.head.fc(self.fc(h.mean(-1)))


TOY_TARGETS = ["conv", "grouped", "conv1", "conv3", "fc"]  # "fc" also suffix-matches head.fc: excluded


def toy(seed: int = 0, targets: list[str] = TOY_TARGETS) -> tuple[nn.Module, nn.Module]:
    """(a plain base, an adapted copy with random deltas)."""
    torch.manual_seed(seed)
    base = Toy()
    model = svdtune.apply(copy.deepcopy(base), targets, exclude=["head.fc"])
    randomize_deltas(model, seed=seed + 1, std=0.5)
    return base, model


def peft_model(base: nn.Module, folder) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*groups > 1.*")  # PEFT: "merging is not supported"
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def spectral_update(layer) -> torch.Tensor:
    """W' - W of an adapted layer, dense, in float64."""
    with torch.no_grad():
        return layer.merged_weight().double() - layer.base_weight.double()


def test_peft_loads_the_exact_export_with_the_same_outputs(tmp_path):
    base, model = toy()
    x = torch.randn(3, 4, 8, 8)
    result = svdtune.export_lora(model, tmp_path / "lora")
    loaded = peft_model(base, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not isinstance(loaded.base_model.model.head.fc, peft.tuners.lora.LoraLayer)  # exclude_modules held
    assert all(e.update_frobenius == 0 and e.weight_spectral == 0 for e in [*result.layers.values(), result.overall])
    assert result.layers["grouped"].rank == 3 * result.layers["grouped"].tuned  # one block per group


def test_deltas_trained_at_rank_k_export_exactly_at_lora_rank_k(tmp_path):
    torch.manual_seed(1)
    base = Toy()
    model = svdtune.apply(copy.deepcopy(base), ["conv", "conv1", "fc"], exclude=["head.fc"], rank=2)
    randomize_deltas(model, seed=2, std=0.5)
    result = svdtune.export_lora(model, tmp_path, max_rank=2)
    assert {name: e.rank for name, e in result.layers.items()} == {"conv": 2, "conv1": 2, "fc": 2}
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, tmp_path)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["conv", "grouped", "conv1", "conv3"])
def test_conv_lora_is_the_spectral_update_as_a_conv(tmp_path, name):
    """lora_B(lora_A(x)), A with the layer's kernel, stride, padding, B 1x1 with its groups, is conv(x, W' - W)."""
    _, model = toy()
    svdtune.export_lora(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    layer = dict(model.named_modules())[name]
    A, B = (tensors[f"base_model.model.{name}.lora_{s}.weight"].double() for s in "AB")
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.ndim]
    x = torch.randn(2, layer.in_channels, *[7] * (A.ndim - 2), dtype=torch.float64)
    through_lora = conv(conv(x, A, None, layer.stride, layer.padding), B, groups=layer.groups)
    dense = conv(x, spectral_update(layer), None, layer.stride, layer.padding, groups=layer.groups)
    torch.testing.assert_close(through_lora, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
def test_the_reported_error_is_the_actual_error_at_rank_r(tmp_path, rank):
    base, model = toy(seed=3)
    result = svdtune.export_lora(model, tmp_path, rank=rank)
    loaded = peft_model(base, tmp_path)
    lora_layers = dict(loaded.base_model.model.named_modules())
    for name in ["conv", "conv1", "conv3", "fc"]:  # PEFT's get_delta_weight does not take grouped convs
        layer = dict(model.named_modules())[name]
        exact = spectral_update(layer)
        lora = lora_layers[name].get_delta_weight("default").double()
        m = exact.shape[0]
        weight = layer.merged_weight().detach().double().reshape(m, -1)
        error, exact = (lora - exact).reshape(m, -1), exact.reshape(m, -1)
        for kind, ord in (("spectral", 2), ("frobenius", "fro")):
            norm = lambda t: float(torch.linalg.matrix_norm(t, ord=ord))  # noqa: E731
            reported = result.layers[name]
            assert norm(error) / norm(exact) == pytest.approx(getattr(reported, f"update_{kind}"), rel=1e-4, abs=1e-5)
            assert norm(error) / norm(weight) == pytest.approx(getattr(reported, f"weight_{kind}"), rel=1e-4, abs=1e-5)
        assert result.layers[name].rank == rank
    assert 0 < result.overall.update_frobenius < 1


def test_the_config_meets_vllms_constraints_and_max_rank(tmp_path):
    _, model = toy()
    svdtune.export_lora(model, tmp_path / "ok", rank=2, max_rank=8, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["modules_to_save"] is None
    assert config["use_dora"] is False and config["lora_bias"] is False and config["init_lora_weights"] is True
    assert max([config["r"], *config["rank_pattern"].values()]) <= 8
    ranks = {name: tensor.shape[0] for name, tensor in  # lora_A is (r, ...) for every layer kind
             safetensors.torch.load_file(tmp_path / "ok" / "adapter_model.safetensors").items() if "lora_A" in name}
    for key, rank in ranks.items():  # alpha = rank: scaling 1, whether a reader honours the patterns or not
        pattern = "^" + key.removeprefix("base_model.model.").removesuffix(".lora_A.weight").replace(".", "\\.")
        assert config["rank_pattern"].get(pattern, config["r"]) == rank == config["alpha_pattern"].get(pattern, config["lora_alpha"])
    assert {t.dtype for t in safetensors.torch.load_file(tmp_path / "ok" / "adapter_model.safetensors").values()} == {torch.bfloat16}
    peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # PEFT accepts every field
    with pytest.raises(svdtune.SvdtuneError, match="'grouped' would get LoRA rank 6, above max_rank=4"):
        svdtune.export_lora(model, tmp_path / "no", rank=2, max_rank=4)
    assert not (tmp_path / "no").exists()


def layer_with(name: str, cls, *args, **kwargs) -> nn.Module:
    model = nn.Sequential()
    model.add_module(name, cls(*args, **kwargs))
    return model


@pytest.mark.parametrize("layer, message", [
    (layer_with("up", nn.ConvTranspose2d, 3, 2, 3), "'up' is a ConvTranspose2d: PEFT has no LoRA for transposed"),
    (layer_with("dil", nn.Conv2d, 3, 2, 3, dilation=2), r"'dil' is a Conv2d: PEFT's conv LoRA cannot express dilation"),
    (layer_with("pad", nn.Conv1d, 3, 2, 3, padding=1, padding_mode="reflect"), "cannot express padding_mode='reflect'"),
    # PEFT's Linear LoRA on these is silently ignored: the attention and the encoder's fast path read .weight
    (layer_with("attn", nn.MultiheadAttention, 8, 2), "'attn.out_proj' is a layer inside a MultiheadAttention"),
    (layer_with("enc", nn.TransformerEncoderLayer, 8, 2, 16), "'enc.linear1' is a layer inside a TransformerEncoderLayer"),
])
def test_layers_peft_cannot_express_are_refused_by_name(tmp_path, layer, message):
    svdtune.apply(layer, ["*"], exclude=["self_attn"] if "enc" in message else [])
    with pytest.raises(svdtune.SvdtuneError, match=message):
        svdtune.export_lora(layer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    base, model = toy()
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    with pytest.raises(svdtune.SvdtuneError, match="needs base="):
        svdtune.export_lora(tmp_path / "task.safetensors", tmp_path / "out")
    with pytest.raises(svdtune.SvdtuneError, match="drop base="):
        svdtune.export_lora(model, tmp_path / "out", base=tmp_path / "base.safetensors")
    for bad, message in (({"rank": 0}, "rank=0 must be a positive int"), ({"max_rank": 2.5}, "max_rank=2.5 must be"),
                         ({"format": "kohya"}, "format='kohya' is not one of"), ({"dtype": torch.int8}, "dtype=torch.int8"),
                         ({"prefix": ""}, "prefix='' must be")):
        with pytest.raises(svdtune.SvdtuneError, match=message):
            svdtune.export_lora(model, tmp_path / "out", **bad)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.fc.weight.add_(1e-3)
    safetensors.torch.save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(svdtune.SvdtuneError, match="layer 'fc': its base weight differs"):
        svdtune.export_lora(tmp_path / "task.safetensors", tmp_path / "out", base=tmp_path / "other.safetensors")
    assert not (tmp_path / "out").exists()
    trained = svdtune.apply(Toy(), ["conv"], trainable=["head"])
    with pytest.raises(svdtune.SvdtuneError, match="'head.fc.weight' is fully trained"):
        svdtune.export_lora(trained, tmp_path / "out")
    (tmp_path / "in").mkdir()
    safetensors.torch.save_file(base.state_dict(), tmp_path / "in" / "adapter_model.safetensors")
    before = (tmp_path / "in" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(svdtune.SvdtuneError, match="would overwrite an input"):
        svdtune.export_lora(tmp_path / "task.safetensors", tmp_path / "in", base=tmp_path / "in" / "adapter_model.safetensors")
    assert (tmp_path / "in" / "adapter_model.safetensors").read_bytes() == before


def test_a_delta_file_exports_as_the_model_does_and_the_cli_prints_errors_and_sizes(tmp_path, capsys):
    base, model = toy(seed=5, targets=[t for t in TOY_TARGETS if t != "grouped"])  # see the next test
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    status = main(["export-lora", str(tmp_path / "task.safetensors"), "--base", str(tmp_path / "base.pt"),
                   "-o", str(tmp_path / "cli"), "--rank", "2"])
    out = capsys.readouterr().out
    assert status == 0 and "update spectral" in out and "(all)" in out
    size = (tmp_path / "task.safetensors").stat().st_size
    assert f"spectral delta file {size:,} bytes" in out
    from_model = svdtune.export_lora(model, tmp_path / "model", rank=2)
    assert str(from_model).splitlines()[:-1] == out.splitlines()[:-1]  # the same error table
    cli = safetensors.torch.load_file(tmp_path / "cli" / "adapter_model.safetensors")
    ours = safetensors.torch.load_file(tmp_path / "model" / "adapter_model.safetensors")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, tmp_path / "cli")(x), peft_model(base, tmp_path / "model")(x))
    assert cli.keys() == ours.keys()
    with pytest.raises(SystemExit) as exited:  # --base is a required option: argparse's usage error
        main(["export-lora", str(tmp_path / "task.safetensors"), "-o", str(tmp_path / "x")])
    assert exited.value.code == 2 and "the following arguments are required: --base" in capsys.readouterr().err
    assert main(["export-lora", str(tmp_path / "task.safetensors"), "--base", str(tmp_path / "base.pt"),
                 "-o", str(tmp_path / "x"), "--rank", "2", "--max-rank", "1"]) == 1
    assert "above max_rank=1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_grouped_conv_from_a_delta_file_fails_to_load_loudly(tmp_path):
    """A delta file does not record a conv's groups: it is exported as groups=1, which PEFT refuses by shape."""
    base, model = toy(targets=["grouped"])
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.export_lora(tmp_path / "task.safetensors", tmp_path / "file", base=tmp_path / "base.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_model(base, tmp_path / "file")
    svdtune.load_delta(loaded := copy.deepcopy(base), tmp_path / "task.safetensors")  # the way: export from the model
    svdtune.export_lora(loaded, tmp_path / "model")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, tmp_path / "model")(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_delta_file_record_peft_cannot_express_is_refused_by_name(tmp_path):
    base = layer_with("up", nn.ConvTranspose1d, 3, 2, 3)
    svdtune.save_delta(svdtune.apply(copy.deepcopy(base), ["up"]), tmp_path / "t.safetensors")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "b.safetensors")
    with pytest.raises(svdtune.SvdtuneError, match="'up' is a ConvTranspose1d"):
        svdtune.export_lora(tmp_path / "t.safetensors", tmp_path / "out", base=tmp_path / "b.safetensors")


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.slow  # 5-13 s on 2 loaded cores: 14 projections decomposed twice, transformers' Llama imported
def test_a_tiny_llama_round_trips_through_peft_from_the_model_and_from_its_delta_file(tmp_path):
    base = tiny_llama()
    model = svdtune.apply(copy.deepcopy(base), LLAMA_TARGETS)
    randomize_deltas(model, seed=2, std=0.2)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(tokens).logits
    svdtune.export_lora(model, tmp_path / "model")
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.export_lora(tmp_path / "task.safetensors", tmp_path / "file", base=tmp_path / "base.safetensors")
    for folder in ("model", "file"):
        with torch.no_grad():
            logits = peft_model(base, tmp_path / folder)(tokens).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 14 and config["fan_in_fan_out"] is False


def conv1d_gpt2_delta(base: nn.Module, ranks: dict[str, int], seed: int) -> tuple[DeltaFile, dict[str, torch.Tensor]]:
    """A delta file for transformers' Conv1D and Embedding layers, built by hand, and the dense W' of each."""
    generator = torch.Generator().manual_seed(seed)
    modules, layers, merged = dict(base.named_modules()), {}, {}
    for name, k in ranks.items():
        module = modules[name]
        weight = module.weight.detach()
        conv1d = type(module).__name__ == "Conv1D"
        matrix = (weight.t() if conv1d else weight).double()  # Conv1D stores (in, out)
        U, sigma, Vh = torch.linalg.svd(matrix, full_matrices=False)
        delta = torch.randn(k, generator=generator) * 0.3
        shift = torch.maximum(delta.double(), -sigma[:k])
        adapted = matrix + U[:, :k] @ torch.diag(shift) @ Vh[:k]
        merged[name] = (adapted.t() if conv1d else adapted).float()
        layers[name] = LayerDelta(type(module).__name__, tuple(weight.shape), "shift", 1.0, fingerprint(weight, sigma), delta)
    return DeltaFile(layers, {}, {}), merged


def test_gpt2_conv1d_and_embedding_export_matches_the_dense_update(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    ranks = {"h.0.attn.c_attn": 16, "h.1.mlp.c_fc": 5, "wte": 7}
    delta, merged = conv1d_gpt2_delta(base, ranks, seed=4)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, weight in merged.items():
            dict(reference.named_modules())[name].weight.copy_(weight)
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    result = svdtune.export_lora(delta, tmp_path / "lora", base=tmp_path / "base.safetensors")
    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        # float32 through two blocks, whose layer norms amplify rounding (2e-5 seen on some CPUs);
        # the deltas move these outputs by about 2
        torch.testing.assert_close(peft_model(base, tmp_path / "lora")(tokens).last_hidden_state,
                                   reference(tokens).last_hidden_state, rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert config["fan_in_fan_out"] is True and result.delta_bytes is None
    assert tensors["base_model.model.wte.lora_embedding_A"].shape == (7, 50)
    assert tensors["base_model.model.h.0.attn.c_attn.lora_A.weight"].shape == (16, 16)  # (r, in)


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


@pytest.mark.slow  # importing diffusers alone takes about 15 s on 2 loaded cores
def test_diffusers_load_lora_adapter_takes_the_export_of_a_unet_delta(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = lambda: diffusers.UNet2DConditionModel(  # noqa: E731
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()
    base = unet()
    model = svdtune.apply(copy.deepcopy(base), UNET_TARGETS)
    randomize_deltas(model, seed=6, std=0.3)
    svdtune.save_delta(model, tmp_path / "unet-task.safetensors")
    safetensors.torch.save_file(base.state_dict(), tmp_path / "unet.safetensors")
    result = svdtune.export_lora(tmp_path / "unet-task.safetensors", tmp_path / "lora", rank=3,
                                 base=tmp_path / "unet.safetensors", format="diffusers")
    assert [p.rsplit("/", 1)[-1] for p in result.files] == ["pytorch_lora_weights.safetensors"]
    loaded = copy.deepcopy(base)
    loaded.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", use_safetensors=True)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 5, 8)
    full = svdtune.export_lora(model, tmp_path / "full", format="diffusers")
    exact = copy.deepcopy(base)
    exact.load_lora_adapter(str(tmp_path / "full"), prefix="unet", use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(exact(x, t, text).sample, model(x, t, text).sample, rtol=1e-4, atol=1e-5)
        truncated = loaded(x, t, text).sample
    assert not torch.allclose(truncated, model(x, t, text).sample, atol=1e-5)  # rank 3 < the tuned ranks
    lora_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(lora_layers) == len(result.layers)
    for name, layer in lora_layers.items():  # the weight error diffusers' adapter makes is the reported one
        adapted = dict(model.named_modules())[name]
        with torch.no_grad():
            error = (layer.get_delta_weight(layer.active_adapters[0]).double() - spectral_update(adapted))
            weight = adapted.merged_weight().double()
        m = weight.shape[0]
        actual = float(torch.linalg.matrix_norm(error.reshape(m, -1))) / float(torch.linalg.matrix_norm(weight.reshape(m, -1)))
        assert actual == pytest.approx(result.layers[name].weight_frobenius, rel=1e-3, abs=1e-6)


def test_gpt2_from_the_model_once_svdtune_adapts_conv1d_and_embedding(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    try:
        model = svdtune.apply(copy.deepcopy(base), ["c_attn", "c_fc", "wte"])
    except svdtune.SvdtuneError as error:
        pytest.skip(f"this svdtune does not adapt Conv1D/Embedding yet: {error}")
    randomize_deltas(model, seed=3, std=0.3)
    svdtune.export_lora(model, tmp_path)
    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, tmp_path)(tokens).last_hidden_state,
                                   model(tokens).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_a_delta_file_class_without_a_known_layout_is_refused(tmp_path):
    base = layer_with("fc", nn.Linear, 4, 3)
    delta = svdtune.read_delta(_saved(svdtune.apply(copy.deepcopy(base), ["fc"]), tmp_path / "t.safetensors"))
    renamed = DeltaFile({"fc": dataclasses.replace(delta.layers["fc"], layer_class="MyLinear")})
    safetensors.torch.save_file(base.state_dict(), tmp_path / "b.safetensors")
    with pytest.raises(svdtune.SvdtuneError, match="'fc' is a MyLinear, a class whose LoRA layout a delta file cannot tell"):
        svdtune.export_lora(renamed, tmp_path / "out", base=tmp_path / "b.safetensors")


def _saved(model: nn.Module, path) -> object:
    svdtune.save_delta(model, path)
    return path
