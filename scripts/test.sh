#!/usr/bin/env bash
# Builds and tests lowrank the way CI does.
#
#   bash scripts/test.sh          release preset: build, ctest, then install into
#                                 build/install and build + run examples/consumer against it
#   bash scripts/test.sh --asan   asan preset (AddressSanitizer + UBSan): build, ctest
#   bash scripts/test.sh --all    what CI runs (.ci/run): the two above, then a short
#                                 fuzzing run of every reader (scripts/fuzz.sh, 20 s each)
#
# Exits non-zero on the first failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# ccache (if CMake found it): paths below the checkout are hashed relative to it, so any
# checkout of the same sources reuses the cached objects.
export CCACHE_BASEDIR="$root"
export CCACHE_NOHASHDIR=1  # the asan build has -g: do not key its objects on the build folder

mode=release
for arg in "$@"; do
    case "$arg" in
        --asan) mode=asan ;;
        --all) mode=all ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "test: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

if [[ "$mode" == all ]]; then
    all_start=$SECONDS
    bash "${BASH_SOURCE[0]}"
    bash "${BASH_SOURCE[0]}" --asan
    bash scripts/fuzz.sh --budget 20 --jobs 2
    printf '\ntest.sh --all: all passed in %ds\n' $((SECONDS - all_start))
    exit 0
fi

section_name=""
section_start=0
script_start=$SECONDS
end_section() {
    if [[ -n "$section_name" ]]; then
        printf '%s: %ds\n' "$section_name" $((SECONDS - section_start))
    fi
}
section() {
    end_section
    section_name="$1"
    section_start=$SECONDS
    printf '\n==== %s ====\n' "$1"
}

section "setup"
bash scripts/setup.sh --no-data

section "configure ($mode)"
# MPI on: a machine without it fails here, loudly, instead of skipping the MPI tests
# (LOWRANK_WITH_MPI's default, AUTO, would build lowrank/dist/ as one process).
cmake --preset "$mode" -DLOWRANK_WITH_MPI=ON

section "build ($mode)"
cmake --build --preset "$mode"

section "test ($mode)"
ctest --preset "$mode" --output-on-failure

if [[ "$mode" == release ]]; then
    prefix="$root/build/install"
    section "install into build/install"
    rm -rf "$prefix"  # no stale headers from an earlier install
    cmake --install build/release --prefix "$prefix"

    section "consumer: find_package(lowrank) from build/install"
    cmake -S examples/consumer -B build/consumer -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
    cmake --build build/consumer -j 2
    ./build/consumer/lowrank-consumer
    # The version check: lowrank 0.1.z satisfies a request for 0.1, never one for 0.2.
    if cmake -S examples/consumer -B build/consumer-0.2 -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
        -DLOWRANK_CONSUMER_REQUIRES=0.2 > build/consumer-0.2.log 2>&1; then
        echo "test: find_package(lowrank 0.2) accepted the installed lowrank (0.1.z); expected a refusal" >&2
        exit 1
    fi
    grep -q "not compatible\|version" build/consumer-0.2.log ||
        { cat build/consumer-0.2.log >&2; echo "test: find_package(lowrank 0.2) failed for another reason" >&2; exit 1; }
    rm -rf build/consumer-0.2
    echo "consumer: find_package(lowrank 0.1) found it, find_package(lowrank 0.2) refused it"

    section "pkg-config: lowrank.pc from build/install"
    export PKG_CONFIG_PATH="$prefix/share/pkgconfig"
    pc_version="$(pkg-config --modversion lowrank)"
    printf '#include <lowrank/version.hpp>\n#include <cstdio>\nint main() { std::puts(lowrank::version_string()); }\n' \
        > build/pc_version.cpp
    # shellcheck disable=SC2046  # the flags are words
    c++ build/pc_version.cpp -o build/pc_version $(pkg-config --cflags --libs lowrank)
    [[ "$(./build/pc_version)" == "$pc_version" ]] ||
        { echo "test: lowrank.pc says $pc_version, the headers say $(./build/pc_version)" >&2; exit 1; }
    echo "pkg-config: lowrank $pc_version, headers agree"
fi

end_section
printf '\n%s: all passed in %ds\n' "test.sh${1:+ $1}" $((SECONDS - script_start))
