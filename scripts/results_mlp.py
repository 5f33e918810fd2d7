#!/usr/bin/env python3
"""Runs every method of lowrank-mlp on Fashion-MNIST with the same budget over several seeds,
with the controls the adaptive-rank methods need, and writes docs/results.md's MLP block: a
table of what the runs measured (test accuracy with its 95% interval, the paired difference
to dense, parameters, time, final ranks) and a plot of each method's per-layer rank over
training (gnuplot, SVG, from seed 0's rank logs).

    python3 scripts/results_mlp.py                      # build, run everything, write docs
    python3 scripts/results_mlp.py --reuse              # redraw from the saved runs of the same commands
    python3 scripts/results_mlp.py --epochs 2 --seeds 0 --no-docs   # a quick look, nothing written to docs/
    python3 scripts/results_mlp.py --methods dense,inrank

Runs per seed: each method with lowrank-mlp's defaults; InRank also at the authors' explained
ratio 0.9 (the trainer's default is 0.97); and, for InRank (both ratios) and Cuttlefish, the
fixed-rank control: U V^T factors trained from scratch at the ranks the method reached in the
run of the same seed (`--method inrank --inrank-no-grow --inrank-initial-rank R`, the
efficient form InRank trains in, without growth). The trainer takes one rank for every
layer, so R is the rounded mean of the hidden layers' final ranks. Differences to dense and
to the control are paired by seed; intervals are 95% (Student's t over the seeds).

Every number on the page comes from the runs' JSON output and rank logs; nothing is typed
in. The raw outputs stay in --out (default build/results/mlp), one <label>.seed<N>.* set a run.
"""

import argparse
import concurrent.futures
import datetime
import json
from pathlib import Path

from results_common import (METHODS, ROOT, build, check_methods, format_ci, gnuplot, machine_line, mean_ci,
                            rank_series, relative_command, replace_block, run_grid)

BEGIN, END = "<!-- results-mlp:begin -->", "<!-- results-mlp:end -->"
AUTHORS_ALPHA = 0.9  # InRank's explained ratio in the authors' runs
CONTROLLED = {"inrank": "InRank", "inrank-a0.9": "InRank α 0.9", "cuttlefish": "Cuttlefish"}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="threads of each run (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rank", type=int, default=0, help="0: the trainer's default, hidden / 4")
    ap.add_argument("--no-controls", action="store_true", help="no InRank alpha 0.9 row and no fixed-rank controls")
    ap.add_argument("--reuse", action="store_true",
                    help="read back a run whose saved record in --out has the same command instead of running it")
    ap.add_argument("--binary", default=None, help="a built lowrank-mlp (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "mlp"))
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/results.md and its plot")
    ap.add_argument("extra", nargs="*", help="further lowrank-mlp options for every run, after --")
    return ap.parse_args()


def hidden_ranks(result):
    """{layer: final rank} of the hidden layers (the 10-way output layer stays dense)."""
    return dict(list(result["final_ranks"].items())[:-1])


def control_rank(result):
    ranks = list(hidden_ranks(result).values())
    return max(1, round(sum(ranks) / len(ranks)))


def run_all(binary, args, methods, seeds):
    """{label: {seed: run}}: the methods (and InRank at alpha 0.9), then the fixed-rank
    controls, each seed's at the ranks its method reached with that seed."""
    common = ["--epochs", str(args.epochs), "--hidden", str(args.hidden), "--data", args.data]
    if args.rank:
        common += ["--rank", str(args.rank)]
    common += args.extra
    specs = {}
    for m in methods:
        specs[m] = ["--method", m]
        if m == "inrank" and not args.no_controls:
            specs["inrank-a0.9"] = ["--method", "inrank", "--inrank-threshold", str(AUTHORS_ALPHA)]
    runs = run_grid(binary, specs, seeds, common, args.out, args.jobs, args.threads, reuse=args.reuse)
    if args.no_controls:
        return runs
    controls = [(label, s) for label in CONTROLLED if label in runs for s in seeds]

    def one(label, s):
        r = control_rank(runs[label][s]["result"])
        spec = ["--method", "inrank", "--inrank-no-grow", "--inrank-initial-rank", str(r)]
        name = f"{label}-control"
        return run_grid(binary, {name: spec}, [s], common, args.out, 1, args.threads, reuse=args.reuse)[name][s]

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(label, s): pool.submit(one, label, s) for label, s in controls}
        for label, s in controls:
            runs.setdefault(f"{label}-control", {})[s] = futures[(label, s)].result()
    return runs


def ordered(runs):
    """Labels in the table's order: each control right after its method."""
    labels = []
    for label in runs:
        if label.endswith("-control"):
            continue
        labels.append(label)
        if f"{label}-control" in runs:
            labels.append(f"{label}-control")
    return labels


def row_name(label, runs):
    if label.endswith("-control"):
        method = label[: -len("-control")]
        rs = sorted({control_rank(r["result"]) for r in runs[method].values()})
        return f"control: fixed rank {'/'.join(map(str, rs))} from scratch, at {CONTROLLED[method]}'s ranks"
    if label == "inrank":
        return "`inrank` (α 0.97, the trainer's default)"
    if label == "inrank-a0.9":
        return f"`inrank`, α {AUTHORS_ALPHA} (the authors')"
    return f"`{label}`"


def acc(run):
    return 100 * run["result"]["test_accuracy"]


def paired(runs, a, b, seeds):
    return mean_ci([acc(runs[a][s]) - acc(runs[b][s]) for s in seeds])


def signed_ci(ci, digits=2):
    mean, half = ci
    return f"{mean:+.{digits}f}" if half is None else f"{mean:+.{digits}f} ± {half:.{digits}f}"


def verdict(ci, what):
    mean, half = ci
    if half is None:
        return "one seed: no interval"
    if mean - half > 0:
        return f"above {what}"
    if mean + half < 0:
        return f"below {what}"
    return "within seed noise"


def spread(values, fmt="{:,}"):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def ranks_text(runs, label, seeds):
    """Each hidden layer's final rank, one value or one per seed (in the order of the seeds)."""
    per_layer = {}
    for s in seeds:
        for l, r in hidden_ranks(runs[label][s]["result"]).items():
            per_layer.setdefault(l, []).append(r)
    return ", ".join(f"{l}: {rs[0] if len(set(rs)) == 1 else '/'.join(map(str, rs))}" for l, rs in per_layer.items())


def table(runs, seeds):
    n = len(seeds)
    rows = [f"| run | test accuracy ({n} seeds) | vs dense, paired | verdict | parameters | trainable | train s | "
            "final ranks (hidden layers) |",
            "|---|---:|---:|---|---:|---:|---:|---|"]
    for label in ordered(runs):
        rs = [runs[label][s]["result"] for s in seeds]
        delta, word = "", ""
        if "dense" in runs and label != "dense":
            d = paired(runs, label, "dense", seeds)
            delta, word = f"{signed_ci(d)} pt", verdict(d, "dense")
        rows.append(f"| {row_name(label, runs)} | {format_ci(*mean_ci([acc(runs[label][s]) for s in seeds]), digits=2)}% "
                    f"| {delta} | {word} | {spread([r['params'] for r in rs])} | "
                    f"{spread([r['trainable_params'] for r in rs])} | "
                    f"{format_ci(*mean_ci([r['train_seconds'] for r in rs]), digits=1)} | {ranks_text(runs, label, seeds)} |")
    return "\n".join(rows)


def control_table(runs, seeds):
    rows = ["| method | vs its fixed-rank control, paired | verdict | parameters, method / control |",
            "|---|---:|---|---:|"]
    for label, name in CONTROLLED.items():
        if f"{label}-control" not in runs:
            continue
        d = paired(runs, label, f"{label}-control", seeds)
        ratio = mean_ci([runs[label][s]["result"]["params"] / runs[f"{label}-control"][s]["result"]["params"]
                         for s in seeds])
        rows.append(f"| {name} | {signed_ci(d)} pt | {verdict(d, 'the control')} | {format_ci(*ratio, digits=2)} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def plot(runs, seed, out_svg, data_dir):
    """One panel per method (not the controls, whose ranks are fixed), one series per hidden
    layer: its rank over training in seed `seed`'s run, as the rank log's events step it from
    the layer's initial rank (the "init" event's, else the hidden width), on a log axis.
    GaLore's events are its gradient projection's rank; its weights stay full rank."""
    panels = []
    for label in runs:
        if label.endswith("-control"):
            continue
        run = runs[label][seed]
        result = run["result"]
        title = f"{label}: rank of each hidden layer over training (seed {seed})"
        if label == "inrank-a0.9":
            title = f"inrank, α {AUTHORS_ALPHA}: rank of each hidden layer over training (seed {seed})"
        if any(e.get("policy") == "galore" for e in run["events"]):
            proj = sorted({e["new_rank"] for e in run["events"] if e["event"] == "project"})
            run = dict(run, events=[e for e in run["events"] if e.get("policy") != "galore"])
            title = (f"{label}: the weights stay full rank; gradients projected to rank "
                     f"{'/'.join(map(str, proj))} (seed {seed})")
        series = {name: rank_series(run, name, result.get("hidden", final), final)
                  for name, final in hidden_ranks(result).items()}
        panels.append((title, "rank (log scale)", series, {"log_y": True}))
    return gnuplot(panels, out_svg, data_dir, "optimizer step")


def write_docs(runs, args, seeds, when, svg_ok):
    page = ROOT / "docs" / "results.md"
    first = next(iter(runs.values()))[seeds[0]]["result"]
    n = len(seeds)
    seed_text = ", ".join(map(str, seeds))
    invocation = "python3 scripts/results_mlp.py" + (f" --seeds {args.seeds}" if args.seeds != "0,1,2" else "")
    body = [
        BEGIN,
        f"Written by `{invocation}` on {when['date']}, {when['machine']}, {when['minutes']:.1f} minutes in all: "
        f"{args.epochs} epochs, hidden width {args.hidden}, {first['layers']} hidden layers, batch {first['batch']}, "
        f"AdamW lr {first['lr']}, weight decay {first['weight_decay']}, seeds {seed_text}, {args.jobs} runs at a time "
        f"with {args.threads} thread each. Each method runs with lowrank-mlp's defaults: the policies' own "
        "(docs/methods/), except InRank's explained ratio, 0.97 instead of the authors' 0.9, which has a row of its "
        "own. `--rank` is hidden / 4 for LoRA, ReLoRA, SST (active pairs) and GaLore (the projection's rank, at "
        "the authors' α 0.25 and the same lr: scripts/results_galore.py compares lrs); Deep LoRA trains its "
        "uncompressed full-width factors (the authors' default); InRank and Cuttlefish choose their own ranks. "
        "A *control* trains U Vᵀ factors from scratch at a fixed rank (`--method inrank --inrank-no-grow`, "
        "InRank's efficient form without growth), per seed at the rounded mean of the hidden layers' final ranks "
        "of its method's run with that seed (the trainer takes one rank for all layers, not one per layer).",
        "",
        table(runs, seeds),
        "",
        f"Intervals are 95% (Student's t over the {n} seeds); *vs dense* is the difference in test accuracy to "
        "dense run with the same seed, *within seed noise* when its interval holds 0. *parameters*: what the model "
        "holds at the end of training (an InRank layer counts its active columns; LoRA-style layers count their "
        "frozen base), and *trainable*: what the optimizer updates at the end, both as a range over seeds where "
        "they differ; *final ranks*: one value, or one per seed in the order of the seeds. *train s* is each "
        f"run's training time, {args.jobs} runs side by side on a shared machine: compare them within this table only.",
        "",
    ]
    controls = control_table(runs, seeds)
    if controls:
        body += ["Each adaptive-rank method against its control, paired by seed:", "", controls, ""]
    if "inrank-a0.9" in runs:
        d = paired(runs, "inrank", "inrank-a0.9", seeds)
        body += [f"InRank at α 0.97 against α {AUTHORS_ALPHA}, paired by seed: {signed_ci(d)} pt of test accuracy "
                 f"({verdict(d, f'α {AUTHORS_ALPHA}')}).", ""]
    if svg_ok:
        body += [f"![per-layer rank over training, seed {seeds[0]}](results/mlp_ranks.svg)", ""]
    body += [f"The commands of seed {seeds[0]} (the other seeds differ only in `--seed`, the file names and a "
             "control's rank):", "", "```"]
    for label in ordered(runs):
        body.append(relative_command(runs[label][seeds[0]]["cmd"]))
    body += ["```", END]
    replace_block(page, BEGIN, END, "\n".join(body))


def main():
    args = parse_args()
    methods = check_methods(args.methods)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.binary:
        build("lowrank-mlp")
    binary = args.binary or str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = datetime.datetime.now()
    runs = run_all(binary, args, methods, seeds)
    minutes = (datetime.datetime.now() - start).total_seconds() / 60
    # When --reuse read every run back, the page keeps the date, machine and time of the
    # runs themselves (summary.json has them) rather than those of the redraw.
    ran = any(Path(f"{out}/{label}.seed{s}.run.json").stat().st_mtime >= start.timestamp()
              for label in runs for s in seeds)
    summary_path = out / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if ran or "when" not in previous:
        when = {"date": datetime.date.today().isoformat(), "machine": machine_line(), "minutes": minutes}
    else:
        when = previous["when"]
    summary = {"when": when, "runs": {l: {s: r["result"] for s, r in rs.items()} for l, rs in runs.items()}}
    summary_path.write_text(json.dumps(summary, indent=1))
    print(table(runs, seeds))
    print(control_table(runs, seeds))
    print(f"results: {minutes:.1f} minutes" + ("" if ran else " (every run read back)"))
    if not args.no_docs:
        svg = ROOT / "docs" / "results" / "mlp_ranks.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        ok = plot(runs, seeds[0], svg, out)
        write_docs(runs, args, seeds, when, ok)


if __name__ == "__main__":
    main()
