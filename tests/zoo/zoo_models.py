"""The model zoo: one entry per architecture, built from a tiny config with random weights (no downloads).

An entry says how to build the model (seeded), which layers a user of that library would target,
how to make a batch, and which tensor of the output is compared and trained on. The checks in
test_zoo.py run over every entry; benchmarks/zoo_counts.py counts trainable numbers over them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import vision_models


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo.

    Attributes:
        name: the row's name.
        requires: third-party packages the builder needs (the entry is skipped without them).
        build: a plain, seeded model in eval mode (same seed, same weights).
        targets: the patterns a user of that library writes.
        batch: model -> the keyword arguments (or a tensor) of one forward pass, seeded.
        output: the forward's result -> the tensor compared and trained on.
        trainable: apply(trainable=...) patterns, e.g. a new classification head.
        exclude: apply(exclude=...) patterns.
    """

    name: str
    requires: tuple[str, ...]
    build: Callable[[int], nn.Module]
    targets: tuple[str, ...]
    batch: Callable[[nn.Module], Any]
    output: Callable[[Any], Tensor] = lambda out: out if isinstance(out, Tensor) else out.logits
    trainable: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def available(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.requires)

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return self.output(model(**batch) if isinstance(batch, dict) else model(batch))


def seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build().eval()
    return make


def tokens(model: nn.Module, length: int = 8, **extra: Tensor) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
    return {"input_ids": ids, **extra}


def images(size: int = 32) -> Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---- transformers ----

def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=16, num_labels=3))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                               num_heads=2, decoder_start_token_id=0))


def clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, "projection_dim": 16, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3))


# ---- diffusers ----

def unet() -> nn.Module:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def unet_batch(model: nn.Module) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([3, 7]),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator)}


# ---- torchvision / timm style (plain torch) ----

def torchvision_vit() -> nn.Module:
    model = vision_models.TorchvisionViT(image_size=32, patch_size=8, layers=2, heads=2, dim=32, hidden=64)
    model.heads.head = nn.Linear(32, 3)  # a fine-tune's new head: torchvision zero-initialises the original
    return model


def clip_output(out: Any) -> Tensor:
    return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])


ENTRIES: tuple[ZooEntry, ...] = (
    # GPT-2's c_attn/c_proj/c_fc are transformers Conv1D layers (weights stored (in, out)); lm_head is untied.
    ZooEntry("gpt2", ("transformers",), seeded(gpt2), ("c_attn", "c_proj", "c_fc", "lm_head"), tokens),
    ZooEntry("llama", ("transformers",), seeded(llama),
             ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), tokens),
    ZooEntry("bert", ("transformers",), seeded(bert), ("query", "key", "value", "attention.output.dense"), tokens,
             trainable=("classifier",)),
    ZooEntry("t5", ("transformers",), seeded(t5), ("q", "k", "v", "o"),
             lambda m: tokens(m, decoder_input_ids=torch.tensor([[0, 5, 6], [0, 7, 8]]))),
    ZooEntry("clip", ("transformers",), seeded(clip), ("q_proj", "k_proj", "v_proj", "out_proj"),
             lambda m: tokens(m.text_model, pixel_values=images()), output=clip_output),
    ZooEntry("whisper", ("transformers",), seeded(whisper), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
             lambda m: {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)),
                        "decoder_input_ids": torch.tensor([[1, 5, 6], [1, 7, 8]])}),
    ZooEntry("vit", ("transformers",), seeded(hf_vit), ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
             lambda m: {"pixel_values": images()}, trainable=("classifier",)),
    ZooEntry("unet2d", ("diffusers",), seeded(unet), ("to_q", "to_k", "to_v", "to_out.0"), unet_batch,
             output=lambda out: out.sample),
    # self_attention is an nn.MultiheadAttention: its packed in_proj_weight gets q, k and v spectra, out_proj its own.
    ZooEntry("torchvision-vit", (), seeded(torchvision_vit), ("self_attention", "out_proj", "mlp.0", "mlp.3"),
             lambda m: images(),
             trainable=("heads",)),
    ZooEntry("torchvision-resnet18", (), seeded(lambda: vision_models.ResNet((8, 16, 32, 64), 3)),
             ("conv*", "downsample.0"), lambda m: images(), trainable=("fc",)),
    ZooEntry("timm-vit", (), seeded(lambda: vision_models.TimmViT(32, 8, 2, 2, 32, 64, 3)),
             ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), lambda m: images(), trainable=("head",)),
    ZooEntry("timm-convnext-atto", (), seeded(lambda: vision_models.ConvNeXt((8, 16), (1, 2), 3)),
             ("conv_dw", "mlp.fc1", "mlp.fc2", "stem.0", "downsample.1"), lambda m: images(), trainable=("head.fc",)),
)

BY_NAME = {entry.name: entry for entry in ENTRIES}
