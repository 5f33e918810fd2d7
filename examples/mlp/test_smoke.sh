#!/usr/bin/env bash
# ctest examples/mlp: lowrank-mlp end to end on a made-up dataset written here as IDX files
# (64 training and 16 test images of 8 x 8 pixels, each pixel its label times 25), dense and
# with LoRA, two epochs each, each ending with its JSON result line. Under the asan preset
# this runs the program with the sanitizers.
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
