#!/usr/bin/env bash
# ctest gpt2/sample_from_checkpoint: lowrank-sample draws from a lowrank-gpt2 checkpoint
# without training. A LoRA run (and an SST one) saved at its end samples the very text its
# trainer printed, from the checkpoint alone (config, method, ranks, prompt, --sample N and
# the seed all come from it); the checkpoint and the run's folder are left byte for byte as
# they were, no step line is printed, and the result reports the checkpoint's step and N
# tokens. A run stopped half-way samples from its step, with and without the cache alike; a
# byte-level model (--tokenizer bytes) samples N bytes; a file that is no checkpoint is
# refused, naming it.
#   test_sample.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR CONFIG LOWRANK_SAMPLE
source "$(dirname "${BASH_SOURCE[0]}")/test_setup.sh" "$@"
sampler="$(realpath "$7")"
fail() { echo "$*" >&2; exit 1; }
common=(--config "$config" --batch 2 --context 16 --steps 6 --eval-every 3 --eval-windows 2 --warmup-steps 1
        --seed 5 --threads 1 --vocab "$vocab")
text_of() { head -n -1 "$1"; }          # what comes before the JSON line
json_of() { tail -n 1 "$1"; }
field() { json_of "$1" | python3 -c "import json, sys; print(json.load(sys.stdin)['$2'])"; }

# sampled RUN_DIR WHAT: samples from RUN_DIR with no other flag and checks that nothing in
# the folder changed, that no step ran, and that the trainer's text came out.
sampled() {
    local dir="$1" what="$2"
    (cd "$dir" && sha256sum *) > before.sha
    "$sampler" "$dir" > "$dir.sample.out" 2> "$dir.sample.err" || { cat "$dir.sample.err" >&2; fail "$what: lowrank-sample failed"; }
    (cd "$dir" && sha256sum *) > after.sha
    diff before.sha after.sha || fail "$what: lowrank-sample changed the run's folder"
    ! grep -q "^step " "$dir.sample.err" || fail "$what: a step line on stderr: $(cat "$dir.sample.err")"
    [[ "$(field "$dir.sample.out" tokens)" == 12 ]] || fail "$what: expected 12 tokens, got $(json_of "$dir.sample.out")"
    [[ "$(field "$dir.sample.out" step)" == 6 ]] || fail "$what: expected the checkpoint of step 6, got $(json_of "$dir.sample.out")"
    diff <(text_of "$dir.out") <(text_of "$dir.sample.out") || fail "$what: not the sample the trainer printed"
    echo "$what: 12 tokens from the step-6 checkpoint, the trainer's own sample, the folder unchanged: $(text_of "$dir.sample.out" | head -c 60 | tr '\n' ' ')"
}
"$gpt2" "${common[@]}" --data text --method lora --rank 4 --roles attn_qkv,mlp_fc --sample 12 --prompt "The" --out-dir lora --quiet > lora.out
sampled lora "lora"
"$gpt2" "${common[@]}" --data text --method sst --rank 4 --sample 12 --prompt "It is" --out-dir sst --quiet > sst.out
sampled sst "sst"

# A run stopped at step 3 of 6: sampled from step 3, the same tokens with and without the cache.
"$gpt2" "${common[@]}" --data text --method lora --rank 4 --out-dir half --stop-at 3 --quiet > half.out
cp half/checkpoint.safetensors half.copy
"$sampler" half/checkpoint.safetensors --sample 20 --prompt "Hello" --seed 3 --quiet > cached.out
"$sampler" half/checkpoint.safetensors --sample 20 --prompt "Hello" --seed 3 --quiet --no-cache > uncached.out
cmp half/checkpoint.safetensors half.copy || fail "the step-3 checkpoint changed"
[[ "$(field cached.out step)" == 3 && "$(field cached.out tokens)" == 20 ]] || fail "step 3: $(json_of cached.out)"
[[ "$(field cached.out cache)" == True && "$(field uncached.out cache)" == False ]] || fail "--no-cache: $(json_of uncached.out)"
diff <(text_of cached.out) <(text_of uncached.out) || fail "cached and uncached samples differ"
echo "step 3 of 6: 20 tokens, the same with and without the cache ($(field cached.out ms_per_token) vs $(field uncached.out ms_per_token) ms/token)"

# A byte-level model: N bytes, decoded without a vocabulary.
"$tokenize" --bytes --out bytes --val-fraction 0.2 "$text" > bytes.json
"$gpt2" "${common[@]}" --tokenizer bytes --data bytes --method lora --rank 2 --sample 24 --prompt "The " \
    --out-dir bytes_run --quiet > bytes_run.out
"$sampler" bytes_run --vocab /nonexistent --quiet > bytes.sample.out
cmp <(text_of bytes_run.out) <(text_of bytes.sample.out) || fail "--tokenizer bytes: not the trainer's sample"
python3 - bytes.sample.out <<'PY' || fail "--tokenizer bytes: wrong sample (above)"
import json, sys
lines = open(sys.argv[1], "rb").read().split(b"\n")
r = json.loads(lines[-2])
assert r["tokenizer"] == "bytes" and r["tokens"] == 24, r
assert len(b"\n".join(lines[:-2])) == 24, lines
PY
echo "--tokenizer bytes: 24 bytes, the trainer's own sample"

# Not a checkpoint: refused, naming the file.
echo "not a checkpoint" > bad.safetensors
if "$sampler" bad.safetensors --sample 3 > bad.out 2> bad.err; then fail "a file that is no checkpoint was sampled"; fi
grep -q "bad.safetensors" bad.err || fail "the refusal does not name the file: $(cat bad.err)"
echo "no checkpoint: refused ($(head -c 120 bad.err))"
