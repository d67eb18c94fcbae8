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


def _carve_val(train: list[int], groups: list[str], fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Move a random `fraction` of the prompts of `train` to a new val part."""
    prompts = sorted({groups[i] for i in train})
    count = min(max(1, int(round(fraction * len(prompts)))), len(prompts) - 1)
    chosen = {prompts[k] for k in rng.permutation(len(prompts))[:count]}
    return [i for i in train if groups[i] not in chosen], [i for i in train if groups[i] in chosen]


def _published(payload: dict, groups: list[str], ratios: tuple[float, float, float], seed: int) -> list[dict[str, list[int]]]:
    """Splits of the published {"splits": {"1": {"train": [...], "val": [...]}}} layout.

    Its "val" part becomes our test part; our val part is carved, by prompt, out of its train part.
    """
    rng = np.random.default_rng(seed)
    out = []
    for key in sorted(payload["splits"], key=lambda k: int(k)):
        part = payload["splits"][key]
        train, val = _carve_val([int(i) for i in part["train"]], groups, ratios[1] / (ratios[0] + ratios[1]), rng)
        out.append({"train": train, "val": val, "test": [int(i) for i in part["val"]]})
    return out


def _read_json(path: Path) -> object:
    """The parsed JSON of --split-file, or an error naming the file and what it must hold."""
    if path.is_dir():
        raise IsADirectoryError(f"--split-file {path} is a directory; pass a splits.json file")
    if not path.is_file():
        raise FileNotFoundError(f"--split-file {path} not found; pass an earlier run's splits.json "
                                "or a published split file")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"--split-file {path} is not valid JSON ({str(error).splitlines()[0]}); pass an earlier "
                         "run's splits.json or a published {'splits': {'1': {'train', 'val'}}} file") from None


def load_splits(path: str | Path, groups: list[str], ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
                seed: int = 0) -> list[dict[str, list[int]]]:
    """Read splits written by `save_splits`, or a published train/val split file.

    A published file ({"splits": {"1": {"train": [row, ...], "val": [row, ...]}, ...}}, e.g. the
    10 AGIQA-3K splits used in the literature) has no test part: its val part is used as test,
    and val is drawn by prompt from its train part (val/(train+val) of `ratios`, seeded).

    Args:
        path: a splits JSON file.
        groups: the prompt of every record (also gives the number of records).
        ratios: train/val/test fractions, for carving val out of a published train part.
        seed: seeds that carving.

    Returns:
        The list of splits.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a JSON file, malformed content, indices out of range, or a prompt in two parts.
    """
    payload = _read_json(Path(path))
    try:
        if isinstance(payload.get("splits"), dict):
            splits = _published(payload, groups, ratios, seed)
        else:
            splits = [{p: [int(i) for i in s[p]["indices"]] for p in PARTS} for s in payload["splits"]]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path} is neither a splits.json of this example nor a published "
                         f"{{'splits': {{'1': {{'train', 'val'}}}}}} file ({type(exc).__name__}: {exc})") from None
    for s in splits:
        _check_split(s, groups, path)
    return splits


def _check_split(split: dict[str, list[int]], groups: list[str], path: str | Path) -> None:
    """Raise if an index is out of range or a prompt appears in two parts."""
    bad = [i for p in PARTS for i in split[p] if not 0 <= i < len(groups)]
    if bad:
        raise ValueError(f"{path} has indices {bad[:5]} outside 0..{len(groups) - 1}; was it made for another dataset?")
    parts = [{groups[i] for i in split[p]} for p in PARTS]
    shared = (parts[0] & parts[1]) | (parts[0] & parts[2]) | (parts[1] & parts[2])
    if shared:
        raise ValueError(f"{path} puts {len(shared)} prompts in two parts (e.g. {sorted(shared)[0]!r}); "
                         "splits must group by prompt")
