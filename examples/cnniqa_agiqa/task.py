"""The adaptation task of a run: its records, datasets and pretrained weights.

With --data-root it is AGIQA-3K read from disk and --pretrained weights;
without, the synthetic target domain, with CNNIQA pretrained on the synthetic
source domain (cached in the output folder as source_cnniqa.safetensors and
reused when the data and pretraining options match).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from svdtune import container
from svdtune.errors import SvdtuneError

from examples.cnniqa_agiqa import agiqa, synthetic
from examples.cnniqa_agiqa.config import RunConfig
from examples.cnniqa_agiqa.datasets import TensorImages, FileImages, make_loader
from examples.cnniqa_agiqa.images import MEBIBYTE, ImageCache
from examples.cnniqa_agiqa.distributed import DistInfo, barrier
from examples.cnniqa_agiqa.model import CNNIQA, EXPECTED_SHAPES, load_pretrained, save_plain
from examples.cnniqa_agiqa.progress import say
from examples.cnniqa_agiqa.train import fit
from examples.cnniqa_agiqa.variants import VARIANTS

__all__ = ["Task", "load_task", "SOURCE_CACHE"]

SOURCE_CACHE = "source_cnniqa.safetensors"
PRETRAIN_LR = 1e-3  # AdamW learning rate of source-domain pretraining (all weights, from scratch)


@dataclass
class Task:
    """Records of the target dataset and how to turn indices into datasets."""

    name: str  # shown in the output, e.g. "AGIQA-3K mos_quality" or "SYNTHETIC target domain"
    synthetic: bool  # numbers are from the built-in stand-in
    names: list[str]  # one per record (file names, or synthetic ids)
    groups: list[str]  # prompt / scene of each record
    targets: torch.Tensor  # (N,) MOS / 5, in [0, 1]
    pretrained: dict[str, torch.Tensor] | None  # plain CNNIQA weights
    images: torch.Tensor | None = None  # synthetic only: (N, 3, S, S) uint8
    cache: ImageCache | None = None  # AGIQA only: the decoded images, shared by every split and variant
    hflip: bool = False  # flip training crops left-right half the time

    def dataset(self, indices: list[int], crop: int, train: bool) -> Dataset:
        """The images `indices` with their targets, cropped (and flipped) for training, or for evaluation."""
        if self.images is not None:
            return TensorImages(self.images, self.targets, indices, crop, train, self.hflip)
        return FileImages(self.cache, self.targets, indices, crop, train, self.hflip)


def _fingerprint(config: RunConfig) -> dict[str, object]:
    """The options that determine the pretrained source model."""
    keys = ("seed", "source_scenes", "versions", "image_size", "pretrain_epochs", "crop", "eval_crop",
            "batch_size", "weight_decay")
    return {"generator": synthetic.GENERATOR_VERSION, **{k: getattr(config, k) for k in keys}}


def _pretrain_source(config: RunConfig, info: DistInfo, show: bool) -> dict[str, torch.Tensor]:
    """Train CNNIQA on the synthetic source domain (rank 0 only) and return its state."""
    source = synthetic.make_domain("source", config.source_scenes, config.versions, config.image_size, config.seed)
    n = len(source.groups)
    cut = int(0.85 * config.source_scenes) * config.versions  # the last scenes validate
    targets = source.mos / agiqa.MOS_SCALE
    train_set = TensorImages(source.images, targets, list(range(cut)), config.crop, True)
    val_set = TensorImages(source.images, targets, list(range(cut, n)), config.eval_crop, False)
    torch.manual_seed(config.seed)
    model = CNNIQA().to(info.device)
    single = DistInfo(rank=0, world=1, device=info.device)
    result = fit(model, list(model.parameters()), PRETRAIN_LR, config.pretrain_epochs,
                 make_loader(train_set, config.batch_size, True, config.seed),
                 make_loader(val_set, 256, False, config.seed), single,
                 weight_decay=config.weight_decay, desc="pretrain on synthetic source", show=show)
    say(f"source-domain CNNIQA: val SRCC {result.val_srcc[result.best_epoch]:.3f} "
        f"(epoch {result.best_epoch}/{config.pretrain_epochs}, {result.seconds:.0f} s)", not config.quiet)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _read_cache(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The cached source model at `path` if it was made with the same options, else None.

    A file that cannot be read (truncated by an interrupted run, corrupted) or
    does not hold a CNNIQA is a miss too: it is reported and then overwritten.
    """
    if not path.exists():
        return None
    try:
        state, metadata = container.read(path, f"cached source model {path}", require_checksum=False)
    except SvdtuneError as error:
        say(f"warning: {error} Pretraining the source model again; it replaces this file.")
        return None
    if {k: tuple(v.shape) for k, v in state.items()} != EXPECTED_SHAPES:
        say(f"warning: cached source model {path} does not hold a CNNIQA; pretraining again, it replaces this file.")
        return None
    return state if metadata.get("fingerprint") == fingerprint else None


def _source_model(config: RunConfig, info: DistInfo) -> dict[str, torch.Tensor]:
    """Load the cached source model if it matches the options, else pretrain and cache it (rank 0)."""
    path = Path(config.out) / SOURCE_CACHE
    wanted = json.dumps(_fingerprint(config), sort_keys=True)
    state = _read_cache(path, wanted) if info.main else None
    if info.main and state is not None:
        say(f"reusing the pretrained source model {path}", not config.quiet)
    elif info.main:
        model = CNNIQA()
        model.load_state_dict(_pretrain_source(config, info, show=not config.quiet))
        save_plain(model, path, metadata={"fingerprint": wanted, "data": "synthetic source domain"})
    barrier(info)  # the other ranks read the file rank 0 has written
    if state is None:
        state = container.read(path, f"cached source model {path}", require_checksum=False)[0]
    return state


def _synthetic_task(config: RunConfig, info: DistInfo) -> Task:
    """The synthetic target domain, and the pretrained weights to start from."""
    target = synthetic.make_domain("target", config.target_scenes, config.versions, config.image_size, config.seed)
    if config.pretrained:
        pretrained = load_pretrained(CNNIQA(), config.pretrained).state_dict()
    else:
        pretrained = _source_model(config, info)
    return Task(name="SYNTHETIC target domain (built-in stand-in, not AGIQA-3K)", synthetic=True,
                names=[f"target-{i:05d}" for i in range(len(target.groups))], groups=target.groups,
                targets=target.mos / agiqa.MOS_SCALE, pretrained=pretrained, images=target.images,
                hflip=config.hflip)


def _agiqa_task(config: RunConfig) -> Task:
    """AGIQA-3K from --data-root, validated before anything trains."""
    trains = any(VARIANTS[v].trains != "none" for v in config.variants)  # zero-shot alone takes no training crop
    crop = max(config.crop if trains else 0, config.eval_crop)
    start = time.perf_counter()
    records, cache = agiqa.load_agiqa(config.data_root, config.target, show=not config.quiet, crop=crop,
                                      resize=config.resize, cache_bytes=config.cache_mb * MEBIBYTE)
    say(f"decoded {len(records)} images once in {time.perf_counter() - start:.1f} s"
        f"{f' (shorter side resized to {config.resize} px)' if config.resize else ''}: {cache.describe()}",
        not config.quiet)
    pretrained = None
    if config.pretrained:
        pretrained = load_pretrained(CNNIQA(), config.pretrained).state_dict()
    return Task(name=f"AGIQA-3K mos_{config.target}", synthetic=False, names=[r.name for r in records],
                groups=[r.group for r in records],
                targets=torch.tensor([r.mos for r in records]) / agiqa.MOS_SCALE,
                pretrained=pretrained, cache=cache, hflip=config.hflip)


def _make_out(out: Path) -> None:
    """Create the output folder, or say why it cannot be."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is an existing file, not a folder; pass a folder path "
                                 "(it is created if missing) or move the file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the output folder --out {out}: {error.strerror or error}; "
                      "pass a folder path you can write to") from None


def load_task(config: RunConfig, info: DistInfo) -> Task:
    """Build the task of this run: validate data and weights, pretrain if needed.

    Args:
        config: the run configuration.
        info: process-group info (only rank 0 pretrains; the others wait).

    Returns:
        The Task.

    Raises:
        FileNotFoundError, ValueError: bad data folder, CSV, images or weights.
        NotADirectoryError, OSError: --out is a file, or cannot be created.
    """
    _make_out(Path(config.out))
    if config.data_root:
        return _agiqa_task(config)
    return _synthetic_task(config, info)

