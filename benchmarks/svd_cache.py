"""Cold vs warm `svdtune.apply` with an SVD cache, measured in one run.

The model is a stack of square Linear layers (default: 4 of 2048x2048). Each
repeat uses a fresh, empty cache folder:
  uncached  apply(cache_dir=None): every SVD computed, nothing written (the baseline)
  cold      apply(cache_dir=empty folder): every SVD computed and written
  warm      apply(cache_dir=same folder) on a fresh copy of the model: every SVD read back
and prints the median of each and the cold/warm ratio.

Run: python benchmarks/svd_cache.py [--layers 4] [--size 2048] [--repeats 3] [--rank R] [--device cuda] [--threads T]

On a busy shared machine, --threads 1 gives steadier numbers (multi-threaded LAPACK
slows down badly when the cores are oversubscribed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from torch import nn

import svdtune


def timed(model: nn.Module, cache_dir: str | None, rank: int | None) -> float:
    """Seconds for one apply on a copy of ``model`` (the copy is not timed)."""
    fresh = copy.deepcopy(model)
    if fresh.parameters().__next__().is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    svdtune.apply(fresh, targets="*", rank=rank, cache_dir=cache_dir)
    if fresh.parameters().__next__().is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(args.size, args.size) for _ in range(args.layers))).to(args.device)
    times: dict[str, list[float]] = {"uncached": [], "cold": [], "warm": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            times["uncached"].append(timed(model, None, args.rank))
            times["cold"].append(timed(model, folder, args.rank))
            times["warm"].append(timed(model, folder, args.rank))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.layers} x Linear {args.size}x{args.size}, rank={args.rank}, device={args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, seconds in median.items():
        print(f"  {name:9s} {seconds:8.3f} s  ({seconds / median['uncached']:.2f}x uncached)")
    print(f"cold / warm = {median['cold'] / median['warm']:.1f}x")


if __name__ == "__main__":
    main()
