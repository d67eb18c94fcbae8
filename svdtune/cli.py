"""The ``svdtune`` command: inspect, merge and combine delta files from the shell.

    svdtune inspect FILE [FILE ...]
    svdtune merge BASE DELTA -o OUT [--scale S] [--force]
    svdtune combine DELTA DELTA ... --weights W W ... -o OUT
    svdtune export-lora DELTA --base BASE -o DIR [--rank R] [--max-rank N] [--format peft|diffusers]

Exit status 0 on success; 1 with a one-line ``svdtune: error: ...`` on bad input
or an unreadable/unwritable file; 2 for a malformed command line (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from svdtune.delta import DeltaFile, format_version, read_delta
from svdtune.errors import SvdtuneError
from svdtune.offline import combine, merge_files
from svdtune.report import table_lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``svdtune`` command.

    Args:
        argv: the arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 on error (after printing a one-line reason).

    Raises:
        SystemExit: from argparse, for ``--help`` (0) or a malformed command line (2).

    Example:
        >>> main(["inspect", "task.safetensors"])
    """
    args = _parser().parse_args(argv)
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


def _one_line(error: object) -> str:
    text = str(error) if not isinstance(error, OSError) or not error.filename else f"{error.filename}: {error.strerror}"
    return " ".join(text.split())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdtune", description="Inspect, merge and combine svdtune delta files.")
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
    merge.add_argument("base", help="the base state dict the delta was trained on")
    merge.add_argument("delta", help="the delta file")
    merge.add_argument("-o", "--out", required=True, help="the merged .safetensors file to write")
    merge.add_argument("--scale", type=float, default=1.0, help="strength of the deltas (default 1.0: as saved)")
    merge.add_argument("--force", action="store_true", help="merge even if a base weight's fingerprint differs (warns)")
    merge.set_defaults(run=_merge)
    mix = commands.add_parser("combine", help="weighted sum of deltas trained on one base",
                              description="Write the weighted sum of several delta files trained on the same base "
                                          "model with the same layers, ranks and modes.")
    mix.add_argument("deltas", nargs="+", help="the delta files")
    mix.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per delta file")
    mix.add_argument("-o", "--out", required=True, help="the combined .safetensors delta file to write")
    mix.set_defaults(run=_combine)
    _add_export_lora(commands)
    return parser


def _add_export_lora(commands) -> None:
    """``svdtune export-lora``: argparse only here; svdtune.lora (and torch) are imported when it runs."""
    command = commands.add_parser(
        "export-lora", help="write a delta as a PEFT LoRA adapter",
        description="Write DELTA as a LoRA adapter (adapter_model.safetensors + adapter_config.json, or diffusers' "
                    "pytorch_lora_weights.safetensors) in the folder OUT, and print the relative error per layer of "
                    "keeping only the RANK largest shifts, and the sizes.")
    command.add_argument("delta", metavar="DELTA", help="the delta file")
    command.add_argument("-o", "--out", required=True, help="the folder to write (created if missing)")
    command.add_argument("--base", help="the base state dict the delta was trained on (required)")
    command.add_argument("--rank", type=int, help="keep the RANK largest shifts per layer (default: all, exact)")
    command.add_argument("--max-rank", type=int, help="refuse a layer rank above this (vLLM's --max-lora-rank)")
    command.add_argument("--format", choices=["diffusers", "peft"], default="peft", help="peft (default) or diffusers")
    command.add_argument("--prefix", default="unet", help="the diffusers component of the keys (default unet)")
    command.add_argument("--force", action="store_true", help="export even if a base weight's fingerprint differs")
    command.set_defaults(run=_export_lora)


def _export_lora(args: argparse.Namespace) -> None:
    from svdtune.lora import export_lora

    print(export_lora(args.delta, args.out, rank=args.rank, base=args.base, format=args.format, prefix=args.prefix,
                      max_rank=args.max_rank, strict=not args.force))


def _merge(args: argparse.Namespace) -> None:
    merge_files(args.base, args.delta, args.out, scale=args.scale, strict=not args.force)
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")


def _combine(args: argparse.Namespace) -> None:
    combine(args.deltas, args.weights).save(args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")


def _inspect(args: argparse.Namespace) -> None:
    for i, path in enumerate(args.files):
        print("\n".join(([""] if i else []) + describe(read_delta(path), path)))


def describe(delta: DeltaFile, path: str) -> list[str]:
    """The lines ``svdtune inspect`` prints for a delta file."""
    lines = [
        f"file      {path} ({os.path.getsize(path):,} bytes)",
        f"format    svdtune delta v{format_version(delta)}, written by svdtune {delta.svdtune_version or '?'}",
        "metadata  " + (", ".join(f"{k}={v}" for k, v in sorted(delta.metadata.items())) or "-"),
        "",
    ]
    header = ("layer", "class", "weight shape", "rank", "mode", "scale", "bytes", "base sha256", "top singular values")
    rows = [
        (name, layer.layer_class, "x".join(map(str, layer.weight_shape)), f"{layer.rank}/{layer.max_rank}", layer.mode,
         f"{layer.scale:g}", f"{layer.delta.numel() * layer.delta.element_size():,}", layer.fingerprint.sha256[:12],
         ", ".join(f"{s:.4g}" for s in layer.fingerprint.top_sigma) + f" ({layer.fingerprint.dtype})")
        for name, layer in delta.layers.items()
    ]
    lines += table_lines(header, rows)
    recorded = [f"{name} {list(run.columns)}" for name, layer in delta.layers.items() for run in layer.fingerprint.basis]
    if recorded:
        lines += ["", "singular vectors recorded for repeated singular values: " + ", ".join(recorded)]
    for title, kind, tensors in (("fully trained parameters:", "parameter", delta.params),
                                 ("buffers of their modules:", "buffer", delta.buffers)):
        if tensors:
            lines += ["", title]
            lines += table_lines((kind, "shape", "dtype", "bytes"), [
                (name, "x".join(map(str, value.shape)) or "scalar", str(value.dtype).removeprefix("torch."),
                 f"{value.numel() * value.element_size():,}") for name, value in tensors.items()
            ])
    return lines
