# Sourced by the eval.sh scripts: KVCache-Factory-style optional positional arguments turned into flags.

# An optional argument that is empty, "none" or "None" keeps its default.
is_set() { [ -n "${1:-}" ] && [ "$1" != "none" ] && [ "$1" != "None" ]; }

# positional_flags "NAME ..." FLAG ... -- ARG ...
# Reads the leading ARGs that are not --flags (at most one per FLAG, else exit 2 naming the NAMEs) and sets
#   positional   those ARGs, in order;
#   flag_args    "FLAG VALUE" for each of them that is set;
#   passthrough  the ARGs from the first --flag on, to pass to the runner unchanged.
positional_flags() {
    local names="$1"
    shift
    local flags=()
    while [ "$1" != "--" ]; do
        flags+=("$1")
        shift
    done
    shift
    positional=()
    while [ $# -gt 0 ] && [[ "$1" != --* ]]; do
        positional+=("$1")
        shift
    done
    if [ ${#positional[@]} -gt ${#flags[@]} ]; then
        echo "eval.sh: at most ${#flags[@]} optional positional arguments ($names), got: ${positional[*]}" >&2
        exit 2
    fi
    flag_args=()
    local i
    for i in "${!positional[@]}"; do
        if is_set "${positional[$i]}"; then
            flag_args+=("${flags[$i]}" "${positional[$i]}")
        fi
    done
    passthrough=("$@")
}
