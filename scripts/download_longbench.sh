#!/usr/bin/env bash
# Fetch LongBench v1 (THUDM/LongBench): the 34 test files (21 tasks + 13 LongBench-E splits) of the official
# data.zip, and the config JSONs (prompt templates, generation lengths, model prompt lengths), into data/LongBench/.
#
#   bash scripts/download_longbench.sh [TARGET_DIR]        # default: data/LongBench (git-ignored)
#   bash scripts/download_longbench.sh --link SOURCE_DIR    # no network: symlink data/LongBench to a local copy
#
# Nothing here is committed: the data are third-party (see data/README.md).
set -euo pipefail
caller="$(pwd)"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }  # relative to the caller's folder
cd "$(dirname "$0")/.."

DATA_URL="${LONGBENCH_DATA_URL:-https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip}"
# LongBench v1 lives under LongBench/ of the repository (its root is v2 since 2025).
CONFIG_URL="${LONGBENCH_CONFIG_URL:-https://raw.githubusercontent.com/THUDM/LongBench/main/LongBench/config}"
LINK="${LONGBENCH_LINK:-data/LongBench}"  # where --link points from (tests use another place)
CONFIGS=(dataset2prompt.json dataset2maxlen.json model2maxlen.json)

if [ "${1:-}" = "--link" ]; then
    source_dir="$(absolute "${2:?--link needs a folder with the .jsonl files and config/}")"
    if [ ! -d "$source_dir/config" ]; then
        echo "$source_dir has no config/ folder" >&2
        exit 1
    fi
    source_dir="$(cd "$source_dir" && pwd)"
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
        echo "$LINK exists and is not a link; move it away (or pass --data_dir $source_dir to the runner)" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$LINK")"
    ln -sfn "$source_dir" "$LINK"
    echo "$LINK -> $source_dir ($(ls "$source_dir"/*.jsonl | wc -l) files)"
    exit 0
fi

target="$(absolute "${1:-data/LongBench}")"
[ -n "${1:-}" ] || target="data/LongBench"
fetch() { curl -fL --retry 3 -o "$2.part" "$1" && mv "$2.part" "$2"; }  # no partial or empty file left behind
made_config=no
[ -d "$target/config" ] || made_config=yes
mkdir -p "$target/config"
for name in "${CONFIGS[@]}"; do
    if [ ! -s "$target/config/$name" ] && ! fetch "$CONFIG_URL/$name" "$target/config/$name"; then
        rm -f "$target/config/$name.part"
        [ "$made_config" = yes ] && rmdir "$target/config" 2>/dev/null && rmdir "$target" 2>/dev/null || true
        echo "could not fetch $CONFIG_URL/$name (offline?); nothing was left in $target/config" >&2
        exit 1
    fi
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
