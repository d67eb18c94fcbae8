"""Train-step cost of svdtune on convolutional networks against full fine-tuning, in one run.

Two architectures with the layer kinds and shapes of torchvision's ResNet-18 and timm's
ConvNeXt-atto, built here from plain torch (no torchvision/timm needed). Each step is
forward, backward and AdamW; every form is timed on the same inputs, interleaved, and
reported as a ratio to full fine-tuning of the same model (median of repeats):

  full      every parameter trained (the baseline, 1.00x)
  svdtune   svdtune.apply(targets=["*"]): every Conv/Linear gets spectral deltas, the rest frozen
  floor     everything frozen, gradients w.r.t. the input only (what any method must pay)

Then a profile of one svdtune step at the realistic case (the largest batch), grouped by
operator, to show where the time goes (``--profile``).

Run: python benchmarks/cnn_step.py [--quick] [--profile] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import svdtune
import train_step  # the benchmark beside this one (the script's folder is on sys.path)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with BatchNorm, a 1x1 downsample when needed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layers and names (conv1, bn1, layer1-4, fc)."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean(dim=(2, 3)))


class ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map, as timm's LayerNorm2d."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block: depthwise 7x7 conv, LayerNorm, Linear 4x, GELU, Linear, layer scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        h = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))  # (N, H, W, C)
        return x + (self.mlp(h) * self.gamma).permute(0, 3, 1, 2)


class ConvNeXtAtto(nn.Module):
    """timm's convnext_atto: dims 40-320, depths 2-2-6-2, a 4x4 stem, 2x2 downsampling convs."""

    def __init__(self, classes: int = 1000, dims=(40, 80, 160, 320), depths=(2, 2, 6, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsLastNorm(dims[0]))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [ChannelsLastNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(dim) for _ in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def forms(base: nn.Module) -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "*" also meets BatchNorm/LayerNorm, which are left frozen
        adapted = svdtune.apply(copy.deepcopy(base), targets=["*"])
    return {"full": copy.deepcopy(base), "svdtune": adapted, "floor": copy.deepcopy(base).requires_grad_(False)}


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """train_step.py's step (forward, backward, AdamW; the floor differentiates the input), on a classification loss."""
    return train_step.step_fn(model, x, y, F.cross_entropy)


def measure(steps: dict[str, callable], repeats: int) -> dict[str, float]:
    for step in steps.values():  # warm up: allocator, optimizer state, the cached kernels
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so a change in machine load hits every form alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int = 12) -> None:
    step = step_fn(model, x, y)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cases only")
    parser.add_argument("--profile", action="store_true", help="profile one svdtune step of the last case")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", metavar="BATCHxPX", help="e.g. 32x224 (default: all five)")
    parser.add_argument("--models", nargs="+", choices=["ResNet-18", "ConvNeXt-atto"], default=["ResNet-18", "ConvNeXt-atto"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # ConvNeXt's layer scale (1e-6) makes gradients and AdamW's second moments denormal floats, which
    # x86 CPUs process ~100x slower: that would time the denormals, not the method (either form)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cases = [(2, 112), (32, 112)] if args.quick else [(2, 112), (2, 224), (32, 112), (128, 112), (32, 224)]
    if args.cases:
        cases = [tuple(int(v) for v in case.split("x")) for case in args.cases]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'model':<14} {'batch':>5} {'px':>4} {'full s':>8} {'svdtune':>8} {'floor':>7}")
    for name, build in (("ResNet-18", ResNet18), ("ConvNeXt-atto", ConvNeXtAtto)):
        if name not in args.models:
            continue
        models = forms(build().train())
        for batch, px in cases:
            x, y = torch.randn(batch, 3, px, px), torch.randint(0, 1000, (batch,))
            result = measure({n: step_fn(m, x, y) for n, m in models.items()}, args.repeats)
            print(f"{name:<14} {batch:>5} {px:>4} {result['full']:>8.3f} {result['svdtune'] / result['full']:>7.2f}x "
                  f"{result['floor'] / result['full']:>6.2f}x", flush=True)
        if args.profile:
            profile(models["svdtune"], x, y)


if __name__ == "__main__":
    main()
