"""Issue 11, node hardening: no frame can knock a node off (defect 1), replay is bounded by
recipient and freshness checks (defect 2), and a flood is refused cheaply with bounded memory and
per-agent slots (defect 5). Nodes run in their own processes against the real Mosquitto; attacker
frames are written by a stock client (aiomqtt), so our own client's checks cannot filter them."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import PrivateMosquitto

from aiflow_agents import Agent, AgentContext, BrokerURL, Client, Node
from aiflow_agents.agent import Accepts
from aiflow_agents.node import _RecentIds
from aiflow_agents.testing import NodeProcess
from protocols import Envelope, Kind, Topics, decode, new_id

pytestmark = pytest.mark.timeout(300)

#: How long the poisoned-frame run lasts (issue 11: 60 s over MQTT 5 and 3.1.1; both run at once).
POISON_SECONDS = float(os.environ.get("AIFLOW_POISON_SECONDS", "60"))  # the soak (slow) run
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
ACCEPT_NOTHING = {"acceptance": {"min_confidence": 0.5}}  # echo reports no confidence: always escalate


def raw_frame(**fields: Any) -> bytes:
    """A v1 frame with a text part, written by hand: our encoder refuses what this can hold."""
    header = {
        "id": new_id(),
        "kind": "request",
        "sender": "attacker",
        "trace_id": new_id(),
        "created_at": time.time(),
        "parts": [{"type": "text", "text": "poison", "meta": {}}],
        **fields,
    }
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    return struct.pack("<4sBBHI", b"AIFL", 1, 0, 0, len(raw)) + raw


def _stock_client(url: BrokerURL, name: str) -> aiomqtt.Client:
    v5 = url.protocol != "3.1.1"
    return aiomqtt.Client(
        url.host,
        url.port,
        identifier=f"{name}-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        socket_options=NODELAY,
        timeout=30,
        max_queued_outgoing_messages=0,
    )


# == defect 1: poisoned header strings ============================================================
@dataclass
class PoisonRun:
    protocol: str
    valid_sent: int = 0
    valid_answered: int = 0
    cascades_answered: int = 0
    bad_route_answered: int = 0
    reported: dict[str, Any] = field(default_factory=dict)  # poison id -> error report on errors/<agent>
    answered: dict[str, Any] = field(default_factory=dict)  # poison id -> error at the attacker's valid address
    expect_report: set[str] = field(default_factory=set)
    expect_answer: set[str] = field(default_factory=set)
    offline_records: list[str] = field(default_factory=list)
    presence_lapses: int = 0
    seconds: float = 0.0


def _poison(topics: Topics, answer_at: str) -> list[tuple[str, bytes, bool]]:
    """(id, frame, answered at ``answer_at``?) for one round of poisoned frames. Frames whose
    reply address is bad must be reported on errors/<agent>, never answered at that address."""
    bad_addresses = [
        f"{topics.base}/clients/x\u0000y/replies",  # U+0000
        f"{topics.base}/clients/x\u0001y/replies",  # a control character
        f"{topics.base}/clients/x\uffffy/replies",  # a non-character
        f"{topics.base}/clients/+/replies",  # wildcards: a filter, not a topic name
        f"{topics.base}/clients/#",
        f"{topics.base}/" + "r/" * 200 + "r",  # 204 levels: Mosquitto disconnects beyond 200 '/'
        f"{topics.base}/clients/x y/replies",  # not portable: NATS closes the connection on ' '
        f"{topics.base}/clients/x.y/replies",  # ... and on '.'
    ]
    out = []
    for reply_to in bad_addresses:
        i = new_id()
        out.append((i, raw_frame(id=i, reply_to=reply_to), False))
    # a cascade request whose sender (copied into the forward's user property) is poisoned
    i = new_id()
    out.append((i, raw_frame(id=i, sender="evil\u0000", reply_to=answer_at, route=["p2"], meta=ACCEPT_NOTHING), True))
    # route hops that are no topic level
    for hop in ("bad\u0000hop", "p2/#", "p2.v2"):
        i = new_id()
        out.append((i, raw_frame(id=i, reply_to=answer_at, route=[hop], meta=ACCEPT_NOTHING), True))
    # a hop MQTT accepts but that is no agent id: fails in the forwarding node, answered `bad_route`
    i = new_id()
    out.append((i, raw_frame(id=i, reply_to=answer_at, route=["not@an-agent"], meta=ACCEPT_NOTHING), True))
    return out


async def _poison_run(
    url: BrokerURL, spawn: Callable[..., NodeProcess], rounds: int | None
) -> tuple[PoisonRun, NodeProcess]:
    """``rounds`` rounds of poison and valid requests, or (None) as many as fit in POISON_SECONDS."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    topics = Topics(namespace)
    run = PoisonRun(protocol=url.protocol)
    node = spawn(["echo:p1", "echo:p2"], url, namespace)
    answer_at = f"{topics.base}/clients/attacker/replies"
    loop = asyncio.get_running_loop()
    async with Client(url, namespace=namespace) as client, _stock_client(url, "attacker") as attacker:
        await client.wait_for_agents(["p1", "p2"], timeout=30)
        for sub in (topics.presence_filter, f"{topics.base}/errors/#", answer_at):
            await attacker.subscribe(sub, qos=1)

        async def listen() -> None:
            async for m in attacker.messages:
                t = str(m.topic)
                if "/presence/" in t:
                    if m.payload and json.loads(m.payload).get("status") == "offline":  # type: ignore[arg-type]
                        run.offline_records.append(t)
                    continue
                env = decode(m.payload)  # type: ignore[arg-type]
                if env.kind != Kind.ERROR:
                    continue
                (run.reported if "/errors/" in t else run.answered)[env.correlation_id or ""] = env.error

        listener = asyncio.create_task(listen())
        t0 = loop.time()
        n = 0
        while n < rounds if rounds is not None else loop.time() - t0 < POISON_SECONDS:
            for i, frame, answered in _poison(topics, answer_at):
                (run.expect_answer if answered else run.expect_report).add(i)
                await attacker.publish(topics.inbox("p1"), frame, qos=1)
            n += 1
            run.valid_sent += 1
            reply = await client.request("p1", f"valid {n}", timeout=15)
            run.valid_answered += reply.text == f"valid {n}"
            if n % 5 == 0:  # a valid cascade p1 -> p2 through the same node
                run.valid_sent += 1
                env = Envelope.request(f"cascade {n}", route=["p2"], meta=ACCEPT_NOTHING)
                reply = await client.request("p1", env, timeout=15)
                ok = reply.text == f"cascade {n}" and reply.sender == "p2"
                run.valid_answered += ok
                run.cascades_answered += ok
            run.presence_lapses += not (client.presence.is_online("p1") and client.presence.is_online("p2"))
            await asyncio.sleep(0.05)
        run.seconds = loop.time() - t0
        async with asyncio.timeout(30):  # the node reports each one; wait for the stragglers
            while not (run.expect_report <= run.reported.keys() and run.expect_answer <= run.answered.keys()):
                await asyncio.sleep(0.1)
        listener.cancel()
    return run, node


@pytest.mark.parametrize("rounds", [10, pytest.param(None, marks=pytest.mark.slow, id="soak")])
async def test_poisoned_header_strings_never_knock_a_node_off(
    mosquitto: BrokerURL, spawn: Callable[..., NodeProcess], tmp_path: Path, rounds: int | None
) -> None:
    """Issue 11 defect 1: reply_to with U+0000 / a control character / U+FFFF / wildcards, a
    poisoned sender in a cascade forward, bad route hops, interleaved with valid requests, 10 rounds
    (the soak: POISON_SECONDS) over MQTT 5 and 3.1.1 at once. Before the fix the first such frame made the
    node publish to an invalid topic, Mosquitto disconnected it and its Will marked it offline."""
    urls = [BrokerURL(host=mosquitto.host, port=mosquitto.port, protocol=p) for p in ("5", "3.1.1")]
    results = await asyncio.gather(*(_poison_run(u, spawn, rounds) for u in urls))
    for run, node in results:
        frames = len(run.expect_report) + len(run.expect_answer)
        print(
            f"\n[{run.protocol}] {run.seconds:.0f} s: {frames} poisoned frames, {run.valid_sent} valid requests "
            f"({run.valid_answered} answered, {run.cascades_answered} cascades), offline records "
            f"{len(run.offline_records)}, presence lapses {run.presence_lapses}"
        )
        assert node.alive
        assert run.offline_records == [] and run.presence_lapses == 0
        assert run.valid_answered == run.valid_sent and run.cascades_answered > 0
        # every frame with a bad reply address was reported on errors/p1, naming the field
        assert run.expect_report <= run.reported.keys()
        assert {run.reported[i].detail.get("field") for i in run.expect_report} == {"reply_to"}
        assert {run.reported[i].code for i in run.expect_report} == {"bad_frame"}
        # the others were answered at their (valid) address: bad fields named, or `bad_route`
        codes = {(e.code, e.detail.get("field") or e.detail.get("hop")) for e in run.answered.values()}
        assert codes >= {("bad_frame", "sender"), ("bad_frame", "route"), ("bad_route", "not@an-agent")}
        log = await asyncio.to_thread(node.log_path.read_text) if node.log_path else ""
        assert "Task exception was never retrieved" not in log and "Traceback" not in log


NON_PORTABLE = {
    "levels": "r/" * 200 + "r",  # 201 levels
    "space": "aiflow/v1/{ns}/clients/x y/replies",
    "dot": "aiflow/v1/{ns}/clients/x.y/replies",
}


def _nats(tmp_path: Path) -> tuple[Any, BrokerURL]:
    """One nats-server with JetStream and its MQTT listener (MQTT 3.1.1 only)."""
    from brokers import Server, need_binary

    from aiflow_agents.testing import free_port

    port, mqtt_port = free_port(), free_port()
    (tmp_path / "js").mkdir()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f"server_name: h{port}\nlisten: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\n'
    )
    server = Server("nats", [need_binary("nats-server"), "-c", str(conf)], mqtt_port, tmp_path / "nats.log")
    return server.start(timeout=60), BrokerURL(host="127.0.0.1", port=mqtt_port, protocol="3.1.1")


@pytest.mark.parametrize("broker", ["mosquitto-5", "mosquitto-3.1.1", "nats"])
async def test_non_portable_reply_topics_are_refused_at_decode(broker: str, tmp_path: Path, namespace: str) -> None:
    """Review of issue 11: a reply_to with more than 200 levels (Mosquitto disconnects the
    publisher) or with a space or '.' (the NATS MQTT listener closes the connection) is reported
    on errors/<agent>, never answered there: the node keeps its one connection. Old code: the
    node published its answer there, was disconnected and its Will fired."""
    server: Any
    if broker == "nats":
        server, url = await asyncio.to_thread(_nats, tmp_path)
        from test_deployments import mqtt_ready

        await mqtt_ready(url, 60)
    else:
        server = PrivateMosquitto(tmp_path).start()
        url = BrokerURL(host="127.0.0.1", port=server.port, protocol=broker.split("-", 1)[1])  # type: ignore[arg-type]
    topics = Topics(namespace)
    try:
        async with (
            Node([Counting("q1")], url, namespace=namespace, node_id=f"{namespace}-n") as node,
            Client(url, namespace=namespace) as c,
        ):
            await c.wait_for_agents(["q1"], timeout=60)
            reports: list[Envelope] = []

            async def on_error(message: Any) -> None:
                reports.append(decode(message.payload))

            c.connection.route(topics.errors("q1"), on_error)
            await c.connection.subscribe(topics.errors("q1"))
            ids = {}
            for what, reply_to in NON_PORTABLE.items():
                i = new_id()
                ids[i] = what
                frame = raw_frame(id=i, reply_to=reply_to.format(ns=namespace), recipient="q1")
                await c.connection.publish(topics.inbox("q1"), frame, qos=1)
            assert (await c.request("q1", "after", timeout=20)).text == "q1:after"
            await _wait(lambda: len(reports) >= len(ids), timeout=20)
            fields = {r.error.detail.get("field") for r in reports if r.error is not None}
            claimed = {r.correlation_id for r in reports}
            print(
                f"\n[{broker}] reports {[(ids.get(r.correlation_id or ''), r.error and r.error.code) for r in reports]}"
            )
            assert claimed == set(ids) and fields == {"reply_to"}
            assert node.connection.connects == 1 and c.connection.connects == 1
            assert c.presence.is_online("q1")
    finally:
        await asyncio.to_thread(server.stop)


def test_our_topic_builders_refuse_non_portable_ids() -> None:
    """Our own ids never produce a topic a supported broker refuses: '.' and ' ' are refused when
    the topic is built (agent, client and node construction), and the level limit holds."""
    from aiflow_agents.builtin_agents import EchoAgent
    from protocols import MAX_TOPIC_LEVELS, portable_topic_problem, topic_filter_problem, topic_name_problem

    for bad in ("agent.v2", "a b", "ns.prod"):
        with pytest.raises(ValueError, match="'\\.' and spaces"):
            Topics(bad)
        with pytest.raises(ValueError, match="invalid agent id"):
            EchoAgent(bad)
        with pytest.raises(ValueError, match="invalid client id"):
            Client("mqtt://127.0.0.1:1", client_id=bad)
    node = Node([EchoAgent("e")], "mqtt://127.0.0.1:1", node_id="host.example.com")
    assert (
        node.node_id == "host-example-com" and portable_topic_problem(node.topics.node_presence(node.node_id)) is None
    )
    limit = "/".join(["r"] * MAX_TOPIC_LEVELS)
    assert topic_name_problem(limit) is None and topic_filter_problem(limit) is None
    assert (
        topic_name_problem(limit + "/r") and topic_filter_problem(limit + "/#") and topic_filter_problem(limit + "/+")
    )
    assert (
        portable_topic_problem("a/b.c") and portable_topic_problem("a/b c") and portable_topic_problem("a/é/$x") is None
    )


# == defect 2: replay =============================================================================
KEY = bytes.fromhex("5a" * 32)


class Counting(Agent):
    type_name = "counting"
    accepts = Accepts(text=True, any_space=True)

    def __init__(self, agent_id: str, **kw: Any) -> None:
        super().__init__(agent_id, **kw)
        self.handled: list[str] = []

    async def handle(self, request: Envelope, ctx: AgentContext) -> str:
        self.handled.append(request.text)
        return f"{self.agent_id}:{request.text}"


async def _reports(client: Client, topics: Topics, agents: list[str]) -> list[Envelope]:
    out: list[Envelope] = []

    async def on_error(message: Any) -> None:
        out.append(decode(message.payload, signing_key=KEY))

    for a in agents:
        client.connection.route(topics.errors(a), on_error)
        await client.connection.subscribe(topics.errors(a))
    return out


async def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_replayed_signed_request_is_refused_elsewhere_and_later(memory: BrokerURL, namespace: str) -> None:
    """Issue 11 defect 2: a captured signed request replayed to another agent (the recipient is
    under the MAC), after the freshness window, to a restarted node, or dated in the future runs
    nowhere; each refusal is reported on errors/<agent>, never answered at the frame's reply_to."""
    topics = Topics(namespace)
    a1, a2 = Counting("a1"), Counting("a2")
    async with (
        Node([a1, a2], memory, namespace=namespace, signing_key=KEY, max_frame_age=1.0, clock_skew=0.5) as node,
        Client(memory, namespace=namespace, signing_key=KEY) as c,
    ):
        await c.wait_for_agents(["a1", "a2"], timeout=20)
        reports = await _reports(c, topics, ["a1", "a2"])
        captured = c.encode(c.prepare("a1", "transfer 100", 30))
        ex = await c.exchange("a1", decode(captured, signing_key=KEY), timeout=10)
        assert ex.reply is not None and ex.reply.text == "a1:transfer 100"
        # replayed to another agent's inbox: refused (wrong_recipient), a2's handler never runs
        await c.connection.publish(topics.inbox("a2"), captured, qos=1)
        await _wait(lambda: len(reports) >= 1)
        assert a2.handled == [] and reports[-1].error is not None
        assert reports[-1].error.code == "wrong_recipient" and reports[-1].error.agent == "a2"
        # replayed to its own agent inside the window: a duplicate, ignored
        await c.connection.publish(topics.inbox("a1"), captured, qos=1)
        await _wait(lambda: node.stats["duplicates"] >= 1)
        # after the window (1 s + 0.5 s skew): refused as stale, even once the id is forgotten
        await asyncio.sleep(1.6)
        await c.connection.publish(topics.inbox("a1"), captured, qos=1)
        await _wait(lambda: len(reports) >= 2)
        assert reports[-1].error is not None and reports[-1].error.code == "stale_frame"
        # dated in the future beyond the skew: refused too
        future = c.prepare("a1", "from the future", 30).model_copy(update={"created_at": time.time() + 60})
        await c.connection.publish(topics.inbox("a1"), c.encode(future), qos=1)
        await _wait(lambda: len(reports) >= 3)
        assert reports[-1].error is not None and reports[-1].error.code == "stale_frame"
        # a signed request must name its recipient (else it could be replayed anywhere)
        anywhere = c.prepare("a1", "to whom it may concern", 30).model_copy(update={"recipient": None})
        await c.connection.publish(topics.inbox("a1"), c.encode(anywhere), qos=1)
        await _wait(lambda: len(reports) >= 4)
        assert reports[-1].error is not None and reports[-1].error.code == "wrong_recipient"
        assert a1.handled == ["transfer 100"] and a2.handled == []
        assert node.stats["wrong_recipient"] == 2 and node.stats["stale"] == 2
        assert all(r.error and r.error.detail["claimed"]["id"] for r in reports)
        assert c.stats.get("late_or_duplicate_replies", 0) == 0  # nothing was answered at reply_to
    # a restarted node (fresh duplicate window) still refuses the old frame: it is stale
    a1b = Counting("a1")
    async with (
        Node([a1b], memory, namespace=namespace, signing_key=KEY, max_frame_age=1.0, clock_skew=0.5) as node2,
        Client(memory, namespace=namespace, signing_key=KEY) as c2,
    ):
        await c2.wait_for_agents(["a1"], timeout=20)
        await c2.connection.publish(topics.inbox("a1"), captured, qos=1)
        await _wait(lambda: node2.stats["stale"] == 1)
        assert a1b.handled == []


async def test_group_requests_are_bound_to_their_group(memory: BrokerURL, namespace: str) -> None:
    """A request published to a group inbox runs only if it names that group (or the member)."""
    topics = Topics(namespace)
    m1, m2 = Counting("m1", groups=["g1"]), Counting("m2", groups=["g2"])
    async with (
        Node([m1, m2], memory, namespace=namespace, signing_key=KEY) as node,
        Client(memory, namespace=namespace, signing_key=KEY) as c,
    ):
        await c.wait_for_agents(["m1", "m2"], timeout=20)
        reports = await _reports(c, topics, ["m1", "m2"])
        to_g1 = c.encode(c.prepare(None, "for g1", 30).model_copy(update={"recipient": "g1"}))
        await c.connection.publish(topics.group("g1"), to_g1, qos=1)
        await _wait(lambda: m1.handled == ["for g1"])
        await c.connection.publish(topics.group("g2"), to_g1, qos=1)  # replayed into another group
        await _wait(lambda: len(reports) >= 1)
        assert m2.handled == [] and reports[0].error is not None and reports[0].error.code == "wrong_recipient"
        assert node.stats["wrong_recipient"] == 1
        # Client.scatter names the group it publishes to, so a signing node serves it
        _req, _size, replies, _late = await c.scatter(topics.group("g1"), "via scatter", expected=1, timeout=10)
        assert [r.text for r, _ in replies] == ["m1:via scatter"]


def test_duplicate_window_covers_the_freshness_window() -> None:
    """Ids are remembered for the whole window (time-based), not only for the last N ids."""
    recent = _RecentIds(size=1_000_000, ttl=330.0)
    assert not recent.seen("a", now=0.0) and recent.seen("a", now=329.0)
    for i in range(10_000):  # far more ids than the old 4,096-id window
        recent.seen(f"x{i}", now=1.0)
    assert recent.seen("a", now=329.5) and recent.seen("x0", now=330.0)
    assert not recent.seen("b", now=400.0) and len(recent) == 1  # expired ids are dropped
    assert not recent.seen("a", now=400.0)  # ... but by then the freshness check refuses it


# == defect 5: flood, memory, deadlines, per-agent slots ===========================================
FLOOD_REQUESTS = 3000
FLOOD_BYTES = 64 * 1024


def _status(pid: int | None, key: str) -> int:
    """A /proc/<pid>/status field in bytes (VmRSS: now, VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _code(ex: Any) -> str:
    if ex.reply is None:
        return "lost"
    if ex.reply.kind == Kind.ERROR:
        return ex.reply.error.code if ex.reply.error else "error"
    return "ok"


@pytest.mark.mosquitto
async def test_flood_is_answered_with_bounded_memory_and_siblings_keep_serving(
    tmp_path: Path, spawn: Callable[..., NodeProcess]
) -> None:
    """Issue 11 defect 5: 3,000 x 64 KiB requests into a slow agent on a node process: every
    request is answered (reply or `overloaded`), none is lost, the node's memory stays bounded,
    and an agent whose handler is stuck does not make its sibling on the same node refuse.

    The broker runs with `max_queued_messages 100000`, the setting SECURITY.md asks for: with
    Mosquitto's default of 1,000, a burst like this one from a single client overflows the broker's
    queue for the node before it reaches the node at all (measured: 562 of 3,000 dropped by the
    broker, "Outgoing messages are being dropped", while the node sat idle in epoll)."""
    import torch

    from protocols import TensorPart

    broker = PrivateMosquitto(tmp_path).start()
    try:
        namespace = f"t{uuid.uuid4().hex[:10]}"
        slots = ["--concurrency", "4", "--max-pending", "60"]
        node = spawn(["scripted:slow?delay=0.05", "echo:sib", "scripted:stuck?hang=1"], broker.url, namespace,
                     extra_args=slots)  # fmt: skip
        async with Client(broker.url, namespace=namespace) as c:
            await c.wait_for_agents(["slow", "sib", "stuck"], timeout=30)
            await _warm_up(c, "sib")
            rss0 = _status(node.pid, "VmRSS")
            # the stuck agent's 64 slots fill up and its later requests are refused ...
            stuck = [asyncio.create_task(c.exchange("stuck", f"s{i}", timeout=600)) for i in range(80)]
            await _wait(lambda: sum(t.done() for t in stuck) >= 16, timeout=30)
            assert {_code(t.result()) for t in stuck if t.done()} == {"overloaded"}
            # ... while its sibling on the same node still answers
            assert (await c.request("sib", "still here", timeout=10)).text == "still here"

            big = TensorPart(tensor=torch.zeros(FLOOD_BYTES, dtype=torch.uint8))
            t0 = time.monotonic()
            flood = [c.exchange("slow", Envelope.request(f"f{i}", big), timeout=180) for i in range(FLOOD_REQUESTS)]
            sibling = [c.exchange("sib", f"sib {i}", timeout=180) for i in range(50)]
            results = await asyncio.gather(*flood, *sibling)
            elapsed = time.monotonic() - t0
            rss1, hwm = _status(node.pid, "VmRSS"), _status(node.pid, "VmHWM")
            codes = [_code(ex) for ex in results[:FLOOD_REQUESTS]]
            counts = {k: codes.count(k) for k in set(codes)}
            sib_codes = {_code(ex) for ex in results[FLOOD_REQUESTS:]}
            print(
                f"\nflood: {FLOOD_REQUESTS} x {FLOOD_BYTES // 1024} KiB in {elapsed:.1f} s: {counts}; "
                f"sibling {sib_codes}; "
                f"node RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB (peak {hwm / 2**20:.0f} MiB)"
            )
            assert counts.get("lost", 0) == 0
            assert set(counts) <= {"ok", "overloaded"} and counts.get("ok", 0) > 0
            assert sib_codes == {"ok"}
            # generous: the flood itself is 188 MiB; held frames are bounded by 64 slots x 64 KiB
            assert hwm - rss0 < 128 * 2**20
            for t in stuck:
                t.cancel()
    finally:
        broker.stop()


async def test_memory_bound_refuses_beyond_queued_bytes(
    mosquitto: BrokerURL, spawn: Callable[..., NodeProcess]
) -> None:
    """Beyond --max-queued-mib of held request frames, a node answers `overloaded` at once
    (here: a stuck agent with room for 1,000 requests, and 1 MiB frames against a 16 MiB bound)."""
    import torch

    from protocols import TensorPart

    namespace = f"t{uuid.uuid4().hex[:10]}"
    args = ["--concurrency", "1000", "--max-pending", "0", "--max-queued-mib", "16"]
    node = spawn(["scripted:stuck?hang=1", "echo:warm"], mosquitto, namespace, extra_args=args)
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["stuck", "warm"], timeout=30)
        await _warm_up(c, "warm")
        rss0 = _status(node.pid, "VmRSS")
        mib = TensorPart(tensor=torch.zeros(2**20, dtype=torch.uint8))
        held = [
            asyncio.create_task(c.exchange("stuck", Envelope.request(f"m{i}", mib), timeout=600)) for i in range(60)
        ]
        # 1 MiB + header each: 15 fit under 16 MiB, the other 45 are refused
        await _wait(lambda: sum(t.done() for t in held) >= 45, timeout=60)
        await asyncio.sleep(0.5)
        done = [t for t in held if t.done()]
        hwm = _status(node.pid, "VmHWM")
        print(
            f"\n60 x 1 MiB into a stuck agent, bound 16 MiB: {len(done)} refused, "
            f"node peak RSS +{(hwm - rss0) / 2**20:.0f} MiB"
        )
        assert len(done) == 45 and {_code(t.result()) for t in done} == {"overloaded"}
        assert hwm - rss0 < 60 * 2**20  # the 60 MiB sent are not all held
        for t in held:
            t.cancel()


async def _warm_up(client: Client, agent_id: str) -> None:
    """One request carrying a tensor, answered: the node has imported what frames with tensors need (torch is
    loaded lazily), so the memory measured after this is what the flood itself costs."""
    import torch

    from protocols import TensorPart

    reply = await client.request(agent_id, Envelope.request("warm", TensorPart(tensor=torch.zeros(4))), timeout=30)
    assert reply.kind == Kind.REPLY


class Hang(Agent):
    type_name = "hang"
    accepts = Accepts(text=True, any_space=True)

    async def handle(self, request: Envelope, ctx: AgentContext) -> str:
        self.deadline_seen = ctx.deadline
        await asyncio.Event().wait()
        return ""


async def test_sender_chosen_deadline_is_capped(memory: BrokerURL, namespace: str) -> None:
    """A request asking for an hour runs at most max_deadline: the handler's timeout uses the cap."""
    agent = Hang("h")
    async with (
        Node([agent], memory, namespace=namespace, max_deadline=0.5) as node,
        Client(memory, namespace=namespace) as c,
    ):
        await c.wait_for_agents(["h"], timeout=20)
        t0 = time.monotonic()
        ex = await c.exchange("h", "take your time", timeout=3600)
        took = time.monotonic() - t0
        print(f"\nasked 3600 s, capped at 0.5 s: answered after {took:.2f} s")
        assert _code(ex) == "deadline_exceeded"
        assert agent.deadline_seen is not None and agent.deadline_seen < time.time() + 1
        assert node.stats["deadlines_clamped"] == 1
