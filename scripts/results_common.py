"""Shared by the results scripts (results_mlp.py, results_gpt2.py): building a target,
running a trainer and reading its JSON output and logs, rank step functions, gnuplot
output, and replacing a marked block of a docs page."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["dense", "lora", "relora", "inrank", "cuttlefish", "sst", "deeplora", "galore"]


def check_methods(text):
    """The methods of a comma-separated list; `all` is every method."""
    if text == "all":
        return list(METHODS)
    methods = [m for m in text.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"results: unknown method '{m}', expected one of {', '.join(METHODS)}")
    return methods


def build(target, setup_args=()):
    """Installs packages and data (quick when present), builds `target` in the release preset."""
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *setup_args], check=True, stdout=subprocess.DEVNULL)
    if not (ROOT / "build" / "release" / "build.ninja").exists():
        subprocess.run(["cmake", "--preset", "release"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "--preset", "release", "--target", target], cwd=ROOT, check=True)


def read_jsonl(path, kind=None):
    """The JSON lines of a file ([] if it is missing). With kind, only the records of that
    "kind": a trainer's --log holds "eval" lines (one per evaluation) and "step" lines (one
    per --log-every steps); a line without "kind" (older logs) counts as "eval"."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines if kind is None else [e for e in lines if e.get("kind", "eval") == kind]


def trainer_env(threads):
    """The environment of a trainer run. OpenBLAS reads OPENBLAS_CORETYPE when it loads; where
    it is set (this machine sets it to Haswell) it overrides OpenBLAS's own choice of kernel,
    which is AVX-512 on an AVX-512 CPU. OPENBLAS_NUM_THREADS sizes OpenBLAS's thread pool when
    it starts. Builds on Eigen's own GEMM ignore both variables."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def run_trainer(cmd, name, log, ranks, env=None):
    """Runs one training command; returns its final JSON line, its evaluation lines ("log"),
    its --log-every lines ("steps") and its rank events."""
    print("results: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"results: {name} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"cmd": cmd, "result": result, "log": read_jsonl(log, "eval"), "steps": read_jsonl(log, "step"),
            "events": read_jsonl(ranks)}


def rank_series(run, name, start_rank, final_rank):
    """(step, rank) points of one layer's rank as a step function over training."""
    init = [e for e in run["events"] if e["layer"] == name and e["event"] == "init"]
    points = [(0, init[0]["new_rank"] if init else start_rank)]
    for e in run["events"]:
        if e["layer"] == name and e["event"] != "init" and e["new_rank"] != points[-1][1]:
            points.append((e["step"], points[-1][1]))
            points.append((e["step"], e["new_rank"]))
    points.append((run["result"]["steps"], final_rank))
    return points


def gnuplot(panels, out_svg, data_dir, xlabel):
    """panels: [(title, ylabel, {series name: [(x, y), ...]})], one plot each, stacked."""
    program = shutil.which("gnuplot")
    if not program:
        print("results: gnuplot not found, no plot (bash scripts/setup.sh installs gnuplot-nox)", file=sys.stderr)
        return False
    script = [
        f'set terminal svg size 960,{360 * len(panels)} dynamic font "sans,11"',
        f'set output "{out_svg}"',
        f"set multiplot layout {len(panels)},1",
        "set key outside right",
        f'set xlabel "{xlabel}"',
        "set grid",
    ]
    for i, (title, ylabel, series) in enumerate(panels):
        parts = []
        for j, (label, points) in enumerate(series.items()):
            dat = Path(data_dir) / f"plot{i}_{j}.dat"
            dat.write_text("".join(f"{x} {y}\n" for x, y in points))
            parts.append(f'"{dat}" using 1:2 with lines lw 2 title "{label}"')
        script += [f'set title "{title}"', f'set ylabel "{ylabel}"', "plot " + ", ".join(parts)]
    script.append("unset multiplot")
    subprocess.run([program], input="\n".join(script) + "\n", text=True, check=True)
    return True


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def relative_command(cmd):
    return " ".join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd)


def replace_block(page, begin, end, block):
    """Puts `block` (which starts with `begin` and ends with `end`) into the page, replacing
    the previous block with the same markers, or appending it."""
    page = Path(page)
    text = page.read_text() if page.exists() else "# Results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.write_text(text)
    print(f"results: wrote {page}", file=sys.stderr)
