"""Trainable numbers: svdtune (all singular values of each targeted layer) against PEFT LoRA r=8 on the same layers.

Two tables: the zoo's tiny configs (tests/zoo/zoo_models.py; svdtune's count is what `svdtune.report` prints
after a real `apply`, and checked against the shape rule below), and published architectures built from their
real configs on the meta device (no weights, no download): svdtune trains min(m, n) numbers per (m, n) weight
matrix; PEFT's count is what `peft.get_peft_model` creates on the same modules (r * (m + n) for a Linear).

    python benchmarks/zoo_counts.py            # both tables (needs transformers, diffusers, peft)
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "zoo"))
import svdtune  # noqa: E402
from svdtune import kinds  # noqa: E402
from svdtune.targets import name_matches, select  # noqa: E402

RANK = 8


def svdtune_layers(model: nn.Module, targets, exclude=()) -> dict[str, nn.Module]:
    """The layers `svdtune.apply(model, targets, exclude)` adapts (the same selection rule; works on meta)."""
    return select(model, tuple(targets), tuple(exclude))


def svdtune_count(layers: dict[str, nn.Module]) -> int:
    total = 0
    for layer in layers.values():  # one spectrum per matrix: q, k and v of an attention each have their own
        kind = kinds.kind_of(layer)
        total += sum(min(kinds.matrix(kind, layer._parameters[part.param], part).shape) for part in kind.parts(layer))
    return total


def peft_refuses(layer: nn.Module) -> bool:
    """PEFT's conv LoRA needs the rank to be divisible by groups: depthwise convs (groups = channels) are refused."""
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and RANK % layer.groups != 0


def peft_count(model: nn.Module, names: list[str]) -> int:
    """Parameters PEFT LoRA r=RANK adds on exactly the modules ``names`` (its trainable count, heads excluded)."""
    from peft import LoraConfig, get_peft_model
    modules = dict(model.named_modules())
    names = [n for n in names if not peft_refuses(modules[n])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names))
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def refused_note(layers: dict[str, nn.Module]) -> str:
    refused = [name for name, layer in layers.items() if peft_refuses(layer)]
    return f" ({len(refused)} depthwise convs refused by PEFT)" if refused else ""


def tiny_rows() -> list[tuple[str, str, int, str]]:
    import zoo_models
    rows = []
    for entry in zoo_models.ENTRIES:
        if not entry.available():
            continue
        model = entry.build(0)
        layers = svdtune_layers(model, entry.targets, entry.exclude)
        expected = svdtune_count(layers)
        svdtune.apply(model, entry.targets, exclude=entry.exclude)
        counted = sum(row.trainable for row in svdtune.report(model).rows)
        assert counted == expected, (entry.name, counted, expected)
        rows.append((entry.name, ", ".join(entry.targets), counted, f"{peft_count(entry.build(0), sorted(layers)):,}"
                     + refused_note(layers)))
    return rows


def on_meta(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.device("meta"):
            return build()
    return make


def llama_2_7b() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32))


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig())  # the defaults are bert-base-uncased's


def gpt2_small() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config())  # the defaults are gpt2's


def t5_small() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config())  # the defaults are t5-small's


def sd15_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # Stable Diffusion 1.5's UNet


def vision(name: str) -> Callable[[], nn.Module]:
    import vision_models
    return {"resnet18": lambda: vision_models.ResNet(), "vit_b_16": lambda: vision_models.TorchvisionViT(),
            "timm vit_base_patch16_224": lambda: vision_models.TimmViT(),
            "timm convnext_atto": lambda: vision_models.ConvNeXt()}[name]


PUBLISHED = [  # (name, builder, targets)
    ("Llama-2-7B", llama_2_7b, ("q_proj", "v_proj")),
    ("Llama-2-7B", llama_2_7b, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("bert-base-uncased", bert_base, ("query", "value")),
    ("gpt2", gpt2_small, ("c_attn", "c_proj", "c_fc")),
    ("t5-small", t5_small, ("q", "v")),
    ("SD 1.5 UNet", sd15_unet, ("to_q", "to_k", "to_v", "to_out.0")),
    ("torchvision vit_b_16", vision("vit_b_16"), ("self_attention", "out_proj", "mlp.0", "mlp.3")),
    ("torchvision resnet18", vision("resnet18"), ("conv*", "downsample.0")),
    ("timm vit_base_patch16_224", vision("timm vit_base_patch16_224"), ("attn.qkv", "attn.proj")),
    ("timm convnext_atto", vision("timm convnext_atto"), ("conv_dw", "mlp.fc1", "mlp.fc2")),
]


def published_rows() -> list[tuple[str, str, str, int]]:
    rows = []
    for name, build, targets in PUBLISHED:
        model = on_meta(build)()
        matched = {n: m for n, m in model.named_modules() if n and any(name_matches(n, t) for t in targets)}
        try:
            layers = svdtune_layers(model, targets)
        except svdtune.SvdtuneError:  # a layer kind this svdtune does not adapt yet
            layers = {}
        names = sorted(layers or matched)
        kinds = sorted({type(m).__name__ for m in matched.values()})
        ours = f"{svdtune_count(layers):,}" if layers else f"not adapted ({', '.join(kinds)})"
        rows.append((name, ", ".join(targets), ours, f"{peft_count(on_meta(build)(), names):,}" + refused_note(layers)))
    return rows


def ratio(ours: int | str, peft: str) -> str:
    """PEFT's count over svdtune's, when both are numbers."""
    ours, peft = str(ours).replace(",", ""), peft.split(" ")[0].replace(",", "")
    return f"{int(peft) / int(ours):.1f}x" if ours.isdigit() and peft.isdigit() and int(ours) else "-"


def print_table(title: str, rows) -> None:
    header = ("model", "targets", "svdtune trainable", f"PEFT LoRA r={RANK}", "ratio")
    cells = [header] + [(m, t, s if isinstance(s, str) else f"{s:,}", p, ratio(s, p)) for m, t, s, p in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")


if __name__ == "__main__":
    print_table("Tiny configs of the zoo (tests/zoo/zoo_models.py)", tiny_rows())
    print_table("Published shapes (built on the meta device from their real configs)", published_rows())
