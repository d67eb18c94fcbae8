"""One experiment: every variant on every split, then the merge check.

For each split the variants are built from the same pretrained weights,
trained on train, their checkpoint chosen on val, and scored once on test.
The delta file of every svd variant is written with svdtune.save_delta; the
svd variant with the best mean validation SRCC is merged into a plain CNNIQA
(svdtune.merge), saved, reloaded without svdtune and checked against the
adapted model's predictions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import svdtune
from examples.cnniqa_agiqa.config import RunConfig
from examples.cnniqa_agiqa.datasets import make_loader
from examples.cnniqa_agiqa.distributed import DistInfo
from examples.cnniqa_agiqa.estimate import RunClock
from examples.cnniqa_agiqa.metrics import all_metrics
from examples.cnniqa_agiqa.model import CNNIQA, load_pretrained, save_plain, save_pyiqa
from examples.cnniqa_agiqa.progress import say
from examples.cnniqa_agiqa.task import Task
from examples.cnniqa_agiqa.train import fit, predict
from examples.cnniqa_agiqa.variants import VARIANTS, build

__all__ = ["Outcome", "run_all"]


@dataclass
class Outcome:
    """Everything the report, files and plots need."""

    runs: list[dict] = field(default_factory=list)  # one per (split, variant): metrics, curve, timing
    trainable: dict[str, int] = field(default_factory=dict)  # variant -> trainable numbers
    delta_bytes: dict[str, int] = field(default_factory=dict)  # svd variant -> size of its delta file
    spectra: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)  # split 1
    merge: dict[str, object] = field(default_factory=dict)  # the merge check
    seconds: float = 0.0


def _loaders(task: Task, split: dict[str, list[int]], config: RunConfig, info: DistInfo, seed: int):
    """Training, validation and test loaders of one split."""
    train = task.dataset(split["train"], config.crop, True)
    val = task.dataset(split["val"], config.eval_crop, False)
    test = task.dataset(split["test"], config.eval_crop, False)
    eval_batch = max(config.batch_size, 64)
    return (make_loader(train, config.batch_size, True, seed, config.workers, info.active),
            make_loader(val, eval_batch, False, seed, config.workers),
            make_loader(test, eval_batch, False, seed, config.workers))


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a model (deltas, or every weight), for the rank check."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_outputs(model: nn.Module, name: str, split: int, task: Task, config: RunConfig,
                  info: DistInfo, outcome: Outcome) -> None:
    """Delta file (svd variants, rank 0), per-rank dump if asked, spectra of split 1."""
    out = Path(config.out)
    if config.rank_deltas and info.active:
        from safetensors.torch import save_file

        (out / "ranks").mkdir(exist_ok=True)
        save_file(_trained_tensors(model), str(out / "ranks" / f"rank{info.rank}_{name}_split{split}.safetensors"))
    if VARIANTS[name].trains != "svd" or not info.main:
        return
    (out / "deltas").mkdir(exist_ok=True)
    path = out / "deltas" / f"{name}_split{split}.safetensors"
    svdtune.save_delta(model, str(path), metadata={"dataset": task.name, "variant": name, "split": str(split)})
    outcome.delta_bytes[name] = path.stat().st_size
    if split == 1:
        outcome.spectra[name] = {k: (a.tolist(), b.tolist()) for k, (a, b) in svdtune.singular_values(model).items()}


def _announcer(clock: RunClock, name: str, show: bool):
    """on_epoch callback of fit that prints the whole-run estimate after the first epoch."""
    seen: dict[int, float] = {}

    def on_epoch(epoch: int, seconds: float) -> None:
        seen[epoch] = seconds
        if epoch == 1:
            line = clock.first_epoch(name, seen[0], seconds - seen[0])
            say(line or "", show and line is not None)

    return on_epoch


def _run_one(name: str, split_no: int, split: dict[str, list[int]], task: Task, config: RunConfig,
             info: DistInfo, clock: RunClock) -> tuple[nn.Module, dict]:
    """Build, train, select on val and score on test one variant on one split."""
    seed = config.seed * 1000 + split_no
    model, params, lr = build(VARIANTS[name], task.pretrained, config, seed)
    model.to(info.device)
    if split_no == 1 and VARIANTS[name].trains == "svd":
        say(f"{name}: what svdtune trains\n{svdtune.report(model)}", info.main and not config.quiet)
    torch.manual_seed(seed * 31 + info.rank)  # crops and dropout differ per rank, repeat per run
    train_loader, val_loader, test_loader = _loaders(task, split, config, info, seed)
    epochs = config.epochs if params else 0
    show = info.main and not config.quiet
    result = fit(model, params, lr, epochs, train_loader, val_loader, info, config.weight_decay,
                 config.schedule, desc=f"split {split_no} {name}", show=show, select=config.select,
                 on_epoch=_announcer(clock, name, show))
    pred, target = predict(model, test_loader, info.device)
    run = {"variant": name, "split": split_no, "epochs": epochs, "best_epoch": result.best_epoch,
           "trainable": sum(p.numel() for p in params), "lr": lr, "seconds": round(result.seconds, 2),
           "val_srcc": [round(v, 5) for v in result.val_srcc], **all_metrics(pred, target)}
    return model, run


def _merge_check(model: nn.Module, name: str, split: dict[str, list[int]], task: Task,
                 config: RunConfig, info: DistInfo) -> dict[str, object]:
    """Merge a copy of an svd model, save it plain (.safetensors and IQA-PyTorch's .pth), reload both
    without svdtune, and compare their predictions with the adapted model's."""
    test = make_loader(task.dataset(split["test"], config.eval_crop, False), 64, False, 0, config.workers)
    adapted, _ = predict(model, test, info.device)
    merged = svdtune.merge(copy.deepcopy(model)).cpu()
    out = Path(config.out)
    path, pth = out / f"merged_{name}.safetensors", out / f"merged_{name}.pth"
    save_plain(merged, path, metadata={"dataset": task.name, "variant": name, "note": "svdtune.merge of split 1"})
    save_pyiqa(merged, pth)
    diff = 0.0
    for written in (path, pth):
        plain = load_pretrained(CNNIQA(), written).to(info.device)  # a plain CNNIQA, no svdtune involved
        reloaded, _ = predict(plain, test, info.device)
        diff = max(diff, float(abs(adapted - reloaded).max()))
    return {"variant": name, "file": path.name, "pth": pth.name, "max_abs_diff": diff, "images": len(adapted)}


def _best_by_validation(outcome: Outcome, names: list[str]) -> str:
    """The variant whose kept checkpoints have the best mean validation SRCC over splits."""
    def mean_val(name: str) -> float:
        runs = [r for r in outcome.runs if r["variant"] == name]
        return sum(r["val_srcc"][r["best_epoch"]] for r in runs) / len(runs)

    return max(names, key=mean_val)


def run_all(task: Task, splits: list[dict[str, list[int]]], config: RunConfig, info: DistInfo) -> Outcome:
    """Run every variant on every split.

    Args:
        task: the data and pretrained weights.
        splits: from splits.make_splits or load_splits.
        config: the run configuration.
        info: process-group info; only rank 0 writes files.

    Returns:
        The Outcome with all runs, sizes, spectra and the merge check.
    """
    start, outcome = time.perf_counter(), Outcome()
    kept: dict[str, nn.Module] = {}  # split-1 model of each svd variant, for the merge
    jobs = [(s, name) for s in range(1, len(splits) + 1) for name in config.variants]
    clock = RunClock(jobs, {n for n in config.variants if VARIANTS[n].trains != "none"}, config.epochs)
    for split_no, split in enumerate(splits, 1):
        for name in config.variants:
            started = time.perf_counter()
            model, run = _run_one(name, split_no, split, task, config, info, clock)
            outcome.runs.append(run)
            outcome.trainable[name] = run["trainable"]
            _save_outputs(model, name, split_no, task, config, info, outcome)
            if split_no == 1 and VARIANTS[name].trains == "svd":
                kept[name] = model
            left = clock.finished(name, time.perf_counter() - started)
            say(f"split {split_no}/{len(splits)} {name:9s} test SRCC {run['srcc']:.4f} PLCC {run['plcc']:.4f} "
                f"(best epoch {run['best_epoch']}, {run['seconds']:.1f} s; {left})", info.main and not config.quiet)
    if kept and info.main:
        best = _best_by_validation(outcome, list(kept))
        outcome.merge = _merge_check(kept[best], best, splits[0], task, config, info)
    outcome.seconds = time.perf_counter() - start
    return outcome
