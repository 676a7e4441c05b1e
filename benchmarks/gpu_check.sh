#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): random-weight Llama-3-8B / Qwen2-7B / Mistral-7B shapes
# in bf16 on CUDA, fullkv parity, each method's prefill / TPOT / memory / batch throughput against FullKV, split
# device maps; prints a table and writes results_gpu_check/gpu_check.csv. `--tiny` runs tiny configs on CPU (CI).
# Other arguments pass through: bash benchmarks/gpu_check.sh --context_lengths 8192 --models llama-3-8b
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m benchmarks.gpu_check "$@"
