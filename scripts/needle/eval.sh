#!/usr/bin/env bash
# Needle-in-a-haystack for one method at budget C (KVCache-Factory's scripts/scripts_needle/eval.sh, with arguments):
#
#   bash scripts/needle/eval.sh GPUS METHOD C [MODEL_PATH] [S_LEN] [E_LEN] [STEP] [ATTN] [--flag value ...]
#
#   GPUS        CUDA_VISIBLE_DEVICES (e.g. 0 or 0,1); "cpu" hides every GPU
#   METHOD      fullkv, snapkv, pyramidkv, streamingllm, h2o, cam, adakv, headkv, ... (python run_needle.py --help)
#   C           --max_capacity_prompts (tokens kept per layer and KV head; ignored by fullkv)
#   MODEL_PATH  --model_path (default: the embedded smollm2-135m)
#   S_LEN E_LEN STEP  context lengths s_len, s_len + step, ... up to e_len (default 1000 8000 1000)
#   ATTN        --attn_implementation (default sdpa)
#
# An optional argument that is empty, "none" or "None" keeps its default. Everything from the first --flag on is
# passed to run_needle.py unchanged (e.g. --num_depths 6 --eval_batch_size 6 --haystack noise --merge pivot).
# Results: {save_dir}/{model}_{method}_{C}/ (one JSON per cell, run_meta.json, needle_heatmap.png; default save_dir
# results_needle, or $SAVE_DIR); the log goes to {save_dir}/logs/. Rerunning the same command resumes.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
if [ "$1" = "cpu" ]; then
    export CUDA_VISIBLE_DEVICES=""
else
    export CUDA_VISIBLE_DEVICES="$1"
fi
method="$2"
capacity="$3"
shift 3
. "$(dirname "$0")/../positional.sh"
positional_flags "MODEL_PATH S_LEN E_LEN STEP ATTN" --model_path --s_len --e_len --step --attn_implementation -- "$@"
save_dir="${SAVE_DIR:-results_needle}"
args=(--method "$method" --max_capacity_prompts "$capacity" --save_dir "$save_dir" "${flag_args[@]}")

repo="$(cd "$(dirname "$0")/../.." && pwd)"  # relative paths stay relative to the caller's folder
PYTHON="${PYTHON:-python}"
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    args+=(--device_map auto)  # a later --device_map in the extra flags wins
fi
model="${positional[0]:-smollm2-135m}"
is_set "$model" || model=smollm2-135m
mkdir -p "$save_dir/logs"
log="$save_dir/logs/$(basename "${model%/}")_${method}_${capacity}.log"
echo "+ $PYTHON $repo/run_needle.py ${args[*]} ${passthrough[*]} | tee $log" >&2
"$PYTHON" "$repo/run_needle.py" "${args[@]}" "${passthrough[@]}" 2>&1 | tee "$log"
