"""Writes a made-up MNIST-like IDX data set into the current folder for the trainer tests:
96 training and 32 test images of 8 x 8 pixels (train-*, t10k-* files), labels i % 10, so
that lowrank-mlp --data . runs a few steps on it in well under a second."""

import struct


def split(prefix, n):
    with open(f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 8, 8))
        for i in range(n):
            f.write(bytes((i * 7 + p * (i % 10 + 1)) % 256 for p in range(64)))
    with open(f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, n))
        f.write(bytes(i % 10 for i in range(n)))


split("train", 96)
split("t10k", 32)
