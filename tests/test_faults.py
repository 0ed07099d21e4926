"""Faults while work is in flight: a node killed mid-run, the broker restarted mid-run, duplicate
replies, and a flood into a slow node — nothing hangs, runs say what happened, memory stays bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from aiflow_agents import AgentLostError, BrokerURL, Client, ConnectionLostError, Exchange, Message, RemoteAgentError
from protocols import Envelope, TensorPart, Topics, decode, encode
from topologies import TopologyManager, cascade, ensemble

pytestmark = pytest.mark.timeout(120)


async def test_node_killed_during_an_ensemble(broker: BrokerURL, namespace: str, spawn) -> None:
    doomed = spawn(["scripted:k1?answer=7&delay=1.5"], broker, namespace)
    spawn(["scripted:k2?answer=7&delay=0.3", "scripted:k3?answer=5&delay=0.3"], broker, namespace)
    members = ["k1", "k2", "k3"]
    async with TopologyManager(broker, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(members, timeout=30)
        await mgr.ensure_group(members)  # joining is not part of what is timed below
        lenient = asyncio.create_task(mgr.run(ensemble(members, "weighted", weights={"k2": 2.0}), "q", timeout=60))
        strict = asyncio.create_task(mgr.run(ensemble(members, "vote", quorum=3), "q", timeout=60))
        await asyncio.sleep(0.6)  # every member has the request; k1 is inside its handler
        doomed.kill()
        async with asyncio.timeout(30):  # both runs end on the Last Will (agent_offline), not at their 60 s deadline
            ok, failed = await lenient, await strict
        assert not mgr.client.presence.is_online("k1")
        assert ok.ok and ok.answer == "7"
        assert "agent_offline" in ok.outcome.details["failed"]["k1"]
        assert not failed.ok and "quorum not met: 2 of 3" in (failed.error or "")
        assert "agent_offline" in failed.outcome.details["failed"]["k1"]
        assert failed.outcome.details["proposals"] == {"k1": None, "k2": "7", "k3": "5"}


async def test_node_killed_during_a_cascade_hop(broker: BrokerURL, namespace: str, spawn) -> None:
    spawn(["scripted:dev?answer=1&confidence=0.3", "scripted:cloud?answer=3&confidence=1.0"], broker, namespace)
    edge = spawn(["scripted:edge?answer=2&confidence=0.9&delay=2.0"], broker, namespace)
    async with TopologyManager(broker, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["dev", "edge", "cloud"], timeout=30)
        run = asyncio.create_task(
            mgr.run(cascade(["dev", "edge", "cloud"], accept=0.8, hop_timeout=1.5), "hard?", timeout=60)
        )
        await asyncio.sleep(0.6)  # dev has forwarded the task straight to edge, which is working on it
        edge.kill()
        async with asyncio.timeout(30):  # falls through at the hop deadline, not the run's 60 s
            r = await run
        assert r.ok and r.answer == "3" and r.answered_by == "cloud"
        stages = r.outcome.details["stages"]
        assert [s["member"] for s in stages] == ["dev", "edge", "cloud"]
        assert stages[0]["answer"] == "1" and "timeout" in stages[1]["error"] and stages[2]["answer"] == "3"
        kinds = [(e["sender"], e["recipient"], e["kind"]) for e in r.trace.to_list()]
        assert ("dev", "edge", "forward") in kinds and ("edge", "manager", "timeout") in kinds


async def test_broker_restart_mid_run(private_mosquitto, namespace: str, spawn) -> None:
    url = private_mosquitto.url
    spawn(["scripted:r1?answer=1&delay=1.0"], url, namespace)
    spawn(["scripted:r2?answer=1&delay=1.0"], url, namespace)
    g = ensemble(["r1", "r2"], "vote")
    async with TopologyManager(url, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["r1", "r2"], timeout=30)
        assert (await mgr.run(g, "before", timeout=10)).ok  # also joins both to the group topic
        run = asyncio.create_task(mgr.run(g, "during", timeout=60))
        direct = asyncio.create_task(mgr.client.request("r1", "direct", timeout=60))
        await asyncio.sleep(0.3)
        private_mosquitto.stop()
        # In-flight work fails with a clear reason well before its 60 s deadline; the run says so.
        async with asyncio.timeout(30):
            during = await run
            # Mosquitto publishes its clients' Wills as it shuts down: whichever news comes first
            # (the node's Will or our own connection's end) fails the request.
            with pytest.raises((ConnectionLostError, AgentLostError)):
                await direct
        assert not during.ok and "quorum not met: 0 of 2" in (during.error or "")
        assert all("connection_lost" in e for e in during.outcome.details["failed"].values())

        await asyncio.sleep(0.5)
        private_mosquitto.start()  # a fresh broker: no sessions, no retained presence
        t_restart = time.time()
        await mgr.client.connection.wait_connected(timeout=15)

        def back(agent: str) -> bool:  # the node re-announced itself after the restart
            return any(rec.ts >= t_restart for rec in mgr.client.presence.hosts(agent))

        async with asyncio.timeout(20):
            while not (back("r1") and back("r2")):
                await asyncio.sleep(0.05)
        # Fan-out works again with no re-join: the nodes restored their group subscriptions.
        after = await mgr.run(g, "after", timeout=10)
        assert after.ok and after.answer == "1"
        events = after.trace.to_list()
        assert [e["via"] for e in events if e["kind"] == "request"] == ["group"]
        assert sorted(e["sender"] for e in events if e["kind"] == "reply") == ["r1", "r2"]
        assert mgr.client.connection.connects >= 2


async def test_duplicate_reply_is_ignored(memory: BrokerURL, namespace: str) -> None:
    """A QoS 1 redelivery of a reply: the request returns once; the copy is counted, not delivered.
    (Client semantics: on the in-memory broker.)"""
    topics = Topics(namespace)
    async with Client(memory, namespace=namespace) as c, Client(memory, namespace=namespace) as fake:

        async def answer_twice(message: Message) -> None:
            req = decode(message.payload)  # type: ignore[arg-type]
            frame = encode(req.reply(f"answer to {req.text}", sender="dup"))
            assert req.reply_to is not None
            await fake.connection.publish(req.reply_to, frame, qos=1)
            await fake.connection.publish(req.reply_to, frame, qos=1)

        fake.connection.route(topics.inbox("dup"), answer_twice)
        await fake.connection.subscribe(topics.inbox("dup"))
        done: list[Exchange] = []
        c.on_exchange.append(done.append)
        first = await c.request("dup", "one", timeout=10, check_presence=False)
        async with asyncio.timeout(5):
            while c.stats["late_or_duplicate_replies"] < 1:
                await asyncio.sleep(0.02)
        second = await c.request("dup", "two", timeout=10, check_presence=False)
        assert (first.text, second.text) == ("answer to one", "answer to two")
        assert second.correlation_id == done[1].request.correlation_id  # not the first's leftover copy
        async with asyncio.timeout(5):
            while c.stats["late_or_duplicate_replies"] < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert len(done) == 2 and c.stats["late_or_duplicate_replies"] == 2
        # A copy that arrives while its conversation is still open (a fan-out waiting for two
        # members) is not taken for a second member's answer.
        _req, _size, replies, timed_out = await c.scatter(topics.inbox("dup"), "three", expected=2, timeout=1.0)
        assert [r.text for r, _ in replies] == ["answer to three"] and timed_out
        assert c.stats["late_or_duplicate_replies"] == 3


def _rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


async def test_slow_node_under_a_flood_stays_bounded(private_mosquitto, namespace: str, spawn) -> None:
    """2 handlers running + 8 waiting; 1500 requests of 32 KiB each (47 MiB offered) arrive at once:
    everything beyond the bound is refused with ``overloaded`` and the node's memory barely moves."""
    url = private_mosquitto.url
    node = spawn(
        ["scripted:slow?delay=0.2&answer=ok"], url, namespace, extra_args=["--concurrency", "2", "--max-pending", "8"]
    )
    n, payload = 1500, torch.zeros(8192)  # 32 KiB of float32 per request
    async with Client(url, namespace=namespace) as c:
        await c.wait_for_agents(["slow"], timeout=30)
        assert node.pid is not None
        for _ in range(3):  # warm the node's code paths before the baseline
            await c.request("slow", Envelope.request(TensorPart(tensor=payload)), timeout=10)
        baseline = _rss_mb(node.pid)["VmRSS"]
        peak = baseline
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_mb(node.pid)["VmRSS"])  # type: ignore[arg-type]
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        exchanges = await asyncio.gather(
            *(c.exchange("slow", Envelope.request(TensorPart(tensor=payload)), timeout=60) for _ in range(n))
        )
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
        hwm = _rss_mb(node.pid)["VmHWM"]
    ok = sum(e.ok for e in exchanges)
    overloaded = sum(isinstance(e.error, RemoteAgentError) and e.error.code == "overloaded" for e in exchanges)
    # Every request got an answer (served or refused at once); none was lost or timed out.
    assert ok + overloaded == n, [str(e.error) for e in exchanges if not e.ok and e.error][:5]
    assert overloaded >= n * 0.8 and ok >= 10
    offered_mb = n * payload.numel() * 4 / 2**20
    growth = max(peak, hwm) - baseline
    print(f"flood: {n} x 32 KiB in {elapsed:.2f}s, ok={ok} overloaded={overloaded}, RSS +{growth:.1f} MiB")
    assert growth < offered_mb / 4, f"node RSS grew {growth:.1f} MiB for {offered_mb:.0f} MiB offered"


async def test_a_publish_the_broker_never_acknowledges_fails_at_its_timeout_not_later(private_mosquitto) -> None:
    """QoS 1 publishes await their PUBACK on a future with a timer: a frozen broker makes the
    publish fail with a typed error at its timeout, and the connection serves on once it thaws."""
    import signal

    from aiflow_agents import BrokerUnavailableError, Connection

    url = BrokerURL(host="127.0.0.1", port=private_mosquitto.port, protocol="5")
    async with Connection(url, client_id="frozen-test") as conn:
        await conn.publish("t/ok", b"x", qos=1, timeout=5)
        private_mosquitto.proc.send_signal(signal.SIGSTOP)
        try:
            async with asyncio.timeout(15):  # a publish without its timer would hang here
                with pytest.raises(BrokerUnavailableError):
                    await conn.publish("t/frozen", b"x", qos=1, timeout=0.5)
        finally:
            private_mosquitto.proc.send_signal(signal.SIGCONT)
        await conn.publish("t/thawed", b"x", qos=1, timeout=10)
