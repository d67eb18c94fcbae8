"""AGIQA-3K on disk: read and validate data.csv and the images it names.

AGIQA-3K (Li et al., TCSVT 2023) ships 2,982 JPEG images and a data.csv with
the columns name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,
std_align (CRLF line endings, prompts quoted when they contain commas).
Every check here runs before any training, and every error says what to fix.

Score normalization: both MOS columns are on a 0-5 scale; the example trains
on MOS / 5, so targets lie in [0, 1] (the original report divided by 100).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from examples.cnniqa_agiqa.images import ImageCache, image_bytes, resized_size
from examples.cnniqa_agiqa.progress import progress

__all__ = ["REQUIRED_COLUMNS", "MOS_SCALE", "Record", "read_csv", "check_images", "load_agiqa"]

REQUIRED_COLUMNS = ("name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align")
MOS_SCALE = 5.0  # MOS range is [0, 5]; targets are MOS / MOS_SCALE
_SHOW = 5  # how many offending names an error lists


@dataclass(frozen=True)
class Record:
    """One image of the dataset."""

    name: str  # file name relative to the data root
    group: str  # the prompt: splits never put one prompt in two parts
    mos: float  # raw MOS of the chosen target, 0-5


def _first(names: list[str]) -> str:
    """The first few names, and how many more, for an error message."""
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def _parse_row(row: dict[str, str | None], line: int, column: str, path: Path) -> Record:
    """Turn one CSV row into a Record, or raise naming the line and the problem."""
    name = (row.get("name") or "").strip()
    if not name:
        raise ValueError(f"{path}, line {line}: empty 'name'; every row needs an image file name")
    if None in row.values() or None in row:
        raise ValueError(
            f"{path}, line {line} ({name}): wrong number of fields; quote prompts that contain commas"
        )
    text = (row.get(column) or "").strip()
    try:
        mos = float(text)
    except ValueError:
        raise ValueError(f"{path}, line {line} ({name}): '{column}' is {text!r}, not a number") from None
    if not math.isfinite(mos) or not 0.0 <= mos <= MOS_SCALE:
        raise ValueError(f"{path}, line {line} ({name}): '{column}' = {mos} is outside the MOS range [0, 5]")
    return Record(name=name, group=row.get("prompt") or "", mos=mos)


def _first_bad_byte(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits in the file, for an error message."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        return f"line {line} has the byte 0x{raw[error.start]:02x}"
    return "it does not decode as UTF-8"


def _read_rows(reader: csv.DictReader, column: str, path: Path) -> list[Record]:
    """Check the header of `reader`, then parse every row."""
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} (found {header}); expected {list(REQUIRED_COLUMNS)}")
    reader.fieldnames = header
    return [_parse_row(row, i + 2, column, path) for i, row in enumerate(reader)]


def read_csv(path: str | Path, target: str = "quality") -> list[Record]:
    """Read AGIQA-3K's data.csv.

    Args:
        path: the data.csv file.
        target: "quality" (mos_quality) or "align" (mos_align).

    Returns:
        One Record per row, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown target, a file that is not UTF-8 CSV, missing columns,
            a malformed row, an empty file or duplicate names; the message names
            the file and the columns or line.
    """
    if target not in ("quality", "align"):
        raise ValueError(f"target must be 'quality' or 'align', got {target!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --data-root must hold AGIQA-3K's data.csv next to the images")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            records = _read_rows(reader, f"mos_{target}", path)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text ({_first_bad_byte(path)}); "
                             "save data.csv as UTF-8, as AGIQA-3K ships it") from None
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({error}); "
                             "use AGIQA-3K's original data.csv or re-save it as plain CSV") from None
    if not records:
        raise ValueError(f"{path} has a header but no rows")
    duplicates = sorted(n for n, k in Counter(r.name for r in records).items() if k > 1)
    if duplicates:
        raise ValueError(f"{path} lists {len(duplicates)} names more than once: {_first(duplicates)}")
    return records


def _decode(index: int, path: Path, cache: ImageCache | None) -> tuple[str | None, tuple[int, int]]:
    """(None, (width, height)) if Pillow decodes every pixel of the file as the loader will, else (reason, (0, 0)).

    Image.verify() is not enough: it does not decode pixel data, so a truncated
    JPEG passes it and fails only when training reads it. When the decoded
    (and resized) image fits the cache's budget, the cache keeps it.
    """
    from PIL import Image

    from examples.cnniqa_agiqa.images import decode_image

    try:
        with Image.open(path) as image:
            size = image.size  # from the header, before decoding
            if cache is not None and cache.reserve(image_bytes(*size, cache.resize)):
                cache.offer(index, decode_image(path, cache.resize))  # decodes exactly as the loader would
            else:
                image.convert("RGB")  # decodes the whole file, as images.decode_image does
            return None, size
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
        return (str(error).splitlines()[0] if str(error) else type(error).__name__), (0, 0)


def _too_small(names: list[str], sizes: list[tuple[int, int]], root: Path, crop: int, resize: int) -> None:
    """Raise if some images, after `resize`, are smaller than `crop` on either side."""
    small = [(n, w, h) for n, (w, h) in ((n, resized_size(*s, resize)) for n, s in zip(names, sizes))
             if min(w, h) < crop]
    if not small:
        return
    after = f" after --resize {resize}" if resize else ""
    side = min(min(w, h) for _, w, h in small)
    raise ValueError(
        f"{len(small)} of {len(names)} images in {root} are smaller{after} than the {crop} px crop this run takes: "
        f"{_first([f'{n} ({w}x{h})' for n, w, h in small])}. Lower --crop/--eval-crop to {side} or less, "
        f"or pass --resize {crop} (or more) to scale every image's shorter side up."
    )


def check_images(root: str | Path, names: list[str], decode: bool = True, show: bool = False,
                 crop: int = 0, resize: int = 0, cache: ImageCache | None = None) -> None:
    """Check that every named image exists and (optionally) decodes completely and is large enough.

    Decoding runs on a few threads (Pillow releases the GIL while it decodes):
    AGIQA-3K's 2,982 images take seconds to tens of seconds, once per run.
    The size check uses the sizes that same pass decodes, and `cache` keeps the
    decoded images that fit its budget, so training does not decode them again.

    Args:
        root: folder holding the images.
        names: file names relative to root.
        decode: also decode every pixel of each file with Pillow (catches truncated
            files) and check its size; False checks only that the files exist.
        show: print a progress bar while decoding.
        crop: the largest crop side the run takes (training and evaluation); 0: no size check.
        resize: the loader's --resize (shorter side after resizing); 0: original sizes.
        cache: filled with the decoded images that fit its budget (its own resize applies).

    Raises:
        FileNotFoundError: some images are absent (says how many, lists the first).
        ValueError: some images exist but cannot be decoded (how many, the first names, the first
            reason), or are smaller than `crop` after `resize` (how many, the first names and sizes, the fix).
        ImportError: decode=True and Pillow is not installed.
    """
    root = Path(root)
    absent = [n for n in names if not (root / n).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} of {len(names)} images listed in data.csv are missing from {root}: {_first(absent)}. "
            "Extract the whole AGIQA-3K archive into --data-root."
        )
    if not decode:
        return
    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        paths = [root / n for n in names]
        decoded = list(progress(pool.map(_decode, range(len(names)), paths, [cache] * len(names)),
                                "decoding the images", total=len(names), enabled=show))
    unreadable = [(n, why) for n, (why, _) in zip(names, decoded) if why is not None]
    if unreadable:
        raise ValueError(
            f"{len(unreadable)} of {len(names)} images in {root} cannot be decoded: "
            f"{_first([n for n, _ in unreadable])} (first: {unreadable[0][1]}). Re-extract or re-download them."
        )
    _too_small(names, [size for _, size in decoded], root, crop, resize)


def load_agiqa(root: str | Path, target: str = "quality", decode: bool = True, show: bool = False,
               crop: int = 0, resize: int = 0, cache_bytes: int = 0) -> tuple[list[Record], ImageCache]:
    """Validate an extracted AGIQA-3K folder and return its records.

    Args:
        root: the folder with data.csv and the JPEG images.
        target: "quality" or "align".
        decode: decode every image once (catches truncated and corrupt files, and checks sizes).
        show: print a progress bar while decoding.
        crop: the largest crop side the run takes; smaller images (after `resize`) are an error.
        resize: the loader's shorter side after resizing; 0: original sizes.
        cache_bytes: budget of the image cache; 0 keeps no decoded image (each is decoded on access).

    Returns:
        The records of data.csv, and the cache of their decoded images.

    Raises:
        FileNotFoundError, ValueError: see `read_csv` and `check_images`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root} is not a folder; extract AGIQA-3K there (README.md)")
    records = read_csv(root / "data.csv", target)
    cache = ImageCache(root, [r.name for r in records], resize, cache_bytes)
    check_images(root, cache.names, decode=decode, show=show, crop=crop, resize=resize, cache=cache)
    return records, cache
