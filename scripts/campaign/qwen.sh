#!/usr/bin/env bash
# The method-comparison campaign on the embedded Qwen2.5-Coder-0.5B-Instruct (issue 14), step by step, resumable.
#
#   bash scripts/campaign/qwen.sh [STEP ...]        # no STEP: every step in order
#
# Steps (each one runner call per method/budget; rerunning skips what is already in the results folder):
#   passkey4k   passkey at 4k x 5 depths: fullkv, snapkv, pyramidkv, adakv, h2o, streamingllm (C=256)
#   needle4k    needle at 4k x 5 depths, the same six methods at C=256
#   sweep       needle at 4k, snapkv C=64/128/512/1024
#   needle2k    needle at 2k x 5 depths, the six methods at C=256
#   needle8k    needle at 8k x 5 depths, the six methods at C=256
#   ruler       RULER 4k, 13 tasks x 5 samples: fullkv, snapkv, streamingllm at C=512, then adakv, pyramidkv
#   longbench   multifieldqa_zh and multi_news, 20 samples each (prompts middle-truncated to 4096 tokens): fullkv;
#               snapkv, pyramidkv, streamingllm at C=128 and 1024; adakv at C=128
#   passkey     passkey at 2k and 8k x 5 depths, the six methods
#
# Results go under $CAMPAIGN_DIR (default benchmarks/results/qwen2.5-coder-0.5b), one folder per runner, each with
# its run_meta.json. The model runs in bfloat16 with sdpa (2x faster than float32 on this CPU; what GPU runs use).
# Tables and figures: python -m benchmarks.campaign_report.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=qwen2.5-coder-0.5b
OUT="${CAMPAIGN_DIR:-benchmarks/results/$MODEL}"
PYTHON="${PYTHON:-python}"
COMMON=(--model_path "$MODEL" --dtype "${DTYPE:-bfloat16}" --attn_implementation sdpa)
METHODS=(fullkv snapkv pyramidkv adakv h2o streamingllm)
export OMP_WAIT_POLICY=PASSIVE

run() { echo "+ $*" >&2; nice -n "${NICE:-5}" "$PYTHON" "$@"; }

passkey() {  # lengths
    for method in "${METHODS[@]}"; do
        run run_passkey.py "${COMMON[@]}" --method "$method" --max_capacity_prompts 256 --lengths "$1" \
            --depths 0,25,50,75,100 --save_dir "$OUT/passkey"
    done
}

needle() {  # method capacity lengths
    local version="${MODEL}_$1"
    [ "$1" = fullkv ] || version="${version}_$2"
    run run_needle.py "${COMMON[@]}" --method "$1" --max_capacity_prompts "$2" --context_lengths "$3" \
        --depths 0,25,50,75,100 --answer_prefix "The best thing to do in San Francisco is" \
        --model_version "$version" --save_dir "$OUT/needle" --max_new_tokens 32
}

step_passkey4k() { passkey 4096; }
step_passkey() { passkey 2048; passkey 8192; }
needles() { for method in "${METHODS[@]}"; do needle "$method" 256 "$1"; done; }
step_needle4k() { needles 4096; }
step_needle2k() { needles 2048; }
step_needle8k() { needles 8192; }
step_sweep() { for capacity in 64 128 512 1024; do needle snapkv "$capacity" 4096; done; }
# A step's method:budget list can be narrowed (or reordered) with RULER_SPECS / LONGBENCH_SPECS, e.g.
#   RULER_SPECS="fullkv:512 snapkv:512" bash scripts/campaign/qwen.sh ruler
RULER_SPECS="${RULER_SPECS:-fullkv:512 snapkv:512 streamingllm:512 adakv:512 pyramidkv:512}"
LONGBENCH_SPECS="${LONGBENCH_SPECS:-fullkv:128 snapkv:128 pyramidkv:128 streamingllm:128 adakv:128 snapkv:1024 \
pyramidkv:1024 streamingllm:1024}"
step_ruler() {
    for spec in $RULER_SPECS; do
        run run_ruler.py "${COMMON[@]}" --method "${spec%%:*}" --max_capacity_prompts "${spec##*:}" \
            --context_lengths 4096 --num_samples 5 --save_dir "$OUT/ruler"
    done
}
step_longbench() {
    for spec in $LONGBENCH_SPECS; do
        run run_longbench.py "${COMMON[@]}" --method "${spec%%:*}" --max_capacity_prompts "${spec##*:}" \
            --datasets multifieldqa_zh,multi_news --max_num_examples 20 --max_length 4096 --save_dir "$OUT/longbench"
    done
}

ALL_STEPS=(passkey4k needle4k sweep needle2k ruler longbench needle8k passkey)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${ALL_STEPS[@]}")
for step in "${steps[@]}"; do
    declare -F "step_$step" >/dev/null || { echo "unknown step '$step' (accepted: ${ALL_STEPS[*]})" >&2; exit 2; }
    "step_$step"
done
