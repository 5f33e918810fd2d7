#!/usr/bin/env python3
"""What each method's files weigh on the tiny GPT-2 (docs/checkpoints.md, "File sizes").

Trains each method a few steps on the BPE corpus with `lowrank-gpt2 --config tiny
--out-dir`, then reads the checkpoint's safetensors header and splits its bytes into the
model's parameters and the optimizer's state ("optimizer.*": the moments, and GaLore's
projectors). The optimizer state is stored in the shapes the method trains: a low-rank
method's factors, never a dense copy of a factorised weight; a frozen base (LoRA, ReLoRA,
Deep LoRA) has no state; InRank's moments cover only the active columns. Prints a markdown
block, or with --write replaces the one in docs/checkpoints.md.

    python3 scripts/checkpoint_sizes.py [--binary PATH] [--steps N] [--write]

Each method's schedule is shortened to act within the few steps (ReLoRA restarts every 2
steps, InRank checks from step 1 and cuts at step 3, SST samples every 2 steps, GaLore
re-projects every 2), and Cuttlefish is given a detector that switches at its first tracking
point (threshold 1000, window 2, tail 1, tracking every step), so its checkpoint holds the
factors, not the dense phase (which weighs what dense does). Otherwise the trainer's
defaults (rank: a quarter of the width).
"""

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_common import ROOT, build, machine_line, relative_command, replace_block  # noqa: E402

# label: (method, its options).
METHODS = {
    "dense": ("dense", []),
    "lora": ("lora", []),
    "relora": ("relora", ["--relora-period", "2", "--relora-rewarm", "1"]),
    "inrank": ("inrank", ["--inrank-warmup", "1", "--inrank-gap", "1", "--inrank-stage1-steps", "3"]),
    "cuttlefish": ("cuttlefish", ["--cuttlefish-threshold", "1000", "--cuttlefish-window", "2",
                                  "--cuttlefish-tail", "1", "--cuttlefish-track-steps", "1"]),
    "sst": ("sst", ["--sst-iteration-steps", "2", "--sst-rewarm", "1"]),
    "deeplora (the authors' default: full width)": ("deeplora", []),
    "deeplora --deeplora-compress": ("deeplora", ["--deeplora-compress"]),
    "galore": ("galore", ["--galore-gap", "2"]),
}


def header(path):
    """The tensors of a safetensors file: {name: bytes}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    doc.pop("__metadata__", None)
    return {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in doc.items()}


def mb(n):
    return f"{n / 1e6:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", help="lowrank-gpt2 (default: build/release's, built if missing)")
    ap.add_argument("--steps", type=int, default=4, help="steps each method trains before it saves")
    ap.add_argument("--write", action="store_true", help="replace the block in docs/checkpoints.md")
    args = ap.parse_args()
    if args.binary:
        binary = Path(args.binary).resolve()
    else:
        build("lowrank-gpt2")
        binary = ROOT / "build/release/examples/gpt2/lowrank-gpt2"
    data = ROOT / "data/text/corpus"
    if not Path(f"{data}.train.bin").exists():
        raise SystemExit(f"checkpoint_sizes: {data}.train.bin is missing; run: bash scripts/prepare_text.sh")

    rows, commands = [], []
    out = Path(tempfile.mkdtemp(prefix="lowrank-sizes-"))
    try:
        for i, (label, (method, extra)) in enumerate(METHODS.items()):
            run = out / f"{i}-{method}"
            cmd = [str(binary), "--config", "tiny", "--method", method, "--steps", str(args.steps), "--batch", "2",
                   "--warmup-steps", "1", "--eval-every", str(args.steps), "--eval-windows", "2", "--data", str(data),
                   "--seed", "0", "--threads", "1", "--out-dir", str(run), "--export", str(run / "lowrank.safetensors"),
                   "--export-layout", "lowrank", "--quiet", *extra]
            commands.append(relative_command(cmd).replace(str(out), "OUT"))
            print("checkpoint_sizes: " + label, file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            result = json.loads((run / "result.json").read_text())
            ckpt = run / "checkpoint.safetensors"
            tensors = header(ckpt)
            state = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
            ranks = sorted(set(result["final_ranks"].values()))
            rows.append({
                "method": label,
                "ranks": "–" if method == "dense" else ", ".join(map(str, ranks)),
                "file": ckpt.stat().st_size,
                "weights": sum(tensors.values()) - sum(state.values()),
                "state": sum(state.values()),
                "state_tensors": len(state),
                "tensors": len(tensors),
                "export": (run / "lowrank.safetensors").stat().st_size,
            })
    finally:
        shutil.rmtree(out, ignore_errors=True)

    dense_state = rows[0]["state"]
    lines = ["<!-- checkpoint-sizes:begin -->",
             f"Written by `scripts/checkpoint_sizes.py` ({args.steps} steps of each method, F32); {machine_line()}.",
             "",
             "| method | ranks at the save | checkpoint bytes | parameters MB | optimizer state MB "
             "| state vs dense's | state tensors / all | `--export-layout lowrank` bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ranks']} | {r['file']:,} | {mb(r['weights'])} | {mb(r['state'])} "
                     f"| {r['state'] / dense_state:.2f} | {r['state_tensors']} / {r['tensors']} | {r['export']:,} |")
    lines += ["", "Each method's command (OUT: a temporary folder):", "", "```"] + commands + ["```",
              "<!-- checkpoint-sizes:end -->"]
    block = "\n".join(lines)
    print(block)
    if args.write:
        replace_block(ROOT / "docs/checkpoints.md", "<!-- checkpoint-sizes:begin -->", "<!-- checkpoint-sizes:end -->",
                      block)


if __name__ == "__main__":
    main()
