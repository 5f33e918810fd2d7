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
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["dense", "lora", "relora", "inrank", "cuttlefish", "sst", "deeplora"]
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


def build():
    # Packages and data, as scripts/run-mlp.sh does (quick when everything is present).
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], check=True, stdout=subprocess.DEVNULL)
    if not (ROOT / "build" / "release" / "build.ninja").exists():
        subprocess.run(["cmake", "--preset", "release"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "--preset", "release", "--target", "lowrank-mlp"], cwd=ROOT, check=True)
    return str(ROOT / "build" / "release" / "examples" / "mlp" / "lowrank-mlp")


def run_method(binary, method, args, out):
    log = out / f"{method}.metrics.jsonl"
    ranks = out / f"{method}.ranks.jsonl"
    cmd = [binary, "--method", method, "--epochs", str(args.epochs), "--hidden", str(args.hidden),
           "--seed", str(args.seed), "--threads", str(args.threads), "--data", args.data,
           "--log", str(log), "--rank-log", str(ranks), "--quiet", *args.extra]
    if args.rank:
        cmd += ["--rank", str(args.rank)]
    print("results: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"results: {method} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    epochs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in ranks.read_text().splitlines() if line.strip()] if ranks.exists() else []
    return {"cmd": cmd, "result": result, "epochs": epochs, "events": events}


def rank_series(run, layer_names):
    """Per layer: (step, rank) points of a step function over training."""
    result = run["result"]
    first = run["epochs"][0]["ranks"] if run["epochs"] else list(result["final_ranks"].values())
    total = result["steps"]
    series = {}
    for i, name in enumerate(layer_names):
        points = []
        init = [e for e in run["events"] if e["layer"] == name and e["event"] == "init"]
        start = init[0]["new_rank"] if init else first[i]
        points.append((0, start))
        for e in run["events"]:
            if e["layer"] == name and e["event"] != "init" and e["new_rank"] != points[-1][1]:
                points.append((e["step"], points[-1][1]))
                points.append((e["step"], e["new_rank"]))
        points.append((total, list(result["final_ranks"].values())[i]))
        series[name] = points
    return series


def plot(runs, out_svg, data_dir):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("results: gnuplot not found, no plot (bash scripts/setup.sh installs gnuplot-nox)", file=sys.stderr)
        return False
    any_run = next(iter(runs.values()))
    names = list(any_run["result"]["final_ranks"].keys())[:-1]  # hidden layers; the output layer stays dense
    for name in names:
        for method, run in runs.items():
            dat = data_dir / f"{method}.{name}.dat"
            pts = rank_series(run, [name])[name]
            dat.write_text("".join(f"{s} {r}\n" for s, r in pts))
    script = [
        f'set terminal svg size 960,{360 * len(names)} dynamic font "sans,11"',
        f'set output "{out_svg}"',
        f"set multiplot layout {len(names)},1",
        "set key outside right",
        'set xlabel "optimizer step"',
        'set ylabel "rank"',
        "set grid",
    ]
    for name in names:
        script.append(f'set title "{name}: rank of each method over training"')
        parts = [f'"{data_dir / f"{m}.{name}.dat"}" using 1:2 with lines lw 2 title "{m}"' for m in runs]
        script.append("plot " + ", ".join(parts))
    script.append("unset multiplot")
    subprocess.run([gnuplot], input="\n".join(script) + "\n", text=True, check=True)
    return True


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
        "`--rank` is hidden / 4 for LoRA, ReLoRA, SST (active pairs) and Deep LoRA (2r wide); "
        "InRank and Cuttlefish choose their own ranks.",
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
        cmd = [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in run["cmd"]]
        body.append(" ".join(cmd))
    body.append("```")
    body.append(END)
    text = page.read_text() if page.exists() else ""
    block = "\n".join(body)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = "# Results\n\n" + block + "\n"
    page.write_text(text)
    print(f"results: wrote {page}", file=sys.stderr)


def main():
    args = parse_args()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"results: unknown method '{m}', expected one of {', '.join(METHODS)}")
    binary = args.binary or build()
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
