#!/usr/bin/env bash
# Passkey and needle (5 depths each) for the methods of issue 17, with fullkv and snapkv as references, on an
# embedded model; resumable (each runner skips what its results folder already holds).
#
#   bash benchmarks/frontier_needle_passkey.sh smollm2   # SmolLM2-135M, 1k tokens, C=128 (float32, the default)
#   bash benchmarks/frontier_needle_passkey.sh qwen      # Qwen2.5-Coder-0.5B, 2k tokens, C=256 (bfloat16, sdpa)
#
# C is 1/8 of the prompt in both. METHODS="tova kvzip" narrows the list, DEPTHS=50 the depths (default 0,25,50,75,100).
# Results: benchmarks/results/methods/<model>/.
# Tables: python -m benchmarks.frontier_needle_passkey_table.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    smollm2) MODEL=smollm2-135m; LENGTH=1024; NEEDLE_LENGTH=1000; C=128; COMMON=(--model_path "$MODEL") ;;
    qwen) MODEL=qwen2.5-coder-0.5b; LENGTH=2048; NEEDLE_LENGTH=2000; C=256
          COMMON=(--model_path "$MODEL" --dtype bfloat16 --attn_implementation sdpa) ;;
    *) echo "usage: $0 smollm2|qwen" >&2; exit 2 ;;
esac
OUT="${OUT:-benchmarks/results/methods/$MODEL}"
DEPTHS="${DEPTHS:-0,25,50,75,100}"
METHODS=(${METHODS:-fullkv snapkv tova expected_attention kvzip duo_attention criticalkv keydiff think quest chunkkv
simlayerkv})
export OMP_WAIT_POLICY=PASSIVE
run() { echo "+ $*" >&2; nice -n "${NICE:-15}" "${PYTHON:-python}" "$@"; }
for method in "${METHODS[@]}"; do  # every passkey first (the shorter answers), then every needle
    run run_passkey.py "${COMMON[@]}" --method "$method" --max_capacity_prompts "$C" --lengths "$LENGTH" \
        --depths "$DEPTHS" --save_dir "$OUT/passkey"
done
for method in "${METHODS[@]}"; do
    version="${MODEL}_${method}"
    [ "$method" = fullkv ] || version="${version}_$C"
    run run_needle.py "${COMMON[@]}" --method "$method" --max_capacity_prompts "$C" --context_lengths "$NEEDLE_LENGTH" \
        --depths "$DEPTHS" --model_version "$version" --save_dir "$OUT/needle" --max_new_tokens 32 --no_plot
done
