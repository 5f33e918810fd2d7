#!/usr/bin/env python3
"""The main comparison: the byte-level GPT (GPT-2's architecture over 256 byte symbols,
`lowrank-gpt2 --tokenizer bytes`) trained on the real text corpus with dense training and
low-rank methods, each with several seeds, on the same token budget. The low-rank methods act
on all four projections of every block, which carry nearly all of this model's parameters and
FLOPs (the head is a 256-row matrix), so a rank cut is a cut in size and in time.

    python3 scripts/compare_bytes.py                       # dense, sst, inrank, cuttlefish; 3 seeds
    python3 scripts/compare_bytes.py --methods all --seeds 5
    python3 scripts/compare_bytes.py --write-docs          # also the README's and docs/results.md's blocks

Printed per method: validation bits per byte (mean ± 95% interval over the seeds), its
difference to dense paired by seed (the same seed gives the same batches), whether that
difference is beyond the seeds' noise (its interval excludes 0), parameters, trainable
parameters, training seconds and the speed-up in tokens/s over dense. Two runs go at a time,
one thread each. Every number comes from the runs' JSON output; raw outputs stay in --out.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

from results_common import (METHODS, ROOT, add_byte_run_options, build_byte_trainer, check_methods,
                            format_ci, machine_line, mean_ci, paired_verdict, relative_command,
                            replace_block, run_grid)

BEGIN, END = "<!-- compare-bytes:begin -->", "<!-- compare-bytes:end -->"
DEFAULT_METHODS = ["dense", "sst", "inrank", "cuttlefish"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)}, or all (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per method (default %(default)s)")
    ap.add_argument("--config", default="mini", help="model config (default %(default)s: 2 layers, width 128)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50,
                    help="steps between evaluations, also the policies' epoch (Cuttlefish tracks stable ranks once an "
                         "epoch; default %(default)s)")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--rank", type=int, default=0, help="0: n_embd / 4")
    add_byte_run_options(ap, "bytes")
    ap.add_argument("--write-docs", action="store_true",
                    help="write the table into README.md and docs/results.md (their compare-bytes blocks)")
    ap.add_argument("extra", nargs="*", help="further lowrank-gpt2 options, after --")
    return ap.parse_args()


def summarise(runs, seeds):
    """Per method: the statistics of its seeds, and its differences to dense paired by seed."""
    dense = runs.get("dense")
    rows = {}
    for method, by_seed in runs.items():
        bpb = [by_seed[s]["result"]["val_bpb"] for s in seeds]
        row = {"bpb": mean_ci(bpb),
               "train_seconds": mean_ci([by_seed[s]["result"]["train_seconds"] for s in seeds]),
               "tokens_per_second": mean_ci([by_seed[s]["result"]["tokens_per_second"] for s in seeds]),
               "params": by_seed[seeds[0]]["result"]["params"],
               "trainable": by_seed[seeds[0]]["result"]["trainable_params"],
               "ranks": sorted({v for s in seeds for v in by_seed[s]["result"]["final_ranks"].values()})}
        if dense and method != "dense":
            row["delta"] = mean_ci([b - dense[s]["result"]["val_bpb"] for b, s in zip(bpb, seeds)])
            row["speedup"] = mean_ci([by_seed[s]["result"]["tokens_per_second"] /
                                      dense[s]["result"]["tokens_per_second"] for s in seeds])
        rows[method] = row
    return rows


def verdict(delta):
    return paired_verdict(delta, " than dense")


def ranks_text(ranks):
    if not ranks:
        return "-"
    return ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]}"


def table(rows, unigram_bpb, n_seeds):
    out = [f"| method | val bits/byte ({n_seeds} seeds) | vs dense (paired) | verdict | parameters | trainable | "
           "train s | speed-up | final ranks |",
           "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for method, r in rows.items():
        delta = format_ci(*r["delta"]) if "delta" in r else ""
        speed = format_ci(*r["speedup"], digits=2) + "x" if "speedup" in r else ""
        out.append(f"| `{method}` | {format_ci(*r['bpb'])} | {delta} | {verdict(r['delta']) if 'delta' in r else ''} | "
                   f"{r['params']:,} | {r['trainable']:,} | {r['train_seconds'][0]:.1f} | {speed} | "
                   f"{ranks_text(r['ranks'])} |")
    if unigram_bpb:
        out.append(f"| unigram baseline | {unigram_bpb:.3f} | | | | | | | |")
    # One line that says which differences are beyond the seeds' noise.
    groups = {}
    for method, r in rows.items():
        if "delta" in r:
            groups.setdefault(verdict(r["delta"]), []).append(method)
    if groups:
        out.append("")
        out.append("Against dense, in bits per byte: " + "; ".join(
            f"{v}: {', '.join(ms)}" for v, ms in groups.items()) + ".")
    return "\n".join(out)


def write_docs(runs, rows, args, seeds, unigram_bpb, seconds):
    any_run = next(iter(runs.values()))[seeds[0]]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    methods_arg = "" if args.methods == ",".join(DEFAULT_METHODS) else f" --methods {args.methods}"
    body = [
        BEGIN,
        "```text",
        table(rows, unigram_bpb, len(seeds)),
        "```",
        "",
        f"Written by `python3 scripts/compare_bytes.py{methods_arg} --write-docs` (what `bash scripts/run-gpt2.sh` "
        f"runs) on {now[:10]}, {machine_line()}, {seconds / 60:.1f} minutes in all: config `{args.config}` over "
        f"bytes, {args.steps} steps of {args.batch} x {args.context} bytes ({int(any_run['result']['tokens']):,} "
        f"bytes), AdamW lr "
        f"{args.lr} with warm-up and cosine decay, seeds {seeds[0]}-{seeds[-1]}, {args.jobs} runs at a time with "
        f"{args.threads} thread each. The intervals are 95% (Student's t over the seeds); \"vs dense\" is the "
        "difference in bits per byte to dense run with the same seed; \"speed-up\" is tokens/s over dense's. "
        "The low-rank methods act on all four projections of each block at rank n_embd / 4 (InRank and "
        "Cuttlefish choose their own). A run's command (seed 0 of the first method):",
        "",
        "```",
        relative_command(any_run["cmd"]),
        "```",
        END,
    ]
    for page in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        replace_block(page, BEGIN, END, "\n".join(body))


def main():
    args = parse_args()
    methods = check_methods(args.methods)
    seeds = list(range(args.seeds))
    binary = build_byte_trainer(args.binary)
    summary = Path(args.data + ".json")
    unigram_bpb = json.loads(summary.read_text()).get("unigram_val_bits_per_byte") if summary.exists() else None
    common = ["--tokenizer", "bytes", "--config", args.config, "--steps", str(args.steps), "--batch",
              str(args.batch), "--context", str(args.context), "--lr", str(args.lr), "--eval-every",
              str(args.eval_every), "--eval-windows", str(args.eval_windows), "--data", args.data]
    if args.rank:
        common += ["--rank", str(args.rank)]
    specs = {m: ["--method", m, *args.extra] for m in methods}
    out = Path(args.out)
    start = datetime.datetime.now()
    runs = run_grid(binary, specs, seeds, common, out, args.jobs, args.threads, reuse=args.reuse)
    seconds = (datetime.datetime.now() - start).total_seconds()
    rows = summarise(runs, seeds)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, unigram_bpb, len(seeds)))
    print(f"compare_bytes: {len(methods) * len(seeds)} runs in {seconds / 60:.1f} minutes", file=sys.stderr)
    if args.write_docs:
        write_docs(runs, rows, args, seeds, unigram_bpb, seconds)


if __name__ == "__main__":
    main()
