"""Command line of the example: options, then the whole run.

    python -m examples.cnniqa_agiqa [--quick] [--data-root DIR --pretrained PTH] ...
    torchrun --nproc_per_node=2 -m examples.cnniqa_agiqa ...

Every option is described in README.md and in --help.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from examples.cnniqa_agiqa import splits as splitting
from examples.cnniqa_agiqa.config import DEFAULTS, RECIPES, RunConfig, resolve
from examples.cnniqa_agiqa.distributed import DistInfo, setup, teardown
from examples.cnniqa_agiqa.experiment import run_all
from examples.cnniqa_agiqa.progress import say
from examples.cnniqa_agiqa.results import format_table, summarize, write_files
from examples.cnniqa_agiqa.task import Task, load_task
from examples.cnniqa_agiqa.train import SCHEDULES
from examples.cnniqa_agiqa.variants import VARIANTS, parse_variants

__all__ = ["main", "parser", "parse_config"]


def _defaults(key: str) -> str:
    """'(default: A AGIQA-3K, B synthetic, C --quick)' from config.DEFAULTS, for --help."""
    values = {source: DEFAULTS[source][key] for source in ("agiqa", "synthetic", "quick")}
    if values["agiqa"] == values["synthetic"] == values["quick"]:
        return f"(default {values['agiqa']})"
    if key in ("pretrain_epochs", "source_scenes", "target_scenes", "versions", "image_size"):
        return f"(default {values['synthetic']}, {values['quick']} with --quick)"
    return f"(default {values['agiqa']} AGIQA-3K, {values['synthetic']} synthetic, {values['quick']} --quick)"


def parser() -> argparse.ArgumentParser:
    """The argument parser (defaults of None depend on the data source, see config.DEFAULTS)."""
    p = argparse.ArgumentParser(prog="python -m examples.cnniqa_agiqa", description=(
        "Adapt CNNIQA to a new domain by training singular-value deltas (svdtune) and compare with ordinary "
        "fine-tuning. Without --data-root it runs on a built-in SYNTHETIC stand-in."))
    a = p.add_argument
    a("--data-root", help="extracted AGIQA-3K folder (data.csv + images); omit for the synthetic stand-in")
    a("--target", choices=("quality", "align"), default="quality", help="MOS column to predict (default quality)")
    a("--pretrained", help="CNNIQA weights: IQA-PyTorch .pth ({'params': sd}), bare state dict, or .safetensors")
    a("--out", default="runs/cnniqa_agiqa", help="output folder (default runs/cnniqa_agiqa)")
    a("--variants", default="all", help=f"'all' or a comma list of: {', '.join(VARIANTS)} (default all)")
    a("--splits", type=int, help="random prompt-grouped splits " + _defaults("splits"))
    a("--split-ratios", default="0.6,0.2,0.2", help="fractions of prompts for train,val,test (default 0.6,0.2,0.2)")
    a("--split-file", help="use these splits: an earlier run's splits.json, or a published "
      "{'splits': {'1': {'train', 'val'}}} file (its val part becomes test; val is drawn from its train part)")
    a("--seed", type=int, default=0, help="seed of splits, init, crops, dropout and synthetic data (default 0)")
    a("--epochs", type=int, help="epochs per variant and split " + _defaults("epochs"))
    a("--batch-size", type=int, help="batch size per process " + _defaults("batch_size"))
    a("--crop", type=int, help="random training crop side in px " + _defaults("crop"))
    a("--eval-crop", type=int, help="centre crop for val/test in px; 0 = whole image " + _defaults("eval_crop"))
    a("--resize", type=int, help="AGIQA-3K: resize the shorter side to this on load; 0 = keep (default 0; 384 with "
      "--recipe pyiqa)")
    a("--hflip", action="store_true", default=None, help="flip training crops left-right with probability 1/2 "
      "(default off; on with --recipe pyiqa)")
    a("--cache-mb", type=int, help="AGIQA-3K: MiB of decoded images kept in memory, shared by every split and "
      "variant; images beyond it are decoded on every access; 0 = decode on every access (default 4096)")
    a("--recipe", choices=tuple(RECIPES), default="default", help="'pyiqa': IQA-PyTorch's CNNIQA KonIQ-10k recipe "
      "(--resize 384 --crop 384 --hflip --batch-size 64 --epochs 50 --schedule multistep, lr 1e-3 for scratch, "
      "full and head); options given explicitly override it (default: default)")
    a("--lr-scratch", type=float, help="learning rate of scratch " + _defaults("lr_scratch"))
    a("--lr-full", type=float, help="learning rate of full " + _defaults("lr_full"))
    a("--lr-head", type=float, help="learning rate of head " + _defaults("lr_head"))
    a("--lr-svd", type=float, help="learning rate of the svd deltas " + _defaults("lr_svd"))
    a("--svd-mode", choices=("shift", "scale"), help="svdtune.apply mode of the svd variants: shift (SVDiff, "
      "sigma + delta) or scale (sigma * (1 + delta)) (default shift)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    a("--schedule", choices=SCHEDULES, help="learning-rate schedule: cosine to 0 over all steps, constant, or "
      "multistep (x0.5 after epochs 10, 20, 30, 40, as IQA-PyTorch) (default cosine; multistep with --recipe pyiqa)")
    a("--select", choices=("val", "last"), default="val",
      help="checkpoint to test: best validation SRCC (default) or the last epoch")
    a("--pretrain-epochs", type=int, help="synthetic: source-domain pretraining epochs " + _defaults("pretrain_epochs"))
    a("--source-scenes", type=int, help="synthetic: source-domain scenes " + _defaults("source_scenes"))
    a("--target-scenes", type=int, help="synthetic: target scenes, the 'prompts' " + _defaults("target_scenes"))
    a("--versions", type=int, help="synthetic: distorted versions per scene " + _defaults("versions"))
    a("--image-size", type=int, help="synthetic: image side in px " + _defaults("image_size"))
    a("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    a("--workers", type=int, default=0, help="DataLoader workers for AGIQA-3K images (default 0)")
    a("--threads", type=int, help="torch CPU threads, 0 = torch's default " + _defaults("threads"))
    a("--quick", action="store_true", help="small synthetic run (2 splits, 10 epochs, 40 target scenes)")
    a("--quiet", action="store_true", help="no progress bars or status lines; still prints the table, the merge "
      "check and the 'wrote ...' line (stdout), and warnings and errors (stderr)")
    a("--no-plots", action="store_true", help="skip the PNG plots")
    a("--rank-deltas", action="store_true", help="under torchrun: every rank saves its trained tensors to OUT/ranks")
    return p


def parse_config(argv: list[str] | None) -> RunConfig:
    """Parse a command line into a complete RunConfig.

    Args:
        argv: the arguments (sys.argv[1:] when None).

    Returns:
        The configuration, defaults filled for the chosen data source.

    Raises:
        ValueError: a bad --variants, --split-ratios or option combination.
        SystemExit: argparse's own errors and --help.
    """
    args = parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "no_plots"}
    options["plots"] = not args.no_plots
    options["variants"] = parse_variants(args.variants)
    options["split_ratios"] = splitting.parse_ratios(args.split_ratios)
    return resolve(options)


def _splits(task: Task, config: RunConfig, info: DistInfo) -> list[dict[str, list[int]]]:
    """Load or draw the splits, and write them to OUT/splits.json."""
    if config.split_file:
        chosen = splitting.load_splits(config.split_file, task.groups, config.split_ratios, config.seed)
    else:
        chosen = splitting.make_splits(task.groups, config.splits, config.split_ratios, config.seed)
    if info.main:
        splitting.save_splits(Path(config.out) / "splits.json", chosen, task.names, config.seed)
    return chosen


def _report(task: Task, config: RunConfig, outcome) -> None:
    """Print the table and merge check; write results.json/csv and the plots."""
    rows = summarize(outcome, config.variants)
    print(format_table(rows, task.name, task.synthetic))
    if outcome.merge:
        m = outcome.merge
        print(f"merge check ({m['variant']}, split 1, {m['images']} test images): merged plain CNNIQA "
              f"{m['file']} and {m['pth']} vs adapted model, max abs diff {m['max_abs_diff']:.3g}")
    written = write_files(config.out, rows, outcome, config, task.name, task.synthetic)
    if config.plots:
        from examples.cnniqa_agiqa.plots import write_plots

        pngs = write_plots(config.out, rows, outcome, task.name)
        written += pngs or []
        if not pngs:
            print("matplotlib is not installed: plots skipped (pip install matplotlib)")
    print(f"wrote {', '.join(p.name for p in written)} to {config.out} ({outcome.seconds:.0f} s of training)")


def _run(config: RunConfig, info: DistInfo) -> None:
    """Load and check the data, draw the splits, run every variant, report (rank 0)."""
    start = time.perf_counter()
    task = load_task(config, info)
    needs = [v for v in config.variants if VARIANTS[v].pretrained]
    if task.pretrained is None and needs:
        raise ValueError(f"variants {needs} start from pretrained weights: pass --pretrained "
                         "CNNIQA_koniq10k-e6f14c91.pth (README.md) or use --variants scratch")
    chosen = _splits(task, config, info)
    say(f"{task.name}: {len(task.names)} images, {len(set(task.groups))} prompts, {len(chosen)} split(s), "
        f"variants {', '.join(config.variants)}, {info.world} process(es) on {info.device}",
        info.main and not config.quiet)
    outcome = run_all(task, chosen, config, info)
    if info.main:
        _report(task, config, outcome)
        say(f"total {time.perf_counter() - start:.0f} s", not config.quiet)


def _one_line(exc: Exception) -> str:
    """The error as one line: the example's own messages as written; a system OSError with its path and a fix."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return (f"{where}{exc.strerror}; check the paths given to --out, --data-root, --pretrained and --split-file "
                "(they must exist, be readable, and --out writable with free space)")
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """Run the example.

    Args:
        argv: command-line arguments (sys.argv[1:] when None).

    Returns:
        0 on success, 2 on a usage, data or file error (one line on stderr, no traceback).
    """
    threads = torch.get_num_threads()  # restored at the end, for callers that run main() in-process
    try:
        config = parse_config(argv)
        info = setup(config.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        _run(config, info)
    except (OSError, ValueError) as exc:  # SvdtuneError is a ValueError
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        teardown(info)
        torch.set_num_threads(threads)
    return 0
