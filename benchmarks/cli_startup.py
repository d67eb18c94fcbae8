"""Start-up time of the ``svdtune`` command, against a bare Python start measured in the same run.

Each command runs as a fresh process (``python -m svdtune ...`` of this checkout), repeated:
  python -c pass              the floor: starting the interpreter (the baseline)
  svdtune --help              must not import torch
  svdtune --version           must not import torch
  svdtune inspect DELTA       does its work, so it pays the torch import (a tiny delta file)
and prints the median of each and the ratios to the floor and to ``inspect``.

Run: python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds(argv: list[str], repeats: int) -> float:
    """The median wall time of running ``argv`` (which must succeed) ``repeats`` times."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_delta(folder: str) -> str:
    """A delta file of a 2-layer MLP, written by a child process (this one stays free of torch)."""
    path = os.path.join(folder, "task.safetensors")
    code = ("import torch, svdtune\n"
            "model = svdtune.apply(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)), '*')\n"
            f"svdtune.save_delta(model, {path!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    svdtune = [sys.executable, "-m", "svdtune"]
    with tempfile.TemporaryDirectory() as folder:
        delta = tiny_delta(folder)
        runs = {
            "python -c pass": seconds([sys.executable, "-c", "pass"], args.repeats),
            "svdtune --help": seconds(svdtune + ["--help"], args.repeats),
            "svdtune --version": seconds(svdtune + ["--version"], args.repeats),
            "svdtune inspect DELTA": seconds(svdtune + ["inspect", delta], args.repeats),
        }
    floor, inspect = runs["python -c pass"], runs["svdtune inspect DELTA"]
    print(f"median of {args.repeats} runs each, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'command':<24}{'seconds':>9}{'x python -c pass':>18}{'x inspect':>11}")
    for name, value in runs.items():
        print(f"{name:<24}{value:>9.3f}{value / floor:>17.2f}x{value / inspect:>10.2f}x")


if __name__ == "__main__":
    main()
