#!/usr/bin/env bash
# ctest gpt2/outputs: what a run writes. --log-every N puts a "kind": "step" line in --log
# every N steps (the step, a finite loss and gradient norm, lr, ms/step, tokens/s, MFU)
# beside the "kind": "eval" lines, and on stderr when it is not a terminal.
#   test_outputs.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR [CONFIG]
source "$(dirname "${BASH_SOURCE[0]}")/test_setup.sh" "$@"
fail() { echo "$*" >&2; exit 1; }
data="$PWD/text"
common=(--config "$config" --batch 2 --context 16 --steps 12 --eval-every 4 --eval-windows 2 --warmup-steps 2
        --seed 1 --threads 1 --data "$data")

# --log-every 3 over 12 steps: lines at steps 3, 6, 9, 12; evaluations at 4, 8, 12.
"$gpt2" "${common[@]}" --log-every 3 --log metrics.jsonl --peak-gflops 100 > every.out 2> every.err
python3 - metrics.jsonl <<'PY' || fail "--log-every: the log's step lines are wrong (above)"
import json, math, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
steps = [l for l in lines if l.get("kind") == "step"]
evals = [l for l in lines if l.get("kind") == "eval"]
assert [l["step"] for l in steps] == [3, 6, 9, 12], [l["step"] for l in steps]
assert [l["step"] for l in evals] == [4, 8, 12], [l["step"] for l in evals]
assert len(lines) == len(steps) + len(evals), "a line without a kind"
for l in steps:
    for key in ("train_loss", "grad_norm", "lr", "ms_per_step", "tokens_per_second", "flops_per_second", "mfu"):
        assert isinstance(l.get(key), (int, float)) and math.isfinite(l[key]) and l[key] > 0, (key, l)
    # MFU against --peak-gflops 100: FLOP/s over 1e11.
    assert abs(l["mfu"] - l["flops_per_second"] / 1e11) <= 1e-9 * l["mfu"], l
print(f"--log-every 3: step lines at 3, 6, 9, 12 with finite loss and gradient norm "
      f"(first {steps[0]['grad_norm']:.3f}), evaluation lines at 4, 8, 12")
PY
[[ "$(grep -c '^step .* grad_norm .* ms/step .* tokens/s  MFU ' every.err)" == 4 ]] ||
    { cat every.err >&2; fail "--log-every 3: stderr (not a terminal) does not hold 4 step lines"; }
# --quiet keeps stderr free of them; --log-every 0 writes none.
"$gpt2" "${common[@]}" --log-every 3 --quiet --log quiet.jsonl > quiet.out 2> quiet.err
[[ ! -s quiet.err ]] || fail "--quiet: stderr is not empty: $(cat quiet.err)"
"$gpt2" "${common[@]}" --log-every 0 --quiet --log none.jsonl > none.out
[[ "$(grep -c '"kind":"step"' none.jsonl || true)" == 0 ]] || fail "--log-every 0 wrote step lines"
echo "--quiet: no step lines on stderr; --log-every 0: none in the log"
