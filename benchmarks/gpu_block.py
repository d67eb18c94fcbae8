"""Apply time and peak device memory for one Llama-2-7B-shaped block's seven projections, in one run.

The block: q/k/v/o_proj (4096 x 4096), gate/up_proj (11008 x 4096) and down_proj (4096 x 11008), as
plain nn.Linear layers in bfloat16 on the device (no transformers needed). Each configuration starts
from a fresh copy of the same base and reports, as ratios to the base where it makes sense:

  apply s      wall time of svdtune.apply (or of peft.get_peft_model)
  held GiB     what the configured model holds after apply (weights, factors and deltas)
  peak GiB     the device's peak allocation for it during apply and one training step (batch --tokens)

Configurations: svdtune full rank (exact SVD, gesvd on CUDA), svdtune rank 64 with the exact SVD and
with the randomized one, svdtune rank 256 randomized, and PEFT LoRA r=16 when peft is installed.

Run: python benchmarks/gpu_block.py [--device cuda] [--small]   (--small: a 1/8-wide block, for a CPU smoke run)
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
import torch.nn.functional as F
from torch import nn

import svdtune

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


class Block(nn.Module):
    """The seven projections of a Llama block (attention and MLP), applied in sequence with a residual."""

    def __init__(self, divide: int = 1):
        super().__init__()
        for name, (out, inp) in SHAPES.items():
            setattr(self, name, nn.Linear(inp // divide, out // divide, bias=False))

    def forward(self, x):
        attention = self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))
        h = x + attention
        return h + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> float:
    """GiB allocated now on ``device`` (0 on the CPU, where this script does not measure memory)."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def run(name: str, base: Block, adapt, device: torch.device, tokens: int) -> dict[str, float]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = memory(device)  # the base kept for the next configuration
    model = copy.deepcopy(base)
    sync(device)
    start = time.perf_counter()
    model = adapt(model)
    sync(device)
    seconds = time.perf_counter() - start
    held = memory(device) - before  # this model: weights, factors, deltas
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(tokens, base.q_proj.in_features, device=device, dtype=torch.bfloat16)
    loss = model(x).float().square().mean()
    if params:
        loss.backward()
        torch.optim.AdamW(params, lr=1e-4).step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 - before if device.type == "cuda" else 0.0
    del model, params, x, loss
    return {"apply s": seconds, "held GiB": held, "peak GiB": peak}


def configurations():
    yield "full fine-tuning (no apply)", lambda m: m
    yield "svdtune full rank, exact", lambda m: svdtune.apply(m, "*", svd="exact", progress=False)
    yield "svdtune rank 64, exact", lambda m: svdtune.apply(m, "*", rank=64, svd="exact", progress=False)
    yield "svdtune rank 64, randomized", lambda m: svdtune.apply(m, "*", rank=64, svd="randomized", progress=False)
    yield "svdtune rank 256, randomized", lambda m: svdtune.apply(m, "*", rank=256, svd="randomized", progress=False)
    try:
        import peft
    except ImportError:
        return
    config = peft.LoraConfig(r=16, lora_alpha=16, target_modules=list(SHAPES), lora_dropout=0.0)
    yield "PEFT LoRA r=16", lambda m: peft.get_peft_model(m, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a block 8x narrower (CPU smoke run)")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the training step's batch")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = Block(8 if args.small else 1).to(device=device, dtype=torch.bfloat16)
    base_gib = memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} block={'1/8 ' if args.small else ''}Llama-2-7B, bfloat16, "
          f"base weights {base_gib:.2f} GiB")
    print(f"{'configuration':<30} {'apply s':>9} {'held GiB':>9} {'x base':>7} {'peak GiB':>9} {'x base':>7}")
    for label, adapt in configurations():
        r = run(label, base, adapt, device, args.tokens)
        held, peak = (f"{r[k] / base_gib:>6.2f}x" if base_gib else "      -" for k in ("held GiB", "peak GiB"))
        print(f"{label:<30} {r['apply s']:>9.2f} {r['held GiB']:>9.2f} {held} {r['peak GiB']:>9.2f} {peak}",
              flush=True)


if __name__ == "__main__":
    main()
