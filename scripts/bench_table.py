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

The low-rank layers' benchmarks (bench/bench_low_rank.cpp: BM_LowRankLinear_*,
BM_SpectralLinear_*, BM_IncrementalRankLinear_*, BM_DeepLowRankLinear_*) get tables of
their own: one per layer with the speed-up over dense at the same shape and how much of the
ideal FLOP ratio it reaches, LowRankLinear's one-pass backward against the plain GEMM
composition, and the targets of the low-rank benchmarks, met or not.

With --write-docs, what lies between these markers in that file is replaced:

    <!-- bench-table:begin --> ... <!-- bench-table:end -->        (if the run has dense rows)
    <!-- alloc-probe:begin --> ... <!-- alloc-probe:end -->        (with them, and --probe)
    <!-- bench-low-rank:begin --> ... <!-- bench-low-rank:end -->  (if it has low-rank rows)
    <!-- bench-machine:<cpu>-<isa>:begin --> ... <!-- bench-machine:<cpu>-<isa>:end -->
                                                  (if it has the machine probes, bench/bench_machine.cpp;
                                                  a new machine or ISA gets its block inserted before
                                                  <!-- bench-machines:end -->)

With --machine-only, only the machine block is written (scripts/bench.sh --march for a build
other than -march=native: its tables stay in the run's output, the docs' tables stay those
of the native build). Every GFLOP/s figure is also shown as a fraction of the FP32 FMA peak
measured in the same run (BM_Peak_FMA_<isa>/threads:<1|all>), the ISA being the widest the
build's Eigen uses, at lowrank's thread count; PyTorch's against the widest the CPU has.

so the numbers in the docs always come from a real run, and a run filtered to one group
(scripts/bench.sh --filter) leaves the other's block as it was.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from results_common import cpu_info, machine_key, put_keyed_block

RATES = ("GFLOPs", "GBps", "tokens_per_second", "samples_per_second")
PHASES = (("forward_ms", "forward (input, forward, loss)"), ("backward_ms", "zero_grad + backward"),
          ("optimizer_ms", "optimizer step (AdamW)"))
THROUGHPUT = (("tokens_per_second", "tokens/s"), ("samples_per_second", "samples/s"))
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
# Plain counters of the low-rank benchmarks: the median over samples is shown.
RATIOS = ("speedup_vs_dense", "speedup_vs_dense_cpu", "flop_ratio")
LOW_RANK = re.compile(r"^BM_(?P<layer>LowRankLinear|SpectralLinear|IncrementalRankLinear|DeepLowRankLinear)_"
                      r"(?:(?P<path>gemm|onepass)_)?(?P<mode>fwd|fwdbwd)/d:(?P<d>\d+)/N:(?P<n>\d+)/r:(?P<r>\d+)$")
LAYERS = (("LowRankLinear", "`LowRankLinear` (U Vᵀ, the fused node)"),
          ("IncrementalRankLinear", "`IncrementalRankLinear` (r active columns of capacity ⌊d/2⌋)"),
          ("SpectralLinear", "`SpectralLinear` (r active pairs of the full spectrum)"),
          ("DeepLowRankLinear", "`DeepLowRankLinear` (depth 3, compressed at rank r: inner width 2r)"))
TARGET_RANKS = (64, 128, 256)  # forward+backward reaches 75% of the ideal ratio d / (2r)
TARGET_FRACTION = 0.75
# The machine probes (bench/bench_machine.cpp) and the GEMM-bound rows held to PEAK_TARGET.
MACHINE = re.compile(r"^BM_(?:Peak_FMA_(?P<isa>avx2|avx512)|Bandwidth_triad)/threads:(?P<threads>1|all)$")
# Figures of a whole step or node shown beside PyTorch's in a machine block.
STEP_LEVEL = re.compile(r"^BM_(?:LinearCrossEntropy_fwdbwd|Mlp_train_step)/")
GEMM_BOUND = re.compile(r"^BM_(?:Gemm|Linear_fwd|Linear_fwdbwd)/"
                        r"|^BM_ThinProduct_\w+_kernel/d:\d+/N:4096/r:(?:64|128|256)$")
PEAK_TARGET = 0.85


class Result:
    """The samples of one benchmark from one program: wall and CPU ms per iteration, and
    the work per iteration behind each rate counter (rate x time is constant)."""

    def __init__(self) -> None:
        self.real: list[float] = []
        self.cpu: list[float] = []
        self.work: dict[str, float] = {}
        self.phases: dict[str, list[float]] = {}
        self.ratios: dict[str, list[float]] = {}
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
        for key in RATIOS:
            if key in run:
                self.ratios.setdefault(key, []).append(run[key])
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

    def ratio(self, key: str) -> float | None:
        return statistics.median(self.ratios[key]) if key in self.ratios else None


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


class Peaks:
    """The FMA peaks of the run (GFLOP/s, median over rounds) and which one each side is held to."""

    def __init__(self, machine: dict[str, Result], lr_ctx: list[dict], pt_ctx: list[dict] | None = None) -> None:
        first = lr_ctx[0] if lr_ctx else {}
        self.threads = "1" if str(first.get("lowrank_threads", "1")) == "1" else "all"
        self.rates = {name: r.rate("GFLOPs") for name, r in machine.items() if r.rate("GFLOPs") is not None}
        simd = str(first.get("simd_isa", first.get("eigen_simd", "")))
        self.isa = "avx512" if "avx512" in simd.lower() else "avx2"
        self.lowrank = self.rates.get(f"BM_Peak_FMA_{self.isa}/threads:{self.threads}")
        # PyTorch is held to its widest kernels, or to AVX2 beside a build for x86-64-v3.
        self.pt_avx2 = bool(pt_ctx) and pt_ctx[0].get("isa") == "avx2"
        pt_isas = ("avx2",) if self.pt_avx2 else ("avx2", "avx512")
        widest = [self.rates.get(f"BM_Peak_FMA_{isa}/threads:{self.threads}") for isa in pt_isas]
        self.widest = max((x for x in widest if x is not None), default=None)

    @staticmethod
    def of(rate: float | None, peak: float | None) -> str:
        return f"{rate / peak:.0%}" if rate is not None and peak else "—"


def main_table(lr: dict[str, Result], pt: dict[str, Result], peaks: Peaks) -> str:
    lines = [
        "| benchmark | lowrank ms | PyTorch ms | lowrank GFLOP/s | of peak | PyTorch GFLOP/s | of peak "
        "| lowrank throughput | PyTorch throughput | lowrank speed-up | by CPU time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in list(lr) + [n for n in pt if n not in lr]:
        a, b = lr.get(name), pt.get(name)
        ga, gb = (a.rate("GFLOPs") if a else None), (b.rate("GFLOPs") if b else None)
        lines.append(
            f"| `{name}` | {fmt_ms(a)} | {fmt_ms(b)} "
            f"| {fmt_num(ga)} | {Peaks.of(ga, peaks.lowrank)} | {fmt_num(gb)} | {Peaks.of(gb, peaks.widest)} "
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


# --- the low-rank layers (bench/bench_low_rank.cpp) ------------------------------------------

def split_low_rank(results: dict[str, Result]) -> tuple[dict[str, Result], dict[str, Result]]:
    """(the dense rows, the low-rank rows)."""
    dense = {k: v for k, v in results.items() if not LOW_RANK.match(k)}
    low = {k: v for k, v in results.items() if LOW_RANK.match(k)}
    return dense, low


def lr_name(layer: str, mode: str, d: int, n: int, r: int, path: str | None = None) -> str:
    return f"BM_{layer}_{path + '_' if path else ''}{mode}/d:{d}/N:{n}/r:{r}"


def shapes(results: dict[str, Result], layer: str) -> list[tuple[int, int, int]]:
    found = set()
    for name in results:
        m = LOW_RANK.match(name)
        if m and m["layer"] == layer and not m["path"]:
            found.add((int(m["d"]), int(m["n"]), int(m["r"])))
    return sorted(found)


def fmt_x(x: float | None) -> str:
    return f"{x:.2f}×" if x is not None else "—"


def target_met(layer: str, r: int, speedup: float | None, ideal: float | None) -> str:
    if layer not in ("LowRankLinear", "IncrementalRankLinear") or r not in TARGET_RANKS:
        return ""
    if speedup is None or ideal is None:
        return "—"
    return "met" if speedup >= TARGET_FRACTION * ideal else "**not met**"


def low_rank_layer_table(layer: str, lr: dict[str, Result], pt: dict[str, Result],
                         lb: dict[str, Result], peaks: Peaks) -> str:
    with_pt = any(lr_name(layer, "fwdbwd", d, n, r) in pt for d, n, r in shapes(lr, layer))
    with_lb = any(lr_name(layer, "fwdbwd", d, n, r) in lb for d, n, r in shapes(lr, layer))
    with_target = layer in ("LowRankLinear", "IncrementalRankLinear")
    head = ["d", "N", "r", "fwd ms", "fwd × dense", "fwd+bwd ms", "fwd+bwd GFLOP/s", "of peak", "fwd+bwd × dense",
            "by CPU time", "ideal (FLOP ratio)", "of ideal"]
    if with_target:
        head.append(f"≥ {TARGET_FRACTION:.0%} of ideal (r ≥ {TARGET_RANKS[0]})")
    if with_pt:
        head += ["PyTorch fwd+bwd ms", "PyTorch × its dense", "lowrank vs PyTorch"]
    if with_lb:
        head += ["OpenBLAS build × its dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for d, n, r in shapes(lr, layer):
        f, b = lr.get(lr_name(layer, "fwd", d, n, r)), lr.get(lr_name(layer, "fwdbwd", d, n, r))
        speed = b.ratio("speedup_vs_dense") if b else None
        ideal = b.ratio("flop_ratio") if b else None
        cells = [str(d), str(n), str(r), fmt_ms(f), fmt_x(f.ratio("speedup_vs_dense") if f else None), fmt_ms(b),
                 fmt_num(b.rate("GFLOPs") if b else None),
                 Peaks.of(b.rate("GFLOPs") if b else None, peaks.lowrank), fmt_x(speed),
                 fmt_x(b.ratio("speedup_vs_dense_cpu") if b else None), fmt_x(ideal),
                 f"{speed / ideal:.0%}" if speed is not None and ideal else "—"]
        if with_target:
            cells.append(target_met(layer, r, speed, ideal))
        if with_pt:
            p = pt.get(lr_name(layer, "fwdbwd", d, n, r))
            cells += [fmt_ms(p), fmt_x(p.ratio("speedup_vs_dense") if p else None),
                      ratio(p.ms if p else None, b.ms if b else None)]
        if with_lb:
            o = lb.get(lr_name(layer, "fwdbwd", d, n, r))
            cells.append(fmt_x(o.ratio("speedup_vs_dense") if o else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_pass_table(lr: dict[str, Result]) -> str:
    """LowRankLinear's backward paths at the same shape: the default against the forced other."""
    rows = []
    for name in lr:
        m = LOW_RANK.match(name)
        if m and m["layer"] == "LowRankLinear" and m["path"]:
            rows.append((int(m["d"]), int(m["n"]), int(m["r"]), m["path"]))
    if not rows:
        return ""
    lines = ["| d | N | r | default path | one-pass ms | GEMM composition ms | one-pass speed-up | by CPU time "
             "| one-pass beats GEMMs |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for d, n, r, path in sorted(rows):
        default = lr.get(lr_name("LowRankLinear", "fwdbwd", d, n, r))
        forced = lr.get(lr_name("LowRankLinear", "fwdbwd", d, n, r, path))
        # The benchmark forces the path the default does not take.
        one, gemm = (default, forced) if path == "gemm" else (forced, default)
        wall = gemm.ms / one.ms if one and gemm else None
        cpu = gemm.cpu_ms / one.cpu_ms if one and gemm and one.cpu_ms and gemm.cpu_ms else None
        verdict = "—" if wall is None else ("yes" if wall > 1 else "no")
        lines.append(f"| {d} | {n} | {r} | {'one-pass' if path == 'gemm' else 'GEMMs'} | {fmt_ms(one)} "
                     f"| {fmt_ms(gemm)} | {fmt_x(wall)} | {fmt_x(cpu)} | {verdict} |")
    return "\n".join(lines)


def targets_summary(lr: dict[str, Result]) -> str:
    """The two targets of the low-rank benchmarks, counted over the shapes of the run."""
    lines = []
    for layer in ("LowRankLinear", "IncrementalRankLinear"):
        met, missed = 0, []
        for d, n, r in shapes(lr, layer):
            b = lr.get(lr_name(layer, "fwdbwd", d, n, r))
            if r not in TARGET_RANKS or b is None:
                continue
            speed, ideal = b.ratio("speedup_vs_dense"), b.ratio("flop_ratio")
            if speed is None or ideal is None:
                continue
            if speed >= TARGET_FRACTION * ideal:
                met += 1
            else:
                missed.append(f"d {d}, N {n}, r {r}: {speed:.2f}× of {TARGET_FRACTION * ideal:.2f}× "
                              f"({speed / ideal:.0%} of ideal)")
        if met or missed:
            lines.append(f"- `{layer}` forward+backward at r ∈ {{{', '.join(map(str, TARGET_RANKS))}}} reaches "
                         f"{TARGET_FRACTION:.0%} of the ideal d/(2r) over dense at {met} of {met + len(missed)} "
                         "shapes" + (f"; not at {'; '.join(missed)}." if missed else "."))
    wins, losses = 0, []
    for name in lr:
        m = LOW_RANK.match(name)
        if not (m and m["layer"] == "LowRankLinear" and m["path"] == "gemm"):
            continue
        d, n, r = int(m["d"]), int(m["n"]), int(m["r"])
        one, gemm = lr.get(lr_name("LowRankLinear", "fwdbwd", d, n, r)), lr[name]
        if one is None:
            continue
        if one.ms < gemm.ms:
            wins += 1
        else:
            losses.append(f"d {d}, N {n}, r {r}: {one.ms:.2f} against {gemm.ms:.2f} ms")
    if wins or losses:
        lines.append(f"- At r ≤ 32 the one-pass backward (x and dy read once) beats the composition of GEMMs at "
                     f"{wins} of {wins + len(losses)} shapes" + (f"; not at {'; '.join(losses)}." if losses else "."))
    return "\n".join(lines)


def describe_low_rank(lr_ctx: list[dict], pt_ctx: list[dict], lr: dict[str, Result]) -> str:
    first = lr_ctx[0] if lr_ctx else {}
    loads = [c["load_avg"][0] for c in lr_ctx if isinstance(c.get("load_avg"), list) and c["load_avg"]]
    load_text = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "?"
    cpu = pt_ctx[0].get("cpu_model") if pt_ctx else None
    samples = max((len(r.real) for r in lr.values()), default=0)
    lines = [
        f"Run {first.get('date', '?')} on {cpu or 'this machine'}, {first.get('num_cpus', '?')} vCPUs at "
        f"{first.get('mhz_per_cpu', '?')} MHz; {len(lr_ctx)} interleaved round(s); 1-minute load average at the "
        f"start of lowrank's rounds {load_text}; lowrank {first.get('lowrank_threads', '?')} thread(s), Eigen "
        f"{first.get('eigen_version', '?')}"
        + (f"; PyTorch {pt_ctx[0].get('torch_version', '?')}, {pt_ctx[0].get('torch_num_threads', '?')} thread(s), "
           "at its best as above." if pt_ctx else "."),
        f"ms = median over {samples or '?'} samples (one per round, each the mean time per iteration over at "
        "least 0.5 s), ± the coefficient of variation. *× dense* = the dense layer's "
        "time at the same d, N and mode, timed in the same process, over the layer's (`speedup_vs_dense`, "
        "median over rounds); *by CPU time* the same by process CPU time (`speedup_vs_dense_cpu`); "
        "*ideal* = dense GEMM FLOPs over the layer's (`flop_ratio`: d/(2r) for U Vᵀ); *of ideal* = "
        "× dense / ideal. GFLOP/s counts GEMM FLOPs only.",
    ]
    return "\n".join(lines)


def low_rank_body(lr_ctx: list[dict], pt_ctx: list[dict], lr: dict[str, Result], pt: dict[str, Result],
                  lb: dict[str, Result], peaks: Peaks) -> str:
    parts = [describe_low_rank(lr_ctx, pt_ctx, lr) + "\n" + peak_line(peaks)]
    for layer, title in LAYERS:
        if shapes(lr, layer):
            parts.append(f"{title}:\n\n" + low_rank_layer_table(layer, lr, pt, lb, peaks))
    summary = targets_summary(lr)
    if summary:
        parts.insert(1, "Targets, from this run (wall-clock medians):\n\n" + summary)
    table = one_pass_table(lr)
    if table:
        parts.append("`LowRankLinear` forward+backward by backward path, the default against the other forced "
                     "(`BM_LowRankLinear_gemm_fwdbwd`: threshold 0, the four whole-matrix GEMMs; "
                     "`BM_LowRankLinear_onepass_fwdbwd`: the token-tiled one-pass kernel at any rank):\n\n" + table)
    return "\n\n".join(parts)


# --- the machine (bench/bench_machine.cpp) ------------------------------------------------------

def peak_line(peaks: Peaks) -> str:
    if peaks.lowrank is None:
        return "*of peak*: no FMA-peak probe in this run."
    return (f"*of peak* = GFLOP/s over the FP32 FMA peak measured in the same run at the same thread count: "
            f"lowrank's against the {'AVX-512' if peaks.isa == 'avx512' else 'AVX2'} peak its build uses "
            f"({peaks.lowrank:.1f} GFLOP/s), PyTorch's against the widest the CPU has "
            f"({peaks.widest:.1f}); both by wall clock, so a loaded machine lowers both alike.")


def machine_body(machine: dict[str, Result], lr_ctx: list[dict], lr: dict[str, Result], pt: dict[str, Result],
                 lr_low: dict[str, Result], pt_low: dict[str, Result], peaks: Peaks, command: str) -> str:
    first = lr_ctx[0] if lr_ctx else {}
    info = cpu_info()
    loads = [c["load_avg"][0] for c in lr_ctx if isinstance(c.get("load_avg"), list) and c["load_avg"]]
    load_text = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "?"
    cores = int(first.get("num_cpus", 0) or 0)
    lines = [
        f"**{info.get('model name', '?')}** (family {info.get('cpu family', '?')}, model {info.get('model', '?')}), "
        f"{cores or '?'} vCPUs at {first.get('mhz_per_cpu', '?')} MHz; build for {first.get('simd_isa', '?')} "
        f"(Eigen: {first.get('eigen_simd', '?')}); run {first.get('date', '?')}, {len(lr_ctx)} interleaved round(s), "
        f"1-minute load average {load_text} (2 vCPUs shared: above ~1 the figures are low and noisy); "
        f"command `{command}`."
        + (" PyTorch is held to its AVX2 kernels in this run (`bench/pytorch_bench.py --isa avx2`: "
           "OPENBLAS_CORETYPE=Haswell, ATEN_CPU_CAPABILITY=avx2)." if peaks.pt_avx2 else ""),
        "",
        f"CPU SIMD flags: `{info.get('simd', '?')}`.",
        "",
        "| probe (bench/bench_machine.cpp) | 1 thread | all threads |",
        "|---|---:|---:|",
    ]
    for key, label, unit, counter in (("BM_Peak_FMA_avx2", "FP32 FMA peak, AVX2 (12 × `_mm256_fmadd_ps`)", "GFLOP/s",
                                       "GFLOPs"),
                                      ("BM_Peak_FMA_avx512", "FP32 FMA peak, AVX-512 (24 × `_mm512_fmadd_ps`)",
                                       "GFLOP/s", "GFLOPs"),
                                      ("BM_Bandwidth_triad", "memory bandwidth, triad over 3 × 64 MiB", "GB/s",
                                       "GBps")):
        one, every = machine.get(f"{key}/threads:1"), machine.get(f"{key}/threads:all")
        if one is None and every is None:
            continue
        cells = [f"{r.work[counter] / r.ms:.1f} {unit}" if r and counter in r.work else "—" for r in (one, every)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    bound = [(n, r) for n, r in lr.items() if GEMM_BOUND.search(n) and r.rate("GFLOPs") is not None]
    if bound and peaks.lowrank:
        lines += ["", f"GEMM-bound figures of the same run against the peak lowrank's build uses "
                      f"({peaks.lowrank:.1f} GFLOP/s, {'AVX-512' if peaks.isa == 'avx512' else 'AVX2'}, "
                      f"{peaks.threads} thread(s)); target ≥ {PEAK_TARGET:.0%}:", "",
                  "| benchmark | lowrank GFLOP/s | of peak | PyTorch GFLOP/s | of peak (its "
                  f"{'AVX2' if peaks.pt_avx2 else 'widest'}) |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in bound:
            g = r.rate("GFLOPs")
            p = pt.get(name)
            gp = p.rate("GFLOPs") if p else None
            mark = "" if g / peaks.lowrank >= PEAK_TARGET else " (**below target**)"
            lines.append(f"| `{name}` | {fmt_num(g)} | {Peaks.of(g, peaks.lowrank)}{mark} | {fmt_num(gp)} "
                         f"| {Peaks.of(gp, peaks.widest)} |")
    steps = [(n, r) for n, r in lr.items() if STEP_LEVEL.search(n)]
    if steps:
        lines += ["", "Whole steps against PyTorch in the same run (GFLOP/s count the GEMMs only):", "",
                  "| benchmark | lowrank ms | PyTorch ms | lowrank speed-up | lowrank GFLOP/s | of peak |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in steps:
            p = pt.get(name)
            g = r.rate("GFLOPs")
            lines.append(f"| `{name}` | {fmt_ms(r)} | {fmt_ms(p)} | {ratio(p.ms if p else None, r.ms)} "
                         f"| {fmt_num(g)} | {Peaks.of(g, peaks.lowrank)} |")
    summary = targets_summary(lr_low)
    if summary:
        lines += ["", "Low-rank targets in this build (wall-clock medians):", "", summary]
    for layer, title in LAYERS[:2]:
        if shapes(lr_low, layer):
            lines += ["", f"{title}, this build (columns as in the low-rank tables below):", "",
                      low_rank_layer_table(layer, lr_low, pt_low, {}, peaks)]
    return "\n".join(lines)


def write_machine_block(text: str, slug: str, body: str) -> str:
    return put_keyed_block(text, f"bench-machine:{slug}", body, "<!-- bench-machines:end -->")


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
    p.add_argument("--machine-only", action="store_true",
                   help="with --write-docs, write only the machine block (a build other than -march=native)")
    p.add_argument("--command", default="bash scripts/bench.sh", help="the command the machine block names")
    args = p.parse_args()

    lr_ctx, lr_all = load(args.lowrank)
    machine = {k: v for k, v in lr_all.items() if MACHINE.match(k)}
    lr_all = {k: v for k, v in lr_all.items() if not MACHINE.match(k)}
    pt_ctx, pt_all = load(args.pytorch)
    peaks = Peaks(machine, lr_ctx, pt_ctx)
    lr, lr_low = split_low_rank(lr_all)
    pt, pt_low = split_low_rank(pt_all)
    lb_all = load(args.openblas)[1] if args.openblas else {}
    lb, lb_low = split_low_rank(lb_all)
    body = describe(lr_ctx, pt_ctx, lr, pt) + "\n" + peak_line(peaks) + "\n\n" + main_table(lr, pt, peaks)
    if lb:
        body += ("\n\nThe same lowrank code built with `EIGEN_USE_BLAS` and linked to OpenBLAS "
                 "(`lowrank-bench-openblas`, OPENBLAS_CORETYPE unset, OPENBLAS_NUM_THREADS="
                 f"{lr_ctx[0].get('lowrank_threads', '?') if lr_ctx else '?'}), same rounds:\n\n"
                 + blas_table(lb, lr, pt))
    if args.pytorch_as_is or args.pytorch_malloc_defaults:
        pm = split_low_rank(load(args.pytorch_malloc_defaults)[1])[0]
        pa_ctx, pa_all = load(args.pytorch_as_is)
        pa = split_low_rank(pa_all)[0]
        coretype = pa_ctx[0].get("OPENBLAS_CORETYPE", "?") if pa_ctx else "?"
        body += ("\n\nWhat PyTorch's best-case settings are worth, same rounds: *glibc malloc defaults* "
                 "keeps the AVX-512 kernel but drops the malloc tuning (`--environment malloc-defaults`); "
                 f"*as found* is the environment unchanged (`--as-is`: OPENBLAS_CORETYPE={coretype}, "
                 "glibc malloc defaults).\n\n" + env_table(pt, pm, pa))
    columns = [("lowrank (Eigen GEMM)", lr)]
    if lb:
        columns.append(("lowrank (OpenBLAS GEMM)", lb))
    if pt:
        columns.append(("PyTorch at its best", pt))
    phases = phase_table(columns)
    if phases:
        body += "\n\n" + phases
    low_body = low_rank_body(lr_ctx, pt_ctx, lr_low, pt_low, lb_low, peaks) if lr_low else ""
    machine_text = machine_body(machine, lr_ctx, lr, pt, lr_low, pt_low, peaks, args.command) if machine else ""
    if machine_text:
        print(machine_text + "\n")
    if lr:
        print(body)
    if low_body:
        print(("\n" if lr else "") + low_body)

    if args.write_docs:
        path = Path(args.write_docs)
        text = path.read_text()
        if machine_text:
            text = write_machine_block(text, machine_key(cpu_info(), peaks.isa), machine_text)
        if args.machine_only:
            lr, low_body = {}, ""
        # Each block names what wrote it (tests/docs/check_generated_blocks.py checks that).
        written = "\n\nWritten by `scripts/bench_table.py`, run by `bash scripts/bench.sh`."
        if lr:
            text = replace_block(text, "bench-table", body + written)
            if args.probe:
                probe = Path(args.probe).read_text().rstrip("\n")
                text = replace_block(text, "alloc-probe", "```text\n" + probe + "\n```" + written)
        if low_body:
            text = replace_block(text, "bench-low-rank", low_body + written)
        path.write_text(text)
        print(f"\nbench_table: wrote the tables into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
