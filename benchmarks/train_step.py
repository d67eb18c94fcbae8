"""Train-step cost of svdtune against full fine-tuning, measured in one run.

A step is forward, backward and AdamW on a stack of Linear layers. Every form is
timed on the same inputs in the same process, interleaved, and reported as a
ratio to full fine-tuning of the same layers (median of several repeats).

Forms:
  full        every weight and bias trained (the baseline, 1.00x)
  naive       W' = U @ diag(relu(S + d)) @ Vh rebuilt every forward (public SVDiff code)
  two-path    W x + ((x Vh^T) * (sigma' - sigma)) U^T
  svdtune-blas svdtune with its oneDNN kernels switched off: every product by F.linear
              (on the factorized path, the one-path form ((x Vh^T) * sigma') U^T)
  svdtune     svdtune.apply(rank=None): the path chosen per layer and batch
  svdtune-r16 svdtune.apply(rank=16)
  floor       frozen base, gradients w.r.t. activations only (no trainable weight)
  full-onednn full fine-tuning with svdtune's oneDNN products in forward and backward:
              the baseline on equal kernels, so svdtune / full-onednn is the ratio of the
              algorithms alone (CPU float32 only)
  lora-r16    PEFT LoRA r=16 on the same layers (if peft is installed), to compare with svdtune-r16
Then a small stack (64 wide, batch 32), whose products are too small for the oneDNN kernel,
and one conv case shaped like CNNIQA's conv1: full fine-tuning of the conv against svdtune on it.

Run: python benchmarks/train_step.py [--quick] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from svdtune import kernels


class NaiveSVDLinear(nn.Module):
    """The public SVDiff forward: rebuild the whole weight from its factors every call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        U, S, Vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
        dtype = linear.weight.dtype
        self.register_buffer("U", U.to(dtype))
        self.register_buffer("S", S.to(dtype))
        self.register_buffer("Vh", Vh.to(dtype))
        self.register_buffer("bias", linear.bias.detach().clone())
        self.delta = nn.Parameter(torch.zeros_like(self.S))

    def forward(self, x):
        weight = self.U @ torch.diag(F.relu(self.S + self.delta)) @ self.Vh
        return F.linear(x, weight, self.bias)


class TwoPathLinear(NaiveSVDLinear):
    """Exact residual form: frozen dense path plus a factorized correction."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.register_buffer("W", linear.weight.detach().clone())

    def forward(self, x):
        shift = F.relu(self.S + self.delta) - self.S
        return F.linear(x, self.W, self.bias) + F.linear(F.linear(x, self.Vh) * shift, self.U)


class SameKernelLinear(nn.Linear):
    """nn.Linear whose products (forward, dx, dW) go through svdtune's oneDNN kernel."""

    def forward(self, x):
        return kernels.linear(x, self.weight, self.bias)


class BlasOnly(nn.Module):
    """Runs a model with svdtune's oneDNN kernels switched off (the forward picks the kernel)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        saved, kernels._state["usable"] = kernels._state["usable"], False
        try:
            return self.model(x)
        finally:
            kernels._state["usable"] = saved


def make_stack(width: int, depth: int, device, dtype) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(device=device, dtype=dtype)


def replace_linears(model: nn.Sequential, cls) -> nn.Sequential:
    model = copy.deepcopy(model)
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            model[i] = cls(layer)
    return model


class ConvNet(nn.Module):
    """CNNIQA's shape: conv1 (50 x 147 as a matrix) on large activations, pooled, then a small head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 50, 7)
        self.fc = nn.Linear(100, 1)

    def forward(self, x):
        h = self.conv1(x)
        return self.fc(torch.cat([h.amax(dim=(2, 3)), h.amin(dim=(2, 3))], dim=1))


def conv_forms(device, dtype) -> dict[str, nn.Module]:
    """Full fine-tuning of conv1 against svdtune on conv1 (the head frozen in both)."""
    base = ConvNet().to(device=device, dtype=dtype)
    full = copy.deepcopy(base)
    full.fc.requires_grad_(False)
    return {"full": full, "svdtune": svdtune.apply(copy.deepcopy(base), targets=["conv1"])}


def build_forms(base: nn.Sequential, quick: bool) -> dict[str, nn.Module]:
    cpu32 = base[0].weight.device.type == "cpu" and base[0].weight.dtype == torch.float32
    forms = {"full": copy.deepcopy(base)}
    forms["naive"] = replace_linears(base, NaiveSVDLinear)
    if not quick:
        forms["two-path"] = replace_linears(base, TwoPathLinear)
    if cpu32:
        forms["svdtune-blas"] = BlasOnly(svdtune.apply(copy.deepcopy(base), targets=["*"]))
    forms["svdtune"] = svdtune.apply(copy.deepcopy(base), targets=["*"])
    forms["svdtune-r16"] = svdtune.apply(copy.deepcopy(base), targets=["*"], rank=16)
    forms["floor"] = copy.deepcopy(base).requires_grad_(False)
    if cpu32:
        forms["full-onednn"] = replace_linears(base, lambda layer: retype(layer, SameKernelLinear))
    lora = peft_lora(base, rank=16)
    if lora is not None:
        forms["lora-r16"] = lora
    return forms


def peft_lora(base: nn.Sequential, rank: int) -> nn.Module | None:
    """PEFT LoRA of the given rank on every Linear of a copy of ``base``, or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    names = [str(i) for i, layer in enumerate(base) if isinstance(layer, nn.Linear)]
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0)
    return peft.get_peft_model(copy.deepcopy(base), config)


def retype(layer: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    layer.__class__ = cls  # replace_linears hands over a copy
    return layer


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.mse_loss):
    """One train step (forward, backward, AdamW) of ``model`` on (x, y), as a function of no arguments."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    if not params:  # the floor: gradients w.r.t. activations only, on its own copy of the input
        x = x.detach().clone().requires_grad_(True)

    def step():
        loss = loss_fn(model(x), y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            x.grad = None

    return step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: dict[str, callable], device, repeats: int, inner: int) -> dict[str, float]:
    for step in steps.values():  # warm up (allocator, optimizer state, kernels)
        step(); step()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit every form alike
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                step()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--depth", type=int, default=3, help="Linear layers per stack")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if device.type == "cuda":
        shapes = [(1024, 64), (1024, 1024), (4096, 4096)]
    else:
        shapes = [(800, 64), (1024, 256), (2048, 512)] if args.quick else [
            (800, 64), (800, 512), (1024, 64), (1024, 256), (2048, 64), (2048, 512)]
    repeats, inner = (3, 2) if args.quick else (5, 3)
    ratios: dict[str, list[float]] = {}
    print(f"device={device} dtype={args.dtype} depth={args.depth} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'width':>6} {'batch':>6} {'full ms':>9}  " + "  ".join(f"{n:>12}" for n in build_forms(make_stack(8, 1, device, dtype), args.quick) if n != "full"))
    for width, batch in shapes:
        base = make_stack(width, args.depth, device, dtype)
        x = torch.randn(batch, width, device=device, dtype=dtype)
        y = torch.randn(batch, width, device=device, dtype=dtype)
        forms = build_forms(base, args.quick)
        result = measure({n: step_fn(m, x, y) for n, m in forms.items()}, device, repeats, inner)
        row = {n: result[n] / result["full"] for n in forms if n != "full"}
        for n, r in row.items():
            ratios.setdefault(n, []).append(r)
        print(f"{width:>6} {batch:>6} {1e3 * result['full']:>9.2f}  " + "  ".join(f"{r:>11.2f}x" for r in row.values()))
    geomean = {n: math.exp(statistics.mean(map(math.log, r))) for n, r in ratios.items()}
    print(f"{'geomean':>13} {'1.00x':>9}  " + "  ".join(f"{g:>11.2f}x" for g in geomean.values()))
    if "full-onednn" in geomean:
        print(f"on equal kernels, svdtune / full-onednn: {geomean['svdtune'] / geomean['full-onednn']:.2f}x (geomean)")
    small = make_stack(64, args.depth, device, dtype)  # products below kernels.MIN_MULTIPLY_ADDS
    x, y = (torch.randn(32, 64, device=device, dtype=dtype) for _ in range(2))
    forms = {"full": copy.deepcopy(small), "svdtune": svdtune.apply(copy.deepcopy(small), targets=["*"])}
    result = measure({n: step_fn(m, x, y) for n, m in forms.items()}, device, repeats, inner * 10)
    print(f"small stack 64 wide, batch 32: full {1e3 * result['full']:.3f} ms, svdtune {result['svdtune'] / result['full']:.2f}x")
    x = torch.rand(16 if args.quick else 32, 3, 112, 112, device=device, dtype=dtype)
    y = torch.rand(x.shape[0], 1, device=device, dtype=dtype)
    result = measure({n: step_fn(m, x, y) for n, m in conv_forms(device, dtype).items()}, device, repeats, inner)
    print(f"conv1 3->50 k7 on {tuple(x.shape)}: full {1e3 * result['full']:.2f} ms, "
          f"svdtune (W' rebuilt each step) {result['svdtune'] / result['full']:.2f}x")


if __name__ == "__main__":
    main()
