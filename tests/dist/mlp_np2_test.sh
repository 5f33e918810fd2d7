#!/usr/bin/env bash
# mlp_np2_test.sh LOWRANK_MLP WORK_DIR TOLERANCE MPIRUN-COMMAND...: lowrank-mlp on a made-up
# dataset (96 training and 32 test images of 8 x 8 pixels, IDX files written here), once as
# one process and once under MPIRUN-COMMAND (e.g. mpirun --oversubscribe -np 2), with the
# same global batch and seed, dense and with LoRA; passes if the test losses agree to a
# relative TOLERANCE (docs/distributed.md: float sums in another order, a few steps) and
# only process 0 printed a result line.
set -euo pipefail
mlp="$(realpath "$1")" work="$2" tolerance="$3"
shift 3
rm -rf "$work"
mkdir -p "$work"
cd "$work"

python3 - <<'EOF'
import struct
def split(prefix, n):
    with open(f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 8, 8))
        for i in range(n):
            f.write(bytes((i * 7 + p * (i % 10 + 1)) % 256 for p in range(64)))
    with open(f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, n))
        f.write(bytes(i % 10 for i in range(n)))
split("train", 96)
split("t10k", 32)
EOF

for method in dense lora; do
    args=(--data . --epochs 2 --hidden 16 --layers 1 --batch 12 --method "$method" --quiet)
    "$mlp" "${args[@]}" --rank-log "one.$method.ranks" > "one.$method.out"
    "$@" "$mlp" "${args[@]}" --rank-log "many.$method.ranks" > "many.$method.out"
    lines="$(grep -c '^{' "many.$method.out" || true)"
    [[ "$lines" == 1 ]] || { echo "$method: expected one result line (process 0's), got $lines" >&2; exit 1; }
    python3 - "one.$method.out" "many.$method.out" "$tolerance" "$method" <<'EOF'
import json, sys
one, many = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
tol, method = float(sys.argv[3]), sys.argv[4]
assert many["processes"] > 1, f"{method}: the second run had {many['processes']} process(es)"
a, b = one["test_loss"], many["test_loss"]
rel = abs(a - b) / max(abs(a), 1e-30)
print(f"{method}: test_loss {a:.9f} (1 process) vs {b:.9f} ({many['processes']} processes): "
      f"relative difference {rel:.1e}, tolerance {tol:g}")
sys.exit(0 if rel <= tol else 1)
EOF
done
