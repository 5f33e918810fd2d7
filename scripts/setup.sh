#!/usr/bin/env bash
# Installs what lowrank needs to build, test and run its examples (Debian packages), and
# links the real data under data/ (git-ignored). Idempotent: a second run only checks.
#
#   bash scripts/setup.sh            packages + data
#   bash scripts/setup.sh --no-data  packages only (enough for the tests)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want_data=1
for arg in "$@"; do
    case "$arg" in
        --no-data) want_data=0 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "setup: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf 'setup: %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------
packages=(
    build-essential cmake ninja-build      # toolchain (CMake >= 3.25 for the presets)
    ccache                                 # faster rebuilds (optional to CMake)
    libeigen3-dev zlib1g-dev               # what lowrank::lowrank links
    nlohmann-json3-dev                     # (header-only: safetensors, checkpoints)
    catch2 libbenchmark-dev                # tests, benchmarks
    libcli11-dev                           # examples' command lines
    dataset-fashion-mnist                  # real data for examples/mlp
    gnuplot-nox python3                    # plots, helper scripts
)
missing=()
for p in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if ((${#missing[@]})); then
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    say "all ${#packages[@]} packages present"
fi

# --- data -------------------------------------------------------------------------------
if ((want_data)); then
    src=/usr/share/datasets/fashion-mnist
    dst="$root/data/fashion-mnist"
    files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
           t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
    mkdir -p "$dst"
    linked=0
    for f in "${files[@]}"; do
        if [[ ! -f "$src/$f" ]]; then
            echo "setup: $src/$f is missing; the Debian package dataset-fashion-mnist should provide it" \
                 "(try: apt-get install --reinstall dataset-fashion-mnist)" >&2
            exit 1
        fi
        if [[ "$(readlink "$dst/$f" 2>/dev/null)" != "$src/$f" ]]; then
            ln -sfn "$src/$f" "$dst/$f"
            linked=$((linked + 1))
        fi
        [[ -r "$dst/$f" ]] || { echo "setup: cannot read $dst/$f" >&2; exit 1; }
    done
    if ((linked)); then
        say "linked $linked Fashion-MNIST file(s) into data/fashion-mnist/"
    else
        say "data/fashion-mnist/ ready"
    fi
fi
