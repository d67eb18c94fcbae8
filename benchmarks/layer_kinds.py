"""Train-step cost of the layer kinds added in format version 4, each against a baseline measured in the same run.

  conv1d     transformers Conv1D (768 -> 2304, GPT-2's c_attn) adapted, against nn.Linear of the same
             shape adapted: the ratio shows that Conv1D's (out, in) view takes the same path as Linear
  embedding  nn.Embedding (50257 x 768, GPT-2's vocabulary; rank 64) adapted, against full fine-tuning
             of it and against rebuilding W' = W + U diag(shift) Vh every step (what gathering U's rows avoids)

A step is forward, backward and SGD; each form is timed interleaved, median of the repeats, one thread.

Run: python benchmarks/layer_kinds.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import svdtune


def step_seconds(forward, params, repeats: int) -> list[float]:
    optimizer = torch.optim.SGD(params, lr=1e-3)
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        start = time.perf_counter()
        forward().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def compare(forms: dict[str, tuple], repeats: int) -> dict[str, float]:
    """{form: median seconds}, the forms timed in turn, several rounds."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(3):
        for name, (forward, params) in forms.items():
            times[name] += step_seconds(forward, params, repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def conv1d_forms(rows: int) -> dict[str, tuple]:
    from transformers.pytorch_utils import Conv1D

    linear, conv = nn.Sequential(nn.Linear(768, 2304)), nn.Sequential(Conv1D(2304, 768))
    svdtune.apply(linear, "0", rank=32)
    svdtune.apply(conv, "0", rank=32)
    x = torch.randn(rows, 768)
    return {"linear r32": (lambda: linear(x), svdtune.trainable_parameters(linear)),
            "conv1d r32": (lambda: conv(x), svdtune.trainable_parameters(conv))}


def embedding_forms(rows: int) -> dict[str, tuple]:
    full, adapted = nn.Embedding(50257, 768), nn.Sequential(nn.Embedding(50257, 768))
    adapted[0].weight.data.copy_(full.weight.data)
    svdtune.apply(adapted, "0", rank=64)
    layer = adapted[0]
    ids = torch.randint(0, 50257, (rows,))

    def rebuild():
        return F.embedding(ids, layer.adapted_weight())

    return {"full": (lambda: full(ids), list(full.parameters())),
            "rebuild W'": (rebuild, svdtune.trainable_parameters(adapted)),
            "svdtune r64": (lambda: adapted(ids), svdtune.trainable_parameters(adapted))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = 2 if args.quick else 5
    for title, forms, baseline in (("conv1d, 512 rows", conv1d_forms(512), "linear r32"),
                                   ("embedding, 512 tokens", embedding_forms(512), "full")):
        medians = compare(forms, repeats)
        print(title)
        for name, seconds in medians.items():
            print(f"  {name:12s} {seconds * 1e3:8.1f} ms  {seconds / medians[baseline]:5.2f}x {baseline}")


if __name__ == "__main__":
    main()
