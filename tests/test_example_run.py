"""End to end: the example's entry point on tiny synthetic and AGIQA-format data."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import svdtune
from examples.cnniqa_agiqa.cli import main
from examples.cnniqa_agiqa.model import CNNIQA, load_pretrained
from examples.cnniqa_agiqa.variants import VARIANTS, build

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--source-scenes", "8", "--target-scenes", "6", "--versions", "3", "--pretrain-epochs", "1",
        "--epochs", "2", "--splits", "2", "--image-size", "32", "--crop", "24"]
COLUMNS = ("name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """One tiny default-style run through `python -m examples.cnniqa_agiqa`."""
    out = tmp_path_factory.mktemp("run")
    command = [sys.executable, "-m", "examples.cnniqa_agiqa", "--quick", "--out", str(out), *TINY]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_table_is_printed_and_says_synthetic(synthetic_run):
    _, done = synthetic_run
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("Model"))
    assert header.split()[:5] == ["Model", "Epochs", "SRCC", "PLCC", "KRCC"]
    assert "SYNTHETIC DATA" in done.stdout
    for name in ("zero-shot", "scratch", "full fine-tuning", "head (fc3)", "fc1-fc3", "conv1", "all layers"):
        assert any(name in line for line in lines), name
    merge_line = next(line for line in lines if line.startswith("merge check"))
    assert float(merge_line.rsplit(" ", 1)[1]) < 1e-4


def test_result_files(synthetic_run):
    out, _ = synthetic_run
    payload = json.loads((out / "results.json").read_text())
    assert payload["synthetic"] is True and len(payload["runs"]) == 2 * len(VARIANTS)
    summary = {row["variant"]: row for row in payload["summary"]}
    assert list(summary) == list(VARIANTS)
    assert summary["zero-shot"]["trainable"] == 0 and summary["svd-fc"]["trainable"] == 901
    assert summary["svd-conv"]["trainable"] == 50 and summary["full"]["trainable"] == 729_801
    assert all(summary[v]["delta_bytes"] < 16_000 for v in ("svd-fc", "svd-conv", "svd-all"))
    assert summary["head"]["delta_bytes"] is None
    for run in payload["runs"]:
        assert len(run["val_srcc"]) == run["epochs"] + 1 and 0 <= run["best_epoch"] <= run["epochs"]
        assert all(-1 <= run[m] <= 1 for m in ("srcc", "plcc", "krcc", "plcc_logistic"))
    with (out / "results.csv").open() as handle:
        assert [row["variant"] for row in csv.DictReader(handle)] == list(VARIANTS)
    for name in ("metrics.png", "val_srcc.png", "spectra_svd-fc.png", "splits.json", "source_cnniqa.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert payload["merge_check"]["max_abs_diff"] < 1e-4


def test_splits_file_groups_by_scene(synthetic_run):
    out, _ = synthetic_run
    stored = json.loads((out / "splits.json").read_text())["splits"]
    assert len(stored) == 2
    for split in stored:
        scenes = [{int(n.split("-")[1]) // 3 for n in split[p]["names"]} for p in ("train", "val", "test")]
        assert not (scenes[0] & scenes[1] or scenes[0] & scenes[2] or scenes[1] & scenes[2])


def test_delta_file_loads_into_a_fresh_svd_model(synthetic_run):
    out, _ = synthetic_run
    from safetensors.torch import load_file

    source = load_file(str(out / "source_cnniqa.safetensors"))
    config_like = type("C", (), {"lr_svd": 1e-2, "svd_mode": "shift"})()
    model, _, _ = build(VARIANTS["svd-fc"], source, config_like, seed=0)
    svdtune.load_delta(model, out / "deltas" / "svd-fc_split1.safetensors")
    stored = load_file(str(out / "deltas" / "svd-fc_split1.safetensors"))
    deltas = {k: v for k, v in model.state_dict().items() if k.endswith("svd_delta")}
    assert set(deltas) == {"fc1.svd_delta", "fc2.svd_delta", "fc3.svd_delta"}
    run = next(r for r in json.loads((out / "results.json").read_text())["runs"]
               if r["variant"] == "svd-fc" and r["split"] == 1)
    moved = any(float(v.abs().max()) > 0 for v in deltas.values())
    assert moved == (run["best_epoch"] > 0)  # the file holds the checkpoint chosen on val
    assert all(torch.equal(deltas[k], stored[k]) for k in stored if k in deltas)


def test_merged_file_is_a_plain_cnniqa(synthetic_run):
    out, _ = synthetic_run
    merged = next(out.glob("merged_svd-*.safetensors"))
    model = load_pretrained(CNNIQA(), merged)
    assert list(model.state_dict()) == list(CNNIQA().state_dict())
    pth = torch.load(merged.with_suffix(".pth"), weights_only=True)  # IQA-PyTorch's layout, safe to load
    assert list(pth) == ["params"] and list(pth["params"]) == list(model.state_dict())
    assert all(torch.equal(pth["params"][k], v) for k, v in model.state_dict().items())


def test_table_md_holds_the_printed_numbers_and_the_readme_quotes_its_layout(synthetic_run):
    out, done = synthetic_run
    table = (out / "table.md").read_text(encoding="utf-8").splitlines()
    payload = json.loads((out / "results.json").read_text())
    rows = [line for line in table if line.startswith("| CNNIQA")]
    assert len(rows) == len(payload["summary"])
    for line, summary in zip(rows, payload["summary"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == summary["model"] and cells[2] == f"{summary['srcc_mean']:.4f} ± {summary['srcc_std']:.4f}"
        assert cells[0] in done.stdout and cells[2] in done.stdout  # the printed table has the same numbers
        assert cells[7] == ("-" if summary["delta_bytes"] is None else f"{summary['delta_bytes']:,}")
    header = next(line for line in table if line.startswith("| Model"))
    readme = (ROOT / "examples" / "cnniqa_agiqa" / "README.md").read_text(encoding="utf-8")
    assert header in readme.splitlines(), "the example README must quote table.md's layout"


def _copy_cache(out: Path, tmp_path: Path) -> Path:
    """A fresh output folder holding only the run's cached source model."""
    shutil.copy(out / "source_cnniqa.safetensors", tmp_path / "source_cnniqa.safetensors")
    return tmp_path


def test_second_run_reuses_the_source_model(synthetic_run, tmp_path, capsys):
    out, _ = synthetic_run
    first = json.loads((out / "results.json").read_text())
    again_out = _copy_cache(out, tmp_path)
    assert main(["--quick", "--out", str(again_out), "--variants", "zero-shot", *TINY]) == 0
    assert "reusing the pretrained source model" in capsys.readouterr().err
    again = json.loads((again_out / "results.json").read_text())
    zero = [r for r in first["runs"] if r["variant"] == "zero-shot"]
    assert [r["srcc"] for r in again["runs"]] == [r["srcc"] for r in zero]


def _write_agiqa(root: Path, prompts: int = 6, per_prompt: int = 3, size: int = 40) -> list[str]:
    """A tiny AGIQA-3K-format folder (CRLF CSV, quoted prompts with commas, JPEGs)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for p in range(prompts):
        for k in range(per_prompt):
            name = f"model{k}_normal_{p:03d}.jpg"
            width = size + 8 * (p % 3)  # unequal sizes: whole-image evaluation must not batch them
            Image.fromarray(rng.integers(0, 256, (size, width, 3), dtype=np.uint8)).save(root / name)
            rows.append([name, f"prompt {p}, oil painting", "", "", "", f"{rng.uniform(0, 5):.5f}", "0.3",
                         f"{rng.uniform(0, 5):.5f}", "0.3"])
    with (root / "data.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return [r[0] for r in rows]


def test_agiqa_format_run_with_iqa_pytorch_weights(tmp_path, capsys):
    _write_agiqa(tmp_path / "agiqa")
    torch.manual_seed(0)
    torch.save({"params": CNNIQA().state_dict()}, tmp_path / "CNNIQA_koniq10k.pth")
    argv = ["--data-root", str(tmp_path / "agiqa"), "--pretrained", str(tmp_path / "CNNIQA_koniq10k.pth"),
            "--out", str(tmp_path / "out"), "--variants", "zero-shot,head,svd-fc", "--splits", "2",
            "--epochs", "1", "--crop", "24", "--batch-size", "4", "--target", "align", "--resize", "36",
            "--quiet", "--no-plots"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AGIQA-3K mos_align" in printed and "SYNTHETIC" not in printed
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["variant"] for row in payload["summary"]] == ["zero-shot", "head", "svd-fc"]
    assert (tmp_path / "out" / "deltas" / "svd-fc_split2.safetensors").is_file()


def test_agiqa_run_with_the_pyiqa_recipe_and_a_cache(tmp_path, capsys):
    """--recipe pyiqa (sizes overridden to fit tiny images): multistep schedule, flips; images decoded once."""
    _write_agiqa(tmp_path / "agiqa")
    torch.save({"params": CNNIQA().state_dict()}, tmp_path / "w.pth")
    argv = ["--data-root", str(tmp_path / "agiqa"), "--pretrained", str(tmp_path / "w.pth"), "--out",
            str(tmp_path / "out"), "--variants", "zero-shot,svd-fc", "--splits", "1", "--recipe", "pyiqa",
            "--epochs", "2", "--crop", "24", "--resize", "30", "--batch-size", "4", "--no-plots"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "decoded 18 images once" in err and "18 of 18 decoded images held in memory" in err
    assert "estimate from the first epoch of svd-fc" in err and "\r" not in err
    config = json.loads((tmp_path / "out" / "results.json").read_text())["config"]
    assert (config["recipe"], config["schedule"], config["hflip"], config["resize"]) == ("pyiqa", "multistep", True, 30)
    cached = (tmp_path / "out" / "table.md").read_text()
    assert main(argv + ["--cache-mb", "0", "--quiet"]) == 0  # every image decoded on every access
    assert (tmp_path / "out" / "table.md").read_text() == cached  # the cache changes no number


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        ("none", [], "is not a folder"),
        ("missing-image", ["--pretrained", "PTH"], "1 of 18 images listed in data.csv are missing"),
        ("truncated-image", ["--pretrained", "PTH"], "1 of 18 images in"),
        ("small-image", ["--pretrained", "PTH", "--crop", "24", "--splits", "1", "--epochs", "1"],
         "1 of 18 images in"),
        ("small-image", ["--pretrained", "PTH", "--variants", "zero-shot", "--eval-crop", "24"],
         "smaller than the 24 px crop this run takes: model1_normal_001.jpg (20x16). Lower --crop/--eval-crop"),
        ("ok", ["--crop", "24"], "pass --pretrained"),
        ("ok", ["--pretrained", "PTH", "--variants", "svd"], "unknown variants"),
    ],
)
def test_errors_before_training(tmp_path, capsys, setup, extra, message):
    root = tmp_path / "agiqa"
    if setup != "none":
        names = _write_agiqa(root)
        if setup == "missing-image":
            (root / names[4]).unlink()
        if setup == "truncated-image":  # passes Image.verify(), fails when decoded
            data = (root / names[4]).read_bytes()
            (root / names[4]).write_bytes(data[: len(data) // 2])
        if setup == "small-image":
            from PIL import Image

            Image.new("RGB", (20, 16)).save(root / names[4])
    torch.save({"params": CNNIQA().state_dict()}, tmp_path / "w.pth")
    extra = [str(tmp_path / "w.pth") if e == "PTH" else e for e in extra]
    assert main(["--data-root", str(root), "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out" / "results.json").exists()


def _bad_input(kind: str, tmp: Path) -> tuple[list[str], list[str]]:
    """argv with one bad file or folder, and what the one-line error must say."""
    root, weights, out = tmp / "agiqa", tmp / "w.pth", str(tmp / "out")
    _write_agiqa(root)
    torch.save({"params": CNNIQA().state_dict()}, weights)
    agiqa_run = ["--data-root", str(root), "--pretrained", str(weights), "--out", out, "--variants", "zero-shot"]
    if kind == "corrupt-safetensors":
        (tmp / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        return ["--quick", "--pretrained", str(tmp / "x.safetensors"), "--out", out], [
            f"could not read pretrained weights {tmp / 'x.safetensors'}", "Pass IQA-PyTorch's .pth"]
    if kind == "pretrained-dir":
        return ["--quick", "--pretrained", str(tmp), "--out", out], [f"{tmp} is a directory", "checkpoint file"]
    if kind == "out-is-file":
        (tmp / "taken").write_text("x")
        return ["--quick", "--out", str(tmp / "taken")], [f"--out {tmp / 'taken'} is an existing file", "folder path"]
    if kind == "out-under-file":
        (tmp / "taken").write_text("x")
        return ["--quick", "--out", str(tmp / "taken" / "sub")], [f"--out {tmp / 'taken' / 'sub'}", "Not a directory"]
    if kind == "csv-not-utf8":
        text = (root / "data.csv").read_bytes().replace(b"prompt 2", b"caf\xe9 2")
        (root / "data.csv").write_bytes(text)
        return agiqa_run, [f"{root / 'data.csv'} is not UTF-8", "line 8 has the byte 0xe9", "save data.csv as UTF-8"]
    if kind == "split-file-not-json":
        (tmp / "splits.json").write_text('{"splits": [')
        wanted = [f"--split-file {tmp / 'splits.json'} is not valid JSON"]
        return [*agiqa_run, "--split-file", str(tmp / "splits.json")], wanted
    if kind == "split-file-absent":
        return [*agiqa_run, "--split-file", str(tmp / "nope.json")], [f"--split-file {tmp / 'nope.json'} not found"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["corrupt-safetensors", "pretrained-dir", "out-is-file", "out-under-file",
                                  "csv-not-utf8", "split-file-not-json", "split-file-absent"])
def test_file_errors_are_one_line_with_the_path(tmp_path, capsys, kind):
    argv, wanted = _bad_input(kind, tmp_path)
    assert main([*argv, "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in wanted:
        assert text in err, (text, err)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_source_cache_is_a_miss(synthetic_run, tmp_path, capsys, damage):
    """A cut or corrupted source_cnniqa.safetensors is reported, retrained and rewritten, not a traceback."""
    out = _copy_cache(synthetic_run[0], tmp_path)
    cache = out / "source_cnniqa.safetensors"
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage")
    argv = ["--quick", "--out", str(out), "--variants", "zero-shot", "--no-plots", *TINY]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: cached source model {cache}" in err and "Pretraining the source model again" in err
    from safetensors.torch import load_file

    rewritten, original = load_file(str(cache)), load_file(str(synthetic_run[0] / "source_cnniqa.safetensors"))
    assert rewritten.keys() == original.keys() and all(torch.equal(rewritten[k], original[k]) for k in original)
    assert main(argv) == 0
    assert "reusing the pretrained source model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_without_a_gpu_says_so(tmp_path, capsys):
    assert main(["--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_published_split_file_is_used(tmp_path, capsys):
    names = _write_agiqa(tmp_path / "agiqa")  # 6 prompts x 3 images, rows in prompt order
    published = {"splits": {"1": {"train": list(range(12)), "val": list(range(12, 18))}}}
    (tmp_path / "published.json").write_text(json.dumps(published))
    torch.save({"params": CNNIQA().state_dict()}, tmp_path / "w.pth")
    argv = ["--data-root", str(tmp_path / "agiqa"), "--pretrained", str(tmp_path / "w.pth"), "--out",
            str(tmp_path / "out"), "--split-file", str(tmp_path / "published.json"), "--variants", "zero-shot",
            "--quiet", "--no-plots"]
    assert main(argv) == 0
    stored = json.loads((tmp_path / "out" / "splits.json").read_text())["splits"]
    assert len(stored) == 1 and stored[0]["test"]["names"] == names[12:]
    assert sorted(stored[0]["train"]["indices"] + stored[0]["val"]["indices"]) == list(range(12))


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    """Redirected output (capsys is not a TTY) gets plain lines without carriage returns, at most one per tenth."""
    from examples.cnniqa_agiqa.progress import progress

    assert list(progress(range(20), "work", interval=0.0)) == list(range(20))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "\r" not in err and lines[-1].startswith("work: 20/20") and 2 <= len(lines) <= 10
    assert list(progress(range(20), "fast")) == list(range(20))  # under PLAIN_INTERVAL: only the last line
    fast = capsys.readouterr().err.strip().splitlines()
    assert len(fast) == 1 and fast[0].startswith("fast: 20/20")
    assert list(progress(range(3), "silent", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_progress_uses_tqdm_only_on_a_terminal(monkeypatch, capsys):
    from examples.cnniqa_agiqa.progress import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert list(progress(range(5), "bar")) == list(range(5))
    assert "\r" in capsys.readouterr().err  # tqdm redraws its bar
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were absent
    assert list(progress(range(5), "plain")) == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err and err.strip().splitlines()[-1].startswith("plain: 5/5")


def test_without_matplotlib_plots_are_skipped_with_a_message(synthetic_run, monkeypatch, tmp_path, capsys):
    out = _copy_cache(synthetic_run[0], tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["--quick", "--out", str(out), "--variants", "zero-shot", "--quiet", *TINY]
    assert main(argv) == 0
    assert "matplotlib is not installed: plots skipped" in capsys.readouterr().out


def test_quiet_prints_what_the_docs_say(synthetic_run, tmp_path, capsys):
    """--quiet: nothing on stderr; on stdout the table, then exactly the merge check and the 'wrote ...' line."""
    out = _copy_cache(synthetic_run[0], tmp_path)
    assert main(["--quick", "--out", str(out), "--variants", "zero-shot,svd-fc", "--quiet", "--no-plots", *TINY]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    lines = printed.out.splitlines()
    last_row = max(i for i, line in enumerate(lines) if line.startswith("CNNIQA"))
    assert [line.split(" ", 1)[0] for line in lines[last_row + 1:]] == ["merge", "wrote"]
    readme = (ROOT / "examples" / "cnniqa_agiqa" / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `--quiet`"))
    from examples.cnniqa_agiqa.cli import parser

    help_text = next(a.help for a in parser()._actions if "--quiet" in a.option_strings)
    for doc in (row, help_text):
        assert "merge check" in doc and "wrote ..." in doc and "only the table" not in doc, doc


def test_divergence_is_reported_with_the_fix(synthetic_run, tmp_path, capsys):
    out = _copy_cache(synthetic_run[0], tmp_path)
    argv = ["--quick", "--out", str(out), "--variants", "full", "--lr-full", "1e12", "--quiet", *TINY]
    assert main(argv) == 2
    assert "training diverged" in capsys.readouterr().err
