#!/usr/bin/env python3
"""A GPT-2 training step, lowrank against PyTorch on this machine, in one interleaved run.

    python3 scripts/bench_gpt2.py                    # tiny config, 1 and 2 threads, 5 rounds
    python3 scripts/bench_gpt2.py --write-docs       # also this machine's block in docs/performance.md

Programs, each started once per round and thread count, in turn (so that a change of
background load cannot favour one of them):

  lowrank           build/release/examples/gpt2/lowrank-gpt2 (Eigen's own GEMM)
  lowrank+openblas  lowrank-gpt2-openblas (Eigen's products in OpenBLAS, AVX-512 kernel), linked to
                    OpenBLAS's OpenMP build where it is installed (CMakeLists.txt)
  lowrank+openblas-pthread
                    the same binary loading Debian's default pthread build of OpenBLAS instead
                    (LD_LIBRARY_PATH), to compare the two thread pools in one run; only when
                    asked for with --programs
  pytorch           /usr/bin/python3 bench/pytorch_gpt2.py (Debian's python3-torch, at its best)

All three train the same model (dense `tiny` GPT-2: 4 layers, 4 heads, width 256,
vocabulary 50257) on the same token file with the same AdamW, clipping and schedule, B x T
tokens a step. The figure is tokens/s over the steps after the first --warm steps (those
size and first-touch every buffer): for lowrank the second interval of its metrics log
(--eval-every --warm), whose time excludes evaluation; for PyTorch its own timed steps after
--warmup-steps. The table shows the median over rounds and the min-max range.

The machine is measured in the same run: before the rounds, lowrank-bench's probes
(bench/bench_machine.cpp: the FP32 FMA peak with AVX2 and AVX-512 where the CPU has it, and
the memory bandwidth, on 1 thread and on all), and each step's achieved GFLOP/s (tokens/s x
the model's FLOPs per token, 6 per matmul weight and 12 L T C for attention, forward and
backward) is shown as a fraction of the widest peak at its thread count (MFU).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_common import ROOT, build, cpu_info, cpu_name, machine_key, put_keyed_block, trainer_env

# One block per CPU and ISA, <!-- bench-gpt2:<cpu>-f<family>m<model>-<isa>:begin --> ... :end -->,
# kept in docs/performance.md before the ANCHOR line; a run replaces its own machine's block.
ANCHOR = "<!-- bench-gpt2s:end -->"
PROGRAMS = ["lowrank", "lowrank+openblas", "pytorch"]
OPTIONAL = ["lowrank+openblas-pthread"]
# Debian's pthread OpenBLAS, in the multiarch directory of whatever architecture this is.
PTHREAD_OPENBLAS = next(iter(sorted(Path("/usr/lib").glob("*/openblas-pthread"))), Path("/usr/lib/openblas-pthread"))
CONFIGS = {"gpt2": (12, 768), "tiny": (4, 256), "mini": (2, 128)}  # (layers, width): models/gpt2.hpp's gpt2_config
VOCAB = 50257


def flops_per_token(config, context):
    """Forward + backward FLOPs of a training step per token: 6 per weight of every matmul
    (attention, MLP and the tied head) and 12 L T C for the attention scores and values."""
    layers, width = CONFIGS[config]
    return 6 * (12 * layers * width * width + VOCAB * width) + 12 * layers * context * width


def this_machine():
    """This CPU's block key and ISA, for a native build: AVX-512 where the CPU has it."""
    info = cpu_info()
    isa = "avx512" if "avx512f" in info.get("flags", "").split() else "avx2"
    return machine_key(info, isa), isa


def machine_probe(binary):
    """{(isa or "bandwidth", "1" or "all"): rate} from lowrank-bench's machine probes, or {}."""
    if not Path(binary).exists():
        print(f"bench_gpt2: no {binary}: no peak probe in this run", file=sys.stderr)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "machine.json"
        subprocess.run([binary, "--benchmark_filter=^BM_(Peak_FMA|Bandwidth)_", f"--benchmark_out={out}",
                        "--benchmark_out_format=json"], check=True, stdout=subprocess.DEVNULL)
        rates = {}
        for b in json.loads(out.read_text())["benchmarks"]:
            name, threads = b["name"].split("/")[0], b["name"].split("threads:")[1].split("/")[0]
            if name.startswith("BM_Peak_FMA_"):
                rates[(name[len("BM_Peak_FMA_"):], threads)] = b["GFLOPs"]
            else:
                rates[("bandwidth", threads)] = b["GBps"]
        return rates


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--warm", type=int, default=10, help="untimed steps first (default 10)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--programs", default=",".join(PROGRAMS))
    ap.add_argument("--data", default=str(ROOT / "data" / "text" / "corpus"))
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in build/release")
    ap.add_argument("--write-docs", action="store_true")
    return ap.parse_args()


def with_library_path(directory, env):
    """LD_LIBRARY_PATH with directory first and the caller's entries after it."""
    rest = env.get("LD_LIBRARY_PATH", "")
    return f"{directory}:{rest}" if rest else str(directory)


def run_lowrank(binary, args, threads, library_path=None):
    env = trainer_env(threads)
    if library_path:
        env["LD_LIBRARY_PATH"] = with_library_path(library_path, env)  # before the binary's run path
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "metrics.jsonl"
        cmd = [binary, "--config", args.config, "--batch", str(args.batch), "--context", str(args.context),
               "--steps", str(args.warm + args.steps), "--eval-every", str(args.warm), "--eval-windows", "1",
               "--threads", str(threads), "--data", args.data, "--log", str(log), "--quiet",
               "--rank-log", str(Path(tmp) / "ranks.jsonl")]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        # An evaluation line every --warm steps; every interval after the first is timed
        # (the log's "step" lines time the steps alone, without reading the batches).
        timed = [line for line in lines if line.get("kind", "eval") == "eval" and line["step"] > args.warm]
        seconds_per_token = statistics.fmean(1.0 / line["tokens_per_second"] for line in timed)
        return 1.0 / seconds_per_token  # intervals of equal length: total tokens over total time


def run_pytorch(args, threads):
    cmd = ["/usr/bin/python3", str(ROOT / "bench" / "pytorch_gpt2.py"), "--config", args.config,
           "--batch", str(args.batch), "--context", str(args.context), "--warmup-steps", str(args.warm),
           "--steps", str(args.steps), "--threads", str(threads), "--data", args.data]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_second"]


def loaded_openblas(binary, library_path=None):
    """The libopenblas the binary loads (ldd), with library_path as LD_LIBRARY_PATH."""
    env = dict(os.environ)
    if library_path:
        env["LD_LIBRARY_PATH"] = with_library_path(library_path, env)
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, env=env).stdout
    for line in out.splitlines():
        if "libopenblas" in line and "=>" in line:
            return line.split("=>", 1)[1].split("(")[0].strip()
    return "no libopenblas"


def torch_version():
    out = subprocess.run(["/usr/bin/python3", "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "not installed"


def main():
    args = parse_args()
    if args.steps % args.warm != 0:
        raise SystemExit("bench_gpt2: --steps must be a multiple of --warm (lowrank times whole intervals)")
    programs = [p for p in args.programs.split(",") if p]
    for p in programs:
        if p not in PROGRAMS + OPTIONAL:
            raise SystemExit(f"bench_gpt2: unknown program '{p}', expected one of {', '.join(PROGRAMS + OPTIONAL)}")
    if "lowrank+openblas-pthread" in programs and not PTHREAD_OPENBLAS.is_dir():
        raise SystemExit(f"bench_gpt2: lowrank+openblas-pthread needs {PTHREAD_OPENBLAS} (libopenblas0-pthread)")
    threads_list = [int(t) for t in args.threads.split(",") if t]
    folder = ROOT / "build" / "release" / "examples" / "gpt2"
    if not args.no_build:
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--bench"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["bash", str(ROOT / "scripts" / "prepare_text.sh")], check=True, stdout=sys.stderr)
        targets = {"lowrank": "lowrank-gpt2", "lowrank+openblas": "lowrank-gpt2-openblas",
                   "lowrank+openblas-pthread": "lowrank-gpt2-openblas"}
        for p in programs:
            if p in targets:
                build(targets[p])
        build("lowrank-bench")
    binaries = {"lowrank": str(folder / "lowrank-gpt2"), "lowrank+openblas": str(folder / "lowrank-gpt2-openblas"),
                "lowrank+openblas-pthread": str(folder / "lowrank-gpt2-openblas")}
    library_paths = {"lowrank+openblas-pthread": PTHREAD_OPENBLAS}
    probe = machine_probe(str(ROOT / "build" / "release" / "bench" / "lowrank-bench"))
    flops = flops_per_token(args.config, args.context)

    samples = {(p, t): [] for p in programs for t in threads_list}
    load_start = os.getloadavg()[0]
    for r in range(args.rounds):
        for t in threads_list:
            for p in programs:
                tps = run_pytorch(args, t) if p == "pytorch" else \
                    run_lowrank(binaries[p], args, t, library_paths.get(p))
                samples[(p, t)].append(tps)
                print(f"bench_gpt2: round {r + 1}/{args.rounds}, {t} thread(s), {p}: {tps:,.0f} tokens/s",
                      file=sys.stderr, flush=True)

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    key, isa = this_machine()
    isa_text = "with avx512f" if isa == "avx512" else "AVX2 + FMA only, no avx512f"
    header = (f"Run {now} on {cpu_name()} ({key}: {os.cpu_count()} vCPUs, {isa_text}), {args.rounds} "
              "interleaved rounds, "
              f"1-minute load average {load_start:.2f} at the start and {os.getloadavg()[0]:.2f} at the end; "
              f"PyTorch {torch_version()}. Config `{args.config}`, B = {args.batch}, T = {args.context}, dense; "
              f"tokens/s over {args.steps} steps after {args.warm} untimed ones.")
    for p in programs:
        if p.startswith("lowrank+openblas"):
            header += f" `{p}` loads {loaded_openblas(binaries[p], library_paths.get(p))}."
    peaks = {}
    for t in threads_list:
        which = "1" if t == 1 else "all"
        found = [probe[(isa, which)] for isa in ("avx2", "avx512") if (isa, which) in probe]
        peaks[t] = max(found) if found and (t == 1 or t == os.cpu_count()) else None
    if probe:
        cells = ", ".join(f"{'AVX-512' if isa == 'avx512' else 'AVX2' if isa == 'avx2' else 'triad bandwidth'} "
                          f"{rate:.1f} {'GB/s' if isa == 'bandwidth' else 'GFLOP/s'} on {t} thread(s)"
                          for (isa, t), rate in sorted(probe.items()))
        header += (f" Machine probes of the same run (lowrank-bench, bench/bench_machine.cpp): {cells}; "
                   f"{flops / 1e6:.1f} MFLOP a token (fwd+bwd); MFU = tokens/s x that over the widest FP32 FMA "
                   "peak at the thread count.")
    rows = ["| threads | program | tokens/s (median) | min - max | vs PyTorch | GFLOP/s | MFU |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for t in threads_list:
        base = statistics.median(samples[("pytorch", t)]) if ("pytorch", t) in samples else None
        for p in programs:
            s = samples[(p, t)]
            med = statistics.median(s)
            ratio = f"{med / base:.2f}x" if base else ""
            gflops = med * flops / 1e9
            mfu = f"{gflops / peaks[t]:.0%}" if peaks.get(t) else "—"
            rows.append(f"| {t} | {p} | {med:,.0f} | {min(s):,.0f} - {max(s):,.0f} | {ratio} | {gflops:.1f} "
                        f"| {mfu} |")
    table = "\n".join(rows)
    print(header + "\n\n" + table)
    shape = [] if (args.config, args.batch, args.context) == ("tiny", 8, 128) else \
        [f"--config {args.config} --batch {args.batch} --context {args.context}"]
    steps = [] if (args.warm, args.steps) == (10, 20) else [f"--warm {args.warm} --steps {args.steps}"]
    command = " ".join(["python3 scripts/bench_gpt2.py --write-docs", *shape, *steps]
                       + ([f"--rounds {args.rounds}"] if args.rounds != 5 else [])
                       + ([f"--programs {args.programs}"] if programs != PROGRAMS else []))
    # One block per machine and shape: the default shape's block is keyed by the machine alone.
    if shape:
        key += f"-{args.config}-b{args.batch}-t{args.context}"
    if args.write_docs:
        page = ROOT / "docs" / "performance.md"
        page.write_text(put_keyed_block(page.read_text(), f"bench-gpt2:{key}",
                                        "\n".join([header, "", table, "", f"Command: `{command}`."]), ANCHOR))
        print(f"bench_gpt2: wrote {page} ({key})", file=sys.stderr)


if __name__ == "__main__":
    main()
