#!/usr/bin/env bash
# The compile time LOWRANK_SEPARATE_LINALG saves (README.md, "Compile the SVD once";
# docs/performance.md, "Compile time"): one translation unit that uses the SVD, compiled
# with the SVD kernels inline (the default) and with them only declared, interleaved, and
# the one file that compiles them (cmake/lowrank_linalg.cpp). Prints a markdown block with
# the machine, the compiler, the load average and each repetition's wall and CPU time,
# between the markers of docs/performance.md's block (paste it over the old one).
#
#   bash scripts/compile_time_linalg.sh [--reps N] [--file SOURCE]
#
# Release flags of lowrank's own targets: -O3 -DNDEBUG -march=native -std=c++20 -fopenmp.
# CPU time (user + sys) is the figure to read on a shared machine: wall time also counts
# the waits for a core.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
reps=3
file="$root/examples/matrix_completion/main.cpp"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --reps) reps="$2"; shift 2 ;;
        --file) file="$2"; shift 2 ;;
        *) echo "compile_time_linalg.sh: unknown argument '$1' (expected --reps N, --file SOURCE)" >&2; exit 2 ;;
    esac
done
[[ -f "$file" ]] || { echo "compile_time_linalg.sh: no such file '$file'" >&2; exit 2; }

cxx="${CXX:-c++}"
flags=(-std=c++20 -O3 -DNDEBUG -march=native -fopenmp -I"$root/include" -isystem /usr/include/eigen3)
if "$cxx" --version | head -n 1 | grep -q ' 12\.'; then
    flags+=(-include "$root/cmake/gcc12_intrinsics_workaround.hpp")  # as lowrank_target_options
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

load() { cut -d' ' -f1 /proc/loadavg; }
# "<wall> <cpu>" in seconds for one compile.
timed() {
    /usr/bin/time -f '%e %U %S' -o "$out/t" "$cxx" "${flags[@]}" "$@" -c -o "$out/o.o"
    awk '{printf "%.1f %.1f\n", $1, $2 + $3}' "$out/t"
}

rows=()
sum_inline=0 sum_separate=0
for ((i = 1; i <= reps; i++)); do
    for mode in inline separate; do
        extra=()
        [[ "$mode" == separate ]] && extra=(-DLOWRANK_SEPARATE_LINALG)
        l0="$(load)"
        read -r wall cpu < <(timed "${extra[@]}" "$file")
        rows+=("| $i | $mode | $wall | $cpu | $l0–$(load) |")
        if [[ "$mode" == inline ]]; then sum_inline="$(echo "$sum_inline + $cpu" | bc)"
        else sum_separate="$(echo "$sum_separate + $cpu" | bc)"; fi
    done
done
l0="$(load)"
read -r lwall lcpu < <(timed -DLOWRANK_SEPARATE_LINALG "$root/cmake/lowrank_linalg.cpp")
rows+=("| 1 | cmake/lowrank_linalg.cpp | $lwall | $lcpu | $l0–$(load) |")

cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
avx512="$(grep -o -m1 -w avx512f /proc/cpuinfo || echo 'no avx512f')"
echo "<!-- compile-time-linalg:begin -->"
echo "**$cpu_model**, $(nproc) vCPUs ($avx512); $("$cxx" --version | head -n 1); $(date -u +%Y-%m-%dT%H:%M:%SZ);"
echo "\`${file#"$root"/}\`, flags \`${flags[*]//$root\//}\`; command \`bash scripts/compile_time_linalg.sh --reps $reps\`."
echo
echo "| rep | SVD kernels | wall s | CPU s | 1-min load |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
printf 'Mean CPU time: %.1f s inline, %.1f s with LOWRANK_SEPARATE_LINALG: %.1f s saved per file.\n' \
    "$(echo "$sum_inline / $reps" | bc -l)" "$(echo "$sum_separate / $reps" | bc -l)" \
    "$(echo "($sum_inline - $sum_separate) / $reps" | bc -l)"
echo "<!-- compile-time-linalg:end -->"
