"""Framework overhead against the raw MQTT floor, measured side by side in one run.

- round trip through an echo agent (node process) vs a raw aiomqtt ping-pong (echo process),
  same broker, same payload, QoS 1, TCP_NODELAY on both. The two alternate in blocks (all
  processes stay up), and the ratio reported is the median of the per-block p50 ratios: on a
  shared machine absolute latency drifts by tens of percent within a minute;
- one-way small-message throughput into one agent vs raw aiomqtt publisher -> subscriber and
  raw paho (its own network threads), alternating for ``--rounds`` rounds (median ratio);
- node memory with 1 vs 100 idle agents.

The baseline runs in processes of its own from ``raw_mqtt.py``: stock aiomqtt and paho. The framework
uses its own MQTT client (``aiflow_agents.mqtt``), no paho. It starts a private Mosquitto
(``set_tcp_nodelay true``) on a free port unless ``--broker`` is given.

    python bench/bench_transport.py [--rtt-n 300] [--tput-n 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from aiflow_agents import BrokerURL, Client
from aiflow_agents.testing import NodeProcess, free_port
from protocols import Envelope, TensorPart, Topics, new_id

RAW = Path(__file__).resolve().parent / "raw_mqtt.py"


def start_mosquitto() -> tuple[subprocess.Popen[bytes], BrokerURL]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix="bench-mosq-"))
    user = "user root\n" if os.geteuid() == 0 else ""
    (d / "m.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        f"max_queued_messages 1000000\n{user}"
    )
    proc = subprocess.Popen([exe, "-c", str(d / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, BrokerURL(port=port, protocol="5")


def raw(role: str, url: BrokerURL, topic: str, *args: object) -> subprocess.Popen[str]:
    """A baseline process (stock aiomqtt/paho, see raw_mqtt.py)."""
    return subprocess.Popen(
        [sys.executable, str(RAW), role, url.host, str(url.port), topic, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def _line(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    if not line:
        raise RuntimeError(f"baseline process exited with {proc.wait()}")
    return line


async def rtt_pair(url: BrokerURL, size: int, n: int, blocks: int) -> dict[str, Any]:
    """Raw and framework round trips, alternating in ``blocks`` blocks of about n/blocks each."""
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    ns = f"b{uuid.uuid4().hex[:8]}"
    echo = raw("echo", url, topic)
    pinger = raw("pinger", url, topic, size)
    node = NodeProcess(["echo:e"], url, namespace=ns).start()
    per_block = max(1, n // blocks)
    raw_all: list[float] = []
    fw_all: list[float] = []
    ratios: list[float] = []

    async def raw_block(k: int) -> list[float]:
        assert pinger.stdin is not None
        pinger.stdin.write(f"{k}\n")
        pinger.stdin.flush()
        return [float(x) for x in json.loads(await _line(pinger))]

    try:
        async with Client(url, namespace=ns) as c:
            await c.wait_for_agents(["e"], timeout=60)
            assert (await _line(pinger, 60)).strip() == "ready"
            # small payloads as text; big ones as a latent, the way the protocol carries them
            body = "x" * size if size < 4096 else TensorPart(tensor=torch.randint(0, 255, (size,), dtype=torch.uint8))
            env = Envelope.request(body)

            async def fw_block(k: int) -> list[float]:
                lat = []
                for _ in range(k):
                    t0 = time.perf_counter()
                    await c.request("e", env.model_copy(update={"id": new_id(), "correlation_id": None}), timeout=30)
                    lat.append(time.perf_counter() - t0)
                return lat

            await raw_block(min(20, per_block))  # warm both paths
            await fw_block(min(20, per_block))
            for _ in range(blocks):
                r = await raw_block(per_block)
                f = await fw_block(per_block)
                raw_all += r
                fw_all += f
                ratios.append(statistics.median(f) / statistics.median(r))
    finally:
        for p in (pinger, echo):
            p.kill()
            p.wait()
        await node.astop()
    return {
        "payload": size,
        "n_each": len(raw_all),
        "blocks": blocks,
        "raw_p50_ms": pct(raw_all, 0.5),
        "raw_p99_ms": pct(raw_all, 0.99),
        "aiflow_p50_ms": pct(fw_all, 0.5),
        "aiflow_p99_ms": pct(fw_all, 0.99),
        "block_ratios": ratios,
        "ratio_p50": statistics.median(ratios),
    }


async def tput_raw(url: BrokerURL, n: int, kind: str = "aiomqtt") -> float:
    """Publisher process -> subscriber process, stock aiomqtt or paho; the subscriber's rate."""
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    prefix = "paho-" if kind == "paho" else ""
    sink = raw(prefix + "sink", url, topic, n)
    publisher = raw(prefix + "pub", url, topic, n)
    try:
        return float(json.loads(await _line(sink, 300))["rate"])
    finally:
        for p in (publisher, sink):
            p.kill()
            p.wait()


async def tput_framework(url: BrokerURL, n: int) -> float:
    """One-way requests (no reply address) into a counting agent."""
    ns = f"b{uuid.uuid4().hex[:8]}"
    node = NodeProcess(["scripted:sink?answer=ok"], url, namespace=ns, extra_args=["--log-level", "error"]).start()
    try:
        async with Client(url, namespace=ns, qos=0) as c:
            await c.wait_for_agents(["sink"], timeout=60)
            topic = Topics(ns).inbox("sink")
            t0 = time.perf_counter()
            for i in range(n):
                env = Envelope.request("x" * 100, sender="bench", id=f"m{i}")
                await c.publish(topic, env, qos=0)
            # a final request with a reply address returns once the node has drained its inbox
            await c.request("sink", "done?", timeout=120)
            return n / (time.perf_counter() - t0)
    finally:
        await node.astop()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def memory(url: BrokerURL, agents: int) -> float:
    ns = f"b{uuid.uuid4().hex[:8]}"
    ids = [f"a{i}" for i in range(agents)]
    node = NodeProcess([f"echo:{a}" for a in ids], url, namespace=ns).start()
    try:
        async with Client(url, namespace=ns) as c:
            await c.wait_for_agents(ids, timeout=120)
            await asyncio.sleep(0.5)
            assert node.pid is not None
            return rss_kb(node.pid) / 1024
    finally:
        await node.astop()


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3


async def main(args: argparse.Namespace) -> dict[str, object]:
    mosq = None
    url = BrokerURL.parse(args.broker) if args.broker else None
    if url is None:
        mosq, url = start_mosquitto()
    try:
        result: dict[str, object] = {"broker": str(url)}
        rtt = []
        for size in (100, 1 << 20):
            n = args.rtt_n if size < 1000 else max(4 * args.blocks, args.rtt_n // 8)
            row = await rtt_pair(url, size, n, args.blocks)
            rtt.append(row)
            print(
                f"rtt {size:>8} B: raw p50 {row['raw_p50_ms']:.2f} ms | aiflow p50 {row['aiflow_p50_ms']:.2f} ms "
                f"| ratio {row['ratio_p50']:.2f} (median of {row['blocks']} blocks: "
                + " ".join(f"{r:.2f}" for r in row["block_ratios"])
                + ")"
            )
        result["rtt"] = rtt
        rounds: list[dict[str, float]] = []
        for _ in range(args.rounds):
            raw_rate = await tput_raw(url, args.tput_n)
            paho_rate = await tput_raw(url, args.tput_n, kind="paho")
            fw_rate = await tput_framework(url, args.tput_n)
            rounds.append({"raw": raw_rate, "paho": paho_rate, "aiflow": fw_rate, "ratio": fw_rate / raw_rate})
        med = {k: statistics.median(r[k] for r in rounds) for k in ("raw", "paho", "aiflow", "ratio")}
        result["throughput"] = {
            "raw_msgs_per_s": med["raw"],
            "raw_threaded_msgs_per_s": med["paho"],  # paho with its own network thread
            "aiflow_msgs_per_s": med["aiflow"],
            "ratio": med["ratio"],
            "ratio_vs_paho": med["aiflow"] / med["paho"],
            "rounds": rounds,
        }
        print(
            f"one-way 100 B: raw aiomqtt {med['raw']:.0f} msg/s | raw paho {med['paho']:.0f} msg/s | "
            f"aiflow {med['aiflow']:.0f} msg/s | ratio vs aiomqtt {med['ratio']:.2f} (median of {args.rounds} rounds)"
        )
        one, many = await memory(url, 1), await memory(url, args.agents)
        per = (many - one) / (args.agents - 1) * 1024
        result["memory"] = {"rss_mb_1_agent": one, f"rss_mb_{args.agents}_agents": many, "kb_per_agent": per}
        print(f"node RSS: 1 agent {one:.1f} MB | {args.agents} agents {many:.1f} MB | {per:.0f} KB per agent")
        return result
    finally:
        if mosq is not None:
            mosq.terminate()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=None)
    ap.add_argument("--rtt-n", type=int, default=1200, help="100 B round trips of each kind (1 MiB: an 8th)")
    ap.add_argument("--tput-n", type=int, default=5000)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=6, help="alternating raw/framework blocks per round-trip size")
    ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = asyncio.run(main(a))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
