#!/usr/bin/env bash
# Fetch LongBench v1 (THUDM/LongBench): the 34 test files (21 tasks + 13 LongBench-E splits) of the official
# data.zip, and the config JSONs (prompt templates, generation lengths, model prompt lengths), into data/LongBench/.
#
#   bash scripts/download_longbench.sh [TARGET_DIR]        # default: data/LongBench (git-ignored)
#   bash scripts/download_longbench.sh --link SOURCE_DIR    # no network: symlink data/LongBench to a local copy
#
# Nothing here is committed: the data are third-party (see data/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_URL="https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
# LongBench v1 lives under LongBench/ of the repository (its root is v2 since 2025).
CONFIG_URL="https://raw.githubusercontent.com/THUDM/LongBench/main/LongBench/config"
CONFIGS=(dataset2prompt.json dataset2maxlen.json model2maxlen.json)

if [ "${1:-}" = "--link" ]; then
    source_dir="$(cd "${2:?--link needs a folder with the .jsonl files and config/}" && pwd)"
    if [ ! -d "$source_dir/config" ]; then
        echo "$source_dir has no config/ folder" >&2
        exit 1
    fi
    mkdir -p data
    ln -sfn "$source_dir" data/LongBench
    echo "data/LongBench -> $source_dir ($(ls "$source_dir"/*.jsonl | wc -l) files)"
    exit 0
fi

target="${1:-data/LongBench}"
mkdir -p "$target/config"
fetch() { curl -fL --retry 3 -o "$2" "$1"; }

for name in "${CONFIGS[@]}"; do
    [ -s "$target/config/$name" ] || fetch "$CONFIG_URL/$name" "$target/config/$name"
done

if ls "$target"/*.jsonl >/dev/null 2>&1; then
    echo "$target already has $(ls "$target"/*.jsonl | wc -l) .jsonl files; delete them to fetch again"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    fetch "$DATA_URL" "$tmp/data.zip"
    unzip -q "$tmp/data.zip" -d "$tmp"
    mv "$tmp"/data/*.jsonl "$target"/
fi

count="$(ls "$target"/*.jsonl | wc -l)"
echo "$target: $count .jsonl files (expected 34), config: $(ls "$target/config" | tr '\n' ' ')"
[ "$count" -eq 34 ] || { echo "warning: expected 34 files (21 tasks + 13 *_e)" >&2; exit 1; }
