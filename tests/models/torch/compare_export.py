#!/usr/bin/env python3
"""lowrank's dense GPT-2 export, loaded into a GPT-2 written in PyTorch, gives lowrank's logits.

    python3 tests/models/torch/compare_export.py REFERENCE_PROGRAM WORK_DIR

REFERENCE_PROGRAM (lowrank-export-reference, export_reference.cpp) writes a micro GPT-2 of
every factorised layer type, merged, as WORK_DIR/hf.safetensors (Hugging Face's names and
Conv1D layout) and WORK_DIR/nanogpt.safetensors (nn.Linear layout), and its logits. This
script reads the files with tests/io/read_safetensors.py (independent of the C++ reader),
loads each into a GPT-2 built from torch.nn modules with the state_dict names of
transformers' GPT2LMHeadModel (Conv1D: weight (in x out), y = x W + b) or of nanoGPT's GPT
(nn.Linear), strictly (the head tied to wte, as both tie it), and compares the logits. It
also checks WORK_DIR/hf-model/config.json against GPT2Config's keys and loads that folder
with transformers.GPT2LMHeadModel.from_pretrained where transformers is installed.
transformers itself is not packaged in Debian; the module structure and names here are
those of its modeling_gpt2.py (without it, the folder's model is built from config.json). Exits 77 (ctest: skipped) where torch is not installed.
"""

import json
import math
import os
import subprocess
import sys

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("torch is not installed (apt-get install python3-torch): skipped")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "io"))
import read_safetensors  # noqa: E402


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: weight (nx, nf), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, c, heads, conv1d):
        super().__init__()
        self.c, self.heads = c, heads
        self.c_attn = Conv1D(3 * c, c) if conv1d else nn.Linear(c, 3 * c)
        self.c_proj = Conv1D(c, c) if conv1d else nn.Linear(c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.c_proj(y)


class Mlp(nn.Module):
    def __init__(self, c, conv1d):
        super().__init__()
        self.c_fc = Conv1D(4 * c, c) if conv1d else nn.Linear(c, 4 * c)
        self.c_proj = Conv1D(c, 4 * c) if conv1d else nn.Linear(4 * c, c)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, c, heads, conv1d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.attn = Attention(c, heads, conv1d)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.mlp = Mlp(c, conv1d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt2(nn.Module):
    def __init__(self, cfg, conv1d):
        super().__init__()
        c = cfg["n_embd"]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg["vocab_size"], c),
            wpe=nn.Embedding(cfg["block_size"], c),
            h=nn.ModuleList(Block(c, cfg["n_head"], conv1d) for _ in range(cfg["n_layer"])),
            ln_f=nn.LayerNorm(c, eps=1e-5)))
        self.lm_head = nn.Linear(c, cfg["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in both

    def forward(self, ids):
        t = ids.shape[1]
        x = self.transformer.wte(ids) + self.transformer.wpe(torch.arange(t))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# What GPT2Config must say for transformers' GPT2LMHeadModel to be the model exported.
HF_CONFIG_FIXED = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                   "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                   "tie_word_embeddings": True, "n_inner": None, "attn_pdrop": 0.0}


def check_hf_config(path, cfg):
    """Failures of the config.json at `path` against the export's own config `cfg`."""
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    failures = [f"config.json: {k} is {hf.get(k)!r}, expected {v!r}"
                for k, v in HF_CONFIG_FIXED.items() if hf.get(k) != v]
    for ours, theirs in (("n_embd", "n_embd"), ("n_layer", "n_layer"), ("n_head", "n_head"),
                         ("block_size", "n_positions"), ("vocab_size", "vocab_size")):
        if hf.get(theirs) != cfg[ours]:
            failures.append(f"config.json: {theirs} is {hf.get(theirs)!r}, expected {cfg[ours]!r} ({ours})")
    return hf, failures


def main():
    program, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    subprocess.run([program, work], check=True)
    ref, _, _ = read_safetensors.load(os.path.join(work, "reference.safetensors"))
    ids = ref["ids"].long()
    expected = ref["logits"].double()
    failures = []
    for layout, conv1d in (("hf", True), ("nanogpt", False)):
        tensors, metadata, _ = read_safetensors.load(os.path.join(work, layout + ".safetensors"))
        if metadata.get("format") != "pt":
            failures.append(f"{layout}: metadata format is {metadata.get('format')!r}, expected 'pt'")
        cfg = json.loads(metadata["lowrank.gpt2"])["config"]
        model = Gpt2(cfg, conv1d).double()
        state = {k: v.double() for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Hugging Face's file leaves the tied head out (as save_pretrained does); nanoGPT's
        # state_dict has it.
        want_missing = ["lm_head.weight"] if conv1d else []
        if sorted(missing) != want_missing or unexpected:
            failures.append(f"{layout}: missing {sorted(missing)} (expected {want_missing}), unexpected {unexpected}")
            continue
        if not conv1d and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
            failures.append("nanogpt: lm_head.weight is not wte's copy")
        with torch.no_grad():
            got = model(ids)
        error = (got - expected).abs().max().item() / expected.abs().max().item()
        print(f"{layout}: {len(tensors)} tensors, logits {tuple(got.shape)}, max error {error:.2e} of max |logit|")
        if not error < 1e-5:
            failures.append(f"{layout}: logits differ by {error:.2e} of the largest, expected < 1e-5")
    # The from_pretrained folder: its config.json, and the model transformers builds from it
    # where transformers is installed (else the PyTorch twin above, built from config.json).
    folder = os.path.join(work, "hf-model")
    tensors, metadata, _ = read_safetensors.load(os.path.join(folder, "model.safetensors"))
    hf, config_failures = check_hf_config(os.path.join(folder, "config.json"),
                                          json.loads(metadata["lowrank.gpt2"])["config"])
    failures += config_failures
    if not config_failures:
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            model = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float64).eval()
            source = "transformers.GPT2LMHeadModel.from_pretrained"
            with torch.no_grad():
                got = model(ids).logits
        else:
            cfg = {"n_embd": hf["n_embd"], "n_layer": hf["n_layer"], "n_head": hf["n_head"],
                   "block_size": hf["n_positions"], "vocab_size": hf["vocab_size"]}
            model = Gpt2(cfg, True).double()
            missing, unexpected = model.load_state_dict({k: v.double() for k, v in tensors.items()}, strict=False)
            if sorted(missing) != ["lm_head.weight"] or unexpected:
                failures.append(f"hf-model: missing {sorted(missing)}, unexpected {unexpected}")
            source = "config.json (transformers is not installed)"
            with torch.no_grad():
                got = model(ids)
        error = (got - expected).abs().max().item() / expected.abs().max().item()
        print(f"hf-model: built from {source}, max error {error:.2e} of max |logit|")
        if not error < 1e-5:
            failures.append(f"hf-model: logits differ by {error:.2e} of the largest, expected < 1e-5")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
