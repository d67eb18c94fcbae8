"""Summaries of an experiment: the printed table, table.md, results.json and results.csv.

The table follows the layout of the original report's Table I (Model, Epochs,
SRCC, PLCC, KRCC), with mean +- std over splits, then PLCC after the
4-parameter logistic fit, the number of trained parameters, the size in bytes
of the delta file of svd variants, and the epoch kept on each split (0 = the
untrained starting point). table.md holds the same table in Markdown, for docs
to quote as written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from examples.cnniqa_agiqa.config import RunConfig, as_dict
from examples.cnniqa_agiqa.experiment import Outcome

__all__ = ["summarize", "format_table", "format_markdown", "write_files", "METRICS", "HEADER"]

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
HEADER = ("Model", "Epochs", "SRCC", "PLCC", "KRCC", "PLCC (fit)", "Trainable", "Delta file (bytes)", "Kept epochs")


def summarize(outcome: Outcome, variants: tuple[str, ...]) -> list[dict[str, object]]:
    """Mean and std over splits of every metric, per variant.

    Args:
        outcome: the experiment's runs.
        variants: the variants, in table order.

    Returns:
        One row per variant: variant, model, epochs, splits, <metric>_mean,
        <metric>_std, trainable, delta_bytes, best_epoch_mean, best_epochs (per split), seconds_mean.
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
        row["best_epochs"] = [int(r["best_epoch"]) for r in runs]
        row["seconds_mean"] = float(np.mean([r["seconds"] for r in runs]))
        rows.append(row)
    return rows


def _cells(row: dict[str, object]) -> list[str]:
    """The table cells of one summary row."""
    size = "-" if row["delta_bytes"] is None else f"{row['delta_bytes']:,}"
    kept = ", ".join(str(e) for e in row["best_epochs"]) if row["epochs"] else "-"
    return ([str(row["model"]), str(row["epochs"])]
            + [f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_std']:.4f}" for m in METRICS]
            + [f"{row['trainable']:,}", size, kept])


def _caption(rows: list[dict[str, object]], title: str, synthetic: bool) -> list[str]:
    splits = rows[0]["splits"] if rows else 0
    lines = [f"Results on {title}: test set, mean ± std over {splits} split(s)"]
    if synthetic:
        lines.append("NOTE: SYNTHETIC DATA (built-in procedural stand-in). These are not AGIQA-3K results.")
    return lines


def format_table(rows: list[dict[str, object]], title: str, synthetic: bool) -> str:
    """The results as a fixed-width text table.

    Args:
        rows: from `summarize`.
        title: the dataset line printed above the table.
        synthetic: add the warning that the numbers come from synthetic data.

    Returns:
        The table, ready to print.
    """
    lines = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join(_caption(rows, title, synthetic) + [fmt(HEADER), fmt(["-" * w for w in widths])]
                     + [fmt(line) for line in lines])


def format_markdown(rows: list[dict[str, object]], title: str, synthetic: bool) -> str:
    """The same table as Markdown (what table.md holds).

    Args:
        rows: from `summarize`.
        title: the dataset line above the table.
        synthetic: add the warning that the numbers come from synthetic data.

    Returns:
        The caption lines, a blank line and a Markdown table, ending with a newline.
    """
    caption = [line + "." if not line.endswith(".") else line for line in _caption(rows, title, synthetic)]
    table = ["| " + " | ".join(HEADER) + " |", "| --- |" + " ---: |" * (len(HEADER) - 1)]
    table += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join([" ".join(caption), ""] + table) + "\n"


def write_files(out: str | Path, rows: list[dict[str, object]], outcome: Outcome, config: RunConfig,
                title: str, synthetic: bool) -> list[Path]:
    """Write results.json (everything), results.csv (the summary rows) and table.md (the table in Markdown).

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
    json_path, csv_path, table_path = out / "results.json", out / "results.csv", out / "table.md"
    json_path.write_text(json.dumps(payload, indent=1))
    table_path.write_text(format_markdown(rows, title, synthetic), encoding="utf-8")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["variant"])
        writer.writeheader()
        writer.writerows({**r, "best_epochs": " ".join(map(str, r["best_epochs"]))} for r in rows)
    return [json_path, csv_path, table_path]
