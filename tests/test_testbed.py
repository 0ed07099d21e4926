"""The testbed end to end: tiers as separate processes with their own bridged Mosquittos, joined by emulated
links in the link process; a link's RTT as measured by a request across it, an outage that cuts and
restores, the CLI, and a small evaluation with every policy on a scenario with an outage.

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

import pytest

from aiflow_agents import AgentUnavailableError, Client, RemoteAgentError
import aiflow_agents.testbed as T
from aiflow_agents.testbed import load_scenario
from aiflow_agents.testbed.mosquitto import mosquitto_binary

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


def test_cli_lists_shows_and_brings_a_scenario_up() -> None:
    need_mosquitto()
    run = [sys.executable, "-m", "aiflow_agents", "testbed"]
    listed = subprocess.run([*run, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "vehicle-tunnels" in listed.stdout
    shown = subprocess.run([*run, "show", "vehicle-tunnels"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "outage" in shown.stdout
    bad = subprocess.run([*run, "show", "no-such-scenario"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no scenario" in bad.stderr
    up = subprocess.run(
        [*run, "up", "good-5g", "--duration", "1", "--json"], capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stderr[-2000:]
    info = json.loads(up.stdout[: up.stdout.rindex("}") + 1])
    assert set(info["tiers"]) == {"device", "edge", "cloud"}
    assert info["tiers"]["device"]["uplink"]["rtt_ms"] == 10


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
