"""Every code block of README.md and docs/*.md runs as written, so the docs cannot rot.

How the pages are run (one test per page, blocks in page order, one namespace per page,
in a fresh temporary folder that is the working directory, with HOME pointing into it,
on one torch thread):

- Every fenced block tagged ```python (or py, python3) runs. Show text that is not code
  (signatures, printed output, error messages) as ```text.
- Before a page's first block, PRELUDE below runs: the imports (numpy as np, torch,
  nn, svdtune, copy, os, OrderedDict), `load_my_pretrained_model()` (a tiny seeded MLP
  with layers fc1 and fc2, the same weights on every call) and `model = load_my_pretrained_model()`.
  Every page with Python blocks says so near its top, in words.
- Hidden setup for a page lives in the page itself, in an HTML comment that renders as
  nothing and runs at its place in the page:

      <!-- docs-test: model = make_model() -->

  or, for several lines,

      <!-- docs-test:
      import shutil
      shutil.copy("task.safetensors", "sharp.safetensors")
      -->

  Use it for the stand-ins a reader supplies (their model, their data, files from an
  earlier step), never to patch what a block shows.
- ``<!-- docs-test skip: REASON -->`` right before a block skips that block (say why).
- In ```bash, ```sh and ```console blocks, every ``svdtune ...`` (or ``python -m svdtune ...``)
  command runs through `svdtune.cli.main` and must exit 0, or 1 where the console block's
  output under it starts with ``svdtune: error:``. A console block's commands are its
  ``$ `` lines. Other commands (pip, pytest, the example) are not run; bash blocks are
  checked to parse with ``bash -n``.

A failure names the page and the line of the block (tracebacks use the page's line numbers).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}

PRELUDE = '''
import copy
import os
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

import svdtune


def load_my_pretrained_model():
    """Stand-in for the reader's pretrained model: the same weights on every call."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), fc2=nn.Linear(16, 1)))


model = load_my_pretrained_model()
'''

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
HIDDEN = re.compile(r"^\s*<!--\s*docs-test\s*:(.*)$")
SKIP = re.compile(r"^\s*<!--\s*docs-test\s+skip\s*:\s*(.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One piece of a page to run: a fenced block, or a hidden setup comment."""

    line: int  # 1-based line of its first code line in the page
    kind: str  # "python", "shell" (a bash/console block), "hidden" or "other"
    language: str
    code: str
    skip: str = ""  # the reason, for a block marked skip


def blocks(text: str) -> list[Block]:
    """The fenced blocks and hidden setup comments of a Markdown page, in page order."""
    lines, found, skip, i = text.splitlines(), [], "", 0
    while i < len(lines):
        fence, hidden, skipped = FENCE.match(lines[i]), HIDDEN.match(lines[i]), SKIP.match(lines[i])
        if skipped:
            skip = skipped.group(1)
        elif hidden:
            j = i
            while "-->" not in lines[j]:
                j += 1
                if j == len(lines):
                    raise AssertionError(f"line {i + 1}: a <!-- docs-test: ... comment is never closed with -->")
            body, start = [hidden.group(1)] + lines[i + 1:j + 1], i + 1
            body[-1] = body[-1].split("-->")[0]
            if not body[0].strip():
                body, start = body[1:], i + 2
            found.append(Block(start, "hidden", "python", "\n".join([body[0].lstrip(), *body[1:]]).rstrip()))
            i = j
        elif fence:
            indent, marker, language = fence.groups()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(marker[0] * len(marker)):
                j += 1
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:j])
            language = language.lower()
            kind = "python" if language in PYTHON else "shell" if language in SHELL else "other"
            found.append(Block(i + 2, kind, language, code, skip))
            skip, i = "", j
        i += 1
    return found


def run_python(page: str, block: Block, namespace: dict) -> None:
    padded = "\n" * (block.line - 1) + block.code  # so that tracebacks show the page's line numbers
    try:
        exec(compile(padded, page, "exec"), namespace)
    except Exception as error:
        what = "hidden setup" if block.kind == "hidden" else "```python block"
        pytest.fail(f"{page}:{block.line}: the {what} starting at line {block.line} fails: {type(error).__name__}: {error}\n"
                    + "".join(traceback.format_exc(limit=-3)), pytrace=False)


def commands(block: Block) -> list[tuple[int, list[str], int]]:
    """(line, argv after 'svdtune', expected exit status) of each svdtune command of a shell block."""
    lines, found = block.code.splitlines(), []
    for n, line in enumerate(lines):
        if block.language == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        words = shlex.split(line, comments=True)
        if words[:1] == ["svdtune"] or words[:3] == ["python", "-m", "svdtune"]:
            output = []
            for later in lines[n + 1:]:
                if block.language != "console" or later.startswith("$ "):
                    break
                output.append(later)
            expected = 1 if output and output[0].startswith("svdtune: error:") else 0
            found.append((block.line + n, words[3:] if words[0] == "python" else words[1:], expected))
    return found


def run_shell(page: str, block: Block) -> None:
    from svdtune.cli import main

    if block.language != "console" and shutil.which("bash"):
        parsed = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{page}:{block.line}: the ```{block.language} block does not parse: {parsed.stderr}"
    for line, argv, expected in commands(block):
        if any(word in ("|", "&&", ";", ">", "<") for word in argv):
            pytest.fail(f"{page}:{line}: svdtune command with shell operators cannot be run by the docs test", pytrace=False)
        try:
            status = main(argv)
        except SystemExit as exit_:  # --help
            status = exit_.code
        assert status == expected, f"{page}:{line}: `svdtune {shlex.join(argv)}` exited {status}, not {expected}"


def run_page(page: Path) -> dict[str, int]:
    """Run a page's blocks in order; return how many of each kind ran."""
    name, namespace = str(page.relative_to(ROOT)), {"__name__": "__docs__"}
    counts = {"python": 0, "hidden": 0, "shell": 0, "skipped": 0}
    pieces = blocks(page.read_text(encoding="utf-8"))
    if any(block.kind in ("python", "hidden") for block in pieces):
        exec(compile(PRELUDE, "tests/test_docs.py PRELUDE", "exec"), namespace)
    for block in pieces:
        if block.skip:
            counts["skipped"] += 1
        elif block.kind in ("python", "hidden"):
            run_python(name, block, namespace)
            counts[block.kind] += 1
        elif block.kind == "shell":
            run_shell(name, block)
            counts["shell"] += len(commands(block))
    return counts


@pytest.fixture
def in_tmp_folder(tmp_path, monkeypatch):
    """The page runs in an empty folder, with HOME there too (~/.cache/svdtune), on one thread (tiny models gain
    nothing from more, and on a busy machine spinning threads made one page 80x slower); the environment and
    the thread count are restored after."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    saved, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_block_of_the_page_runs(page, in_tmp_folder):
    counts = run_page(page)
    print(f"{page.relative_to(ROOT)}: {counts}")


def test_the_pages_have_their_python_blocks():
    """Guards the extractor itself: the pages hold many Python blocks, all of them found."""
    found = [block for page in PAGES for block in blocks(page.read_text(encoding="utf-8")) if block.kind == "python"]
    fences = sum(len(re.findall(r"^\s*```(?:python|py|python3)\s*$", page.read_text(encoding="utf-8"), re.M | re.I))
                 for page in PAGES)
    assert len(found) == fences and len(found) >= 30, (len(found), fences)


def test_the_extractor_reads_blocks_hidden_setup_and_skips():
    text = ("intro\n```python\nx = 1\n```\n<!-- docs-test: y = 2 -->\n<!-- docs-test:\nz = 3\nw = 4\n-->\n"
            "<!-- docs-test skip: needs a GPU -->\n```python\nimport cuda_only\n```\n  ```text\nnot code\n  ```\n"
            "```console\n$ svdtune inspect a.safetensors\nsvdtune: error: no\n$ svdtune --version\nsvdtune 0.1.0\n```\n")
    found = blocks(text)
    assert [(b.line, b.kind, b.code, b.skip) for b in found[:4]] == [
        (3, "python", "x = 1", ""), (5, "hidden", "y = 2", ""), (7, "hidden", "z = 3\nw = 4", ""),
        (12, "python", "import cuda_only", "needs a GPU")]
    assert found[4].kind == "other" and found[4].code == "not code"
    assert commands(found[5]) == [(18, ["inspect", "a.safetensors"], 1), (20, ["--version"], 0)]


def test_a_failing_block_names_its_page_and_line():
    block = blocks("text\n\n```python\nx = 1\nundefined_name\n```\n")[0]
    with pytest.raises(pytest.fail.Exception) as failure:
        run_python("docs/broken-example.md", block, {})
    assert "docs/broken-example.md:4:" in str(failure.value) and "NameError" in str(failure.value)
    assert 'File "docs/broken-example.md", line 5' in str(failure.value)
