"""Reading, inspecting and combining delta files with crafted ~10 MB headers, against json.loads.

A hostile header can list huge numbers of names, tensors or basis runs. Every check
svdtune runs over them must be linear (or n log n) in the header's size, so the cost
of a file stays a small multiple of parsing its header. Three crafted files, each
with a header of about --megabytes MB:

  names    `params` lists many distinct names plus one repeated (refused)
  buffers  a valid delta with many zero-size buffers
  runs     a valid delta whose one layer records many one-column basis runs

For each, in one run: the seconds of a plain ``json.loads`` of the same header (the
baseline), of ``svdtune.read_delta``, of ``svdtune inspect`` (output discarded) and of
``svdtune.combine([file, file], [0.5, 0.5]).save(...)`` (as ``svdtune combine`` does;
refusing is its result for "names" and "buffers"), each with its ratio to the baseline.
The budget is 2 s per operation.

Run: PYTHONPATH=. python benchmarks/crafted_header.py [--megabytes 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import struct
import tempfile
import time

import torch

import svdtune
from svdtune import container
from svdtune.basis import PROBES, Basis
from svdtune.cli import main
from svdtune.delta import DeltaFile, Fingerprint, LayerDelta

BUDGET = 2.0  # seconds per operation on a 10 MB header


def one_layer(rank: int, runs: tuple[Basis, ...] = ()) -> dict[str, LayerDelta]:
    fingerprint = Fingerprint("0" * 64, (1.0,), "float32", runs)
    return {"fc": LayerDelta("Linear", (rank, rank), "shift", 1.0, fingerprint, torch.ones(rank))}


def names_file(path: str, megabytes: float) -> None:
    count = int(megabytes * 2**20 / 12)  # '"p1234567", ' ~ 12 bytes a name, escaped in the header
    delta_path = path + ".tmp.safetensors"
    DeltaFile(one_layer(4)).save(delta_path)
    tensors, metadata = container.read(delta_path)
    os.unlink(delta_path)
    names = [f"p{i}" for i in range(count)] + ["p0"]
    container.atomic_write(path, container.encode(tensors, {**metadata, "params": json.dumps(names)}))


def buffers_file(path: str, megabytes: float) -> None:
    count = int(megabytes * 2**20 / 75)  # a tensor entry (~60 bytes) and its name in "buffers"
    buffers = {f"head.b{i}": torch.zeros(0) for i in range(count)}
    DeltaFile(one_layer(4), buffers=buffers).save(path)


def runs_file(path: str, megabytes: float) -> None:
    count = int(megabytes * 2**20 / 163)  # one escaped run: columns, sha256 and 4 probes
    runs = tuple(Basis((i,), f"{i:064x}", (0.123456789,) * (2 * PROBES)) for i in range(count))
    DeltaFile(one_layer(count, runs)).save(path)


def header_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return handle.read(size)


def seconds(action) -> float:
    """Seconds for ``action()``; an SvdtuneError (a refusal) is a result too."""
    start = time.perf_counter()
    with contextlib.suppress(svdtune.SvdtuneError):
        action()
    return time.perf_counter() - start


def inspect(path: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["inspect", path])


def measure(kind: str, build, megabytes: float, folder: str) -> bool:
    path = os.path.join(folder, f"{kind}.safetensors")
    build(path, megabytes)
    text = header_bytes(path)
    baseline = seconds(lambda: json.loads(text))
    out = os.path.join(folder, f"{kind}-combined.safetensors")
    times = {
        "read": seconds(lambda: svdtune.read_delta(path)),
        "inspect": seconds(lambda: inspect(path)),
        "combine": seconds(lambda: svdtune.combine([path, path], [0.5, 0.5]).save(out)),
    }
    cells = "  ".join(f"{name} {t:6.2f} s ({t / baseline:5.1f}x)" for name, t in times.items())
    within = max(times.values()) < BUDGET
    print(f"{kind:8} {len(text) / 2**20:5.1f} MB header  json.loads {baseline:5.2f} s  {cells}  "
          f"{'within' if within else 'OVER'} the {BUDGET:g} s budget")
    return within


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=10.0, help="header size of each crafted file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(kind, build, args.megabytes, folder)
                   for kind, build in (("names", names_file), ("buffers", buffers_file), ("runs", runs_file))]
    print("all within budget" if all(results) else "some operation is over budget")


if __name__ == "__main__":
    run()
