#!/usr/bin/env bash
# Encodes the whole text corpus (Moby Dick and every State of the Union address in
# data/text/) with lowrank's GPT-2 tokenizer (lowrank-tokenize --print-ids) and with the
# JavaScript GPT-2 encoder of the npm package gpt-3-encoder (data/gpt2/Encoder.js), and
# compares the ids file by file. Prints the files and tokens compared and the mismatches;
# exits 1 on any mismatch.
#
#   bash scripts/check_tokenizer.sh [FILE...]    (default: the whole corpus)
#
# Needs node, the data (bash scripts/setup.sh) and the lowrank-tokenize binary, which it
# builds with the release preset if it is not there (LOWRANK_TOKENIZE=path overrides).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'check_tokenizer: %s\n' "$*"; }

command -v node >/dev/null || { echo "check_tokenizer: node is needed (it runs the reference encoder)" >&2; exit 1; }
if [[ ! -s data/gpt2/Encoder.js || ! -s data/gpt2/encoder.json || ! -s data/gpt2/vocab.bpe || ! -f data/text/.complete ]]; then
    say "fetching the vocabulary and the corpus (scripts/setup.sh)"
    bash scripts/setup.sh
fi

bin="${LOWRANK_TOKENIZE:-build/release/examples/tokenize/lowrank-tokenize}"
if [[ ! -x "$bin" ]]; then
    [[ -z "${LOWRANK_TOKENIZE:-}" ]] || { echo "check_tokenizer: LOWRANK_TOKENIZE=$bin is not an executable" >&2; exit 1; }
    say "building lowrank-tokenize (release preset)"
    cmake --preset release >/dev/null
    cmake --build --preset release --target lowrank-tokenize
fi

if (($#)); then
    files=("$@")
else
    files=(data/text/moby-dick.txt)
    while IFS= read -r f; do files+=("$f"); done < <(find data/text/sotu -name '*.txt' | LC_ALL=C sort)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$bin" --vocab data/gpt2 --print-ids "${files[@]}" > "$tmp/ours.txt" 2> "$tmp/ours.json"
say "lowrank-tokenize: $(cat "$tmp/ours.json")"
status=0
node scripts/check_tokenizer.js data/gpt2/Encoder.js "$tmp/ours.txt" "${files[@]}" > "$tmp/result.txt" || status=$?
grep -v '^{' "$tmp/result.txt" || true
summary="$(grep '^{' "$tmp/result.txt" || true)"
say "reference: $summary"
if ((status == 0)); then
    say "OK: ${#files[@]} files, every id equal to the reference's"
else
    say "FAILED: the ids differ from the reference's (see above)"
fi
exit "$status"
