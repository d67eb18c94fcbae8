"""How much of a real-layout example run is spent decoding and resizing JPEGs, without and with the image cache.

Makes stand-in JPEGs named as in AGIQA-3K's data.csv (procedural, --size px square; no real images are needed),
then runs the same example command twice in this process: with --cache-mb 0 (every image decoded on every
access: the example's behaviour before the cache) and with the default cache (decoded once per run). The time
spent decoding is the check pass before training (it decodes every file once in both modes, and fills the cache)
plus every decode the loaders do afterwards.

    python benchmarks/example_decode.py                        # 256 px stand-ins, published split 1, 1 epoch
    python benchmarks/example_decode.py --size 512 --resize 384
    python benchmarks/example_decode.py --csv /path/to/AGIQA-3K/data.csv --splits /path/to/splits.json

Prints one row per mode: wall time, seconds decoding/resizing, and their share of the wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.cnniqa_agiqa import agiqa, images  # noqa: E402
from examples.cnniqa_agiqa.cli import main  # noqa: E402
from examples.cnniqa_agiqa.model import CNNIQA  # noqa: E402

SHARED = Path("/work/shared/data/agiqa3k")


def make_standins(csv_path: Path, folder: Path, size: int, seed: int = 0) -> int:
    """Write data.csv and one procedural size x size JPEG per row into `folder` (skipped if already there)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(csv_path, folder / "data.csv")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        names = [row["name"] for row in csv.DictReader(handle)]
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        if path.is_file():
            continue
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth colour field plus fine noise
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path, quality=90)
    return len(names)


class DecodeTimer:
    """Wraps images.decode_image and agiqa.check_images to add up the seconds they take on the main thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._decode, self._check = images.decode_image, agiqa.check_images

    def __enter__(self) -> "DecodeTimer":
        main_thread = threading.main_thread()

        def decode(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._decode(*args, **kwargs)
            finally:
                if threading.current_thread() is main_thread:  # the check pass's threads are timed as a whole
                    self.seconds += time.perf_counter() - start

        def check(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._check(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        images.decode_image, agiqa.check_images = decode, check
        return self

    def __exit__(self, *exc) -> None:
        images.decode_image, agiqa.check_images = self._decode, self._check


def decode_costs(folder: Path, sizes: tuple[int, ...] = (256, 512, 1024), count: int = 20) -> dict[int, float]:
    """Milliseconds Pillow takes to decode one procedural JPEG of each size (median of `count`), and to resize
    it to a shorter side of 384 px, on this machine."""
    from PIL import Image

    costs = {}
    rng = np.random.default_rng(1)
    for size in sizes:
        times = []
        for k in range(count):
            path = folder / f"cost_{size}_{k}.jpg"
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
            Image.fromarray(np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)).save(
                path, quality=90)
            start = time.perf_counter()
            images.decode_image(path, 384)
            times.append(time.perf_counter() - start)
            path.unlink()
        costs[size] = 1000 * float(np.median(times))
    return costs


def run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, decoding seconds) of one example run."""
    with DecodeTimer() as timer:
        start = time.perf_counter()
        code = main(argv)
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the example failed (exit {code}) on {' '.join(argv)}")
    return wall, timer.seconds


def main_benchmark() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, default=SHARED / "data.csv", help="AGIQA-3K data.csv to take the names from")
    p.add_argument("--splits", type=Path, default=SHARED / "AGIQA-3K_splits_from_pkl.json",
                   help="published split file; its split 1 is used")
    p.add_argument("--folder", type=Path, default=Path("/tmp/agiqa3k_standin"), help="where the stand-ins go")
    p.add_argument("--size", type=int, default=256, help="side of the stand-in JPEGs (px)")
    p.add_argument("--resize", type=int, default=0, help="the example's --resize")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--variants", default="head,svd-fc")
    p.add_argument("--modes", default="0,default", help="--cache-mb values to run, comma list ('default' = unset)")
    p.add_argument("--costs-only", action="store_true", help="only time decoding one JPEG per size")
    args = p.parse_args()

    args.folder.mkdir(parents=True, exist_ok=True)
    costs = decode_costs(args.folder)
    print("decoding + resizing to 384 px, one JPEG: " + ", ".join(f"{s} px {ms:.1f} ms" for s, ms in costs.items()))
    if args.costs_only:
        return

    folder = args.folder / f"{args.size}px"
    start = time.perf_counter()
    count = make_standins(args.csv, folder, args.size)
    print(f"{count} stand-in JPEGs of {args.size}x{args.size} px in {folder} ({time.perf_counter() - start:.0f} s)")
    torch.manual_seed(0)
    weights = folder / "cnniqa_random.pth"
    torch.save({"params": CNNIQA().state_dict()}, weights)
    published = json.loads(args.splits.read_text())
    split_file = folder / "split1.json"
    split_file.write_text(json.dumps({"splits": {"1": published["splits"]["1"]}}))

    common = ["--data-root", str(folder), "--pretrained", str(weights), "--split-file", str(split_file),
              "--variants", args.variants, "--epochs", str(args.epochs), "--resize", str(args.resize),
              "--no-plots", "--quiet"]
    print(f"command: python -m examples.cnniqa_agiqa {' '.join(common)} --out OUT [--cache-mb 0]")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for mode in args.modes.split(","):
        extra = [] if mode == "default" else ["--cache-mb", mode]
        out = folder / f"out_cache_{mode}"
        wall, decoding = run(common + extra + ["--out", str(out)])
        label = "decode on every access (--cache-mb 0, as before the cache)" if mode == "0" else (
            f"decoded once, cached (--cache-mb {mode})" if mode != "default" else "decoded once, cached (default)")
        rows.append((label, wall, decoding))
    print(f"\n{'mode':62s} {'wall s':>8s} {'decode s':>9s} {'share':>7s}")
    for label, wall, decoding in rows:
        print(f"{label:62s} {wall:8.1f} {decoding:9.1f} {100 * decoding / wall:6.1f}%")
    if len(rows) == 2:
        print(f"wall time after / before: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main_benchmark()
