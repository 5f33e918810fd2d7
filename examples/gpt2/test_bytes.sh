#!/usr/bin/env bash
# ctest gpt2/bytes: the byte-level model. lowrank-tokenize --bytes writes one id per byte
# (the text's bytes, in order, the last --val-fraction of it as validation); lowrank-gpt2
# --tokenizer bytes trains GPT-2's architecture over 256 symbols: its embedding has 256
# rows, a low-rank method acts on all four projections of every block, the result gives the
# validation loss in bits per byte, and a sample is bytes. Token ids past 255 (a BPE stream)
# are refused before the first step, naming the file.
#   test_bytes.sh LOWRANK_GPT2 LOWRANK_TOKENIZE VOCAB_DIR TEXT_FILE WORK_DIR [CONFIG]
source "$(dirname "${BASH_SOURCE[0]}")/test_setup.sh" "$@"
fail() { echo "$*" >&2; exit 1; }
"$tokenize" --bytes --out bytes --val-fraction 0.2 "$text" > bytes.json
python3 - "$text" bytes.train.bin bytes.val.bin bytes.json <<'PY' || fail "lowrank-tokenize --bytes: wrong streams (above)"
import json, struct, sys
text = open(sys.argv[1], "rb").read()
ids = lambda p: list(struct.unpack(f"<{len(open(p, 'rb').read()) // 2}H", open(p, "rb").read()))
train, val = ids(sys.argv[2]), ids(sys.argv[3])
n_val = round(len(text) * 0.2)
assert bytes(train) == text[:len(text) - n_val] and bytes(val) == text[len(text) - n_val:], "not the text's bytes"
summary = json.loads(open(sys.argv[4]).read())
assert summary["tokenizer"] == "bytes" and summary["vocab_size"] == 256, summary
assert 0 < summary["unigram_val_bits_per_byte"] <= 8, summary
print(f"--bytes: {len(train)} + {len(val)} ids, the text's bytes; unigram baseline "
      f"{summary['unigram_val_bits_per_byte']:.3f} bits per byte")
PY

common=(--config "$config" --batch 2 --context 16 --steps 4 --eval-every 2 --eval-windows 2 --warmup-steps 1
        --seed 1 --threads 1 --quiet)
"$gpt2" "${common[@]}" --tokenizer bytes --data bytes --method lora --rank 2 --sample 24 --prompt "The " \
    --rank-log lora.ranks.jsonl > lora.out
"$gpt2" "${common[@]}" --tokenizer bytes --data bytes > dense.out
"$gpt2" "${common[@]}" --data text > bpe.out
python3 - lora.out dense.out bpe.out <<'PY' || fail "--tokenizer bytes: wrong result (above)"
import json, math, sys
out = [open(p, "rb").read().split(b"\n") for p in sys.argv[1:]]
lora, dense, bpe = (json.loads(o[-2]) for o in out)
for r in (lora, dense):
    assert r["tokenizer"] == "bytes", r
    assert abs(r["val_bpb"] - r["val_loss"] / math.log(2)) <= 1e-12, r
assert bpe["tokenizer"] == "gpt2" and bpe["val_bpb"] is None, bpe
# The embedding (tied with the head) is the only part that depends on the vocabulary.
width = {"micro": 16, "mini": 128, "tiny": 256}[dense["config"]]
assert bpe["params"] - dense["params"] == (50257 - 256) * width, (bpe["params"], dense["params"])
roles = {".".join(name.split(".")[-2:]) for name in lora["final_ranks"]}
assert roles == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}, sorted(lora["final_ranks"])
assert len(lora["final_ranks"]) == 4 * {"micro": 2, "mini": 2, "tiny": 4}[dense["config"]], lora["final_ranks"]
# The sample: the 24 bytes before the JSON line (a byte model may well write invalid UTF-8).
sample = b"\n".join(out[0][:-2])
assert len(sample) == 24, (len(sample), sample)
print(f"--tokenizer bytes: {dense['params']:,} parameters against {bpe['params']:,} with GPT-2's vocabulary; "
      f"val {dense['val_bpb']:.3f} bits per byte; LoRA on {len(lora['final_ranks'])} projections; "
      f"a sample of 24 bytes")
PY
# A BPE stream under the byte vocabulary: refused, naming the file and the range.
if "$gpt2" "${common[@]}" --tokenizer bytes --data text > wrong.out 2> wrong.err; then
    fail "--tokenizer bytes trained on a BPE stream"
fi
grep -q "text.train.bin" wrong.err && grep -q "256" wrong.err ||
    fail "--tokenizer bytes on a BPE stream: the error does not name the file and the vocabulary: $(cat wrong.err)"
echo "a BPE stream under --tokenizer bytes: refused ($(head -c 160 wrong.err))"
