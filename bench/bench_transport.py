"""Framework overhead against the raw MQTT floor, measured side by side in one run.

- round trip through an echo agent (node process) vs a raw aiomqtt ping-pong (echo process),
  same broker, same payload, QoS 1, TCP_NODELAY on both;
- one-way small-message throughput into one agent vs raw aiomqtt publisher -> subscriber;
- node memory with 1 vs 100 idle agents.

It starts a private Mosquitto (``set_tcp_nodelay true``) on a free port unless ``--broker`` is given.

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

import aiomqtt
import torch

from aiflow_agents import BrokerURL, Client, NodeProcess, free_port
from aiflow_agents.connection import NODELAY
from protocols import Envelope, TensorPart, Topics


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


def _client(url: BrokerURL, ident: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        url.host,
        url.port,
        identifier=ident,
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
        max_inflight_messages=1000,
        max_concurrent_outgoing_calls=100000,
        timeout=60,
    )


async def raw_echo(url: BrokerURL, topic: str) -> None:
    """The raw baseline's responder: publishes every message back on ``topic/back``."""
    async with _client(url, f"echo-{uuid.uuid4().hex[:6]}") as c:
        await c.subscribe(topic, qos=1)
        async for m in c.messages:
            await c.publish(topic + "/back", m.payload, qos=1)


async def raw_sink(url: BrokerURL, topic: str, n: int) -> None:
    async with _client(url, f"sink-{uuid.uuid4().hex[:6]}") as c:
        await c.subscribe(topic, qos=0)
        await c.subscribe(topic + "/ctl", qos=1)
        got = 0
        t0 = None
        async for m in c.messages:
            if m.topic.value.endswith("/ctl"):
                await c.publish(topic + "/ready", b"1", qos=1)
                continue
            t0 = t0 or time.perf_counter()
            got += 1
            if got == n:
                print(json.dumps({"rate": (n - 1) / (time.perf_counter() - t0)}), flush=True)
                return


def spawn_py(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


async def rtt_raw(url: BrokerURL, size: int, n: int) -> list[float]:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    echo = spawn_py("--role", "raw-echo", "--broker", url.url(), "--topic", topic)
    try:
        async with _client(url, "pinger") as c:
            await c.subscribe(topic + "/back", qos=1)
            it = c.messages.__aiter__()
            while True:  # wait until the echo process is subscribed
                await c.publish(topic, b"hello?", qos=1)
                try:
                    await asyncio.wait_for(it.__anext__(), 0.5)
                    break
                except TimeoutError:
                    continue
            await asyncio.sleep(0.6)
            while len(c.messages):  # drain late handshake echoes
                await it.__anext__()
            payload = os.urandom(size)
            lat = []
            for i in range(n + 10):
                t0 = time.perf_counter()
                await c.publish(topic, payload, qos=1)
                await it.__anext__()
                if i >= 10:
                    lat.append(time.perf_counter() - t0)
            return lat
    finally:
        echo.kill()


async def rtt_framework(url: BrokerURL, size: int, n: int) -> list[float]:
    ns = f"b{uuid.uuid4().hex[:8]}"
    node = NodeProcess(["echo:e"], url, namespace=ns).start()
    try:
        async with Client(url, namespace=ns) as c:
            await c.wait_for_agents(["e"], timeout=60)
            # small payloads as text; big ones as a latent, the way the protocol carries them
            body = "x" * size if size < 4096 else TensorPart(tensor=torch.randint(0, 255, (size,), dtype=torch.uint8))
            env = Envelope.request(body)
            lat = []
            for i in range(n + 10):
                t0 = time.perf_counter()
                await c.request(
                    "e", env.model_copy(update={"id": uuid.uuid4().hex, "correlation_id": None}), timeout=30
                )
                if i >= 10:
                    lat.append(time.perf_counter() - t0)
            return lat
    finally:
        await node.astop()


async def tput_raw(url: BrokerURL, n: int) -> float:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    sink = spawn_py("--role", "raw-sink", "--broker", url.url(), "--topic", topic, "--n", str(n))
    async with _client(url, "pub") as c:
        await c.subscribe(topic + "/ready", qos=1)
        it = c.messages.__aiter__()
        while True:  # wait until the sink is subscribed
            await c.publish(topic + "/ctl", b"?", qos=1)
            try:
                await asyncio.wait_for(it.__anext__(), 0.5)
                break
            except TimeoutError:
                continue
        payload = os.urandom(100)
        for _ in range(n):
            await c.publish(topic, payload, qos=0)
    out, _ = await asyncio.to_thread(sink.communicate, None, 120)
    return float(json.loads(out.strip().splitlines()[-1])["rate"])


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
            n = args.rtt_n if size < 1000 else max(20, args.rtt_n // 10)
            raw = await rtt_raw(url, size, n)
            fw = await rtt_framework(url, size, n)
            row = {
                "payload": size,
                "raw_p50_ms": pct(raw, 0.5),
                "raw_p99_ms": pct(raw, 0.99),
                "aiflow_p50_ms": pct(fw, 0.5),
                "aiflow_p99_ms": pct(fw, 0.99),
                "ratio_p50": statistics.median(fw) / statistics.median(raw),
            }
            rtt.append(row)
            print(
                f"rtt {size:>8} B: raw p50 {row['raw_p50_ms']:.2f} ms | aiflow p50 {row['aiflow_p50_ms']:.2f} ms "
                f"| ratio {row['ratio_p50']:.2f}"
            )
        result["rtt"] = rtt
        raw_rate = await tput_raw(url, args.tput_n)
        fw_rate = await tput_framework(url, args.tput_n)
        result["throughput"] = {"raw_msgs_per_s": raw_rate, "aiflow_msgs_per_s": fw_rate, "ratio": fw_rate / raw_rate}
        print(f"one-way 100 B: raw {raw_rate:.0f} msg/s | aiflow {fw_rate:.0f} msg/s | ratio {fw_rate / raw_rate:.2f}")
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
    ap.add_argument("--role", default="bench", choices=["bench", "raw-echo", "raw-sink"])
    ap.add_argument("--broker", default=None)
    ap.add_argument("--topic", default="")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--rtt-n", type=int, default=300)
    ap.add_argument("--tput-n", type=int, default=5000)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.role == "raw-echo":
        asyncio.run(raw_echo(BrokerURL.parse(a.broker), a.topic))
    elif a.role == "raw-sink":
        asyncio.run(raw_sink(BrokerURL.parse(a.broker), a.topic, a.n))
    else:
        res = asyncio.run(main(a))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
