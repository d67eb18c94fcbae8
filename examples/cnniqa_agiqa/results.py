"""Summaries of an experiment: the printed table, results.json and results.csv.

The table follows the layout of the original report's Table I (Model, Epochs,
SRCC, PLCC, KRCC), with mean +- std over splits, then PLCC after the
4-parameter logistic fit, the number of trained parameters and the size of
the delta file of svd variants.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from examples.cnniqa_agiqa.config import RunConfig, as_dict
from examples.cnniqa_agiqa.experiment import Outcome

__all__ = ["summarize", "format_table", "write_files", "METRICS"]

METRICS = ("srcc", "plcc", "krcc", "plcc_logistic")
_MODEL_NAMES = {
    "zero-shot": "CNNIQA pretrained, zero-shot",
    "scratch": "CNNIQA from scratch",
    "full": "CNNIQA full fine-tuning",
    "head": "CNNIQA head (fc3) only",
    "svd-fc": "CNNIQA + SVD deltas fc1-fc3",
    "svd-conv": "CNNIQA + SVD deltas conv1",
    "svd-all": "CNNIQA + SVD deltas all layers",
}


def summarize(outcome: Outcome, variants: tuple[str, ...]) -> list[dict[str, object]]:
    """Mean and std over splits of every metric, per variant.

    Args:
        outcome: the experiment's runs.
        variants: the variants, in table order.

    Returns:
        One row per variant: variant, model, epochs, splits, <metric>_mean,
        <metric>_std, trainable, delta_bytes, best_epoch_mean, seconds_mean.
    """
    rows = []
    for name in variants:
        runs = [r for r in outcome.runs if r["variant"] == name]
        if not runs:
            continue
        row: dict[str, object] = {"variant": name, "model": _MODEL_NAMES[name], "epochs": runs[0]["epochs"],
                                  "splits": len(runs)}
        for metric in METRICS:
            values = np.array([r[metric] for r in runs])
            row[f"{metric}_mean"], row[f"{metric}_std"] = float(values.mean()), float(values.std())
        row["trainable"] = outcome.trainable.get(name, 0)
        row["delta_bytes"] = outcome.delta_bytes.get(name)
        row["best_epoch_mean"] = float(np.mean([r["best_epoch"] for r in runs]))
        row["seconds_mean"] = float(np.mean([r["seconds"] for r in runs]))
        rows.append(row)
    return rows


def _size(n: int | None) -> str:
    """Bytes as a short string ('-' for none)."""
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"


def format_table(rows: list[dict[str, object]], title: str, synthetic: bool) -> str:
    """The results as a fixed-width text table.

    Args:
        rows: from `summarize`.
        title: the dataset line printed above the table.
        synthetic: add the warning that the numbers come from synthetic data.

    Returns:
        The table, ready to print.
    """
    header = ("Model", "Epochs", "SRCC", "PLCC", "KRCC", "PLCC (fit)", "Trainable", "Delta file")
    lines = [[str(r["model"]), str(r["epochs"])]
             + [f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f}" for m in METRICS]
             + [f"{r['trainable']:,}", _size(r["delta_bytes"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    splits = rows[0]["splits"] if rows else 0
    out = [f"Results on {title}: test set, mean ± std over {splits} split(s)"]
    if synthetic:
        out.append("NOTE: SYNTHETIC DATA (built-in procedural stand-in). These are not AGIQA-3K results.")
    out += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out)


def write_files(out: str | Path, rows: list[dict[str, object]], outcome: Outcome, config: RunConfig,
                title: str, synthetic: bool) -> list[Path]:
    """Write results.json (everything) and results.csv (the summary rows).

    Args:
        out: output folder.
        rows: from `summarize`.
        outcome: per-split runs, merge check, timing.
        config: the run configuration (stored in the JSON).
        title: dataset description.
        synthetic: whether the data were synthetic.

    Returns:
        The paths written.
    """
    out = Path(out)
    payload = {"dataset": title, "synthetic": synthetic, "config": as_dict(config), "summary": rows,
               "runs": outcome.runs, "merge_check": outcome.merge, "seconds": round(outcome.seconds, 1)}
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps(payload, indent=1))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["variant"])
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]
