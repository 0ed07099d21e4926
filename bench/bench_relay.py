"""Relay of the shipped familial model (device -> edge -> cloud) against its deepest exit: accuracy,
share answered per tier, bytes per hop, float16 vs int8 latents; optionally over a real bus.

    PYTHONPATH=. python bench/bench_relay.py [--n 2000] [--seed 4711] [--thresholds 0.9 0.9]
        [--bus [N]] [--json out.json]

Thresholds default to the ones tuned on the tuning seed (weights/metrics.json). Use a seed that is
neither the training, tuning nor held-out seed of the model card to get a fresh sample.
``--bus N`` also sends N problems through device/edge/cloud agents on an in-process embedded
broker and reports the round-trip latency and the bytes each hop carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import torch

from aiflow_agents import configure_logging
from aiflow_agents.models import tasks as T
from aiflow_agents.models.familial import WEIGHTS_DIR, load_shipped, relay


def in_process(n: int, seed: int, thresholds: list[float]) -> dict[str, Any]:
    model = load_shipped("familial")
    items = T.generate_tasks(n, seed)
    prompts = [t.prompt for t in items]
    deep = model.generate(prompts, -1).answers
    deep_acc = sum(a == t.answer for a, t in zip(deep, items, strict=True)) / n
    out: dict[str, Any] = {"n": n, "seed": seed, "thresholds": thresholds, "deep_accuracy": deep_acc}
    for enc in ("float32", "float16", "bfloat16", "int8-rowwise"):
        t0 = time.perf_counter()
        r = relay(model, prompts, thresholds, enc)
        el = time.perf_counter() - t0
        acc = sum(a == t.answer for a, t in zip(r.answers, items, strict=True)) / n
        forced = relay(model, prompts, [2.0] * (model.n_exits - 1), enc).answers
        hop_bytes = sorted({b for per in r.latent_bytes for b in per})
        out[enc] = {
            "accuracy": acc,
            "ratio_to_deep": acc / deep_acc if deep_acc else None,
            "answered_share": {
                name: sum(b == i for b in r.answered_by) / n for i, name in enumerate(model.cfg.exit_names)
            },
            "bytes_per_hop": hop_bytes,
            "mean_bytes_per_item": sum(map(sum, r.latent_bytes)) / n,
            "mean_layers_per_item": sum(model.depth(b) for b in r.answered_by) / n,
            "forced_relay_equal_to_deep": sum(a == b for a, b in zip(forced, deep, strict=True)) / n,
            "seconds": round(el, 3),
        }
    return out


async def over_bus(n: int, seed: int, thresholds: list[float]) -> dict[str, Any]:
    from aiflow_agents import Client, EmbeddedBroker, Node
    from aiflow_agents.models.familial_agents import FamilialAgent
    from protocols import Envelope

    items = T.generate_tasks(n, seed)
    agents = [
        FamilialAgent("cloud", exit="cloud"),
        FamilialAgent("edge", exit="edge", next="cloud", threshold=thresholds[1]),
        FamilialAgent("device", exit="device", next="edge", threshold=thresholds[0]),
    ]
    async with EmbeddedBroker() as url:
        nodes = [await Node([a], url, namespace="bench").start() for a in agents]
        try:
            async with Client(url, namespace="bench") as c:
                await c.wait_for_agents(["device", "edge", "cloud"], timeout=20)
                lat, right, hops = [], 0, []
                for t in items:
                    t0 = time.perf_counter()
                    r = await c.request("device", Envelope.request(t.prompt), timeout=30)
                    lat.append((time.perf_counter() - t0) * 1000)
                    right += r.meta["answer"] == t.answer
                    hops.append(r.meta["bytes_per_hop"])
        finally:
            for node in nodes:
                await node.stop()
    return {
        "n": n,
        "accuracy": right / n,
        "latency_ms_median": statistics.median(lat),
        "latency_ms_p90": sorted(lat)[int(0.9 * (n - 1))],
        "hops_histogram": {k: sum(len(h) == k for h in hops) for k in range(3)},
        "bytes_per_hop": sorted({b for h in hops for b in h}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=4711)
    ap.add_argument("--thresholds", type=float, nargs="+")
    ap.add_argument("--bus", type=int, nargs="?", const=50, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    configure_logging("warning")  # keep stdout pure JSON
    ths = args.thresholds or json.loads((WEIGHTS_DIR / "metrics.json").read_text())["tuned"]["thresholds"]
    res: dict[str, Any] = {"in_process": in_process(args.n, args.seed, ths)}
    if args.bus:
        res["bus"] = asyncio.run(over_bus(args.bus, args.seed, ths))
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
