#!/usr/bin/env python3
"""Where this library's default differs from the authors' on purpose, a measured reason: the
default against the alternative on the byte-level GPT (`lowrank-gpt2 --tokenizer bytes`, the
settings of scripts/compare_bytes.py), paired by seed.

    python3 scripts/defaults_ablation.py                  # 54 runs, 63 with the tracked set: about 15 minutes on 2 cores
    python3 scripts/defaults_ablation.py --only lora      # one group (--only may be repeated)
    python3 scripts/defaults_ablation.py --write-docs     # also the defaults-cuttlefish block of
                                                          # docs/methods/cuttlefish.md, the defaults-sst
                                                          # and defaults-sst-rank blocks of docs/methods/sst.md,
                                                          # the defaults-lora block of docs/methods/lora.md and
                                                          # the defaults-deeplora block of docs/methods/deep_lora.md

The pairs (default vs alternative, the same seeds, hence the same batches):
- Cuttlefish: `init_in_history` off vs on (`--cuttlefish-init-in-history`, the authors record
  the initial weight first);
- Cuttlefish: `reset_optimizer_at_switch` off vs on (`--cuttlefish-reset-optimizer`, the
  authors build a new optimizer at the switch);
- SST: `rewarm_scope` all vs spectral (`--sst-rewarm-scope spectral`), with T3 shortened
  (--sst-iteration-steps) so the schedule acts several times in the run;
- SST: T3 = 200 (the default, whose source is not verified) vs --t3-sweep's other values,
  and the default's 20-step re-warm-up vs none (`--sst-rewarm 0`), all at T3 = 200;
- SST (group sst-rank): T2 = ceil(d / r) (the default, no source) vs T2 = 1 and 2, and the
  trainer's r = d/4 vs r = 8 (SstOptions' default, about the paper's 6% of the width), at
  --sst-iteration-steps so that re-SVDs happen in the run;
- LoRA (group lora): the layers converted, the byte model's four projections (the default)
  vs PEFT's GPT-2 target (`c_attn`, the fused query-key-value projection: `--roles
  attn_qkv`) and vs the two MLP projections;
- Deep LoRA (group deeplora): the four projections (the default) vs the query-key-value
  projection alone (`--roles attn_qkv`, the nearest this model has to the authors' query and
  value projections).
Cuttlefish runs with its default detector, tracking once an epoch (an epoch is one
evaluation interval, --eval-every steps). A pair is only about the switch if the switch
happens: when the default detector does not switch in every seed, the three Cuttlefish arms
run again with --cuttlefish-track-steps (--track-steps) so it tracks more often, and both
sets are reported. Printed per arm: validation bits per byte (mean ± 95% interval, Student's
t over the seeds), the difference alternative minus default paired by seed with its interval
and a verdict, the switch steps, train seconds. Every number comes from the runs' JSON output
and rank logs; raw outputs stay in --out.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

from results_common import (ROOT, add_byte_run_options, build_byte_trainer, format_ci, machine_line, mean_ci,
                            paired_verdict, relative_command, replace_block, run_grid)

CF_BEGIN, CF_END = "<!-- defaults-cuttlefish:begin -->", "<!-- defaults-cuttlefish:end -->"
SST_BEGIN, SST_END = "<!-- defaults-sst:begin -->", "<!-- defaults-sst:end -->"
# The groups of plain pairs (every arm against the group's first): page and markers.
PAIR_PAGES = {"sst-rank": ("docs/methods/sst.md", "<!-- defaults-sst-rank:begin -->", "<!-- defaults-sst-rank:end -->"),
              "lora": ("docs/methods/lora.md", "<!-- defaults-lora:begin -->", "<!-- defaults-lora:end -->"),
              "deeplora": ("docs/methods/deep_lora.md", "<!-- defaults-deeplora:begin -->",
                           "<!-- defaults-deeplora:end -->")}
GROUPS = ["cuttlefish", "sst", *PAIR_PAGES]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per arm (default %(default)s)")
    ap.add_argument("--config", default="mini")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50, help="steps an epoch (default %(default)s)")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--sst-iteration-steps", type=int, default=50,
                    help="SST's T3 in both SST arms (default %(default)s: 10 iterations in 500 steps)")
    ap.add_argument("--t3-sweep", default="25,50,100",
                    help="SST's T3 values run beside the default 200 (default %(default)s)")
    ap.add_argument("--track-steps", type=int, default=10,
                    help="Cuttlefish's --cuttlefish-track-steps for the second set of Cuttlefish arms, run when "
                         "the default detector does not switch in every seed (default %(default)s)")
    ap.add_argument("--always-track", action="store_true",
                    help="run the --track-steps set of Cuttlefish arms even when the default detector switches")
    ap.add_argument("--only", choices=GROUPS, action="append",
                    help="a group to run and write (may be repeated; default: every group)")
    add_byte_run_options(ap, "defaults_ablation")
    ap.add_argument("--write-docs", action="store_true",
                    help="write the blocks into docs/methods/cuttlefish.md and docs/methods/sst.md")
    return ap.parse_args()


def cuttlefish_specs(extra=(), suffix=""):
    base = ["--method", "cuttlefish", *extra]
    return {f"cuttlefish{suffix}": base,
            f"cuttlefish{suffix}+init-in-history": [*base, "--cuttlefish-init-in-history"],
            f"cuttlefish{suffix}+reset-optimizer": [*base, "--cuttlefish-reset-optimizer"]}


def sst_specs(args):
    base = ["--method", "sst", "--sst-iteration-steps", str(args.sst_iteration_steps)]
    return {"sst": base, "sst+rewarm-spectral": [*base, "--sst-rewarm-scope", "spectral"]}


def sst_t3_specs(args):
    """The default T3 = 200 first (the reference), then the sweep, then no re-warm-up at 200."""
    arm = lambda t3, extra=(): ["--method", "sst", "--sst-iteration-steps", str(t3), *extra]  # noqa: E731
    specs = {"sst@T3=200": arm(200)}
    for t3 in (int(t) for t in args.t3_sweep.split(",") if t):
        specs[f"sst@T3={t3}"] = arm(t3)
    specs["sst@T3=200+no-rewarm"] = arm(200, ["--sst-rewarm", "0"])
    return specs


def rewarms(args, t3):
    """Iteration starts after step 0 within the run, each followed by a re-warm-up."""
    return (args.steps - 1) // t3


def pair_specs(args):
    """group -> {label: options}, the group's reference first."""
    sst = sst_specs(args)["sst"]
    return {"sst-rank": {"sst": sst,
                         "sst+T2=1": [*sst, "--sst-round-iterations", "1"],
                         "sst+T2=2": [*sst, "--sst-round-iterations", "2"],
                         "sst+rank8": [*sst, "--rank", "8"]},
            "lora": {"lora": ["--method", "lora"],
                     "lora+roles=attn_qkv": ["--method", "lora", "--roles", "attn_qkv"],
                     "lora+roles=mlp": ["--method", "lora", "--roles", "mlp_fc,mlp_proj"]},
            "deeplora": {"deeplora": ["--method", "deeplora"],
                         "deeplora+roles=attn_qkv": ["--method", "deeplora", "--roles", "attn_qkv"]}}


def switch_step(run):
    """The step of the first switch event in the run's rank log, or None."""
    steps = [e["step"] for e in run["events"] if e.get("event") == "switch"]
    return min(steps) if steps else None


def verdict(delta):
    return paired_verdict(delta, "")


def summarise(runs, pairs, seeds):
    """Per arm: its statistics; for an alternative, its paired difference to its default."""
    rows = {}
    for label, by_seed in runs.items():
        bpb = [by_seed[s]["result"]["val_bpb"] for s in seeds]
        row = {"bpb": mean_ci(bpb), "train_seconds": mean_ci([by_seed[s]["result"]["train_seconds"] for s in seeds]),
               "switch": [switch_step(by_seed[s]) for s in seeds],
               "params": mean_ci([by_seed[s]["result"]["params"] for s in seeds]),
               "trainable": mean_ci([by_seed[s]["result"].get("trainable_params", 0) for s in seeds])}
        if label in pairs:
            base = runs[pairs[label]]
            row["vs"] = pairs[label]
            row["delta"] = mean_ci([b - base[s]["result"]["val_bpb"] for b, s in zip(bpb, seeds)])
        rows[label] = row
    return rows


def switch_text(switch):
    got = [s for s in switch if s is not None]
    if not got:
        return f"never (0/{len(switch)})"
    return f"{', '.join(str(s) for s in switch if s is not None)} ({len(got)}/{len(switch)})"


def table(rows, labels, n_seeds, with_switch, with_params=False):
    head = f"| arm | val bits/byte ({n_seeds} seeds) | alternative - default (paired) | verdict |"
    rule = "|---|---:|---:|---|"
    if with_switch:
        head += " switch step (seeds switched) | parameters at the end |"
        rule += "---|---:|"
    elif with_params:
        head += " parameters at the end | trainable |"
        rule += "---:|---:|"
    head += " train s |"
    rule += "---:|"
    out = [head, rule]
    for label in labels:
        r = rows[label]
        delta = format_ci(*r["delta"]) if "delta" in r else ""
        line = f"| `{label}` | {format_ci(*r['bpb'])} | {delta} | {verdict(r['delta']) if 'delta' in r else 'reference'} |"
        if with_switch:
            line += f" {switch_text(r['switch'])} | {r['params'][0]:,.0f} |"
        elif with_params:
            line += f" {r['params'][0]:,.0f} | {r['trainable'][0]:,.0f} |"
        line += f" {r['train_seconds'][0]:.1f} |"
        out.append(line)
    return "\n".join(out)


def finding(rows, label):
    r = rows[label]
    mean, half = r["delta"]
    v = verdict(r["delta"])
    what = {"within seed noise": "within the seeds' noise", "better": "better than the default",
            "worse": "worse than the default"}.get(v, v)
    text = f"`{label}` vs `{r['vs']}`: {mean:+.3f} ± {half:.3f} bits/byte, {what}"
    n, k, k0 = len(r["switch"]), sum(1 for s in r["switch"] if s is not None), \
        sum(1 for s in rows[r["vs"]]["switch"] if s is not None)
    if k != k0:  # then the pair compares a run that stayed dense with one that switched
        text += f" (it switches in {k}/{n} seeds, its reference in {k0}/{n}: the pair's spread is mostly that)"
    elif r["switch"] != rows[r["vs"]]["switch"]:
        text += " (it switches at other steps than its reference)"
    return text


def commands(runs, labels):
    return "\n".join(relative_command(runs[l][0]["cmd"]) for l in labels)


def main():
    args = parse_args()
    seeds = list(range(args.seeds))
    binary = build_byte_trainer(args.binary)
    common = ["--tokenizer", "bytes", "--config", args.config, "--steps", str(args.steps), "--batch",
              str(args.batch), "--context", str(args.context), "--lr", str(args.lr), "--eval-every",
              str(args.eval_every), "--eval-windows", str(args.eval_windows), "--data", args.data]
    out = Path(args.out)
    groups = set(args.only) if args.only else set(GROUPS)
    start = datetime.datetime.now()
    cf = cuttlefish_specs() if "cuttlefish" in groups else {}
    sst = sst_specs(args) if "sst" in groups else {}
    t3 = sst_t3_specs(args) if "sst" in groups else {}
    paired = {g: specs for g, specs in pair_specs(args).items() if g in groups}
    # A T3 of the sweep equal to the SST arms' is the `sst` arm itself: run once, shown under both labels.
    same = {label: other for label, spec in t3.items() for other, theirs in sst.items() if spec == theirs}
    every = {**cf, **sst, **{label: spec for label, spec in t3.items() if label not in same}}
    for specs in paired.values():
        every.update(specs)
    runs = run_grid(binary, every, seeds, common, out, args.jobs, args.threads, reuse=args.reuse)
    for label, other in same.items():
        runs[label] = runs[other]
    # A switch at the last step leaves no training after it: the optimizer state at the switch
    # and what the factors learn from there are then not measured, so it does not count.
    default_switched = "cuttlefish" not in groups or \
        all((switch_step(runs["cuttlefish"][s]) or args.steps) < args.steps for s in seeds)
    tracked = {}
    if "cuttlefish" in groups and (not default_switched or args.always_track):
        tracked = cuttlefish_specs(["--cuttlefish-track-steps", str(args.track_steps)], f"@track{args.track_steps}")
        runs.update(run_grid(binary, tracked, seeds, common, out, args.jobs, args.threads, reuse=args.reuse))
    seconds = (datetime.datetime.now() - start).total_seconds()

    pairs = {}
    for group in (cf, tracked, sst, t3, *paired.values()):
        labels = list(group)
        for alt in labels[1:]:
            pairs[alt] = labels[0]
    rows = summarise(runs, pairs, seeds)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    cf_table = table(rows, [*cf, *tracked], len(seeds), with_switch=True)
    sst_table = table(rows, list(sst), len(seeds), with_switch=False)
    t3_table = table(rows, list(t3), len(seeds), with_switch=False)
    pair_tables = {g: table(rows, list(specs), len(seeds), with_switch=False, with_params=True)
                   for g, specs in paired.items()}
    for text in ([cf_table] if cf else []) + ([sst_table, t3_table] if sst else []) + list(pair_tables.values()):
        print(text)
        print()
    print(f"defaults_ablation: {(len(runs) - len(same)) * len(seeds)} runs in {seconds / 60:.1f} minutes",
          file=sys.stderr)
    if not args.write_docs:
        return

    wall = sum(r["result"]["wall_seconds"] for by_seed in runs.values() for r in by_seed.values())
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()[:10]
    setting = (f"config `{args.config}` over bytes, {args.steps} steps of {args.batch} x {args.context} bytes, AdamW lr "
               f"{args.lr} with warm-up and cosine decay, an epoch (and an evaluation) every {args.eval_every} steps, "
               f"seeds {seeds[0]}-{seeds[-1]}, {args.jobs} runs at a time with {args.threads} thread each, "
               f"{wall / 60:.1f} minutes of runs in all (the sum of the runs' wall seconds, {args.jobs} at a time; train "
               "seconds vary with the machine's other load, so they compare arms only roughly)")
    stats = ("The intervals are 95% (Student's t over the seeds); \"alternative - default\" is the difference in "
             "validation bits per byte to the default arm run with the same seed (the same batches); a verdict "
             "is \"better\" or \"worse\" only when that interval excludes 0.")

    written = {}  # group -> (page, begin, end, the block's lines)
    for g, specs in paired.items():
        page, begin, end = PAIR_PAGES[g]
        written[g] = (ROOT / page, begin, end, [
            begin,
            "```text",
            pair_tables[g],
            "```",
            "",
            "; ".join(finding(rows, label) for label in list(specs)[1:]) + ".",
            "",
            f"Written by `python3 scripts/defaults_ablation.py --only {g} --write-docs` on {now}, {machine_line()}: "
            f"{setting}. " + stats + " The arms' commands (seed 0):",
            "",
            "```",
            commands(runs, list(specs)),
            "```",
            end,
        ])
    if cf:
        written.update(cuttlefish_block(args, rows, runs, cf, tracked, seeds, default_switched, now, setting, stats,
                                         cf_table))
    if sst:
        written["sst"] = sst_block(args, rows, runs, sst, t3, now, setting, stats, sst_table, t3_table)
    for page, begin, end, body in written.values():
        if begin not in page.read_text():
            raise SystemExit(f"defaults_ablation: {page} has no {begin} marker (put the pair where the block belongs)")
        replace_block(page, begin, end, "\n".join(body))


def cuttlefish_block(args, rows, runs, cf, tracked, seeds, default_switched, now, setting, stats, cf_table):
    sw = rows["cuttlefish"]["switch"]
    n_before_end = sum(1 for s in sw if s is not None and s < args.steps)
    if default_switched:
        detector = (f"The default detector (w 3, L 2, tau 0.3, tracking once an epoch) switches before the last step "
                    f"in every seed (steps {switch_text(sw)}), so both pairs include training after a switch.")
    else:
        detector = (f"The default detector (w 3, L 2, tau 0.3, tracking once an epoch) switches at step(s) "
                    f"{switch_text(sw)} of {args.steps}: before the last step in only {n_before_end}/{len(seeds)} "
                    f"seeds (a switch at step {args.steps} leaves no training after it, the factors are the SVD "
                    f"truncation evaluated as they are). With {args.steps // args.eval_every} tracking points and w = 3 the "
                    "detector acts late in this run; that is itself a finding, and the pairs at once an epoch then "
                    f"measure little of what follows a switch. The `@track{args.track_steps}` arms track "
                    f"the stable ranks every {args.track_steps} steps (`--cuttlefish-track-steps {args.track_steps}`) "
                    "so the detector has enough points to switch early in the run.")
    cf_findings = [finding(rows, l) for l in [*cf, *tracked] if "delta" in rows[l]]
    cf_body = [
        CF_BEGIN,
        "```text",
        cf_table,
        "```",
        "",
        detector + " " + "; ".join(cf_findings) + ".",
        "",
        f"Written by `python3 scripts/defaults_ablation.py --write-docs` on {now}, {machine_line()}: {setting}. "
        + stats + " The arms' commands (seed 0):",
        "",
        "```",
        commands(runs, [*cf, *tracked]),
        "```",
        CF_END,
    ]
    return {"cuttlefish": (ROOT / "docs" / "methods" / "cuttlefish.md", CF_BEGIN, CF_END, cf_body)}


def sst_block(args, rows, runs, sst, t3, now, setting, stats, sst_table, t3_table):
    sst_body = [
        SST_BEGIN,
        "```text",
        sst_table,
        "```",
        "",
        f"T3 = {args.sst_iteration_steps} steps in both arms (so the re-warm-up acts {rewarms(args, args.sst_iteration_steps)} "
        "times in the run; the re-warm-up length and everything else at the defaults); "
        + finding(rows, "sst+rewarm-spectral") + ".",
        "",
        "```text",
        t3_table,
        "```",
        "",
        f"T3 against the default 200 (a re-SVD comes every T2 x T3 steps, T2 = ceil(d / r) iterations), and the "
        f"default's re-warm-up against none at T3 = 200, where it acts only {rewarms(args, 200)} times in "
        f"{args.steps} steps (a weak test of it): "
        + "; ".join(finding(rows, label) for label in list(t3)[1:]) + ".",
        "",
        f"Written by `python3 scripts/defaults_ablation.py --write-docs` on {now}, {machine_line()}: {setting}. "
        + stats + " The arms' commands (seed 0):",
        "",
        "```",
        commands(runs, [*sst, *t3]),
        "```",
        SST_END,
    ]
    return ROOT / "docs" / "methods" / "sst.md", SST_BEGIN, SST_END, sst_body


if __name__ == "__main__":
    main()
