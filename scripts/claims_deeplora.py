#!/usr/bin/env python3
"""Deep LoRA's few-shot claim, tested in direction on the byte-level GPT: adapting a
pre-trained model on few examples, the compressed deep factorisation overfits less than
LoRA and reaches better held-out quality, and it is insensitive to the width it is given.

    python3 scripts/claims_deeplora.py                 # about 10 minutes on 2 cores
    python3 scripts/claims_deeplora.py --write-docs    # also docs/fidelity.md's claims-deeplora-fewshot block
                                                       # and docs/results/fidelity_deeplora.svg

1. The text is split by document into two byte corpora: the State of the Union addresses
   (pre-training) and Moby Dick (adaptation; its last 10% held out).
2. A dense `mini` byte model is pre-trained on the addresses (seed 0) and exported as dense
   weights (`--export`, nanoGPT layout).
3. From those weights (`--init-from`), every projection is adapted on the first n windows
   of Moby Dick's training bytes (`--train-tokens n (T + 1)`), n in --examples, with LoRA as
   the authors build it (Deep LoRA's depth-2 baseline: `--deeplora-depth 2 --deeplora-init
   lora`) and with compressed Deep LoRA (depth 3, `--deeplora-compress`) at several ranks;
   several seeds each (the seed draws the factors' initialisation and the batches).
Reported per n and method: held-out bits per byte, and the train-test gap (held-out minus
the last interval's training loss, in bits per byte), mean ± 95% interval. Verdicts come
from the intervals, paired by seed against LoRA.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from results_common import (ROOT, build, build_byte_trainer, format_ci, gnuplot, machine_line, mean_ci,
                            relative_command, replace_block, run_grid)

BEGIN, END = "<!-- claims-deeplora-fewshot:begin -->", "<!-- claims-deeplora-fewshot:end -->"
LN2 = 0.6931471805599453


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--examples", default="16,64,256", help="n, windows of adaptation data (default %(default)s)")
    ap.add_argument("--ranks", default="4,8,16", help="Deep LoRA's ranks r (width 2r; default %(default)s)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=200, help="adaptation steps (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="adaptation lr (default %(default)s)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--binary", default=None, help="a built lowrank-gpt2 (default: build the release preset)")
    ap.add_argument("--tokenize", default=None, help="a built lowrank-tokenize (default: build it)")
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / "claims_deeplora"))
    ap.add_argument("--reuse", action="store_true",
                    help="read back a run kept in --out with the same command instead of running it again")
    ap.add_argument("--write-docs", action="store_true")
    return ap.parse_args()


def main():
    args = parse_args()
    seeds = list(range(args.seeds))
    examples = [int(n) for n in args.examples.split(",") if n]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    binary = build_byte_trainer(args.binary)
    tokenize = args.tokenize
    if not tokenize:
        build("lowrank-tokenize")
        tokenize = str(ROOT / "build" / "release" / "examples" / "tokenize" / "lowrank-tokenize")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = datetime.datetime.now()
    text = ROOT / "data" / "text"
    sotu = sorted(str(p) for p in (text / "sotu").glob("*.txt"))
    for prefix, files in (("sotu", sotu), ("moby", [str(text / "moby-dick.txt")])):
        subprocess.run([tokenize, "--bytes", "--out", str(out / prefix), *files], check=True, stdout=subprocess.DEVNULL)

    common = ["--tokenizer", "bytes", "--config", "mini", "--context", str(args.context), "--batch", "8",
              "--eval-windows", "128"]
    pre = out / "pretrained.safetensors"
    run_grid(binary, {"pretrain": ["--data", str(out / "sotu"), "--steps", str(args.pretrain_steps), "--lr", "3e-3",
                                   "--eval-every", "100", "--export", str(pre), "--export-layout", "nanogpt"]},
             [0], common, out, 1, reuse=args.reuse)
    specs = {}
    for n in examples:
        data = ["--data", str(out / "moby"), "--init-from", str(pre), "--train-tokens", str(n * (args.context + 1))]
        adapt = [*data, "--steps", str(args.steps), "--lr", str(args.lr), "--warmup-steps", "10", "--eval-every", "50"]
        specs[f"lora-n{n}"] = [*adapt, "--method", "deeplora", "--deeplora-depth", "2", "--deeplora-init", "lora",
                               "--deeplora-width", str(args.lora_rank), "--rank", str(args.lora_rank)]
        for r in ranks:
            specs[f"deeplora-r{r}-n{n}"] = [*adapt, "--method", "deeplora", "--deeplora-compress", "--rank", str(r)]
        # The pre-trained model as it is: one step at a negligible lr, then the evaluation.
        specs[f"none-n{n}"] = [*data, "--method", "dense", "--steps", "1", "--lr", "1e-12", "--eval-every", "1"]
    runs = run_grid(binary, specs, seeds, common, out, args.jobs, reuse=args.reuse)
    minutes = (datetime.datetime.now() - start).total_seconds() / 60

    def val(label):
        return [runs[label][s]["result"]["val_bpb"] for s in seeds]

    def gap(label):
        return [runs[label][s]["result"]["val_bpb"] - runs[label][s]["result"]["train_loss"] / LN2 for s in seeds]

    def paired(f, a, b):
        return mean_ci([x - y for x, y in zip(f(a), f(b))])

    rows = ["| n | method | held-out bits/byte | train-test gap (bits/byte) | trainable |", "|---:|---|---:|---:|---:|"]
    for n in examples:
        rows.append(f"| {n} | pre-trained, not adapted | {format_ci(*mean_ci(val(f'none-n{n}')))} | | |")
        for label, title in [(f"lora-n{n}", f"LoRA (r {args.lora_rank}, the authors' init)")] + \
                [(f"deeplora-r{r}-n{n}", f"Deep LoRA, compressed, r {r}") for r in ranks]:
            rows.append(f"| {n} | {title} | {format_ci(*mean_ci(val(label)))} | {format_ci(*mean_ci(gap(label)))} | "
                        f"{runs[label][0]['result']['trainable_params']:,} |")
    table = "\n".join(rows)
    print(table)
    print(f"claims_deeplora: {len(specs) * len(seeds) + 1} runs in {minutes:.1f} minutes", file=sys.stderr)
    summary, machine = Path(out, "summary.json"), machine_line()
    if args.reuse and summary.exists():  # the time and machine of the call that ran them
        previous = json.loads(summary.read_text())
        minutes, machine = previous.get("minutes", minutes), previous.get("machine", machine)
    summary.write_text(json.dumps({"minutes": minutes, "machine": machine,
                                   "runs": {l: {"val": val(l), "gap": gap(l)} for l in specs}}, indent=1))
    if not args.write_docs:
        return

    def beyond_below(ci):  # the interval lies below zero
        return ci[1] is not None and ci[0] + ci[1] < 0

    def beyond_above(ci):
        return ci[1] is not None and ci[0] - ci[1] > 0

    n0, r0 = min(examples), args.lora_rank if args.lora_rank in ranks else ranks[0]
    d_gap = paired(gap, f"deeplora-r{r0}-n{n0}", f"lora-n{n0}")
    d_val = paired(val, f"deeplora-r{r0}-n{n0}", f"lora-n{n0}")
    word = lambda ci: "holds" if beyond_below(ci) else "does not hold here" if beyond_above(ci) else \
        "does not hold here (within seed noise)"
    spread = max(mean_ci(val(f"deeplora-r{r}-n{n0}"))[0] for r in ranks) - \
        min(mean_ci(val(f"deeplora-r{r}-n{n0}"))[0] for r in ranks)
    pairs = [paired(val, f"deeplora-r{a}-n{n0}", f"deeplora-r{b}-n{n0}") for a in ranks for b in ranks if a < b]
    insensitive = all(not beyond_below(p) and not beyond_above(p) for p in pairs)
    claim = ["| claim | paper | ours | verdict |", "|---|---|---|---|",
             f"| less overfitting than LoRA with few examples (n = {n0}, rank {r0}) | smaller train-test gap | "
             f"gap {format_ci(*d_gap)} bits/byte vs LoRA (paired, {len(seeds)} seeds) | {word(d_gap)} |",
             f"| better held-out quality than LoRA with few examples (n = {n0}) | +0.07 Pearson at 16 examples | "
             f"{format_ci(*d_val)} bits/byte vs LoRA | {word(d_val)} |",
             f"| insensitive to the width (ranks {', '.join(map(str, ranks))}, n = {n0}) | yes | means within "
             f"{spread:.3f} bits/byte of each other | {'holds' if insensitive else 'does not hold here'} |"]
    # The plot: the train-test gap and the held-out quality against n, a series per method.
    methods = [("lora", f"LoRA r {args.lora_rank}")] + [(f"deeplora-r{r}", f"Deep LoRA r {r}") for r in ranks]

    def series(f, with_none=False):
        lines = {title: [(n, *mean_ci(f(f"{m}-n{n}"))) for n in examples] for m, title in methods}
        if with_none:
            lines["pre-trained, not adapted"] = [(n, *mean_ci(val(f"none-n{n}"))) for n in examples]
        return lines

    svg, dodge = ROOT / "docs" / "results" / "fidelity_deeplora.svg", 0.04
    look = {"errorbars": "y", "log_x": 2, "dodge": dodge}
    gnuplot([(f"train-test gap against n (mean and 95% interval of {len(seeds)} seeds)", "gap (bits/byte)",
              series(gap), look),
             ("held-out bits/byte against n", "held-out bits/byte", series(val, with_none=True), look)],
            svg, out, "n, windows of adaptation data (log scale)")
    cmd = "python3 scripts/claims_deeplora.py --write-docs"
    figure = [f"![train-test gap and held-out bits/byte against n, per method](results/{svg.name})", "",
              f"*The train-test gap and held-out bits/byte (mean, 95% interval over {len(seeds)} seeds) against n on "
              f"a log axis, drawn by `{cmd}`; the points of one n are spread sideways by up to "
              f"{100 * dodge * len(methods) / 2:.0f}% so that their bars stay apart.*", ""]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    body = [BEGIN, "### Deep LoRA: few-shot adaptation", "", "\n".join(claim), "", table, "", *figure,
            f"Written by `{cmd}` on {now[:10]}, {machine}, "
            f"{minutes:.1f} minutes: a dense `mini` byte model pre-trained {args.pretrain_steps} steps on the State "
            f"of the Union addresses, adapted {args.steps} steps (lr {args.lr}) on the first n windows of "
            f"{args.context + 1} bytes of Moby Dick, held-out: Moby Dick's last 10%; seeds {seeds[0]}-{seeds[-1]}, "
            "mean ± 95% interval. The gap is held-out bits per byte minus the training loss of the last interval "
            "(the batches the run trained on), in bits per byte. One adaptation run's command:", "", "```",
            relative_command(runs[f"deeplora-r{r0}-n{n0}"][0]["cmd"]), "```", END]
    replace_block(ROOT / "docs" / "fidelity.md", BEGIN, END, "\n".join(body))


if __name__ == "__main__":
    main()
