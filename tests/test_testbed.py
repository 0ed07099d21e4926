"""The testbed end to end: tiers as separate processes with their own bridged Mosquittos, joined by emulated
links in the link process; a link's RTT as measured by a request across it, an outage that cuts and
restores, a shared broker, tiers in network namespaces, quotas and namespaces that fail at create time, a
stop that cleans up past failures, the CLI, and (slow) a small evaluation with every policy on a scenario
with an outage.

Timing assertions use large emulated delays, so the lower bound (a link is never faster than configured)
is solid and the upper bound generous."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import aiflow_agents.testbed as T
from aiflow_agents import AgentUnavailableError, BrokerURL, Client, RemoteAgentError
from aiflow_agents.testbed import load_scenario
from aiflow_agents.testbed import testbed as testbed_module
from aiflow_agents.testbed.mosquitto import mosquitto_binary
from aiflow_agents.testbed.netns import netns_unavailable

pytestmark = pytest.mark.mosquitto


def need_mosquitto() -> None:
    if mosquitto_binary() is None:
        msg = "mosquitto is not installed (the testbed's per-tier brokers need it; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def two_tiers(rtt_ms: float, **extra: object) -> dict:
    return {
        "name": "two",
        "heartbeat_s": 0.5,
        "tiers": {
            "device": {
                "kind": "device",
                "agents": ["echo:near"],
                "parent": "cloud",
                "link": {"rtt_ms": rtt_ms, "jitter_ms": 0, "up_mbps": 8, "down_mbps": 50},
            },
            "cloud": {"kind": "cloud", "agents": ["echo:far"]},
        },
        **extra,
    }


async def _median_ms(c: Client, agent: str, n: int, text: str = "x") -> float:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        r = await c.request(agent, text, timeout=10)
        assert r.text == text
        lat.append((time.perf_counter() - t) * 1e3)
    return statistics.median(lat)


async def test_a_request_across_the_link_pays_its_rtt_and_bandwidth() -> None:
    need_mosquitto()
    async with T.Testbed(load_scenario(two_tiers(200))) as tb, Client(tb.url("device"), namespace=tb.namespace) as c:
        await c.wait_for_agents(["near", "far"], timeout=30)
        near = await _median_ms(c, "near", 5)
        far = await _median_ms(c, "far", 5)
        # the local agent crosses no link; the far one pays the 200 ms round trip once
        assert near < 100
        assert 200 <= far < 200 + 150
        # 100 kB up at 8 Mbit/s: ~100 ms more than a small message (tolerance: half of that either way)
        big = await _median_ms(c, "far", 3, "y" * 100_000)
        assert 200 + 50 <= big and big - far < 100 + 150
        stats = await tb.link_stats()
        assert stats["device"].bytes_up > 3 * 100_000


async def test_an_outage_cuts_the_link_and_restore_brings_it_back() -> None:
    need_mosquitto()
    async with T.Testbed(load_scenario(two_tiers(20))) as tb, Client(tb.url("device"), namespace=tb.namespace) as c:
        await c.wait_for_agents(["near", "far"], timeout=30)
        assert (await c.request("far", "before", timeout=5)).text == "before"
        await tb.cut("device", "blackhole")
        assert (await c.request("near", "local", timeout=5)).text == "local"  # the device keeps working
        with pytest.raises((TimeoutError, AgentUnavailableError, RemoteAgentError)):
            await c.request("far", "during", timeout=1.5)
        assert not (await tb.link_stats())["device"].is_up
        await tb.restore("device")
        # the held bytes arrive and the bridge carries requests again
        deadline = time.monotonic() + 30
        while True:
            try:
                assert (await c.request("far", "after", timeout=3)).text == "after"
                break
            except (TimeoutError, AgentUnavailableError):
                assert time.monotonic() < deadline, "the far agent did not come back after restore"
                await asyncio.sleep(0.5)
        assert (await tb.link_stats())["device"].outages == 1


async def test_the_schedule_takes_links_down_and_up_on_time() -> None:
    need_mosquitto()
    sc = load_scenario(two_tiers(10, outages=[{"link": "device", "start_s": 0.5, "duration_s": 1.0}]))
    async with T.Testbed(sc) as tb:
        await tb.start_clock()
        await asyncio.sleep(2.0)
        events = await tb.link_events()
    assert [(e.link, e.what) for e in events] == [("device", "down"), ("device", "up")]
    assert 0.4 <= events[0].t and 0.9 <= events[1].t - events[0].t <= 1.5


def test_a_scenario_that_cannot_run_here_says_why() -> None:
    sc = load_scenario(two_tiers(10))
    if mosquitto_binary() is None:
        with pytest.raises(T.TestbedError, match="mosquitto"):
            asyncio.run(T.Testbed(sc).start())
    with pytest.raises(ValueError, match="every_s"):
        load_scenario(two_tiers(10, outages=[{"link": "device", "start_s": 0, "duration_s": 2, "every_s": 1}]))
    with pytest.raises(T.ScenarioError, match="cannot run with isolation = 'netns'"):
        load_scenario(two_tiers(10, brokers="shared", isolation="netns"))


async def test_a_shared_broker_puts_the_link_between_each_tier_and_the_broker() -> None:
    """One broker at the device: the cloud tier's node reaches it across the device's uplink, crossed from the
    parent's end, so a request to the cloud pays the RTT and the uplink's *up* bandwidth (device -> cloud)."""
    need_mosquitto()
    data = two_tiers(200, brokers="shared", broker_at="device")
    data["tiers"]["device"]["link"].update(up_mbps=1, down_mbps=100)
    data["tiers"]["cloud"]["agents"] = ["scripted:far?answer=ok"]  # a short answer: only the request is big
    async with T.Testbed(load_scenario(data)) as tb, Client(tb.url("device"), namespace=tb.namespace) as c:
        plan = tb.tiers["cloud"].link
        assert plan is not None and plan.name == "device" and plan.reverse
        near = await _median_ms(c, "near", 3)
        lat = []
        for _ in range(3):
            t = time.perf_counter()
            assert (await c.request("far", "x", timeout=10)).text == "ok"
            lat.append((time.perf_counter() - t) * 1e3)
        far = statistics.median(lat)
        t = time.perf_counter()
        assert (await c.request("far", "y" * 25_000, timeout=10)).text == "ok"
        big = (time.perf_counter() - t) * 1e3
        stats = (await tb.link_stats())["device"]
    assert near < 100  # the requester and the device's node share the broker: no link
    assert 200 <= far < 200 + 150
    # 25 kB at 1 Mbit/s: 200 ms more than the RTT (at the 100 Mbit/s of the other direction it would be 2 ms)
    assert 200 + 150 <= big < 200 + 200 + 300
    assert stats.bytes_up > 25_000 > stats.bytes_down  # counted in the uplink's terms


async def test_namespaces_isolate_tiers_but_shape_only_the_links() -> None:
    """In namespaces, the requester reaching the device's own broker crosses no link: a big request to a local
    agent is not paced by the device's thin uplink, while one to the cloud pays its RTT and bandwidth."""
    need_mosquitto()
    if why := netns_unavailable():
        pytest.skip(f"no network namespaces here: {why}")
    data = two_tiers(200, isolation="netns")
    data["tiers"]["device"]["link"].update(up_mbps=0.5, down_mbps=0.5)
    data["tiers"]["cloud"]["agents"] = ["scripted:far?answer=ok"]
    async with T.Testbed(load_scenario(data), strict=True) as tb:
        spaces = [rt.netns for rt in tb.tiers.values() if rt.netns is not None]
        assert len(spaces) == 2 and tb.describe()["isolation"] == "netns"
        async with Client(tb.url("device"), namespace=tb.namespace) as c:
            await _median_ms(c, "near", 1)
            t = time.perf_counter()
            assert (await c.request("far", "x", timeout=10)).text == "ok"
            far = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            assert (await c.request("far", "y" * 30_000, timeout=10)).text == "ok"
            far_big = (time.perf_counter() - t) * 1e3
            # last: the bridge forwards every message (this one too) up the link, which then stays busy ~1 s
            t = time.perf_counter()
            assert (await c.request("near", "y" * 30_000, timeout=10)).text == "y" * 30_000
            near_big = (time.perf_counter() - t) * 1e3
    # 30 kB each way at the uplink's 0.5 Mbit/s would take ~960 ms; locally it takes a few ms (tolerance 300)
    assert near_big < 300
    assert 200 <= far < 200 + 150
    assert 200 + 400 <= far_big < 200 + 480 + 500  # the link's own 0.5 Mbit/s: 480 ms more for 30 kB
    assert not any(ns.exists() for ns in spaces)  # stop() deleted them


async def test_a_quota_that_fails_at_create_time_degrades_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu_quota_unavailable() can say yes and create() still fail (cgroup v2 EBUSY): the testbed then runs
    without any quota and says so, removing the one it made; strict, it refuses with a TestbedError."""
    need_mosquitto()
    made: list[_FakeQuota] = []

    class _FakeQuota:
        def __init__(self, name: str, cores: float) -> None:
            self.name, self.removed = name, False

        def create(self) -> _FakeQuota:
            if self.name.endswith("-device"):  # the second one made (top-down)
                raise T.CpuQuotaError("cannot create cgroup: Device or resource busy")
            made.append(self)
            return self

        def remove(self) -> None:
            self.removed = True

    monkeypatch.setattr(testbed_module, "CpuQuota", _FakeQuota)
    monkeypatch.setattr(testbed_module, "cpu_quota_unavailable", lambda: None)
    data = two_tiers(10)
    data["tiers"]["device"]["cores"] = 0.5
    data["tiers"]["cloud"]["cores"] = 2
    with pytest.raises(T.TestbedError, match="Device or resource busy"):
        await T.Testbed(load_scenario(data), strict=True).start()
    assert made and all(q.removed for q in made)
    made.clear()
    async with T.Testbed(load_scenario(data)) as tb, Client(tb.url("device"), namespace=tb.namespace) as c:
        assert any("CPU quotas not applied" in w and "busy" in w for w in tb.warnings)
        assert all(rt.quota is None for rt in tb.tiers.values()) and made and all(q.removed for q in made)
        assert (await c.request("far", "works", timeout=10)).text == "works"


async def test_namespaces_that_fail_at_create_time_refuse_when_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    need_mosquitto()

    class _FailingNamespace:
        def __init__(self, name: str, *, subnet_index: int) -> None:
            self.name = name

        def create(self) -> None:
            raise T.NetNamespaceError("ip netns add: Operation not permitted")

        def delete(self) -> None:
            pass

    monkeypatch.setattr(testbed_module, "NetNamespace", _FailingNamespace)
    monkeypatch.setattr(testbed_module, "netns_unavailable", lambda: None)
    monkeypatch.setattr(testbed_module, "free_subnet_index", lambda: 1)
    tb = T.Testbed(load_scenario(two_tiers(10, isolation="netns")), strict=True)
    with pytest.raises(T.TestbedError, match="network namespaces not used: ip netns add"):
        await tb.start()
    assert all(rt.netns is None and rt.broker is None for rt in tb.tiers.values())


class _Part:
    """A broker, quota or namespace that records its cleanup, or fails it."""

    def __init__(self, name: str, calls: list[str], fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def _done(self, what: str) -> None:
        self.calls.append(f"{what} {self.name}")
        if self.fail:
            raise T.CpuQuotaError(f"{what} {self.name} failed")

    def stop(self) -> None:
        self._done("stop")

    def remove(self) -> None:
        self._done("remove")

    def delete(self) -> None:
        self._done("delete")


async def test_stop_cleans_up_every_part_even_when_some_fail(tmp_path: Path) -> None:
    tb = T.Testbed(load_scenario(two_tiers(10)), workdir=tmp_path)
    calls: list[str] = []
    for name, fail in (("device", True), ("cloud", False)):
        tb.tiers[name] = T.TierRuntime(
            name=name,
            kind=name,
            url=BrokerURL(),
            broker=_Part(f"{name}-broker", calls, fail),  # type: ignore[arg-type]
            quota=_Part(f"{name}-quota", calls, fail),  # type: ignore[arg-type]
            netns=_Part(f"{name}-ns", calls, fail),  # type: ignore[arg-type]
        )
    await tb.stop()
    assert sorted(calls) == sorted(
        f"{what} {tier}-{part}"
        for tier in ("device", "cloud")
        for what, part in (("stop", "broker"), ("remove", "quota"), ("delete", "ns"))
    )
    assert len(tb.warnings) == 3 and all("device" in w for w in tb.warnings)
    assert tb.tiers["cloud"].quota is None and tb.tiers["device"].quota is not None  # kept: it may be retried


SMALL_SCENARIO = """
description = "three tiers of echo agents"
[tiers.device]
kind = "device"
agents = ["echo:d"]
parent = "edge"
link = { rtt_ms = 10, up_mbps = 100 }
[tiers.edge]
kind = "edge"
parent = "cloud"
link = { rtt_ms = 15 }
[tiers.cloud]
kind = "cloud"
agents = ["echo:c"]
[[outages]]
link = "edge"
start_s = 5
duration_s = 1
"""


def test_cli_lists_shows_and_brings_a_scenario_up(tmp_path: Path) -> None:
    need_mosquitto()
    run = [sys.executable, "-m", "aiflow_agents", "testbed"]
    listed = subprocess.run([*run, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "vehicle-tunnels" in listed.stdout
    shown = subprocess.run([*run, "show", "vehicle-tunnels"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "from 5 s for 4 s, every 12 s" in shown.stdout
    bad = subprocess.run([*run, "show", "no-such-scenario"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no scenario" in bad.stderr
    (tmp_path / "small.toml").write_text(SMALL_SCENARIO)
    shown = subprocess.run([*run, "show", str(tmp_path / "small.toml")], capture_output=True, text=True, timeout=60)
    assert "edge uplink blackhole from 5 s for 1 s\n" in shown.stdout  # a one-off outage: no period
    up = subprocess.run(
        [*run, "up", str(tmp_path / "small.toml"), "--duration", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert up.returncode == 0, up.stderr[-2000:]
    info = json.loads(up.stdout[: up.stdout.rindex("}") + 1])
    assert set(info["tiers"]) == {"device", "edge", "cloud"}
    assert info["tiers"]["device"]["uplink"]["rtt_ms"] == 10
    assert info["tiers"]["device"]["node_id"] == f"{info['namespace']}-device"
    assert info["tiers"]["edge"]["node_id"] is None  # no agents, no node


@pytest.mark.slow  # ~20 s: three policies over real familial models
async def test_a_small_evaluation_on_a_scenario_with_an_outage() -> None:
    """Every policy on the same requests while the device's link goes dark: the adaptive policy answers all
    of them within the deadline (flagging the device's answers as degraded); cloud-only loses the ones in
    the outage."""
    need_mosquitto()
    from demos.testbed_eval import familial_calibration, run_testbed_eval

    sc = load_scenario("vehicle-tunnels").model_dump()
    sc["outages"] = [{"link": "device", "start_s": 0.3, "duration_s": 2.5, "every_s": 4.0}]
    # the target the cloud exit meets and the device's deepest exit does not (calibrated: 65.6% and 63.7%)
    sc["workload"] = {"tasks": 40, "deadline_s": 0.6, "concurrency": 3, "accuracy_target": 0.645}
    report = await run_testbed_eval(
        load_scenario(sc),
        quiet=True,
        calibration=familial_calibration(300),
        policies=["adaptive", "text:cloud", "local:device-deep"],
    )
    pol = report["policies"]
    assert set(pol) == {"adaptive", "text:cloud", "local:device-deep"}
    assert pol["text:cloud"]["outage"]["requests"] > 0
    assert pol["adaptive"]["answered_in_deadline"] == 1.0
    assert pol["adaptive"]["outage"]["degraded_flagged"] > pol["adaptive"]["degraded_share"]  # flagged where it had to
    assert pol["text:cloud"]["outage"]["answered_in_deadline"] < 1.0
    assert pol["local:device-deep"]["bytes_per_task"]["device"] == 0
    assert pol["text:cloud"]["bytes_per_task"]["device"] > 0
    assert "pareto_front" in report["goals"]
