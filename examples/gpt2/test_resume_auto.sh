#!/usr/bin/env bash
# ctest gpt2/resume_auto: --resume takes the run from its checkpoint. A run with --out-dir
# stopped at step 5 continues with `--resume auto --out-dir DIR` and no other flag (every
# setting comes from the checkpoint), and with `--resume DIR` alone, and ends byte-identical
# to the uninterrupted run: evaluation and step lines (all but their timings), the final
# checkpoint and the result line (all but its timings). auto takes the newest complete
# checkpoint (the highest step) and passes over one that does not read; with none it starts
# a new run. A flag given again with another value is refused on one line naming it and
# both values.
#   test_resume_auto.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR [CONFIG]
source "$(dirname "${BASH_SOURCE[0]}")/test_setup.sh" "$@"
fail() { echo "$*" >&2; exit 1; }
data="$PWD/text"
# Settings away from their defaults, so that a default taken instead of the checkpoint's shows
# (--save-every and --keep-last too: the checkpoint keeps them).
common=(--config "$config" --batch 2 --context 16 --steps 12 --eval-every 4 --eval-windows 2 --warmup-steps 2
        --lr 0.002 --seed 7 --threads 1 --data "$data" --method lora --rank 4 --roles attn_qkv,mlp_fc
        --log-every 3 --save-every 2 --keep-last 2)
strip() { sed -E 's/"(tokens_per_second|ms_per_step|flops_per_second|mfu)":[^,}]*//g' "$1"; }
result() {  # the result line without its timings and where it wrote
    tail -n 1 "$1" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
for k in ("tokens_per_second", "train_seconds", "eval_seconds", "wall_seconds", "allreduce_seconds",
          "peak_rss_bytes", "peak_rss_steps_bytes", "rss_before_steps_bytes", "out_dir", "rank_log"):
    r.pop(k, None)
print(json.dumps(r, sort_keys=True))'
}
same_as_whole() {  # same_as_whole DIR OUT WHAT
    diff <(strip whole/metrics.jsonl) <(strip "$1/metrics.jsonl") || fail "$3: the log lines differ"
    cmp whole/checkpoint.safetensors "$1/checkpoint.safetensors" || fail "$3: the final checkpoints differ"
    diff <(result whole.out) <(result "$2") || fail "$3: the result lines differ"
    diff whole/ranks.jsonl "$1/ranks.jsonl" || fail "$3: the rank logs differ"
}

"$gpt2" "${common[@]}" --out-dir whole --quiet > whole.out

# --resume auto --out-dir DIR, nothing else. The checkpoint file is made the step-4 one and a
# step file past it holds no checkpoint: auto must still take step 5's.
"$gpt2" "${common[@]}" --out-dir split --quiet --stop-at 5 > first.out
rm split/checkpoint.safetensors
cp split/checkpoint-step00000004.safetensors split/checkpoint.safetensors
echo "not a checkpoint" > split/checkpoint-step00000006.safetensors
"$gpt2" --resume auto --out-dir split > second.out 2> second.err || { cat second.err >&2; fail "--resume auto failed"; }
grep -q "resuming at step 5" second.err || { cat second.err >&2; fail "--resume auto did not take step 5's checkpoint"; }
grep -q "passes over 'split/checkpoint-step00000006.safetensors'" second.err ||
    { cat second.err >&2; fail "--resume auto did not say it passed over the damaged step file"; }
same_as_whole split second.out "--resume auto --out-dir split"
echo "--resume auto --out-dir split (no other flag) after --stop-at 5: lines, checkpoint, rank log and result identical"

# --resume DIR alone: the newest checkpoint there, and the run goes on writing there.
"$gpt2" "${common[@]}" --out-dir dir --quiet --stop-at 5 > first.out
"$gpt2" --resume dir --quiet > second.out || fail "--resume dir failed"
same_as_whole dir second.out "--resume dir"
echo "--resume dir (no other flag): identical to the uninterrupted run"

# A flag given again with another value: refused before any step, on one line naming it.
refused() {  # refused WANT ARGS...
    local want="$1"
    shift
    local code=0
    "$gpt2" "$@" > refused.out 2> refused.err || code=$?
    [[ "$code" == 2 ]] || { cat refused.err >&2; fail "a resume with $* exited $code, expected 2"; }
    grep -qF -- "$want" refused.err || { cat refused.err >&2; fail "the refusal does not read: $want"; }
    [[ "$(wc -l < refused.err)" == 1 ]] || { cat refused.err >&2; fail "the refusal is not one line"; }
    echo "refused: $(cat refused.err)"
}
refused "--resume: the checkpoint was trained with --steps 12, this command gives --steps 13; use --resume-allow=--steps to change it" \
    --resume dir --steps 13
refused "the checkpoint was trained with --lr 0.002, this command gives --lr 0.001;" --resume auto --out-dir split --lr 0.001
refused "the checkpoint was trained with --method lora, this command gives --method dense;" --resume dir --method dense
refused "the checkpoint was trained with --roles attn_qkv,mlp_fc, this command gives --roles mlp_fc;" \
    --resume dir --roles mlp_fc
# The same value given again is no disagreement; --resume-allow still changes a setting.
"$gpt2" --resume dir --lr 0.002 --steps 13 --resume-allow=--steps --out-dir longer --quiet > longer.out ||
    fail "--resume dir --steps 13 --resume-allow=--steps was refused"
grep -q '"steps":13' longer.out || fail "the run extended with --resume-allow=--steps did not reach step 13"
echo "--resume dir --lr 0.002 --steps 13 --resume-allow=--steps: extended to step 13"

# auto with no checkpoint yet: a new run, as without --resume.
"$gpt2" "${common[@]}" --out-dir fresh --quiet --resume auto > fresh.out 2> fresh.err || fail "--resume auto in a new folder failed"
grep -q "no checkpoint at 'fresh/checkpoint.safetensors' yet, starting a new run" fresh.err ||
    { cat fresh.err >&2; fail "--resume auto in a new folder did not say it starts a new run"; }
same_as_whole fresh fresh.out "--resume auto with no checkpoint"
echo "--resume auto with no checkpoint: a new run, identical to the uninterrupted one"
