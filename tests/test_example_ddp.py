"""The example under torchrun: 2 CPU processes (gloo) end with identical trained tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--source-scenes", "8", "--target-scenes", "8", "--versions", "4", "--pretrain-epochs", "1",
        "--epochs", "2", "--splits", "1", "--image-size", "32", "--crop", "24", "--batch-size", "8"]


@pytest.mark.slow
def test_two_process_ddp_run_gives_identical_deltas_on_both_ranks(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "examples.cnniqa_agiqa", "--out", str(out), "--variants", "svd-all,head",
               "--select", "last", "--rank-deltas", "--quiet", "--no-plots", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Results on SYNTHETIC") == 1  # only rank 0 reports
    for variant in ("svd-all", "head"):
        rank0 = load_file(str(out / "ranks" / f"rank0_{variant}_split1.safetensors"))
        rank1 = load_file(str(out / "ranks" / f"rank1_{variant}_split1.safetensors"))
        assert set(rank0) == set(rank1) and rank0
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{variant} {key} differs between ranks"
    deltas = load_file(str(out / "ranks" / "rank0_svd-all_split1.safetensors"))
    assert sorted(deltas) == ["conv1.svd_delta", "fc1.svd_delta", "fc2.svd_delta", "fc3.svd_delta"]
    assert any(float(v.abs().max()) > 0 for v in deltas.values())  # the last epoch's deltas: trained
    stored = load_file(str(out / "deltas" / "svd-all_split1.safetensors"))
    assert all(torch.equal(stored[k], deltas[k]) for k in deltas if k in stored)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["best_epoch"] for r in runs if r["variant"] != "zero-shot"} == {2}
