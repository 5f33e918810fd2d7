#!/usr/bin/env bash
# ctest gpt2/killed_and_resumed: a run saving after every step is killed (SIGKILL) at random
# points, several times, each time resumed from its last checkpoint (or started again when
# none was written yet), and finally run to its end. It must end exactly where the
# uninterrupted run ends: a byte-identical final checkpoint and rank log, the same
# evaluation lines with each step once, and no temporary file left behind.
#   test_kill.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR [CONFIG]
source "$(dirname "${BASH_SOURCE[0]}")/test_setup.sh" "$@"

common=(--config "$config" --batch 2 --context 16 --steps 20 --eval-every 2 --eval-windows 4 --warmup-steps 2
        --method sst --rank 8 --seed 3 --threads 1 --data text --quiet --sst-iteration-steps 2 --sst-rewarm 1
        --save-every 1)
start=$SECONDS
"$gpt2" "${common[@]}" --log whole.jsonl --save whole.safetensors --rank-log whole.ranks > whole.out
whole_seconds=$((SECONDS - start + 1))

split=(--log split.jsonl --save split.safetensors --rank-log split.ranks)
RANDOM=2026  # the same kill points every time (the run's speed still varies)
for attempt in 1 2 3 4 5 6; do
    args=("${common[@]}" "${split[@]}")
    [[ -f split.safetensors ]] && args+=(--resume split.safetensors)
    "$gpt2" "${args[@]}" > /dev/null 2> attempt.err &
    pid=$!
    # After 5% to 30% of an uninterrupted run's time: a few steps, some while saving.
    sleep "$(awk -v r=$RANDOM -v t="$whole_seconds" 'BEGIN { printf "%.2f", t * (0.05 + 0.25 * r / 32768) }')"
    if kill -9 "$pid" 2> /dev/null; then what="killed"; else what="had finished"; fi
    wait "$pid" 2> /dev/null || true
    echo "attempt $attempt: $what; the log ends at step $(tail -n 1 split.jsonl 2> /dev/null | sed -E 's/.*"step":([0-9]+).*/\1/')" \
         "$(ls *.tmp-* 2> /dev/null | wc -l) temporary file(s)"
done
args=("${common[@]}" "${split[@]}")
[[ -f split.safetensors ]] && args+=(--resume split.safetensors)
"$gpt2" "${args[@]}" > split.out

strip() { sed -E 's/"(tokens_per_second|ms_per_step|flops_per_second|mfu)":[^,}]*//g' "$1"; }  # timings
fail() { echo "after kills and resumes: $*" >&2; exit 1; }
cmp whole.safetensors split.safetensors || fail "the final checkpoint differs from the uninterrupted run's"
cmp whole.ranks split.ranks || fail "the rank log differs from the uninterrupted run's"
diff <(strip whole.jsonl) <(strip split.jsonl) || fail "the evaluation lines differ (or repeat)"
if compgen -G "*.tmp-*" > /dev/null; then fail "temporary files were left: $(echo *.tmp-*)"; fi
echo "killed and resumed: $(wc -l < split.jsonl) evaluation and step lines, each once; final checkpoint and rank log identical; no temporary file left"
