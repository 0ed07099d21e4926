"""Ensemble fan-out over the bus: does wall time grow with the member count?

Members are scripted agents that each take ``--delay`` seconds, spread over two node processes.
A concurrent ensemble should take about as long as its slowest member, not the sum; the input is
published once to a group topic, so the manager's bytes on the wire do not grow with N either.

    python bench/bench_fanout.py --sizes 1,4,16,32,64 --delay 0.2 [--broker mqtt://127.0.0.1:1883]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from aiflow_agents import broker_scope
from aiflow_agents.testing import NodeProcess
from topologies import TopologyManager, ensemble


async def main(sizes: list[int], delay: float, repeat: int, broker: str | None, nodes: int) -> dict[str, object]:
    ns = f"bench{uuid.uuid4().hex[:8]}"
    biggest = max(sizes)
    ids = [f"w{i}" for i in range(biggest)]
    rows = []
    async with broker_scope(broker) as url:
        procs = [
            NodeProcess([f"scripted:{a}?answer=1&delay={delay}" for a in ids[k::nodes]], url, namespace=ns).start()
            for k in range(nodes)
        ]
        try:
            async with TopologyManager(url, namespace=ns) as mgr:
                await mgr.client.wait_for_agents(ids, timeout=120)
                for n in sizes:
                    pattern = ensemble(ids[:n], "vote")
                    await mgr.run(pattern, "warm-up", timeout=60)  # joins the group once
                    times, sent = [], []
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        r = await mgr.run(pattern, "task", timeout=60)
                        times.append(time.perf_counter() - t0)
                        assert r.ok, r.error
                        sent.append(sum(e.bytes for e in r.trace.events if e.kind == "request"))
                    rows.append(
                        {
                            "members": n,
                            "wall_ms_median": statistics.median(times) * 1e3,
                            "request_bytes": statistics.median(sent),
                        }
                    )
        finally:
            await asyncio.gather(*(p.astop() for p in procs))
    base = rows[0]["wall_ms_median"]
    print(f"{'members':>8} {'wall ms':>10} {'x one member':>13} {'request bytes':>14}")
    for r in rows:
        r["ratio_vs_first"] = r["wall_ms_median"] / base  # type: ignore[operator]
        print(
            f"{r['members']:>8} {r['wall_ms_median']:>10.1f} {r['ratio_vs_first']:>13.2f} {r['request_bytes']:>14.0f}"
        )
    return {"delay_s": delay, "broker": str(url), "rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16,32,64")
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--broker", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result = asyncio.run(main([int(s) for s in a.sizes.split(",")], a.delay, a.repeat, a.broker, a.nodes))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
