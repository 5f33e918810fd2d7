#!/usr/bin/env bash
# Prepares the GPT-2 training text: fetches the vocabulary and the corpus (scripts/setup.sh),
# builds lowrank-tokenize (release preset, that target only) and tokenizes Moby Dick and
# every State of the Union address into
#
#   data/text/corpus.train.bin         data/text/corpus.val.bin         (GPT-2 BPE ids)
#   data/text/corpus-bytes.train.bin   data/text/corpus-bytes.val.bin   (one id per byte)
#
# as little-endian uint16 ids, with the last 10% of each document's tokens as validation
# data (VAL_FRACTION=x changes it). Does nothing more for a pair of files newer than every
# input, the vocabulary and the binary; --force redoes them. The summary JSON lines are kept
# in data/text/corpus.json and data/text/corpus-bytes.json.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'prepare_text: %s\n' "$*"; }
force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "prepare_text: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

bash scripts/setup.sh

say "building lowrank-tokenize (release preset)"
cmake --preset release >/dev/null
cmake --build --preset release --target lowrank-tokenize
bin=build/release/examples/tokenize/lowrank-tokenize

inputs=(data/text/moby-dick.txt)
while IFS= read -r f; do inputs+=("$f"); done < <(find data/text/sotu -name '*.txt' | LC_ALL=C sort)
# make_stream PREFIX [lowrank-tokenize options]: PREFIX.{train,val}.bin unless up to date.
make_stream() {
    local prefix="$1"
    shift
    local outputs=("$prefix.train.bin" "$prefix.val.bin") up_to_date=$((!force)) out dep
    for out in "${outputs[@]}"; do
        [[ -f "$out" ]] || up_to_date=0
    done
    if ((up_to_date)); then
        for dep in "${inputs[@]}" data/gpt2/encoder.json data/gpt2/vocab.bpe "$bin"; do
            for out in "${outputs[@]}"; do
                [[ "$out" -nt "$dep" ]] || up_to_date=0
            done
        done
    fi
    if ((up_to_date)); then
        say "${outputs[*]} are up to date ($(cat "$prefix.json" 2>/dev/null || echo 'no summary'))"
        return 0
    fi
    say "tokenizing ${#inputs[@]} files into $prefix.{train,val}.bin"
    "$bin" "$@" --out "$prefix" --val-fraction "${VAL_FRACTION:-0.1}" "${inputs[@]}" | tee "$prefix.json"
}
make_stream data/text/corpus --vocab data/gpt2
make_stream data/text/corpus-bytes --bytes
