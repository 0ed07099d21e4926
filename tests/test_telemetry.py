"""Telemetry (issue 13 part 2): what a scheduler knows about compute per agent and transfer per link,
with timestamps, cheaply, and visibly stale when it is old.

Nodes publish records whose per-agent costs reflect the work done; records go stale when the node
freezes or stops; malformed records and probes are counted and ignored while the node keeps
serving; probes measure an RTT at least the delay an emulated link (testbed LinkProxy) adds and
take a frozen node's link down and up again; real replies feed the same link estimates. Overheads
are measured and printed (run with ``-s``). Time bounds are lower bounds from emulated delays,
upper bounds generous."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from aiflow_agents import Agent, AgentContext, BrokerURL, Client, Node, Telemetry, TelemetryRecord, create
from aiflow_agents.mqtt import Message
from aiflow_agents.probe import MAX_PROBE_BYTES, ProbeAnswer, ProbeResponder, make_probe, parse_answer
from aiflow_agents.telemetry import (
    AgentLoad,
    AgentMeter,
    _Link,
    parse_served,
    served_properties,
)
from aiflow_agents.testbed.link import LinkProfile, LinkProxy
from aiflow_agents.testing import frozen
from protocols import Envelope, Kind, Topics, ops

pytestmark = pytest.mark.timeout(120)


# -- helpers ---------------------------------------------------------------------------------------
class LayerAgent(Agent):
    """Sleeps ``per_layer`` seconds per layer asked for (``meta.layers``) and reports the layers and
    tokens it ran in ``meta.cost``, like a model agent."""

    type_name = "test-layers"

    async def handle(self, request: Envelope, ctx: AgentContext) -> Envelope:
        layers = int(request.meta.get("layers", 1))
        await asyncio.sleep(layers * float(self.config["per_layer"]))
        cost = ops.Cost(layers=layers, tokens=2 * layers).model_dump()
        return request.reply("ok", sender=self.agent_id, meta={ops.COST: cost})


async def until(check: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)


@pytest_asyncio.fixture
async def links(mosquitto: BrokerURL) -> AsyncIterator[Callable[..., Any]]:
    """Emulated links to the shared Mosquitto (:class:`LinkProxy`); all stopped at the end."""
    proxies: list[LinkProxy] = []

    async def make(profile: LinkProfile) -> BrokerURL:
        proxy = await LinkProxy((mosquitto.host, mosquitto.port), profile).start()
        proxies.append(proxy)
        host, port = proxy.address
        return BrokerURL(host=host, port=port)

    yield make
    for p in proxies:
        await p.stop()


# -- units: the estimators and the wire formats ----------------------------------------------------
def test_agent_meter_times_work_per_layer_and_per_token_and_skips_errors() -> None:
    m = AgentMeter(alpha=1.0)
    t0 = m.start()
    assert m.running == 1
    time.sleep(0.02)
    req = Envelope.request("x")
    m.finish(t0, req.reply("ok", sender="a", meta={ops.COST: {"layers": 4, "tokens": 10}}))
    assert m.running == 0 and m.calls == 1 and m.errors == 0
    assert m.service_ms is not None and m.service_ms >= 20
    assert m.ms_per_layer == pytest.approx(m.service_ms / 4) and m.ms_per_token == pytest.approx(m.service_ms / 10)
    before = m.service_ms
    m.finish(m.start(), req.error_reply("boom", "no", sender="a"))
    m.finish(m.start(), None)  # cancelled
    m.finish(m.start(), req.reply("ok", sender="a", meta={ops.COST: {"layers": True, "tokens": -3}}))
    assert m.calls == 4 and m.errors == 2 and m.ms_per_layer == pytest.approx(before / 4)  # bogus costs ignored
    assert m.load(waiting=3) == AgentLoad(
        calls=4, errors=2, in_flight=0, queued=3, service_ms=round(m.service_ms, 4),
        ms_per_layer=round(before / 4, 4), ms_per_token=round(before / 10, 4),
    )  # fmt: skip


def test_link_goes_down_after_consecutive_failures_and_up_on_a_success() -> None:
    link = _Link()
    assert not link.estimate("n", 0.0, 2).up  # nothing measured yet
    link.sample(128, 0.100, 1.0)
    est = link.estimate("n", 1.5, 2)
    assert est.up and est.rtt_ms == pytest.approx(100) and est.samples == 1 and est.age == pytest.approx(0.5)
    assert link.timeout(128, 0.25) == pytest.approx(0.4)  # 4 x RTT above the floor
    link.failures += 1
    assert link.estimate("n", 2.0, 2).up
    link.failures += 1
    est = link.estimate("n", 2.0, 2)
    assert not est.up and est.consecutive_failures == 2
    link.sample(16 * 1024, 0.100 + 0.064, 3.0)  # 16 KiB beyond the RTT in 64 ms: 2 Mbit/s
    est = link.estimate("n", 3.0, 2)
    assert est.up and est.consecutive_failures == 0 and est.rtt_ms == pytest.approx(100)
    assert est.throughput_bps == pytest.approx((16 * 1024 - 128) * 8 / 0.064)
    assert est.transfer_time(64_000) == pytest.approx(0.1 + 64_000 * 8 / est.throughput_bps)


def test_probe_timeout_backs_off_after_each_loss_up_to_a_cap_and_resets_on_a_sample() -> None:
    """RFC 6298-style: each lost probe doubles the next one's timeout (capped), so an RTT that jumped
    past ``4 x RTT`` is still caught; any sample resets it."""
    link = _Link()
    assert link.timeout(128, 0.25) == pytest.approx(1.0)  # nothing known yet
    link.sample(128, 0.020, 1.0)
    waits = [link.timeout(128, 0.25)]
    for _ in range(7):
        link.lost()
        waits.append(link.timeout(128, 0.25))
    assert waits == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    assert link.failures == 7 and link.timeout(128, 0.25, cap=3.0) == pytest.approx(3.0)
    link.sample(128, 0.4, 2.0)  # e.g. a late answer
    assert link.failures == 0 and link.timeout(128, 0.25) == pytest.approx(4 * (0.020 + 0.125 * 0.38))
    link.spb = 1e-4  # a large probe whose transfer alone exceeds the cap is still given its time
    assert link.timeout(16 * 1024, 0.25) > 5.0


def test_link_estimates_are_bounded_least_recently_used_first(mosquitto: BrokerURL) -> None:
    """Link estimates keyed by node id cannot grow without bound (ids come from the network)."""
    tm = Telemetry(Client(mosquitto), max_nodes=3)
    for i in range(10):
        tm.observe(f"n{i}", 100, 100, 0.01, 0.0)
    tm.observe("n7", 100, 100, 0.01, 0.0)  # used again: kept over n8
    tm.observe("n10", 100, 100, 0.01, 0.0)
    tm.observe("not/an/id", 100, 100, 0.01, 0.0)
    assert set(tm.links()) == {"n7", "n9", "n10"} and tm.link("n7").samples == 2  # type: ignore[union-attr]


def test_records_validate_with_bounds() -> None:
    good = TelemetryRecord(node_id="n1", ts=1.0, interval=2.0, agents={"a": AgentLoad(calls=1)})
    assert TelemetryRecord.from_bytes(good.to_bytes()) == good
    raw = json.loads(good.to_bytes())
    bad = [
        b"not json",
        b"[]",
        json.dumps({**raw, "v": 2}).encode(),
        json.dumps({**raw, "interval": 0}).encode(),
        json.dumps({**raw, "node_id": "a/b"}).encode(),
        json.dumps({**raw, "agents": {"a": {"calls": -1}}}).encode(),
        json.dumps({**raw, "agents": {"a": {"service_ms": "NaN"}}}).encode(),
        json.dumps({**raw, "agents": {f"a{i}": {} for i in range(300)}}).encode(),
        good.to_bytes() + b" " * 70_000,
    ]
    for payload in bad:
        with pytest.raises(ValueError):
            TelemetryRecord.from_bytes(payload)


def test_probe_responder_answers_only_bounded_probes_at_a_client_probe_topic() -> None:
    topics = Topics("ns")
    r = ProbeResponder(topics, "node-1")
    reply_to = topics.probe_replies("c1")
    probe = make_probe("p1", reply_to, 128, "node-1")
    assert len(probe) == 128
    topic, answer = r.answer(probe) or ("", b"")
    assert topic == reply_to and len(answer) <= len(probe)
    assert parse_answer(answer) == ProbeAnswer(id="p1", node_id="node-1", size=128)
    refused = [
        probe + bytes(MAX_PROBE_BYTES),  # too large
        b"\xff\xfe garbage",
        b'{"v":1,"id":"p1"}',  # no reply_to
        make_probe("p1", topics.inbox("victim"), 256, "node-1"),  # aimed at an agent inbox
        make_probe("p1", Topics("other").probe_replies("c1"), 256, "node-1"),  # another namespace
        make_probe("p1", reply_to + "/x", 256, "node-1"),
        make_probe("p1", "aiflow/v1/ns/clients/+/probes", 256, "node-1"),
        make_probe("p1", "aiflow/v1/ns/clients/c.1/probes", 256, "node-1"),  # not portable
    ]
    for p in refused:
        assert r.answer(p) is None, p[:80]
    assert r.answered == 1 and r.refused_total == len(refused)
    assert set(r.refused) == {"too_large", "bad_header", "bad_reply_to"}
    # a probe smaller than the answer would be: no amplification
    long_id = ProbeResponder(topics, "n" * 120)
    assert long_id.answer(make_probe("p1", reply_to, 0, "n")) is None and long_id.refused == {"too_small": 1}
    assert long_id.answer(make_probe("p1", reply_to, 0, "n" * 120)) is not None  # padded for that id
    assert parse_answer(b"x" * 2000) is None and parse_answer(b'{"v":1,"id":"p","node_id":"a b","size":1}') is None


def test_served_properties_round_trip_and_bad_ones_are_ignored() -> None:
    props = {"UserProperty": [("aiflow-kind", "reply"), *served_properties("node-1", 0.0125)]}
    assert parse_served(props) == ("node-1", pytest.approx(0.0125))
    for pairs in (
        [("aiflow-node", "node-1")],
        [("aiflow-node", "no/de"), ("aiflow-service-ms", "1")],
        [("aiflow-node", "n\n"), ("aiflow-service-ms", "1")],
        [("aiflow-node", "n"), ("aiflow-service-ms", "nan")],
        [("aiflow-node", "n"), ("aiflow-service-ms", "-1")],
        [("aiflow-node", "n"), ("aiflow-service-ms", "1" * 40)],
    ):
        assert parse_served({"UserProperty": pairs}) is None, pairs


# -- against Mosquitto -----------------------------------------------------------------------------
async def test_records_reflect_the_work_each_agent_does(mosquitto: BrokerURL, namespace: str) -> None:
    """Two agents, one four times slower per layer: its ms per layer (and per token) says so; records
    come with increasing ``ts`` and ``seq``; running and waiting requests show as in_flight/queued."""
    fast = LayerAgent("fast", per_layer=0.002)
    slow = LayerAgent("slow", per_layer=0.008)
    node = Node([fast, slow], mosquitto, namespace=namespace, telemetry_interval=0.2, max_concurrency=1)
    await node.start()
    try:
        async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
            log: list[TelemetryRecord] = []
            tm.on_record.append(log.append)
            await c.wait_for_agents(["fast", "slow"], timeout=10)
            for layers in (5, 10, 20, 10, 5):
                for agent in ("fast", "slow"):
                    await c.request(agent, Envelope.request("x", meta={"layers": layers}))
            a = await until(lambda: (t := tm.agent("slow")) and t.hosts[0].load.calls == 5 and t, 5, "slow's record")
            f = tm.agent("fast")
            assert f is not None and f.hosts[0].load.calls == 5 and f.hosts[0].node_id == node.node_id
            print(
                f"\nms/layer fast {f.ms_per_layer:.2f} (sleeps 2), slow {a.ms_per_layer:.2f} (sleeps 8); "
                f"ms/token {f.ms_per_token:.2f} / {a.ms_per_token:.2f}; "
                f"service ms {f.service_ms:.1f} / {a.service_ms:.1f}"
            )
            assert f.ms_per_layer >= 2.0 and a.ms_per_layer >= 8.0
            assert a.ms_per_layer > 2.5 * f.ms_per_layer and a.ms_per_token > 2.5 * f.ms_per_token
            assert not a.stale and a.age < 1.0 and a.in_flight == 0 and a.queued == 0
            # load: one handler slot per agent, four requests: one running, three waiting
            busy = [
                asyncio.create_task(c.request("slow", Envelope.request("x", meta={"layers": 100}))) for _ in range(4)
            ]
            loaded = await until(
                lambda: (t := tm.agent("slow")) and t.in_flight == 1 and t.queued == 3 and t, 5, "load"
            )
            assert loaded.hosts[0].cpu.cores and loaded.hosts[0].cpu.process >= 0
            await asyncio.gather(*busy)
            assert len(log) >= 3
            assert all(b.ts > a.ts and b.seq == a.seq + 1 for a, b in itertools.pairwise(log))
            assert all(r.interval == 0.2 and r.node_id == node.node_id for r in log)
            assert tm.stats["bad_records"] == 0
    finally:
        await node.stop(grace=1)


async def test_records_go_stale_when_the_node_freezes_and_when_it_stops(
    mosquitto: BrokerURL, namespace: str, spawn
) -> None:
    node = spawn(["echo:e"], mosquitto, namespace, node_id=f"{namespace}-n", extra_args=["--telemetry", "0.2"])
    nid = f"{namespace}-n"
    async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
        assert tm.is_stale(nid) and tm.age(nid) is None and tm.agent("e") is None  # never heard
        await until(lambda: not tm.is_stale(nid), 30, "a first record")
        first = tm.node(nid)
        assert first is not None and first.record.interval == 0.2
        with frozen(node):
            t0 = time.monotonic()
            await until(lambda: tm.is_stale(nid), 5, "staleness of a frozen node")
            took = time.monotonic() - t0
            agent = tm.agent("e")
            assert agent is not None and agent.stale and agent.service_ms is None  # stale hosts aggregate nothing
            assert tm.is_stale(nid, max_age=0.5) and not tm.is_stale(nid, max_age=60)
            print(f"\nfrozen -> stale after {took:.2f}s (3 x 0.2 s intervals)")
            assert took >= 3 * 0.2 - 0.25  # the last record may have arrived up to one interval earlier
        await until(lambda: not tm.is_stale(nid), 10, "fresh records after SIGCONT")
        later = tm.node(nid)
        assert later is not None and later.record.seq > first.record.seq and later.record.ts > first.record.ts
        await node.astop()
        await until(lambda: tm.is_stale(nid), 5, "staleness of a stopped node")
        age = tm.age(nid)
        assert age is not None and age > 0.6


async def test_malformed_records_and_probes_are_counted_and_ignored(
    mosquitto: BrokerURL, namespace: str, spawn
) -> None:
    nid = f"{namespace}-n"
    spawn(["echo:e"], mosquitto, namespace, node_id=nid, extra_args=["--telemetry", "0.2"])
    topics = Topics(namespace)
    async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
        await c.wait_for_agents(["e"], timeout=30)
        await until(lambda: tm.node(nid), 10, "a record")
        conn = c.connection
        # a victim topic a bad probe tries to aim the node's answer at
        victim: list[Message] = []

        async def on_victim(m: Message) -> None:
            victim.append(m)

        conn.route(topics.inbox("victim"), on_victim)
        await conn.subscribe(topics.inbox("victim"), qos=0)
        good = json.loads(tm.node(nid).record.to_bytes())  # type: ignore[union-attr]
        bad_records = [
            (topics.telemetry(nid), b"{not json"),
            (topics.telemetry(nid), json.dumps({**good, "agents": {"e": {"calls": -5}}}).encode()),
            (topics.telemetry(nid), json.dumps({**good, "node_id": "someone-else"}).encode()),
            (topics.telemetry(nid), b"{" + b" " * 100_000 + b"}"),
            (f"{topics.base}/telemetry/nodes/x/extra", json.dumps(good).encode()),  # not matched by the filter
        ]
        for topic, payload in bad_records:
            await conn.publish(topic, payload, qos=1)
        reply_to = tm.reply_topic
        bad_probes = [
            b"garbage",
            b'{"v":1,"id":"p1","reply_to":"' + reply_to.encode() + b'"}' + b"\n" + bytes(300 * 1024),  # huge
            make_probe("p2", topics.inbox("victim"), 256, nid),
            make_probe("p3", f"{topics.base}/clients/{c.client_id}/replies", 256, nid),
        ]
        for payload in bad_probes:
            await conn.publish(topics.probe(nid), payload, qos=1)
        for payload in (b"nonsense", ProbeAnswer(id="nobody-asked", node_id=nid, size=9).to_bytes()):
            await conn.publish(reply_to, payload, qos=1)
        # the node reports what it refused in its next records, and keeps serving
        rec = await until(
            lambda: (t := tm.node(nid)) and t.record.probes_refused >= len(bad_probes) and t.record, 10, "refusals"
        )
        assert rec.probes_refused == len(bad_probes)
        assert (await c.request("e", "still here", timeout=10)).text == "still here"
        assert await tm.ping(nid) is not None
        assert tm.stats["bad_records"] == 4  # the one off the filter never reached us
        assert tm.stats["bad_answers"] == 1 and tm.stats["late_answers"] == 1
        assert not tm.is_stale(nid) and tm.node(nid).record.node_id == nid  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        assert victim == []


async def test_probes_measure_added_delay_and_a_frozen_nodes_link_goes_down_and_up(
    mosquitto: BrokerURL, namespace: str, spawn, links
) -> None:
    """Node ``far`` reaches the broker through a link adding 50 ms each way, paced at 2 Mbit/s; node
    ``near`` directly. Probes see RTT >= 100 ms and a throughput no better than the pace for ``far``;
    freezing ``near`` takes its link down after two lost probes, resuming it brings it back up."""
    rate = 250_000.0  # bytes/s
    link = await links(LinkProfile(rtt_ms=100, up_mbps=rate * 8 / 1e6, down_mbps=rate * 8 / 1e6))
    far, near = f"{namespace}-far", f"{namespace}-near"
    spawn(["echo:ef"], link, namespace, node_id=far)
    near_proc = spawn(["echo:en"], mosquitto, namespace, node_id=near)
    async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
        await c.wait_for_agents(["ef", "en"], timeout=30)
        prober = await tm.probe([far, near], interval=0.2, large_every=3)
        await until(lambda: (f := tm.link(far)) and f.throughput_bps and f.samples >= 9, 20, "far's estimates")
        await until(lambda: (n := tm.link(near)) and n.samples >= 6, 10, "near's estimates")
        f, n = tm.link(far), tm.link(near)
        assert f is not None and n is not None and f.rtt_ms is not None and n.rtt_ms is not None
        print(
            f"\nfar: rtt {f.rtt_ms:.1f} ms (+-{f.rtt_var_ms:.1f}), {f.throughput_bps / 1e6:.2f} Mbit/s "
            f"(paced at {rate * 8 / 1e6:.1f}); near: rtt {n.rtt_ms:.1f} ms, "
            f"{(n.throughput_bps or 0) / 1e6:.1f} Mbit/s; rounds {prober.rounds}"
        )
        assert f.up and n.up
        assert f.rtt_ms >= 100.0  # 50 ms each way
        assert n.rtt_ms < f.rtt_ms - 50.0
        assert rate * 8 / 4 <= f.throughput_bps <= rate * 8 * 1.5
        assert 0.1 < f.transfer_time(250_000) - f.rtt_ms / 1000  # a 250 kB exchange takes its ~1 s to move
        with frozen(near_proc):
            t0 = time.monotonic()
            down = await until(lambda: (e := tm.link(near)) and not e.up and e, 5, "near's link down")
            took = time.monotonic() - t0
            assert down.consecutive_failures >= 2 and tm.link(far).up  # type: ignore[union-attr]
            print(f"frozen -> link down after {took:.2f}s ({down.consecutive_failures} failures)")
            await asyncio.sleep(0.5)
            assert not tm.link(near).up  # type: ignore[union-attr]
        t0 = time.monotonic()
        await until(lambda: (e := tm.link(near)) and e.up, 10, "near's link up again")
        print(f"resumed -> link up after {time.monotonic() - t0:.2f}s; stats {tm.stats}")
        assert tm.link(near).consecutive_failures == 0  # type: ignore[union-attr]
        assert tm.stats["probes_lost"] >= 2 and tm.stats["bad_answers"] == 0


async def test_replies_feed_the_link_estimate(mosquitto: BrokerURL, namespace: str, spawn, links) -> None:
    """A reply says which node answered and how long the request was there, so the client learns the
    link from real traffic alone (no probes): RTT >= the 100 ms the link adds."""
    link = await links(LinkProfile(rtt_ms=100))
    far = f"{namespace}-far"
    spawn(["scripted:s?delay=0.2"], link, namespace, node_id=far)
    async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
        await c.wait_for_agents(["s"], timeout=30)
        for i in range(3):
            ex = await c.exchange("s", f"q{i}", timeout=10)
            assert ex.ok and ex.served_by == far
            assert ex.service_s is not None and ex.service_s >= 0.2 and ex.latency is not None
            assert ex.latency >= ex.service_s + 0.1
        est = tm.link(far)
        assert est is not None and est.samples == 3 and est.up and tm.stats["traffic_samples"] == 3
        assert est.rtt_ms is not None and est.rtt_ms >= 100.0 and est.rtt_ms < 200.0 + 1000  # service time excluded
        print(f"\nfrom 3 replies: rtt {est.rtt_ms:.1f} ms (service 200 ms excluded)")
        tm.observe(far, 100, 100, 0.3, 0.2)  # what a scheduler may feed by hand
        assert tm.link(far).samples == 4  # type: ignore[union-attr]


async def test_overhead_of_records_and_probes_at_the_defaults(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    """Default intervals (a record every 2 s, a probe a second, 16 KiB every tenth): measured bytes/s
    per node for records and per probed node for probes. The node's own count of what it sent
    matches what the client received."""
    nodes = [f"{namespace}-n{i}" for i in range(2)]
    for nid in nodes:
        spawn(["echo:a", "echo:b", "scripted:c"], mosquitto, namespace, node_id=nid)
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["a", "b", "c"], timeout=30)
        await until(lambda: all(c.presence.node_online(n) for n in nodes), 30, "both nodes")
        async with Telemetry(c) as tm:
            await tm.probe(nodes)
            await asyncio.sleep(10.2)
            o = tm.overhead()
            sizes = [len(t.record.to_bytes()) for t in tm.nodes().values()]
        per_node = o.records_in.bytes_per_s / len(nodes)
        probes = (o.probes_out.bytes_per_s + o.answers_in.bytes_per_s) / o.probed
        print(
            f"\nover {o.elapsed_s:.1f}s, {len(nodes)} nodes x 3 agents: records {o.records_in.msgs} msgs, "
            f"{per_node:.0f} B/s per node (record {sizes[0]} B); probes {o.probes_out.msgs} out, "
            f"{o.answers_in.msgs} answered: {probes:.0f} B/s and "
            f"{(o.probes_out.msgs_per_s + o.answers_in.msgs_per_s) / o.probed:.2f} msgs/s per probed node; "
            f"total {o.bytes_per_s:.0f} B/s, {o.msgs_per_s:.1f} msgs/s"
        )
        assert o.nodes == 2 and o.probed == 2
        assert 8 <= o.records_in.msgs <= 14  # ~5 records per node in 10 s
        assert o.probes_out.msgs >= 16  # ~10 rounds x 2 nodes
        assert 0 <= o.probes_out.msgs - o.answers_in.msgs <= len(nodes)  # all answered but the round in flight
        assert per_node < 1000 and probes < 4000  # cheap: a few kB/s per node at most
        assert tm.stats["bad_records"] == 0
        print(f"client stats {tm.stats}")


async def test_telemetry_off_publishes_nothing_and_answers_no_probes(mosquitto: BrokerURL, namespace: str) -> None:
    node = Node([create("echo:e")], mosquitto, namespace=namespace, telemetry_interval=None)
    await node.start()
    try:
        async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
            await c.wait_for_agents(["e"], timeout=10)
            ex = await c.exchange("e", "hi")
            assert ex.ok and ex.served_by is None  # no stamp without telemetry
            assert await tm.ping(node.node_id, timeout=0.5) is None
            await asyncio.sleep(0.3)
            assert tm.node(node.node_id) is None and node.stats["telemetry_records"] == 0
            assert node.meter.agents["e"].calls == 1  # the meters still count
    finally:
        await node.stop(grace=1)


async def test_reply_meta_is_unchanged_by_telemetry(mosquitto: BrokerURL, namespace: str) -> None:
    """The service time travels in MQTT 5 user properties, never in the reply envelope."""
    node = Node([create("echo:e")], mosquitto, namespace=namespace, telemetry_interval=0.5)
    await node.start()
    try:
        async with Client(mosquitto, namespace=namespace) as c:
            await c.wait_for_agents(["e"], timeout=10)
            reply = await c.request("e", Envelope.request("x", meta={"k": 1}))
            assert reply.meta == {"k": 1} and reply.kind == Kind.REPLY
    finally:
        await node.stop(grace=1)


async def test_a_slower_link_reads_slow_not_down_and_a_blackhole_still_reads_down(
    mosquitto: BrokerURL, namespace: str
) -> None:
    """Review H4: the node's link to the broker goes from 20 ms to 400 ms of RTT, far past the 4 x RTT
    probe timeout. Lost probes back the timeout off and their late answers are samples, so the
    estimate follows (rtt and recent rtt past 300 ms) and the link never reads down; a blackhole
    (nothing comes back) still takes it down, and it comes back up when the link does."""
    proxy = await LinkProxy((mosquitto.host, mosquitto.port), LinkProfile(rtt_ms=20)).start()
    host, port = proxy.address
    node = Node([create("echo:e")], BrokerURL(host=host, port=port), namespace=namespace, telemetry_interval=1.0)
    await node.start()
    nid = node.node_id
    try:
        async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
            await c.wait_for_agents(["e"], timeout=10)
            await tm.probe([nid], interval=0.2, large_every=1000)
            before = await until(lambda: (e := tm.link(nid)) and e.samples >= 5 and e, 10, "20 ms estimates")
            assert before.rtt_ms is not None and 20.0 <= before.rtt_ms < 200.0
            downs: list[float] = []

            async def watch() -> None:
                while True:
                    e = tm.link(nid)
                    if e is not None and not e.up:
                        downs.append(time.monotonic())
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch())
            t0 = time.monotonic()
            proxy.set_profile(LinkProfile(rtt_ms=400))
            slow = await until(
                lambda: (e := tm.link(nid)) and e.rtt_ms > 300 and (e.recent_rtt_ms or 0) > 300 and e, 30, "400 ms"
            )
            took = time.monotonic() - t0
            watcher.cancel()
            print(
                f"\n20 -> 400 ms: rtt {before.rtt_ms:.1f} -> {slow.rtt_ms:.1f} ms (recent {slow.recent_rtt_ms:.1f}) "
                f"in {took:.1f}s; lost {tm.stats['probes_lost']}, late samples {tm.stats['late_samples']}"
            )
            assert downs == [] and slow.up  # slow, never down
            assert tm.stats["late_samples"] >= 1  # the 4 x RTT timeout was overrun, and the answer still counted
            assert slow.recent_rtt_ms < 400 + 300 and slow.rtt_ms < 400 + 300  # generous upper bounds
            proxy.cut()
            t0 = time.monotonic()
            down = await until(lambda: (e := tm.link(nid)) and not e.up and e, 30, "down in a blackhole")
            print(f"blackhole -> down after {time.monotonic() - t0:.1f}s ({down.consecutive_failures} failures)")
            await asyncio.sleep(1.0)
            assert not tm.link(nid).up  # type: ignore[union-attr]
            proxy.set_profile(LinkProfile(rtt_ms=20))
            proxy.restore()
            t0 = time.monotonic()
            await until(lambda: (e := tm.link(nid)) and e.up, 30, "up again after the blackhole")
            print(f"restored -> up after {time.monotonic() - t0:.1f}s; stats {tm.stats}")
    finally:
        await node.stop(grace=1)
        await proxy.stop()


async def test_a_reply_stamped_with_another_nodes_id_is_not_believed(
    mosquitto: BrokerURL, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review M6: a node stamps its replies with another node's id (and then with made-up ids). The
    client believes a stamp only from a node presence lists as a host of the replying agent, so the
    victim's link estimate is untouched and no estimate is made for the made-up ids."""
    import aiflow_agents.node as node_module

    honest_id, rogue_id = f"{namespace}-honest", f"{namespace}-rogue"
    stamps = itertools.chain([honest_id, honest_id], (f"made-up-{i}" for i in itertools.count()))

    def stamp(node_id: str, service_s: float) -> list[tuple[str, str]]:
        return served_properties(next(stamps) if node_id == rogue_id else node_id, service_s)

    monkeypatch.setattr(node_module, "served_properties", stamp)
    honest = Node([create("echo:v")], mosquitto, namespace=namespace, node_id=honest_id)
    rogue = Node([create("echo:r")], mosquitto, namespace=namespace, node_id=rogue_id)
    await honest.start()
    await rogue.start()
    try:
        async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
            await c.wait_for_agents(["v", "r"], timeout=10)
            for i in range(6):
                ex = await c.exchange("r", f"q{i}")
                assert ex.ok and ex.served_by is None
            assert c.stats["served_by_rejected"] == 6
            assert tm.links() == {} and tm.stats["traffic_samples"] == 0
            ex = await c.exchange("v", "q")
            assert ex.ok and ex.served_by == honest_id  # a genuine stamp still counts
            assert set(tm.links()) == {honest_id} and tm.link(honest_id).samples == 1  # type: ignore[union-attr]
    finally:
        await rogue.stop(grace=1)
        await honest.stop(grace=1)


async def test_a_stuck_probe_answer_never_holds_up_requests(
    mosquitto: BrokerURL, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review L8: the node's answers to probes cannot be written (a backed-up connection, here a
    publish that never returns). Requests queued behind the probes are still served, and answers
    waiting to be written are bounded: the rest of the probes are dropped and counted."""
    from aiflow_agents import node as node_module

    node = Node([create("echo:e")], mosquitto, namespace=namespace, telemetry_interval=0.5)
    await node.start()
    stuck = asyncio.Event()
    publish = node.connection.publish

    async def held(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic.endswith("/probes"):
            await stuck.wait()
        return await publish(topic, *args, **kwargs)

    monkeypatch.setattr(node.connection, "publish", held)
    try:
        async with Client(mosquitto, namespace=namespace) as c, Telemetry(c) as tm:
            await c.wait_for_agents(["e"], timeout=10)
            assert await tm.ping(node.node_id, timeout=0.5) is None  # its answer is stuck
            reply = await c.request("e", "served behind a stuck probe answer", timeout=5)
            assert reply.text == "served behind a stuck probe answer"
            cap = node_module._MAX_PROBE_ANSWERS
            topic, reply_to = node.topics.probe(node.node_id), tm.reply_topic
            for i in range(cap + 20):  # one answer is stuck already: cap - 1 more are held, 21 dropped
                await c.connection.publish(topic, make_probe(f"f{i}", reply_to, 128, node.node_id), qos=1)
            assert (await c.request("e", "still served", timeout=5)).text == "still served"
            await until(lambda: node.stats["probes_answered"] + node.stats["probes_dropped"] == cap + 21, 5, "probes")
            assert node.stats["probes_answered"] == cap and node.stats["probes_dropped"] == 21
            stuck.set()  # the connection drains: the answers held go out
            await until(lambda: tm.stats["late_answers"] >= cap, 5, "the held answers")
    finally:
        stuck.set()
        await node.stop(grace=1)
