#!/usr/bin/env bash
# ctest examples/mlp: lowrank-mlp end to end on a made-up dataset written here as IDX files
# (64 training and 16 test images of 8 x 8 pixels, each pixel its label times 25), dense and
# with LoRA, two epochs each, each ending with its JSON result line; --log-every 3 puts a
# "kind": "step" line in --log every 3 steps beside the epochs' "kind": "eval" lines. Under
# the asan preset this runs the program with the sanitizers.
#   test_smoke.sh LOWRANK_MLP WORK_DIR
set -euo pipefail
mlp="$(realpath "$1")" work="$2"
rm -rf "$work"
mkdir -p "$work"
cd "$work"

bytes() {  # bytes B...: the bytes with these values
    local out="" b e
    for b in "$@"; do printf -v e '\\x%02x' "$b"; out+="$e"; done
    printf '%b' "$out"
}
be32() { bytes $(($1 >> 24 & 255)) $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }
split() {  # split PREFIX COUNT: PREFIX-images-idx3-ubyte and PREFIX-labels-idx1-ubyte
    local i p labels=()
    {
        bytes 0 0 8 3; be32 "$2"; be32 8; be32 8
        for ((i = 0; i < $2; ++i)); do
            local pixels=()
            for ((p = 0; p < 64; ++p)); do pixels+=($((i % 10 * 25))); done
            bytes "${pixels[@]}"
        done
    } > "$1-images-idx3-ubyte"
    for ((i = 0; i < $2; ++i)); do labels+=($((i % 10))); done
    { bytes 0 0 8 1; be32 "$2"; bytes "${labels[@]}"; } > "$1-labels-idx1-ubyte"
}
split train 64
split t10k 16

for method in dense lora; do
    "$mlp" --data . --epochs 2 --hidden 16 --layers 1 --batch 16 --threads 1 --method "$method" --quiet > "$method.out"
    last="$(tail -n 1 "$method.out")"
    [[ "$last" == "{"*"}" ]] || { echo "$method: the last line is not a JSON object: $last" >&2; exit 1; }
    echo "$method: $(head -c 160 <<< "$last")"
done

# 4 steps an epoch, 8 in all: step lines at 3 and 6 (samples/s, finite gradient norm, MFU),
# evaluation lines at the two epochs' ends (steps 4 and 8); stderr holds the two lines.
"$mlp" --data . --epochs 2 --hidden 16 --layers 1 --batch 16 --threads 1 --log-every 3 --log metrics.jsonl \
    > every.out 2> every.err
python3 - metrics.jsonl <<'PY' || { echo "--log-every: the log's step lines are wrong (above)" >&2; exit 1; }
import json, math, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
steps = [l["step"] for l in lines if l.get("kind") == "step"]
evals = [l["step"] for l in lines if l.get("kind") == "eval"]
assert steps == [3, 6] and evals == [4, 8] and len(lines) == 4, lines
for l in lines[:1]:
    for key in ("train_loss", "grad_norm", "lr", "ms_per_step", "samples_per_second", "mfu"):
        assert isinstance(l.get(key), (int, float)) and math.isfinite(l[key]) and l[key] > 0, (key, l)
print(f"--log-every 3: step lines at {steps}, evaluation lines at {evals}")
PY
[[ "$(grep -c '^step .* grad_norm .* samples/s  MFU ' every.err)" == 2 ]] ||
    { cat every.err >&2; echo "--log-every 3: stderr does not hold 2 step lines" >&2; exit 1; }

# --out-dir from an empty working folder: the log, the rank log, the checkpoint and the result
# in it only.
mkdir empty && cd empty
"$mlp" --data .. --epochs 1 --hidden 16 --layers 1 --batch 16 --threads 1 --method lora --quiet --out-dir run > ../outdir.out
cd ..
outside="$(cd empty && find . -path ./run -prune -o -type f -print)"
[[ -z "$outside" ]] || { echo "--out-dir: files written outside it: $outside" >&2; exit 1; }
got="$(cd empty/run && ls | tr '\n' ' ')"
[[ "$got" == "checkpoint.safetensors metrics.jsonl ranks.jsonl result.json " ]] || { echo "--out-dir: got $got" >&2; exit 1; }
echo "--out-dir run from an empty folder: only run/ written: $got"
