"""The svdtune command: inspect, merge, combine, help, exit codes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


def test_options_may_come_before_the_delta_files(files, tmp_path):
    _, delta = files
    documented = tmp_path / "documented.safetensors"
    assert main(["combine", str(delta), str(delta), "--weights", "0.25", "0.5", "-o", str(documented)]) == 0
    for argv in (["combine", "--weights", "0.25", "0.5", str(delta), str(delta), "-o"],
                 ["combine", "-o", "OUT", "--weights", "0.25,0.5", str(delta), str(delta)],
                 ["combine", str(delta), "--weights", "0.25", "0.5", str(delta), "-o"]):
        out = tmp_path / f"mix{len(list(tmp_path.iterdir()))}.safetensors"
        argv = [str(out) if a == "OUT" else a for a in argv] + ([str(out)] if argv[-1] == "-o" else [])
        assert main(argv) == 0, argv
        mixed, expected = svdtune.read_delta(out), svdtune.read_delta(documented)
        assert all(torch.equal(mixed.layers[n].delta, expected.layers[n].delta) for n in expected.layers)
    expected_sum = 0.75 * svdtune.read_delta(delta).layers["0"].delta
    torch.testing.assert_close(svdtune.read_delta(documented).layers["0"].delta, expected_sum)


def test_weights_pair_with_the_delta_files_in_command_line_order(files, tmp_path):
    base, first = files
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model.load_state_dict(torch.load(base, weights_only=True)["params"])
    svdtune.apply(model, ["0", "2"], rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.svd_delta.normal_(0, 0.2)
    second = tmp_path / "second.safetensors"
    svdtune.save_delta(model, second)
    out = tmp_path / "mix.safetensors"
    for argv, expected in ((["--weights", "1", "0", str(first), "-o", str(out), str(second)], first),
                           (["--weights", "1,0", str(second), str(first), "-o", str(out)], second)):
        assert main(["combine", *argv]) == 0
        mixed, original = svdtune.read_delta(out), svdtune.read_delta(expected)
        assert all(torch.equal(mixed.layers[n].delta, original.layers[n].delta) for n in original.layers)


def test_combine_usage_errors_name_the_combine_command(files, tmp_path, capsys):
    _, delta = files
    for argv in (["combine", "--weights", "1", "-o", str(tmp_path / "m.safetensors")],
                 ["combine", str(delta), "--weights", "x.safetensors", "-o", str(tmp_path / "m.safetensors")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("usage: svdtune combine") and "svdtune combine: error:" in err
    assert main(["combine", str(delta), str(delta), "--weights", "1", "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "one weight per delta" in capsys.readouterr().err


def test_a_subcommand_error_shows_that_subcommands_usage(files, tmp_path, capsys):
    base, delta = files
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(base), str(delta), str(delta), "-o", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: svdtune merge [-h] -o OUT") and "combine" in err
    with pytest.raises(SystemExit):
        main(["inspect", str(delta), "--bogus"])
    assert capsys.readouterr().err.startswith("usage: svdtune inspect")


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert exit_.value.code == 0 and capsys.readouterr().out == f"svdtune {version}\n" and svdtune.__version__ == version


def _run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    out = _run_python(f"""
import runpy, sys
sys.argv = ["svdtune", {flag!r}]
try:
    runpy.run_module("svdtune", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
print(sorted(m for m in ("torch", "numpy", "safetensors") if m in sys.modules))
""")
    assert out.strip().splitlines()[-1] == "[]", out


def test_the_package_imports_its_names_on_first_use():
    out = _run_python("""
import sys
import svdtune
print("torch" in sys.modules)
import svdtune.report, svdtune.model   # the submodule svdtune.report must not hide the function
print(svdtune.report.__module__, svdtune.Report.__module__, svdtune.container.__name__)
from svdtune import *
names = dir()
print(sorted(set(svdtune.__all__) - set(names)), hasattr(svdtune, "no_such_name"))
""")
    assert out.split() == ["False", "svdtune.model", "svdtune.report", "svdtune.container", "[]", "False"]


def test_inspect_says_what_another_file_is(files, tmp_path, capsys):
    base, _ = files
    state = nn.Linear(3, 2).state_dict()
    safetensors.torch.save_file(state, tmp_path / "plain.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text('{"hidden_size": 768, "layers": [1, 2, 3]}')
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expected = {"plain.safetensors": "is a safetensors state dict (2 tensors), not an svdtune delta file",
                "config.json": "is not a safetensors file", "empty.safetensors": "is empty",
                "base.pth": "torch.save checkpoint"}
    for name, words in expected.items():
        assert main(["inspect", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "BASE and DELTA" not in err and "format=" not in err, err
        assert not any(len(token) > 12 and token.strip(",.").isdigit() for token in err.split()), err
    out = str(tmp_path / "out.safetensors")
    for argv in (["merge", str(base), str(tmp_path / "config.json"), "-o", out],
                 ["combine", str(tmp_path / "config.json"), "--weights", "1", "-o", out]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "config.json' is not a safetensors file" in err and err.count("\n") == 1, err
    assert main(["merge", str(base), str(tmp_path / "plain.safetensors"), "-o", out]) == 1
    err = capsys.readouterr().err
    assert "is a safetensors state dict (2 tensors), not an svdtune delta file" in err and "swap BASE and DELTA" in err
    os.mkfifo(tmp_path / "fifo")
    for argv in (["inspect", str(tmp_path / "fifo")], ["merge", str(base), str(tmp_path / "fifo"), "-o", out]):
        assert main(argv) == 1  # refused before it is opened (which would block)
        assert "not a regular file" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_damaged_delta_file_keeps_the_librarys_reason(files, tmp_path, capsys):
    _, delta = files
    (tmp_path / "cut.safetensors").write_bytes(delta.read_bytes()[:-10])
    assert main(["inspect", str(tmp_path / "cut.safetensors")]) == 1
    with pytest.raises(svdtune.SvdtuneError) as error:
        svdtune.read_delta(tmp_path / "cut.safetensors")
    assert capsys.readouterr().err == f"svdtune: error: {' '.join(str(error.value).split())}\n"


def test_fingerprint_messages_speak_the_command_lines_flag(files, tmp_path, capsys):
    base, delta = files
    other = tmp_path / "other.pth"
    torch.save({"params": {k: v + 1 for k, v in torch.load(base, weights_only=True)["params"].items()}}, other)
    argv = ["merge", str(other), str(delta), "-o", str(tmp_path / "m.safetensors")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pass --force" in err and "strict" not in err and err.count("--force") == 1, err
    with pytest.raises(svdtune.SvdtuneError, match="strict=False"):  # the library speaks Python
        svdtune.merge_files(other, delta, tmp_path / "m.safetensors")
    assert main(argv + ["--force"]) == 0
    err = capsys.readouterr().err
    assert "svdtune: warning:" in err and "(--force)" in err and "strict" not in err, err


HOSTILE = "note\nlayer  Linear  fake row\r\x1b[31mred\x1b[0m\u202etxt\x00\ud800"


def test_inspect_escapes_control_characters_of_the_file(tmp_path, capsys):
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 3)), "0")
    svdtune.save_delta(model, tmp_path / "d.safetensors", metadata={"k\x1b[2J": "v\n" + HOSTILE})
    assert main(["inspect", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out
    assert all(char.isprintable() for char in out.replace("\n", "")), repr(out)
    assert out.count("\n") == 7 and "fake row" in out.splitlines()[2]
    assert "k\\x1b[2J=v\\nnote\\nlayer" in out and "\\r\\x1b[31mred" in out and "\\u202etxt\\x00\\ud800" in out


def test_describe_escapes_names_and_classes(files):
    import dataclasses

    from svdtune.cli import describe

    _, delta = files
    read = svdtune.read_delta(delta)
    layer = dataclasses.replace(read.layers["0"], layer_class="Lin\x1b[8mear")
    hostile = dataclasses.replace(read, layers={HOSTILE: layer}, params={"p\n": torch.zeros(1)}, metadata={})
    lines = describe(hostile, str(delta))
    assert all(line.isprintable() for line in lines), lines
    assert lines[6].startswith("note\\nlayer  Linear  fake row") and "Lin\\x1b[8mear" in lines[6]
    assert any(line.startswith("p\\n ") for line in lines)


def test_error_lines_escape_what_they_quote(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing\x1b[2J\n.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "missing\\x1b[2J" in err


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_printable_escapes_exactly_the_non_printable_characters(text):
    from svdtune.cli import printable

    escaped = printable(text)
    assert escaped.isprintable()
    assert (escaped == text) == text.isprintable()
    assert printable(escaped) == escaped
    if "\\" not in text:  # then the escapes decode back to the text (Python's own unicode_escape reading)
        assert escaped.encode("ascii", "backslashreplace").decode("unicode_escape") == text
