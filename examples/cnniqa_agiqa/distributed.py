"""torchrun / DistributedDataParallel plumbing.

Under `torchrun --nproc_per_node=N -m examples.cnniqa_agiqa ...` the
environment holds RANK, WORLD_SIZE and LOCAL_RANK; the example then joins a
process group (gloo on CPU, nccl on CUDA), shards each training epoch over the
processes and averages gradients with DDP. Every rank evaluates the same full
val/test sets, so all ranks pick the same checkpoint; only rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "barrier", "pick_device"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0 when not distributed
    world: int  # number of processes, 1 when not distributed
    device: torch.device  # the device this process trains on

    @property
    def active(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """True on the process that prints and writes files."""
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """Resolve --device: 'auto' picks CUDA when available; plain 'cuda' maps to the local rank.

    Args:
        name: "auto", "cpu", "cuda" or "cuda:N".
        local_rank: this process's index on its node.

    Returns:
        The torch device.

    Raises:
        RuntimeError: CUDA was asked for but is not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} but torch sees no CUDA device; use --device cpu or install a CUDA build")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def setup(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single process.

    Args:
        device_name: the --device option.

    Returns:
        This process's DistInfo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world <= 1:
        return DistInfo(rank=0, world=1, device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def barrier(info: DistInfo) -> None:
    """Wait for all processes (no-op when not distributed)."""
    if info.active:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Leave the process group (no-op when not distributed)."""
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
