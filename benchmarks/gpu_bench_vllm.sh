#!/usr/bin/env bash
# vLLM-PIPO vs vLLM regular decoding on one CUDA GPU, bf16, side by side in one process (benchmarks/bench_vllm.py):
# a random-weight Qwen3-style backbone of about 1.5B parameters (28 x 2048), 64 concurrent requests, 512-token
# prompts, 512 new tokens. Needs `pip install vllm==0.32.*` then `pip install -e .` (README "Serving with vLLM").
#
#   bash benchmarks/gpu_bench_vllm.sh                 # writes benchmarks/results/vllm_gpu.json, prints the table
#   bash benchmarks/gpu_bench_vllm.sh --batch 8       # extra arguments go to benchmarks/bench_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_bench_vllm.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
import vllm
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, vLLM {vllm.__version__}")
PY
exec python benchmarks/bench_vllm.py --device cuda --dtype bfloat16 --layers 28 --hidden 2048 --intermediate 6144 \
    --heads 16 --kv-heads 8 --vocab 151936 --batch 64 --prompt-len 512 --max-tokens 512 --repeats 3 \
    --kv-cache-gib 16 --output benchmarks/results/vllm_gpu.json "$@"
