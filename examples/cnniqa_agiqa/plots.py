"""PNG plots of an experiment (matplotlib, imported only here and only when used).

metrics.png   mean test SRCC / PLCC / KRCC per variant, error bars = std over splits
val_srcc.png  validation SRCC per epoch of every trained variant (mean over splits)
spectra_<variant>.png  per tuned layer, singular values before and after the shift
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from examples.cnniqa_agiqa.experiment import Outcome

__all__ = ["write_plots"]


def _metrics_plot(plt, rows: list[dict[str, object]], path: Path, title: str) -> None:
    """Grouped bars of SRCC, PLCC and KRCC per variant with std error bars."""
    names = [str(r["variant"]) for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, metric in enumerate(("srcc", "plcc", "krcc")):
        means = [r[f"{metric}_mean"] for r in rows]
        stds = [r[f"{metric}_std"] for r in rows]
        ax.bar(x + (i - 1) * 0.27, means, 0.27, yerr=stds, capsize=3, label=metric.upper())
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("test correlation")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves_plot(plt, outcome: Outcome, path: Path, title: str) -> None:
    """Validation SRCC after each epoch (0 = before training), mean over splits."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for name in dict.fromkeys(r["variant"] for r in outcome.runs):
        curves = [r["val_srcc"] for r in outcome.runs if r["variant"] == name]
        length = min(len(c) for c in curves)
        if length < 2:
            continue
        ax.plot(range(length), np.mean([c[:length] for c in curves], axis=0), marker=".", label=name)
        drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation SRCC (mean over splits)")
    ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spectra_plot(plt, variant: str, spectra: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """One panel per tuned layer: sigma (line) and sigma' (dots) against their index."""
    fig, axes = plt.subplots(1, len(spectra), figsize=(4 * len(spectra), 3.4), squeeze=False)
    for ax, (layer, (before, after)) in zip(axes[0], spectra.items()):
        index = np.arange(1, len(before) + 1)
        ax.plot(index, before, color="tab:blue", marker="o" if len(before) == 1 else None, label="pretrained σ")
        ax.scatter(index, after, s=8, color="tab:orange", label="adapted σ'", zorder=3)
        ax.set_title(f"{variant}: {layer}", fontsize=9)
        ax.set_xlabel("index")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: str | Path, rows: list[dict[str, object]], outcome: Outcome, title: str) -> list[Path]:
    """Write every plot; returns [] if matplotlib is not installed.

    Args:
        out: output folder.
        rows: summary rows (results.summarize).
        outcome: runs and spectra.
        title: dataset description for the plot titles.

    Returns:
        The PNG files written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    written = [out / "metrics.png", out / "val_srcc.png"]
    _metrics_plot(plt, rows, written[0], title)
    _curves_plot(plt, outcome, written[1], title)
    for variant, spectra in outcome.spectra.items():
        path = out / f"spectra_{variant}.png"
        _spectra_plot(plt, variant, spectra, path)
        written.append(path)
    return written
