# Sourced by the lowrank-gpt2 command-line tests (test_resume.sh, test_kill.sh), called as
#   TEST.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR [CONFIG]
# Sets gpt2 (the trainer) and config (the model config the runs train: CONFIG, or mini; the
# asan preset gives micro), makes WORK_DIR afresh, enters it and tokenizes TEXT_FILE into
# text.train.bin / text.val.bin there.
set -euo pipefail
gpt2="$(realpath "$1")" tokenize="$(realpath "$2")" vocab="$(realpath "$3")" text="$(realpath "$4")" work="$5"
config="${6:-mini}"
[[ -f "$vocab/encoder.json" ]] || { echo "missing $vocab/encoder.json: run scripts/setup.sh" >&2; exit 1; }
rm -rf "$work"
mkdir -p "$work"
cd "$work"
"$tokenize" --vocab "$vocab" --out text --val-fraction 0.2 "$text" > tokenize.json
