"""The compared variants: what each starts from and what it trains.

zero-shot  pretrained weights, no training
scratch    random initialization, every weight trained (lr_scratch)
full       pretrained, every weight trained (lr_full)
head       pretrained, only fc3 (weight and bias) trained (lr_head)
svd-fc     pretrained, singular-value deltas of fc1, fc2, fc3 (lr_svd)
svd-conv   pretrained, singular-value deltas of conv1 (lr_svd)
svd-all    pretrained, deltas of conv1 and fc1-fc3 (lr_svd)

Every variant but scratch loads the pretrained state dict of all layers,
biases and fc3 included, before svdtune.apply freezes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import svdtune
from examples.cnniqa_agiqa.config import RunConfig
from examples.cnniqa_agiqa.model import CNNIQA

__all__ = ["Variant", "VARIANTS", "parse_variants", "build"]


@dataclass(frozen=True)
class Variant:
    """How one variant is initialized and trained."""

    name: str
    pretrained: bool  # start from the pretrained state dict (else random init)
    trains: str  # "none", "all", "head" or "svd"
    targets: tuple[str, ...] = ()  # svdtune target patterns when trains == "svd"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("zero-shot", True, "none"),
        Variant("scratch", False, "all"),
        Variant("full", True, "all"),
        Variant("head", True, "head"),
        Variant("svd-fc", True, "svd", ("fc1", "fc2", "fc3")),
        Variant("svd-conv", True, "svd", ("conv1",)),
        Variant("svd-all", True, "svd", ("conv1", "fc1", "fc2", "fc3")),
    )
}


def parse_variants(text: str) -> tuple[str, ...]:
    """Parse --variants: 'all' or a comma list of names, kept in table order.

    Args:
        text: e.g. "all" or "zero-shot,svd-fc".

    Returns:
        The selected names in the canonical order.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if text.strip() == "all":
        return tuple(VARIANTS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variants {unknown or [text]}; choose from: all, {', '.join(VARIANTS)}")
    return tuple(n for n in VARIANTS if n in names)


def build(variant: Variant, pretrained: dict[str, torch.Tensor] | None, config: RunConfig,
          seed: int) -> tuple[nn.Module, list[nn.Parameter], float]:
    """Make the model of one variant, its trainable parameters and learning rate.

    Args:
        variant: what to build.
        pretrained: the plain CNNIQA state dict; None only if no variant needs it.
        config: for the learning rates and the svd mode.
        seed: seeds the random initialization (scratch, and layers before loading).

    Returns:
        (model on CPU, parameters to optimize, learning rate).

    Raises:
        ValueError: the variant needs pretrained weights and none were given.
    """
    torch.manual_seed(seed)
    model = CNNIQA()
    if variant.pretrained:
        if pretrained is None:
            raise ValueError(f"variant {variant.name} needs --pretrained weights; pass them or run --variants scratch")
        model.load_state_dict(pretrained)
    if variant.trains == "none":
        model.requires_grad_(False)
        return model, [], 0.0
    if variant.trains == "all":
        return model, list(model.parameters()), config.lr_full if variant.pretrained else config.lr_scratch
    if variant.trains == "head":
        model.requires_grad_(False)
        model.fc3.requires_grad_(True)
        return model, list(model.fc3.parameters()), config.lr_head
    svdtune.apply(model, targets=list(variant.targets), mode=config.svd_mode)
    return model, svdtune.trainable_parameters(model), config.lr_svd
