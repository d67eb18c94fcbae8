"""DistributedDataParallel: 2 CPU processes (gloo) train the same deltas; factors are never broadcast."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import svdtune

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # rank 1 starts from other base weights: DDP's broadcast must fix them
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(28, 1))
        svdtune.apply(model, targets=["*"])
        assert not list(model.buffers()), "factors must not be buffers (DDP would broadcast them every step)"
        svd_calls = []
        original = svdtune.layers.SpectralLayer.redecompose
        svdtune.layers.SpectralLayer.redecompose = lambda self: (svd_calls.append(1), original(self))[1]
        ddp = DistributedDataParallel(model)  # broadcasts rank 0's weights and factors together, once
        optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=1e-2)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(5):
            x = torch.randn(4, 8, generator=generator)
            loss = ddp(x.unsqueeze(1)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe = torch.ones(1, 1, 8)
        with torch.no_grad():
            out = model(probe)
        state = {k: v for k, v in model.state_dict().items()}
        state["probe_output"] = out
        state["svd_calls"] = torch.tensor(len(svd_calls))
        factors = model[0].spectral_factors()  # rank 1's factors are rank 0's: those of the weight it now holds
        state["reconstruction"] = factors.U @ torch.diag(factors.sigma) @ factors.Vh - model[0].base_weight
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_deltas(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    deltas = [k for k in states[0] if k.endswith("svd_delta")]
    assert len(deltas) == 3
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert all(states[0][k].abs().sum() > 0 for k in deltas)  # they trained
    for state in states:
        assert state["svd_calls"] == 0  # DDP's broadcast wrote weights and factors together: no SVD again
        assert state["reconstruction"].abs().max() < 1e-5
