#!/usr/bin/env python3
"""PyTorch twin of lowrank-bench: the same shapes, the same counters, the same statistic.

    /usr/bin/python3 bench/pytorch_bench.py [--out build/bench/pytorch.json]

Benchmarks (names as lowrank-bench prints them, without its "/real_time" suffix):
  BM_Gemm/d:D/N:N            torch.mm(x, W.t(), out=y): the BLAS kernel alone (OpenBLAS here)
  BM_Linear_fwd/d:D/N:N      nn.Linear(D, D) forward under torch.no_grad()
  BM_Linear_fwdbwd/d:D/N:N   forward, then y.backward(ones): dx, dW, db (x requires grad)
  BM_LinearCrossEntropy_fwdbwd/N:1024/C:256/V:50257  F.cross_entropy(x @ W.T, targets).backward()
  BM_LowRankLinear_fwd/d:D/N:N/r:R     x V U^T + b as nn.Linear(D, R, bias=False) then
  BM_LowRankLinear_fwdbwd/d:D/N:N/r:R  nn.Linear(R, D): the composition of two GEMMs that
                             autograd differentiates as four; fwd and fwdbwd as above, with
                             the counters speedup_vs_dense (nn.Linear(D, D)'s time at the same
                             shape and mode, timed just before, over this time) and
                             flop_ratio (the ideal speed-up, D / (2 R))
  BM_Mlp_train_step/B:128    784-1024-1024-10 ReLU MLP: forward, cross_entropy,
                             zero_grad(set_to_none), backward, AdamW(lr=1e-3, weight_decay=0.01).step(),
                             with the time of each phase (forward_ms, backward_ms, optimizer_ms)

PyTorch is measured at its best on this machine, so by default the script re-executes
itself with an environment that gives it that (see prepared_environment): OPENBLAS_CORETYPE
unset (OpenBLAS picks its AVX-512 kernel), glibc's malloc tuned as lowrank's
tune_allocator() tunes it (MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=INT_MAX),
and OpenBLAS / OpenMP pinned to --threads. --environment malloc-defaults drops the malloc
tuning only; --as-is (--environment as-is) keeps the caller's environment.

Statistic: as Google Benchmark with --benchmark_repetitions=5
--benchmark_report_aggregates_only=true: each repetition times enough iterations to last
--min-time seconds and takes their mean; the reported figure is the median over
repetitions. Before the first repetition, warm-up steps allocate and first-touch the
buffers that the steady state reuses. float32 throughout; 1 thread unless --threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time

INT_MAX = 2**31 - 1
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit, as tune_allocator()
REEXEC_MARK = "LOWRANK_PYTORCH_BENCH_ENV"


def prepared_environment(threads: int, name: str, isa: str = "native") -> dict[str, str]:
    """'best', or 'malloc-defaults' (the same without the malloc tuning); isa 'avx2' holds
    OpenBLAS to its Haswell kernels and ATen to its AVX2 ones, to compare with a lowrank
    build for x86-64-v3 on an AVX-512 machine."""
    env = dict(os.environ)
    if isa == "avx2":
        env["OPENBLAS_CORETYPE"] = "Haswell"
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    else:
        env.pop("OPENBLAS_CORETYPE", None)  # Haswell here would force the AVX2 kernel (about half speed)
        env.pop("ATEN_CPU_CAPABILITY", None)
    if name == "best":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        env["MALLOC_TRIM_THRESHOLD_"] = str(INT_MAX)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    env[REEXEC_MARK] = name
    return env


def torch_python() -> str:
    """This interpreter if it has torch, else Debian's /usr/bin/python3 (python3-torch)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None and os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3"
    return sys.executable


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write Google-Benchmark-style JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per repetition (default 0.5)")
    p.add_argument("--warmup", type=float, default=0.2, help="seconds of warm-up, at least 2 steps")
    p.add_argument("--filter", default=".", help="regex on benchmark names")
    p.add_argument("--environment", choices=["best", "malloc-defaults", "as-is"], default="best",
                   help="best (default); malloc-defaults: the same without the malloc tuning; as-is: the "
                        "caller's environment unchanged (OPENBLAS_CORETYPE, malloc)")
    p.add_argument("--as-is", action="store_const", const="as-is", dest="environment",
                   help="the same as --environment as-is")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="native (default): the widest kernels the CPU has; avx2: OpenBLAS's Haswell and "
                        "ATen's AVX2 kernels (OPENBLAS_CORETYPE=Haswell, ATEN_CPU_CAPABILITY=avx2)")
    p.add_argument("--adamw-foreach", choices=["both", "on", "off"], default="both",
                   help="AdamW implementation(s) to time; with 'both' the faster is reported (default)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repetitions < 1 or args.min_time <= 0:
        p.error("--threads and --repetitions must be >= 1 and --min-time > 0")
    return args


def cpu_model() -> str:
    """'model name' from /proc/cpuinfo, with the family and model numbers (a VM may hide the name)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or "unknown"
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def measure(step, repetitions: int, min_time: float, warmup: float,
            reset: tuple[list[float], list[int]] | None = None) -> tuple[list[float], list[float]]:
    """Per-iteration wall-clock and process CPU seconds, one mean each per repetition.
    `reset` (phase sums, step count) is zeroed after the warm-up."""
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < warmup:
        step()
        calls += 1
    if reset is not None:
        sums, count = reset
        sums[:] = [0.0] * len(sums)
        count[0] = 0
    t0 = time.perf_counter()
    step()
    one = max(time.perf_counter() - t0, 1e-9)
    iters = max(1, math.ceil(min_time / one))
    means, cpu_means = [], []
    for _ in range(repetitions):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(iters):
            step()
        means.append((time.perf_counter() - t0) / iters)
        cpu_means.append((time.process_time() - c0) / iters)
    return means, cpu_means


def record(name: str, measured: tuple[list[float], list[float]], flops: float, items: float, items_name: str,
           variant: str | None = None) -> dict:
    means, cpu_means = measured
    med = statistics.median(means)
    row = {
        "name": name,
        "run_name": name,
        "run_type": "aggregate",
        "aggregate_name": "median",
        "repetitions": len(means),
        "real_time": med * 1e3,
        "cpu_time": statistics.median(cpu_means) * 1e3,  # process CPU time, all threads
        "time_unit": "ms",
        "min_time_ms": min(means) * 1e3,
        "cv": (statistics.stdev(means) / statistics.mean(means)) if len(means) > 1 else 0.0,
        "GFLOPs": flops / med * 1e-9,
        items_name: items / med,
    }
    if variant:
        row["variant"] = variant
    return row


def main() -> int:
    args = parse_args(sys.argv[1:])
    if args.environment != "as-is" and os.environ.get(REEXEC_MARK) != args.environment:
        # glibc reads MALLOC_* and OpenBLAS reads OPENBLAS_CORETYPE when they load: both
        # happen before any Python code runs, so the settings need a fresh process.
        python = torch_python()
        os.execve(python, [python, os.path.abspath(__file__), *sys.argv[1:]],
                  prepared_environment(args.threads, args.environment, args.isa))

    try:
        import torch  # after the environment is settled
    except ModuleNotFoundError:
        print("pytorch_bench: no torch module for " + sys.executable +
              "; install Debian's python3-torch and run with /usr/bin/python3", file=sys.stderr)
        return 1
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    want = re.compile(args.filter)
    results: list[dict] = []

    def report(row: dict) -> None:
        results.append(row)
        counters = "  ".join(f"{k}={row[k]:.6g}" for k in ("GFLOPs", "tokens_per_second", "samples_per_second",
                                                             "speedup_vs_dense") if k in row)
        extra = f"  [{row['variant']}]" if "variant" in row else ""
        print(f"{row['name']:<36} {row['real_time']:10.3f} ms  (cv {row['cv']:.1%})  {counters}{extra}",
              flush=True)

    for d in (768, 1024):
        for n in (512, 4096):
            name = f"BM_Gemm/d:{d}/N:{n}"
            if not want.search(name):
                continue
            x, w, y = torch.randn(n, d), torch.randn(d, d), torch.empty(n, d)

            def step(x=x, w=w, y=y):
                torch.mm(x, w.t(), out=y)
            means = measure(step, args.repetitions, args.min_time, args.warmup)
            report(record(name, means, 2.0 * n * d * d, n, "tokens_per_second"))

    def layer_step(model: nn.Module, x: torch.Tensor, backward: bool):
        """One fwd (no_grad) or fwd + y.backward(ones) of `model` on x, as BM_Linear_*."""
        params = list(model.parameters())
        if backward:
            seed = torch.ones(x.shape)  # the layers here are square

            def step():
                # set_to_none: the new gradients are stolen, not added (PyTorch's fastest path)
                for p in params:
                    p.grad = None
                x.grad = None
                model(x).backward(seed)
        else:
            def step():
                with torch.no_grad():
                    model(x)
        return step

    def dense_seconds(d: int, n: int, backward: bool) -> float:
        """nn.Linear(d, d) at this shape and mode, timed now: median seconds per step."""
        lin, x = nn.Linear(d, d), torch.randn(n, d, requires_grad=backward)
        means, _ = measure(layer_step(lin, x, backward), args.repetitions, args.min_time, args.warmup)
        return statistics.median(means)

    for backward in (False, True):
        for d in (768, 1024):
            for n in (512, 4096):
                name = f"BM_Linear_{'fwdbwd' if backward else 'fwd'}/d:{d}/N:{n}"
                if not want.search(name):
                    continue
                lin = nn.Linear(d, d)
                x = torch.randn(n, d, requires_grad=backward)
                means = measure(layer_step(lin, x, backward), args.repetitions, args.min_time, args.warmup)
                fwd_flops = 2.0 * n * d * d
                report(record(name, means, 3 * fwd_flops if backward else fwd_flops, n, "tokens_per_second"))
                del lin, x

    name = "BM_LinearCrossEntropy_fwdbwd/N:1024/C:256/V:50257"
    if want.search(name):
        n, c, vocab = 1024, 256, 50257
        x = torch.randn(n, c, requires_grad=True)
        w = (0.02 * torch.randn(vocab, c)).requires_grad_()
        targets = torch.randint(0, vocab, (n,))

        def step(x=x, w=w, targets=targets):
            x.grad, w.grad = None, None
            F.cross_entropy(x @ w.t(), targets).backward()
        report(record(name, measure(step, args.repetitions, args.min_time, args.warmup), 6.0 * n * c * vocab, n,
                      "tokens_per_second"))
        del x, w, targets

    # Grouped by (d, N, r) as in bench_low_rank.cpp: the dense reference is timed right before
    # the low-rank layer it is compared with, so that a drift in load hits both alike.
    for d in (768, 1024):
        for n in (512, 4096):
            for r in (8, 32, 64, 128, 256):
                for backward in (False, True):
                    name = f"BM_LowRankLinear_{'fwdbwd' if backward else 'fwd'}/d:{d}/N:{n}/r:{r}"
                    if not want.search(name):
                        continue
                    dense = dense_seconds(d, n, backward)
                    model = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, d))
                    x = torch.randn(n, d, requires_grad=backward)
                    means = measure(layer_step(model, x, backward), args.repetitions, args.min_time, args.warmup)
                    fwd_flops = 4.0 * n * d * r
                    row = record(name, means, 3 * fwd_flops if backward else fwd_flops, n, "tokens_per_second")
                    row["speedup_vs_dense"] = dense / statistics.median(means[0])
                    row["flop_ratio"] = d / (2.0 * r)
                    report(row)
                    del model, x

    name = "BM_Mlp_train_step/B:128"
    if want.search(name):
        batch, sizes = 128, (784, 1024, 1024, 10)
        x = torch.rand(batch, sizes[0])
        t = torch.randint(0, sizes[-1], (batch,))
        fwd = 2.0 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        flops = 3 * fwd - 2.0 * batch * sizes[0] * sizes[1]  # no input gradient for layer 1
        variants = {"both": (False, True), "on": (True,), "off": (False,)}[args.adamw_foreach]
        rows = []
        for foreach in variants:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                  nn.Linear(1024, 10))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=foreach)

            phases = [0.0, 0.0, 0.0]  # forward, zero_grad + backward, optimizer (as bench_mlp.cpp)
            steps = [0]

            def step(model=model, opt=opt, phases=phases, steps=steps):
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x), t)
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                phases[0] += t1 - t0
                phases[1] += t2 - t1
                phases[2] += t3 - t2
                steps[0] += 1

            measured = measure(step, args.repetitions, args.min_time, args.warmup, reset=(phases, steps))
            row = record(name, measured, flops, batch, "samples_per_second", f"AdamW foreach={foreach}")
            for key, total in zip(("forward_ms", "backward_ms", "optimizer_ms"), phases):
                row[key] = total / steps[0] * 1e3
            rows.append(row)
        best = min(rows, key=lambda r: r["real_time"])
        for r in rows:
            if r is not best:
                print(f"  (also measured: {r['variant']}: {r['real_time']:.3f} ms)")
        if len(rows) > 1:
            best["all_variants_ms"] = {r["variant"]: r["real_time"] for r in rows}
        report(best)

    context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_name": platform.node(),
        "cpu_model": cpu_model(),
        "num_cpus": os.cpu_count(),
        "library": "pytorch",
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "environment": args.environment,
        "isa": args.isa,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "(unset)"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "(unset)"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "(unset)"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
        "repetitions": args.repetitions,
        "min_time_s": args.min_time,
        "statistic": "median over repetitions of the mean time per iteration",
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"context": context, "benchmarks": results}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
