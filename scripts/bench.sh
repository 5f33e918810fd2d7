#!/usr/bin/env bash
# Builds lowrank-bench (release preset), runs it and bench/pytorch_bench.py in the same run,
# probes allocations per training step, and prints a side-by-side table.
#
#   bash scripts/bench.sh                 build/release, 1 thread, 5 rounds, medians
#   bash scripts/bench.sh --write-docs    also put the table and the probe output into
#                                         docs/performance.md (between its marker comments)
#
# Options:
#   --build-dir DIR   configure a private Release tree in DIR (no tests or examples) instead of
#                     the shared build/release preset tree
#   --march ISA       build lowrank's targets with -march=ISA (LOWRANK_MARCH) instead of native,
#                     in a private tree (build/bench-ISA unless --build-dir): x86-64-v3 measures the
#                     AVX2 + FMA code paths on an AVX-512 machine (and PyTorch's AVX2 kernels:
#                     pytorch_bench.py --isa avx2). --write-docs then writes only
#                     that ISA's machine block; the docs' tables stay those of the native build
#   --gxx             build by hand with g++ instead of CMake (see the command below)
#   --no-build        use the binaries already built
#   --threads N       LOWRANK_THREADS for lowrank-bench and --threads for PyTorch (default 1)
#   --rounds N        interleaved rounds (default 5): each round runs every program once,
#                     one sample per benchmark; the tables show the median over rounds
#   --filter REGEX    only benchmarks matching REGEX (both programs); the low-rank layers alone:
#                     --filter 'LowRank|Spectral|IncrementalRank'
#   --no-pytorch      skip PyTorch (the table then shows lowrank only)
#   --no-openblas     skip lowrank-bench-openblas (lowrank with EIGEN_USE_BLAS + OpenBLAS)
#   --pytorch-as-is   also time PyTorch with glibc's malloc defaults (AVX-512 kernel kept) and in
#                     the environment as found (OPENBLAS_CORETYPE=Haswell too), to show what its
#                     best-case settings are worth
#   --write-docs      update docs/performance.md
#   --machine-only    with --write-docs, write only this machine's block (implied by --march other
#                     than native): a filtered or loaded run leaves the docs' full tables alone
#
# Every run also measures the machine (bench/bench_machine.cpp: the FP32 FMA peak with AVX2 and,
# where the CPU has it, AVX-512, and the memory bandwidth, on 1 thread and on all), prints each
# GFLOP/s figure as a fraction of that peak, and (with --write-docs) writes a block for this
# machine and ISA into docs/performance.md's "Machines measured" (CPU, flags, peaks, date,
# load and this command line).
#
# Results land in build/bench/: lowrank.rN.json, lowrank_openblas.rN.json, pytorch.rN.json,
# (pytorch_malloc.rN.json, pytorch_asis.rN.json) for rounds N = 1.., alloc_probe.txt, table.md. Each sample is the
# mean time per iteration over at least 0.5 s after a warm-up step (Google Benchmark's
# default --benchmark_min_time; pytorch_bench.py does the same).
# PyTorch runs at its best (pytorch_bench.py's default): OPENBLAS_CORETYPE unset and glibc's
# malloc tuned like lowrank::tune_allocator(). Debian's python3-torch is for /usr/bin/python3.
#
# Without CMake the benchmark builds with (what --gxx runs):
#   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -I include -isystem /usr/include/eigen3 \
#       bench/bench_linear.cpp bench/bench_low_rank.cpp bench/bench_mlp.cpp -lbenchmark -lbenchmark_main \
#       -lpthread -o build/bench/lowrank-bench
#   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -I include -isystem /usr/include/eigen3 \
#       bench/alloc_probe.cpp -o build/bench/lowrank-alloc-probe
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

build_dir=build/release
mode=preset
march=native
command_line="bash scripts/bench.sh${*:+ $*}"
threads=1
rounds=5
filter=.
run_pytorch=1
run_openblas=1
run_asis=0
write_docs=0
machine_only=0
while (($#)); do
    case "$1" in
        --build-dir) build_dir="$2"; mode=private; shift ;;
        --march) march="$2"; [[ "$mode" == private ]] || build_dir="build/bench-$2"; mode=private; shift ;;
        --gxx) mode=gxx ;;
        --no-build) mode=none ;;
        --threads) threads="$2"; shift ;;
        --rounds) rounds="$2"; shift ;;
        --filter) filter="$2"; shift ;;
        --no-pytorch) run_pytorch=0 ;;
        --no-openblas) run_openblas=0 ;;
        --pytorch-as-is) run_asis=1 ;;
        --write-docs) write_docs=1 ;;
        --machine-only) machine_only=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "bench: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'bench: %s\n' "$*" >&2; }
out=build/bench
mkdir -p "$out"

# --- packages: the toolchain, OpenBLAS and (unless --no-pytorch) Debian's PyTorch -----------
setup_args=(--no-data)
((run_pytorch || run_asis)) && setup_args+=(--bench)
bash scripts/setup.sh "${setup_args[@]}" >&2

# --- build ------------------------------------------------------------------------------
flags=(-std=c++20 -O3 "-march=$march" -fopenmp -DNDEBUG -I include -isystem /usr/include/eigen3)
targets=(lowrank-bench lowrank-alloc-probe)
((run_openblas)) && targets+=(lowrank-bench-openblas lowrank-alloc-probe-openblas)  # where OpenBLAS is found
if [[ "$mode" == preset ]] && { ! command -v cmake >/dev/null || [[ ! -f CMakePresets.json ]]; }; then
    say "no CMake or no CMakePresets.json: building with g++ instead (--gxx)"
    mode=gxx
fi
case "$mode" in
    preset)
        [[ -f "$build_dir/build.ninja" ]] || cmake --preset release >/dev/null
        say "building ${targets[*]} in $build_dir"
        cmake --build "$build_dir" --target "${targets[@]}" >"$out/build.log" 2>&1 ||
            { tail -40 "$out/build.log" >&2; exit 1; }
        bin_dir="$build_dir/bench" ;;
    private)
        [[ -f "$build_dir/build.ninja" ]] ||
            cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWRANK_MARCH="$march" \
                -DLOWRANK_BUILD_TESTS=OFF -DLOWRANK_BUILD_EXAMPLES=OFF >/dev/null
        grep -q "^LOWRANK_MARCH:STRING=$march\$" "$build_dir/CMakeCache.txt" ||
            { say "$build_dir is configured with another LOWRANK_MARCH than $march"; exit 1; }
        say "building ${targets[*]} in $build_dir"
        cmake --build "$build_dir" --target "${targets[@]}" >"$out/build.log" 2>&1 ||
            { tail -40 "$out/build.log" >&2; exit 1; }
        bin_dir="$build_dir/bench" ;;
    gxx)
        say "building with g++ into $out"
        mapfile -t sources < <(ls bench/*.cpp | grep -v '/alloc_probe\.cpp$')
        g++ "${flags[@]}" "${sources[@]}" -lbenchmark -lbenchmark_main -lpthread -o "$out/lowrank-bench" \
            >"$out/build.log" 2>&1 || { grep -E 'error' "$out/build.log" >&2; exit 1; }
        g++ "${flags[@]}" bench/alloc_probe.cpp -o "$out/lowrank-alloc-probe" >>"$out/build.log" 2>&1 ||
            { grep -E 'error' "$out/build.log" >&2; exit 1; }
        if ((run_openblas)); then
            g++ "${flags[@]}" -DEIGEN_USE_BLAS "${sources[@]}" -lbenchmark -lbenchmark_main -lopenblas -lpthread \
                -o "$out/lowrank-bench-openblas" >>"$out/build.log" 2>&1 || say "no OpenBLAS variant (see $out/build.log)"
            g++ "${flags[@]}" -DEIGEN_USE_BLAS bench/alloc_probe.cpp -lopenblas -o "$out/lowrank-alloc-probe-openblas" \
                >>"$out/build.log" 2>&1 || say "no OpenBLAS probe (see $out/build.log)"
        fi
        bin_dir="$out" ;;
    none)
        if [[ -x "$out/lowrank-bench" && ! -x "$build_dir/bench/lowrank-bench" ]]; then
            bin_dir="$out"
        else
            bin_dir="$build_dir/bench"
        fi ;;
esac
bench_bin="$bin_dir/lowrank-bench"
probe_bin="$bin_dir/lowrank-alloc-probe"
openblas_bin="$bin_dir/lowrank-bench-openblas"
probe_openblas_bin="$bin_dir/lowrank-alloc-probe-openblas"
[[ -x "$bench_bin" ]] || { say "no $bench_bin (build it first, or drop --no-build)"; exit 1; }

# --- run --------------------------------------------------------------------------------
# Interleaved rounds: every program runs once per round (one sample per benchmark), so a
# change in background load between programs cannot favour one column of the table.
say "load average: $(cut -d' ' -f1-3 /proc/loadavg) (timings are only meaningful on an idle machine)"
rm -f "$out"/*.r[0-9]*.json "$out"/*.r[0-9]*.json.log
python=/usr/bin/python3
[[ -x "$python" ]] || python=python3
have_openblas=0
((run_openblas)) && [[ -x "$openblas_bin" ]] && have_openblas=1

gbench() {  # gbench <binary> <json> <filter> [env assignments...]
    local bin="$1" json="$2" regex="$3"
    shift 3
    env "$@" LOWRANK_THREADS="$threads" "$bin" --benchmark_filter="$regex" \
        --benchmark_out="$json" --benchmark_out_format=json >"$json.log" 2>&1 ||
        { cat "$json.log" >&2; exit 1; }
}

# Beside a build for x86-64-v3 (AVX2 + FMA), PyTorch is held to its AVX2 kernels too.
pytorch_isa=native
[[ "$march" == x86-64-v3 ]] && pytorch_isa=avx2

for ((round = 1; round <= rounds; round++)); do
    say "round $round/$rounds: lowrank-bench"
    # The machine probes run whatever the filter: every figure is shown against them.
    gbench "$bench_bin" "$out/lowrank.r$round.json" "($filter)|^BM_(Peak_FMA|Bandwidth)_"
    if ((have_openblas)); then
        say "round $round/$rounds: lowrank-bench-openblas (EIGEN_USE_BLAS, OPENBLAS_CORETYPE unset)"
        gbench "$openblas_bin" "$out/lowrank_openblas.r$round.json" "$filter" -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS="$threads"
    fi
    if ((run_pytorch)); then
        say "round $round/$rounds: pytorch_bench.py (PyTorch's best environment)"
        "$python" bench/pytorch_bench.py --threads "$threads" --repetitions 1 --filter "$filter" \
            --isa "$pytorch_isa" --out "$out/pytorch.r$round.json" >"$out/pytorch.r$round.json.log"
        if ((run_asis)); then
            say "round $round/$rounds: pytorch_bench.py --environment malloc-defaults"
            "$python" bench/pytorch_bench.py --environment malloc-defaults --threads "$threads" --repetitions 1 \
                --filter "$filter" --out "$out/pytorch_malloc.r$round.json" >"$out/pytorch_malloc.r$round.json.log"
            say "round $round/$rounds: pytorch_bench.py --as-is (the environment as found)"
            OPENBLAS_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads" "$python" bench/pytorch_bench.py --as-is \
                --threads "$threads" --repetitions 1 --filter "$filter" \
                --out "$out/pytorch_asis.r$round.json" >"$out/pytorch_asis.r$round.json.log"
        fi
    fi
done

probe_args=()
if [[ -x "$probe_bin" ]]; then
    say "lowrank-alloc-probe (tuned allocator, then glibc defaults)"
    {
        "$probe_bin"
        echo
        echo "--- the same with --no-tune (glibc's default malloc settings; GEMM tables as above) ---"
        "$probe_bin" --no-tune | grep -v -E 'blockA|packing buffers per product|expected heap allocations'
        if ((have_openblas)) && [[ -x "$probe_openblas_bin" ]]; then
            echo
            echo "--- the same built with EIGEN_USE_BLAS (products computed by OpenBLAS), allocator tuned ---"
            env -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS=1 "$probe_openblas_bin" |
                grep -v -E 'blockA|packing buffers per product|expected heap allocations|predicted Eigen packing'
        fi
    } >"$out/alloc_probe.txt"
    probe_args=(--probe "$out/alloc_probe.txt")
fi

# --- tables -----------------------------------------------------------------------------
table_args=(--lowrank "$out"/lowrank.r*.json --command "$command_line")
[[ "$march" == native && "$machine_only" == 0 ]] || table_args+=(--machine-only)
((run_pytorch)) && table_args+=(--pytorch "$out"/pytorch.r*.json)
((have_openblas)) && table_args+=(--openblas "$out"/lowrank_openblas.r*.json)
((run_pytorch && run_asis)) &&
    table_args+=(--pytorch-malloc-defaults "$out"/pytorch_malloc.r*.json --pytorch-as-is "$out"/pytorch_asis.r*.json)
((write_docs)) && table_args+=(--write-docs docs/performance.md "${probe_args[@]}")
echo
python3 scripts/bench_table.py "${table_args[@]}" | tee "$out/table.md"
