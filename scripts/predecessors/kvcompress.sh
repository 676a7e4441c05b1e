#!/usr/bin/env bash
# kvcompress's table (spec §B): eight methods at cache sizes 512 and 1024 (TTFT, TPOT, throughput, PPL, next-token
# accuracy, real KV size) on a PG-essay stream, and its figures (methods at each size, PPL vs KV size, summary heatmap,
# cache efficiency), copied to docs/figures/predecessors_kvcompress_*.png.
# Published on Pythia-2.8B / PG-19 (2,000 tokens, GPU). Small CPU settings here: NUM_EVAL_TOKENS=2000 fed 128 at a
# time; timing on a 1,024-token prompt, 8 new tokens, 1 repeat (noisy on a shared CPU: compare orderings only).
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m benchmarks.kvcompress_table --model_path "${MODEL:-smollm2-135m}" \
  --num_eval_tokens "${NUM_EVAL_TOKENS:-2000}" --sizes "${SIZES:-512,1024}" --chunk "${CHUNK:-128}" \
  --speed_prompt "${SPEED_PROMPT:-1024}" --new_tokens "${NEW_TOKENS:-8}" --repeats "${REPEATS:-1}" \
  --output_dir "${OUT:-results_predecessors}" --figures_dir docs/figures "$@"
