"""The in-memory broker's semantics, checked by the same test bodies against the real Mosquitto.

Every test here runs twice: on ``memory://`` (:class:`aiflow_agents.MemoryBroker`) and on the shared
Mosquitto, through the same :class:`~aiflow_agents.Connection` (the seam the runtime uses). A test that
passes on Mosquitto and fails on memory means the memory broker claims a semantic it does not have.
"""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import mosquitto_or_skip

from aiflow_agents import BrokerURL, Client, Connection, EchoAgent, MemoryBroker, Message, Node, Will
from aiflow_agents.mqtt import MemorySession, Session, topic_matches
from aiflow_agents.testing import NodeProcess

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest_asyncio.fixture(params=["memory", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def any_broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerURL]:
    if request.param == "mosquitto":
        yield mosquitto_or_skip()
        return
    async with MemoryBroker() as url:
        yield url


@pytest.fixture
def ns() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


class Probe:
    """A connection that records what arrives on the topics under ``prefix``."""

    def __init__(self, url: BrokerURL, prefix: str, *, will: Will | None = None, client_id: str = "") -> None:
        self.messages: list[Message] = []
        self.arrived = asyncio.Event()
        self.conn = Connection(url, client_id=client_id or f"p-{uuid.uuid4().hex[:8]}", will=will)
        self.conn.route(f"{prefix}/#", self._on)

    async def _on(self, m: Message) -> None:
        self.messages.append(m)
        self.arrived.set()

    async def wait(self, n: int, timeout: float = 5.0) -> list[Message]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages

    async def settle(self, probe_topic: str) -> None:
        """Wait until everything published before now has arrived: a marker message comes last."""
        before = len(self.messages)
        await self.conn.subscribe(probe_topic, 1)
        await self.conn.publish(probe_topic, b"marker", qos=1)
        await self.wait(before + 1)
        await self.conn.unsubscribe(probe_topic)
        assert self.messages[-1].topic == probe_topic
        self.messages.pop()

    @property
    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]

    async def __aenter__(self) -> Probe:
        await self.conn.start(timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.stop()


def test_topic_matching_rules() -> None:
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d/c")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c") and not topic_matches("a/#", "ab")
    assert topic_matches("+/+", "/x") and not topic_matches("+", "a/b")
    assert not topic_matches("#", "$SYS/x") and not topic_matches("+/x", "$a/x") and topic_matches("$a/#", "$a/x")


def test_memory_urls_parse_and_print() -> None:
    url = BrokerURL.parse("memory://unit-A?protocol=3.1.1")
    assert url.in_memory and url.host == "unit-A" and url.protocol == "3.1.1"
    assert BrokerURL.parse(url.url()) == url and str(BrokerURL.memory("x")) == "memory://x"


async def test_wildcards_route_and_overlapping_subscriptions_each_get_a_copy(any_broker: BrokerURL, ns: str) -> None:
    async with Probe(any_broker, ns) as sub, Probe(any_broker, f"{ns}-pub") as pub:
        await sub.conn.subscribe(f"{ns}/a/+/c", 1)
        await sub.conn.subscribe(f"{ns}/b/#", 1)
        for topic in ("a/x/c", "a/x/d", "a/x/y/c", "b", "b/1/2", "c/x/c"):
            await pub.conn.publish(f"{ns}/{topic}", topic.encode(), qos=1)
        await sub.settle(f"{ns}/zz")
        assert sorted(sub.payloads) == [b"a/x/c", b"b", b"b/1/2"]
        sub.messages.clear()
        await sub.conn.subscribe(f"{ns}/a/#", 1)  # overlaps a/+/c
        await pub.conn.publish(f"{ns}/a/y/c", b"twice", qos=1)
        await pub.conn.publish(f"{ns}/a/y", b"once", qos=1)
        await sub.settle(f"{ns}/zz")
        assert sorted(sub.payloads) == [b"once", b"twice", b"twice"]


async def test_shared_subscription_gives_each_message_to_one_member_per_group(any_broker: BrokerURL, ns: str) -> None:
    topic = f"{ns}/work"
    async with Probe(any_broker, ns) as w1, Probe(any_broker, ns) as w2, Probe(any_broker, ns) as other:
        await w1.conn.subscribe(f"$share/g/{topic}", 1)
        await w2.conn.subscribe(f"$share/g/{topic}", 1)
        await other.conn.subscribe(f"$share/h/{topic}", 1)
        for i in range(10):
            await other.conn.publish(topic, str(i).encode(), qos=1)
        await other.wait(10)
        await asyncio.sleep(0.05)
        got = w1.payloads + w2.payloads
        assert sorted(got, key=int) == [str(i).encode() for i in range(10)]  # each once, in the group
        assert w1.payloads and w2.payloads  # ... spread over its members
        assert sorted(other.payloads, key=int) == [str(i).encode() for i in range(10)]


async def test_retained_messages_replay_and_an_empty_payload_deletes(any_broker: BrokerURL, ns: str) -> None:
    async with Probe(any_broker, ns) as pub:
        await pub.conn.publish(f"{ns}/r/1", b"first", qos=1, retain=True)
        await pub.conn.publish(f"{ns}/r/1", b"kept", qos=1, retain=True)
        await pub.conn.publish(f"{ns}/r/2", b"gone", qos=1, retain=True)
        await pub.conn.publish(f"{ns}/r/2", b"", qos=1, retain=True)
        async with Probe(any_broker, ns) as late, Probe(any_broker, ns) as shared:
            await shared.conn.subscribe(f"$share/g/{ns}/r/+", 1)
            await late.conn.subscribe(f"{ns}/r/+", 1)
            await late.wait(1)
            await pub.conn.publish(f"{ns}/r/3", b"live", qos=1, retain=True)
            await late.settle(f"{ns}/zz")
            assert [(m.payload, m.retain) for m in late.messages] == [(b"kept", True), (b"live", False)]
            # Mosquitto replays retained messages to a shared subscription too (MQTT 5 says it should not)
            assert shared.payloads == [b"kept", b"live"]
        await pub.conn.publish(f"{ns}/r/1", b"", qos=1, retain=True)
        await pub.conn.publish(f"{ns}/r/3", b"", qos=1, retain=True)


async def test_will_on_abnormal_close_only(any_broker: BrokerURL, ns: str) -> None:
    will = Will(f"{ns}/will", b"gone", qos=1)
    async with Probe(any_broker, ns) as watcher:
        await watcher.conn.subscribe(f"{ns}/will", 1)
        async with Probe(any_broker, f"{ns}-x", will=will) as dying:
            assert dying.conn._session is not None
            dying.conn._session.abort()  # no DISCONNECT: the broker sends the Will
            await watcher.wait(1)
            assert watcher.payloads == [b"gone"]
            await dying.conn.wait_connected(10)  # and the client reconnects by itself
        await watcher.settle(f"{ns}/zz")  # the orderly stop at the end of ``async with`` sent no Will
        assert watcher.payloads == [b"gone"]


async def test_v5_properties_pass_through_and_are_dropped_for_311(any_broker: BrokerURL, ns: str) -> None:
    props: dict[str, Any] = {
        "ResponseTopic": f"{ns}/reply",
        "CorrelationData": b"\x00\x01",
        "ContentType": "application/x-aiflow",
        "UserProperty": [("k", "v"), ("k", "w")],
    }
    old = replace(any_broker, protocol="3.1.1")
    async with Probe(any_broker, ns) as v5, Probe(old, ns) as v311:
        await v5.conn.subscribe(f"{ns}/p", 1)
        await v311.conn.subscribe(f"{ns}/p", 1)
        await v5.conn.publish(f"{ns}/p", b"x", qos=1, properties=props)
        (m,) = await v5.wait(1)
        assert {k: m.properties.get(k) for k in props} == props
        (m311,) = await v311.wait(1)
        assert m311.payload == b"x" and m311.properties == {}


async def test_puback_16_when_nobody_subscribes_and_qos_downgrade(any_broker: BrokerURL, ns: str) -> None:
    async with Probe(any_broker, ns) as c, Probe(replace(any_broker, protocol="3.1.1"), ns) as old:
        assert await c.conn.publish(f"{ns}/nobody", b"x", qos=1) == 16
        await c.conn.subscribe(f"{ns}/q0", 0)
        assert await c.conn.publish(f"{ns}/q0", b"x", qos=1) == 0
        (m,) = await c.wait(1)
        assert m.qos == 0  # the lower of the publish's and the subscription's QoS
        assert await old.conn.publish(f"{ns}/nobody", b"x", qos=1) is None  # 3.1.1 has no reason codes


async def test_subscriptions_are_restored_after_a_reconnect(any_broker: BrokerURL, ns: str) -> None:
    async with Probe(any_broker, ns) as sub, Probe(any_broker, f"{ns}-pub") as pub:
        await sub.conn.subscribe(f"{ns}/s", 1)
        assert sub.conn._session is not None
        sub.conn._session.abort()
        async with asyncio.timeout(10):
            while sub.conn.connects < 2 or not sub.conn.connected:
                await asyncio.sleep(0.01)
        assert await pub.conn.publish(f"{ns}/s", b"after", qos=1) == 0
        assert (await sub.wait(1))[0].payload == b"after"


async def test_a_second_connection_with_the_same_client_id_takes_over(any_broker: BrokerURL, ns: str) -> None:
    cls = MemorySession if any_broker.in_memory else Session
    client_id = f"same-{ns}"
    first = await cls.connect(any_broker.host, any_broker.port, client_id=client_id, will=Will(f"{ns}/w", b"w"))
    async with Probe(any_broker, ns) as watcher:
        await watcher.conn.subscribe(f"{ns}/w", 1)
        second = await cls.connect(any_broker.host, any_broker.port, client_id=client_id)
        async with asyncio.timeout(5):
            error = await first.closed
        assert error.by_broker and not second.is_closed  # Mosquitto says no reason (0x8E elsewhere)
        assert (await watcher.wait(1))[0].payload == b"w"  # the taken-over connection's Will
        await second.disconnect()


async def test_memory_broker_drop_publishes_the_will_and_a_restart_is_rejoined() -> None:
    broker = MemoryBroker("drop-test")
    async with broker as url, Probe(url, "d") as watcher, Probe(url, "x", will=Will("d/will", b"w"), client_id="x1"):
        await watcher.conn.subscribe("d/will", 1)
        assert broker.subscriptions(watcher.conn.client_id) == {"d/will": 1}
        broker.drop("x1")
        assert (await watcher.wait(1))[0].payload == b"w"
        broker.close()  # the broker goes down: no Wills, clients retry; a name that is closed refuses them
        with pytest.raises(ConnectionRefusedError):
            MemoryBroker.named("drop-test")
        async with asyncio.timeout(5):
            while watcher.conn.connected:
                await asyncio.sleep(0.01)
        again = MemoryBroker("drop-test").register()  # back up, empty: clients reconnect and resubscribe
        await watcher.conn.wait_connected(10)
        assert again.subscriptions(watcher.conn.client_id) == {"d/will": 1}
        again.close()


def test_a_node_process_cannot_use_a_memory_broker() -> None:
    """Another process would get a broker of its own under the same name: refused, not silently deaf."""
    with pytest.raises(ValueError, match="one process"):
        NodeProcess(["echo"], BrokerURL.memory("x"))


async def test_the_readme_example_runs() -> None:
    """README's "In memory" snippet as written, with an echo agent standing in for the user's (so "..." is "hi")."""
    readme = README.read_text()
    block = readme[readme.index("- **In memory**") :]
    start = block.index("```python") + len("```python")
    code = textwrap.dedent(block[start : block.index("```", start)]).replace('== "..."', '== "hi"')
    scope: dict[str, Any] = {"MemoryBroker": MemoryBroker, "Node": Node, "Client": Client, "MyAgent": EchoAgent}
    exec("async def main():\n" + textwrap.indent(code, "    "), scope)
    await scope["main"]()
