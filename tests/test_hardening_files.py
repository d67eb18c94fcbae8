"""Crafted files: bounded time and memory, no special files, no destroyed inputs, safe atomic writes.

Each test here failed on the code before the hardening (issue 10, items 1-3, 7-9, 16).
Time limits below are hang guards (a quadratic check takes many minutes on these
inputs, a linear one well under a second), not speed claims: benchmarks/crafted_header.py
measures speed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from svdtune import cache, container, writing
from svdtune.basis import PROBES, Basis
from svdtune.cli import main
from svdtune.delta import DeltaFile
from tests.conftest import randomize_deltas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def trained(model: nn.Module, seed: int = 1) -> nn.Module:
    model = svdtune.apply(model, ["0", "2"])
    randomize_deltas(model, seed=seed)
    return model


@pytest.fixture
def files(tmp_path):
    """(base model, base .safetensors, delta file)."""
    base = small()
    safetensors.torch.save_file(base.state_dict(), tmp_path / "base.safetensors")
    svdtune.save_delta(trained(copy.deepcopy(base)), tmp_path / "task.safetensors")
    return base, tmp_path / "base.safetensors", tmp_path / "task.safetensors"


class Hang(Exception):
    """A hang guard expired (not an OSError, which code under test may catch)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `Hang` in the test if the block runs longer (a hang guard).

    A watchdog thread sends SIGALRM to the main thread itself (again every second until
    the block ends), so that a blocking system call there, e.g. opening a FIFO, is
    interrupted whichever thread the process has.
    """
    done, expired = threading.Event(), threading.Event()

    def interrupt(signum, frame):
        if expired.is_set():
            raise Hang(f"still running after {seconds} s")

    def watchdog():
        if done.wait(seconds):
            return
        expired.set()
        while not done.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
            done.wait(1)

    previous = signal.signal(signal.SIGALRM, interrupt)
    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGALRM, previous)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter using this worktree's svdtune."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def rewrite_metadata(path, **changes) -> None:
    """Re-encode a delta file with some metadata entries changed (a valid checksum: a crafted file)."""
    tensors, metadata = container.read(path)
    container.atomic_write(path, container.encode(tensors, {**metadata, **changes}))


def peak_python_memory(action) -> int:
    """Peak bytes that Python allocated (bytes, bytearray, ...) while running ``action``."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Item 1: every check over names, runs and tensors is linear (or n log n) in the header.

def test_a_header_listing_many_parameter_names_is_refused_quickly(files):
    _, _, delta_path = files
    names = [f"p{i}" for i in range(40_000)] + ["p0"]  # 470 kB of names; counting each one took a minute
    rewrite_metadata(delta_path, params=json.dumps(names))
    with time_limit(30), pytest.raises(svdtune.SvdtuneError, match="does not match the layer/parameter/buffer"):
        svdtune.read_delta(delta_path)


def test_a_valid_file_with_many_zero_size_buffers_reads_quickly(files, tmp_path):
    _, _, delta_path = files
    delta = svdtune.read_delta(delta_path)
    buffers = {f"head.b{i}": torch.zeros(0) for i in range(30_000)}
    with time_limit(30):
        DeltaFile(delta.layers, {}, {}, buffers=buffers).save(tmp_path / "many.safetensors")
        read = svdtune.read_delta(tmp_path / "many.safetensors")
    assert set(read.buffers) == set(buffers) and all(b.shape == (0,) for b in read.buffers.values())


def test_combine_of_many_one_column_runs_is_quick_and_keeps_them_all():
    rank = 8_000
    runs = tuple(Basis((i,), f"{i:064x}", (0.5,) * (2 * PROBES)) for i in range(rank))
    fingerprint = svdtune.delta.Fingerprint("0" * 64, (1.0,), "float32", runs)
    layer = svdtune.delta.LayerDelta("Linear", (rank, rank), "shift", 1.0, fingerprint, torch.ones(rank))
    other = dataclasses.replace(layer, delta=torch.full((rank,), 3.0))
    with time_limit(30):
        mixed = svdtune.combine([DeltaFile({"fc": layer}), DeltaFile({"fc": other})], [0.5, 0.5])
    assert mixed.layers["fc"].fingerprint.basis == runs
    assert torch.equal(mixed.layers["fc"].delta, torch.full((rank,), 2.0))


def test_combine_still_warns_on_clashing_runs_and_keeps_the_first():
    def layer(runs):
        fingerprint = svdtune.delta.Fingerprint("0" * 64, (1.0,), "float32", runs)
        return svdtune.delta.LayerDelta("Linear", (8, 8), "shift", 1.0, fingerprint, torch.ones(8))

    first = (Basis((0, 1), "a" * 64, (0.1,) * 8), Basis((4,), "b" * 64, (0.2,) * 4))
    second = (Basis((1, 2), "c" * 64, (0.3,) * 8), Basis((4,), "b" * 64, (0.2,) * 4), Basis((6,), "d" * 64, (0.4,) * 4))
    with pytest.warns(RuntimeWarning, match=r"\[1, 2\]"):
        mixed = svdtune.combine([DeltaFile({"fc": layer(first)}), DeltaFile({"fc": layer(second)})], [1, 1])
    assert mixed.layers["fc"].fingerprint.basis == (first[0], first[1], second[2])


# Item 2: a base tensor whose elements share memory is refused, naming the key; so is a size bomb.

def save_base(tmp_path, state, name="base.pth"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("bomb", [
    lambda: torch.zeros(1).expand(2**26),                       # stride 0: 4 bytes stored, 256 MiB written
    lambda: torch.zeros(1, 4).expand(2**20, 4),
    lambda: torch.arange(40.0).as_strided((20, 20), (1, 1)),    # overlapping windows
])
def test_a_base_tensor_whose_elements_share_memory_is_refused(files, tmp_path, bomb):
    base, _, delta_path = files
    path = save_base(tmp_path, {**base.state_dict(), "bomb": bomb()})
    with pytest.raises(svdtune.SvdtuneError, match=r"tensor 'bomb' .* share memory.*contiguous"):
        svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_strided_views_that_do_not_overlap_and_tied_weights_merge_as_dense(files, tmp_path):
    base, base_path, delta_path = files
    state = base.state_dict()
    views = {**state, "0.weight": state["0.weight"].t().contiguous().t(),  # transposed storage
             "slice": torch.arange(24.0).reshape(4, 6)[:, ::2], "tied": state["2.weight"]}
    svdtune.merge_files(save_base(tmp_path, views), delta_path, tmp_path / "views.safetensors")
    dense = {**state, "slice": views["slice"].contiguous(), "tied": state["2.weight"]}
    svdtune.merge_files(save_base(tmp_path, dense, "dense.pth"), delta_path, tmp_path / "dense.safetensors")
    got, expected = (safetensors.torch.load_file(tmp_path / f) for f in ("views.safetensors", "dense.safetensors"))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_many_views_of_one_storage_are_refused_as_a_size_bomb(files, tmp_path):
    base, _, delta_path = files
    shared = torch.zeros(2**18)  # 1 MiB stored once, 64 MiB written
    path = save_base(tmp_path, {**base.state_dict(), **{f"view{i}": shared for i in range(64)}})
    with pytest.raises(svdtune.SvdtuneError, match="times the file"):
        svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")


def test_a_sparse_base_tensor_is_refused_naming_it(files, tmp_path):
    base, _, delta_path = files
    path = save_base(tmp_path, {**base.state_dict(), "sparse": torch.eye(3).to_sparse()})
    with pytest.raises(svdtune.SvdtuneError, match=r"tensor 'sparse' is a torch.sparse_coo"):
        svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")


# Item 3: header first, only regular files, no whole-file reads.

def test_a_plain_safetensors_file_given_as_delta_is_refused_from_its_header(files, tmp_path):
    path = tmp_path / "big.safetensors"
    size = 256 * 2**20
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with open(path, "wb") as stream:
        stream.write(len(header).to_bytes(8, "little") + header)
        stream.truncate(8 + len(header) + size)  # a hole: no disk used
    refused = []

    def read():
        with pytest.raises(svdtune.SvdtuneError, match="plain state dict") as error:
            svdtune.read_delta(path)
        refused.append(error)

    assert peak_python_memory(read) < 2**20 and refused


def test_a_torch_checkpoint_given_as_delta_is_recognised_from_its_first_bytes(tmp_path):
    torch.save({"w": torch.zeros(2**23)}, tmp_path / "base.pth")  # 32 MiB
    refused = []

    def read():
        with pytest.raises(svdtune.SvdtuneError, match="torch.save checkpoint.*swap BASE and DELTA"):
            svdtune.read_delta(tmp_path / "base.pth")
        refused.append(True)

    assert peak_python_memory(read) < 2**20 and refused


def test_a_large_delta_is_held_in_memory_once(tmp_path):
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(2048, 2048)), ["0"], trainable=["1"])
    svdtune.save_delta(model, tmp_path / "big.safetensors")
    size = os.path.getsize(tmp_path / "big.safetensors")
    read = []
    peak = peak_python_memory(lambda: read.append(svdtune.read_delta(tmp_path / "big.safetensors")))
    assert peak < 1.25 * size  # the data once (it was twice: the file's bytes and the tensors' copies)
    assert torch.equal(read[0].params["1.weight"], model[1].weight)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_special_files_are_refused_before_they_are_opened(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    expected = r"a named pipe \(FIFO\)" if kind == "fifo" else "a folder"
    with time_limit(30):
        for read in (svdtune.read_delta, svdtune.checkpoints.read_state_dict,
                     lambda p: svdtune.merge_files(p, p, tmp_path / "out.safetensors")):
            with pytest.raises(svdtune.SvdtuneError, match=f"is {expected}, not a regular file"):
                read(path)
        os.rename(path, tmp_path / "x.pth")
        with pytest.raises(svdtune.SvdtuneError, match=f"is {expected}, not a regular file"):
            svdtune.checkpoints.read_state_dict(tmp_path / "x.pth")


@pytest.mark.slow  # a fresh interpreter
def test_a_device_is_refused_without_reading_it():
    code = """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY))  # a growing read fails fast
        import svdtune
        for read in (svdtune.read_delta, svdtune.checkpoints.read_state_dict):
            try:
                read("/dev/zero")
            except svdtune.SvdtuneError as error:
                print("refused:", error)
        """
    result = run_python(code)
    assert result.stdout.count("is a character device, not a regular file") == 1, result.stdout + result.stderr
    assert "must end with one of" in result.stdout  # read_state_dict checks the suffix first


def test_a_fifo_in_the_svd_cache_is_a_bad_entry_not_a_hang(tmp_path):
    model = small()
    key = cache.cache_key(model[0].weight.detach(), None)
    os.mkfifo(tmp_path / f"{key}.safetensors")
    with time_limit(60), pytest.warns(RuntimeWarning, match="named pipe"):
        svdtune.apply(model, ["0"], cache_dir=tmp_path)
    assert stat.S_ISREG(os.stat(tmp_path / f"{key}.safetensors").st_mode)  # replaced by a good entry


# Item 7: the output is never one of the inputs.

@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink", "dotdot"])
@pytest.mark.parametrize("which", ["base", "delta"])
def test_merge_refuses_to_write_over_an_input(files, tmp_path, alias, which):
    _, base_path, delta_path = files
    target = base_path if which == "base" else delta_path
    out = {"same": target, "symlink": tmp_path / "link.safetensors", "hardlink": tmp_path / "hard.safetensors",
           "dotdot": tmp_path / ".." / tmp_path.name / target.name}[alias]
    if alias == "symlink":
        os.symlink(target, out)
    elif alias == "hardlink":
        os.link(target, out)
    before = target.read_bytes()
    with pytest.raises(svdtune.SvdtuneError, match="is the input .*the same file"):
        svdtune.merge_files(base_path, delta_path, out)
    assert target.read_bytes() == before


def test_the_merge_command_refuses_to_write_over_an_input(files, capsys):
    _, base_path, delta_path = files
    before = base_path.read_bytes()
    assert main(["merge", str(base_path), str(delta_path), "-o", str(base_path)]) == 1
    assert "is the input" in capsys.readouterr().err and base_path.read_bytes() == before


# Item 8: a base saved from an adapted model.

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_base_saved_from_an_adapted_model_is_refused_saying_what_to_save(files, tmp_path, suffix):
    base, _, delta_path = files
    state = svdtune.apply(copy.deepcopy(base), ["0"]).state_dict()
    path = tmp_path / f"adapted{suffix}"
    safetensors.torch.save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(svdtune.SvdtuneError, match=r"'0.svd_delta'.*svdtune.restore\(model\)"):
        svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# Item 9: atomic writes keep modes, honour the umask, fit long names, name the output, clean up.

def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    svdtune.save_delta(trained(small()), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and svdtune.read_delta(path).layers


def test_a_new_file_honours_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        svdtune.save_delta(trained(small()), tmp_path / "d.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "d.safetensors").st_mode) == 0o640


def test_a_read_only_file_is_refused_before_any_work(files, tmp_path, capsys):
    _, base_path, delta_path = files
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    os.chmod(out, 0o444)
    with pytest.raises(PermissionError, match="read-only") as error:
        svdtune.save_delta(trained(small()), out)
    assert error.value.filename == str(out)
    assert main(["merge", str(base_path), str(delta_path), "-o", str(out)]) == 1
    assert f"{out}: it is read-only" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me" and stat.S_IMODE(os.stat(out).st_mode) == 0o444


def test_the_longest_valid_file_name_can_be_written(tmp_path):
    path = tmp_path / ("d" * (255 - len(".safetensors")) + ".safetensors")
    svdtune.save_delta(trained(small()), path)
    assert svdtune.read_delta(path).layers and os.listdir(tmp_path) == [path.name]


def test_a_full_disk_error_names_the_output(files, tmp_path, monkeypatch, capsys):
    _, base_path, delta_path = files

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OSError) as error:
        svdtune.merge_files(base_path, delta_path, out)
    assert error.value.filename == str(out) and error.value.errno == 28
    assert main(["merge", str(base_path), str(delta_path), "-o", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"svdtune: error: {out}: No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "task.safetensors"]


@pytest.mark.slow  # a fresh interpreter
def test_a_file_size_limit_error_names_the_output(tmp_path):
    out = tmp_path / "d.safetensors"
    code = f"""
        import resource, signal
        import torch, svdtune
        from torch import nn
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        model = svdtune.apply(nn.Sequential(nn.Linear(256, 256)), ["0"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))
        try:
            svdtune.save_delta(model, {str(out)!r})
        except OSError as error:
            print("errno", error.errno, "file", error.filename)
        """
    result = run_python(code)
    assert f"errno 27 file {out}" in result.stdout, result.stdout + result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a fresh interpreter
def test_temporary_files_of_killed_writers_are_removed_on_the_next_write(tmp_path):
    code = f"""
        import os, time, svdtune
        def stuck():
            yield b"x" * 1000
            print("writing", flush=True)
            time.sleep(600)
        svdtune.container.atomic_write({str(tmp_path / "a.safetensors")!r}, stuck())
        """
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.kill()
        writer.wait()
    (left,) = os.listdir(tmp_path)
    assert writing.TEMPORARY_NAME.fullmatch(left) and left.startswith(f".svdtune-{writer.pid}-")
    old = time.time() - writing.STALE_SECONDS - 60
    keep = {
        f".svdtune-{writer.pid}-0123abcd.tmp": time.time(),  # dead process, but recent: maybe another host's
        f".svdtune-1-0123abcd.tmp": old,                       # old, but its process runs
        ".notes.tmp": old,                                     # not svdtune's name
    }
    for name, mtime in keep.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    os.utime(tmp_path / left, (old, old))
    svdtune.save_delta(trained(small()), tmp_path / "b.safetensors")
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "b.safetensors"])


# Item 16: dtypes safetensors holds pass through a merge byte for byte; others are named.

EXOTIC = {"u16": torch.uint16, "u32": torch.uint32, "u64": torch.uint64, "f8a": torch.float8_e4m3fn,
          "f8b": torch.float8_e5m2, "c64": torch.complex64}


def exotic_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    raw = {name: torch.randint(0, 256, (5, 3 * dtype.itemsize), dtype=torch.uint8) for name, dtype in EXOTIC.items()}
    return {name: raw[name].view(dtype) for name, dtype in EXOTIC.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_tensors_of_other_dtypes_pass_through_a_merge_unchanged(files, tmp_path, suffix):
    base, _, delta_path = files
    state = {**base.state_dict(), **exotic_tensors()}
    path = tmp_path / f"exotic{suffix}"
    safetensors.torch.save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")
    merged = safetensors.torch.load_file(tmp_path / "out.safetensors")
    for name, value in exotic_tensors().items():
        assert merged[name].dtype == value.dtype
        assert torch.equal(merged[name].view(torch.uint8), value.view(torch.uint8)), name


def test_an_unsupported_dtype_is_named_not_called_corruption(tmp_path):
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path = tmp_path / "base.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    with pytest.raises(svdtune.SvdtuneError) as error:
        svdtune.checkpoints.read_state_dict(path)
    assert "tensor 'w' has dtype F4, which svdtune does not support" in str(error.value)
    assert "corrupted" not in str(error.value)
