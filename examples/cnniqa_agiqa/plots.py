"""PNG plots of an experiment (matplotlib, imported only here and only when used).

metrics.png   mean test SRCC / PLCC / KRCC per variant, error bars = std over splits
val_srcc.png  validation SRCC per epoch of every trained variant (mean over splits; epoch 0 = before
              training); scratch, which starts from random weights, on its own axis
spectra_<variant>.png  per tuned layer of split 1, singular values before and after the shift
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from examples.cnniqa_agiqa.experiment import Outcome

__all__ = ["write_plots"]


def _metrics_plot(plt, rows: list[dict[str, object]], path: Path, title: str) -> None:
    """Grouped bars of SRCC, PLCC and KRCC per variant with std error bars."""
    names = [str(r["variant"]) for r in rows]
    splits = rows[0]["splits"] if rows else 0
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, metric in enumerate(("srcc", "plcc", "krcc")):
        means = [r[f"{metric}_mean"] for r in rows]
        stds = [r[f"{metric}_std"] for r in rows]
        ax.bar(x + (i - 1) * 0.27, means, 0.27, yerr=stds, capsize=3, label=metric.upper())
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel(f"test correlation, mean over {splits} split(s)")
    ax.set_title(f"{title}\nbars: mean over splits; error bars: std over the {splits} split(s)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curves(outcome: Outcome) -> dict[str, np.ndarray]:
    """Validation SRCC per epoch of every trained variant, mean over splits (epoch 0 = before training)."""
    curves = {}
    for name in dict.fromkeys(r["variant"] for r in outcome.runs):
        runs = [r["val_srcc"] for r in outcome.runs if r["variant"] == name]
        length = min(len(c) for c in runs)
        if length >= 2:
            curves[name] = np.mean([c[:length] for c in runs], axis=0)
    return curves


def _curves_plot(plt, outcome: Outcome, path: Path, title: str) -> None:
    """Validation SRCC per epoch: pretrained starts on the left, scratch (a random start) on its own axis."""
    curves = _mean_curves(outcome)
    scratch = curves.pop("scratch", None)
    panels = 1 + (scratch is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6 + 3.5 * (panels - 1), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1][:panels]})
    left = axes[0][0]
    for name, curve in curves.items():
        left.plot(range(len(curve)), curve, marker=".", label=name)
    left.set_title("variants starting from the pretrained weights", fontsize=9)
    if scratch is not None:
        right = axes[0][1]
        right.plot(range(len(scratch)), scratch, marker=".", color="tab:gray", label="scratch")
        right.set_title("scratch (random start, own y-axis)", fontsize=9)
        right.legend(fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel("epoch (0 = before training)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel("validation SRCC, mean over splits")
    if curves:
        left.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spectra_plot(plt, variant: str, spectra: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """One panel per tuned layer: sigma (line) and sigma' (dots) against their index; sigma' clamped at 0 marked."""
    fig, axes = plt.subplots(1, len(spectra), figsize=(4 * len(spectra), 3.6), squeeze=False)
    for ax, (layer, (before, after)) in zip(axes[0], spectra.items()):
        before, after = np.asarray(before), np.asarray(after)
        index = np.arange(1, len(before) + 1)
        clamped = (after == 0) & (before > 0)  # shift mode: sigma + delta <= 0 is clamped to sigma' = 0
        ax.plot(index, before, color="tab:blue", marker="o" if len(before) == 1 else None, label="pretrained σ")
        ax.scatter(index[~clamped], after[~clamped], s=8, color="tab:orange", label="adapted σ'", zorder=3)
        if clamped.any():
            ax.scatter(index[clamped], after[clamped], s=18, marker="x", color="tab:red", zorder=4,
                       label=f"σ' clamped to 0 ({int(clamped.sum())})")
        ax.set_title(f"{variant}, split 1: {layer}", fontsize=9)
        ax.set_xlabel("singular value index (largest first)")
        ax.set_ylabel("singular value")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(before) == 1:
            ax.set_xticks([1])
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
