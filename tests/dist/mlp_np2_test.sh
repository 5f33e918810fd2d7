#!/usr/bin/env bash
# mlp_np2_test.sh LOWRANK_MLP WORK_DIR TOLERANCE MPIRUN-COMMAND...: lowrank-mlp on a made-up
# dataset (96 training and 32 test images of 8 x 8 pixels, IDX files written here), once as
# one process and once under MPIRUN-COMMAND (e.g. mpirun --oversubscribe -np 2), with the
# same global batch and seed, for every method (each with options that make it decide within
# the run's 16 steps); passes if the test losses agree to a relative TOLERANCE
# (docs/distributed.md: float sums in another order, a few steps), the rank logs hold the
# same decisions (step, layer, event, ranks), and only process 0 printed a result line.
# Then a --batch that leaves a process no sample of the last batch is refused, naming it.
set -euo pipefail
mlp="$(realpath "$1")" work="$2" tolerance="$3"
shift 3
tiny_idx="$(dirname "$(realpath "$0")")/../data/tiny_idx.py"
rm -rf "$work"
mkdir -p "$work"
cd "$work"

python3 "$tiny_idx"

declare -A options=(
    [dense]="" [lora]="" [galore]="--galore-gap 4" [deeplora]=""
    [relora]="--relora-period 5 --relora-rewarm 1"
    [inrank]="--inrank-warmup 2 --inrank-gap 2 --inrank-stage1-steps 8"
    [cuttlefish]="--cuttlefish-window 2 --cuttlefish-tail 1 --cuttlefish-track-steps 2 --cuttlefish-threshold 1e9 --cuttlefish-min-speedup 1e-6"
    [sst]="--sst-iteration-steps 2 --sst-round-iterations 2 --sst-rewarm 1"
)
for method in dense lora relora inrank cuttlefish sst deeplora galore; do
    # shellcheck disable=SC2206  # the options are words
    args=(--data . --epochs 2 --hidden 16 --layers 1 --batch 12 --method "$method" --quiet ${options[$method]})
    "$mlp" "${args[@]}" --rank-log "one.$method.ranks" > "one.$method.out"
    "$@" "$mlp" "${args[@]}" --rank-log "many.$method.ranks" > "many.$method.out"
    lines="$(grep -c '^{' "many.$method.out" || true)"
    [[ "$lines" == 1 ]] || { echo "$method: expected one result line (process 0's), got $lines" >&2; exit 1; }
    python3 - "one.$method.out" "many.$method.out" "$tolerance" "$method" <<'EOF'
import json, os, sys
one, many = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
tol, method = float(sys.argv[3]), sys.argv[4]
assert many["processes"] > 1, f"{method}: the second run had {many['processes']} process(es)"
a, b = one["test_loss"], many["test_loss"]
rel = abs(a - b) / max(abs(a), 1e-30)
print(f"{method}: test_loss {a:.9f} (1 process) vs {b:.9f} ({many['processes']} processes): "
      f"relative difference {rel:.1e}, tolerance {tol:g}")
def decisions(path):
    if not os.path.exists(path):
        return []
    keys = ("step", "layer", "event", "old_rank", "new_rank")
    return [tuple(e.get(k) for k in keys) for e in map(json.loads, open(path).read().splitlines())]
d1, d2 = decisions(f"one.{method}.ranks"), decisions(f"many.{method}.ranks")
acts = {"relora": "restart", "inrank": "grow", "cuttlefish": "switch", "sst": "resvd", "galore": "refresh"}
if method in acts and not any(e[2] == acts[method] for e in d1):
    sys.exit(f"{method}: the run took no '{acts[method]}' decision, so the comparison shows nothing")
if d1 != d2:
    first = next((i for i, (x, y) in enumerate(zip(d1, d2)) if x != y), min(len(d1), len(d2)))
    sys.exit(f"{method}: rank decision {first} differs: {d1[first:first+1]} (1 process) vs {d2[first:first+1]}")
print(f"{method}: the same {len(d1)} rank events")
sys.exit(0 if rel <= tol else 1)
EOF
done

# 96 samples in batches of 19 leave 1 for the last batch: too few for 2 processes.
if "$@" "$mlp" --data . --epochs 1 --hidden 16 --layers 1 --batch 19 --quiet > refused.out 2> refused.err; then
    echo "--batch 19 over 96 samples was not refused under mpirun" >&2
    exit 1
fi
grep -q -- "--batch 19 over 96 training samples leaves 1 in the last batch" refused.err ||
    { echo "the refusal does not name the last batch:" >&2; cat refused.err >&2; exit 1; }
echo "a last batch of 1 sample for 2 processes is refused"
