"""Seeded train/val/test splits grouped by prompt (or by synthetic scene).

All images of one group land in the same part, so a test image never shares
its prompt with a training image. Splits are written to the output folder as
JSON (indices into the dataset's records) and can be read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["make_splits", "save_splits", "load_splits", "parse_ratios"]

PARTS = ("train", "val", "test")


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse 'train,val,test' fractions such as '0.6,0.2,0.2'.

    Args:
        text: three comma-separated positive numbers (normalized to sum 1).

    Returns:
        (train, val, test) fractions summing to 1.

    Raises:
        ValueError: not three positive numbers.
    """
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"--split-ratios must be three positive numbers train,val,test like 0.6,0.2,0.2; got {text!r}")
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def _one_split(groups: list[str], ratios: tuple[float, float, float], rng: np.random.Generator) -> dict[str, list[int]]:
    """Shuffle the distinct groups and cut them into three parts by count."""
    unique = sorted(set(groups))
    order = rng.permutation(len(unique))
    n_train = int(round(ratios[0] * len(unique)))
    n_val = int(round(ratios[1] * len(unique)))
    n_train = min(max(n_train, 1), len(unique) - 2)
    n_val = min(max(n_val, 1), len(unique) - n_train - 1)
    part_of = {}
    for position, index in enumerate(order):
        part = 0 if position < n_train else 1 if position < n_train + n_val else 2
        part_of[unique[index]] = PARTS[part]
    split = {p: [] for p in PARTS}
    for i, group in enumerate(groups):
        split[part_of[group]].append(i)
    return split


def make_splits(groups: list[str], n_splits: int, ratios: tuple[float, float, float], seed: int) -> list[dict[str, list[int]]]:
    """Draw `n_splits` random group-wise train/val/test splits.

    Args:
        groups: the group (prompt) of every record, in record order.
        n_splits: how many independent splits to draw.
        ratios: fractions of groups for train, val, test.
        seed: the random seed; the same seed gives the same splits.

    Returns:
        A list of {"train": [...], "val": [...], "test": [...]} record indices.

    Raises:
        ValueError: fewer than 3 groups, or n_splits < 1.
    """
    if n_splits < 1:
        raise ValueError(f"--splits must be at least 1, got {n_splits}")
    if len(set(groups)) < 3:
        raise ValueError(f"need at least 3 distinct prompts to split into train/val/test, found {len(set(groups))}")
    rng = np.random.default_rng(seed)
    return [_one_split(groups, ratios, rng) for _ in range(n_splits)]


def save_splits(path: str | Path, splits: list[dict[str, list[int]]], names: list[str], seed: int) -> None:
    """Write the splits as JSON: indices, and the image names for readability.

    Args:
        path: destination file.
        splits: from `make_splits`.
        names: record names, to store next to the indices.
        seed: the seed that drew them.
    """
    payload = {
        "seed": seed,
        "note": "indices are 0-based rows of the dataset (data.csv order); groups never cross parts",
        "splits": [{p: {"indices": s[p], "names": [names[i] for i in s[p]]} for p in PARTS} for s in splits],
    }
    Path(path).write_text(json.dumps(payload, indent=1))


def load_splits(path: str | Path, n_records: int) -> list[dict[str, list[int]]]:
    """Read splits written by `save_splits`.

    Args:
        path: a splits JSON file.
        n_records: number of dataset records, to range-check the indices.

    Returns:
        The list of splits.

    Raises:
        ValueError: malformed file or indices out of range.
    """
    payload = json.loads(Path(path).read_text())
    try:
        splits = [{p: [int(i) for i in s[p]["indices"]] for p in PARTS} for s in payload["splits"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a splits file written by this example (missing {exc})") from None
    for s in splits:
        bad = [i for p in PARTS for i in s[p] if not 0 <= i < n_records]
        if bad:
            raise ValueError(f"{path} has indices {bad[:5]} outside 0..{n_records - 1}; was it made for another dataset?")
    return splits
