#!/usr/bin/env python3
"""Cuttlefish's detector on the MLP where its default (w 3, L 2, tau 0.3) was chosen: the
default against the authors' two presets (`cifar`: w 15, L 11, tau 0.1; `imagenet`: w 5,
L 5, tau 0.33 with the rank floor d/5; both record the initial weight first), at the
authors' cadence (one tracking point an epoch) and tracking every --track-steps steps,
beside dense, over several seeds, paired by seed. The `default+floor` arms are the default
detector with the imagenet preset's rank floor alone (--cuttlefish-rank-floor 0.2): they
tell the detector's effect from the floor's.

    python3 scripts/cuttlefish_detector.py                # 24 runs of lowrank-mlp, about 5 minutes on 2 cores
    python3 scripts/cuttlefish_detector.py --write-docs   # also the cuttlefish-detector block of
                                                          # docs/methods/cuttlefish.md

A detector that needs more tracking points than the run holds is refused before the first
step (Cuttlefish::on_train_begin); such an arm is run once and its error message is quoted
instead of a row. Printed per arm: test accuracy (mean ± 95% interval, Student's t over the
seeds), its paired difference to the default arm and to dense with verdicts, the switch
step per seed, the parameters at the end and train seconds. Every number comes from the
runs' JSON output and rank logs; the raw outputs stay in --out.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from results_common import (ROOT, build, format_ci, machine_line, mean_ci, relative_command, replace_block,
                            run_grid, trainer_env)

BEGIN, END = "<!-- cuttlefish-detector:begin -->", "<!-- cuttlefish-detector:end -->"
WINDOW = {"default": 3, "imagenet": 5, "cifar": 15}  # w of each detector (docs/methods/cuttlefish.md)
IMAGENET_FLOOR = 0.2  # the imagenet preset's rank floor, d/5: the default+floor arms add it alone


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per arm (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--track-steps", type=int, default=100,
                    help="--cuttlefish-track-steps of the second set of arms (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default %(default)s)")
    ap.add_argument("--binary", default=None, help="a built lowrank-mlp (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "cuttlefish_detector"))
    ap.add_argument("--reuse", action="store_true",
                    help="read back a run kept in --out with the same command instead of running it again")
    ap.add_argument("--write-docs", action="store_true", help="write the block into docs/methods/cuttlefish.md")
    return ap.parse_args()


def arms(track_steps):
    """label -> lowrank-mlp options; the first Cuttlefish arm is the default every arm is paired with."""
    cf = ["--method", "cuttlefish"]
    every = ["--cuttlefish-track-steps", str(track_steps)]
    floor = ["--cuttlefish-rank-floor", str(IMAGENET_FLOOR)]
    return {"dense": ["--method", "dense"],
            "default": cf,
            "default+floor": [*cf, *floor],
            "imagenet": [*cf, "--cuttlefish-preset", "imagenet"],
            "cifar": [*cf, "--cuttlefish-preset", "cifar"],
            f"default@{track_steps}": [*cf, *every],
            f"default+floor@{track_steps}": [*cf, *floor, *every],
            f"imagenet@{track_steps}": [*cf, "--cuttlefish-preset", "imagenet", *every],
            f"cifar@{track_steps}": [*cf, "--cuttlefish-preset", "cifar", *every]}


def refusal(binary, common, spec, threads):
    """The first line of the trainer's error when it refuses the arm before training, else None."""
    cmd = [binary, *common, *spec, "--seed", "0", "--threads", str(threads), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=trainer_env(threads))
    if proc.returncode == 0:
        return None
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    return {"cmd": cmd, "message": lines[-1] if lines else f"exit code {proc.returncode}"}


def switch_step(run):
    steps = [e["step"] for e in run["events"] if e.get("event") == "switch"]
    return min(steps) if steps else None


def switch_ranks(run):
    return sorted({e["new_rank"] for e in run["events"] if e.get("event") == "switch"})


def acc(run):
    return 100 * run["result"]["test_accuracy"]


def verdict(ci):
    mean, half = ci
    if half is None:
        return "one seed"
    if abs(mean) <= half:
        return "within seed noise"
    return "better" if mean > 0 else "worse"


def signed(ci):
    mean, half = ci
    return f"{mean:+.2f}" if half is None else f"{mean:+.2f} ± {half:.2f}"


def switch_text(run_by_seed, seeds, steps_per_epoch):
    out = []
    for s in seeds:
        st = switch_step(run_by_seed[s])
        out.append("never" if st is None else f"{st} (epoch {st / steps_per_epoch:.1f})")
    return ", ".join(out)


def main():
    args = parse_args()
    seeds = list(range(args.seeds))
    if args.binary:
        binary = args.binary
    else:
        build("lowrank-mlp")
        binary = str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")
    common = ["--epochs", str(args.epochs), "--data", args.data]
    specs = arms(args.track_steps)
    start = datetime.datetime.now()
    # An arm that tracks once an epoch with a window longer than the run's epochs cannot
    # switch, and the trainer refuses it: it is run once to quote that refusal.
    refused, runnable = {}, {}
    for label, spec in specs.items():
        r = None
        if "@" not in label and WINDOW.get(label, 0) > args.epochs:
            r = refusal(binary, common, spec, args.threads)
        if r is not None:
            refused[label] = r
        else:
            runnable[label] = spec
    runs = run_grid(binary, runnable, seeds, common, args.out, args.jobs, args.threads, reuse=args.reuse)
    seconds = (datetime.datetime.now() - start).total_seconds()

    first = runs["dense"][seeds[0]]["result"]
    steps_per_epoch = first["steps"] // args.epochs
    rows = []
    for label in specs:
        if label in refused:
            rows.append(f"| `{label}` | refused before the first step: `{refused[label]['message']}` | | | | | | |")
            continue
        by = runs[label]
        a = mean_ci([acc(by[s]) for s in seeds])
        vs_dense = mean_ci([acc(by[s]) - acc(runs["dense"][s]) for s in seeds])
        vs_default = mean_ci([acc(by[s]) - acc(runs["default"][s]) for s in seeds])
        params = mean_ci([by[s]["result"]["params"] for s in seeds])[0]
        ranks = sorted({r for s in seeds for r in switch_ranks(by[s])})
        sec = mean_ci([by[s]["result"]["train_seconds"] for s in seeds])[0]
        cf = label != "dense"
        rows.append(
            f"| `{label}` | {format_ci(*a, digits=2)} | {signed(vs_dense) + ' ' + verdict(vs_dense) if cf else 'reference'}"
            f" | {signed(vs_default) + ' ' + verdict(vs_default) if cf and label != 'default' else ''}"
            f" | {switch_text(by, seeds, steps_per_epoch) if cf else ''}"
            f" | {'/'.join(map(str, ranks[:6])) + (' ...' if len(ranks) > 6 else '') if ranks else ''}"
            f" | {params:,.0f} | {sec:.1f} |")
    head = (f"| arm | test accuracy % ({len(seeds)} seeds) | − dense (paired) | − default (paired) | switch step per seed "
            "| ranks at the switch | parameters at the end | train s |\n|---|---:|---:|---:|---|---|---:|---:|")
    table = head + "\n" + "\n".join(rows)
    print(table)
    print(f"cuttlefish_detector: {len(runnable) * len(seeds)} runs in {seconds / 60:.1f} minutes", file=sys.stderr)
    (Path(args.out) / "summary.json").write_text(json.dumps({"table": table, "refused": refused}, indent=1))
    if not args.write_docs:
        return

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()[:10]
    setting = (f"`lowrank-mlp` with its defaults (784-256-256-10, AdamW lr 1e-3, batch 128, {args.epochs} epochs of "
               f"{steps_per_epoch} steps), seeds {seeds[0]}-{seeds[-1]}, {args.jobs} runs at a time with {args.threads} "
               f"thread each. An arm without `@N` tracks once an epoch (the authors' cadence), `@{args.track_steps}` "
               f"every {args.track_steps} steps (`--cuttlefish-track-steps {args.track_steps}`). The intervals are 95% "
               "(Student's t over the seeds); a difference is paired by seed (the same batches); a verdict is "
               "\"better\" or \"worse\" only when its interval excludes 0.")
    cmds = [relative_command(runs[l][0]["cmd"]) for l in runnable] + \
        [relative_command(refused[l]["cmd"]) for l in refused]
    block = "\n".join([
        BEGIN,
        f"Run {now} on {machine_line()}; written by `python3 scripts/cuttlefish_detector.py --write-docs`. {setting}",
        "",
        table,
        "",
        "Commands (seed 0 of each arm):",
        "",
        "```sh",
        *cmds,
        "```",
        END])
    replace_block(ROOT / "docs" / "methods" / "cuttlefish.md", BEGIN, END, block)


if __name__ == "__main__":
    main()
