#!/usr/bin/env python3
"""An independent reader of safetensors files (Python standard library + torch only).

Written from the format description in docs/checkpoints.md, not from the C++ reader, so
that running it on a file the C++ writer produced checks the file, not our own reading of
it. Loads every tensor into a dict of torch tensors and prints, per tensor, its name,
dtype, shape, the sum of its elements (in float64) and the SHA-256 of its raw bytes, then
the metadata keys.

    python3 tests/io/read_safetensors.py FILE [--weights-only] [--metadata]

--weights-only drops the optimizer state ("optimizer.*"), as a PyTorch user taking the
weights of a lowrank checkpoint would. --metadata prints the metadata values too.
Not part of ctest: run by hand (docs/checkpoints.md).
"""

import argparse
import hashlib
import json
import struct
import sys

import torch

# Element sizes and torch types. torch 1.13 has no unsigned 16/32/64-bit types: those are
# read as the signed type of the same width (same bits) and flagged in the output.
DTYPES = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "I16": (2, torch.int16),
    "U16": (2, torch.int16),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, torch.int32),
    "F32": (4, torch.float32),
    "I64": (8, torch.int64),
    "U64": (8, torch.int64),
    "F64": (8, torch.float64),
}


class FormatError(Exception):
    pass


def load(path):
    """Returns (tensors: dict name -> torch.Tensor in file order, metadata: dict, raw: dict name -> bytes)."""
    if sys.byteorder != "little":
        raise FormatError("this reader assumes a little-endian machine")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise FormatError(f"{path}: {len(data)} bytes, expected at least 8")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise FormatError(f"{path}: header length {n} exceeds the {len(data) - 8} bytes after it")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    buffer = memoryview(data)[8 + n :]

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")

    entries = []
    for name, info in header.items():
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(buffer)
        ):
            raise FormatError(f"{path}: tensor {name!r}: bad data_offsets {offsets!r} for a {len(buffer)}-byte buffer")
        count = 1
        for d in shape:
            count *= d
        size, _ = DTYPES[dtype]
        if count * size != offsets[1] - offsets[0]:
            raise FormatError(f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {count * size} bytes, "
                              f"the offsets hold {offsets[1] - offsets[0]}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))

    entries.sort()
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise FormatError(f"{path}: tensor {name!r} starts at {begin}, expected {end} (overlap or hole)")
        end = stop
    if end != len(buffer):
        raise FormatError(f"{path}: tensors cover {end} of {len(buffer)} buffer bytes")

    tensors, raw = {}, {}
    for begin, stop, name, dtype, shape in entries:
        _, torch_dtype = DTYPES[dtype]
        chunk = bytes(buffer[begin:stop])
        raw[name] = chunk
        count = (stop - begin) // DTYPES[dtype][0]
        if count == 0:
            t = torch.empty(shape, dtype=torch_dtype)
        else:
            t = torch.frombuffer(bytearray(chunk), dtype=torch_dtype, count=count).reshape(shape)
        tensors[name] = t
    return tensors, metadata, raw


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--weights-only", action="store_true", help="drop optimizer.* tensors")
    parser.add_argument("--metadata", action="store_true", help="print metadata values")
    args = parser.parse_args()
    try:
        tensors, metadata, raw = load(args.file)
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.weights_only:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    total = 0.0
    for name, t in tensors.items():
        s = t.to(torch.float64).sum().item() if t.numel() else 0.0
        total += s
        digest = hashlib.sha256(raw[name]).hexdigest()[:16]
        print(f"{name}\t{str(t.dtype).replace('torch.', '')}\t{list(t.shape)}\tsum={s!r}\tsha256={digest}")
    print(f"{len(tensors)} tensors, total sum={total!r}")
    for key in sorted(metadata):
        print(f"metadata {key}" + (f" = {metadata[key]}" if args.metadata else f" ({len(metadata[key])} chars)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
