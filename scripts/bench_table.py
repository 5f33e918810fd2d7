#!/usr/bin/env python3
"""Side-by-side tables of lowrank-bench and bench/pytorch_bench.py results.

    python3 scripts/bench_table.py --lowrank build/bench/lowrank.r*.json \\
        --pytorch build/bench/pytorch.r*.json \\
        [--openblas build/bench/lowrank_openblas.r*.json] \\
        [--pytorch-malloc-defaults build/bench/pytorch_malloc.r*.json] \\
        [--pytorch-as-is build/bench/pytorch_asis.r*.json] \\
        [--write-docs docs/performance.md] [--probe build/bench/alloc_probe.txt]

Every option takes one or more JSON files: Google Benchmark's --benchmark_out JSON
(lowrank-bench, lowrank-bench-openblas) or what pytorch_bench.py --out writes (the same
schema). Each file contributes one sample per benchmark (its median aggregate if it has
one, else each of its repetitions); the tables show the median over all samples and their
coefficient of variation. scripts/bench.sh runs the programs in interleaved rounds, one
file per program and round, so that a change in background load hits every column alike.

With --write-docs, what lies between these markers in that file is replaced:

    <!-- bench-table:begin --> ... <!-- bench-table:end -->
    <!-- alloc-probe:begin --> ... <!-- alloc-probe:end -->     (only with --probe)

so the numbers in the docs always come from a real run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

RATES = ("GFLOPs", "tokens_per_second", "samples_per_second")
PHASES = (("forward_ms", "forward (input, forward, loss)"), ("backward_ms", "zero_grad + backward"),
          ("optimizer_ms", "optimizer step (AdamW)"))
THROUGHPUT = (("tokens_per_second", "tokens/s"), ("samples_per_second", "samples/s"))
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


class Result:
    """The samples of one benchmark from one program: wall and CPU ms per iteration, and
    the work per iteration behind each rate counter (rate x time is constant)."""

    def __init__(self) -> None:
        self.real: list[float] = []
        self.cpu: list[float] = []
        self.work: dict[str, float] = {}
        self.phases: dict[str, list[float]] = {}
        self.variant: str | None = None

    def add(self, run: dict) -> None:
        unit = TO_MS[run.get("time_unit", "ns")]
        real = run["real_time"] * unit
        self.real.append(real)
        if "cpu_time" in run:
            self.cpu.append(run["cpu_time"] * unit)
        for key in RATES:
            if key in run:
                self.work[key] = run[key] * real  # per ms; only ratios are used
        for key, _ in PHASES:
            if key in run:
                self.phases.setdefault(key, []).append(run[key])
        self.variant = run.get("variant", self.variant)

    @property
    def ms(self) -> float:
        return statistics.median(self.real)

    @property
    def cpu_ms(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    @property
    def cv(self) -> float | None:
        if len(self.real) < 2:
            return None
        return statistics.stdev(self.real) / statistics.mean(self.real)

    def rate(self, key: str) -> float | None:
        return self.work[key] / self.ms if key in self.work else None


def base_name(run: dict) -> str:
    return re.sub(r"/real_time$", "", run.get("run_name", run["name"]))


def load(paths: list[str]) -> tuple[list[dict], dict[str, Result]]:
    contexts: list[dict] = []
    results: dict[str, Result] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        contexts.append(data.get("context", {}))
        runs = data.get("benchmarks", [])
        has_median = {base_name(r) for r in runs if r.get("aggregate_name") == "median"}
        for run in runs:
            if run.get("error_occurred"):
                print(f"bench_table: {path}: {run['name']} failed: {run.get('error_message')}", file=sys.stderr)
                continue
            name, agg = base_name(run), run.get("aggregate_name")
            if agg == "median" or (agg is None and run.get("run_type", "iteration") == "iteration"
                                   and name not in has_median):
                results.setdefault(name, Result()).add(run)
    return contexts, results


def fmt_ms(r: Result | None) -> str:
    if r is None:
        return "—"
    t = r.ms
    text = f"{t:.2f}" if t < 100 else f"{t:.1f}"
    if r.cv is not None:
        text += f" (±{100 * r.cv:.0f}%)"
    return text


def fmt_num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 1e4 else f"{x:,.1f}"


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}×" if num is not None and den is not None else "—"


def throughput(r: Result | None) -> str:
    if r is None:
        return "—"
    for key, unit in THROUGHPUT:
        if key in r.work:
            return f"{fmt_num(r.rate(key))} {unit}"
    return "—"


def main_table(lr: dict[str, Result], pt: dict[str, Result]) -> str:
    lines = [
        "| benchmark | lowrank ms | PyTorch ms | lowrank GFLOP/s | PyTorch GFLOP/s "
        "| lowrank throughput | PyTorch throughput | lowrank speed-up | by CPU time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in list(lr) + [n for n in pt if n not in lr]:
        a, b = lr.get(name), pt.get(name)
        lines.append(
            f"| `{name}` | {fmt_ms(a)} | {fmt_ms(b)} "
            f"| {fmt_num(a.rate('GFLOPs') if a else None)} | {fmt_num(b.rate('GFLOPs') if b else None)} "
            f"| {throughput(a)} | {throughput(b)} "
            f"| {ratio(b.ms if b else None, a.ms if a else None)} "
            f"| {ratio(b.cpu_ms if b else None, a.cpu_ms if a else None)} |")
    return "\n".join(lines)


def blas_table(lb: dict[str, Result], lr: dict[str, Result], pt: dict[str, Result]) -> str:
    lines = [
        "| benchmark | lowrank (Eigen GEMM) ms | lowrank (OpenBLAS GEMM) ms | PyTorch ms "
        "| lowrank (OpenBLAS) GFLOP/s | PyTorch GFLOP/s | OpenBLAS vs Eigen GEMM | lowrank (OpenBLAS) speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in lb.items():
        a, c = lr.get(name), pt.get(name)
        lines.append(
            f"| `{name}` | {fmt_ms(a)} | {fmt_ms(b)} | {fmt_ms(c)} | {fmt_num(b.rate('GFLOPs'))} "
            f"| {fmt_num(c.rate('GFLOPs') if c else None)} | {ratio(a.ms if a else None, b.ms)} "
            f"| {ratio(c.ms if c else None, b.ms)} |")
    return "\n".join(lines)


def env_table(pt: dict[str, Result], pm: dict[str, Result], pa: dict[str, Result]) -> str:
    lines = [
        "| benchmark | PyTorch at its best ms | glibc malloc defaults ms | slow-down | as found ms | slow-down |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in list(pt) + [n for n in list(pm) + list(pa) if n not in pt]:
        a, m, b = pt.get(name), pm.get(name), pa.get(name)
        base = a.ms if a else None
        lines.append(f"| `{name}` | {fmt_ms(a)} | {fmt_ms(m)} | {ratio(m.ms if m else None, base)} "
                     f"| {fmt_ms(b)} | {ratio(b.ms if b else None, base)} |")
    return "\n".join(lines)


def phase_table(columns: list[tuple[str, dict[str, Result]]]) -> str:
    """Per-phase times of every benchmark that reports them, one column per program."""
    names = [n for _, res in columns for n, r in res.items() if r.phases]
    lines = []
    for name in dict.fromkeys(names):
        lines += [f"`{name}` by phase (ms per step, wall clock, median over rounds of the mean per step):", "",
                  "| phase | " + " | ".join(label for label, _ in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for key, label in PHASES:
            cells = []
            for _, res in columns:
                r = res.get(name)
                cells.append(f"{statistics.median(r.phases[key]):.2f}" if r and key in r.phases else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(lr_ctx: list[dict], pt_ctx: list[dict], lr: dict[str, Result], pt: dict[str, Result]) -> str:
    first_lr = lr_ctx[0] if lr_ctx else {}
    first_pt = pt_ctx[0] if pt_ctx else {}
    loads = [c["load_avg"][0] for c in lr_ctx if isinstance(c.get("load_avg"), list) and c["load_avg"]]
    load_text = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "?"
    variants = sorted({r.variant for r in pt.values() if r.variant})
    lines = [
        f"Run {first_lr.get('date', '?')} on {first_pt.get('cpu_model', 'this machine')}, "
        f"{first_lr.get('num_cpus', first_pt.get('num_cpus', '?'))} vCPUs at {first_lr.get('mhz_per_cpu', '?')} MHz; "
        f"{len(lr_ctx)} interleaved round(s); 1-minute load average at the start of lowrank's rounds "
        f"{load_text}.",
        f"lowrank: {first_lr.get('lowrank_threads', '?')} thread(s), Eigen {first_lr.get('eigen_version', '?')} "
        f"({first_lr.get('eigen_simd', '?')}), `tune_allocator()` {first_lr.get('lowrank_tune_allocator', '?')}, "
        f"MLP optimizer {first_lr.get('mlp_optimizer', '?')}.",
    ]
    if pt_ctx:
        optimizer = (f"; MLP step with {' / '.join(variants)} (the faster of foreach=False/True in each round)"
                     if variants else "")
        lines.append(
            f"PyTorch {first_pt.get('torch_version', '?')} at its best: {first_pt.get('torch_num_threads', '?')} "
            f"thread(s), OPENBLAS_CORETYPE={first_pt.get('OPENBLAS_CORETYPE', '?')}, "
            f"MALLOC_MMAP_THRESHOLD_={first_pt.get('MALLOC_MMAP_THRESHOLD_', '?')}, "
            f"MALLOC_TRIM_THRESHOLD_={first_pt.get('MALLOC_TRIM_THRESHOLD_', '?')}{optimizer}.")
    samples = max((len(r.real) for r in list(pt.values()) + list(lr.values())), default=0)
    lines.append(
        f"ms = median over {samples or '?'} samples (one per round, each the mean time per iteration over "
        "at least 0.5 s), ± the coefficient of variation; speed-up = PyTorch time / lowrank time "
        "(> 1: lowrank is faster); *by CPU time* compares process CPU time instead, which is the work done "
        "with one thread and is less disturbed by other processes on the two cores.")
    return "\n".join(lines)


def replace_block(text: str, tag: str, body: str) -> str:
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"bench_table: markers {begin} ... {end} not found")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lowrank", nargs="+", required=True, metavar="JSON", help="lowrank-bench results")
    p.add_argument("--pytorch", nargs="+", default=[], metavar="JSON", help="pytorch_bench.py results")
    p.add_argument("--openblas", nargs="+", default=[], metavar="JSON",
                   help="lowrank-bench-openblas results (EIGEN_USE_BLAS): adds a second table")
    p.add_argument("--pytorch-malloc-defaults", nargs="+", default=[], metavar="JSON",
                   help="pytorch_bench.py --environment malloc-defaults results: for the third table")
    p.add_argument("--pytorch-as-is", nargs="+", default=[], metavar="JSON",
                   help="pytorch_bench.py --as-is results (the environment as found): for the third table")
    p.add_argument("--write-docs", metavar="FILE", help="replace the marked blocks in FILE")
    p.add_argument("--probe", metavar="FILE", help="lowrank-alloc-probe output for the alloc-probe block")
    args = p.parse_args()

    lr_ctx, lr = load(args.lowrank)
    pt_ctx, pt = load(args.pytorch)
    body = describe(lr_ctx, pt_ctx, lr, pt) + "\n\n" + main_table(lr, pt)
    if args.openblas:
        lb_ctx, lb = load(args.openblas)
        if lb:
            body += ("\n\nThe same lowrank code built with `EIGEN_USE_BLAS` and linked to OpenBLAS "
                     "(`lowrank-bench-openblas`, OPENBLAS_CORETYPE unset, OPENBLAS_NUM_THREADS="
                     f"{lr_ctx[0].get('lowrank_threads', '?') if lr_ctx else '?'}), same rounds:\n\n"
                     + blas_table(lb, lr, pt))
    if args.pytorch_as_is or args.pytorch_malloc_defaults:
        _, pm = load(args.pytorch_malloc_defaults)
        pa_ctx, pa = load(args.pytorch_as_is)
        coretype = pa_ctx[0].get("OPENBLAS_CORETYPE", "?") if pa_ctx else "?"
        body += ("\n\nWhat PyTorch's best-case settings are worth, same rounds: *glibc malloc defaults* "
                 "keeps the AVX-512 kernel but drops the malloc tuning (`--environment malloc-defaults`); "
                 f"*as found* is the environment unchanged (`--as-is`: OPENBLAS_CORETYPE={coretype}, "
                 "glibc malloc defaults).\n\n" + env_table(pt, pm, pa))
    columns = [("lowrank (Eigen GEMM)", lr)]
    if args.openblas:
        columns.append(("lowrank (OpenBLAS GEMM)", load(args.openblas)[1]))
    if pt:
        columns.append(("PyTorch at its best", pt))
    phases = phase_table(columns)
    if phases:
        body += "\n\n" + phases
    print(body)

    if args.write_docs:
        path = Path(args.write_docs)
        text = replace_block(path.read_text(), "bench-table", body)
        if args.probe:
            probe = Path(args.probe).read_text().rstrip("\n")
            text = replace_block(text, "alloc-probe", "```text\n" + probe + "\n```")
        path.write_text(text)
        print(f"\nbench_table: wrote the tables into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
