"""The wrong kind of file where a delta file or a base checkpoint is expected: messages that name what it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune
from svdtune.cli import main
from tests.conftest import randomize_deltas

ROOT = Path(__file__).resolve().parents[1]

# how each kind of file is written -> what the message must call it
OTHER_KINDS = {
    "torch.save zip": (lambda sd, path: torch.save(sd, path), "is a torch.save checkpoint, not an svdtune delta file"),
    "torch.save legacy": (lambda sd, path: torch.save(sd, path, _use_new_zipfile_serialization=False),
                          r"is a torch.save checkpoint \(legacy format\), not an svdtune delta file"),
    "torch.save legacy protocol 4": (lambda sd, path: torch.save(sd, path, _use_new_zipfile_serialization=False, pickle_protocol=4),
                                     r"is a torch.save checkpoint \(legacy format\), not an svdtune delta file"),
    "plain safetensors": (lambda sd, path: safetensors.torch.save_file(sd, path),
                          r"is a safetensors file without svdtune delta metadata \(a plain state dict\?\), not an svdtune delta"),
}
SUFFIXES = {"plain safetensors": ".safetensors"}
CLI_WORDS = {OTHER_KINDS["plain safetensors"][1]: r"is a safetensors state dict \(4 tensors\), not an svdtune delta file"}
ADVICE = r"pass the delta file \(written by svdtune.save_delta\) here: did you swap BASE and DELTA\?"


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.fixture
def delta_path(tmp_path) -> Path:
    model = svdtune.apply(base_model(), ["0", "2"], rank=2)
    randomize_deltas(model)
    svdtune.save_delta(model, tmp_path / "task.safetensors")
    return tmp_path / "task.safetensors"


@pytest.fixture
def base_path(tmp_path) -> Path:
    torch.save(base_model().state_dict(), tmp_path / "base.pt")
    return tmp_path / "base.pt"


@pytest.fixture(params=list(OTHER_KINDS))
def other(request, tmp_path) -> tuple[Path, str]:
    """(a file of another kind holding a state dict, the message that names its kind)."""
    write, message = OTHER_KINDS[request.param]
    path = tmp_path / f"other{SUFFIXES.get(request.param, '.pt')}"
    write(base_model().state_dict(), str(path))
    return path, message


READERS = {
    "read_delta": lambda path, base: svdtune.read_delta(path),
    "load_delta": lambda path, base: svdtune.load_delta(base_model(), path),
    "merge_files": lambda path, base: svdtune.merge_files(base, path, base.with_name("out.safetensors")),
    "combine": lambda path, base: svdtune.combine([path], [1.0]),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_another_kind_of_file_is_named(other, base_path, reader):
    path, message = other
    with pytest.raises(svdtune.SvdtuneError, match=f"^'{path}' {message}.*; {ADVICE}$"):
        READERS[reader](path, base_path)
    assert not base_path.with_name("out.safetensors").exists()


def test_cli_inspect_names_the_kind(other, capsys):
    path, message = other
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("svdtune: error: ") and len(captured.err.splitlines()) == 1
    message = CLI_WORDS.get(message, message)  # inspect has no BASE: it says what the file is, and no more
    assert re.search(message, captured.err) and "BASE" not in captured.err, captured.err


def test_cli_merge_with_swapped_arguments_says_so(delta_path, base_path, capsys):
    assert main(["merge", str(delta_path), str(base_path), "-o", str(base_path.with_name("out.safetensors"))]) == 1
    err = capsys.readouterr().err
    assert f"'{base_path}' is a torch.save checkpoint, not an svdtune delta file" in err
    assert "did you swap BASE and DELTA?" in err
    assert not base_path.with_name("out.safetensors").exists()


def test_python_dash_m_inspect_exits_1_with_the_kind(base_path):
    done = subprocess.run([sys.executable, "-m", "svdtune", "inspect", str(base_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert f"svdtune: error: '{base_path}' is a torch.save checkpoint, not an svdtune delta file" in done.stderr


def test_a_merged_output_is_named_a_safetensors_file_not_a_delta(delta_path, base_path):
    merged = base_path.with_name("merged.safetensors")
    svdtune.merge_files(base_path, delta_path, merged)  # checksummed by svdtune, but a state dict
    with pytest.raises(svdtune.SvdtuneError, match=rf"is a safetensors file \(format='pt'\), not an svdtune delta file; {ADVICE}"):
        svdtune.read_delta(merged)


def damaged_copies(raw: bytes) -> dict[str, bytes]:
    return {
        "last bytes cut": raw[:-4],
        "cut in half": raw[: len(raw) // 2],
        "cut inside the header": raw[:40],
        "last bit flipped": raw[:-1] + bytes([raw[-1] ^ 1]),
        "length only": raw[:8],
    }


@pytest.mark.parametrize("damage", list(damaged_copies(b"0123456789" * 10)))
def test_a_damaged_delta_file_is_still_called_truncated_or_corrupted(delta_path, damage):
    delta_path.write_bytes(damaged_copies(delta_path.read_bytes())[damage])
    with pytest.raises(svdtune.SvdtuneError, match="is not a valid svdtune safetensors file: .*truncated, corrupted") as caught:
        svdtune.read_delta(delta_path)
    assert "not an svdtune delta file" not in str(caught.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickled_whole_model_gives_a_plain_one_line_message(tmp_path, delta_path, legacy):
    path = tmp_path / "model.pt"
    torch.save(base_model(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(svdtune.SvdtuneError) as caught:
        svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")
    message = str(caught.value)
    assert "\x1b" not in message and "\n" not in message
    assert message.startswith(f"cannot read base checkpoint '{path}': Weights only load failed (WeightsUnpickler error: ")
    assert "torch.nn.modules.container.Sequential" in message
    assert message.endswith("; it must be a state dict saved with torch.save.")


def test_cli_merge_of_a_pickled_whole_model_prints_no_escape_codes(tmp_path, delta_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(base_model(), path)
    assert main(["merge", str(path), str(delta_path), "-o", str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "Weights only load failed" in err and len(err.splitlines()) == 1


def test_an_unreadable_base_gets_a_reason_in_words(tmp_path, delta_path):
    path = tmp_path / "base.pt"
    path.write_bytes(b"hello, not a checkpoint")  # torch.load raises KeyError(101): "101" alone says nothing
    with pytest.raises(svdtune.SvdtuneError, match=r"^cannot read base checkpoint '[^']*': [^;]*[A-Za-z][^;]*; it must be a state"):
        svdtune.merge_files(path, delta_path, tmp_path / "out.safetensors")
