#!/usr/bin/env python3
"""PyTorch twin of one lowrank-gpt2 training configuration, for side-by-side speed.

    /usr/bin/python3 bench/pytorch_gpt2.py [--config tiny] [--threads 1] [--steps 20] [--warmup-steps 20]

It needs Debian's python3-torch (`bash scripts/setup.sh --bench` installs it);
scripts/bench_gpt2.py runs it next to lowrank-gpt2 and writes docs/performance.md's table.

The model is GPT-2 as lowrank's Gpt2<float> (include/lowrank/models/gpt2.hpp,
docs/models/gpt2.md), written here with plain torch.nn modules:

  x = wte[ids] + wpe[t]; per block: x += c_proj(attn(c_attn(ln_1(x)))); x += mlp(ln_2(x));
  logits = ln_f(x) @ wte^T (the LM head tied to the token embedding); mean cross-entropy.

  - configs: gpt2 (124M: 12 layers, 12 heads, width 768, context 1024), tiny (4 layers, 4 heads,
    width 256, context 128), mini (2, 2, 128, 64);
    vocabulary 50257 (not padded), biases everywhere, no dropout (GPT-2 trains without);
  - pre-LayerNorm blocks (eps 1e-5), GELU in its tanh form, the fused qkv projection
    c_attn (3C x C, output columns [q | k | v]);
  - causal attention as explicit matmuls, an upper-triangle mask and a softmax (PyTorch
    1.13 has no fused scaled_dot_product_attention);
  - GPT-2's initialisation: projection weights and both embeddings N(0, 0.02), the two
    residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm gains 1;
  - AdamW (betas 0.9 / 0.95, eps 1e-8), weight decay 0.1 on matrices only (the embeddings
    and the four projections of each block; not biases or LayerNorm parameters), lr 1e-3
    with lowrank-gpt2's default schedule (linear warm-up over 30 steps, then half a cosine
    down to 0.1 x lr at the last step); the global gradient norm clipped at 1.0;
  - batches of B windows of T + 1 tokens at uniformly random positions of PREFIX.train.bin
    (the headerless little-endian uint16 stream lowrank-tokenize writes), targets shifted
    by one, as lowrank's TokenWindows (the same distribution, not the same draws).

A step is what lowrank-gpt2 times: draw a batch, forward, loss.item(), zero_grad
(set_to_none), backward, clip, set the lr, optimizer step. --warmup-steps steps run first
and are not timed (the first steps allocate and first-touch every buffer); then --steps
steps are timed, and the last stdout line is a JSON object whose tokens_per_second is
B * T * steps over the time of the timed steps (lowrank-gpt2's statistic over an interval).

PyTorch runs at its best on this machine, set up as bench/pytorch_bench.py sets it up
(whose prepared_environment() this script reuses) plus one variable: it re-executes itself
with OPENBLAS_CORETYPE unset (OpenBLAS picks its AVX-512 kernel), OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS = --threads, glibc's malloc tuned as lowrank's tune_allocator() tunes it
(MALLOC_MMAP_THRESHOLD_ = 32 MiB, MALLOC_TRIM_THRESHOLD_ = INT_MAX, and MALLOC_MMAP_MAX_ = 0,
which pytorch_bench.py does not set), and calls torch.set_num_threads(--threads).
MALLOC_MMAP_MAX_ = 0 matters here as it does for lowrank: the logits, their gradient and
the softmax (B*T x V floats, 206 MB each for tiny at B = 8) are far above the largest mmap
threshold glibc accepts, so without it each is mapped fresh and page-faulted every step
(about 5x slower on this machine).

--environment best (default): the above; mmap-allowed: exactly pytorch_bench.py's best
(MALLOC_MMAP_MAX_ not set); malloc-defaults: no malloc tuning at all; as-is (or --as-is):
the caller's environment unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_bench import REEXEC_MARK, cpu_model, prepared_environment, torch_python  # noqa: E402

# name: (n_layer, n_head, n_embd, block_size), as lowrank::gpt2_config()
CONFIGS = {"gpt2": (12, 12, 768, 1024), "tiny": (4, 4, 256, 128), "mini": (2, 2, 128, 64)}
VOCAB = 50257


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="untimed training steps before the timed ones (default 20: as lowrank-gpt2's "
                        "second interval with --steps 40 --eval-every 20)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, B (default 8)")
    p.add_argument("--context", type=int, default=0, help="tokens per sequence, T (0: the config's block size)")
    p.add_argument("--data", default="data/text/corpus", help="token stream PREFIX.train.bin (default data/text/corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--lr-warmup", type=int, default=30,
                   help="steps of linear lr warm-up, as lowrank-gpt2's --warmup-steps (default 30)")
    p.add_argument("--adamw-foreach", choices=["on", "off"], default="off",
                   help="torch.optim.AdamW(foreach=...) (default off: the faster here, see docs/performance.md)")
    p.add_argument("--environment", choices=["best", "mmap-allowed", "malloc-defaults", "as-is"], default="best",
                   help="best (default); mmap-allowed: pytorch_bench.py's best (no MALLOC_MMAP_MAX_=0); "
                        "malloc-defaults: without any malloc tuning; as-is: the caller's environment unchanged")
    p.add_argument("--as-is", action="store_const", const="as-is", dest="environment",
                   help="the same as --environment as-is")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.threads < 1 or args.batch < 1 or args.context < 0:
        p.error("--steps, --threads and --batch must be >= 1, --warmup-steps and --context >= 0")
    if args.context > CONFIGS[args.config][3]:
        p.error(f"--context {args.context} exceeds the block size {CONFIGS[args.config][3]} of config '{args.config}'")
    return args


def environment(args: argparse.Namespace) -> dict[str, str]:
    """pytorch_bench.py's environment for args.environment, with M_MMAP_MAX = 0 for 'best'."""
    env = prepared_environment(args.threads, "malloc-defaults" if args.environment == "malloc-defaults" else "best")
    if args.environment == "best":
        env["MALLOC_MMAP_MAX_"] = "0"  # as tune_allocator()'s mallopt(M_MMAP_MAX, 0)
    else:
        env.pop("MALLOC_MMAP_MAX_", None)
    env[REEXEC_MARK] = args.environment
    return env


def main() -> int:
    args = parse_args(sys.argv[1:])
    if args.environment != "as-is" and (os.environ.get(REEXEC_MARK) != args.environment or
                                        os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads)):
        # glibc reads MALLOC_* and OpenBLAS reads OPENBLAS_CORETYPE when they load, before
        # any Python code runs: the settings need a fresh process.
        python = torch_python()
        os.execve(python, [python, os.path.abspath(__file__), *sys.argv[1:]], environment(args))

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n_layer, n_head, n_embd, block_size = CONFIGS[args.config]
    B, T = args.batch, args.context or block_size

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
            self.c_attn = nn.Linear(n_embd, 3 * n_embd)
            self.attn_c_proj = nn.Linear(n_embd, n_embd)
            self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
            self.c_fc = nn.Linear(n_embd, 4 * n_embd)
            self.mlp_c_proj = nn.Linear(4 * n_embd, n_embd)

        def attention(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            d = c // n_head
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            q = q.view(b, t, n_head, d).transpose(1, 2)  # (b, h, t, d)
            k = k.view(b, t, n_head, d).transpose(1, 2)
            v = v.view(b, t, n_head, d).transpose(1, 2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))  # (b, h, t, t)
            att = att.masked_fill(masked, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
            return self.attn_c_proj(y)

        def forward(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
            x = x + self.attention(self.ln_1(x), masked)
            return x + self.mlp_c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class Gpt2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(VOCAB, n_embd)
            self.wpe = nn.Embedding(block_size, n_embd)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
            # True above the diagonal: the future positions a query must not see
            self.register_buffer("future", torch.ones(block_size, block_size, dtype=torch.bool).triu(1))
            residual_std = 0.02 / math.sqrt(2 * n_layer)
            with torch.no_grad():
                nn.init.normal_(self.wte.weight, 0.0, 0.02)
                nn.init.normal_(self.wpe.weight, 0.0, 0.02)
                for blk in self.h:
                    nn.init.normal_(blk.c_attn.weight, 0.0, 0.02)
                    nn.init.normal_(blk.attn_c_proj.weight, 0.0, residual_std)
                    nn.init.normal_(blk.c_fc.weight, 0.0, 0.02)
                    nn.init.normal_(blk.mlp_c_proj.weight, 0.0, residual_std)
                    for lin in (blk.c_attn, blk.attn_c_proj, blk.c_fc, blk.mlp_c_proj):
                        nn.init.zeros_(lin.bias)

        def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            t = ids.shape[1]
            x = self.wte(ids) + self.wpe.weight[:t]
            masked = self.future[:t, :t]
            for blk in self.h:
                x = blk(x, masked)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head, (B, T, V)
            return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

    model = Gpt2()
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=args.adamw_foreach == "on")

    total_steps = args.warmup_steps + args.steps
    lr_warmup = min(args.lr_warmup, max(0, total_steps - 1))
    min_factor = 0.1

    def lr_factor(step: int) -> float:  # lowrank::LrSchedule, warmup_cosine
        if step < lr_warmup:
            return (step + 1) / lr_warmup
        if step >= total_steps:
            return min_factor
        progress = (step - lr_warmup) / (total_steps - lr_warmup)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    train_path = args.data + ".train.bin"
    stream = torch.from_numpy(np.fromfile(train_path, dtype="<u2").astype(np.int64))
    if stream.numel() < T + 1:
        print(f"pytorch_gpt2: '{train_path}' holds {stream.numel()} tokens, a window needs {T + 1}", file=sys.stderr)
        return 1
    if int(stream.max()) >= VOCAB:
        print(f"pytorch_gpt2: '{train_path}' has a token id outside the vocabulary of {VOCAB}", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(T + 1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, stream.numel() - T, (B, 1), generator=gen)  # [0, size - T - 1]
        windows = stream[starts + offsets]  # (B, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    losses: list[float] = []
    step_seconds: list[float] = []

    def train_step(step: int) -> None:
        x, y = batch()
        loss = model(x, y)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite loss ({value}) at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step)
        opt.step()
        losses.append(value)

    for step in range(args.warmup_steps):
        train_step(step)
    timed_start = time.perf_counter()
    cpu_start = time.process_time()
    for step in range(args.warmup_steps, total_steps):
        t0 = time.perf_counter()
        train_step(step)
        step_seconds.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - timed_start
    cpu_seconds = time.process_time() - cpu_start

    tokens = B * T * args.steps
    result = {
        "library": "pytorch",
        "config": args.config,
        "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "vocab_size": VOCAB,
        "params": sum(p.numel() for p in params),
        "batch": B,
        "context": T,
        "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "tokens_per_second": tokens / seconds,
        "tokens_per_cpu_second": tokens / cpu_seconds,
        "step_seconds_median": statistics.median(step_seconds),
        "step_seconds_min": min(step_seconds),
        "train_seconds": seconds,
        "loss": losses[-1],
        "train_loss": statistics.fmean(losses[args.warmup_steps:]),
        "first_loss": losses[0],
        "adamw_foreach": args.adamw_foreach == "on",
        "torch_version": torch.__version__,
        "environment": args.environment,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "(unset)"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "(unset)"),
        "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_", "(unset)"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "(unset)"),
        "cpu_model": cpu_model(),
        "num_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
