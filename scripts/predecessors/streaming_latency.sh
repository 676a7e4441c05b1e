#!/usr/bin/env bash
# The streaming project's latency figure (spec §C): decode latency (TPOT) against the context length, 512 to 4k, for
# baseline (fullkv), streamingllm (4+252), h2o (4+128 heavy+252) and lazy_h2o (k=10), caches held while decoding.
# Published: 128 decode tokens on an RTX 4090. Small CPU settings: NEW_TOKENS=16, 1 repeat (noisy on a shared CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
python run_speed.py --model_path "${MODEL:-smollm2-135m}" --context_lengths "${LENGTHS:-512,1024,2048,4096}" \
  --new_tokens "${NEW_TOKENS:-16}" --repeats "${REPEATS:-1}" --warmup 1 --output_dir "${OUT:-results_predecessors}" \
  --methods fullkv \
    "streamingllm:max_capacity_prompt=256,sink_size=4,decode_budget=256,position_shift=true@streamingllm(4+252)" \
    "lazy_h2o:compress_interval=1,position_shift=true@h2o(4+128+252)" \
    "lazy_h2o:position_shift=true@lazy_h2o(k=10)" \
  "$@"
