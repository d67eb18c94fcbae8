"""Training and evaluation loops (MSE loss, AdamW, cosine or constant LR).

The checkpoint is chosen by validation SRCC, measured before training
(epoch 0) and after every epoch; the test set is only scored afterwards.
Under torchrun the model is wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from examples.cnniqa_agiqa.distributed import DistInfo
from examples.cnniqa_agiqa.metrics import srcc
from examples.cnniqa_agiqa.progress import progress

__all__ = ["TrainResult", "predict", "fit", "lr_lambda", "SCHEDULES", "MILESTONES", "GAMMA"]

SCHEDULES = ("cosine", "constant", "multistep")
MILESTONES = (10, 20, 30, 40)  # "multistep": epochs after which the rate is multiplied by GAMMA (IQA-PyTorch's)
GAMMA = 0.5


@dataclass
class TrainResult:
    """What one training run returns (the model itself holds the best weights)."""

    val_srcc: list[float] = field(default_factory=list)  # index e: after e epochs (0: before training)
    best_epoch: int = 0  # epoch whose weights were kept
    seconds: float = 0.0  # wall time of training and validation


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Score every image of a loader in eval mode.

    Args:
        model: the regressor (B, 3, H, W) -> (B,).
        loader: yields (images, targets) in a fixed order.
        device: where to run.

    Returns:
        (predictions, targets) as float64 arrays in loader order.
    """
    model.eval()
    preds, targets = [], []
    for images, target in loader:
        preds.append(model(images.to(device)).float().cpu())
        targets.append(target.float())
    return torch.cat(preds).double().numpy(), torch.cat(targets).double().numpy()


def lr_lambda(schedule: str, total_steps: int, steps_per_epoch: int = 1):
    """Multiplier of the base learning rate at each optimizer step.

    Args:
        schedule: "cosine" (from 1 down to 0 over total_steps), "constant", or
            "multistep" (IQA-PyTorch's MultiStepLR: x0.5 after each of the epochs in MILESTONES).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (for "multistep").

    Returns:
        A function step -> factor, for torch.optim.lr_scheduler.LambdaLR.

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if schedule == "multistep":
        per_epoch = max(steps_per_epoch, 1)
        return lambda step: GAMMA ** sum(step // per_epoch >= m for m in MILESTONES)
    raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer, scheduler, device: torch.device) -> float:
    """One pass over the training loader; returns the mean MSE."""
    model.train()
    total, count = 0.0, 0
    for images, target in loader:
        pred = model(images.to(device))
        loss = F.mse_loss(pred, target.to(device).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, count = total + float(loss.detach()) * len(target), count + len(target)
    return total / max(count, 1)


def _val_srcc(model: nn.Module, loader: DataLoader, device: torch.device, desc: str, epoch: int) -> float:
    """Validation SRCC, with a clear error when training has diverged."""
    pred, target = predict(model, loader, device)
    if not np.isfinite(pred).all():
        raise ValueError(f"{desc}: non-finite predictions after epoch {epoch} (training diverged); "
                         "lower this variant's learning rate")
    return srcc(pred, target)


def _wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the model when running on several processes."""
    if not info.active:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)  # CNNIQA and svdtune layers hold no buffers


def fit(model: nn.Module, params: list[nn.Parameter], lr: float, epochs: int, train_loader: DataLoader,
        val_loader: DataLoader, info: DistInfo, weight_decay: float = 1e-2, schedule: str = "cosine",
        desc: str = "train", show: bool = True, select: str = "val",
        on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `params` of `model` and leave the weights of the best validation epoch in it.

    Args:
        model: on info.device; trained in place.
        params: the parameters to optimize (may be empty: only evaluates).
        lr: AdamW learning rate.
        epochs: passes over the training set.
        train_loader: training batches (DistributedSampler under DDP).
        val_loader: validation set, same on every rank.
        info: process-group info.
        weight_decay: AdamW weight decay.
        schedule: "cosine" or "constant".
        desc: progress-bar label.
        show: show progress bars.
        select: "val" keeps the epoch with the best validation SRCC (0 = untrained
            included); "last" keeps the final weights.
        on_epoch: called as on_epoch(epoch, seconds since the start) after the
            validation of every epoch, 0 (before training) included.

    Returns:
        The validation curve, kept epoch and time.
    """
    start = time.perf_counter()
    result = TrainResult(val_srcc=[_val_srcc(model, val_loader, info.device, desc, 0)])
    tick = on_epoch or (lambda epoch, seconds: None)
    tick(0, time.perf_counter() - start)
    if not params or epochs == 0:
        result.seconds = time.perf_counter() - start
        return result
    best_state = copy.deepcopy(model.state_dict())
    runner = _wrap(model, info)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, steps, len(train_loader)))
    for epoch in progress(range(1, epochs + 1), desc, enabled=show):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        _train_epoch(runner, train_loader, optimizer, scheduler, info.device)
        result.val_srcc.append(_val_srcc(model, val_loader, info.device, desc, epoch))
        tick(epoch, time.perf_counter() - start)
        if select == "last" or result.val_srcc[-1] > result.val_srcc[result.best_epoch]:
            result.best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result
