#!/usr/bin/env python3
"""Cuttlefish's claim, tested in direction on the byte-level GPT (`lowrank-gpt2 --tokenizer
bytes`, every projection of every block a candidate): with the authors' detector presets
(no tuning on this run) it switches by itself from dense to stable-rank factors once the
stable ranks settle; the model ends smaller and trains faster at comparable quality; and it
beats low-rank training from scratch at the same ranks.

    python3 scripts/claims_cuttlefish.py                 # 3 seeds: about 12 minutes on 2 cores
    python3 scripts/claims_cuttlefish.py --write-docs    # also docs/fidelity.md's claims-cuttlefish block
                                                         # and docs/results/fidelity_cuttlefish.svg

Runs per seed: dense; Cuttlefish with the `imagenet` preset (w 5, L 5, tau 0.33, the initial
weight in the history, tracking once an epoch: an epoch is one evaluation interval,
--eval-every steps) and with the `cifar` preset (w 15, L 11, tau 0.1); a forced early switch
(a detector that fires at its second tracking point); the imagenet preset without Frobenius
decay; and the control, fixed-rank factors trained from scratch (`inrank --inrank-no-grow`,
U V^T from the first step) at one rank for every layer, the rounded mean of the imagenet
run's final ranks of the same seed (the trainers take one rank for all layers, so the
control matches Cuttlefish's parameter count only on average). Quality is validation bits
per byte; differences are paired by seed; intervals are 95% (Student's t).
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

from results_common import (ROOT, build_byte_trainer, format_ci, gnuplot, machine_line, mean_ci, relative_command,
                            replace_block, run_grid)

BEGIN, END = "<!-- claims-cuttlefish:begin -->", "<!-- claims-cuttlefish:end -->"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--config", default="mini")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=25, help="steps an epoch (default %(default)s: 24 epochs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--binary", default=None, help="a built lowrank-gpt2 (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "text" / "corpus-bytes"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "claims_cuttlefish"))
    ap.add_argument("--reuse", action="store_true",
                    help="read back a run kept in --out with the same command instead of running it again")
    ap.add_argument("--write-docs", action="store_true")
    return ap.parse_args()


def switch_steps(run):
    return [e["step"] for e in run["events"] if e["event"] == "switch"]


def main():
    args = parse_args()
    seeds = list(range(args.seeds))
    binary = build_byte_trainer(args.binary)
    common = ["--tokenizer", "bytes", "--config", args.config, "--steps", str(args.steps), "--batch", str(args.batch),
              "--context", str(args.context), "--lr", str(args.lr), "--eval-every", str(args.eval_every),
              "--eval-windows", "128", "--data", args.data]
    specs = {
        "dense": ["--method", "dense"],
        "imagenet": ["--method", "cuttlefish", "--cuttlefish-preset", "imagenet"],
        "cifar": ["--method", "cuttlefish", "--cuttlefish-preset", "cifar"],
        "early": ["--method", "cuttlefish", "--cuttlefish-window", "2", "--cuttlefish-tail", "1",
                  "--cuttlefish-threshold", "1e9"],
        "imagenet-nofrob": ["--method", "cuttlefish", "--cuttlefish-preset", "imagenet", "--cuttlefish-frobenius", "0"],
    }
    start = datetime.datetime.now()
    runs = run_grid(binary, specs, seeds, common, args.out, args.jobs, reuse=args.reuse)
    # The control: from-scratch factors at the imagenet run's mean final rank, seed by seed.
    scratch = {}
    for s in seeds:
        ranks = list(runs["imagenet"][s]["result"]["final_ranks"].values())
        r = max(1, round(sum(ranks) / len(ranks)))
        label = f"scratch-r{r}"
        got = run_grid(binary, {label: ["--method", "inrank", "--inrank-no-grow", "--inrank-initial-rank", str(r)]},
                       [s], common, args.out, 1, reuse=args.reuse)
        scratch[s] = (r, got[label][s])
    minutes = (datetime.datetime.now() - start).total_seconds() / 60

    def res(label, s):
        return scratch[s][1]["result"] if label == "scratch" else runs[label][s]["result"]

    def bpb(label):
        return [res(label, s)["val_bpb"] for s in seeds]

    def paired(a, b):
        return mean_ci([x - y for x, y in zip(bpb(a), bpb(b))])

    def ratio(label, key, over="dense"):
        return mean_ci([res(over, s)[key] / res(label, s)[key] for s in seeds])

    n = len(seeds)
    rows = ["| run | val bits/byte | vs dense (paired) | switched (seeds) | switch step | final ranks | "
            "parameters | dense / run parameters | tokens/s over dense |", "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    names = {"dense": "dense", "imagenet": "Cuttlefish, imagenet preset", "cifar": "Cuttlefish, cifar preset",
             "early": "Cuttlefish, forced early switch", "imagenet-nofrob": "imagenet preset, no Frobenius decay",
             "scratch": "control: fixed-rank factors from scratch"}
    for label, title in names.items():
        sw = [switch_steps(runs[label][s]) for s in seeds] if label in runs else []
        switched = sum(1 for x in sw if x)
        steps = sorted({min(x) for x in sw if x})
        ranks = sorted({v for s in seeds for v in res(label, s)["final_ranks"].values()})
        rank_text = "-" if not ranks else (", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]}")
        if label == "scratch":
            rank_text = ", ".join(sorted({str(scratch[s][0]) for s in seeds})) + " (all layers)"
        rows.append(
            f"| {title} | {format_ci(*mean_ci(bpb(label)))} | {'' if label == 'dense' else format_ci(*paired(label, 'dense'))} | "
            f"{'' if label in ('dense', 'scratch') else f'{switched}/{n}'} | "
            f"{'' if label in ('dense', 'scratch') else (', '.join(map(str, steps)) or 'never')} | {rank_text} | "
            f"{format_ci(*mean_ci([res(label, s)['params'] for s in seeds]), digits=0)} | "
            f"{'' if label == 'dense' else format_ci(*ratio(label, 'params'), digits=2) + 'x'} | "
            f"{'' if label == 'dense' else format_ci(*mean_ci([res(label, s)['tokens_per_second'] / res('dense', s)['tokens_per_second'] for s in seeds]), digits=2) + 'x'} |")
    table = "\n".join(rows)
    print(table)
    print(f"claims_cuttlefish: {len(specs) * n + n} runs in {minutes:.1f} minutes", file=sys.stderr)
    summary = Path(args.out, "summary.json")
    machine = machine_line()
    if args.reuse and summary.exists():  # the time and machine of the call that ran them
        previous = json.loads(summary.read_text())
        minutes, machine = previous.get("minutes", minutes), previous.get("machine", machine)
    summary.write_text(json.dumps({"minutes": minutes, "machine": machine, "bpb": {l: bpb(l) for l in names}},
                                  indent=1))
    if not args.write_docs:
        return

    def beyond(ci, sign):  # the interval lies on the side `sign` of zero
        m, h = ci
        return h is not None and (m - h > 0 if sign > 0 else m + h < 0)

    auto = [switch_steps(runs["imagenet"][s]) for s in seeds]
    v_switch = ("holds" if all(auto) else "holds partly" if any(auto) else "does not hold here")
    d_dense, size = paired("imagenet", "dense"), ratio("imagenet", "params")
    speed = mean_ci([res("imagenet", s)["tokens_per_second"] / res("dense", s)["tokens_per_second"] for s in seeds])
    v_size = ("does not hold here" if size[0] <= 1.0 else "holds" if not beyond(d_dense, 1) else "holds partly")
    v_speed = ("holds" if beyond((speed[0] - 1.0, speed[1]), 1) else "does not hold here"
               if beyond((speed[0] - 1.0, speed[1]), -1) else "not settled here (the interval includes 1x)")
    d_scratch = paired("imagenet", "scratch")
    v_scratch = ("holds" if beyond(d_scratch, -1) else "does not hold here" if beyond(d_scratch, 1)
                 else "does not hold here (within seed noise)")
    d_frob = paired("imagenet", "imagenet-nofrob")
    claim = ["| claim | paper | ours | verdict |", "|---|---|---|---|",
             f"| switches by itself once stable ranks settle (authors' imagenet preset, no tuning) | switch epoch "
             f"found per layer group | switched in {sum(1 for a in auto if a)}/{n} seeds, at step(s) "
             f"{', '.join(str(min(a)) for a in auto if a) or '-'} of {args.steps} | {v_switch} |",
             f"| smaller at comparable quality | up to 5.6x fewer parameters | {format_ci(*size, digits=2)}x fewer, "
             f"{format_ci(*d_dense)} bits/byte vs dense | {v_size} |",
             f"| faster end to end | up to 1.2x | {format_ci(*speed, digits=2)}x tokens/s of dense (wall clock, "
             f"shared machine) | {v_speed} |",
             f"| beats low-rank from scratch at the same ranks | better than low-rank from scratch | {format_ci(*d_scratch)} bits/byte vs the control | {v_scratch} |",
             f"| Frobenius decay on the factors (on vs off) | part of the method, lambda 1e-4 | {format_ci(*d_frob)} bits/byte "
             f"on minus off | {'helps' if beyond(d_frob, -1) else 'hurts' if beyond(d_frob, 1) else 'within seed noise'} |"]
    # The plot: quality against the parameters at the end and against the train seconds, a
    # point per run kind with its intervals on both axes.
    def xy(key):  # {run: [(x, y, dx, dy)]}: the means of `key` and of bits/byte, and their half-widths
        return {title: [(mx, my, hx, hy) for (mx, hx), (my, hy) in
                        [(mean_ci([res(label, s)[key] for s in seeds]), mean_ci(bpb(label)))]]
                for label, title in names.items()}

    svg, dodge = ROOT / "docs" / "results" / "fidelity_cuttlefish.svg", 0.01
    gnuplot([(f"validation bits/byte against parameters at the end (mean and 95% intervals of {n} seeds)",
              "val bits/byte", xy("params"), {"errorbars": "xy", "dodge": dodge}),
             (f"validation bits/byte against train seconds (wall clock, {args.jobs} runs at a time on a shared machine)",
              "val bits/byte", xy("train_seconds"), {"errorbars": "xy", "xlabel": "train seconds"})],
            svg, args.out, "parameters at the end")
    cmd = "python3 scripts/claims_cuttlefish.py --write-docs"
    figure = [f"![validation bits/byte against parameters and against train seconds, per run](results/{svg.name})",
              "", f"*Validation bits/byte against the parameters at the end and against train seconds (mean, 95% "
              f"intervals over {n} seeds on both axes), drawn by `{cmd}`; the wall times come from a shared machine "
              "(indicative only); in the first panel the points are spread sideways by up to "
              f"{100 * dodge * (len(names) - 1) / 2:.1f}% so that runs of the same size stay apart.*", ""]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    body = [BEGIN, "### Cuttlefish: switching by itself, size and time", "", "\n".join(claim), "", table, "",
            *figure,
            f"Written by `{cmd}` on {now[:10]}, {machine}, "
            f"{minutes:.1f} minutes for {len(specs) * n + n} runs: config `{args.config}` over bytes, {args.steps} "
            f"steps of {args.batch} x {args.context} bytes, an epoch = {args.eval_every} steps (the detector "
            f"tracks once an epoch), AdamW lr {args.lr}, seeds {seeds[0]}-{seeds[-1]}; mean ± 95% interval over the "
            "seeds. Tokens/s are wall clock with two runs sharing two cores (and other work, see the load): "
            "indicative only. One run's command:", "", "```", relative_command(runs["imagenet"][0]["cmd"]), "```",
            END]
    replace_block(ROOT / "docs" / "fidelity.md", BEGIN, END, "\n".join(body))


if __name__ == "__main__":
    main()
