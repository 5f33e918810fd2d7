#!/usr/bin/env bash
# Trains the MLP example on Fashion-MNIST. Arguments go to lowrank-mlp (see --help):
#   bash scripts/run-mlp.sh
#   bash scripts/run-mlp.sh --help
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
[[ -f build/release/build.ninja ]] || cmake --preset release  # ninja re-configures itself after that
cmake --build --preset release --target lowrank-mlp
exec ./build/release/examples/mlp/lowrank-mlp --data data/fashion-mnist "$@"
