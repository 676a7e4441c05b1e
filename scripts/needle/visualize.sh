#!/usr/bin/env bash
# Heatmaps of needle runs (KVCache-Factory's scripts/scripts_needle/visualize.py, without hand-edited constants).
#
#   bash scripts/needle/visualize.sh RESULTS_DIR [RESULTS_DIR ...] [--plot_out PNG] [--metric rouge1_f] [--layout vertical]
#
# Writes RESULTS_DIR/needle_heatmap.png for every folder and, with several folders (e.g. the methods of one model),
# one comparison figure (default: needle_comparison.png beside the first folder).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/needle/visualize.sh RESULTS_DIR [RESULTS_DIR ...] [run_needle.py plot flags]" >&2
    exit 2
fi
python "$(dirname "$0")/../../run_needle.py" --plot "$@"
