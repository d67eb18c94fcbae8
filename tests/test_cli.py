"""The svdtune command: inspect, merge, combine, help, exit codes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from svdtune.cli import main
from svdtune.model import adapted_layers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """(base .pth in IQA-PyTorch's {"params": ...} form, delta file)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    torch.save({"params": base.state_dict()}, tmp_path / "base.pth")
    model = svdtune.apply(copy.deepcopy(base), ["0", "2"], rank=4)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.svd_delta.normal_(0, 0.2)
    svdtune.save_delta(model, tmp_path / "task.safetensors", metadata={"dataset": "unit-test"})
    return tmp_path / "base.pth", tmp_path / "task.safetensors"


def test_inspect_prints_the_table(files, capsys):
    _, delta = files
    assert main(["inspect", str(delta)]) == 0
    out = capsys.readouterr().out
    assert "dataset=unit-test" in out and f"svdtune {svdtune.__version__}" in out
    fingerprint = svdtune.read_delta(delta).layers["0"].fingerprint.sha256[:12]
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert row.split()[:7] == ["0", "Linear", "16x8", "4/8", "shift", "1", "16"] and fingerprint in row


def test_inspect_lists_fully_trained_parameters(tmp_path, capsys):
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)), ["0"], trainable=["1"])
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert main(["inspect", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out.split("fully trained parameters:")[1]
    assert [line.split()[:3] for line in out.strip().splitlines()[2:]] == [["1.bias", "1", "float32"], ["1.weight", "1x4", "float32"]]


def test_merge_writes_what_merge_files_writes(files, tmp_path, capsys):
    base, delta = files
    assert main(["merge", str(base), str(delta), "-o", str(tmp_path / "cli.safetensors"), "--scale", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    svdtune.merge_files(base, delta, tmp_path / "api.safetensors", scale=0.5)
    cli, api = (safetensors.torch.load_file(tmp_path / f"{n}.safetensors") for n in ("cli", "api"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)


def test_combine_command(files, tmp_path):
    _, delta = files
    assert main(["combine", str(delta), str(delta), "--weights", "0.25", "0.75", "-o", str(tmp_path / "mix.safetensors")]) == 0
    mixed, original = svdtune.read_delta(tmp_path / "mix.safetensors"), svdtune.read_delta(delta)
    torch.testing.assert_close(mixed.layers["2"].delta, original.layers["2"].delta)


def test_errors_are_one_line_and_exit_1(files, tmp_path, capsys):
    base, delta = files
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    for argv in (["inspect", str(tmp_path / "junk.safetensors")],
                 ["inspect", str(tmp_path / "missing.safetensors")],
                 ["merge", str(base), str(delta), "-o", str(tmp_path / "out.pt")],
                 ["merge", str(base), str(tmp_path / "junk.safetensors"), "-o", str(tmp_path / "out.safetensors")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("svdtune: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["merge", "--help"], ["combine", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "usage: svdtune" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "only-one-file"])
    assert exit_.value.code == 2


def test_python_dash_m(files):
    _, delta = files
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "svdtune", "inspect", str(delta)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "16x8" in done.stdout
    failed = subprocess.run([sys.executable, "-m", "svdtune", "inspect", str(delta) + ".missing"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert failed.returncode == 1 and failed.stderr.startswith("svdtune: error:") and "Traceback" not in failed.stderr


def test_a_missing_output_folder_is_one_line_naming_the_users_path(files, tmp_path, capsys):
    base, delta = files
    out = tmp_path / "no-such-folder" / "out.safetensors"
    for argv in (["combine", str(delta), "--weights", "1", "-o", str(out)], ["merge", str(base), str(delta), "-o", str(out)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out}: " in err and "create it first" in err and ".tmp" not in err
    assert not out.parent.exists()


def test_every_written_file_must_be_safetensors(files, tmp_path, capsys):
    _, delta = files
    assert main(["combine", str(delta), "--weights", "1", "-o", str(tmp_path / "mix.pt")]) == 1
    assert "must end with .safetensors" in capsys.readouterr().err and not (tmp_path / "mix.pt").exists()


def test_inspect_lists_the_trained_modules_buffers(tmp_path, capsys):
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), ["0"], trainable=["1"])
    svdtune.save_delta(model, tmp_path / "d.safetensors")
    assert main(["inspect", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out.split("buffers of their modules:")[1]
    assert [line.split()[:3] for line in out.strip().splitlines()[2:]] == [
        ["1.num_batches_tracked", "scalar", "int64"], ["1.running_mean", "4", "float32"], ["1.running_var", "4", "float32"]]


def test_inspect_takes_several_files_and_shows_their_versions(tmp_path, capsys):
    from svdtune import cli

    torch.manual_seed(0)
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), targets="0", trainable="1")
    svdtune.save_delta(model, tmp_path / "with_buffers.safetensors")
    plain = svdtune.apply(nn.Sequential(nn.Linear(4, 3)), targets="0")
    svdtune.save_delta(plain, tmp_path / "plain.safetensors")
    assert cli.main(["inspect", str(tmp_path / "plain.safetensors"), str(tmp_path / "with_buffers.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.count("file      ") == 2
    assert "svdtune delta v1" in out and "svdtune delta v2" in out
