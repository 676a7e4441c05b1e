#!/usr/bin/env bash
# The streaming project's table (accelerated_inference, spec §C): streaming PPL over PG essays with bounded caches,
# positions inside the cache (position_shift) for every streaming mode, plus the chunked FullKV baseline (512).
#   baseline 512-chunk | streamingllm 4+252 | h2o 4+128 heavy+252 | lazy_h2o (k=10) | sepllm 4+64 sep+256 | unified
# Published on Pythia-2.8B / PG-19 (~59k tokens, token by token). Defaults here are small CPU settings:
# NUM_EVAL_TOKENS=1024 fed CHUNK=4 tokens per step (the cache holds at most C + 3 between evictions).
# Usage: scripts/predecessors/streaming.sh [extra run_ppl.py streaming flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-smollm2-135m}
NUM_EVAL_TOKENS=${NUM_EVAL_TOKENS:-1024}
CHUNK=${CHUNK:-4}
OUT=${OUT:-results_predecessors}
python run_ppl.py streaming --model_path "$MODEL" --output_dir "$OUT" \
  --num_eval_tokens "$NUM_EVAL_TOKENS" --chunk_size "$CHUNK" --fullkv_chunk_size 64 --baseline_window 512 \
  --methods fullkv \
    "streamingllm:max_capacity_prompt=256,sink_size=4,decode_budget=256,position_shift=true@streamingllm(4+252)" \
    "lazy_h2o:compress_interval=1,position_shift=true@h2o(4+128+252)" \
    "lazy_h2o:position_shift=true@lazy_h2o(k=10)" \
    "sepllm:position_shift=true@sepllm(4+64+256)" \
    "unified:position_shift=true@unified(4+64+128+256)" \
  "$@"
