#!/usr/bin/env bash
# PIPO vs regular decoding on a CUDA GPU, bf16, side by side in one process: eager and static cache + torch.compile
# (transformers' default CompileConfig: mode="reduce-overhead", i.e. CUDA graphs), on a random-weight backbone with
# the architecture of hub_configs/Qwen3-0.6B-PIPO (no weights are downloaded), 1k- and 8k-token prompts, batch 1.
#
#   bash benchmarks/gpu_bench.sh                 # writes benchmarks/results/bench_generate_gpu.json, prints the table
#   bash benchmarks/gpu_bench.sh --repeats 5     # extra arguments go to benchmarks/bench_generate.py
#
# Random weights: tau<0 commits every draft (2 tokens per backbone step); at the preset's tau (0.95) an untrained
# confidence head commits almost none, so that row brackets the other end.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/bench_generate.py --compiled \
    --hub-config hub_configs/Qwen3-0.6B-PIPO --device cuda --dtype bfloat16 \
    --short 1024 --long 8192 --new-tokens 128 --repeats 3 \
    --out benchmarks/results/bench_generate_gpu.json "$@"
