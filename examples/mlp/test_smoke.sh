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

# The options behind the defaults' measurements (docs/methods/): each runs, each refuses a
# value out of its range
# before training (a nonzero exit and the option's name on stderr).
common=(--data . --epochs 2 --hidden 16 --layers 1 --batch 16 --threads 1 --quiet)
for spec in "--method lora --lora-freeze-bias" "--method relora --relora-period 3 --relora-rewarm 1 --relora-state-reset 0.9" \
    "--method inrank --inrank-zero-bias --inrank-stage1-epochs 0 --inrank-warmup 1 --inrank-gap 2" \
    "--method cuttlefish --cuttlefish-track-steps 1 --cuttlefish-rewarm 4 --cuttlefish-rewarm-start 0.25" \
    "--method galore --adam-eps 1e-6"; do
    # shellcheck disable=SC2086
    last="$("$mlp" "${common[@]}" $spec | tail -n 1)"
    [[ "$last" == "{"*"}" ]] || { echo "$spec: the last line is not a JSON object: $last" >&2; exit 1; }
done
python3 - "$mlp" <<'PY' || { echo "the new options' values out of range were not refused (above)" >&2; exit 1; }
import subprocess, sys
common = ["--data", ".", "--epochs", "1", "--hidden", "16", "--layers", "1", "--batch", "16", "--quiet"]
for bad in (["--method", "relora", "--relora-state-reset", "1.5"], ["--method", "relora", "--relora-state-reset", "-0.1"],
            ["--method", "cuttlefish", "--cuttlefish-rewarm-start", "1"],
            ["--method", "cuttlefish", "--cuttlefish-rewarm", "-1"], ["--adam-eps", "0"]):
    p = subprocess.run([sys.argv[1], *common, *bad], capture_output=True, text=True)
    assert p.returncode != 0 and bad[-2] in p.stderr, (bad, p.returncode, p.stderr)
    print(f"refused: {' '.join(bad)}")
PY
# The run's result line says which epsilon AdamW used.
"$mlp" "${common[@]}" --adam-eps 1e-6 | tail -n 1 | grep -q '"adam_eps":1e-06' ||
    { echo "--adam-eps 1e-6: the result line does not say adam_eps 1e-06" >&2; exit 1; }
echo "the defaults' measurement options: run and range-checked"
