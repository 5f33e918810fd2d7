#!/usr/bin/env python3
"""Where a method's default on the MLP differs from the authors' value, the measured reason:
the default against the authors' values on `lowrank-mlp` (its defaults: 784-256-256-10,
AdamW lr 1e-3, batch 128, 10 epochs), beside dense, over several seeds, paired by seed.

    python3 scripts/mlp_defaults.py                  # every group, 87 runs: about 20 minutes on 2 cores
    python3 scripts/mlp_defaults.py --only inrank    # one group
    python3 scripts/mlp_defaults.py --write-docs     # also the cuttlefish-detector block of
                                                     # docs/methods/cuttlefish.md, the inrank-defaults
                                                     # block of docs/methods/inrank.md and the
                                                     # lora-defaults / relora-defaults blocks, the
                                                     # cuttlefish-rewarm block of docs/methods/cuttlefish.md
                                                     # and the galore-defaults block of docs/methods/galore.md

Groups:
- cuttlefish: the default detector (w 3, L 2, tau 0.3, chosen on this MLP's histories)
  against the authors' two presets (`cifar`: w 15, L 11, tau 0.1; `imagenet`: w 5, L 5,
  tau 0.33 with the rank floor d/5; both record the initial weight first), at the authors'
  cadence (one tracking point an epoch) and tracking every --track-steps steps. The
  `default+floor` arms are the default detector with the imagenet preset's rank floor alone
  (--cuttlefish-rank-floor 0.2): they tell the detector's effect from the floor's.
- cuttlefish-rewarm: the default re-warm-up after the switch (100 steps from 0) against
  the authors' ramp (from 1/4 of the lr back to all of it over 5 epochs:
  --cuttlefish-rewarm-start 0.25 --cuttlefish-rewarm 5 epochs), that ramp over the
  default's 100 steps, and none.
- inrank: the trainer's InRank (buffer max(2, d/8) = 32 here, stage 1 one epoch, alpha
  0.97) against the authors' buffer 100, the authors' stage 1 of 130 optimizer steps at
  this trainer's one forward call per step, the authors' whole schedule as their
  forward-call counter runs it (130 steps at 8 forward calls a step: 33 rank checks), and
  the authors' zeroed bias (--inrank-zero-bias).
- lora: alpha = r (scale 1, the default) against PEFT's lora_alpha 8 at the trainer's
  r = 64 (scale 1/8) and ReLoRA's authors' scale 32/128 = 1/4 (alpha 16 at r = 64), and
  the trained bias against PEFT's frozen one (--lora-freeze-bias).
- relora: the default (period 500, re-warm-up 50, scale 1, r = d/4 = 64, full optimizer
  reset) against the authors' re-warm-up of 100 steps, their scale 1/4, their lora_r 128,
  their r/d of the 250M model (128/768: r = 43 here) and their magnitude pruning of 90% of
  each moment (--relora-state-reset 0.9).
- galore: the library's Adam epsilon 1e-8 against GaLore's AdamW's 1e-6 (--adam-eps).

An arm the trainer refuses before its first step (a schedule that cannot act) is run once
and its error message is quoted instead of a row. Printed per arm: test accuracy (mean ±
95% interval, Student's t over the seeds), its paired difference to dense and to the
group's default with verdicts, what the method did (Cuttlefish: the switch step per seed
and the ranks; InRank: the rank checks and the final hidden ranks), the parameters at the
end and train seconds. Every number comes from the runs' JSON output and rank logs; the
raw outputs stay in --out.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from results_common import (ROOT, build, format_ci, machine_line, mean_ci, relative_command, replace_block,
                            run_grid, trainer_env)

IMAGENET_FLOOR = 0.2  # the imagenet preset's rank floor, d/5: the default+floor arms add it alone
PAGES = {"cuttlefish": ("docs/methods/cuttlefish.md", "<!-- cuttlefish-detector:begin -->",
                        "<!-- cuttlefish-detector:end -->"),
         "inrank": ("docs/methods/inrank.md", "<!-- inrank-defaults:begin -->", "<!-- inrank-defaults:end -->"),
         "lora": ("docs/methods/lora.md", "<!-- lora-defaults:begin -->", "<!-- lora-defaults:end -->"),
         "relora": ("docs/methods/relora.md", "<!-- relora-defaults:begin -->", "<!-- relora-defaults:end -->"),
         "cuttlefish-rewarm": ("docs/methods/cuttlefish.md", "<!-- cuttlefish-rewarm:begin -->",
                               "<!-- cuttlefish-rewarm:end -->"),
         "galore": ("docs/methods/galore.md", "<!-- galore-defaults:begin -->", "<!-- galore-defaults:end -->")}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(PAGES), action="append",
                    help="a group to run (may be repeated; default: every group)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per arm (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--track-steps", type=int, default=100,
                    help="--cuttlefish-track-steps of the second set of Cuttlefish arms (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default %(default)s)")
    ap.add_argument("--binary", default=None, help="a built lowrank-mlp (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "mlp_defaults"))
    ap.add_argument("--reuse", action="store_true",
                    help="read back a run kept in --out with the same command instead of running it again")
    ap.add_argument("--write-docs", action="store_true", help="write the blocks into the method pages")
    return ap.parse_args()


def cuttlefish_arms(track_steps):
    """label -> lowrank-mlp options, the group's default first after dense."""
    cf = ["--method", "cuttlefish"]
    every = ["--cuttlefish-track-steps", str(track_steps)]
    floor = ["--cuttlefish-rank-floor", str(IMAGENET_FLOOR)]
    return {"default": cf,
            "default+floor": [*cf, *floor],
            "imagenet": [*cf, "--cuttlefish-preset", "imagenet"],
            "cifar": [*cf, "--cuttlefish-preset", "cifar"],
            f"default@{track_steps}": [*cf, *every],
            f"default+floor@{track_steps}": [*cf, *floor, *every],
            f"imagenet@{track_steps}": [*cf, "--cuttlefish-preset", "imagenet", *every],
            f"cifar@{track_steps}": [*cf, "--cuttlefish-preset", "cifar", *every]}


def cuttlefish_rewarm_arms(steps_per_epoch):
    cf = ["--method", "cuttlefish"]
    ramp = ["--cuttlefish-rewarm-start", "0.25"]
    return {"default": cf,
            "authors-ramp": [*cf, *ramp, "--cuttlefish-rewarm", str(5 * steps_per_epoch)],
            "quarter-ramp@100": [*cf, *ramp],
            "no-rewarm": [*cf, "--cuttlefish-rewarm", "0"]}


def inrank_arms():
    ir = ["--method", "inrank"]
    return {"default": ir,
            "buffer100": [*ir, "--inrank-buffer", "100"],
            "stage1-130": [*ir, "--inrank-stage1-steps", "130"],
            "stage1-130,F8": [*ir, "--inrank-stage1-steps", "130", "--inrank-forward-calls-per-step", "8"],
            "zero-bias": [*ir, "--inrank-zero-bias"]}


def lora_arms():
    lo = ["--method", "lora"]
    return {"default": lo, "alpha8": [*lo, "--lora-alpha", "8"], "alpha16": [*lo, "--lora-alpha", "16"],
            "freeze-bias": [*lo, "--lora-freeze-bias"]}


def relora_arms():
    re_ = ["--method", "relora"]
    return {"default": re_, "rewarm100": [*re_, "--relora-rewarm", "100"], "alpha16": [*re_, "--lora-alpha", "16"],
            "rank128": [*re_, "--rank", "128"], "rank43": [*re_, "--rank", "43"],
            "state-reset0.9": [*re_, "--relora-state-reset", "0.9"]}


def galore_arms():
    ga = ["--method", "galore"]
    return {"default": ga, "eps1e-6": [*ga, "--adam-eps", "1e-6"]}


# Arms that may be refused before their first step (their schedule cannot act in the run):
# each is tried once alone, to quote the refusal; one that is not refused is run as usual.
MAY_REFUSE = {"cuttlefish": {"cifar"}, "inrank": {"stage1-130"}, "lora": set(), "relora": set(),
              "cuttlefish-rewarm": set(), "galore": set()}


def refusal(binary, common, spec, threads):
    """The last line of the trainer's error when it refuses the arm, else None (it trained)."""
    cmd = [binary, *common, *spec, "--seed", "0", "--threads", str(threads), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=trainer_env(threads))
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"cmd": cmd, "message": lines[-1] if lines else f"exit code {proc.returncode}"}


def events(run, kind):
    return [e for e in run["events"] if e.get("event") == kind]


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


def cuttlefish_did(by, seeds, steps_per_epoch):
    """The switch step of each seed, and the ranks it chose."""
    steps = []
    for s in seeds:
        sw = events(by[s], "switch")
        steps.append("never" if not sw else f"{min(e['step'] for e in sw)} (epoch {min(e['step'] for e in sw) / steps_per_epoch:.1f})")
    ranks = sorted({e["new_rank"] for s in seeds for e in events(by[s], "switch")})
    shown = "/".join(map(str, ranks[:6])) + (" ..." if len(ranks) > 6 else "")
    return f"switch: {', '.join(steps)}; ranks {shown or '-'}"


def inrank_did(by, seeds, steps_per_epoch):
    """Rank checks per layer, the step of the cut, and the hidden layers' final ranks per seed."""
    del steps_per_epoch
    checks = sorted({len(events(by[s], "check")) // max(1, len(events(by[s], "init"))) for s in seeds})
    cut = sorted({e["step"] for s in seeds for e in events(by[s], "truncate")})
    finals = ["/".join(str(r) for r in list(by[s]["result"]["final_ranks"].values())[:-1]) for s in seeds]
    return (f"{'/'.join(map(str, checks))} checks a layer; cut at step {'/'.join(map(str, cut)) or '-'}; "
            f"final ranks {', '.join(finals)}")


def lora_did(by, seeds, steps_per_epoch):
    """The factors' scale alpha / r, and ReLoRA's restarts."""
    del steps_per_epoch
    r = by[seeds[0]]["result"]
    restarts = len(events(by[seeds[0]], "restart")) // max(1, len(events(by[seeds[0]], "init")))
    text = f"r {list(r['final_ranks'].values())[0]}"
    return text + (f", {restarts} restarts" if restarts else "")


def galore_did(by, seeds, steps_per_epoch):
    """The optimizer's state against AdamW's."""
    del steps_per_epoch
    r = by[seeds[0]]["result"]
    return f"optimizer state {r['optimizer_state_bytes']:,} B (AdamW's {r['adamw_state_bytes']:,})"


def group_table(group, specs, runs, refused, seeds, steps_per_epoch):
    did = {"cuttlefish": cuttlefish_did, "inrank": inrank_did, "lora": lora_did, "relora": lora_did,
           "cuttlefish-rewarm": cuttlefish_did, "galore": galore_did}[group]
    rows = []
    for label in ["dense", *specs]:
        if label in refused:
            rows.append(f"| `{label}` | refused before the first step: `{refused[label]['message']}` | | | | | |")
            continue
        by = runs[label]
        a = mean_ci([acc(by[s]) for s in seeds])
        params = mean_ci([by[s]["result"]["params"] for s in seeds])[0]
        sec = mean_ci([by[s]["result"]["train_seconds"] for s in seeds])[0]
        if label == "dense":
            rows.append(f"| `dense` | {format_ci(*a, digits=2)} | reference | | | {params:,.0f} | {sec:.1f} |")
            continue
        vs_dense = mean_ci([acc(by[s]) - acc(runs["dense"][s]) for s in seeds])
        vs_default = mean_ci([acc(by[s]) - acc(runs["default"][s]) for s in seeds])
        rows.append(f"| `{label}` | {format_ci(*a, digits=2)} | {signed(vs_dense)} {verdict(vs_dense)} | "
                    f"{'' if label == 'default' else signed(vs_default) + ' ' + verdict(vs_default)} | "
                    f"{did(by, seeds, steps_per_epoch)} | {params:,.0f} | {sec:.1f} |")
    head = (f"| arm | test accuracy % ({len(seeds)} seeds) | − dense (paired) | − default (paired) | what it did "
            "| parameters at the end | train s |\n|---|---:|---:|---:|---|---:|---:|")
    return head + "\n" + "\n".join(rows)


def main():
    args = parse_args()
    seeds = list(range(args.seeds))
    if args.binary:
        binary = args.binary
    else:
        build("lowrank-mlp")
        binary = str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")
    common = ["--epochs", str(args.epochs), "--data", args.data]
    groups = sorted(set(args.only)) if args.only else sorted(PAGES)
    start = datetime.datetime.now()
    runs = run_grid(binary, {"dense": ["--method", "dense"]}, seeds, common, Path(args.out), args.jobs, args.threads,
                    reuse=args.reuse)
    steps_per_epoch = runs["dense"][seeds[0]]["result"]["steps"] // args.epochs
    arms = {"cuttlefish": cuttlefish_arms(args.track_steps), "inrank": inrank_arms(), "lora": lora_arms(),
            "relora": relora_arms(), "cuttlefish-rewarm": cuttlefish_rewarm_arms(steps_per_epoch),
            "galore": galore_arms()}
    tables, done = {}, {}
    for group in groups:
        specs = arms[group]
        refused, runnable = {}, {}
        for label, spec in specs.items():
            r = refusal(binary, common, spec, args.threads) if label in MAY_REFUSE[group] else None
            if r is not None:
                refused[label] = r
            else:
                runnable[label] = spec
        out = Path(args.out) / group
        got = run_grid(binary, runnable, seeds, common, out, args.jobs, args.threads, reuse=args.reuse)
        tables[group] = group_table(group, specs, {**runs, **got}, refused, seeds, steps_per_epoch)
        done[group] = (got, refused)
        print(f"{group}:\n{tables[group]}\n")
    seconds = (datetime.datetime.now() - start).total_seconds()
    n = len(seeds) * (1 + sum(len(done[g][0]) for g in groups))
    print(f"mlp_defaults: {n} runs in {seconds / 60:.1f} minutes", file=sys.stderr)
    (Path(args.out) / "summary.json").write_text(json.dumps(tables, indent=1))
    if not args.write_docs:
        return

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()[:10]
    for group in groups:
        got, refused = done[group]
        dense = runs["dense"][seeds[0]]["result"]
        shape = "-".join(["784", *[str(dense["hidden"])] * dense["layers"], "10"])
        setting = (f"`lowrank-mlp` with its defaults ({shape}, AdamW lr {dense['lr']:g}, batch {dense['batch']}, "
                   f"{args.epochs} epochs "
                   f"of {steps_per_epoch} steps), seeds {seeds[0]}-{seeds[-1]}, {args.jobs} runs at a time with "
                   f"{args.threads} thread each. The intervals are 95% (Student's t over the seeds); a difference is "
                   "paired by seed (the same batches); a verdict is \"better\" or \"worse\" only when its interval "
                   "excludes 0. Train seconds vary with the machine's other load.")
        if group == "cuttlefish-rewarm":
            setting += (" Every arm runs the default detector (tracking once an epoch); `authors-ramp` is "
                        f"`--cuttlefish-rewarm-start 0.25 --cuttlefish-rewarm {5 * steps_per_epoch}` (5 epochs).")
        if group == "cuttlefish":
            setting += (f" An arm without `@N` tracks once an epoch (the authors' cadence), `@{args.track_steps}` every "
                        f"{args.track_steps} steps (`--cuttlefish-track-steps {args.track_steps}`).")
        cmds = [relative_command(runs["dense"][seeds[0]]["cmd"])] + \
            [relative_command(got[label][seeds[0]]["cmd"]) for label in got] + \
            [relative_command(refused[label]["cmd"]) for label in refused]
        page, begin, end = PAGES[group]
        block = "\n".join([
            begin,
            f"Run {now} on {machine_line()}; written by `python3 scripts/mlp_defaults.py --write-docs`. {setting}",
            "",
            tables[group],
            "",
            "Commands (seed 0 of each arm):",
            "",
            "```sh",
            *cmds,
            "```",
            end])
        replace_block(ROOT / page, begin, end, block)


if __name__ == "__main__":
    main()
