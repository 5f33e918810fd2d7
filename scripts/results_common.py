"""Shared by the results scripts (results_mlp.py, results_gpt2.py): building a target,
running a trainer and reading its JSON output and logs, rank step functions, gnuplot
output, and replacing a marked block of a docs page."""

import json
import os
import platform
import re
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
    # To the end at the last rank; a final rank the events do not reach (a layer whose last
    # change went unlogged) steps there at the end instead of drawing a slope to it.
    points.append((run["result"]["steps"], points[-1][1]))
    if final_rank != points[-1][1]:
        points.append((run["result"]["steps"], final_rank))
    return points


def gnuplot(panels, out_svg, data_dir, xlabel):
    """panels: [(title, ylabel, {series name: [(x, y), ...]}[, options])], one plot each,
    stacked. Options of a panel, all optional:
    - log_y / log_x: that axis on a log scale (True: base 10, or a number: that base);
    - xlabel: this panel's x label instead of `xlabel`;
    - errorbars: "y" for points (x, y, dy), "xy" for (x, y, dx, dy) (a half-width of None,
      one seed, draws no bar); a series of one point is drawn as a marker, a longer one as
      markers joined by lines;
    - dodge: spreads the series of a panel sideways, series j of k at x (1 + dodge (j - (k-1)/2)),
      so the bars of points at the same x stay apart (a ratio, even on a log axis)."""
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
    # Settings that only some panels change are set on every panel of a figure that uses
    # them, so a panel does not inherit the previous one's (and line plots stay as they were).
    opts = [p[3] if len(p) > 3 else {} for p in panels]
    uses = {key: any(o.get(key) for o in opts) for key in ("log_x", "xlabel", "errorbars")}

    def logscale(axis, value):
        if not value:
            return f"unset logscale {axis}"
        return f"set logscale {axis}" if value is True else f"set logscale {axis} {value}"

    for i, (title, ylabel, series, *_) in enumerate(panels):
        o = opts[i]
        script.append(logscale("y", o.get("log_y")))
        if uses["log_x"]:
            script.append(logscale("x", o.get("log_x")))
        if uses["xlabel"]:
            script.append(f'set xlabel "{o.get("xlabel", xlabel)}"')
        if uses["errorbars"]:  # room around the outermost markers and their bars
            script.append("set offsets graph 0.05, graph 0.05, graph 0.05, graph 0.05" if o.get("errorbars")
                          else "set offsets 0, 0, 0, 0")
        bars, dodge, k = o.get("errorbars"), o.get("dodge", 0.0), len(series)
        parts = []
        for j, (label, points) in enumerate(series.items()):
            dat = Path(data_dir) / f"plot{i}_{j}.dat"
            if not bars:
                dat.write_text("".join(f"{x} {y}\n" for x, y in points))
                parts.append(f'"{dat}" using 1:2 with lines lw 2 title "{label}"')
                continue
            shift = 1.0 + dodge * (j - (k - 1) / 2)
            rows = [(p[0] * shift, *(0.0 if v is None else v for v in p[1:])) for p in points]
            dat.write_text("".join(" ".join(str(v) for v in row) + "\n" for row in rows))
            using, style = ("1:2:3:4", "xyerror") if bars == "xy" else ("1:2:3", "yerror")
            style += "lines" if len(points) > 1 else "bars"
            parts.append(f'"{dat}" using {using} with {style} lw 2 pt 7 ps 0.8 title "{label}"')
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


def cpu_info():
    """Model, family, model number and the SIMD flags of the first processor in /proc/cpuinfo."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = value.strip()
            if not line.strip() and info:
                break
    except OSError:
        pass
    simd = re.compile(r"^(?:sse\S*|ssse3|avx\S*|fma|f16c|amx\S*)$")
    info["simd"] = " ".join(f for f in info.get("flags", "").split() if simd.match(f))
    return info


def machine_key(info, isa):
    """A machine block's key: CPU model, family and model number, and the build's ISA."""
    model = re.sub(r"[^a-z0-9]+", "-", info.get("model name", "cpu").lower()).strip("-")
    return f"{model}-f{info.get('cpu family', '?')}m{info.get('model', '?')}-{isa}"


def put_keyed_block(text, tag, body, anchor):
    """The page's text with the block <!-- tag:begin --> body <!-- tag:end --> replaced, or, when
    the page has none yet, added before the line `anchor` (one block per machine, say)."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    if begin in text and end in text:
        return text[: text.index(begin)] + f"{begin}\n{body}\n{end}" + text[text.index(end) + len(end):]
    if anchor not in text:
        raise SystemExit(f"results: the page has neither {begin} nor {anchor}")
    return text.replace(anchor, f"{begin}\n{body}\n{end}\n\n{anchor}", 1)


def relative_command(cmd):
    """The command as a page shows it: paths below the checkout relative to it, and a program
    of a build folder elsewhere as BUILD/<its path in that folder> (a reader's build folder
    is their own; /tmp/... of the machine that ran it means nothing to them)."""
    def shown(c):
        if c.startswith(str(ROOT)):
            return os.path.relpath(c, ROOT)
        for part in ("/examples/", "/bench/"):
            if c.startswith("/") and part in c and os.access(c, os.X_OK):
                return "BUILD" + c[c.index(part):]
        return c
    return " ".join(shown(c) for c in cmd)


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


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96 is within 4%).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values):
    """(mean, half-width of the 95% interval of the mean by Student's t); half-width None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return mean, t * (var / n) ** 0.5


def paired_verdict(delta, than=""):
    """A paired difference (mean, half-width; bits per byte, higher is worse) in words:
    within seed noise when the interval holds 0, else worse / better (+ `than`)."""
    mean, half = delta
    if half is None:
        return "one seed: no interval"
    if abs(mean) <= half:
        return "within seed noise"
    return ("worse" if mean > 0 else "better") + than


def format_ci(mean, half, digits=3):
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def add_byte_run_options(ap, out):
    """The options every byte-model script shares: threads per run, runs at once, the
    binary, the byte corpus, the folder of the raw runs (`out`, under build/results) and
    --reuse."""
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (default 2)")
    ap.add_argument("--binary", default=None, help="a built lowrank-gpt2 (default: build the release preset)")
    ap.add_argument("--data", default=str(ROOT / "data" / "text" / "corpus-bytes"))
    ap.add_argument("--out", default=str(ROOT / "build" / "results" / out))
    ap.add_argument("--reuse", action="store_true",
                    help="read back a run kept in --out with the same command instead of running it again")


def build_byte_trainer(binary=None):
    """The lowrank-gpt2 to run: `binary`, or the release preset's, built after the corpus is
    tokenized (scripts/prepare_text.sh writes the byte streams too)."""
    if binary:
        return binary
    subprocess.run(["bash", str(ROOT / "scripts" / "prepare_text.sh")], check=True, stdout=sys.stderr)
    build("lowrank-gpt2")
    return str(ROOT / "build" / "release" / "examples" / "gpt2" / "lowrank-gpt2")


def run_grid(binary, specs, seeds, common, out, jobs, threads=1, reuse=False):
    """Runs every spec (label -> lowrank-gpt2 options) with every seed, `jobs` at a time,
    after the options `common`; returns {label: {seed: run}} (run_trainer's records, also
    kept as OUT/<label>.seed<N>.run.json). With reuse, a run whose record is there with
    exactly the same command is read back instead of run again (to redraw a page; the
    binary is not compared, so not after a change to the library)."""
    import concurrent.futures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def one(label, seed):
        stem = out / f"{label}.seed{seed}"
        log, ranks = Path(f"{stem}.metrics.jsonl"), Path(f"{stem}.ranks.jsonl")
        cmd = [binary, *common, *specs[label], "--seed", str(seed), "--threads", str(threads), "--log", str(log),
               "--rank-log", str(ranks), "--quiet"]
        saved = Path(f"{stem}.run.json")
        if reuse and saved.exists():
            previous = json.loads(saved.read_text())
            if previous["cmd"] == cmd:
                return previous
        run = run_trainer(cmd, f"{label} seed {seed}", log, ranks, env=trainer_env(threads))
        Path(f"{stem}.run.json").write_text(json.dumps(run))
        return run

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {(l, s): pool.submit(one, l, s) for l in specs for s in seeds}
        return {l: {s: futures[(l, s)].result() for s in seeds} for l in specs}


def machine_line():
    """CPU model, whether it has AVX-512, vCPUs and the load now: for every generated block."""
    flags = "avx512f" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2 only, no avx512f"
    return f"{cpu_name()} ({flags}), {os.cpu_count()} vCPUs, load average {os.getloadavg()[0]:.2f} at the end"
