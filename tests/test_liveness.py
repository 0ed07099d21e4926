"""Lost work fails fast (issue 11, defect 4 and presence liveness): a request whose node dies fails
(or, when idempotent, is re-sent) about a second after the Will instead of at its deadline; a node
whose heartbeats stop is seen offline although its Will never fires; an ensemble returns once its
quorum answered plus a grace; requests sent around a broker restart are answered or fail typed;
replicas that both execute every request are detected.

Times are measured and printed (run with ``-s`` to see them); assertions check behaviour, with
generous bounds only where the issue names a time."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from aiflow_agents import (
    AgentLostError,
    AgentUnavailableError,
    AiflowError,
    BrokerURL,
    Client,
    RequestTimeoutError,
)
from aiflow_agents.testing import frozen
from topologies import TopologyManager, ensemble

pytestmark = pytest.mark.timeout(180)


def _lost_clock(c: Client) -> dict[str, float]:
    """When this client learnt that each node went offline (its own clock)."""
    seen: dict[str, float] = {}
    c.presence.listeners.append(lambda node, _agents, _why: seen.setdefault(node, time.monotonic()))
    return seen


async def _timed(coro: object) -> tuple[float, object]:
    try:
        result: object = await coro  # type: ignore[misc]
    except AiflowError as e:
        result = e
    return time.monotonic(), result


@pytest.mark.parametrize("idempotent", [False, True])
async def test_requests_on_a_killed_replica_fail_within_a_second_of_the_will(
    mosquitto: BrokerURL, namespace: str, spawn, idempotent: bool
) -> None:
    """Two replicas share the agent ($share); ~26 slow requests sit on each when one is SIGKILLed.
    Old code: the lost half waited for the full deadline (RequestTimeoutError)."""
    doomed = spawn(["scripted:w?answer=1&delay=3"], mosquitto, namespace, node_id=f"{namespace}-a")
    spawn(["scripted:w?answer=1&delay=3"], mosquitto, namespace, node_id=f"{namespace}-b")
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["w"], timeout=30)
        async with asyncio.timeout(30):
            while len(c.presence.hosts("w")) < 2:
                await asyncio.sleep(0.05)
        lost = _lost_clock(c)
        deadline = 20.0
        early = [
            asyncio.create_task(_timed(c.request("w", f"q{i}", timeout=deadline, idempotent=idempotent)))
            for i in range(52)
        ]
        await asyncio.sleep(1.0)  # every one of them is claimed by now (claim_after 0.2 s)
        # four more, sent just before the kill: still unclaimed when the Will arrives
        late = [
            asyncio.create_task(_timed(c.request("w", f"r{i}", timeout=deadline, idempotent=idempotent)))
            for i in range(4)
        ]
        await asyncio.sleep(0.02)
        killed = time.monotonic()
        assert doomed.proc is not None
        doomed.proc.kill()
        results = [await t for t in early + late]
        will = lost.get(f"{namespace}-a")
        assert will is not None, "the Will never reached the client"
        failed = [(t, r) for t, r in results if isinstance(r, AiflowError)]
        answered = [(t, r) for t, r in results if not isinstance(r, AiflowError)]
        assert not any(isinstance(r, RequestTimeoutError) for _, r in results)
        after_will = sorted(t - will for t, _ in failed) or [0.0]
        print(
            f"\nidempotent={idempotent}: kill->Will {will - killed:.3f}s; {len(failed)} failed, "
            f"{len(answered)} answered; Will->failure min/max {after_will[0]:.3f}/{after_will[-1]:.3f}s; "
            f"kill->failure max {max((t - killed for t, _ in failed), default=0):.3f}s; "
            f"Will->answer max {max(t - will for t, _ in answered):.3f}s (handler takes 3 s); stats {c.stats}"
        )
        if idempotent:
            # every lost request was re-sent to the survivor and answered there
            assert not failed and len(answered) == 56
            assert c.stats["resent"] >= 20
        else:
            assert all(isinstance(r, AgentLostError) for _, r in failed)
            assert 20 <= len(failed) <= 36  # about half of them were on the killed replica
            assert len(answered) == 56 - len(failed)
            # the issue asks for 1 s after the Will; the bound is generous for a loaded machine
            assert after_will[-1] < 3.0


async def test_last_replica_killed_fails_every_request_at_once(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    node = spawn(["scripted:solo?answer=1&delay=5"], mosquitto, namespace)
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["solo"], timeout=30)
        lost = _lost_clock(c)
        tasks = [asyncio.create_task(_timed(c.request("solo", f"q{i}", timeout=20))) for i in range(10)]
        await asyncio.sleep(0.05)  # not even claimed yet
        assert node.proc is not None
        node.proc.kill()
        results = [await t for t in tasks]
        assert all(isinstance(r, AgentLostError) for _, r in results)
        will = next(iter(lost.values()))
        print(f"\nno replica left: Will->failure max {max(t - will for t, _ in results):.3f}s")
        assert max(t - will for t, _ in results) < 3.0


async def test_stopped_heartbeats_mark_a_node_offline(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    """A frozen node whose Will cannot fire for minutes (keepalive 300 s) — as behind a dead bridge
    — is seen offline after ~3 missed heartbeats, and its requests fail typed. Old code: online
    for the whole keepalive, the request waited for its deadline."""
    interval = 0.5
    node = spawn(
        ["scripted:hb?answer=1&delay=30"],
        mosquitto,
        namespace,
        extra_args=["--heartbeat", str(interval), "--keepalive", "300"],
    )
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["hb"], timeout=30)
        lost = _lost_clock(c)
        await asyncio.sleep(6 * interval)
        assert c.presence.is_online("hb") and not lost  # beats keep it online: no false expiry
        request = asyncio.create_task(_timed(c.request("hb", "q", timeout=60)))
        await asyncio.sleep(1.0)
        with frozen(node):
            stopped = time.monotonic()
            ended, result = await request
            assert isinstance(result, AgentLostError), result
            assert not c.presence.is_online("hb")
            offline = next(iter(lost.values()))
            print(
                f"\nheartbeat {interval}s x {c.presence.misses:g} misses: freeze->offline {offline - stopped:.3f}s, "
                f"freeze->request failed {ended - stopped:.3f}s"
            )
            assert offline - stopped < 10 * interval * c.presence.misses
            with pytest.raises(AgentUnavailableError):
                await c.request("hb", "again", timeout=5)
        # resumed: its next heartbeat brings it back
        assert not await c.presence.wait_offline("hb", 0) or await c.presence.wait_online(["hb"], 10) == []


async def test_ensemble_returns_at_quorum_plus_grace(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    """A frozen member (SIGSTOP, heartbeats off, so presence cannot help) no longer holds the
    ensemble to its deadline once the quorum answered. Old code: every run took the full deadline."""
    spawn(["scripted:e1?answer=7&delay=0.3", "scripted:e2?answer=7&delay=0.5"], mosquitto, namespace)
    stuck = spawn(["scripted:e3?answer=5"], mosquitto, namespace, extra_args=["--heartbeat", "0", "--keepalive", "300"])
    members = ["e1", "e2", "e3"]
    deadline, grace = 20.0, 1.0
    async with TopologyManager(mosquitto, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(members, timeout=30)
        await mgr.ensure_group(members)
        with frozen(stuck):
            t0 = time.monotonic()
            r = await mgr.run(ensemble(members, "vote", quorum=2, grace=grace), "q", timeout=deadline)
            took = time.monotonic() - t0
            print(f"\nquorum 2 of 3 + grace {grace}s: returned after {took:.3f}s (deadline {deadline}s)")
            assert r.ok and r.answer == "7"
            assert "timeout" in r.outcome.details["failed"]["e3"]
            assert took < deadline / 2
            # the same for a nested pattern member, which is cancelled once the grace is over
            t0 = time.monotonic()
            inner = ensemble(["e3"], name="inner")
            nested = await mgr.run(ensemble(["e1", inner], "vote", quorum=1, grace=grace), "q", timeout=deadline)
            assert nested.ok and nested.answer == "7" and "cut off" in nested.outcome.details["failed"]["inner"]
            assert time.monotonic() - t0 < deadline / 2
            # no grace given: the old behaviour, wait for every member (bounded here by a short deadline)
            t0 = time.monotonic()
            slow = await mgr.run(ensemble(members, "vote", quorum=2), "q", timeout=3)
            assert slow.ok and time.monotonic() - t0 >= 2.5


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_requests_around_a_broker_restart_are_answered_or_fail_typed(
    private_mosquitto, namespace: str, spawn, protocol: str
) -> None:
    """The client reconnects before the node re-subscribes (the node is frozen meanwhile): requests
    sent then wait for the node's announcement instead of being published into the void. Old code:
    they were lost and each ran into its deadline. MQTT 3.1.1 has no PUBACK reason codes: there the
    node's announcement, delivered live after the reconnect, is the only signal."""
    url = BrokerURL(host="127.0.0.1", port=private_mosquitto.port, protocol=protocol)  # type: ignore[arg-type]
    node = spawn(["scripted:rs?answer=1"], url, namespace, extra_args=["--keepalive", "300"])
    async with Client(url, namespace=namespace) as c:
        await c.wait_for_agents(["rs"], timeout=30)
        assert (await c.request("rs", "before", timeout=10)).text == "1"
        connects = c.connection.connects
        with frozen(node):
            private_mosquitto.stop()
            private_mosquitto.start()
            async with asyncio.timeout(20):  # the client is back; the frozen node is not
                while c.connection.connects == connects or not c.connection.connected:
                    await asyncio.sleep(0.02)
            t0 = time.monotonic()
            # Mosquitto sent the node's Will as it shut down, so presence says "offline": a plain
            # request fails typed after the presence grace, one that skips the presence check
            # waits for the node's return.
            tasks = [
                asyncio.create_task(_timed(c.request("rs", f"q{i}", timeout=15, check_presence=i >= 10)))
                for i in range(15)
            ]
            await asyncio.sleep(1.5)
        results = [await t for t in tasks]
        kinds = [type(r).__name__ for _, r in results]
        last = max(t for t, _ in results) - t0
        print(f"\nafter restart: {kinds.count('Envelope')} answered, last at {last:.3f}s; {kinds}")
        assert not any(isinstance(r, RequestTimeoutError) for _, r in results)
        assert all(not isinstance(r, AiflowError) for _, r in results[:10])
        assert all(not isinstance(r, AiflowError) or isinstance(r, AgentUnavailableError) for _, r in results[10:])


async def test_no_matching_subscribers_waits_for_the_agent_to_return(private_mosquitto, namespace: str, spawn) -> None:
    """MQTT 5: a request published while nobody is subscribed (PUBACK reason 16) is re-sent once the
    agent is announced again. Old code: lost, RequestTimeoutError at the deadline."""
    url = private_mosquitto.url
    first = spawn(["scripted:nm?answer=1"], url, namespace)
    async with Client(url, namespace=namespace) as c:
        await c.wait_for_agents(["nm"], timeout=30)
        first.stop()
        assert await c.presence.wait_offline("nm", 10)
        request = asyncio.create_task(c.request("nm", "q", timeout=30, check_presence=False))
        await asyncio.sleep(0.5)
        spawn(["scripted:nm?answer=2"], url, namespace)
        reply = await request
        assert reply.text == "2" and c.stats["no_subscribers"] >= 1


async def test_replicas_executing_every_request_are_detected(memory: BrokerURL, namespace: str, local_nodes) -> None:
    """On MQTT 3.1.1 there is no $share: both replicas run every request. The client notices the
    second execution, counts it and warns once per agent."""
    v311 = BrokerURL.memory(memory.host, protocol="3.1.1")
    await local_nodes(["scripted:dup?answer=1"], v311, namespace)
    await local_nodes(["scripted:dup?answer=1"], v311, namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["dup"], timeout=30)
        async with asyncio.timeout(30):
            while len(c.presence.hosts("dup")) < 2:
                await asyncio.sleep(0.05)
        for i in range(5):
            assert (await c.request("dup", f"q{i}", timeout=10)).text == "1"
        async with asyncio.timeout(10):
            while c.stats["duplicate_executions"] < 5:
                await asyncio.sleep(0.05)
        assert c._duplicate_warned == {"dup"}


async def test_one_replica_per_request_is_not_reported(memory: BrokerURL, namespace: str, local_nodes) -> None:
    """MQTT 5 with $share: each request runs once, nothing is reported."""
    await local_nodes(["scripted:one?answer=1"], memory, namespace)
    await local_nodes(["scripted:one?answer=1"], memory, namespace)
    async with Client(memory, namespace=namespace) as c:
        await c.wait_for_agents(["one"], timeout=30)
        async with asyncio.timeout(30):
            while len(c.presence.hosts("one")) < 2:
                await asyncio.sleep(0.05)
        for i in range(10):
            await c.request("one", f"q{i}", timeout=10)
        await asyncio.sleep(0.5)
        assert c.stats["duplicate_executions"] == 0 and c.stats["requests_lost"] == 0


async def test_heartbeat_expiry_uses_the_receivers_clock_and_forgives_its_own_stalls() -> None:
    """Silence is measured from receipt on our clock (the record's ``ts`` is ignored, so a skewed
    sender clock changes nothing); a late sweep (our loop stalled) or a sweep while our own
    connection is down expires nobody."""
    from aiflow_agents import Presence
    from protocols import PresenceRecord, Status, Topics

    topics = Topics("unit")
    p = Presence(topics, misses=3)
    lost: list[str] = []
    p.listeners.append(lambda node, _agents, _why: lost.append(node))
    skewed = PresenceRecord(status=Status.ONLINE, node_id="n1", heartbeat=1.0, ts=0.0)  # sender's clock: 1970
    await p.update(topics.node_presence("n1"), skewed.to_bytes())
    agent = PresenceRecord(status=Status.ONLINE, node_id="n1", agent_id="a")
    await p.update(topics.agent_presence("a", "n1"), agent.to_bytes())
    t = p.last_seen["n1"]
    p._last_sweep = t
    assert await p.sweep(t + 0.25) == [] and p.is_online("a")  # fresh despite ts=0
    for k in range(2, 13):  # steady sweeps: 3 s of silence is tolerated, more is not
        await p.sweep(t + 0.25 * k)
    assert p.is_online("a") and not lost
    gone = [await p.sweep(t + 0.25 * k) for k in range(13, 15)]
    assert ["n1"] in gone and not p.is_online("a") and lost == ["n1"]
    await p.update(topics.node_presence("n1"), skewed.to_bytes())  # a beat again: back online
    assert p.is_online("a")
    t = p.last_seen["n1"]
    p._last_sweep = t
    assert await p.sweep(t + 5.0) == [] and p.is_online("a")  # a 5 s stall of our own loop
    p.paused = True
    assert await p.sweep(t + 5.2) == [] and p.is_online("a")  # our connection is down


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_publish_retried_across_a_broker_restart_is_not_failed_by_the_old_session(
    private_mosquitto, namespace: str, spawn, protocol: str
) -> None:
    """Review of issue 11: the broker dies while a request's publish awaits its PUBACK; our client
    reconnects, its publish is retried and delivered, and the reply topic is subscribed again, so
    the reply can come. Old code: the request failed at once with the ConnectionLostError queued
    when the old session dropped, while the node ran it (a caller's retry = a second execution)."""
    url = BrokerURL(host="127.0.0.1", port=private_mosquitto.port, protocol=protocol)  # type: ignore[arg-type]
    node = spawn(["scripted:pa?answer=1&delay=0.3"], url, namespace)
    async with Client(url, namespace=namespace) as c:
        await c.wait_for_agents(["pa"], timeout=30)
        broker = private_mosquitto.proc
        assert broker is not None
        # The node is frozen until our publish was retried on the new broker, so the retry finds
        # nobody subscribed (MQTT 5: PUBACK 16; 3.1.1: nothing says so) and must go out again.
        with frozen(node):
            os.kill(broker.pid, signal.SIGSTOP)  # the PUBLISH sits in the socket, no PUBACK comes
            t0 = time.monotonic()
            request = asyncio.create_task(_timed(c.request("pa", "q", timeout=20)))
            await asyncio.sleep(0.5)
            assert not request.done()
            broker.kill()  # works on a stopped process; the client sees its connection close
            await asyncio.to_thread(broker.wait, 5)
            private_mosquitto.proc = None
            private_mosquitto.start()
            async with asyncio.timeout(20):
                while c.connection.connects < 2 or not c.connection.connected:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
        ended, result = await request
        print(
            f"\n[{protocol}] restart while the publish awaited its PUBACK: {type(result).__name__} after "
            f"{ended - t0:.3f}s; stats {c.stats}; connects {c.connection.connects}"
        )
        assert c.connection.connects >= 2
        assert not isinstance(result, AiflowError), result
        assert result.text == "1"  # type: ignore[attr-defined]
        # a request sent on the new session after that still works, and nothing was lost twice
        assert (await c.request("pa", "again", timeout=10)).text == "1"


async def test_unclaimed_requests_in_a_survivors_backlog_are_not_failed_as_lost(
    mosquitto: BrokerURL, namespace: str, spawn
) -> None:
    """Review of issue 11: when one replica dies, an unclaimed request may sit in a surviving
    replica's backlog (its loop busy or frozen: not yet accepted, so not claimed). It is given
    ``lost_after`` seconds for a claim or reply from a survivor before it is failed as lost.
    Old code: every unclaimed request older than claim_after + 0.5 s failed at once, although the
    survivor then ran it (its replies arrived late)."""
    doomed = spawn(["scripted:bk?answer=a&delay=20"], mosquitto, namespace, node_id=f"{namespace}-a")
    survivor = spawn(["scripted:bk?answer=b&delay=0.1"], mosquitto, namespace, node_id=f"{namespace}-b")
    async with Client(mosquitto, namespace=namespace, lost_after=3.0) as c:
        await c.wait_for_agents(["bk"], timeout=30)
        async with asyncio.timeout(30):
            while len(c.presence.hosts("bk")) < 2:
                await asyncio.sleep(0.05)
        lost = _lost_clock(c)
        with frozen(survivor):  # its backlog builds up: nothing accepted, nothing claimed
            t0 = time.monotonic()
            tasks = [asyncio.create_task(_timed(c.request("bk", f"q{i}", timeout=30))) for i in range(20)]
            await asyncio.sleep(1.2)  # > claim_after + 0.5 s: the old code judged these lost at once
            assert doomed.proc is not None
            killed = time.monotonic()
            doomed.proc.kill()
            async with asyncio.timeout(10):
                while f"{namespace}-a" not in lost:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the survivor is still frozen when the Will arrives
        thawed = time.monotonic()
        results = [await t for t in tasks]
        will = lost[f"{namespace}-a"]
        answered = [(t, r) for t, r in results if not isinstance(r, AiflowError)]
        failed = [(t, r) for t, r in results if isinstance(r, AiflowError)]
        print(
            f"\nsurvivor backlog: kill->Will {will - killed:.3f}s, Will->thaw {thawed - will:.3f}s; "
            f"{len(answered)} answered by the survivor (last {max((t - thawed for t, _ in answered), default=0):.3f}s "
            f"after the thaw), {len(failed)} failed (Will->failure max "
            f"{max((t - will for t, _ in failed), default=0):.3f}s); stats {c.stats}; sent at {t0:.0f}"
        )
        assert all(isinstance(r, AgentLostError) for _, r in failed)
        assert all(r.text == "b" for _, r in answered)  # type: ignore[attr-defined]
        assert 5 <= len(answered) <= 15 and len(failed) == 20 - len(answered)  # $share split them
        # nothing the survivor ran was reported lost: no reply came for a request already failed
        await asyncio.sleep(0.5)
        assert c.stats["late_or_duplicate_replies"] == 0


async def test_presence_forgets_nodes_that_went_offline() -> None:
    """Review of issue 11: ``last_seen``, ``live_at``, ``claim_after`` and ``expired`` are pruned when a
    node's record goes offline or is deleted (node ids hold a pid and a random suffix, so a
    long-lived client would grow with every node restart). Old code: kept every node forever."""
    from aiflow_agents import Presence
    from protocols import PresenceRecord, Status, Topics

    topics = Topics("unit")
    p = Presence(topics, misses=3)
    judged: list[tuple[str, float | None]] = []
    p.listeners.append(lambda node, _agents, _why: judged.append((node, p.claim_after(node))))

    def online(n: str) -> bytes:
        return PresenceRecord(status=Status.ONLINE, node_id=n, heartbeat=1.0, claim_after=0.2, session=1).to_bytes()

    for k in range(50):  # 50 node restarts: a fresh id each time, then its Will (or its clean stop)
        n = f"node-{k}"
        await p.update(topics.node_presence(n), online(n))
        await p.update(topics.agent_presence("a", n), PresenceRecord(status=Status.ONLINE, node_id=n).to_bytes())
        assert p.is_online("a") and n in p.last_seen and n in p.live_at and p.claim_after(n) == 0.2
        if k % 2:
            await p.update(topics.node_presence(n), PresenceRecord(status=Status.OFFLINE, node_id=n).to_bytes())
        else:
            await p.update(topics.agent_presence("a", n), b"")
            await p.update(topics.node_presence(n), b"")
    assert not p.is_online("a")
    assert (p.last_seen, p.live_at, p._claim_after, p.expired, p.agents) == ({}, {}, {}, set(), {})
    # the Will's listeners still learnt the node's claim_after (the client judges its requests by it)
    assert all(c == 0.2 for n, c in judged if int(n.split("-")[1]) % 2)
    # a node whose heartbeats stopped: its silence bookkeeping goes; expired stays while its record
    # says online, and goes with the record
    await p.update(topics.node_presence("z"), online("z"))
    t = p.last_seen["z"]
    p._last_sweep = t
    for k in range(1, 20):
        await p.sweep(t + 0.25 * k)
    assert p.expired == {"z"} and "z" not in p.live_at and "z" not in p.last_seen
    await p.update(topics.node_presence("z"), PresenceRecord(status=Status.OFFLINE, node_id="z").to_bytes())
    assert (p.last_seen, p.live_at, p._claim_after, p.expired) == ({}, {}, {}, set())
