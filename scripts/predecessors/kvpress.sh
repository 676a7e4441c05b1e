#!/usr/bin/env bash
# The KVPress-style experiment (spec §A): suffix PPL (max_length 1024, prefix_ratio 0.5: the first 512 tokens
# compressed, the last 512 scored) and timing for knorm, snapkv, streamingllm and lagkv at compression ratios
# 0.1/0.3/0.5/0.7 -- kvpress's convention: the share REMOVED (--budget_unit compression_ratio: knorm and lagkv take
# compression_ratio as is; snapkv and streamingllm keep 1 - r of the prefix). Baseline (fullkv) first. One CSV/JSON
# per dataset ({model}_{dataset}_kv_metrics), a combined CSV when several datasets run, PPL/time plots.
# Published on Pythia-70M / WikiText-2 + PG-19 (GPU). Small CPU settings: DATASETS=pg_essays (WikiText-2 and PG-19 need
# the network: DATASETS=pg_essays,wikitext-2-raw-v1,pg19 online), MAX_WINDOWS=2, 8 new tokens, 1 repeat.
set -euo pipefail
cd "$(dirname "$0")/../.."
python run_ppl.py grid --model_path "${MODEL:-smollm2-135m}" --datasets "${DATASETS:-pg_essays}" \
  --methods knorm,snapkv,streamingllm,lagkv --budgets 0.1,0.3,0.5,0.7 --budget_unit compression_ratio \
  --max_length 1024 --prefix_ratio 0.5 --max_windows "${MAX_WINDOWS:-2}" \
  --new_tokens "${NEW_TOKENS:-8}" --repeats "${REPEATS:-1}" --warmup 1 --time_metric tpot_seconds \
  --output_dir "${OUT:-results_predecessors}" "$@"
