#!/usr/bin/env python3
"""Trains GPT-2 (the `tiny` config by default) on the real text corpus with dense training
and low-rank methods, the same token budget and seed, and prints a comparison: validation
loss and perplexity, parameters (total and trainable), tokens/s, final ranks.

    python3 scripts/results_gpt2.py                        # dense, sst, inrank, cuttlefish
    python3 scripts/results_gpt2.py --methods all          # all seven methods
    python3 scripts/results_gpt2.py --methods dense,sst --steps 200
    python3 scripts/results_gpt2.py --methods all --write-docs   # also docs/results.md + plot

The default budget is 1000 steps of 8 x 64 tokens (512,000 tokens). Two runs go at a time
(--jobs), one thread each: on 2 cores that makes more tokens/s than one run on two threads.
With OpenBLAS installed (scripts/setup.sh installs it) the runs use lowrank-gpt2-openblas,
about 1.4x faster than Eigen's own GEMM here; on this 2-core machine each run takes about 6
minutes, so the default four methods take about 13 and all seven about 25.

Every number comes from the runs' JSON output and logs; nothing is typed in. The corpus is
tokenized once by scripts/prepare_text.sh; raw outputs stay in --out.
"""

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from results_common import (METHODS, ROOT, build, check_methods, cpu_name, gnuplot, rank_series,
                            relative_command, replace_block, run_trainer, trainer_env)

BEGIN, END = "<!-- results-gpt2:begin -->", "<!-- results-gpt2:end -->"
DEFAULT_METHODS = ["dense", "sst", "inrank", "cuttlefish"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)}, or all (default: {','.join(DEFAULT_METHODS)}: "
                         "dense and the three methods that train low-rank from scratch; all seven take about twice "
                         "as long)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--rank", type=int, default=0, help="0: n_embd / 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs at once (default: 2, or 1 on a 1-core machine); with --threads 1 each, two runs "
                         "make more tokens/s on 2 cores than one run on 2 threads")
    ap.add_argument("--gemm", choices=["auto", "openblas", "eigen"], default="auto",
                    help="auto (default): lowrank-gpt2-openblas (Eigen's products in OpenBLAS) where OpenBLAS "
                         "is installed, else lowrank-gpt2 (Eigen's own GEMM)")
    ap.add_argument("--binary", default=None, help="a built lowrank-gpt2 (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "text" / "corpus"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "gpt2"))
    ap.add_argument("--write-docs", action="store_true", help="write the table and plot into docs/results.md")
    ap.add_argument("--reuse", action="store_true",
                    help="take a method's result from --out when its run there had exactly the same command line "
                         "(for re-running some methods after a change that affects only them; the binary is not "
                         "compared, so do not use it after a change to the library)")
    ap.add_argument("extra", nargs="*", help="further lowrank-gpt2 options, after --")
    return ap.parse_args()


def run_method(binary, method, args, out):
    log = out / f"{method}.metrics.jsonl"
    ranks = out / f"{method}.ranks.jsonl"
    cmd = [binary, "--config", args.config, "--method", method, "--steps", str(args.steps),
           "--batch", str(args.batch), "--context", str(args.context), "--lr", str(args.lr),
           "--eval-every", str(args.eval_every), "--eval-windows", str(args.eval_windows),
           "--seed", str(args.seed), "--threads", str(args.threads), "--data", args.data,
           "--log", str(log), "--rank-log", str(ranks), "--quiet", *args.extra]
    if args.rank:
        cmd += ["--rank", str(args.rank)]
    saved = out / f"{method}.run.json"
    if args.reuse and saved.exists():
        previous = json.loads(saved.read_text())
        if previous["cmd"] == cmd:
            print(f"results: {method}: reusing the run in {saved} (same command)", file=sys.stderr)
            return previous
    run = run_trainer(cmd, method, log, ranks, env=trainer_env(args.threads))
    saved.write_text(json.dumps(run))
    return run


def table(runs, unigram):
    dense = runs.get("dense")
    rows = ["| method | val loss | val perplexity | vs dense | parameters | trainable | tokens/s | train s | final ranks (MLP projections) | rank events |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for method, run in runs.items():
        r = run["result"]
        delta = f"{100 * (r['val_ppl'] / dense['result']['val_ppl'] - 1):+.1f}%" if dense else ""
        ranks = sorted(set(r["final_ranks"].values()))
        rank_text = ", ".join(str(v) for v in ranks) if ranks else "-"
        rows.append(f"| `{method}` | {r['val_loss']:.4f} | {r['val_ppl']:.1f} | {delta} | {r['params']:,} | "
                    f"{r['trainable_params']:,} | {r['tokens_per_second']:,.0f} | {r['train_seconds']:.1f} | "
                    f"{rank_text} | {r['rank_events']} |")
    if unigram:
        rows.append(f"| unigram baseline | {math.log(unigram):.4f} | {unigram:.1f} | | | | | | | |")
    return "\n".join(rows)


def plot(runs, out_svg, data_dir):
    loss = {m: [(e["step"], e["val_loss"]) for e in run["log"]] for m, run in runs.items()}
    panels = [("validation loss over training", "val loss", loss)]
    layer = "transformer.h.0.mlp.c_fc"
    ranks = {}
    for m, run in runs.items():
        final = run["result"]["final_ranks"].get(layer)
        if final is not None:
            ranks[m] = rank_series(run, layer, final, final)
    if ranks:
        panels.append((f"{layer}: rank over training", "rank", ranks))
    return gnuplot(panels, out_svg, data_dir, "optimizer step")


def write_docs(runs, args, unigram, svg_ok):
    any_run = next(iter(runs.values()))["result"]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    tokens = int(any_run["tokens"])
    methods_arg = "" if args.methods == ",".join(DEFAULT_METHODS) else f" --methods {args.methods}"
    body = [
        BEGIN,
        f"Run {now} on {cpu_name()} ({os.cpu_count()} vCPUs), load average {os.getloadavg()[0]:.2f} at the end; "
        f"`python3 scripts/results_gpt2.py{methods_arg} --write-docs`: config `{args.config}`, {args.steps} steps of "
        f"{args.batch} x {args.context} tokens ({tokens:,} tokens), AdamW lr {args.lr} with warm-up and cosine "
        f"decay, seed {args.seed}; {args.jobs} run(s) at a time, {args.threads} thread(s) each, GEMM: "
        f"{any_run.get('gemm', 'eigen')}. The low-rank methods act on the MLP projections "
        "(mlp_fc, mlp_proj) at rank n_embd / 4 (InRank and Cuttlefish choose their own, Deep LoRA trains "
        "uncompressed full-width factors, the authors' default); attention, embeddings "
        "and norms stay dense. Validation: the same windows of held-out text for every method.",
        "",
        table(runs, unigram),
        "",
    ]
    if svg_ok:
        body += ["![validation loss and rank over training](results/gpt2.svg)", ""]
    body += ["The exact commands:\n", "```"] + [relative_command(r["cmd"]) for r in runs.values()] + ["```", END]
    replace_block(ROOT / "docs" / "results.md", BEGIN, END, "\n".join(body))


def build_trainer(gemm):
    """Prepares the corpus and builds the trainer; returns its path."""
    subprocess.run(["bash", str(ROOT / "scripts" / "prepare_text.sh")], check=True, stdout=sys.stderr)
    folder = ROOT / "build" / "release" / "examples" / "gpt2"
    if gemm != "eigen":
        try:
            build("lowrank-gpt2-openblas")
            return str(folder / "lowrank-gpt2-openblas")
        except subprocess.CalledProcessError:
            if gemm == "openblas":
                raise SystemExit("results: lowrank-gpt2-openblas did not build (is libopenblas-dev installed?)")
            print("results: no lowrank-gpt2-openblas, using lowrank-gpt2 (Eigen's GEMM)", file=sys.stderr)
    build("lowrank-gpt2")
    return str(folder / "lowrank-gpt2")


def main():
    args = parse_args()
    methods = check_methods(args.methods)
    binary = args.binary or build_trainer(args.gemm)
    summary = Path(args.data + ".json")
    unigram = json.loads(summary.read_text()).get("unigram_val_perplexity") if summary.exists() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {m: pool.submit(run_method, binary, m, args, out) for m in methods}
        runs = {m: f.result() for m, f in futures.items()}
    (out / "summary.json").write_text(json.dumps({m: r["result"] for m, r in runs.items()}, indent=1))
    print(table(runs, unigram))
    if args.write_docs:
        svg = ROOT / "docs" / "results" / "gpt2.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        write_docs(runs, args, unigram, plot(runs, svg, out))


if __name__ == "__main__":
    main()
