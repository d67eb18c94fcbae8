"""Run configuration: one frozen dataclass, and the defaults per data source.

Options left as None on the command line take the default of the data source
in use (the embedded synthetic stand-in, its --quick form, or AGIQA-3K).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["RunConfig", "DEFAULTS", "COMMON", "RECIPES", "resolve"]


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; see README.md for each option."""

    data_root: str | None  # extracted AGIQA-3K; None: the synthetic stand-in
    target: str  # "quality" or "align" (which MOS column)
    pretrained: str | None  # CNNIQA weights (.pth or .safetensors); None: pretrain on the synthetic source
    out: str  # output folder
    variants: tuple[str, ...]  # which variants to run, in table order
    splits: int  # number of random group-wise splits
    split_ratios: tuple[float, float, float]  # fractions of prompts for train, val, test
    split_file: str | None  # reuse splits from a JSON written by an earlier run
    seed: int  # seeds splits, initialization, crops, dropout and the synthetic data
    epochs: int  # training epochs per variant and split
    batch_size: int  # images per optimizer step (per process under torchrun)
    crop: int  # side of the random training crop, pixels
    eval_crop: int  # side of the centre crop for val/test; 0: the whole image
    resize: int  # AGIQA only: shorter image side after resizing on load; 0: keep
    hflip: bool  # flip training crops left-right with probability 1/2
    cache_mb: int  # AGIQA only: MiB of decoded images kept in memory; 0: decode on every access
    recipe: str  # "default", or "pyiqa" (IQA-PyTorch's CNNIQA KonIQ-10k recipe, see RECIPES)
    lr_scratch: float  # AdamW learning rate of the scratch variant
    lr_full: float  # AdamW learning rate of full fine-tuning
    lr_head: float  # learning rate of the head variant (fc3 only)
    lr_svd: float  # learning rate of the singular-value deltas
    svd_mode: str  # svdtune.apply mode of the svd variants: "shift" (SVDiff) or "scale"
    weight_decay: float  # AdamW weight decay, all variants
    schedule: str  # "cosine" (to 0 over all steps), "constant", or "multistep" (x0.5 at epochs 10, 20, 30, 40)
    select: str  # checkpoint kept: "val" (best validation SRCC, epoch 0 included) or "last"
    pretrain_epochs: int  # synthetic only: epochs of source-domain pretraining
    source_scenes: int  # synthetic only: scenes of the source domain
    target_scenes: int  # synthetic only: scenes of the target domain
    versions: int  # synthetic only: distorted versions per scene
    image_size: int  # synthetic only: image side, pixels
    device: str  # "cpu", "cuda", "cuda:N" or "auto"
    workers: int  # DataLoader worker processes for AGIQA images
    threads: int  # torch intra-op CPU threads; 0: torch's default
    quick: bool  # smaller synthetic data and fewer epochs (under a minute)
    quiet: bool  # no progress bars or status lines; the table, merge check, 'wrote ...', warnings, errors remain
    plots: bool  # write PNG plots (needs matplotlib)
    rank_deltas: bool  # under torchrun: every rank writes its final deltas (for checking)


# Defaults per data source, for the options whose best value depends on it.
DEFAULTS: dict[str, dict[str, object]] = {
    "synthetic": dict(threads=1, splits=3, epochs=15, batch_size=32, crop=32, eval_crop=0,
                      lr_scratch=1e-3, lr_full=1e-4, lr_head=1e-2, lr_svd=3e-2,
                      pretrain_epochs=15, source_scenes=200, target_scenes=80, versions=8, image_size=48),
    "quick": dict(threads=1, splits=2, epochs=10, batch_size=32, crop=32, eval_crop=0,
                  lr_scratch=1e-3, lr_full=1e-4, lr_head=1e-2, lr_svd=3e-2,
                  pretrain_epochs=10, source_scenes=100, target_scenes=40, versions=8, image_size=48),
    "agiqa": dict(threads=0, splits=10, epochs=30, batch_size=16, crop=224, eval_crop=0,
                  lr_scratch=1e-3, lr_full=1e-4, lr_head=1e-3, lr_svd=3e-3,
                  pretrain_epochs=0, source_scenes=0, target_scenes=0, versions=0, image_size=0),
}

# Defaults that do not depend on the data source.
COMMON: dict[str, object] = dict(resize=0, hflip=False, cache_mb=4096, weight_decay=1e-2, schedule="cosine",
                                 svd_mode="shift")

# IQA-PyTorch's recipe that produced CNNIQA_koniq10k-e6f14c91.pth (options/train/CNNIQA/train_CNNIQA.yml):
# KonIQ-10k at 512x384 (shorter side 384), random 384 crops, horizontal flips, batch 64, AdamW lr 1e-3
# (torch's default weight decay 0.01), MultiStepLR x0.5 after epochs 10/20/30/40, 50 epochs, MSE loss,
# whole images for validation. lr_svd is not part of it and keeps its default.
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    "pyiqa": dict(epochs=50, batch_size=64, crop=384, eval_crop=0, resize=384, hflip=True, lr_scratch=1e-3,
                  lr_full=1e-3, lr_head=1e-3, weight_decay=1e-2, schedule="multistep"),
}


def resolve(options: dict[str, object]) -> RunConfig:
    """Fill options that are None with the defaults of the chosen data source.

    Args:
        options: every RunConfig field; None where the user gave nothing.

    Returns:
        The complete, frozen configuration.

    Raises:
        ValueError: an option combination that cannot work.
    """
    source = "agiqa" if options.get("data_root") else "quick" if options.get("quick") else "synthetic"
    recipe = options.get("recipe") or "default"
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "pyiqa" and source != "agiqa":
        raise ValueError("--recipe pyiqa trains on 384 px crops of real images: use it with --data-root "
                         "(on the synthetic stand-in pass --schedule multistep --hflip instead)")
    filled = {**options, "recipe": recipe}
    for defaults in (RECIPES[recipe], DEFAULTS[source], COMMON):  # an option given explicitly always wins
        for key, value in defaults.items():
            if filled.get(key) is None:
                filled[key] = value
    config = RunConfig(**filled)
    if config.crop < 7 or (config.eval_crop and config.eval_crop < 7):
        raise ValueError("--crop and --eval-crop must be at least 7 (CNNIQA's kernel size)")
    if config.image_size and config.crop > config.image_size:
        raise ValueError(f"--crop {config.crop} is larger than the synthetic --image-size {config.image_size}")
    if config.epochs < 0 or config.batch_size < 1:
        raise ValueError("--epochs must be >= 0 and --batch-size >= 1")
    if config.cache_mb < 0 or config.resize < 0:
        raise ValueError("--cache-mb and --resize must be >= 0")
    return config


def as_dict(config: RunConfig) -> dict[str, object]:
    """The configuration as a JSON-friendly dict."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
