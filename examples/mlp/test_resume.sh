#!/usr/bin/env bash
# ctest examples/mlp_resume: lowrank-mlp stopped (--stop-at) and resumed (--resume) ends bit
# for bit where the uninterrupted run ends: the same result line (all but its timings), the
# same log lines (all but their timings) and a byte-identical final checkpoint. Stops within
# an epoch and at an epoch's end, for dense, LoRA and InRank (whose ranks change within the
# run); --resume auto and --resume DIR with no other flag; --keep-last; a flag given again
# with another value is refused naming it and both values. On a made-up dataset (96
# training and 32 test images of 8 x 8 pixels, IDX files written here): 8 steps an epoch.
# Given MPIRUN-COMMAND (e.g. mpirun -np 2), a checkpoint written by that many processes
# resumes on one and one written by one resumes on that many, to TOLERANCE (the sums of a
# step in another order: docs/distributed.md).
#   test_resume.sh LOWRANK_MLP WORK_DIR [TOLERANCE MPIRUN-COMMAND...]
set -euo pipefail
mlp="$(realpath "$1")" work="$2"
shift 2
tiny_idx="$(dirname "$(realpath "$0")")/../../tests/data/tiny_idx.py"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
fail() { echo "$*" >&2; exit 1; }

python3 "$tiny_idx"

strip() { sed -E 's/"(seconds|samples_per_second|ms_per_step|flops_per_second|mfu)":[^,}]*//g' "$1"; }
result() {  # the result line without its timings and where it wrote
    tail -n 1 "$1" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
for k in ("train_seconds", "eval_seconds", "wall_seconds", "samples_per_second", "allreduce_seconds",
          "peak_rss_bytes", "peak_rss_steps_bytes", "rss_before_steps_bytes", "rank_log"):
    r.pop(k, None)
print(json.dumps(r, sort_keys=True))'
}
same() {  # same WHOLE_DIR SPLIT_DIR SPLIT_OUT WHAT
    diff <(result "$1.out") <(result "$3") || fail "$4: the result lines differ"
    diff <(strip "$1/metrics.jsonl") <(strip "$2/metrics.jsonl") || fail "$4: the log lines differ"
    cmp "$1/checkpoint.safetensors" "$2/checkpoint.safetensors" || fail "$4: the final checkpoints differ"
}

data="$PWD"
for method in dense lora inrank; do
    common=(--data "$data" --epochs 3 --hidden 16 --layers 2 --batch 12 --warmup-steps 4 --seed 5 --threads 1
            --method "$method" --rank 4 --log-every 3 --save-every 2 --keep-last 2 --quiet
            --inrank-warmup 2 --inrank-gap 2 --inrank-stage1-steps 12)
    "$mlp" "${common[@]}" --out-dir "whole-$method" > "whole-$method.out"
    # Within the second epoch (step 11 of 24), and at the first epoch's end (step 8).
    for stop in 11 8; do
        dir="split-$method-$stop"
        "$mlp" "${common[@]}" --out-dir "$dir" --stop-at "$stop" > first.out
        "$mlp" "${common[@]}" --out-dir "$dir" --resume "$dir/checkpoint.safetensors" > "$dir.out"
        same "whole-$method" "$dir" "$dir.out" "$method, stopped at step $stop"
    done
    echo "$method: stopped at step 11 (mid-epoch) and 8 (an epoch's end) and resumed: result, log and checkpoint identical"
done

# --resume auto --out-dir DIR and --resume DIR, no other flag; --save-every 2 and --keep-last 2
# come from the checkpoint too.
method=lora
common=(--data "$data" --epochs 3 --hidden 16 --layers 2 --batch 12 --warmup-steps 4 --seed 5 --threads 1
        --method "$method" --rank 4 --log-every 3 --save-every 2 --keep-last 2 --quiet
        --inrank-warmup 2 --inrank-gap 2 --inrank-stage1-steps 12)
"$mlp" "${common[@]}" --out-dir auto --stop-at 13 > first.out
got="$(cd auto && ls | tr '\n' ' ')"
want="checkpoint-step00000012.safetensors checkpoint-step00000013.safetensors checkpoint.safetensors metrics.jsonl ranks.jsonl result.json "
[[ "$got" == "$want" ]] || fail "--keep-last 2: expected $want, got $got"
"$mlp" --resume auto --out-dir auto > auto.out
same "whole-$method" auto auto.out "--resume auto --out-dir auto"
[[ "$(cd auto && ls checkpoint-step* | tr '\n' ' ')" == "checkpoint-step00000022.safetensors checkpoint-step00000024.safetensors " ]] ||
    fail "--resume auto did not keep --keep-last 2 --save-every 2: $(ls auto)"
"$mlp" "${common[@]}" --out-dir dir --stop-at 5 > first.out
"$mlp" --resume dir > dir.out
same "whole-$method" dir dir.out "--resume dir"
echo "--resume auto --out-dir auto (with --keep-last 2) and --resume dir, no other flag: identical"

# A flag given again with another value: refused on one line naming it and both values.
code=0
"$mlp" --resume dir --hidden 32 > refused.out 2> refused.err || code=$?
[[ "$code" == 2 ]] || { cat refused.err >&2; fail "a resume with --hidden changed exited $code, expected 2"; }
grep -qF -- "--resume: the checkpoint was trained with --hidden 16, this command gives --hidden 32;" refused.err ||
    { cat refused.err >&2; fail "the refusal does not name --hidden and both values"; }
echo "refused: $(cat refused.err)"
"$mlp" --resume dir --epochs 4 --resume-allow=--epochs --out-dir longer > longer.out ||
    fail "--resume dir --epochs 4 --resume-allow=--epochs was refused"
grep -q '"steps":32' longer.out || fail "the run extended to 4 epochs did not reach step 32"
echo "--resume dir --epochs 4 --resume-allow=--epochs: extended to step 32"

# Across process counts: stopped under MPIRUN-COMMAND and resumed as one process, and back.
if [[ $# -gt 1 ]]; then
    tolerance="$1"
    shift
    "$@" "$mlp" "${common[@]}" --out-dir many --stop-at 11 > first.out
    "$mlp" --resume many > many.out
    "$mlp" "${common[@]}" --out-dir one --stop-at 11 > first.out
    "$@" "$mlp" --resume one > one.out
    for out in many.out one.out; do
        python3 - "whole-$method.out" "$out" "$tolerance" <<'PY'
import json, sys
whole, split = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
a, b, tol = whole["test_loss"], split["test_loss"], float(sys.argv[3])
assert whole["steps"] == split["steps"], (whole["steps"], split["steps"])
rel = abs(a - b) / max(abs(a), 1e-30)
print(f"{sys.argv[2]}: test_loss {b:.9f} against {a:.9f} uninterrupted: relative difference {rel:.1e}")
assert rel <= tol, f"beyond the tolerance {tol:g}"
PY
    done
    [[ "$(grep -c '^{' one.out)" == 1 ]] || fail "the resume under MPI printed $(grep -c '^{' one.out) result lines, expected one"
    echo "a checkpoint of several processes resumed on one, and of one on several: within $tolerance"
fi
