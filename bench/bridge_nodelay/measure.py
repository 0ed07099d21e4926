"""Small request/reply across a Mosquitto bridge vs on one broker, with and without TCP_NODELAY
forced on the bridge's outgoing socket (nodelay_shim.c via LD_PRELOAD on the device broker only).

    python bench/bridge_nodelay/measure.py [round trips]

Needs mosquitto and gcc. Starts its own brokers on free ports and stops them by pid.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from brokers import BridgedMosquittos  # noqa: E402

from aiflow_agents import Client  # noqa: E402
from aiflow_agents.testing import NodeProcess  # noqa: E402


async def median_ms(client: Client, agent: str, n: int) -> tuple[float, float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.request(agent, f"ping {i}", timeout=10)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


async def run(preload: str | None, n: int, work: Path) -> dict[str, tuple[float, float]]:
    bridged = BridgedMosquittos(work, preload=preload).start()
    nodes = [
        NodeProcess(["echo:far"], bridged.device_url, namespace="bench").start(),
        NodeProcess(["echo:near"], bridged.cloud_url, namespace="bench").start(),
    ]
    try:
        async with Client(bridged.cloud_url, namespace="bench") as client:
            await client.wait_for_agents(["far", "near"], timeout=30)
            await median_ms(client, "far", 10)  # warm up
            return {
                "across the bridge": await median_ms(client, "far", n),
                "one broker": await median_ms(client, "near", n),
            }
    finally:
        for p in nodes:
            await p.astop()
        bridged.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "nodelay_shim.so"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(HERE / "nodelay_shim.c"), "-ldl"], check=True
        )
        for sub in ("plain", "forced"):
            (Path(tmp) / sub).mkdir()
        plain = asyncio.run(run(None, n, Path(tmp) / "plain"))
        forced = asyncio.run(run(str(shim), n, Path(tmp) / "forced"))
    print(f"{n} small (100 B) request/replies, QoS 1, client on the cloud broker; median / p99 ms")
    print("| path | bridge as shipped | TCP_NODELAY forced on the bridge socket |")
    print("|---|---|---|")
    for k in plain:
        print(f"| {k} | {plain[k][0]:.2f} / {plain[k][1]:.2f} | {forced[k][0]:.2f} / {forced[k][1]:.2f} |")
    print(
        f"ratio bridge/one broker: {plain['across the bridge'][0] / plain['one broker'][0]:.1f}x as shipped, "
        f"{forced['across the bridge'][0] / forced['one broker'][0]:.1f}x forced"
    )


if __name__ == "__main__":
    main()
