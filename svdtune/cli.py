"""The ``svdtune`` command: inspect, merge and combine delta files from the shell.

    svdtune inspect FILE [FILE ...]
    svdtune merge BASE DELTA -o OUT [--scale S] [--force]
    svdtune combine DELTA [DELTA ...] --weights W [W ...] -o OUT
    svdtune export-lora DELTA --base BASE -o DIR [--rank R] [--max-rank N] [--format peft|diffusers]
    svdtune --version

Exit status 0 on success; 1 with a one-line ``svdtune: error: ...`` on bad input
or an unreadable/unwritable file; 2 for a malformed command line (argparse, with the
usage of the command at fault).

Nothing here imports torch at module level: ``--help`` and ``--version`` answer in the
time Python takes to start (``python benchmarks/cli_startup.py`` measures it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import struct
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from svdtune._version import __version__

if TYPE_CHECKING:
    from svdtune.delta import DeltaFile

MAX_HEADER = 100 * 1024 * 1024  # bytes of a safetensors header read to tell what a file is (as container.MAX_HEADER)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's legacy format: a pickled magic number first
NOT_A_DELTA = "not an svdtune delta file"
# The library's messages speak Python; on the command line its strict=False is --force.
_CLI_WORDING = ((" (or --force on the command line)", ""), ("strict=False", "--force"))
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``svdtune`` command.

    Args:
        argv: the arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 on error (after printing a one-line reason).

    Raises:
        SystemExit: from argparse, for ``--help`` and ``--version`` (0) or a malformed
            command line (2, after the usage of the command at fault).

    Example:
        >>> main(["inspect", "task.safetensors"])
    """
    args = _parse(argv)
    from svdtune.errors import SvdtuneError  # after parsing: --help and --version import nothing more

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            args.run(args)
            status = 0
        except (SvdtuneError, OSError) as error:
            print(f"svdtune: error: {_one_line(error)}", file=sys.stderr)
            status = 1
    for warning in caught:
        print(f"svdtune: warning: {_one_line(warning.message)}", file=sys.stderr)
    return status


def printable(text: str) -> str:
    """``text`` with every control or other non-printable character escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    A file's names and metadata reach the terminal only through this: a newline cannot fake
    a table row, an ANSI escape cannot recolour or hide text.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _ESCAPES.get(c) or _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _one_line(error: object) -> str:
    """An error or warning as one printable line, in the command line's words."""
    text = str(error) if not isinstance(error, OSError) or not error.filename else f"{error.filename}: {error.strerror}"
    for python, cli in _CLI_WORDING:
        text = text.replace(python, cli)
    return printable(" ".join(text.split()))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; a malformed one exits 2 with the usage of its command."""
    parser, commands = _parser()
    args, extras = parser.parse_known_args(argv)
    command = commands[args.command]
    if extras:
        hint = ""
        if args.command == "merge" and not extras[0].startswith("-"):
            hint = "; merge takes one DELTA: to merge several, svdtune combine them into one first"
        command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    if args.command == "combine":
        args.deltas = args.delta_files
        if not args.deltas:
            command.error("the following arguments are required: DELTA")
    return args


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="svdtune", description="Inspect, merge and combine svdtune delta files.")
    parser.add_argument("--version", action="version", version=f"svdtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="show what a delta file holds",
                                  description="Print the layers, shapes, ranks, modes, scales, sizes, metadata "
                                              "and base-weight fingerprints of a delta file.")
    inspect.add_argument("files", nargs="+", metavar="FILE", help="delta files written by svdtune.save_delta")
    inspect.set_defaults(run=_inspect)
    merge = commands.add_parser("merge", help="bake a delta into a base checkpoint",
                                description="Write BASE with DELTA merged into its weights, as safetensors. BASE is a "
                                            "state dict in .safetensors, or .pt/.pth/.bin/.ckpt (torch.load with weights_only; "
                                            "a {'params': state_dict} checkpoint is unwrapped).")
    merge.add_argument("base", metavar="BASE", help="the base state dict the delta was trained on")
    merge.add_argument("delta", metavar="DELTA", help="the delta file")
    merge.add_argument("-o", "--out", required=True, help="the merged .safetensors file to write")
    merge.add_argument("--scale", type=float, default=1.0, help="strength of the deltas (default 1.0: as saved)")
    merge.add_argument("--force", action="store_true", help="merge even if a base weight's fingerprint differs (warns)")
    merge.set_defaults(run=_merge)
    mix = commands.add_parser("combine", help="weighted sum of deltas trained on one base",
                              usage="svdtune combine [-h] DELTA [DELTA ...] --weights W [W ...] -o OUT",
                              description="Write the weighted sum of several delta files trained on the same base "
                                          "model with the same layers, ranks and modes. The options may come first: "
                                          "--weights 0.5 0.5 a.safetensors b.safetensors -o m.safetensors.")
    mix.add_argument("deltas", nargs="*", metavar="DELTA", action=_DeltaFiles, help="the delta files")
    mix.add_argument("--weights", nargs="+", required=True, action=_Weights, metavar="W",
                     help="one weight per delta file, in their order (also as one comma list: 0.5,0.5)")
    mix.add_argument("-o", "--out", required=True, help="the combined .safetensors delta file to write")
    mix.set_defaults(run=_combine, delta_files=[])
    return parser, {"inspect": inspect, "merge": merge, "combine": mix, "export-lora": _add_export_lora(commands)}


def _add_export_lora(commands) -> argparse.ArgumentParser:
    """``svdtune export-lora``: argparse only here; svdtune.lora (and torch) are imported when it runs."""
    command = commands.add_parser(
        "export-lora", help="write a delta as a PEFT LoRA adapter",
        description="Write DELTA as a LoRA adapter (adapter_model.safetensors + adapter_config.json, or diffusers' "
                    "pytorch_lora_weights.safetensors) in the folder OUT, and print the relative error per layer of "
                    "keeping only the RANK largest shifts, and the sizes.")
    command.add_argument("delta", metavar="DELTA", help="the delta file")
    command.add_argument("-o", "--out", required=True, help="the folder to write (created if missing)")
    command.add_argument("--base", required=True, help="the base state dict the delta was trained on")
    command.add_argument("--rank", type=int, help="keep the RANK largest shifts per layer (default: all, exact)")
    command.add_argument("--max-rank", type=int, help="refuse a layer rank above this (vLLM's --max-lora-rank)")
    command.add_argument("--format", choices=["diffusers", "peft"], default="peft", help="peft (default) or diffusers")
    command.add_argument("--prefix", default="unet", help="the diffusers component of the keys (default unet)")
    command.add_argument("--force", action="store_true", help="export even if a base weight's fingerprint differs")
    command.set_defaults(run=_export_lora)
    return command


def _export_lora(args: argparse.Namespace) -> None:
    from svdtune.lora import export_lora

    with _deltas_in_plain_words([args.delta], "pass the delta file (written by svdtune.save_delta) as DELTA."):
        result = export_lora(args.delta, args.out, rank=args.rank, base=args.base, format=args.format,
                             prefix=args.prefix, max_rank=args.max_rank, strict=not args.force)
    print("\n".join(printable(line) for line in str(result).splitlines()))


class _DeltaFiles(argparse.Action):
    """combine's DELTA files, collected in command-line order (with those that follow ``--weights``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.delta_files = [*namespace.delta_files, *values]


class _Weights(argparse.Action):
    """``--weights``: numbers, or comma lists of them; what follows the numbers are delta files.

    argparse hands ``--weights 0.5 0.5 a.safetensors b.safetensors`` all four values, so the
    first one that is not a number starts the delta files (added to ``delta_files`` in order).
    """

    def __call__(self, parser, namespace, values, option_string=None):
        weights, files = [], []
        for value in values:
            numbers = None if files else _numbers(value)
            if numbers is None:
                files.append(value)
            else:
                weights += numbers
        if not weights:
            parser.error(f"argument {option_string}: expected numbers, got {printable(values[0])!r}")
        namespace.weights = weights
        namespace.delta_files = [*namespace.delta_files, *files]


def _numbers(value: str) -> list[float] | None:
    """The numbers of ``"0.5"`` or ``"0.5,0.25"``; None if ``value`` is not such a list."""
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        return None


def _merge(args: argparse.Namespace) -> None:
    from svdtune.offline import merge_files

    with _deltas_in_plain_words([args.delta], "pass the delta file (written by svdtune.save_delta) as DELTA: did you "
                                              "swap BASE and DELTA?"):
        merge_files(args.base, args.delta, args.out, scale=args.scale, strict=not args.force)
    print(f"wrote {printable(args.out)} ({os.path.getsize(args.out):,} bytes)")


def _combine(args: argparse.Namespace) -> None:
    from svdtune.container import check_not_an_input
    from svdtune.offline import combine

    check_not_an_input(args.out, args.deltas)  # before any work, as merge does
    with _deltas_in_plain_words(args.deltas, "combine takes delta files, written by svdtune.save_delta."):
        combine(args.deltas, args.weights).save(args.out)
    print(f"wrote {printable(args.out)} ({os.path.getsize(args.out):,} bytes)")


def _inspect(args: argparse.Namespace) -> None:
    from svdtune.container import paused_gc
    from svdtune.delta import read_delta

    for i, path in enumerate(args.files):
        with _deltas_in_plain_words([path], "svdtune inspect shows delta files, written by svdtune.save_delta."):
            delta = read_delta(path)
        with paused_gc():  # a row per tensor: many objects, none garbage
            print("\n".join(([""] if i else []) + describe(delta, path)))


@contextlib.contextmanager
def _deltas_in_plain_words(paths: Sequence[str], advice: str) -> Iterator[None]:
    """Around a command's work on the DELTA files ``paths``: one that is not a regular file is refused before
    (opening a FIFO would block); if the work fails, one that is recognisably another kind of file is refused
    saying what it is, then ``advice``, instead of the library's reason (checked only then: a good file's
    header is read once)."""
    from svdtune.errors import SvdtuneError

    for path in paths:
        if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
            raise SvdtuneError(f"{printable(repr(path))} is not a regular file (a FIFO, socket or device); "
                               "pass a delta file.")
    try:
        yield
    except SvdtuneError:
        for path in paths:
            kind = file_kind(path)
            if kind is not None:
                raise SvdtuneError(f"{printable(repr(path))} {kind}; {advice}") from None
        raise


def file_kind(path: str) -> str | None:
    """What the regular file at ``path`` is, in words after its name ("is not a safetensors file"), when it is
    recognisably not an svdtune delta file; None for a delta file (damaged or not) or a file that cannot be read.

    Reads the first bytes and at most a safetensors header (MAX_HEADER bytes).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = handle.read(512)
            header_size = struct.unpack("<Q", start[:8])[0] if len(start) >= 9 else 0
            if start[8:9] != b"{" or header_size >= 2**40:  # no JSON header follows, or a length no file has
                return _not_safetensors(start, size)
            if header_size > min(MAX_HEADER, size - 8):  # safetensors cut short or damaged: the library says so
                return None
            handle.seek(8)
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or (isinstance(metadata, dict) and metadata.get("format") == "svdtune.delta"):
        return None
    tensors = sum(key != "__metadata__" for key in header)
    return f"is a safetensors state dict ({tensors:,} tensors), {NOT_A_DELTA}"


def _not_safetensors(start: bytes, size: int) -> str:
    if size == 0:
        return f"is empty, {NOT_A_DELTA}"
    if start.startswith(ZIP_MAGIC):  # a torch.save checkpoint is a zip whose first member is .../data.pkl
        first = start[30:30 + int.from_bytes(start[26:28], "little")]
        return f"is a torch.save checkpoint, {NOT_A_DELTA}" if first.endswith(b"data.pkl") else f"is a zip archive, {NOT_A_DELTA}"
    if start.startswith(b"\x80"):  # a pickle; torch's magic number at byte 2, or 11 after a protocol 4+ frame
        legacy = TORCH_LEGACY_MAGIC in start[:32]
        return f"is a torch.save checkpoint (legacy format), {NOT_A_DELTA}" if legacy else f"is a pickle file, {NOT_A_DELTA}"
    return f"is not a safetensors file, so {NOT_A_DELTA}"


def describe(delta: DeltaFile, path: str) -> list[str]:
    """The lines ``svdtune inspect`` prints for a delta file, every name and value made `printable`.

    Args:
        delta: the file's content, from `read_delta`.
        path: its path, shown with its size.

    Returns:
        The lines, without newlines.

    Example:
        >>> print("\\n".join(describe(read_delta("task.safetensors"), "task.safetensors")))
    """
    from svdtune.delta import format_version
    from svdtune.report import table_lines

    lines = [
        f"file      {printable(path)} ({os.path.getsize(path):,} bytes)",
        f"format    svdtune delta v{format_version(delta)}, written by svdtune {printable(delta.svdtune_version or '?')}",
        "metadata  " + printable(", ".join(f"{k}={v}" for k, v in sorted(delta.metadata.items())) or "-"),
        "",
    ]
    header = ("layer", "class", "weight shape", "rank", "mode", "scale", "bytes", "base sha256", "top singular values")
    rows = [
        tuple(map(printable, (
            name, layer.layer_class, "x".join(map(str, layer.weight_shape)), f"{layer.rank}/{layer.max_rank}", layer.mode,
            f"{layer.scale:g}", f"{layer.delta.numel() * layer.delta.element_size():,}", layer.fingerprint.sha256[:12],
            ", ".join(f"{s:.4g}" for s in layer.fingerprint.top_sigma) + f" ({layer.fingerprint.dtype})")))
        for name, layer in delta.layers.items()
    ]
    lines += table_lines(header, rows)
    recorded = [f"{name} {list(run.columns)}" for name, layer in delta.layers.items() for run in layer.fingerprint.basis]
    if recorded:
        lines += ["", "singular vectors recorded for repeated singular values: " + printable(", ".join(recorded))]
    for title, kind, tensors in (("fully trained parameters:", "parameter", delta.params),
                                 ("buffers of their modules:", "buffer", delta.buffers)):
        if tensors:
            lines += ["", title]
            lines += table_lines((kind, "shape", "dtype", "bytes"), _tensor_rows(tensors))
    return lines


def _tensor_rows(tensors: dict) -> list[tuple[str, str, str, str]]:
    """A row (name, shape, dtype, bytes) per tensor; the cells after the name formatted once per shape and dtype."""
    names = list(tensors)
    if not "".join(names).isprintable():  # one pass in C: each character of each name
        names = list(map(printable, names))
    kinds = list(zip(map(operator.attrgetter("shape"), tensors.values()), map(operator.attrgetter("dtype"), tensors.values())))
    cells = {(shape, dtype): ("x".join(map(str, shape)) or "scalar", str(dtype).removeprefix("torch."),
                              f"{shape.numel() * dtype.itemsize:,}") for shape, dtype in set(kinds)}
    return [(name, *cell) for name, cell in zip(names, map(cells.__getitem__, kinds))]
