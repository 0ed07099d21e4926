"""Deployments beyond one broker, started by the tests themselves: two Mosquittos bridged
device <-> cloud, and a 3-member NATS cluster with MQTT listeners. Nodes run in separate processes.

Times are measured and printed (run with ``-s``), and recorded in docs/deployment.md; assertions
are on behaviour, with generous bounds only where the issue asks for a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from brokers import BridgedMosquittos, NatsCluster, listening

from aiflow_agents import AgentSpec, AgentUnavailableError, BrokerURL, Client
from aiflow_agents.errors import AiflowError
from topologies import TopologyManager, cascade, ensemble

pytestmark = pytest.mark.timeout(180)

BEAT = 0.5  # node heartbeat interval in these tests (seconds)
MISSES = 3  # beats a client waits before it counts a silent node as offline


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[BridgedMosquittos]:
    b = BridgedMosquittos(tmp_path)
    try:
        yield b.start()
    finally:
        b.stop()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path)
    try:
        c.start()
        for i in range(len(c.members)):
            asyncio.run(mqtt_ready(c.url(i), 60))
        yield c
    finally:
        c.stop()


async def mqtt_ready(url: BrokerURL, timeout: float) -> float:
    """Until a clean MQTT 3.1.1 session can connect and subscribe at QoS 1 (NATS needs JetStream
    up for that); returns the seconds it took."""
    t0 = time.monotonic()
    connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x1e\x00\x04prbe"
    subscribe = b"\x82\x0a\x00\x01\x00\x05probe\x01"
    while True:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            r, w = await asyncio.open_connection(url.host, url.port)
            try:
                async with asyncio.timeout(5):
                    w.write(connect)
                    connack = await r.readexactly(4)
                    if connack[3] == 0:
                        w.write(subscribe)
                        suback = await r.readexactly(5)
                        if suback[0] == 0x90 and suback[4] != 0x80:
                            w.write(b"\xe0\x00")
                            return time.monotonic() - t0
            finally:
                w.close()
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{url} accepted no MQTT session within {timeout} s")
        await asyncio.sleep(0.2)


def ids(*nodes: list[str]) -> list[str]:
    return [AgentSpec.parse(a).agent_id or AgentSpec.parse(a).type_name for agents in nodes for a in agents]


@contextlib.asynccontextmanager
async def manager(url: BrokerURL | str, namespace: str, agents: list[str]) -> AsyncIterator[TopologyManager]:
    async with TopologyManager(url, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(agents, timeout=60)
        yield mgr


async def round_trips(client: Client, agent: str, n: int = 20) -> float:
    """Median milliseconds of ``n`` small request/replies."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.request(agent, f"ping {i}", timeout=10)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


DEVICE = ["scripted:dev?answer=1&confidence=0.3", "scripted:a1?answer=7", "echo:dev-echo"]
CLOUD = ["scripted:edge?answer=2&confidence=0.9", "scripted:a2?answer=7", "scripted:a3?answer=5", "echo:cloud-echo"]


async def check_patterns(mgr: TopologyManager, label: str) -> None:
    """Request/reply, one group fan-out (ensemble) and one cascade hop, each spanning both sides."""
    assert (await mgr.client.request("dev", "across", timeout=10)).text == "1"
    assert (await mgr.client.request("edge", "near", timeout=10)).text == "2"
    r = await mgr.run(ensemble(["a1", "a2", "a3"], "vote"), "3+4?", timeout=20)
    assert r.ok and r.answer == "7", r.error
    assert sorted(e["sender"] for e in r.trace.to_list() if e["kind"] == "reply") == ["a1", "a2", "a3"]
    c = await mgr.run(cascade(["dev", "edge"], accept="confidence>=0.8"), "hard?", timeout=20)
    assert c.ok and c.answered_by == "edge"
    assert ("dev", "edge", "forward") in [(e["sender"], e["recipient"], e["kind"]) for e in c.trace.to_list()]
    print(f"{label}: request/reply, ensemble over a group topic and a cascade hop all crossed")


async def test_bridged_mosquittos_carry_every_pattern(bridged: BridgedMosquittos, namespace: str, spawn) -> None:
    spawn(DEVICE, bridged.device_url, namespace, tier="device")
    spawn(CLOUD, bridged.cloud_url, namespace, tier="cloud")
    async with manager(bridged.cloud_url, namespace, ids(DEVICE, CLOUD)) as mgr:
        await check_patterns(mgr, "bridge, manager on the cloud broker")
        across = await round_trips(mgr.client, "dev-echo")
        local = await round_trips(mgr.client, "cloud-echo")
    async with manager(bridged.device_url, namespace, ids(DEVICE, CLOUD)) as mgr:
        await check_patterns(mgr, "bridge, manager on the device broker")
    # Mosquitto 2.0.11 leaves Nagle on for the bridge's own socket: see docs/deployment.md.
    print(f"small request/reply, median of 20: across the bridge {across:.1f} ms, one broker {local:.1f} ms")


async def test_nats_cluster_carries_every_pattern(nats: NatsCluster, namespace: str, spawn) -> None:
    spawn(DEVICE, nats.url(0), namespace)
    spawn(CLOUD, nats.url(1), namespace)
    async with manager(nats.url(2), namespace, ids(DEVICE, CLOUD)) as mgr:
        await check_patterns(mgr, "NATS cluster, nodes on members 0 and 1, manager on member 2")
        across = await round_trips(mgr.client, "dev-echo")
    print(f"small request/reply across NATS members, median of 20: {across:.1f} ms")


async def timed(coro_factory, until: float, pause: float = 0.25) -> tuple[float, object]:
    """Retry ``coro_factory()`` until it returns without an AiflowError; (seconds, result)."""
    t0 = time.monotonic()
    while True:
        try:
            return time.monotonic() - t0, await coro_factory()
        except AiflowError:
            if time.monotonic() - t0 > until:
                raise
            await asyncio.sleep(pause)


@pytest.mark.slow
async def test_node_and_client_fail_over_to_another_nats_member(nats: NatsCluster, namespace: str, spawn) -> None:
    """A node and a client given every member keep working after the member they were on dies."""
    spawn(["echo:roamer"], nats.url_list(first=0), namespace, extra_args=["--heartbeat", str(BEAT)])
    async with Client(nats.url_list(first=0), namespace=namespace) as client:
        await client.wait_for_agents(["roamer"], timeout=60)
        assert (await client.request("roamer", "before", timeout=10)).text == "before"
        nats.members[0].kill()
        t_dead = time.monotonic()
        # NATS itself decides when the survivors take MQTT sessions again (JetStream re-elects its stream
        # leaders): 10-80 s measured here under load, hence the generous bound.
        took, reply = await timed(lambda: client.request("roamer", "after", timeout=3), until=240)
        assert reply.text == "after"  # type: ignore[attr-defined]
    print(
        f"NATS member killed: node and client served again after {took:.1f} s "
        f"(first successful request {time.monotonic() - t_dead:.1f} s after the kill)"
    )


async def test_agents_behind_a_dead_bridged_broker_go_offline(
    bridged: BridgedMosquittos, namespace: str, spawn
) -> None:
    """The device broker dies: no Will reaches the cloud, heartbeats stop; the cloud-side client
    sees the device's agents offline after ~MISSES beats, and the request in flight fails typed."""
    node = spawn(
        ["echo:far", "scripted:stuck?hang=true"], bridged.device_url, namespace, extra_args=["--heartbeat", str(BEAT)]
    )
    async with Client(bridged.cloud_url, namespace=namespace, heartbeat_misses=MISSES) as client:
        await client.wait_for_agents(["far", "stuck"], timeout=30)
        assert (await client.request("far", "hi", timeout=10)).text == "hi"
        in_flight = asyncio.create_task(client.exchange("stuck", "wait", timeout=60))
        await asyncio.sleep(0.5)
        bridged.device.kill()
        t0 = time.monotonic()
        assert await client.presence.wait_offline("far", timeout=MISSES * BEAT * 10)
        offline_after = time.monotonic() - t0
        ex = await in_flight
        failed_after = time.monotonic() - t0
        assert isinstance(ex.error, AgentUnavailableError), ex.error
        t1 = time.monotonic()
        with pytest.raises(AgentUnavailableError):
            await client.request("far", "anyone?", timeout=30)
        refused_in = time.monotonic() - t1
    node.kill()  # its broker is gone: a graceful stop would only wait out its timeout
    print(
        f"bridged broker killed (heartbeat {BEAT} s x {MISSES}): agents offline after {offline_after:.2f} s, "
        f"in-flight request failed after {failed_after:.2f} s, a new request refused in {refused_in * 1000:.0f} ms"
    )


async def test_agents_on_a_dead_nats_member_go_offline(nats: NatsCluster, namespace: str, spawn) -> None:
    node = spawn(
        ["echo:gone", "scripted:stuck?hang=true"], nats.url(0), namespace, extra_args=["--heartbeat", str(BEAT)]
    )
    async with Client(nats.url(1), namespace=namespace, heartbeat_misses=MISSES) as client:
        await client.wait_for_agents(["gone", "stuck"], timeout=60)
        in_flight = asyncio.create_task(client.exchange("stuck", "wait", timeout=60))
        await asyncio.sleep(0.5)
        nats.members[0].kill()
        t0 = time.monotonic()
        assert await client.presence.wait_offline("gone", timeout=MISSES * BEAT * 10)
        offline_after = time.monotonic() - t0
        ex = await in_flight
        failed_after = time.monotonic() - t0
        assert isinstance(ex.error, AgentUnavailableError), ex.error
    node.kill()
    print(
        f"NATS member killed (heartbeat {BEAT} s x {MISSES}): agents offline after {offline_after:.2f} s, "
        f"in-flight request failed after {failed_after:.2f} s"
    )


RABBIT_MQTT = os.environ.get("AIFLOW_TEST_RABBITMQ_MQTT", "127.0.0.1:1884")


async def test_auto_protocol_falls_back_when_the_broker_closes_a_v5_connect(namespace: str, spawn) -> None:
    """RabbitMQ 3.10's MQTT plugin closes the connection on an MQTT 5 CONNECT without a CONNACK;
    ``protocol=auto`` (the default) must then connect with 3.1.1, for a node and for a client."""
    host, _, port = RABBIT_MQTT.rpartition(":")
    if not listening(int(port), host):
        pytest.skip(
            f"no RabbitMQ MQTT listener on {RABBIT_MQTT} (rabbitmq-plugins enable rabbitmq_mqtt with its "
            "tcp_listeners on 1884; .ci/run does that where a RabbitMQ runs)"
        )
    # the premise: a v5 CONNECT gets no CONNACK, the socket is just closed
    r, w = await asyncio.open_connection(host, int(port))
    w.write(b"\x10\x11\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x04prbe")
    async with asyncio.timeout(10):
        assert await r.read(4) == b""
    w.close()
    url = BrokerURL(host=host, port=int(port))
    assert url.protocol == "auto"
    spawn(["echo:bunny"], url, namespace)
    async with Client(url, namespace=namespace) as client:
        # RabbitMQ delivers no retained message to a wildcard subscription: no presence here
        took, reply = await timed(lambda: client.request("bunny", "hi", timeout=2, check_presence=False), until=30)
    assert reply.text == "hi"  # type: ignore[attr-defined]
    print(f"RabbitMQ MQTT (v5 CONNECT closed unanswered): node and client on 3.1.1, first reply after {took:.1f} s")
