"""Apply time and peak memory on a Llama-shaped model: svdtune at full rank, rank 64 and 256, PEFT LoRA r=16.

The model is transformers' LlamaModel (no LM head) from a LlamaConfig, built in bfloat16 with random
weights, all seven projections of every block targeted. Default: 4 blocks, hidden 1024, intermediate
2816, 16 heads, vocabulary 32000. ``--full``: 8 blocks, hidden 2048, intermediate 5632, 32 heads.

Each configuration runs in its own subprocess, so its peak RSS (ru_maxrss) is its own: building the
model, then adapting it. Printed: seconds to build the base, seconds to adapt, peak RSS, and peak RSS
as a ratio to the base model's (the base row: building only). Needs transformers; LoRA needs peft.

Run from the repository root: PYTHONPATH=. python benchmarks/apply_scale.py [--full] [--configs base rank64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("base", "full", "rank64", "rank256", "lora16")
SIZES = {"default": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16),
         "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32)}


def build(size: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=32000, **SIZES[size])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no float32 copy in the peak
    try:
        return LlamaModel(config).eval()
    finally:
        torch.set_default_dtype(default)


def adapt(model: torch.nn.Module, name: str) -> torch.nn.Module:
    if name == "lora16":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=PROJECTIONS))
    import svdtune

    rank = {"full": None, "rank64": 64, "rank256": 256}[name]
    return svdtune.apply(model, PROJECTIONS, rank=rank, progress=False)


def run_one(name: str, size: str) -> dict[str, float]:
    start = time.perf_counter()
    model = build(size)
    built = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    if name != "base":
        model = adapt(model, name)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"build_s": built - start, "apply_s": done - built, "peak_rss": peak, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the 8-block, 2048-wide model")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # run in the subprocess
    args = parser.parse_args()
    size = "full" if args.full else "default"
    if args.one:
        print(json.dumps(run_one(args.one, size)))
        return
    configs = ["base", *[c for c in args.configs if c != "base"]]
    results = {}
    for name in configs:
        command = [sys.executable, __file__, "--one", name] + (["--full"] if args.full else [])
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["base"]
    print(f"Llama-shaped LlamaModel, {size} size {SIZES[size]}, bfloat16, {base['params'] / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"{'config':<9} {'build s':>8} {'apply s':>8} {'peak RSS':>10} {'RSS / base':>10}")
    for name, r in results.items():
        print(f"{name:<9} {r['build_s']:>8.1f} {r['apply_s']:>8.2f} {r['peak_rss'] / 2**30:>8.2f} G "
              f"{r['peak_rss'] / base['peak_rss']:>10.2f}")


if __name__ == "__main__":
    main()
