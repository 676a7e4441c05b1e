#!/usr/bin/env bash
# Needle-in-a-haystack for one method and budget (KVCache-Factory's scripts/scripts_needle/eval.sh, with arguments).
#
#   bash scripts/needle/eval.sh DEVICES METHOD C [MODEL] [S_LEN] [E_LEN] [STEP] [ATTN] [extra run_needle.py flags...]
#
#   $1 DEVICES  CUDA_VISIBLE_DEVICES (e.g. 0 or 0,1); "cpu" runs on the CPU
#   $2 METHOD   fullkv, snapkv, pyramidkv, streamingllm, h2o, cam, adakv, headkv, ... (python run_needle.py --help)
#   $3 C        max_capacity_prompts, tokens kept per layer and KV head (ignored by fullkv)
#   $4 MODEL    checkpoint folder or smollm2-135m (default smollm2-135m)
#   $5 S_LEN    shortest context length (default 1000)
#   $6 E_LEN    longest context length (default 8000)
#   $7 STEP     length step (default 1000)
#   $8 ATTN     attn_implementation: sdpa (default), eager or flash_attention_2
#   Anything after the 8th argument goes to run_needle.py as is, e.g. --num_depths 6 --eval_batch_size 6 --merge pivot.
#
# Results: results_needle/{model}_{method}_{C}/ (one JSON per cell, run_meta.json, needle_heatmap.png);
# the log: results_needle/logs/{model}_{method}_{C}.log. Rerunning the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage="usage: bash scripts/needle/eval.sh DEVICES METHOD C [MODEL] [S_LEN] [E_LEN] [STEP] [ATTN] [flags...]"
devices=${1:?$usage}
method=${2:?$usage}
capacity=${3:?$usage}
model=${4:-smollm2-135m}
s_len=${5:-1000}
e_len=${6:-8000}
step=${7:-1000}
attn=${8:-sdpa}
shift $(( $# < 8 ? $# : 8 ))

if [[ "$devices" == "cpu" ]]; then
    export CUDA_VISIBLE_DEVICES=""
else
    export CUDA_VISIBLE_DEVICES="$devices"
fi

save_dir=${SAVE_DIR:-results_needle}
mkdir -p "$save_dir/logs"
log="$save_dir/logs/$(basename "${model%/}")_${method}_${capacity}.log"
echo "needle: $method C=$capacity on $model, lengths $s_len..$e_len step $step ($attn, devices '$devices') -> $log"

python run_needle.py \
    --model_path "$model" \
    --method "$method" \
    --max_capacity_prompts "$capacity" \
    --attn_implementation "$attn" \
    --s_len "$s_len" --e_len "$e_len" --step "$step" \
    --save_dir "$save_dir" \
    "$@" 2>&1 | tee "$log"
