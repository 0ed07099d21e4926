"""Nodes in separate processes, over the embedded broker and a real Mosquitto (parametrized); node and client
semantics that do not depend on the transport run on the in-memory broker with nodes in this process."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiomqtt
import pytest
import torch

from aiflow_agents import (
    AgentUnavailableError,
    BrokerURL,
    Client,
    Message,
    RemoteAgentError,
    RequestTimeoutError,
)
from protocols import (
    Envelope,
    FeatureSpace,
    Kind,
    TensorPart,
    TensorRole,
    Topics,
    encode,
)

pytestmark = pytest.mark.timeout(90)
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]  # for the stock aiomqtt peer below


async def test_text_and_tensors_cross_intact(broker: BrokerURL, namespace: str, spawn) -> None:
    spawn(["echo:e1", "tensor-stats:stats"], broker, namespace, tier="edge")
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["e1", "stats"], timeout=30)
        space = FeatureSpace(family="fam", model="m", layer=3, hidden_size=8, tokenizer="tok")
        tensors = [
            torch.randn(2, 5, 8).to(torch.float16),
            torch.randn(3, 8).to(torch.bfloat16),
            torch.arange(-5, 5, dtype=torch.int8),
            torch.tensor([True, False, True]),
            torch.arange(6, dtype=torch.int64).reshape(2, 3),
        ]
        req = Envelope.request(
            "hello",
            *[TensorPart(tensor=t, role=TensorRole.HIDDEN_STATE, space=space) for t in tensors],
            meta={"k": [1, 2]},
        )
        reply = await c.request("e1", req, timeout=20)
        assert reply.kind == Kind.REPLY and reply.sender == "e1" and reply.text == "hello"
        assert reply.correlation_id == req.id and reply.trace_id == req.trace_id and reply.meta == {"k": [1, 2]}
        got = reply.tensors()
        assert len(got) == len(tensors)
        for part, t in zip(got, tensors, strict=True):
            assert part.tensor.dtype == t.dtype and torch.equal(part.tensor, t) and part.space == space

        stats = await c.request("stats", Envelope.request(TensorPart(tensor=tensors[0])), timeout=20)
        row = stats.tensor()
        assert row is not None
        assert row.tensor[0, 0].item() == tensors[0].numel()
        assert row.tensor[0, 1].item() == pytest.approx(tensors[0].double().mean().item())
        # presence carries the tier and what the agent accepts
        rec = c.presence.record("stats")
        assert rec is not None and rec.tier == "edge" and rec.accepts["any_space"] is True


async def test_frames_larger_than_the_socket_buffer_and_bursts_cross_intact(
    broker: BrokerURL, namespace: str, spawn
) -> None:
    """Packets are written as they are queued; one that does not fit the socket's buffer is
    finished by the event loop's writer. Both sides: client to node and node to client."""
    spawn(["echo:e1"], broker, namespace)
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=30)
        big = torch.randint(-(2**31), 2**31 - 1, (3 * 2**20,), dtype=torch.int32)  # 12 MiB
        reply = await c.request("e1", Envelope.request(TensorPart(tensor=big)), timeout=60)
        assert torch.equal(reply.tensors()[0].tensor, big)
        sent = [torch.full((2**18,), i, dtype=torch.float32) for i in range(24)]  # 24 x 1 MiB at once
        replies = await asyncio.gather(
            *(c.request("e1", Envelope.request(f"r{i}", TensorPart(tensor=t)), timeout=60) for i, t in enumerate(sent))
        )
        for i, (t, r) in enumerate(zip(sent, replies, strict=True)):
            assert r.text == f"r{i}" and torch.equal(r.tensors()[0].tensor, t)


async def test_raising_handler_answers_error_and_node_keeps_serving(
    memory: BrokerURL, namespace: str, local_nodes
) -> None:
    """Node semantics, so on the in-memory broker with the node in this process."""
    await local_nodes(["scripted:s1?fail_on=boom&answer=ok:{text}", "tensor-stats:t1"], memory, namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["s1", "t1"], timeout=30)
        with pytest.raises(RemoteAgentError) as info:
            await c.request("s1", "boom please", timeout=10)
        assert info.value.code == "scripted_failure" and info.value.agent_id == "s1"
        assert (await c.request("s1", "fine", timeout=10)).text == "ok:fine"
        # unsupported input: a tensor-only agent's node refuses text with a typed error, before the handler
        ex = await c.exchange("t1", Envelope.request("only text"), timeout=10)
        assert not ex.ok and ex.reply is not None and ex.reply.error is not None
        assert ex.reply.error.code == "unsupported_input" and ex.reply.sender == "t1"
        stats = await c.request("t1", Envelope.request(TensorPart(tensor=torch.ones(4))), timeout=10)
        assert stats.kind == Kind.REPLY  # and it still serves what it accepts


async def test_malformed_frames_get_error_replies_and_node_keeps_serving(
    broker: BrokerURL, namespace: str, spawn
) -> None:
    spawn(["echo:e1"], broker, namespace)
    topics = Topics(namespace)
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=30)
        errors: list[Envelope] = []
        got_error = asyncio.Event()

        async def on_error(message: Message) -> None:
            from protocols import decode

            errors.append(decode(message.payload))  # type: ignore[arg-type]
            got_error.set()

        c.connection.route(topics.errors("e1"), on_error)
        await c.connection.subscribe(topics.errors("e1"))

        # A frame whose header is fine but whose segment lies: the reply address is read from it.
        good = Envelope.request(TensorPart(tensor=torch.zeros(4)))
        env = c.prepare("e1", good, timeout=10)
        frame = bytearray(encode(env))
        frame = frame[:-4]  # truncate the tensor segment
        pending_reply = asyncio.get_running_loop().create_future()

        async def catch(message: Message) -> None:
            from protocols import decode

            e = decode(message.payload)  # type: ignore[arg-type]
            if e.correlation_id == env.correlation_id and not pending_reply.done():
                pending_reply.set_result(e)

        c.connection.route(c.reply_topic, catch)
        await c.connection.publish(topics.inbox("e1"), bytes(frame), qos=1)
        err = await asyncio.wait_for(pending_reply, 10)
        assert err.kind == Kind.ERROR and err.error is not None
        assert err.error.code == "bad_frame" and "bad_segment" in err.error.message

        # Pure garbage with no reply address: logged and published on the agent's errors topic.
        await c.connection.publish(topics.inbox("e1"), b"\x00garbage-not-a-frame", qos=1)
        await asyncio.wait_for(got_error.wait(), 10)
        assert errors[-1].error is not None and errors[-1].error.code == "bad_frame"
        assert "bad_magic" in errors[-1].error.message

        # ...and the node still serves correct requests.
        assert (await c.request("e1", "still alive", timeout=10)).text == "still alive"


async def test_garbage_with_mqtt5_reply_properties_is_answered(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    """On MQTT 5 even an undecodable frame is answered, through ResponseTopic/CorrelationData."""
    spawn(["echo:e1"], mosquitto, namespace)
    topics = Topics(namespace)
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=30)
        assert c.connection.is_v5
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY
        ) as raw:
            reply_topic = topics.replies("raw-tester")
            await raw.subscribe(reply_topic, qos=1)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = b"corr-123"
            await raw.publish(topics.inbox("e1"), b"AIFL\x07garbage", qos=1, properties=props)
            async with asyncio.timeout(10):
                async for m in raw.messages:
                    from protocols import decode

                    e = decode(m.payload)  # type: ignore[arg-type]
                    assert e.kind == Kind.ERROR and e.correlation_id == "corr-123"
                    assert e.error is not None and e.error.code == "bad_frame"
                    assert "unsupported_version" in e.error.message
                    break
        assert (await c.request("e1", "ok", timeout=10)).text == "ok"


async def test_absent_agent_fails_fast(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await local_nodes(["echo:present"], memory, namespace)
    async with Client(memory, namespace=namespace, presence_grace=0.5) as c:
        await c.wait_for_agents(["present"], timeout=30)
        async with asyncio.timeout(20):  # the presence check decides, not the request's 60 s timeout
            with pytest.raises(AgentUnavailableError) as info:
                await c.request("ghost", "anyone?", timeout=60)
        assert "ghost" in str(info.value) and "present" in str(info.value)


async def test_hanging_agent_times_out(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await local_nodes(["scripted:slow?hang=true"], memory, namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["slow"], timeout=30)
        t0 = time.monotonic()
        async with asyncio.timeout(30):  # a hang fails here
            with pytest.raises(RequestTimeoutError) as info:
                await c.request("slow", "hello?", timeout=0.5)
        assert time.monotonic() - t0 >= 0.45  # not given up before its timeout
        assert info.value.agent_id == "slow"


async def test_expired_and_unsupported_requests_are_refused(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await local_nodes(["tensor-stats:stats", "echo:e1"], memory, namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["stats", "e1"], timeout=30)
        with pytest.raises(RemoteAgentError) as info:
            await c.request("stats", "text only", timeout=10)
        assert info.value.code == "unsupported_input"
        late = Envelope.request("late", deadline=time.time() - 1)
        ex = await c.exchange("e1", late, timeout=5)
        assert ex.error is not None and getattr(ex.error, "code", None) == "deadline_exceeded"


async def test_sigkill_marks_agent_offline_via_last_will(broker: BrokerURL, namespace: str, spawn) -> None:
    node = spawn(["echo:doomed"], broker, namespace)
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["doomed"], timeout=30)
        node.kill()
        assert await c.presence.wait_offline("doomed", timeout=15)
        with pytest.raises(AgentUnavailableError):
            await c.request("doomed", "are you there?", timeout=5)


async def test_sigterm_is_graceful(broker: BrokerURL, namespace: str, spawn) -> None:
    node = spawn(["scripted:worker?delay=1.0&answer=done"], broker, namespace)
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["worker"], timeout=30)
        inflight = asyncio.create_task(c.request("worker", "job", timeout=15))
        await asyncio.sleep(0.3)
        stopper = asyncio.create_task(node.astop(timeout=15))
        reply = await inflight  # in-flight work finishes before the node leaves
        assert reply.text == "done"
        assert await stopper == 0
        assert await c.presence.wait_offline("worker", timeout=10)
        assert not c.presence.agents.get("worker")  # retained record cleared, not just stale


async def test_concurrency_bound_and_overload_policy(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await local_nodes(
        ["scripted:busy?delay=0.5&answer=ok"],
        memory,
        namespace,
        max_concurrency=1,
        max_pending=1,
    )
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["busy"], timeout=30)
        exchanges = await asyncio.gather(*(c.exchange("busy", f"job {i}", timeout=20) for i in range(5)))
        ok = [e for e in exchanges if e.ok]
        refused = [e for e in exchanges if isinstance(e.error, RemoteAgentError) and e.error.code == "overloaded"]
        assert len(ok) == 2 and len(refused) == 3
        assert all(e.error.info.retryable for e in refused)  # type: ignore[union-attr]


async def test_duplicate_request_is_processed_once(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await local_nodes(["echo:e1"], memory, namespace)
    topics = Topics(namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=30)
        env = c.prepare("e1", Envelope.request("once"), timeout=10)
        replies: list[Envelope] = []

        async def count(message: Message) -> None:
            from protocols import decode

            replies.append(decode(message.payload))  # type: ignore[arg-type]

        c.connection.route(c.reply_topic, count)
        frame = bytes(encode(env))
        await c.connection.publish(topics.inbox("e1"), frame, qos=1)
        await c.connection.publish(topics.inbox("e1"), frame, qos=1)  # a QoS 1 redelivery
        await c.request("e1", "marker", timeout=10)  # served after both copies were seen
        await asyncio.sleep(0.2)
        assert [r.text for r in replies].count("once") == 1


async def test_replicas_share_an_inbox_on_mqtt5(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    spawn(["scripted:rep?answer=r"], mosquitto, namespace, node_id=f"{namespace}-a")
    spawn(["scripted:rep?answer=r"], mosquitto, namespace, node_id=f"{namespace}-b")
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["rep"], timeout=30)
        while len(c.presence.hosts("rep")) < 2:
            await asyncio.sleep(0.05)
        replies = await asyncio.gather(*(c.request("rep", f"q{i}", timeout=20) for i in range(40)))
        served_by = [r.meta["node"] for r in replies]
        assert set(served_by) == {f"{namespace}-a", f"{namespace}-b"}
        assert c.stats["late_or_duplicate_replies"] == 0  # each request answered exactly once


async def test_broker_restart_node_and_client_reconnect(private_mosquitto, namespace: str, spawn) -> None:
    url = private_mosquitto.url
    spawn(["echo:e1"], url, namespace)
    async with Client(url, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=30)
        assert (await c.request("e1", "before", timeout=10)).text == "before"
        private_mosquitto.stop()
        # While the broker is down a request fails with a clear error instead of hanging.
        async with asyncio.timeout(30):
            ex = await c.exchange("e1", "during", timeout=2, check_presence=False)
        assert ex.error is not None
        private_mosquitto.start()
        await c.connection.wait_connected(timeout=15)
        deadline = time.monotonic() + 20
        while True:
            ex = await c.exchange("e1", "after", timeout=2)
            if ex.ok or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert ex.ok and ex.reply is not None and ex.reply.text == "after"
        assert c.connection.connects >= 2


async def test_events_reach_group_members_once_per_member(memory: BrokerURL, namespace: str, local_nodes) -> None:
    """Group fan-out: one publish, the broker copies it to each member node."""
    await local_nodes(['scripted:m1?answer=one&groups=["g"]'], memory, namespace)
    await local_nodes(['scripted:m2?answer=two&groups=["g"]'], memory, namespace)
    topics = Topics(namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["m1", "m2"], timeout=30)
        _req, size, replies, timed_out = await c.scatter(topics.group("g"), "hi all", expected=2, timeout=10)
        assert not timed_out and size > 0
        assert sorted(r.text for r, _ in replies) == ["one", "two"]
        assert {r.sender for r, _ in replies} == {"m1", "m2"}


def test_presence_record_json_is_plain(namespace: str) -> None:
    from protocols import PresenceRecord, Status

    rec = PresenceRecord(status=Status.ONLINE, node_id="n1", agent_id="a", tier="edge")
    assert json.loads(rec.to_bytes())["status"] == "online"


@pytest.mark.mosquitto
async def test_node_waits_for_a_broker_that_starts_later(tmp_path, namespace: str, spawn) -> None:
    """A node is a service: started before its broker, it keeps retrying instead of exiting."""
    from conftest import PrivateMosquitto

    mosq = PrivateMosquitto(tmp_path)
    node = spawn(["echo:late"], mosq.url, namespace)
    await asyncio.sleep(12)  # longer than any single connect timeout
    assert node.alive()
    mosq.start()
    try:
        async with Client(mosq.url, namespace=namespace) as c:
            await c.wait_for_agents(["late"], timeout=30)
            assert (await c.request("late", "finally", timeout=10)).text == "finally"
    finally:
        await node.astop()
        mosq.stop()


async def test_node_without_a_broker_stops_on_sigterm(namespace: str, spawn) -> None:
    from aiflow_agents.testing import free_port

    node = spawn(["echo:lonely"], BrokerURL(port=free_port()), namespace)
    # Its first failed attempt is logged after its signal handlers are installed (a SIGTERM before that,
    # while a loaded machine is still importing, would end it with -15 and say nothing about the node).
    async with asyncio.timeout(60):
        while "connect failed" not in await asyncio.to_thread(node.log_path.read_text):
            await asyncio.sleep(0.1)
    assert await node.astop(timeout=30) == 0  # exit code 0: it stopped by itself, not killed after the timeout


async def test_the_runtime_imports_no_third_party_mqtt_client(broker: BrokerURL) -> None:
    """The transport is our own (aiflow_agents.mqtt): no paho/aiomqtt internals to break on an upgrade.
    A node-sized round trip (200 kB, bigger than one socket write) crosses intact and the ack is matched."""
    import subprocess
    import sys

    code = (
        "import sys, aiflow_agents, aiflow_agents.cli, topologies\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('paho', 'aiomqtt'))\n"
        "print(bad)\n"
    )
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout

    from aiflow_agents import Connection

    async with Connection(broker, client_id=f"big-{time.monotonic_ns()}") as conn:
        got: list[bytes] = []
        done = asyncio.Event()

        async def on(message: Message) -> None:
            got.append(message.payload)
            done.set()

        conn.route("big/#", on)
        await conn.subscribe("big/#", qos=1)
        await conn.publish("big/x", b"y" * 200_000, qos=1, timeout=10)
        await asyncio.wait_for(done.wait(), 10)
        assert got == [b"y" * 200_000]
