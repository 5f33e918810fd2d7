#!/usr/bin/env python3
"""Communication volume of data-parallel GPT-2 training, per method, from the formulas of
docs/distributed.md: the bytes one step all-reduces (the trainable gradients, fp32), the time
of a ring all-reduce over P processes at a stated link bandwidth, and the tokens a process
must compute per step before that time stops being the bottleneck.

    python3 scripts/comm_volume.py                  # the table of docs/distributed.md
    python3 scripts/comm_volume.py --gbit 100 -p 64 --tflops 2

The model follows lowrank's Gpt2 (GPT-2's shapes, tied embedding, biases, two LayerNorms a
block); the low-rank methods act on the MLP projections (the configs' low_rank_roles,
mlp_fc and mlp_proj), everything else trains dense, as in lowrank-gpt2.
"""
import argparse

CONFIGS = {  # name: (layers, width d), vocabulary 50257, context 1024
    "GPT-2 124M": (12, 768),
    "GPT-2 355M": (24, 1024),
    "GPT-2 1.5B": (48, 1600),
}
VOCAB, CONTEXT = 50257, 1024


def dense_parts(L, d):
    """(scalars outside the MLP weights, scalars of the MLP weights), all trainable."""
    embeddings = VOCAB * d + CONTEXT * d + 2 * d  # wte (tied with the head), wpe, final LayerNorm
    per_block_other = 3 * d * d + 3 * d + d * d + d + 4 * d + 4 * d + d  # attention, LayerNorms, MLP biases
    per_block_mlp = 4 * d * d + 4 * d * d  # c_fc (4d x d) and c_proj (d x 4d)
    return embeddings + L * per_block_other, L * per_block_mlp


def mlp_trainable(method, L, d, r):
    """Trainable scalars of the L blocks' two MLP projections (m x n = 4d x d and d x 4d)."""
    shapes = [(4 * d, d), (d, 4 * d)]
    total = 0
    for m, n in shapes:
        if method == "dense":
            total += m * n
        elif method == "lora, relora, inrank, cuttlefish after its switch":
            total += (m + n) * r  # the factors; a frozen base stays home
        elif method == "sst":
            total += (m + n) * r + min(m, n)  # the active singular vectors and all of sigma
        elif method == "deeplora (compressed)":
            total += 3 * (2 * r) ** 2  # three 2r x 2r inner factors; the outer bases frozen (gamma 0)
        else:
            raise ValueError(method)
    return L * total


# LoRA and ReLoRA send their factors at rank r; InRank its active columns (r + buffer during
# stage 1, r after it); Cuttlefish sends the dense layer until it switches, then the factors.
METHODS = ["dense", "lora, relora, inrank, cuttlefish after its switch", "sst", "deeplora (compressed)"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gbit", type=float, default=10.0, help="link bandwidth, Gbit/s a direction (default 10)")
    ap.add_argument("-p", "--processes", type=int, default=8, help="processes in the ring (default 8)")
    ap.add_argument("--tflops", type=float, default=1.0,
                    help="sustained TFLOP/s of one process, for the break-even tokens (default 1)")
    ap.add_argument("--rank-fraction", type=float, default=0.25,
                    help="rank r as a fraction of the width d (default 0.25, lowrank-gpt2's d / 4)")
    args = ap.parse_args()
    p, bw = args.processes, args.gbit * 1e9 / 8  # bytes/s
    ring = 2 * (p - 1) / p
    print(f"fp32 gradients; ring all-reduce over P = {p} processes at {args.gbit:g} Gbit/s; "
          f"rank r = {args.rank_fraction:g} d; a process computes {args.tflops:g} TFLOP/s")
    print()
    print("| model | method | trainable | all-reduced / step | vs dense | all-reduce at "
          f"{args.gbit:g} Gbit/s | break-even tokens / process / step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (L, d) in CONFIGS.items():
        r = int(round(args.rank_fraction * d))
        other, mlp = dense_parts(L, d)
        dense_bytes = 4 * (other + mlp + 1)
        for method in METHODS:
            n = other + mlp_trainable(method, L, d, r)
            b = 4 * (n + 1)  # + the loss
            seconds = ring * b / bw
            # Forward + backward cost 6 flops per weight per token (dense-equivalent: low-rank
            # layers compute less, which only moves the break-even point further out).
            flops_per_token = 6 * (other + mlp)
            tokens = seconds * args.tflops * 1e12 / flops_per_token
            print(f"| {name} | {method} | {n / 1e6:,.1f} M | {b / 2**20:,.0f} MiB | {b / dense_bytes:.2f} | "
                  f"{seconds * 1e3:,.0f} ms | {tokens:,.0f} |")


if __name__ == "__main__":
    main()
