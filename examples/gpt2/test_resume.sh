#!/usr/bin/env bash
# ctest gpt2/resume_is_exact: a run interrupted (--stop-at) and resumed (--resume) must end
# exactly where the uninterrupted run ends: the same evaluation lines (all but the timing
# field) and a byte-identical final checkpoint. A resume that changes the method or a
# setting that changes the trajectory is refused, naming the setting. A --save into a missing
# folder and a --sample without its vocabulary fail before the first step.
#   test_resume.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR [CONFIG]
source "$(dirname "${BASH_SOURCE[0]}")/test_setup.sh" "$@"

for method in dense lora sst inrank; do
    # SST starts an iteration every 2 steps; InRank checks its ranks in its 4th forward call
    # (step 4, just after the resume at step 3) and cuts to fixed rank after step 4.
    common=(--config "$config" --batch 2 --context 16 --steps 8 --eval-every 2 --eval-windows 4 --warmup-steps 2
            --method "$method" --rank 8 --seed 3 --threads 1 --data text --quiet
            --sst-iteration-steps 2 --sst-rewarm 1 --inrank-warmup 2 --inrank-gap 2 --inrank-stage1-steps 4)
    "$gpt2" "${common[@]}" --log whole.jsonl --save whole.safetensors --rank-log whole.ranks > whole.out
    "$gpt2" "${common[@]}" --log split.jsonl --save split.safetensors --rank-log split.ranks --stop-at 3 > first.out
    "$gpt2" "${common[@]}" --log split.jsonl --save split.safetensors --rank-log split.ranks \
        --resume split.safetensors > second.out
    strip() { sed -E 's/"(tokens_per_second|ms_per_step|flops_per_second|mfu)":[^,}]*//g' "$1"; }  # timings
    if ! diff <(strip whole.jsonl) <(strip split.jsonl); then
        echo "$method: the resumed run's evaluation lines differ from the uninterrupted run's" >&2
        exit 1
    fi
    if ! cmp whole.safetensors split.safetensors; then
        echo "$method: the resumed run's final checkpoint differs from the uninterrupted run's" >&2
        exit 1
    fi
    echo "$method: $(wc -l < whole.jsonl) evaluation lines and the final checkpoint identical after a resume at step 3"
done

# The checkpoint of the last method (inrank) resumed as another run: refused, naming the key.
refused() {  # refused KEY ARGS...: the resume fails and its message names KEY
    local key="$1"
    shift
    if "$gpt2" "$@" --resume split.safetensors > refused.out 2> refused.err; then
        echo "a resume with $key changed was accepted" >&2
        exit 1
    fi
    if ! grep -q -- "'$key'\|trained with $key " refused.err; then
        echo "the refused resume does not name '$key':" >&2
        cat refused.err >&2
        exit 1
    fi
    echo "resume with $key changed: refused ($(head -c 160 refused.err))"
}
# common with OPTION's value replaced: changed OPTION VALUE
changed() {
    local opt="$1" value="$2" prev=""
    out=()
    for arg in "${common[@]}"; do
        if [[ "$prev" == "$opt" ]]; then out+=("$value"); else out+=("$arg"); fi
        prev="$arg"
    done
}
changed --method sst && refused --method "${out[@]}"
refused --grad-clip "${common[@]}" --grad-clip 0.5
changed --steps 9 && refused --steps "${out[@]}"
changed --eval-every 3 && refused --eval-every "${out[@]}"
changed --inrank-gap 3 && refused --inrank-gap "${out[@]}"

# ... unless the change is asked for: --steps 9 --resume-allow --steps extends the run.
changed --steps 9
"$gpt2" "${out[@]}" --log allowed.jsonl --save allowed.safetensors --resume split.safetensors \
    --resume-allow=--steps > allowed.out || { echo "an allowed --steps change was refused" >&2; exit 1; }
grep -q '"steps":9' allowed.out || { echo "the extended run did not reach step 9" >&2; exit 1; }
echo "resume with --steps changed and --resume-allow --steps: extended to step 9"

# Checked before the first step: --save into a missing folder fails at once, naming the flag
# (100000 steps would run past the test's timeout if they came first), and writes nothing.
changed --steps 100000
if "$gpt2" "${out[@]}" --save /nonexistent/x.safetensors --log early.jsonl > early.out 2> early.err; then
    echo "a run with --save into a missing folder succeeded" >&2
    exit 1
fi
grep -q -- "--save: '/nonexistent/x.safetensors': the folder '/nonexistent' does not exist" early.err ||
    { echo "the refused --save does not say why:" >&2; cat early.err >&2; exit 1; }
[[ ! -s early.out && ! -e early.jsonl ]] || { echo "the refused run wrote a result or a log" >&2; exit 1; }
echo "--save into a missing folder: refused before the first step ($(head -c 120 early.err))"

# --sample's vocabulary is read before the first step too; with it, the run ends with a sample.
if "$gpt2" "${out[@]}" --sample 3 --vocab /nonexistent > early.out 2> early.err; then
    echo "a run with --sample and a missing --vocab succeeded" >&2
    exit 1
fi
grep -q "'/nonexistent/encoder.json' does not exist" early.err ||
    { echo "the refused --vocab does not say why:" >&2; cat early.err >&2; exit 1; }
echo "--sample with a missing --vocab: refused before the first step"
"$gpt2" --config "$config" --batch 2 --context 16 --steps 1 --warmup-steps 0 --eval-windows 1 --data text --quiet \
    --sample 3 --vocab "$vocab" > sample.out
[[ "$(tail -n 1 sample.out)" == "{"*"}" ]] || { echo "the run with --sample did not end with its result" >&2; exit 1; }
echo "--sample 3 after one step: $(head -c 60 sample.out | tr '\n' ' ')"
