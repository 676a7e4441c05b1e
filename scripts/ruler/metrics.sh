#!/usr/bin/env bash
# Score a RULER run folder (KVCache-Factory's scripts/scripts_ruler/metrics.sh order):
#   bash scripts/ruler/metrics.sh RESULTS_DIR     e.g. results_ruler/smollm2-135m_128
# Writes {length}/{task}/metrics.json and RESULTS_DIR/results.csv, prints the table.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"  # relative paths stay relative to the caller's folder
if [ $# -ne 1 ]; then
  sed -n '2,4p' "$0" >&2
  exit 2
fi
exec python "$repo/run_ruler.py" --eval --results_dir "$1"
