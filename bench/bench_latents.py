"""Big latents on the wire: float16 as is vs int8 vs top-k, through an echo agent over Mosquitto.

For each size (MiB of float16) and encoding it reports the frame size, the request/reply round
trip (median), the compress + decompress time, and what the encoding costs in accuracy:

- ``float16``: the latent as is (a hidden state, rows of 4096);
- ``int8``: the same hidden state as ``int8-rowwise`` (SPEC §17): int8 + float32 scales (``protocols.compress``);
  error: max |error| / max |value| and relative RMS error;
- ``topk``: a token distribution of the same float16 size (rows of a 32,768 vocabulary), top-k
  indices + values; error: probability mass outside the top k, and whether argmax survives.

It starts a private Mosquitto (``set_tcp_nodelay true``) unless ``--broker`` is given.

    python bench/bench_latents.py [--sizes 1,4,16] [--repeat 10] [--k 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from bench_transport import start_mosquitto

from aiflow_agents import BrokerURL, Client
from aiflow_agents.testing import NodeProcess
from protocols import Envelope, TensorPart, TensorRole, compress, decompress, encode
from protocols.compress import topk_mass_lost

HIDDEN = 4096
VOCAB = 32768


# row label -> SPEC §17 encoding (labels kept for the benchmark's history)
ENCODING = {"float16": "float16", "int8": "int8-rowwise", "topk": "topk"}


def _tensor(mib: float, width: int, role: TensorRole) -> TensorPart:
    rows = max(1, round(mib * 2**20 / (width * 2)))
    g = torch.Generator().manual_seed(0)
    t = torch.randn(rows, width, generator=g) * (4.0 if role == TensorRole.TOKEN_DISTRIBUTION else 1.0)
    return TensorPart(tensor=t.to(torch.float16), role=role)


def _error(method: str, original: torch.Tensor, restored: torch.Tensor, k: int) -> dict[str, float]:
    o, r = original.float(), restored.float()
    if method == "topk":
        return {
            "mass_outside_topk": topk_mass_lost(original, k),
            "argmax_agreement": float((o.argmax(-1) == r.argmax(-1)).float().mean()),
        }
    diff = r - o
    return {
        "max_abs_err_rel": float(diff.abs().max() / o.abs().max().clamp_min(1e-12)),
        "rel_rms_err": float(diff.pow(2).mean().sqrt() / o.pow(2).mean().sqrt().clamp_min(1e-12)),
    }


async def run(url: BrokerURL, sizes: list[float], repeat: int, k: int) -> list[dict[str, Any]]:
    ns = f"bl{uuid.uuid4().hex[:8]}"
    node = NodeProcess(["echo:e"], url, namespace=ns, extra_args=["--log-level", "error"]).start()
    rows: list[dict[str, Any]] = []
    try:
        async with Client(url, namespace=ns, default_timeout=120) as c:
            await c.wait_for_agents(["e"], timeout=60)
            for mib in sizes:
                hidden = _tensor(mib, HIDDEN, TensorRole.HIDDEN_STATE)
                dist = _tensor(mib, VOCAB, TensorRole.TOKEN_DISTRIBUTION)
                cases = {"float16": hidden, "int8": hidden, "topk": dist}
                times: dict[str, dict[str, list[float]]] = {m: {"rtt": [], "c": [], "d": []} for m in cases}
                frames: dict[str, int] = {}
                restored: dict[str, torch.Tensor] = {}
                # round robin over the encodings, so that machine noise hits all of them alike
                for i in range(repeat + 1):  # the first round warms up
                    for method, part in cases.items():
                        t0 = time.perf_counter()
                        parts = compress(part, ENCODING[method], k=k)
                        t1 = time.perf_counter()
                        env = Envelope.request("latent", *parts, sender="bench")
                        frames[method] = len(encode(env))
                        t2 = time.perf_counter()
                        reply = await c.request("e", env)
                        t3 = time.perf_counter()
                        got = [p for p in reply.parts if isinstance(p, TensorPart)]
                        restored[method] = decompress(got).tensor
                        t4 = time.perf_counter()
                        if i:
                            times[method]["c"].append(t1 - t0)
                            times[method]["rtt"].append(t3 - t2)
                            times[method]["d"].append(t4 - t3)
                for method, part in cases.items():
                    row = {
                        "mib_float16": mib,
                        "method": method,
                        "shape": list(part.tensor.shape),
                        "frame_bytes": frames[method],
                        "bytes_vs_float16": frames[method] / (part.nbytes or 1),
                        "rtt_p50_ms": statistics.median(times[method]["rtt"]) * 1e3,
                        "compress_ms": statistics.median(times[method]["c"]) * 1e3,
                        "decompress_ms": statistics.median(times[method]["d"]) * 1e3,
                        **_error(method, part.tensor, restored[method], k),
                    }
                    row["total_ms"] = row["rtt_p50_ms"] + row["compress_ms"] + row["decompress_ms"]
                    rows.append(row)
                    errs = " ".join(
                        f"{key} {row[key]:.4g}" for key in row if "err" in key or "mass" in key or "arg" in key
                    )
                    print(
                        f"{mib:>5g} MiB {method:<8} frame {frames[method] / 2**20:7.3f} MiB "
                        f"({row['bytes_vs_float16']:.3f}x) rtt p50 {row['rtt_p50_ms']:8.2f} ms "
                        f"compress {row['compress_ms']:6.2f} ms decompress {row['decompress_ms']:6.2f} ms "
                        f"total {row['total_ms']:8.2f} ms {errs}",
                        flush=True,
                    )
    finally:
        await node.astop()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16", help="MiB of float16, comma-separated")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--k", type=int, default=64, help="top-k entries kept per row")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for compress/decompress")
    ap.add_argument("--broker", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",") if s]
    # Element-wise work on a few MiB gains nothing from torch's thread pool on a shared 2-core host:
    # it lost 20x to contention (int8 compress of 4 MiB: 54 ms with 2 threads, 2.8 ms with 1).
    torch.set_num_threads(a.threads)
    mosq = None
    url = BrokerURL.parse(a.broker) if a.broker else None
    if url is None:
        mosq, url = start_mosquitto()
    try:
        rows = asyncio.run(run(url, sizes, max(1, a.repeat), a.k))
    finally:
        if mosq is not None:
            mosq.terminate()
    result = {"broker": "private mosquitto" if mosq else str(url), "k": a.k, "threads": a.threads, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
