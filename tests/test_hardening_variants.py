"""Hardening (issue 10): variants of its attacks that a first adversarial review found unhandled.

The review's tests failed on main at b1afae1; each states the promise of docs/format.md,
docs/guide.md or docs/api.md it checks. The last ones cover the rest of the same classes.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from svdtune import writing
from svdtune.cli import main
from tests.conftest import randomize_deltas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# Item 9: "A temporary file left by a killed process is removed on a later write to the same
# folder ... when its name is svdtune's, it is a regular file owned by this user, it has not
# changed for 15 minutes and no process with the pid in its name runs" (format.md, Writing).
# The name pattern allows 10 digits; os.kill(pid, 0) raises OverflowError for pid >= 2**31,
# which escapes, so every write into that folder fails with a traceback.
@pytest.mark.parametrize("pid", ["2147483648", "9999999999"])
def test_a_stale_temporary_with_a_huge_pid_neither_breaks_writes_nor_stays(tmp_path, pid):
    stale = tmp_path / f".svdtune-{pid}-abcdef01.tmp"
    stale.write_bytes(b"left by a killed process")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    writing._last_scan.pop(str(tmp_path), None)
    model = svdtune.apply(small(), ["0"])
    randomize_deltas(model)
    svdtune.save_delta(model, tmp_path / "task.safetensors")  # OverflowError on the reviewed code
    assert svdtune.read_delta(tmp_path / "task.safetensors").layers.keys() == {"0"}
    assert not stale.exists()  # no process can have such a pid on this machine


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))


# Item 6: "buffers (an integer buffer must hold the value exactly ...)" (format.md, Limits).
# A U64 value of 2**64-1 cast into an int64 num_batches_tracked wraps to -1, and the round trip
# int64 -> uint64 gives 2**64-1 back, so the exactness check passes.
@pytest.mark.parametrize("value", [2**64 - 1, 2**63])
def test_an_unsigned_value_that_wraps_in_an_int64_buffer_is_refused(tmp_path, value):
    base = WithNorm()
    trained = svdtune.apply(copy.deepcopy(base), ["fc"], trainable=["head"])
    randomize_deltas(trained)
    svdtune.save_delta(trained, tmp_path / "task.safetensors")
    delta = svdtune.read_delta(tmp_path / "task.safetensors")
    buffers = {**delta.buffers, "head.1.num_batches_tracked": torch.tensor(value, dtype=torch.uint64)}
    dataclasses.replace(delta, buffers=buffers).save(tmp_path / "wrapped.safetensors")
    model = copy.deepcopy(base)
    before = state(model)
    with pytest.raises(svdtune.SvdtuneError, match="num_batches_tracked"):
        svdtune.load_delta(model, tmp_path / "wrapped.safetensors")
    assert_same_state(model, before)
    assert type(model.fc) is nn.Linear


# Item 8: "A base saved from an adapted model (holding *.svd_delta keys) ... Detect it"; the
# docstring of read_state_dict: "no key is an svdtune delta". An adapted nn.MultiheadAttention
# holds svd_delta_q_proj / _k_proj / _v_proj, which the check (leaf == "svd_delta") misses.
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_base_saved_from_an_adapted_attention_is_refused(tmp_path, suffix):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    adapted = svdtune.apply(copy.deepcopy(plain), ["0"])
    randomize_deltas(adapted)
    svdtune.save_delta(adapted, tmp_path / "task.safetensors")
    assert any(key.endswith(".svd_delta_q_proj") for key in adapted.state_dict())
    base = tmp_path / f"base{suffix}"
    sd = {k: v.detach().contiguous() for k, v in adapted.state_dict().items()}
    safetensors.torch.save_file(sd, base) if suffix == ".safetensors" else torch.save(sd, base)
    with pytest.raises(svdtune.SvdtuneError, match="svd_delta"):
        svdtune.merge_files(base, tmp_path / "task.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# Items 4/14/16: format.md lists F8_E4M3 (and F8_E4M3FNUZ, F8_E5M2FNUZ) among the dtypes a buffer
# may have, and the one validator serves save and read. torch.isfinite is not implemented for
# float8_e4m3fn, so the validator raises NotImplementedError: a crafted (or honest) file with such
# a buffer crashes read_delta and `svdtune inspect` with a traceback, and save refuses nothing cleanly.
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_a_float8_buffer_saves_and_reads_back(tmp_path, dtype):
    model = svdtune.apply(small(), ["0"])
    randomize_deltas(model)
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    delta = svdtune.read_delta(tmp_path / "task.safetensors")
    value = torch.tensor([0.5, -1.0, 2.0]).to(dtype)
    dataclasses.replace(delta, buffers={"2.scale_inv": value}).save(tmp_path / "f8.safetensors")
    back = svdtune.read_delta(tmp_path / "f8.safetensors").buffers["2.scale_inv"]
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), value.view(torch.uint8))


def test_inspect_of_a_file_with_a_float8_buffer_is_not_a_traceback(tmp_path, capsys):
    model = svdtune.apply(small(), ["0"])
    delta_path = tmp_path / "task.safetensors"
    svdtune.save_delta(model, delta_path)
    tensors, metadata = svdtune.container.read(delta_path)
    tensors["2.q"] = torch.ones(2).to(torch.float8_e4m3fn)
    metadata = {**metadata, "format_version": "2", "buffers": '["2.q"]'}
    svdtune.container.atomic_write(tmp_path / "f8.safetensors", svdtune.container.encode(tensors, metadata))
    code = main(["inspect", str(tmp_path / "f8.safetensors")])  # NotImplementedError on the reviewed code
    captured = capsys.readouterr()
    assert code == 0 or (code == 1 and captured.err.count("\n") == 1)
    assert "Traceback" not in captured.err


# Item 16 / guide threat model ("It cannot crash svdtune"): a merge target stored as F8_E4M3 in a
# valid safetensors base: with --force, check_finite_merge calls torch.isfinite on float8 and the
# CLI dies with a NotImplementedError traceback (F8_E5M2 merges fine).
def test_merge_into_a_float8_e4m3_weight_is_one_line_or_done(tmp_path, capsys):
    base = small()
    model = svdtune.apply(copy.deepcopy(base), ["0"])
    randomize_deltas(model)
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    sd = {**base.state_dict(), "0.weight": base[0].weight.detach().to(torch.float8_e4m3fn)}
    safetensors.torch.save_file(sd, tmp_path / "base.safetensors")
    argv = ["merge", "--force", str(tmp_path / "base.safetensors"), str(tmp_path / "task.safetensors"),
            "-o", str(tmp_path / "out.safetensors")]
    code = main(argv)  # NotImplementedError on the reviewed code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 0 or (code == 1 and "svdtune: error: " in err and ("0.weight" in err or "'0'" in err))


# Item 2 ("Expanded-tensor bombs in a base ... never blow up memory"): read_state_dict's rule
# "all tensors together hold at most 4 times the file's bytes" is checked only after torch.load
# has built every tensor. A .pth whose zip members are deflate-compressed is tiny on disk
# (~1000:1 for zeros), so torch.load allocates the full size first: a 130 kB file costs 128 MiB,
# an 8 MB file 8 GiB, before the refusal.
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures VmHWM (Linux)")
@pytest.mark.parametrize("damaged", [False, True], ids=["compressed", "directory-python-cannot-read"])
def test_a_compressed_pth_is_refused_before_it_is_decompressed(tmp_path, damaged):
    """(The third review: one byte more in the directory's size makes Python's zipfile refuse the archive,
    which torch's own reader still reads and expands.)"""
    base = small()
    plain, packed = io.BytesIO(), io.BytesIO()
    torch.save({**base.state_dict(), "pad": torch.zeros(2**25)}, plain)  # 128 MiB of zeros
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w") as bomb:
        for info in source.infolist():
            bomb.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    raw = bytearray(packed.getvalue())
    if damaged:
        end = raw.rfind(b"PK\x05\x06")
        struct.pack_into("<I", raw, end + 12, struct.unpack_from("<I", raw, end + 12)[0] + 1)
    (tmp_path / "bomb.pth").write_bytes(bytes(raw))
    assert len(raw) < 2**20
    model = svdtune.apply(copy.deepcopy(base), ["0"])
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    script = textwrap.dedent(f"""
        import svdtune, torch

        def peak_kib():  # VmHWM: this process's peak resident memory (ru_maxrss survives exec from pytest)
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

        svdtune.read_delta({str(tmp_path / 'task.safetensors')!r})
        torch.zeros(1)
        before = peak_kib()
        try:
            svdtune.merge_files({str(tmp_path / 'bomb.pth')!r}, {str(tmp_path / 'task.safetensors')!r},
                                {str(tmp_path / 'out.safetensors')!r})
        except svdtune.SvdtuneError:
            pass
        print((peak_kib() - before) // 1024)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    grown_mib = int(done.stdout.split()[-1])
    assert grown_mib < 32, f"reading a {len(raw):,}-byte base grew memory by {grown_mib} MiB"
    assert not (tmp_path / "out.safetensors").exists()


# Item 5 ("Support inference-mode models where possible, refuse clearly where not"; api.md: apply
# refuses what autograd cannot train). A plain model adapted *inside* torch.inference_mode() gets
# inference-tensor deltas without a word; training then fails in backward with a RuntimeError.
def test_apply_under_inference_mode_gives_trainable_deltas_or_refuses():
    model = small()
    try:
        with torch.inference_mode():
            svdtune.apply(model, ["0", "2"])
    except svdtune.SvdtuneError:
        assert type(model[0]) is nn.Linear  # refused, and rolled back
        return
    deltas = svdtune.trainable_parameters(model)
    assert deltas and not any(p.is_inference() for p in deltas)
    model(torch.randn(2, 6)).sum().backward()
    assert all(p.grad is not None for p in deltas)


# Item 15 / DeltaFile.save docstring ("Raises: SvdtuneError: ... the content breaks a rule of the
# format"): a delta or buffer on the meta device (or a sparse buffer) raises RuntimeError or
# NotImplementedError instead.
@pytest.mark.parametrize("where", ["delta", "buffer", "sparse buffer"])
def test_saving_unwritable_content_is_an_svdtune_error(tmp_path, where):
    model = svdtune.apply(small(), ["0"])
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    delta = svdtune.read_delta(tmp_path / "task.safetensors")
    if where == "delta":
        layer = dataclasses.replace(delta.layers["0"], delta=torch.empty(6, device="meta"))
        bad = dataclasses.replace(delta, layers={"0": layer})
    elif where == "buffer":
        bad = dataclasses.replace(delta, buffers={"2.b": torch.empty(3, device="meta")})
    else:
        bad = dataclasses.replace(delta, buffers={"2.b": torch.ones(3).to_sparse()})
    with pytest.raises(svdtune.SvdtuneError):
        bad.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


# Item 7 (issue title: never destroy input; merge_files and export_lora refuse an output that is an
# input, deploy.md / api.md): `svdtune combine A B -o A` silently replaces the input A.
def test_combine_refuses_to_write_over_one_of_its_inputs(tmp_path, capsys):
    model = svdtune.apply(small(), ["0"])
    randomize_deltas(model)
    a = tmp_path / "a.safetensors"
    svdtune.save_delta(model, a)
    before = a.read_bytes()
    code = main(["combine", str(a), str(a), "--weights", "0.5", "0.25", "-o", str(a)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("svdtune: error: ") and err.count("\n") == 1
    assert a.read_bytes() == before


# Item 1 (the review's minor finding): combining inputs whose runs clash everywhere warned once per run.
def test_clashing_runs_give_one_warning_a_layer():
    from svdtune.basis import Basis

    def layer(sha: str) -> svdtune.delta.LayerDelta:
        runs = tuple(Basis((i,), sha * 64, (0.1,) * 4) for i in range(500))
        fingerprint = svdtune.delta.Fingerprint("0" * 64, (1.0,), "float32", runs)
        return svdtune.delta.LayerDelta("Linear", (500, 500), "shift", 1.0, fingerprint, torch.ones(500))

    with pytest.warns(RuntimeWarning) as caught:
        svdtune.combine([svdtune.DeltaFile({"fc": layer("a")}), svdtune.DeltaFile({"fc": layer("b")})], [1, 1])
    assert len(caught) == 1 and "[0] and 499 more runs" in str(caught[0].message)


def counting(dtype: torch.dtype) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2))
    model.register_buffer("count", torch.zeros(1, dtype=dtype))
    return model


def delta_with_count(model: nn.Module, value: torch.Tensor, folder) -> str:
    """A delta file trained on ``model`` whose buffer "count" holds ``value``."""
    svdtune.save_delta(svdtune.apply(copy.deepcopy(model), ["0"]), folder / "task.safetensors")
    delta = svdtune.read_delta(folder / "task.safetensors")
    dataclasses.replace(delta, buffers={"count": value}).save(folder / "count.safetensors")
    return folder / "count.safetensors"


# Item 6, the same class: every integer cast that wraps or drops meaning is refused, and so is a complex
# value into a real buffer (its imaginary part would be dropped).
@pytest.mark.parametrize("value, target", [
    (torch.tensor([-1]), torch.uint8),                     # wraps to 255 (the round trip catches it)
    (torch.tensor([-1]), torch.uint64),                    # wraps to 2**64-1, and back to -1
    (torch.tensor([2**64 - 1], dtype=torch.uint64), torch.int32),  # low bits -1, back to 2**64-1
    (torch.tensor([2**32 + 5], dtype=torch.uint64), torch.int32),  # low bits 5
    (torch.tensor([1.5]), torch.int64),
    (torch.tensor([1 + 2j]), torch.float32),
])
def test_a_buffer_value_is_refused_unless_the_model_holds_it_exactly(tmp_path, value, target):
    model = counting(target)
    with pytest.raises(svdtune.SvdtuneError, match="buffer 'count'"):
        svdtune.load_delta(model, delta_with_count(model, value, tmp_path))
    assert type(model[0]) is nn.Linear and torch.equal(model.count, torch.zeros(1, dtype=target))


@pytest.mark.parametrize("value, target", [
    (torch.tensor([7], dtype=torch.uint64), torch.int64),
    (torch.tensor([200], dtype=torch.uint8), torch.int16),
    (torch.tensor([3]), torch.uint8),
    (torch.tensor([True]), torch.int64),
])
def test_a_buffer_value_the_model_holds_exactly_loads(tmp_path, value, target):
    model = counting(target)
    svdtune.load_delta(model, delta_with_count(model, value, tmp_path))
    assert model.count.dtype == target and int(model.count) == int(value)


# Item 16, the same class: a float8 weight has no SVD svdtune can train or save; apply refuses it by name.
def test_apply_refuses_a_float8_weight_naming_the_dtype():
    model = small()
    model[0].to(torch.float8_e4m3fn)
    with pytest.raises(svdtune.SvdtuneError, match=r"'0'.*float8_e4m3fn.*bfloat16"):
        svdtune.apply(model, ["0"])
    assert type(model[0]) is nn.Linear
