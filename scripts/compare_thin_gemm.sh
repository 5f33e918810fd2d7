#!/usr/bin/env bash
# The thin-product kernels (include/lowrank/linalg/thin_gemm.hpp) of a base revision against
# the work tree's, in one process on one thread (scripts/compare_thin_gemm.cpp says how).
#
#   bash scripts/compare_thin_gemm.sh BASE_REVISION [MARCH]
#
# MARCH is the -march of the build, native by default; x86-64-v3 measures the AVX2 paths on
# a CPU with AVX-512. The base header is compiled against the work tree's other headers.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: bash scripts/compare_thin_gemm.sh BASE_REVISION [MARCH]" >&2
    exit 2
fi
base=$1
march=${2:-native}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
header=include/lowrank/linalg/thin_gemm.hpp
if ! git -C "$root" show "$base:$header" > "$tmp/thin_gemm_base.hpp" 2>/dev/null; then
    echo "compare_thin_gemm: no $header at revision '$base'" >&2
    exit 1
fi
sed -i 's|^namespace lowrank::linalg {$|namespace lowrank::linalg_base {|; s|^}  // namespace lowrank::linalg$|}  // namespace lowrank::linalg_base|' \
    "$tmp/thin_gemm_base.hpp"
if ! grep -q '^namespace lowrank::linalg_base {$' "$tmp/thin_gemm_base.hpp"; then
    echo "compare_thin_gemm: $header at '$base' does not open 'namespace lowrank::linalg {' on a line of its own" >&2
    exit 1
fi
echo "compare_thin_gemm: base $(git -C "$root" rev-parse --short "$base"), new: the work tree; -march=$march;" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
g++ -std=c++20 -O3 -march="$march" -fopenmp -DNDEBUG -I"$root/include" -isystem /usr/include/eigen3 \
    -DLOWRANK_BASE_HEADER="\"$tmp/thin_gemm_base.hpp\"" "$root/scripts/compare_thin_gemm.cpp" -o "$tmp/compare"
LOWRANK_THREADS=1 OMP_NUM_THREADS=1 nice -n -10 "$tmp/compare"
