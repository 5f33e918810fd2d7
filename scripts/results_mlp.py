#!/usr/bin/env python3
"""Runs every method of lowrank-mlp on Fashion-MNIST with the same budget and seed and
writes docs/results.md: a table of what each run measured (accuracy, parameters, time,
final ranks) and a plot of each method's per-layer rank over training (gnuplot, SVG).

    python3 scripts/results_mlp.py                      # build, run all methods, write docs
    python3 scripts/results_mlp.py --epochs 2 --no-docs # a quick look, nothing written to docs/
    python3 scripts/results_mlp.py --methods dense,sst

Every number on the page comes from the runs' JSON output and rank logs; nothing is typed
in. The raw outputs stay in --out (default build/results/mlp).
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from results_common import (METHODS, ROOT, build, check_methods, cpu_name, gnuplot, rank_series,
                            relative_command, replace_block, run_trainer)
BEGIN, END = "<!-- results-mlp:begin -->", "<!-- results-mlp:end -->"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rank", type=int, default=0, help="0: hidden / 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--binary", default=None, help="a built lowrank-mlp (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "mlp"))
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/results.md and its plot")
    ap.add_argument("extra", nargs="*", help="further lowrank-mlp options, after --")
    return ap.parse_args()


def run_method(binary, method, args, out):
    log = out / f"{method}.metrics.jsonl"
    ranks = out / f"{method}.ranks.jsonl"
    cmd = [binary, "--method", method, "--epochs", str(args.epochs), "--hidden", str(args.hidden),
           "--seed", str(args.seed), "--threads", str(args.threads), "--data", args.data,
           "--log", str(log), "--rank-log", str(ranks), "--quiet", *args.extra]
    if args.rank:
        cmd += ["--rank", str(args.rank)]
    return run_trainer(cmd, method, log, ranks)


def plot(runs, out_svg, data_dir):
    """One panel per method, one series per hidden layer: its rank over training, as the
    rank log's events step it (from the layer's initial rank: the "init" event's, else the
    hidden width), on a log axis when a method's ranks span a decade or more."""
    any_run = next(iter(runs.values()))
    names = list(any_run["result"]["final_ranks"].keys())[:-1]  # hidden layers; the output layer stays dense
    panels = []
    for method, run in runs.items():
        series = {}
        for name in names:
            final = run["result"]["final_ranks"][name]
            start = run["result"].get("hidden", final)
            series[name] = rank_series(run, name, start, final)
        values = [r for points in series.values() for _, r in points if r > 0]
        log_y = bool(values) and max(values) >= 10 * min(values)
        panels.append((f"{method}: rank of each hidden layer over training", "rank", series, {"log_y": log_y}))
    return gnuplot(panels, out_svg, data_dir, "optimizer step")


def table(runs):
    dense = runs.get("dense")
    rows = ["| method | test accuracy | vs dense | test loss | parameters | trainable | train s | samples/s | final ranks | rank events |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for method, run in runs.items():
        r = run["result"]
        delta = ""
        if dense:
            delta = f"{100 * (r['test_accuracy'] - dense['result']['test_accuracy']):+.2f} pt"
        ranks = ", ".join(f"{k}: {v}" for k, v in r["final_ranks"].items())
        rows.append(f"| `{method}` | {100 * r['test_accuracy']:.2f}% | {delta} | {r['test_loss']:.4f} | "
                    f"{r['params']:,} | {r['trainable_params']:,} | {r['train_seconds']:.1f} | "
                    f"{r['samples_per_second']:,.0f} | {ranks} | {r['rank_events']} |")
    return "\n".join(rows)


def write_docs(runs, args, svg_ok):
    page = ROOT / "docs" / "results.md"
    any_run = next(iter(runs.values()))["result"]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    load = os.getloadavg()[0]
    body = [
        BEGIN,
        f"Run {now} on {cpu_name()} ({os.cpu_count()} vCPUs), load average {load:.2f} at the end; "
        f"`python3 scripts/results_mlp.py` with {args.epochs} epochs, hidden width {args.hidden}, "
        f"{any_run['layers']} hidden layers, batch {any_run['batch']}, AdamW lr {any_run['lr']}, "
        f"weight decay {any_run['weight_decay']}, seed {args.seed}, {args.threads} thread(s). "
        "Each method runs with lowrank-mlp's defaults: the policies' own (docs/methods/), "
        "except InRank's explained-ratio threshold, 0.97 instead of the authors' 0.9 (see below). "
        "`--rank` is hidden / 4 for LoRA, ReLoRA, SST (active pairs) and GaLore (the projection's "
        "rank, at the authors' α 0.25 and the same lr: scripts/results_galore.py compares lrs); Deep LoRA trains its "
        "uncompressed full-width factors (the authors' default); InRank and Cuttlefish choose their "
        "own ranks.",
        "",
        table(runs),
        "",
        "*parameters*: what the model holds at the end of training (an InRank layer counts its "
        "active columns; LoRA-style layers count their frozen base); *trainable*: what the "
        "optimizer updates at the end; *rank events*: decisions in the run's rank log.",
        "",
    ]
    if svg_ok:
        body += ["![per-layer rank over training](results/mlp_ranks.svg)", ""]
    body.append("The exact commands:\n")
    body.append("```")
    for run in runs.values():
        body.append(relative_command(run["cmd"]))
    body.append("```")
    body.append(END)
    replace_block(page, BEGIN, END, "\n".join(body))


def main():
    args = parse_args()
    methods = check_methods(args.methods)
    if not args.binary:
        build("lowrank-mlp")
    binary = args.binary or str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {m: run_method(binary, m, args, out) for m in methods}
    (out / "summary.json").write_text(json.dumps({m: r["result"] for m, r in runs.items()}, indent=1))
    print(table(runs))
    if not args.no_docs:
        svg = ROOT / "docs" / "results" / "mlp_ranks.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        ok = plot(runs, svg, out)
        write_docs(runs, args, ok)


if __name__ == "__main__":
    main()
