"""Device memory of svdtune's memory options (`svdtune.set_memory`) against the base model, and the eval
step with the W' cache on and off, in one run.

The model: --blocks Llama-2-7B-shaped blocks (benchmarks/gpu_block.py's seven projections, q/k/v/o
square, gate/up (I, H), down (H, I)), as plain nn.Linear layers divided in width by --divide, every
projection adapted. Configurations: the frozen base; svdtune at full rank (default options), with
offload_base=True, with cache_weights=False, with both; svdtune rank 64, with and without the cache;
PEFT LoRA r=16 (with peft). The models of each rank are decomposed once (on --device) and copied;
each configuration then sets its options and moves to --device, so an offloaded W never reaches it.

Columns, as bytes and as ratios to the base model's weights:
  train held  what a training step keeps on the device besides activations: parameters and buffers,
              factors and deltas, no offloaded W, plus 3 bytes per trainable byte (gradient, AdamW's
              two moments); the base row trains nothing (a forward and backward to the input)
  eval held   the tensors on the device after two no-grad forwards: the same without gradient and
              optimizer, plus the cached W' (the "on device" column of svdtune.report(model).memory)
  eval ms     a no-grad forward of --tokens rows, median of --repeats, the configurations interleaved
On a CPU the "device" bytes are these sums (what an accelerator would hold). With --device cuda, two
more columns give torch.cuda.max_memory_allocated over one training step (forward, backward, AdamW)
and over the eval forwards, above what was allocated before the configuration was built.

Run: PYTHONPATH=. python benchmarks/memory_options.py [--device cuda] [--divide 8 --blocks 2 --tokens 256]
(defaults: on CPU float32, a 1/8-wide block, 2 blocks; on CUDA bfloat16, the full-size block, 1 block)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
import warnings
from collections.abc import Callable
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from svdtune.layers import SpectralLayer
from gpu_block import SHAPES, Block, sync  # the benchmarks beside this one (the script's folder is on sys.path)
from train_step import step_fn

# name -> (rank, set_memory's options)
OPTIONS = {"full rank": (None, {}), "full + offload_base": (None, dict(offload_base=True)),
           "full + cache off": (None, dict(cache_weights=False)),
           "full + offload + cache off": (None, dict(offload_base=True, cache_weights=False)),
           "rank 64": (64, {}), "rank 64 + cache off": (64, dict(cache_weights=False))}


def device_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``model`` keeps on its device: every parameter and buffer except the adapted
    layers' base weights and deltas, plus the adapted layers' own count (which leaves out an offloaded W)."""
    layers = [m for m in model.modules() if isinstance(m, SpectralLayer)]
    counted = {id(t) for layer in layers for t in (*(layer._parameters[p] for p in layer._params()),
                                                    *(layer.spectral_delta(part) for part in layer.spectral_parts()))}
    rest = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()) if id(t) not in counted)
    return rest + (svdtune.report(model).memory.total().on_device if layers else 0)


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def configurations(base: nn.Module, device: torch.device) -> dict[str, Callable[[], nn.Module]]:
    """{name: a function building that configuration on ``device``}; the SVDs of each rank are computed once."""
    adapted = {rank: svdtune.apply(copy.deepcopy(base).to(device), "*", rank=rank, progress=False).cpu()
               for rank in {rank for rank, _ in OPTIONS.values()}}  # templates, on the CPU

    def options(rank: int | None, chosen: dict) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            model = copy.deepcopy(adapted[rank])
            if chosen:
                svdtune.set_memory(model, **chosen)  # before the move: an offloaded W stays in CPU memory
            return model.to(device)
        return make

    configs = {"base (frozen)": lambda: copy.deepcopy(base).to(device)}
    configs.update({name: options(rank, chosen) for name, (rank, chosen) in OPTIONS.items()})
    try:
        import peft
    except ImportError:
        return configs
    lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=list(SHAPES), lora_dropout=0.0)
    configs["PEFT LoRA r=16"] = lambda: peft.get_peft_model(copy.deepcopy(base).to(device), lora)
    return configs


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_since(device: torch.device, before: int) -> int:
    return torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(make: Callable[[], nn.Module], x: torch.Tensor) -> tuple[nn.Module, dict[str, float]]:
    """One configuration, built, trained one step and run twice without grad; its held bytes and device peaks (CUDA)."""
    gc.collect()
    device = x.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = allocated(device)
    reset_peak(device)
    model = make()
    result = {"train held": device_bytes(model) + 3 * trainable_bytes(model)}
    step_fn(model, x, torch.zeros_like(x), F.mse_loss)()  # forward, backward, AdamW (its state kept until here)
    sync(device)
    result["train peak"] = peak_since(device, before)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    reset_peak(device)
    with torch.no_grad():
        model(x)  # builds the cached W' (cache on)
        model(x)
    sync(device)
    result["eval peak"] = peak_since(device, before)
    result["eval held"] = device_bytes(model)
    return model, result


def eval_times(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a no-grad forward per model, interleaved so that drifts in machine load hit each alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in models.items():
                sync(x.device)
                start = time.perf_counter()
                model(x)
                sync(x.device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, else bfloat16")
    parser.add_argument("--divide", type=int, help="divide the block's widths (default: 8 on CPU, 1 elsewhere)")
    parser.add_argument("--blocks", type=int, help="blocks in sequence (default: 2 on CPU, 1 elsewhere)")
    parser.add_argument("--tokens", type=int, default=256, help="rows of each batch")
    parser.add_argument("--repeats", type=int, default=15, help="timed eval forwards per configuration")
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    divide, blocks = args.divide or (8 if cpu else 1), args.blocks or (2 if cpu else 1)
    torch.manual_seed(0)
    base = nn.Sequential(*(Block(divide) for _ in range(blocks))).to(dtype).requires_grad_(False)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    x = torch.randn(args.tokens, base[0].q_proj.in_features, device=device, dtype=dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} threads={torch.get_num_threads()} {dtype}, {blocks} block(s) of "
          f"Llama-2-7B width / {divide}, {weights / 2**20:.0f} MiB of weights, {args.tokens} tokens; "
          f"load average {os.getloadavg()[0]:.1f}")
    columns = ["train held", "eval held"] + ([] if cpu else ["train peak", "eval peak"])
    print(f"{'configuration':<27}" + "".join(f"{c:>19}" for c in columns) + f"{'eval ms':>9}{'x base':>8}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and svdtune's notes about the toy model
        built = {label: measure(make, x) for label, make in configurations(base, device).items()}
    results = {label: result for label, (_, result) in built.items()}
    seconds = eval_times({label: model for label, (model, _) in built.items()}, x, args.repeats)
    for label, result in results.items():
        result["eval s"] = seconds[label]
    base_time = results["base (frozen)"]["eval s"]
    for label, r in results.items():
        cells = "".join(f"{r[c] / 2**20:>9.0f} MiB {r[c] / weights:>5.2f}x" for c in columns)
        print(f"{label:<27}{cells}{1e3 * r['eval s']:>9.1f}{r['eval s'] / base_time:>7.2f}x", flush=True)
    on, off = results["full rank"], results["full + cache off"]
    print(f"eval with the cache off / on: time {off['eval s'] / on['eval s']:.2f}x, held "
          f"{off['eval held'] / on['eval held']:.2f}x" + ("" if cpu else f", peak {off['eval peak'] / on['eval peak']:.2f}x"))


if __name__ == "__main__":
    main()
