#!/usr/bin/env bash
# The main demo: fetches GPT-2's vocabulary and the text corpus, tokenizes it, builds
# lowrank-gpt2 and trains the `tiny` GPT-2 with dense training and every low-rank method on
# the same token budget, then prints the comparison (validation perplexity, parameters,
# tokens/s). Arguments go to scripts/results_gpt2.py (see --help), e.g.
#   bash scripts/run-gpt2.sh --methods dense,sst --steps 300
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec python3 scripts/results_gpt2.py "$@"
