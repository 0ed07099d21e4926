"""The embedded amqtt broker under a storm of concurrent sessions.

amqtt 0.12.1 killed a connecting session whenever another client subscribed or left while it
replayed retained messages ("dictionary changed size during iteration"). Without the gate in
``aiflow_agents.embedded_gate`` this test lost 14 of 300 sessions on a quiet machine and 149 with
both cores busy (``EmbeddedBroker(gated=False)``).
Raw MQTT 3.1.1 packets, so the test depends on no client library.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from aiflow_agents import EmbeddedBroker
from aiflow_agents.embedded_gate import Gate, GatedWriter


def _str(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        d, n = n % 128, n // 128
        length += bytes([d | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + length + body


def _connect(client_id: str) -> bytes:
    return _packet(0x10, _str(b"MQTT") + b"\x04\x02" + struct.pack("!H", 30) + _str(client_id.encode()))


def _subscribe(packet_id: int, topic: str) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + _str(topic.encode()) + b"\x01")


async def _read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> tuple[int, bytes]:
    first = (await r.readexactly(1))[0]
    n, mult = 0, 1
    while True:
        b = (await r.readexactly(1))[0]
        n += (b & 127) * mult
        mult *= 128
        if not b & 128:
            break
    body = await r.readexactly(n)
    if first >> 4 == 3 and (first >> 1) & 3 == 1:  # QoS 1 publish: acknowledge, as every client does
        k = struct.unpack("!H", body[:2])[0]
        w.write(b"\x40\x02" + body[2 + k : 4 + k])
    return first >> 4, body


async def _session(port: int, i: int, retained: int) -> str:
    await asyncio.sleep(random.random() * 0.2)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_connect(f"storm-{i}"))
        async with asyncio.timeout(10):
            kind, _ = await _read(r, w)
            assert kind == 2
            # back to back, the retained one first, as Client.start does: amqtt replays the retained
            # records (and waits for their PUBACKs) before it acknowledges the next two
            w.write(
                _subscribe(1, "ns/presence/#")
                + _subscribe(2, f"ns/replies/storm-{i}")
                + _subscribe(3, f"ns/events/storm-{i}")
            )
            subacks = publishes = 0
            while subacks < 3 or publishes < retained:
                kind, _ = await _read(r, w)
                subacks += kind == 9
                publishes += kind == 3
        if i % 2:  # half leave politely, half just drop the connection
            w.write(b"\xe0\x00")
            await w.drain()
        w.close()
        return "ok"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed by the broker"
    except TimeoutError:
        return "no answer"


async def test_embedded_broker_survives_a_storm_of_sessions() -> None:
    retained, rounds, concurrent = 5, 6, 50
    broker = EmbeddedBroker()
    async with broker as url:
        r, w = await asyncio.open_connection("127.0.0.1", url.port)
        w.write(_connect("seed"))
        await _read(r, w)
        for k in range(retained):  # retained presence records, as nodes leave them
            w.write(_packet(0x31, _str(f"ns/presence/n{k}".encode()) + b"{}"))
        w.write(_subscribe(1, "ns/presence/#"))  # a filter that matches them always exists
        outcomes: dict[str, int] = {}
        t0 = time.monotonic()
        for _ in range(rounds):
            for o in await asyncio.gather(*(_session(url.port, i, retained) for i in range(concurrent))):
                outcomes[o] = outcomes.get(o, 0) + 1
        elapsed = time.monotonic() - t0
        w.close()
        print(f"{rounds * concurrent} sessions in {elapsed:.1f} s: {outcomes}; gate {broker.stats}")
        assert outcomes == {"ok": rounds * concurrent}
        assert broker.stats.get("session_errors", 0) == 0
        assert broker.stats["connect_phases"] >= rounds * concurrent


async def test_a_stalled_connect_phase_is_released_after_its_timeout() -> None:
    """Defect 10: a client that stalls amqtt's retained replay (SIGSTOPped) held the exclusive connect phase
    for ever, blocking every other CONNECT and SUBSCRIBE. Now the phase is taken back after its timeout,
    counted and logged; the late end of the expired phase does not end the next one."""
    gate = Gate(phase_timeout=0.3)
    stalled = await gate.begin_phase()  # never ended by its holder
    t0 = time.monotonic()
    nxt = await asyncio.wait_for(gate.begin_phase(), 10)
    waited = time.monotonic() - t0
    print(f"second connect phase got in after {waited:.2f}s (timeout 0.3 s)")
    assert gate.stats["phase_timeouts"] == 1 and gate.phase
    gate.end_phase(stalled)  # late: must not end the phase now open
    assert gate.phase
    sub = asyncio.create_task(gate.begin_subscribe())
    await asyncio.sleep(0.05)
    assert not sub.done()
    gate.end_phase(nxt)
    await asyncio.wait_for(sub, 5)
    assert gate.stats["phase_timeouts"] == 1  # an ended phase does not expire later
    gate.end_subscribe()


async def test_protocol_auto_comes_online_on_the_embedded_broker_at_first_attempt() -> None:
    """amqtt speaks 3.1.1 only, and a v5 CONNECT with a Will left it waiting for bytes that never came: a node
    given a plain ``mqtt://`` URL (protocol auto) of ``aiflow broker`` never came online. The gate refuses
    MQTT 5 as an MQTT 5 broker would, so the node falls back on its first attempt."""
    from aiflow_agents import BrokerURL, Client, EchoAgent, Node

    async with EmbeddedBroker() as url:
        auto = BrokerURL(host=url.host, port=url.port)
        assert auto.protocol == "auto"
        async with Node([EchoAgent("echo")], auto) as node, Client(auto) as client:
            assert node.connection.connects == 1 and not node.connection.is_v5
            await client.wait_for_agents(["echo"], timeout=30)
            assert (await client.request("echo", "hi", timeout=30)).text == "hi"


async def test_an_unanswered_mqtt5_connect_falls_back_to_311() -> None:
    """A broker that neither answers nor closes an MQTT 5 CONNECT (stock amqtt with a Will) must not keep a
    ``protocol=auto`` node offline: after a short probe it is retried as 3.1.1."""
    from aiflow_agents import BrokerURL, EchoAgent, Node

    async with EmbeddedBroker(gated=False) as url:
        node = Node([EchoAgent("echo")], BrokerURL(host=url.host, port=url.port))
        await node.start(timeout=60)
        try:
            assert node.connection.connected and not node.connection.is_v5
        finally:
            await node.stop()


async def test_writes_to_a_client_that_is_gone_are_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """amqtt keeps flushing its QoS 1 queue to a subscriber whose connection has died, and asyncio logged
    "socket.send() raised exception." for such writes (a new user saw these after demos). The gate's
    writer drops writes to a closed connection and counts them."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    async with server:
        _, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        stats: Counter[str] = Counter()
        writer = GatedWriter(w, SimpleNamespace(gate=SimpleNamespace(stats=stats)))  # type: ignore[arg-type]
        w.close()  # the connection is gone; amqtt does not know yet
        publish = _packet(0x32, _str(b"ns/flood") + struct.pack("!H", 1) + b"x")
        with caplog.at_level("WARNING", logger="asyncio"):
            for _ in range(10):
                writer.write(publish)
        assert not [r for r in caplog.records if "socket.send" in r.getMessage()]
        assert stats["writes_after_close"] == 10
