#!/usr/bin/env python3
"""The memory of a training step, dense and each method, on GPT-2 `tiny` and on the MLP: the
process's peak resident set beside the parts computed from the run's own sizes.

    python3 scripts/memory.py                 # 16 short runs, about 3 minutes on 2 cores
    python3 scripts/memory.py --write-docs    # also the memory block of docs/performance.md

Per run (each trainer's JSON output, nothing typed in):
- the peak RSS of the steps (`peak_rss_steps_bytes`: the kernel's high-water mark, reset
  just before the first step, so the data loading's own peak is not in it; evaluations are)
  and the RSS before the first step (`rss_before_steps_bytes`: program, data, model,
  policies); the steps added the difference;
- parameters: 4 bytes per parameter at the end (held before the first step already);
- gradients: 4 bytes per trainable parameter (a frozen one keeps no gradient buffer);
- optimizer state: `optimizer_state_bytes` (AdamW's two moments of what trains; GaLore's
  projected moments and bases);
- activations: `tape_bytes`, the node outputs and output gradients of the largest step
  (Graph::tape_bytes; buffers an op keeps beside them are not in it);
- the rest: what the steps added - gradients - optimizer state - activations, what the parts
  do not explain (an op's own buffers such as the fused head's block and attention's
  probabilities, GEMM packing, the allocator's slack, the evaluation's buffers).
A method whose shapes change during a run (Cuttlefish at its switch, InRank as it grows)
is reported as it ends, and its peak RSS may come from before the change (Cuttlefish's dense
phase); the schedules are shortened (SHORT) so that each acts within these short runs.
"""

import argparse
import datetime
import sys
from pathlib import Path

from results_common import (METHODS, ROOT, build, build_byte_trainer, check_methods, machine_line, relative_command,
                            replace_block, run_trainer, trainer_env)

BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
MB = 1e6
# A method's schedule shortened so that it acts within these short runs (the trainers refuse a
# schedule that cannot act): ReLoRA restarts, InRank checks its ranks, Cuttlefish decides at
# its second tracking point (on GPT-2 `tiny`, two steps in, its cost rule keeps every layer
# dense, the stable ranks being still near full; on the MLP it factorizes both hidden layers).
CUTTLEFISH_EARLY = ["--cuttlefish-window", "2", "--cuttlefish-tail", "1", "--cuttlefish-threshold", "1e9"]
SHORT = {
    "gpt2": {"relora": ["--relora-period", "3", "--relora-rewarm", "1"],
             "inrank": ["--inrank-warmup", "1", "--inrank-gap", "2", "--inrank-stage1-steps", "4"],
             "cuttlefish": [*CUTTLEFISH_EARLY, "--cuttlefish-track-steps", "1"]},
    "mlp": {"relora": ["--relora-period", "200"],
            "cuttlefish": [*CUTTLEFISH_EARLY, "--cuttlefish-track-steps", "50"]},
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--gpt2-steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="GPT-2 sequences a step (default %(default)s)")
    ap.add_argument("--context", type=int, default=128, help="GPT-2 tokens a sequence (default %(default)s)")
    ap.add_argument("--gpt2-binary", default=None, help="a built lowrank-gpt2 (default: build the release preset)")
    ap.add_argument("--mlp-binary", default=None, help="a built lowrank-mlp (default: build the release preset)")
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "memory"))
    ap.add_argument("--write-docs", action="store_true", help="write the block into docs/performance.md")
    return ap.parse_args()


def binaries(args):
    """lowrank-gpt2 (after the corpus is tokenized) and lowrank-mlp: given, or built."""
    gpt2 = build_byte_trainer(args.gpt2_binary)
    mlp = args.mlp_binary
    if mlp is None:
        build("lowrank-mlp")
        mlp = str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")
    return gpt2, mlp


def parts(result):
    peak, before = result["peak_rss_steps_bytes"], result["rss_before_steps_bytes"]
    if peak <= 0:
        raise SystemExit("memory: the run reports no peak_rss_steps_bytes (the kernel's peak mark could not be reset)")
    grads = 4 * result["trainable_params"]
    opt = result["optimizer_state_bytes"]
    tape = result["tape_bytes"]
    return {"peak": peak, "before": before, "added": peak - before, "params": 4 * result["params"],
            "grads": grads, "opt": opt, "tape": tape, "rest": peak - before - grads - opt - tape}


def mlp_shape(result):
    """The MLP's layer widths and batch as its result line gives them (784 pixels in, 10 classes out)."""
    widths = ["784", *[str(result["hidden"])] * result["layers"], "10"]
    return f"{'-'.join(widths)}, batch {result['batch']}"


def table(rows):
    out = ["| method | peak RSS of the steps | before the first step | added by the steps | gradients | "
           "optimizer state | activations (tape) | the rest | parameters (in \"before\") |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, p in rows:
        out.append(f"| `{method}` | {p['peak'] / MB:.1f} | {p['before'] / MB:.1f} | {p['added'] / MB:.1f} | "
                   f"{p['grads'] / MB:.1f} | {p['opt'] / MB:.1f} | {p['tape'] / MB:.1f} | {p['rest'] / MB:+.1f} | "
                   f"{p['params'] / MB:.1f} |")
    return "\n".join(out)


def main():
    args = parse_args()
    methods = check_methods(args.methods)
    gpt2, mlp = binaries(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {
        "gpt2": (gpt2, ["--config", "tiny", "--steps", str(args.gpt2_steps), "--batch", str(args.batch), "--context",
                        str(args.context), "--eval-every", "1000", "--eval-windows", "1", "--threads", "1"]),
        "mlp": (mlp, ["--epochs", "1", "--threads", "1"]),
    }
    runs = {}
    start = datetime.datetime.now()
    for model, (binary, common) in models.items():
        for m in methods:
            stem = out / f"{model}.{m}"
            cmd = [binary, *common, "--method", m, *SHORT[model].get(m, []), "--log", f"{stem}.metrics.jsonl", "--rank-log",
                   f"{stem}.ranks.jsonl", "--quiet"]
            runs[(model, m)] = run_trainer(cmd, f"{model} {m}", f"{stem}.metrics.jsonl", f"{stem}.ranks.jsonl",
                                           env=trainer_env(1))
    seconds = (datetime.datetime.now() - start).total_seconds()
    tables = {model: table([(m, parts(runs[(model, m)]["result"])) for m in methods]) for model in models}
    for model, t in tables.items():
        print(f"{model}:\n{t}\n")
    print(f"memory: {len(runs)} runs in {seconds / 60:.1f} minutes", file=sys.stderr)
    if not args.write_docs:
        return

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    block = "\n".join([
        BEGIN,
        f"Run {now} on {machine_line()}; written by `python3 scripts/memory.py --write-docs`. Megabytes (10^6 "
        "bytes); one run of each, one thread; RSS does not depend on the machine's load.",
        "",
        f"GPT-2 `tiny` (GPT-2's BPE vocabulary of 50,257), B = {args.batch}, T = {args.context}, "
        f"{args.gpt2_steps} steps:",
        "",
        tables["gpt2"],
        "",
        f"The MLP ({mlp_shape(runs[('mlp', methods[0])]['result'])}), one epoch:",
        "",
        tables["mlp"],
        "",
        f"Commands ({methods[0]}; the others take their own `--method M` and the short-run options of "
        "scripts/memory.py's SHORT, "
        "which make ReLoRA restart, InRank check its ranks and Cuttlefish switch within the run):",
        "",
        "```sh",
        relative_command(runs[("gpt2", methods[0])]["cmd"]),
        relative_command(runs[("mlp", methods[0])]["cmd"]),
        "```",
        END])
    replace_block(ROOT / "docs" / "performance.md", BEGIN, END, block)


if __name__ == "__main__":
    main()
