#!/usr/bin/env python3
"""InRank's claim, tested in direction on the byte-level GPT (`lowrank-gpt2 --tokenizer bytes`,
the methods on all four projections of every block): the cumulative update W(t) - W(0) of
dense training follows an incremental low-rank trajectory; InRank matches full-rank quality
using at most 33% of the rank; its efficient form cuts training time and model size.

    python3 scripts/claims_inrank.py                  # 5 seeds, config mini, and the lr sweep: about 10 minutes on 2 cores
    python3 scripts/claims_inrank.py --write-docs     # also docs/fidelity.md's claims-inrank blocks
    python3 scripts/claims_inrank.py --lr-sweep-only --write-docs   # only the learning-rate block: 12 runs

Three runs per seed, two at a time, one thread each:
- dense, with --track-update-rank 0.9,0.95,0.99: the alpha-rank of every projection's
  W(t) - W(0) at every evaluation (InRank's explained ratio, the statistic of its rank check);
- InRank at the paper's alpha 0.9 and cadence (warm-up 200 and gap 25 forward calls, 8
  forward calls per optimizer step, a stage 1 of 130 steps, as the authors' GPT-2 runs:
  docs/methods/inrank.md, "Conversion");
- the fixed-rank control from scratch (--inrank-no-grow) at one rank R for every layer, the
  rounded mean of InRank's final ranks over layers and seeds (the trainer takes one
  --inrank-initial-rank, not one per layer).

The learning-rate sweep (--lr-sweep, default 0.001,0.003; --lr-sweep "" for none): dense and
the same InRank at each learning rate of the sweep, seeds 0 .. --lr-sweep-seeds - 1 (default 3),
InRank's gap to dense paired by seed and judged by the quality claim's tolerance. The claim's
verdict stays the one at --lr (a fixed setting); the sweep is context. A run of the sweep whose
command is that of a main run (the same learning rate and seed) is read back from --out, not run
again; --lr-sweep-only runs the sweep alone and writes only its block (claims-inrank-lr).

The random-walk control: a sum of independent isotropic Gaussian steps is an isotropic
Gaussian matrix at every t, whose spectrum follows the Marchenko-Pastur law for the layer's
shape; its alpha-rank (computed from that law's quantiles) is flat over training. The
observation holds when dense's alpha-rank grows over training and stays below it.

Every figure is a mean and 95% interval (Student's t) over the seeds; the differences to
dense are paired by seed (the same seed gives the same batches and initial weights). The
verdicts come from the intervals, by the rules printed with the table. Wall times on a shared
machine are indicative only: the block gives the load.
"""

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

from results_common import (ROOT, build_byte_trainer, format_ci, gnuplot, machine_line, mean_ci, relative_command,
                            replace_block, run_grid)

BEGIN, END = "<!-- claims-inrank:begin -->", "<!-- claims-inrank:end -->"
LR_BEGIN, LR_END = "<!-- claims-inrank-lr:begin -->", "<!-- claims-inrank-lr:end -->"
ALPHAS = [0.9, 0.95, 0.99]
PAPER_RANK_FRACTION = 0.33
# "Matches full rank": the paper's GPT-2 small is 19.6 against 19.3 perplexity, a loss 0.5%
# higher; the tolerance here is twice that, as a share of dense's bits per byte.
QUALITY_TOLERANCE = 0.01


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default %(default)s)")
    ap.add_argument("--config", default="mini", help="model config (default %(default)s: 2 layers, width 128)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50, help="also the tracker's cadence (default %(default)s)")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.9, help="InRank's explained ratio (the paper's 0.9)")
    ap.add_argument("--forward-calls-per-step", type=int, default=8,
                    help="F of InRank's cadence (the authors' GPT-2: 8 micro-batches a step)")
    ap.add_argument("--stage1-steps", type=int, default=130, help="InRank's stage 1 (the authors' GPT-2: 130)")
    ap.add_argument("--lr-sweep", default="0.001,0.003",
                    help="learning rates at which dense and InRank also run (default %(default)s; \"\" for none)")
    ap.add_argument("--lr-sweep-seeds", type=int, default=3, help="seeds 0 .. N-1 of the sweep (default %(default)s)")
    ap.add_argument("--lr-sweep-only", action="store_true",
                    help="run only the learning-rate sweep (and with --write-docs write only its block)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--binary", default=None, help="a built lowrank-gpt2 (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "text" / "corpus-bytes"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "claims_inrank"))
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs of an earlier call from --out instead of running them (to redraw)")
    return ap.parse_args()


# --- the random-walk control ------------------------------------------------------------

def explained_ratio(s, k):
    """InRank's ratio (policy/inrank.hpp, inrank_explained_ratio): 1 - Var(s, first k zeroed) / Var(s)."""
    n = len(s)

    def var(v):
        m = sum(v) / n
        return sum((x - m) ** 2 for x in v) / n

    total = var(s)
    if total == 0.0:
        return 1.0
    return 1.0 - var([0.0] * k + list(s[k:])) / total


def alpha_rank(s, alpha):
    return next(k for k in range(len(s) + 1) if explained_ratio(s, k) > alpha)


def gaussian_spectrum(m, n, grid=20000):
    """The d = min(m, n) singular values of an m x n isotropic Gaussian matrix (up to scale) as
    the quantiles (i + 1/2) / d of the Marchenko-Pastur law, descending."""
    d, big = min(m, n), max(m, n)
    y = d / big
    lo, hi = 1.0 - math.sqrt(y), 1.0 + math.sqrt(y)
    a, b = lo * lo, hi * hi

    def density(s):  # of a singular value s (scaled), from MP's density of s^2
        inside = (b - s * s) * (s * s - a)
        return math.sqrt(max(inside, 0.0)) / (math.pi * y * s) if s > 0 else (2.0 / math.pi if y == 1 else 0.0)

    step = (hi - lo) / grid
    xs = [lo + (i + 0.5) * step for i in range(grid)]
    cdf, acc = [], 0.0
    for x in xs:
        acc += density(x) * step
        cdf.append(acc)
    values, j = [], 0
    for i in range(d):
        q = (i + 0.5) / d * acc
        while cdf[j] < q:
            j += 1
        values.append(xs[j])
    return sorted(values, reverse=True)


# --- the runs' records ------------------------------------------------------------------

def update_ranks(run):
    """{layer: [(step, {alpha: rank}, d)]} from a dense run's "update_rank" lines."""
    path = Path(run["cmd"][run["cmd"].index("--log") + 1])
    out = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") != "update_rank":
            continue
        out.setdefault(e["layer"], []).append((e["step"], dict(zip(e["alphas"], e["ranks"])), e["d"]))
    return out


def layer_shapes(args):
    """{layer: (out, in)} of the byte model's projections, from the config's width."""
    width = {"mini": 128, "tiny": 256}.get(args.config)
    if width is None:
        raise SystemExit(f"claims_inrank: the shapes of config '{args.config}' are not known here (mini, tiny)")
    shapes = {"attn.c_attn": (3 * width, width), "attn.c_proj": (width, width), "mlp.c_fc": (4 * width, width),
              "mlp.c_proj": (width, 4 * width)}
    return lambda layer: next(v for k, v in shapes.items() if layer.endswith(k))


def reuse_grid(binary, specs, seeds, common, out, jobs):
    """run_grid's records as an earlier call left them in `out`."""
    return {label: {s: json.loads((Path(out) / f"{label}.seed{s}.run.json").read_text()) for s in seeds}
            for label in specs}


def check_steps(args):
    """The optimizer steps after which InRank's stage-1 checks see the weights (forward call c
    > warmup with c % gap == 0, seen after floor((c - 1) / F) steps; docs/methods/inrank.md)."""
    warmup, gap, f, steps = 200, 25, args.forward_calls_per_step, []
    c = (warmup // gap + 1) * gap  # the first call past the warm-up that the gap divides
    while (c - 1) // f < args.stage1_steps:
        steps.append((c - 1) // f)
        c += 25
    return steps


def interval_verdict(ci, good_below, bad_above=None):
    """holds: the whole interval below `good_below`; does not hold: the whole interval above
    `bad_above` (default the same bound); not settled otherwise (the interval spans the bound)."""
    mean, half = ci
    half = half or 0.0
    bad_above = good_below if bad_above is None else bad_above
    if mean + half < good_below:
        return "holds"
    if mean - half > bad_above:
        return "does not hold here"
    return "not settled here (the interval spans the bound)"


def pct(ci, digits=1):
    return format_ci(100 * ci[0], None if ci[1] is None else 100 * ci[1], digits) + "%"


def common_options(args, lr):
    return ["--tokenizer", "bytes", "--config", args.config, "--steps", str(args.steps), "--batch", str(args.batch),
            "--context", str(args.context), "--lr", str(lr), "--eval-every", str(args.eval_every),
            "--eval-windows", str(args.eval_windows), "--data", args.data]


def sweep_label(args, method, lr):
    """The main grid's label at the script's own --lr (so that its runs are read back), else METHOD-lrX."""
    return method if lr == args.lr else f"{method}-lr{lr:g}"


def lr_sweep(args, binary, specs, out):
    """Dense and InRank (the main grid's options) at every learning rate of --lr-sweep; returns
    the block's text (None when the sweep is empty) and its one-sentence summary."""
    lrs = [float(x) for x in args.lr_sweep.split(",") if x.strip()]
    if not lrs:
        return None, None
    seeds = list(range(args.lr_sweep_seeds))
    # The learning rate sits in the common options: run_grid's command is binary + common +
    # spec + ..., so the whole of it goes in the spec and a main run's command comes out the same.
    sweep_specs = {sweep_label(args, m, lr): common_options(args, lr) + specs[m] for m in specs for lr in lrs}
    start = datetime.datetime.now()
    if args.reuse:
        runs = reuse_grid(binary, sweep_specs, seeds, [], out, args.jobs)
    else:
        runs = run_grid(binary, sweep_specs, seeds, [], out, args.jobs, reuse=True)
    seconds = (datetime.datetime.now() - start).total_seconds()
    fresh = sum(1 for label in sweep_specs for s in seeds
                if (out / f"{label}.seed{s}.run.json").stat().st_mtime >= start.timestamp())
    machine = machine_line()
    saved = out / "lr_sweep.json"
    if args.reuse and saved.exists():  # the time and machine of the call that ran them
        earlier = json.loads(saved.read_text())
        seconds, machine, fresh = earlier["seconds"], earlier["machine"], earlier["runs_run"]
    n = len(seeds)
    rows, summary, verdicts = [], {}, {}
    for lr in lrs:
        d = [runs[sweep_label(args, "dense", lr)][s]["result"]["val_bpb"] for s in seeds]
        i = [runs[sweep_label(args, "inrank", lr)][s]["result"]["val_bpb"] for s in seeds]
        gap = mean_ci([a - b for a, b in zip(i, d)])
        rel = mean_ci([(a - b) / b for a, b in zip(i, d)])
        verdict = interval_verdict(rel, QUALITY_TOLERANCE)
        verdicts[lr] = (rel, verdict)
        summary[str(lr)] = {"dense": d, "inrank": i, "gap": gap, "relative_gap": rel, "verdict": verdict}
        mark = " (the claim's)" if lr == args.lr else ""
        rows.append(f"| {lr:g}{mark} | {format_ci(*mean_ci(d))} | "
                    f"{format_ci(*mean_ci(i))} | {format_ci(*gap)} | {pct(rel, 2)} | "
                    f"{' / '.join(f'{x:.2f}' for x in d)} | {' / '.join(f'{x:.2f}' for x in i)} | {verdict} |")
    table = "\n".join([
        f"| AdamW lr | dense bits/byte ({n} seeds) | InRank bits/byte | InRank - dense (paired) | relative | "
        f"dense seed by seed | InRank seed by seed | InRank matches dense (tolerance +{100 * QUALITY_TOLERANCE:.0f}%) |",
        "|---:|---:|---:|---:|---:|---|---|---|", *rows])
    matched = [lr for lr, (_, v) in verdicts.items() if v == "holds"]
    tol = f"+{100 * QUALITY_TOLERANCE:.0f}%"
    if matched:
        sentence = (f"At lr {', '.join(f'{lr:g}' for lr in matched)} InRank matches dense within the {tol} tolerance "
                    f"({'; '.join(pct(verdicts[lr][0], 2) for lr in matched)} bits/byte, paired, {n} seeds); the "
                    f"claim's verdict above stays the one at the script's lr {args.lr:g}, a fixed setting, and this "
                    "sweep is context.")
    else:
        sentence = (f"At no learning rate of the sweep does InRank match dense within the {tol} tolerance "
                    f"({'; '.join(f'lr {lr:g}: {pct(r, 2)}, ' + v.split(' (')[0] for lr, (r, v) in verdicts.items())}"
                    f"; paired, {n} seeds); the claim's verdict above, at lr {args.lr:g} over {args.seeds} seeds, "
                    "is unchanged.")
    print(table)
    print(sentence)
    print(f"claims_inrank: learning-rate sweep, {fresh} of {len(sweep_specs) * n} runs run (the others read back) "
          f"in {seconds / 60:.1f} minutes", file=sys.stderr)
    if not args.reuse:
        saved.write_text(json.dumps({"lrs": summary, "seconds": seconds, "machine": machine, "runs_run": fresh},
                                    indent=1))
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    shown = lambda label: relative_command(drop_logs(runs[label][0]["cmd"], {"--lr": "LR", "--seed": "S"}))
    cmd = "python3 scripts/claims_inrank.py " + ("--lr-sweep-only --write-docs" if args.lr_sweep_only
                                                  else "--write-docs")
    reused = (f" The rows at lr {args.lr:g} run the commands of the claim's seeds 0-{n - 1} above (read back from "
              "the main grid's records when they are there)." if args.lr in lrs else "")
    others = (" (the others read back from earlier runs with the same command)" if fresh < len(sweep_specs) * n
              else "")
    block = "\n".join([
        LR_BEGIN, "#### InRank against dense, by learning rate", "", sentence, "", table, "",
        f"Written by `{cmd}` on {now[:10]}, {machine}, {fresh} of {len(sweep_specs) * n} runs run in "
        f"{seconds / 60:.1f} minutes{others}, {args.jobs} "
        "at a time with one thread each (other jobs shared the machine). The settings of the claim's runs above "
        f"but for the learning rate (warm-up and cosine decay as there), seeds 0-{n - 1}: dense is "
        f"`{shown(sweep_label(args, 'dense', lrs[0]))}`, InRank `{shown(sweep_label(args, 'inrank', lrs[0]))}` "
        f"(LR = {', '.join(f'{lr:g}' for lr in lrs)}; S = {', '.join(map(str, seeds))}). The verdict column is the "
        f"quality claim's rule: *holds* when the interval of InRank's relative gap to dense lies below {tol}, "
        "*does not hold here* when it lies wholly above, *not settled here* otherwise; the claim's own verdict "
        f"is the one at lr {args.lr:g} above.{reused} Raw outputs: build/results/claims_inrank "
        "(lr_sweep.json).",
        LR_END])
    return block, sentence


def drop_logs(cmd, placeholders):
    """A run's command without its log paths, with the values of `placeholders`' options replaced."""
    out, skip = [], False
    for j, c in enumerate(cmd):
        if skip:
            skip = False
            continue
        if c in ("--log", "--rank-log"):
            skip = True
            continue
        out.append(placeholders[cmd[j - 1]] if j > 0 and cmd[j - 1] in placeholders else c)
    return out


def write_lr_block(block):
    """The sweep's block right after the claim's block (in the InRank section), or in its place."""
    page = ROOT / "docs" / "fidelity.md"
    text = page.read_text()
    if LR_BEGIN not in text and END in text:
        at = text.index(END) + len(END)
        page.write_text(text[:at] + "\n\n" + block + text[at:])
        print(f"results: wrote {page}", file=sys.stderr)
        return
    replace_block(page, LR_BEGIN, LR_END, block)


def main():
    args = parse_args()
    binary = None if args.reuse else build_byte_trainer(args.binary)
    seeds = list(range(args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = common_options(args, args.lr)
    inrank_opts = ["--method", "inrank", "--inrank-threshold", str(args.alpha), "--inrank-cadence", "forward_calls",
                   "--inrank-warmup", "200", "--inrank-gap", "25",
                   "--inrank-forward-calls-per-step", str(args.forward_calls_per_step),
                   "--inrank-stage1-steps", str(args.stage1_steps)]
    specs = {"dense": ["--method", "dense", "--track-update-rank", ",".join(map(str, ALPHAS))],
             "inrank": inrank_opts}
    if args.lr_sweep_only:
        block, _ = lr_sweep(args, binary, specs, out)
        if block is None:
            raise SystemExit("claims_inrank: --lr-sweep-only with an empty --lr-sweep")
        if args.write_docs:
            write_lr_block(block)
        return
    start = datetime.datetime.now()
    grid = reuse_grid if args.reuse else run_grid
    runs = grid(binary, specs, seeds, common, out, args.jobs)
    inrank_ranks = [r for s in seeds for r in runs["inrank"][s]["result"]["final_ranks"].values()]
    fixed_rank = max(1, round(sum(inrank_ranks) / len(inrank_ranks)))
    fixed = {"fixed": ["--method", "inrank", "--inrank-no-grow", "--inrank-initial-rank", str(fixed_rank)]}
    runs.update(grid(binary, fixed, seeds, common, out, args.jobs))
    seconds = (datetime.datetime.now() - start).total_seconds()
    machine = machine_line()
    if args.reuse:  # the time and machine of the call that ran them
        earlier = json.loads((out / "summary.json").read_text())
        seconds, machine = earlier["seconds"], earlier["machine"]

    res = {label: {s: runs[label][s]["result"] for s in seeds} for label in runs}
    any_dense = res["dense"][0]
    layers = list(any_dense["final_ranks"])
    full = {l: d for l, d in any_dense["final_ranks"].items()}  # dense: rank = min(out, in)
    shape_of = layer_shapes(args)

    # The observation: dense's alpha-ranks over training, per layer and seed.
    tracked = {s: update_ranks(runs["dense"][s]) for s in seeds}
    a0 = args.alpha
    first_eval = args.eval_every
    growth, final_frac, monotone, below_control = [], [], [], []
    control = {}
    for l in layers:
        m, n = shape_of(l)
        control[l] = {a: alpha_rank(gaussian_spectrum(m, n), a) for a in ALPHAS}
    for s in seeds:
        g, f, mono, below = [], [], [], []
        for l in layers:
            series = [(step, r[a0]) for step, r, _ in tracked[s][l]]
            at = dict(series)
            g.append(at[args.steps] - at[first_eval])
            f.append(at[args.steps] / full[l])
            ranks = [r for step, r in series if step >= first_eval]
            mono.append(sum(b >= a for a, b in zip(ranks, ranks[1:])) / max(1, len(ranks) - 1))
            below.append(at[args.steps] / control[l][a0])
        growth.append(sum(g) / len(g))
        final_frac.append(sum(f) / len(f))
        monotone.append(sum(mono) / len(mono))
        below_control.append(sum(below) / len(below))
    growth_ci, final_frac_ci = mean_ci(growth), mean_ci(final_frac)
    monotone_ci, below_ci = mean_ci(monotone), mean_ci(below_control)

    # InRank against dense and against the fixed-rank control.
    def bpb(label):
        return [res[label][s]["val_bpb"] for s in seeds]

    dense_bpb = bpb("dense")
    rel_gap = mean_ci([(i - d) / d for i, d in zip(bpb("inrank"), dense_bpb)])
    gap = mean_ci([i - d for i, d in zip(bpb("inrank"), dense_bpb)])
    fixed_gap = mean_ci([i - f for i, f in zip(bpb("inrank"), bpb("fixed"))])
    fixed_vs_dense = mean_ci([f - d for f, d in zip(bpb("fixed"), dense_bpb)])
    rank_frac = mean_ci([sum(r / full[l] for l, r in res["inrank"][s]["final_ranks"].items()) / len(layers)
                         for s in seeds])
    # Training time: dense's SVDs of the tracker are taken out of its train_seconds.
    dense_seconds = [res["dense"][s]["train_seconds"] - res["dense"][s].get("update_rank_seconds", 0.0)
                     for s in seeds]
    time_cut = mean_ci([1 - res["inrank"][s]["train_seconds"] / d for s, d in zip(seeds, dense_seconds)])
    size_cut = mean_ci([1 - res["inrank"][s]["params"] / res["dense"][s]["params"] for s in seeds])

    v_growth = interval_verdict((-growth_ci[0], growth_ci[1]), 0.0)  # holds: growth above 0
    v_lowrank = interval_verdict(below_ci, 1.0)  # holds: below the random walk's alpha-rank
    v_obs = ("holds" if v_growth == v_lowrank == "holds" else
             "does not hold here" if "does not hold here" in (v_growth, v_lowrank) else "holds partly")
    v_quality = interval_verdict(rel_gap, QUALITY_TOLERANCE)
    v_rank = interval_verdict(rank_frac, PAPER_RANK_FRACTION)
    v_fixed = interval_verdict(fixed_gap, 0.0)
    v_time = interval_verdict((-time_cut[0], time_cut[1]), 0.0)
    v_size = interval_verdict((-size_cut[0], size_cut[1]), 0.0)
    n = len(seeds)

    def row(label):
        r = [res[label][s] for s in seeds]
        ranks = sorted({v for x in r for v in x["final_ranks"].values()})
        rtxt = ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]}"
        secs = dense_seconds if label == "dense" else [x["train_seconds"] for x in r]
        return (f"| {label} | {format_ci(*mean_ci(bpb(label)))} | "
                f"{format_ci(*mean_ci([b - d for b, d in zip(bpb(label), dense_bpb)])) if label != 'dense' else ''} | "
                f"{' / '.join(f'{b:.2f}' for b in bpb(label))} | {r[0]['params']:,} | {r[0]['trainable_params']:,} | "
                f"{format_ci(*mean_ci(secs), digits=1)} | {rtxt} |")

    runs_table = "\n".join([
        f"| run | val bits/byte ({n} seeds) | vs dense (paired) | seed by seed | parameters at the end | trainable | "
        "train s | final ranks |", "|---|---:|---:|---|---:|---:|---:|---|", row("dense"), row("inrank"), row("fixed")])
    ctl = sorted({(shape_of(l), control[l][a0]) for l in layers})
    claim_table = "\n".join([
        "| claim | paper | ours | verdict |", "|---|---|---|---|",
        f"| dense training's W(t) - W(0) grows in alpha-rank (alpha {a0}) | incremental | "
        f"+{format_ci(*growth_ci, digits=1)} from step {first_eval} to {args.steps} (mean over the {len(layers)} "
        f"projections, {n} seeds); not falling between evaluations in {pct(monotone_ci, 0)} of the intervals | "
        f"{v_growth} |",
        f"| ... and stays low-rank | low rank | final alpha-rank {pct(final_frac_ci)} of full rank, "
        f"{format_ci(*below_ci, digits=3)} of the random walk's ({', '.join(f'{m}x{k}: {r}' for (m, k), r in ctl)}) | "
        f"{v_lowrank} |",
        f"| the observation (both rows) | | | {v_obs} |",
        f"| InRank ends at ≤ 33% of full rank | ≤ 33% | {pct(rank_frac)} ({n} seeds; the cap R - b - 1 is "
        f"{round(100 * (full[layers[0]] // 2 - max(2, full[layers[0]] // 8) - 1) / full[layers[0]])}%) | {v_rank} |",
        f"| InRank matches full-rank quality | 19.6 vs 19.3 ppl (+0.5% loss) | {pct(rel_gap, 2)} bits/byte vs dense "
        f"({format_ci(*gap)}, paired, {n} seeds; tolerance +{100 * QUALITY_TOLERANCE:.0f}%) | {v_quality} |",
        f"| InRank beats fixed rank from scratch at its ranks | better | {format_ci(*fixed_gap)} bits/byte vs fixed "
        f"rank {fixed_rank} (paired) | {v_fixed} |",
        f"| efficient InRank cuts training time | -37% (GPT-medium) | {pct((-time_cut[0], time_cut[1]))} train "
        f"seconds vs dense (paired; indicative: shared machine) | {v_time} |",
        f"| efficient InRank cuts model size | -36% (GPT-medium) | {pct((-size_cut[0], size_cut[1]))} parameters "
        f"vs dense | {v_size} |",
    ])
    print(claim_table)
    print()
    print(runs_table)
    print(f"claims_inrank: {3 * n} runs in {seconds / 60:.1f} minutes", file=sys.stderr)
    summary = {"growth": growth_ci, "final_fraction": final_frac_ci, "monotone": monotone_ci,
               "vs_random_walk": below_ci, "rank_fraction": rank_frac, "relative_gap": rel_gap, "gap": gap,
               "fixed_rank": fixed_rank, "fixed_gap": fixed_gap, "fixed_vs_dense": fixed_vs_dense,
               "time_cut": time_cut, "size_cut": size_cut, "control": control, "seconds": seconds,
               "machine": machine}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    # The plot: per layer, the alpha-rank over training (mean over the seeds), and the random walk's.
    svg = ROOT / "docs" / "results" / "fidelity_inrank.svg"
    panels = []
    for a in (a0, 0.99):
        series = {}
        for l in layers:
            steps = [step for step, _, _ in tracked[seeds[0]][l]]
            # "\\_": a literal underscore in gnuplot's enhanced text (not a subscript)
            series[l.replace("transformer.", "").replace("_", "\\\\_")] = [
                (step, sum(dict((st, r[a]) for st, r, _ in tracked[s][l])[step] for s in seeds) / n) for step in steps]
        for (m, k), r in sorted({(shape_of(l), control[l][a]) for l in layers}):
            series[f"random walk {m}x{k}"] = [(0, r), (args.steps, r)]
        panels.append((f"alpha-rank of W(t) - W(0), dense, alpha {a} (mean of {n} seeds; full rank "
                       f"{full[layers[0]]})", "alpha-rank", series))
    if args.write_docs:
        gnuplot(panels, svg, out, "optimizer step")
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        cmd = "python3 scripts/claims_inrank.py --write-docs"
        checks = check_steps(args)
        body = [
            BEGIN, "### InRank: incremental low-rank updates", "", claim_table, "", runs_table, "",
            f"![alpha-rank of W(t) - W(0) over dense training](results/{svg.name})", "",
            f"Written by `{cmd}` on {now[:10]}, {machine}, {seconds / 60:.1f} minutes in all, {args.jobs} runs "
            f"at a time with one thread each (other jobs shared the machine: the wall times are indicative only). "
            f"Config `{args.config}` over bytes, {args.steps} steps of {args.batch} x {args.context} bytes, AdamW lr "
            f"{args.lr} with warm-up and cosine decay, seeds 0-{n - 1}, an evaluation and a rank measurement every "
            f"{args.eval_every} steps. InRank: alpha {a0}, the authors' cadence (warm-up 200 and gap 25 forward "
            f"calls, {args.forward_calls_per_step} forward calls per step, stage 1 of {args.stage1_steps} steps: "
            f"{len(checks)} checks, after steps {checks[0]}, {checks[1]}, ..., {checks[-1]}), initial rank 2, "
            "buffer d / 8 = "
            f"{max(2, full[layers[0]] // 8)} (the authors' 100 is for d = 768), the efficient form. The fixed-rank "
            f"control trains rank {fixed_rank} (the rounded mean of InRank's final ranks over layers and seeds; one "
            "rank for every layer) from scratch with no buffer. Verdicts: growth holds when its interval lies "
            "above 0; low rank when the interval of dense's final alpha-rank over the random walk's lies below 1 "
            "(the random walk: a sum of independent isotropic Gaussian steps, whose alpha-rank is that of a "
            "Gaussian matrix of the layer's shape at every step, from the Marchenko-Pastur law); the rank "
            "fraction when its interval lies below 33%; quality when the interval of InRank's relative gap lies "
            f"below +{100 * QUALITY_TOLERANCE:.0f}% (twice the paper's gap in loss); the fixed-rank comparison, "
            "time and size when the interval lies below 0; *does not hold here* when the interval lies wholly "
            "on the wrong side; *not settled here* otherwise. Dense's train seconds exclude the tracker's SVDs "
            "(`update_rank_seconds`). Raw outputs: build/results/claims_inrank.",
            END,
        ]
        replace_block(ROOT / "docs" / "fidelity.md", BEGIN, END, "\n".join(body))
    # After the main grid, so that the sweep reads back its runs at --lr.
    block, _ = lr_sweep(args, binary, specs, out)
    if block is not None and args.write_docs:
        write_lr_block(block)


if __name__ == "__main__":
    main()
