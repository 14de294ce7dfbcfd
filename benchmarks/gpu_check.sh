#!/usr/bin/env bash
# What a session lent a GPU runs, in one go (README, Benchmarks): the CUDA-only tests, then
# bench_generate.py's gpu section (batch-1 rates against transformers eager and static+compiled,
# the share of bandwidth, throughput at batch 1, 4, 16, 64) and its speed section.
# Usage, on the device machine from the repository root:  benchmarks/gpu_check.sh [OUT_DIR]
# It needs only what that machine's image holds (torch, transformers, tokenizers, safetensors, jinja2,
# pytest): Parley runs from the tree, uninstalled. Budget: ~1 min of tests, ~5 min of benchmark.
set -uo pipefail
out=${1:-gpu-check}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
# CUDA-only tests: the captured step's greedy ids against the eager loop's, in bfloat16 and float32
"$python" -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tee "$out/tests.log"
"$python" benchmarks/bench_generate.py --device cuda --sections gpu speed --variants bfloat16 float32 --repeats 3 \
  2>&1 | grep -v "Loading weights\|Writing model" | tee "$out/bench.log"
