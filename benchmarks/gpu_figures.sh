#!/usr/bin/env bash
# Every GPU measurement issue 9 asks for, in one run on a lent GPU machine (about 5 minutes on an H100/H200):
#   bash benchmarks/gpu_figures.sh > gpu_figures.txt
# Needs: pip install torch (a CUDA build) && pip install -e ".[test,zoo]" (peft for the LoRA columns).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== train step against full fine-tuning and PEFT LoRA r=16 (bf16; 4096-wide is the issue's goal)"
python benchmarks/train_step.py --device cuda --dtype bfloat16
echo "== one Llama-2-7B block: apply time and peak device memory"
python benchmarks/gpu_block.py --device cuda
echo "== device memory of the memory options (offload_base, cache_weights) against the base and PEFT LoRA r=16"
python benchmarks/memory_options.py --device cuda
echo "== randomized SVD accuracy on the GPU"
python benchmarks/randomized_accuracy.py --device cuda || echo "(randomized_accuracy.py has no --device option)"
