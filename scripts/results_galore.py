#!/usr/bin/env python3
"""GaLore's headline in direction, on the MLP: optimizer-state memory against AdamW at equal
quality. Runs lowrank-mlp dense and with --method galore (the authors' scale 0.25, and 1)
over several seeds at the same budget, and writes the GaLore section of docs/results.md:
test accuracy with a 95% interval, the paired difference to dense, the optimizer-state
bytes each run reports against AdamW's (and the formula's ratio), and the peak RSS.

    python3 scripts/results_galore.py                       # build, run, write docs/results.md
    python3 scripts/results_galore.py --seeds 0 --epochs 1 --no-docs   # a quick look

Every number on the page comes from the runs' JSON output. The raw outputs stay in --out.
"""

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from results_common import ROOT, build, cpu_name, relative_command, replace_block, run_trainer

BEGIN, END = "<!-- results-galore:begin -->", "<!-- results-galore:end -->"
# Two-sided 95% quantiles of Student's t for n - 1 degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rank", type=int, default=0, help="0: hidden / 4")
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3, help="the dense runs' lr (lowrank-mlp's default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--binary", default=None, help="a built lowrank-mlp (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "galore"))
    ap.add_argument("--no-docs", action="store_true")
    return ap.parse_args()


def interval(xs):
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def galore_count(m, n, r):
    return 2 * r * max(m, n) + min(m, n) * r


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    binary = args.binary
    if binary is None:
        build("lowrank-mlp")
        binary = str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = args.rank or args.hidden // 4
    galore = ["--method", "galore", "--galore-gap", str(args.gap)]
    lr = str(args.lr)
    # The authors' α 0.25 at the dense lr, α 1 at the dense lr, and α 0.25 at 4x the lr (their
    # LLaMA-60M script pairs α 0.25 with a higher lr for every parameter, so that α·lr, the
    # projected weights' step, is not smaller than a dense run's).
    variants = {
        "dense": ["--lr", lr],
        "galore, α 0.25": [*galore, "--galore-scale", "0.25", "--lr", lr],
        "galore, α 1": [*galore, "--galore-scale", "1", "--lr", lr],
        "galore, α 0.25, 4× lr": [*galore, "--galore-scale", "0.25", "--lr", str(4 * args.lr)],
        # The control of that row: is it GaLore, or only the higher lr?
        "dense, 4× lr": ["--lr", str(4 * args.lr)],
    }
    runs = {name: [] for name in variants}
    for seed in seeds:
        for name, extra in variants.items():
            tag = name.replace(", ", "-").replace(" ", "").replace("α", "a").replace("×", "x") + f"-seed{seed}"
            cmd = [binary, "--epochs", str(args.epochs), "--hidden", str(args.hidden), "--seed", str(seed),
                   "--threads", str(args.threads), "--data", args.data, "--rank", str(rank),
                   "--log", str(out / f"{tag}.metrics.jsonl"), "--rank-log", str(out / f"{tag}.ranks.jsonl"),
                   "--quiet", *extra]
            runs[name].append(run_trainer(cmd, tag, out / f"{tag}.metrics.jsonl", out / f"{tag}.ranks.jsonl"))
    (out / "runs.json").write_text(json.dumps({k: [r["result"] for r in v] for k, v in runs.items()}, indent=1))

    def reference(name):  # each run against dense at the same lr
        return "dense, 4× lr" if "4× lr" in name else "dense"

    def accuracies(name):
        return [r["result"]["test_accuracy"] for r in runs[name]]

    rows = ["| run | test accuracy (95% CI) | vs dense at the same lr, paired (95% CI) | optimizer state | AdamW's | ratio | peak RSS | of it, added by the steps |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        acc = accuracies(name)
        m, h = interval([100 * a for a in acc])
        diff = ""
        if reference(name) != name:
            dm, dh = interval([100 * (a - b) for a, b in zip(acc, accuracies(reference(name)))])
            diff = f"{dm:+.2f} ± {dh:.2f} pt"
        state = statistics.fmean(r["result"]["optimizer_state_bytes"] for r in rs)
        adamw = statistics.fmean(r["result"]["adamw_state_bytes"] for r in rs)
        rss = statistics.fmean(r["result"]["peak_rss_bytes"] for r in rs)
        added = statistics.fmean(r["result"]["peak_rss_bytes"] - r["result"]["rss_before_steps_bytes"] for r in rs)
        rows.append(f"| {name} | {m:.2f} ± {h:.2f}% | {diff} | {state / 2**20:.2f} MiB | {adamw / 2**20:.2f} MiB | "
                    f"{state / adamw:.3f} | {rss / 2**20:.1f} MiB | {added / 2**20:.1f} MiB |")
    # The formula's ratio for the model's weights (hidden layers projected, output layer and
    # biases plain), to set beside the measured one.
    sizes = [784] + [args.hidden] * 2 + [10]
    layers = list(zip(sizes[1:], sizes[:-1]))  # (out, in)
    plain = sum(o * i + o for o, i in layers[-1:]) + sum(o for o, _ in layers[:-1])
    projected = sum(galore_count(o, i, rank) for o, i in layers[:-1])
    full = sum(o * i for o, i in layers[:-1])
    formula = (projected + 2 * plain) / (2 * full + 2 * plain)

    program = relative_command([binary]) if binary.startswith(str(ROOT)) else Path(binary).name
    cmd = " ".join([program, "--epochs", str(args.epochs), "--hidden", str(args.hidden), "--rank", str(rank),
                    "--seed", "S", "[--method galore --galore-gap", str(args.gap), "--galore-scale α]", "--lr", "…"])
    verdict_rows = []
    for name in variants:
        if name.startswith("dense"):
            continue
        acc = accuracies(name)
        dm, dh = interval([100 * (a - b) for a, b in zip(acc, accuracies(reference(name)))])
        ref = f"`{reference(name)}`"
        if len(acc) < 2:
            verdict = "one seed: no interval"
        elif dm + dh < 0:
            verdict = f"below {ref} (the interval excludes 0)"
        elif dm - dh > 0:
            verdict = f"above {ref} (the interval excludes 0)"
        else:
            verdict = f"not distinguishable from {ref} at this number of seeds"
        verdict_rows.append(f"- `{name}`: {verdict}.")
    block = "\n".join([
        BEGIN,
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({args.threads} thread), "
        f"`scripts/results_galore.py --seeds {args.seeds} --epochs {args.epochs}`; each run is "
        f"`{cmd}` on Fashion-MNIST, MLP 784-{args.hidden}-{args.hidden}-10, rank {rank} "
        f"(hidden / 4), gap {args.gap}, lr {args.lr:g} (4× where the row says so), the trainer's "
        f"weight decay and schedule for all runs. "
        f"{len(seeds)} seeds; intervals are 95% t-intervals over seeds, each difference paired by "
        f"seed with the dense run at the same lr.",
        "",
        *rows,
        "",
        f"The optimizer state is what `Optimizer::state_bytes()` counts at the end of the run; "
        f"\"AdamW's\" is two moments of every trainable parameter. The formula "
        f"(2·r·max(m, n) + r·min(m, n) per projected weight, 2·size for the rest) gives "
        f"{formula:.3f} for this model. The peak RSS is the whole process's, a mean over seeds "
        f"(Fashion-MNIST in memory is most of it); *added by the steps* is the peak less what the "
        f"process held right before its first step (data, model, optimizer groups, the policy "
        f"set up): the steps' own working memory, the optimizer state among it.",
        "",
        *verdict_rows,
        END,
    ])
    print(block)
    if not args.no_docs:
        replace_block(ROOT / "docs" / "results.md", BEGIN, END, block)


if __name__ == "__main__":
    sys.exit(main())
