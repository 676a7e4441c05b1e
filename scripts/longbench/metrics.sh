#!/usr/bin/env bash
# Score a LongBench results folder: bash scripts/longbench/metrics.sh RESULTS_DIR
# RESULTS_DIR is {save_dir}/{model}_{C}; writes {dataset}/metrics.json per dataset and RESULTS_DIR/results.csv
# (rows = methods, columns = datasets, then the averages), and prints the table.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/longbench/metrics.sh RESULTS_DIR   (e.g. results_long_bench/smollm2-135m_128)" >&2
    exit 2
fi
results_dir="$(cd "$1" && pwd)"
repo="$(cd "$(dirname "$0")/../.." && pwd)"  # relative paths stay relative to the caller's folder
exec "${PYTHON:-python}" "$repo/run_longbench.py" --eval --results_dir "$results_dir"
