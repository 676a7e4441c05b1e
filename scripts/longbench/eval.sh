#!/usr/bin/env bash
# LongBench v1 for one method at budget C, with KVCache-Factory's positional arguments:
#
#   bash scripts/longbench/eval.sh GPUS METHOD C [ATTN] [MODEL_PATH] [MERGE] [QUANT_METHOD] [NBITS] [--flag value ...]
#
#   GPUS          CUDA_VISIBLE_DEVICES (ignored on a CPU-only machine)
#   METHOD        fullkv, snapkv, pyramidkv, streamingllm, h2o, ... (python -m kvfactory methods)
#   C             --max_capacity_prompts (tokens kept per layer and KV head)
#   ATTN          --attn_implementation (default sdpa)
#   MODEL_PATH    --model_path (default: the embedded smollm2-135m)
#   MERGE         --merge pivot|weighted
#   QUANT_METHOD  --quant_method, NBITS --nbits
#
# An optional argument that is empty, "none" or "None" keeps its default. Everything from the first --flag on is
# passed to run_longbench.py unchanged (e.g. --datasets multi_news --max_num_examples 5 --data_dir DIR --save_dir DIR).
# Results: {save_dir}/{model}_{C}/{dataset}/{method}.jsonl (default save_dir: results_long_bench); score them with
# scripts/longbench/metrics.sh {save_dir}/{model}_{C}.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
export CUDA_VISIBLE_DEVICES="$1"
method="$2"
capacity="$3"
shift 3
. "$(dirname "$0")/../positional.sh"
positional_flags "ATTN MODEL_PATH MERGE QUANT_METHOD NBITS" \
    --attn_implementation --model_path --merge --quant_method --nbits -- "$@"
args=(--method "$method" --max_capacity_prompts "$capacity" "${flag_args[@]}")

repo="$(cd "$(dirname "$0")/../.." && pwd)"  # relative paths stay relative to the caller's folder
PYTHON="${PYTHON:-python}"
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    args+=(--device_map auto)  # a later --device_map in the extra flags wins
fi
set -x
exec "$PYTHON" "$repo/run_longbench.py" "${args[@]}" "${passthrough[@]}"
