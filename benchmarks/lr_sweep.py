"""Which learning rate trains singular-value deltas, per mode: a small sweep on toy tasks and the example.

A delta of mode "shift" moves its singular value by an absolute amount (sigma' = relu(sigma + delta)), one of
mode "scale" by a relative one (sigma' = sigma * (1 + delta)). Adam moves every parameter by about lr per step
whatever its gradient's size, so in shift mode the right rate depends on the size of the singular values, and in
scale mode it does not. The sweep measures that on:

- classifier: an MLP (32-128-128-8) pretrained on one labelling of Gaussian clusters, tuned to another;
- classifier x10: the same network with every weight and bias scaled (W x10, b x10^depth) and the logits
  divided by 1000, so the same function with every singular value 10 times larger;
- regression: an MLP (16-64-64-1) pretrained on one smooth function, tuned to a shifted one;
- the example's svd-fc on its --quick synthetic task (1 split, 10 epochs, validation SRCC).

Every toy run is 100 AdamW steps (batch 64, weight decay 0) from the same pretrained weights; the score is the
held-out loss after them relative to before (1.0 = did not move, lower is better), and the example's is the best
validation SRCC (higher is better; epoch 0 = untrained). The whole sweep takes about 2 minutes on 2 CPU cores.

    python benchmarks/lr_sweep.py            # toys and the example
    python benchmarks/lr_sweep.py --no-example
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import svdtune  # noqa: E402

RATES = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
MODES = ("shift", "scale")
STEPS = 100


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _train_full(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int = 400) -> None:
    """Pretrain every weight (AdamW 1e-3), as the base model a user would fine-tune."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = loss_fn(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


class Scaled(nn.Module):
    """A fixed multiplier of the output (no parameters)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def rescaled(model: nn.Sequential, c: float) -> nn.Sequential:
    """The same function with every Linear's singular values multiplied by c (ReLU is positively homogeneous)."""
    import copy

    model = copy.deepcopy(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for depth, layer in enumerate(linears, 1):
            layer.weight.mul_(c)
            layer.bias.mul_(c ** depth)
    return nn.Sequential(*model, Scaled(c ** -len(linears)))


def classifier_task(scale: float = 1.0):
    """(pretrained model, input transform, train x/y, held-out x/y, loss) of the cluster-relabelling task."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 32, generator=g) * 2.0
    def draw(n):
        k = torch.randint(0, 16, (n,), generator=g)
        return centres[k] + torch.randn(n, 32, generator=g), k
    x_a, k_a = draw(4096)
    label_a, label_b = torch.randint(0, 8, (16,), generator=g), torch.randint(0, 8, (16,), generator=g)
    torch.manual_seed(0)
    model = _mlp([32, 128, 128, 8])
    _train_full(model, x_a, label_a[k_a], F.cross_entropy)
    if scale != 1.0:
        model = rescaled(model, scale)
    x_b, k_b = draw(2048)
    x_t, k_t = draw(1024)
    return model, x_b, label_b[k_b], x_t, label_b[k_t], F.cross_entropy


def regression_task():
    """(pretrained model, train x/y, held-out x/y, loss) of the shifted-function regression task."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, generator=g)
    f_a = lambda x: torch.sin(x @ w / 4).unsqueeze(1)  # noqa: E731
    f_b = lambda x: torch.sin(x @ w / 4 + 0.8).unsqueeze(1) * 1.5  # noqa: E731
    x_a = torch.randn(4096, 16, generator=g)
    torch.manual_seed(0)
    model = _mlp([16, 64, 64, 1])
    _train_full(model, x_a, f_a(x_a), F.mse_loss)
    x_b, x_t = torch.randn(2048, 16, generator=g), torch.randn(1024, 16, generator=g)
    return model, x_b, f_b(x_b), x_t, f_b(x_t), F.mse_loss


def tune(base: nn.Module, x, y, x_test, y_test, loss_fn, lr: float, mode: str) -> float:
    """Held-out loss after STEPS AdamW steps on the deltas of every Linear, relative to the base model's."""
    import copy

    model = copy.deepcopy(base)
    svdtune.apply(model, targets=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)], mode=mode)
    with torch.no_grad():
        before = float(loss_fn(model(x_test), y_test))
    optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = loss_fn(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_fn(model(x_test), y_test))
    return after / before if torch.isfinite(torch.tensor(after)) else float("inf")


def spectrum(model: nn.Module) -> str:
    """'fc: mean sigma a, b, c' of the Linear layers, the scale a shift delta is measured in."""
    means = [float(torch.linalg.svdvals(m.weight.detach()).mean()) for m in model.modules() if isinstance(m, nn.Linear)]
    return "mean σ per layer " + ", ".join(f"{v:.2g}" for v in means)


def example_scores(rates: tuple[float, ...]) -> tuple[dict[tuple[str, float], float], str]:
    """Best validation SRCC of the example's svd-fc on --quick (1 split, 10 epochs), per mode and rate,
    and the mean singular value of fc1, fc2, fc3 of its pretrained source model."""
    import contextlib
    import io

    from safetensors.torch import load_file

    from examples.cnniqa_agiqa.cli import main

    scores = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in MODES:
            for lr in rates:
                argv = ["--quick", "--splits", "1", "--variants", "svd-fc", "--svd-mode", mode, "--lr-svd", str(lr),
                        "--out", out, "--quiet", "--no-plots"]
                with contextlib.redirect_stdout(io.StringIO()):
                    code = main(argv)
                run = json.loads((Path(out) / "results.json").read_text())["runs"][0] if code == 0 else None
                scores[(mode, lr)] = max(run["val_srcc"]) if run else float("nan")
        source = load_file(str(Path(out) / "source_cnniqa.safetensors"))
    means = [float(torch.linalg.svdvals(source[f"fc{i}.weight"]).mean()) for i in (1, 2, 3)]
    return scores, "mean σ of fc1, fc2, fc3 " + ", ".join(f"{v:.2g}" for v in means)


def _row(name: str, values: list[float], fmt: str, best) -> str:
    cells = [fmt.format(v) for v in values]
    mark = values.index(best(values))
    cells[mark] = f"**{cells[mark]}**"
    return f"| {name} | " + " | ".join(cells) + " |"


def main_sweep() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-example", action="store_true", help="skip the example's svd-fc runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    tasks = {"classifier": classifier_task(), "classifier x10": classifier_task(10.0), "regression": regression_task()}
    header = "| task, mode | " + " | ".join(f"{r:g}" for r in RATES) + " |"
    print(f"torch {torch.__version__}; {STEPS} AdamW steps; held-out loss after / before (lower is better)\n")
    print(header)
    print("| --- |" + " ---: |" * len(RATES))
    for name, (model, *data) in tasks.items():
        for mode in MODES:
            values = [tune(model, *data, lr=lr, mode=mode) for lr in RATES]
            print(_row(f"{name}, {mode}", values, "{:.3f}", min))
    for name, (model, *_rest) in tasks.items():
        print(f"{name}: {spectrum(model)}")
    if not args.no_example:
        rates = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
        scores, sigmas = example_scores(rates)
        print(f"\nexample svd-fc, --quick, 1 split, 10 epochs ({sigmas}): best validation SRCC (higher is better)\n")
        print("| mode | " + " | ".join(f"{r:g}" for r in rates) + " |")
        print("| --- |" + " ---: |" * len(rates))
        for mode in MODES:
            print(_row(mode, [scores[(mode, lr)] for lr in rates], "{:.4f}", max))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main_sweep()
