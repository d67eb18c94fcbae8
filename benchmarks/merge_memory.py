"""Peak memory of `svdtune.merge_files` against the size of the base checkpoint.

Writes a base checkpoint of about --mb megabytes (many 1024 x 1024 float32
layers) and a delta for one of its layers, then merges them in fresh child
processes and prints each child's peak resident memory (VmHWM, Linux) as a ratio
to the file size. The baseline, measured in the same run, reads the whole base
into memory first (as `merge_files` did before it memory-mapped the base).

Run: python benchmarks/merge_memory.py [--mb 400]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import safetensors.torch
import torch
from torch import nn

import svdtune

WIDTH = 1024


def write_files(folder: str, megabytes: int) -> dict[str, str]:
    layers = max(1, megabytes * 2**20 // (WIDTH * WIDTH * 4))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))
    state = model.state_dict()
    paths = {"safetensors": os.path.join(folder, "base.safetensors"), "pt": os.path.join(folder, "base.pt")}
    safetensors.torch.save_file(state, paths["safetensors"])
    torch.save(state, paths["pt"])
    svdtune.apply(model, targets=["0"])
    with torch.no_grad():
        model[0].svd_delta.normal_(std=0.1)
    paths["delta"] = os.path.join(folder, "task.safetensors")
    svdtune.save_delta(model, paths["delta"])
    return paths


def peak_resident() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss, not inherited at fork)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(base: str, delta: str, out: str, whole: bool) -> None:
    if not base:  # the idle process: imports only
        print(peak_resident())
        return
    if whole:  # the baseline: read the whole base file into memory
        from svdtune import checkpoints, container

        read = container.read
        container.read = lambda *args, mapped=False, **kwargs: read(*args, **kwargs)
        checkpoints._torch_load = lambda path: torch.load(path, map_location="cpu", weights_only=True)
    svdtune.merge_files(base, delta, out)
    print(peak_resident())


def peak_bytes(base: str, delta: str, out: str, whole: bool) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--child", base, delta, out] + (["--whole"] if whole else [])
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=400, help="size of the base checkpoint")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, whole=args.whole)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(folder, args.mb)
        out = os.path.join(folder, "merged.safetensors")
        idle = peak_bytes("", "", "", whole=False)
        print(f"torch={torch.__version__}  peak resident memory of merge_files above an idle process "
              f"({idle / 2**20:.0f} MB), as a ratio to the base file size")
        for kind in ("safetensors", "pt"):
            size = os.path.getsize(paths[kind])
            whole = peak_bytes(paths[kind], paths["delta"], out, whole=True) - idle
            mapped = peak_bytes(paths[kind], paths["delta"], out, whole=False) - idle
            print(f"  .{kind:<12} {size / 2**20:5.0f} MB   whole read {whole / size:5.2f}x   "
                  f"memory-mapped {mapped / size:5.2f}x")


if __name__ == "__main__":
    main()
