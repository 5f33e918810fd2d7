#!/usr/bin/env bash
# The main demo: fetches the text corpus (and GPT-2's vocabulary), tokenizes it, builds
# lowrank-gpt2 and compares dense training with the low-rank methods on the byte-level GPT
# (GPT-2's architecture over 256 byte symbols: the low-rank projections carry the model),
# three seeds each, printing bits per byte with 95% intervals, the difference to dense and
# whether it is beyond seed noise, parameters, time and speed-up. Arguments go to
# scripts/compare_bytes.py (see --help), e.g.
#   bash scripts/run-gpt2.sh --methods dense,sst --seeds 5
# With --bpe first, the GPT-2 BPE comparison instead (the `tiny` config over GPT-2's 50257
# tokens, scripts/results_gpt2.py; its arguments follow):
#   bash scripts/run-gpt2.sh --bpe --methods all
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ "${1:-}" == "--bpe" ]]; then
    shift
    exec python3 scripts/results_gpt2.py "$@"
fi
exec python3 scripts/compare_bytes.py "$@"
