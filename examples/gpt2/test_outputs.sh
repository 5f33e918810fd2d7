#!/usr/bin/env bash
# ctest gpt2/outputs: what a run writes. --log-every N puts a "kind": "step" line in --log
# every N steps (the step, a finite loss and gradient norm, lr, ms/step, tokens/s, MFU)
# beside the "kind": "eval" lines, and on stderr when it is not a terminal. A run with
# --out-dir DIR, started in an empty folder, writes into DIR only; --keep-last K leaves
# exactly K step checkpoints beside the newest; a run resumed from DIR's checkpoint with
# --out-dir DIR ends where the uninterrupted run does.
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

# --out-dir from an empty working folder: every file of the run (LoRA: a rank log too) in it.
mkdir empty && cd empty
"$gpt2" "${common[@]}" --method lora --rank 4 --save-every 4 --keep-last 2 --keep-best --sample 2 \
    --vocab "$vocab" --out-dir run --quiet > ../outdir.out
cd ..
outside="$(cd empty && find . -path ./run -prune -o -type f -print)"
[[ -z "$outside" ]] || fail "--out-dir: files written outside it: $outside"
got="$(cd empty/run && ls | tr '\n' ' ')"
want="checkpoint-best.safetensors checkpoint-step00000008.safetensors checkpoint-step00000012.safetensors checkpoint.safetensors metrics.jsonl ranks.jsonl result.json sample.txt "
[[ "$got" == "$want" ]] || fail "--out-dir with --keep-last 2: expected $want, got $got"
cmp empty/run/checkpoint.safetensors empty/run/checkpoint-step00000012.safetensors ||
    fail "--keep-last: the checkpoint file is not the newest step's"
echo "--out-dir run --keep-last 2 --keep-best from an empty folder: only run/ written: $got"

# Resumed from the folder's checkpoint: the same evaluation lines and final checkpoint.
strip() { sed -E 's/"(tokens_per_second|ms_per_step|flops_per_second|mfu)":[^,}]*//g' "$1"; }
"$gpt2" "${common[@]}" --out-dir whole --quiet > whole.out
"$gpt2" "${common[@]}" --out-dir split --quiet --stop-at 5 > first.out
"$gpt2" "${common[@]}" --out-dir split --quiet --resume split/checkpoint.safetensors > second.out
diff <(strip whole/metrics.jsonl) <(strip split/metrics.jsonl) || fail "--out-dir resume: the log lines differ"
cmp whole/checkpoint.safetensors split/checkpoint.safetensors || fail "--out-dir resume: the checkpoints differ"
echo "--out-dir split --stop-at 5, then --resume split/checkpoint.safetensors: $(wc -l < split/metrics.jsonl) lines and the checkpoint identical"

# Refused before the first step: --out-dir on a file; --keep-last without a place to save.
touch afile
if "$gpt2" "${common[@]}" --out-dir afile/x --quiet > bad.out 2> bad.err; then fail "--out-dir under a file was accepted"; fi
grep -q -- "--out-dir: 'afile/x'" bad.err || { cat bad.err >&2; fail "the refused --out-dir does not name it"; }
if "$gpt2" "${common[@]}" --keep-last 2 --quiet > bad.out 2> bad.err; then fail "--keep-last without --save was accepted"; fi
grep -q -- "need --save or --out-dir" bad.err || { cat bad.err >&2; fail "the refused --keep-last does not say why"; }
echo "--out-dir under a file, --keep-last without --save or --out-dir: refused ($(head -c 100 bad.err))"

# A number out of range is refused in a line that names the option, the bound and the value
# (CLI11's own PositiveNumber printed the largest double in full), for the trainer's options
# and each method's.
for bad in "--steps 0" "--cuttlefish-window 0" "--sst-iteration-steps 0" "--cuttlefish-threshold -1" \
           "--deeplora-epsilon 0"; do
    # shellcheck disable=SC2086  # option and value are two words
    if "$gpt2" $bad > bad.out 2> bad.err; then fail "$bad was accepted"; fi
    line="$(head -n 1 bad.err)"
    [[ "$line" == "${bad%% *}"*"got ${bad##* }"* && ${#line} -lt 120 ]] ||
        fail "$bad: expected a short message naming the option and the value, got: $line"
done
echo "out-of-range numbers refused naming the option and the value ($(head -n 1 bad.err))"

# --sst-prune T: after training every SST singular value below T is zero, one "prune" event
# per SST layer (old rank -> the rank left), the result names the count and the validation
# loss before; with another method it is refused before the first step.
"$gpt2" "${common[@]}" --method sst --rank 4 --sst-iteration-steps 4 --sst-rewarm 1 --sst-prune 0.2 \
    --out-dir pruned --quiet > pruned.out
python3 - pruned/result.json pruned/ranks.jsonl <<'PY' || fail "--sst-prune: the result or the rank log is wrong (above)"
import json, math, sys
r = json.load(open(sys.argv[1]))
events = [json.loads(l) for l in open(sys.argv[2]) if '"prune"' in l]
p = r["sst_prune"]
assert p["threshold"] == 0.2 and p["singular_values"] >= 0 and math.isfinite(p["val_loss_before"]), p
assert len(events) == len(r["final_ranks"]), (len(events), r["final_ranks"])
for e in events:
    assert e["event"] == "prune" and e["new_rank"] <= e["old_rank"] and e["value"] == 0.2, e
    assert r["final_ranks"][e["layer"]] == e["new_rank"], (e, r["final_ranks"])
assert sum(e["old_rank"] - e["new_rank"] for e in events) == p["singular_values"], (events, p)
print(f"--sst-prune 0.2: {p['singular_values']} singular values pruned in {len(events)} layers, "
      f"val loss {p['val_loss_before']:.4f} -> {r['val_loss']:.4f}")
PY
if "$gpt2" "${common[@]}" --method lora --sst-prune 0.2 --quiet > bad.out 2> bad.err; then fail "--sst-prune with lora was accepted"; fi
grep -q -- "--sst-prune: .*expected --method sst, got --method lora" bad.err ||
    { cat bad.err >&2; fail "the refused --sst-prune does not say why"; }
