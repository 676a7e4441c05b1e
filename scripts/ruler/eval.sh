#!/usr/bin/env bash
# RULER with KV-cache compression, KVCache-Factory's positional order (scripts/scripts_ruler/eval.sh):
#   bash scripts/ruler/eval.sh DEVICES METHOD C [ATTN] [RESULT_PREFIX] [MODEL] [QUANT_METHOD] [NBITS] [extra args...]
#   $1 devices: CUDA_VISIBLE_DEVICES value, or "cpu"      $2 method (comma list allowed: fullkv,snapkv,...)
#   $3 C (max_capacity_prompts)                           $4 attn_implementation (default sdpa)
#   $5 result prefix: results go to ${5}results_ruler      $6 model path (default smollm2-135m)
#   $7 quant_method (omitted if empty/none)               $8 nbits (only with a quant method)
#   anything after $8 goes to run_ruler.py unchanged, e.g. --context_lengths 4096,8192 --num_samples 100
# Environment: CONTEXT_LENGTHS (default 4096), NUM_SAMPLES (default: RULER's 500), TASKS (default all 13),
#   TEMPLATE (default base; chat = the tokenizer's chat template, for instruct models).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"  # relative paths stay relative to the caller's folder
if [ $# -lt 3 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
devices=$1 method=$2 capacity=$3
attn=${4:-sdpa} prefix=${5:-} model=${6:-smollm2-135m} quant=${7:-} nbits=${8:-}
shift $(( $# < 8 ? $# : 8 ))
if [ "$devices" = "cpu" ]; then export CUDA_VISIBLE_DEVICES=""; else export CUDA_VISIBLE_DEVICES="$devices"; fi
args=(--method "$method" --max_capacity_prompts "$capacity" --attn_implementation "$attn" --model_path "$model"
      --save_dir "${prefix}results_ruler" --context_lengths "${CONTEXT_LENGTHS:-4096}" --tasks "${TASKS:-all}"
      --template "${TEMPLATE:-base}")
[ -n "${NUM_SAMPLES:-}" ] && args+=(--num_samples "$NUM_SAMPLES")
case "$quant" in
  ""|none|None) ;;
  *) args+=(--quant_method "$quant"); [ -n "$nbits" ] && args+=(--nbits "$nbits") ;;
esac
exec python "$repo/run_ruler.py" "${args[@]}" "$@"
