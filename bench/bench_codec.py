"""How much the v1 codec costs next to the floor (one memory copy) and the obvious alternative
(torch.save/torch.load), for a hidden state of the size one LLM turn ships.

    PYTHONPATH=. python bench/bench_codec.py [--repeat 50] [--shape 1 512 4096] [--json out.json]

Encoding costs one copy of the tensor bytes into the frame; decoding should cost none (the
tensor is a view over the payload), so encode+decode should land close to one memcpy.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from protocols import Envelope, TensorPart, TensorRole, decode, encode


def _median_s(fn: Callable[[], Any], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(shape: tuple[int, ...], repeat: int) -> dict[str, Any]:
    torch.manual_seed(0)
    tensor = torch.randn(shape, dtype=torch.float32).to(torch.float16)
    nbytes = tensor.numel() * tensor.element_size()
    env = Envelope.request("prompt", TensorPart(tensor=tensor, role=TensorRole.HIDDEN_STATE), sender="bench")
    frame = encode(env)

    # correctness and zero-copy, checked once outside the timing
    part = decode(frame).parts[1]
    assert isinstance(part, TensorPart) and torch.equal(part.tensor, tensor)
    lo = torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
    zero_copy = lo <= part.tensor.data_ptr() and part.tensor.data_ptr() + nbytes <= lo + len(frame)

    raw = memoryview(tensor.numpy()).cast("B")

    def memcpy() -> None:
        bytearray(raw)

    def codec_encode() -> None:
        encode(env)

    def codec_decode() -> None:
        decode(frame)

    def codec_round_trip() -> None:
        decode(encode(env))

    def torch_round_trip() -> None:
        buf = io.BytesIO()
        torch.save(tensor, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)  # our own bytes, and weights_only even so

    timings = {
        "memcpy": _median_s(memcpy, repeat),
        "encode": _median_s(codec_encode, repeat),
        "decode": _median_s(codec_decode, repeat),
        "encode_decode": _median_s(codec_round_trip, repeat),
        "torch_save_load": _median_s(torch_round_trip, repeat),
    }
    return {
        "shape": list(shape),
        "dtype": "float16",
        "tensor_bytes": nbytes,
        "frame_bytes": len(frame),
        "repeat": repeat,
        "median_s": timings,
        "ratio_encode_decode_vs_memcpy": timings["encode_decode"] / timings["memcpy"],
        "ratio_torch_save_load_vs_encode_decode": timings["torch_save_load"] / timings["encode_decode"],
        "decode_zero_copy": zero_copy,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (median reported)")
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 512, 4096], help="float16 tensor shape")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    r = run(tuple(args.shape), args.repeat)
    mib = r["tensor_bytes"] / 2**20
    print(f"float16 {tuple(r['shape'])}: {mib:.2f} MiB of tensor data, frame {r['frame_bytes']} bytes")
    print(f"median of {r['repeat']} runs:")
    for name, seconds in r["median_s"].items():
        print(f"  {name:<16} {seconds * 1e3:9.3f} ms   {mib / seconds / 1024:7.2f} GiB/s")
    print(f"encode+decode / memcpy:          {r['ratio_encode_decode_vs_memcpy']:.2f}x")
    print(f"torch.save+load / encode+decode: {r['ratio_torch_save_load_vs_encode_decode']:.2f}x")
    print(f"decode is zero-copy:             {r['decode_zero_copy']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if r["decode_zero_copy"] else 1


if __name__ == "__main__":
    sys.exit(main())
