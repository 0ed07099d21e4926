"""The scheduler's decisions under contrasting link profiles (deterministic: views with large emulated
delays; we assert the choice, never a time), and the Scheduled pattern running plans on an in-memory bus."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from topologies.scheduling import (
    Calibration,
    LinkView,
    Member,
    NetworkAware,
    PlanContext,
    StaticView,
    confidence_cascade,
    estimate,
    fixed_split,
    local_only,
    remote_only,
)

MEMBERS = [
    Member("device", "device", "device", "device", 1, local=True),
    Member("device-deep", "device", "device", "edge", 3, local=True),
    Member("edge", "edge", "edge", "edge", 3),
    Member("cloud", "cloud", "cloud", "cloud", 6),
]


def calibration() -> Calibration:
    """100 items: device right on 30 (confident on 20 of them), edge right on 62, cloud on 66; the
    cloud is right wherever the edge is, plus 4 more; the edge is confident exactly where it is right."""
    n = 100
    dev_right = [i < 30 for i in range(n)]
    dev_conf = [0.95 if i < 20 else 0.3 for i in range(n)]
    edge_right = [i < 62 for i in range(n)]
    edge_conf = [0.9 if i < 50 else 0.4 for i in range(n)]
    cloud_right = [i < 66 for i in range(n)]
    return Calibration(
        {"device": dev_conf, "edge": edge_conf, "cloud": [0.8] * n},
        {"device": dev_right, "edge": edge_right, "cloud": cloud_right},
        relay_agreement={"float16": 1.0, "int8-rowwise": 0.97, "text": 1.0},
        hidden_bytes={"float16": 5120, "int8-rowwise": 2640},
    )


def ctx(view: StaticView, deadline: float = 1.0, target: float = 0.65) -> PlanContext:
    return PlanContext(MEMBERS, calibration(), view, deadline, target)


def view(dev_edge: float, cloud: float, *, up_bps: float | None = 50e6, up: bool = True, jitter: float = 2.0):
    return StaticView(
        paths={
            "edge": LinkView(rtt_ms=dev_edge, jitter_ms=jitter, up_bps=up_bps, up=up),
            "cloud": LinkView(rtt_ms=dev_edge + cloud, jitter_ms=jitter, up_bps=up_bps, up=up),
        },
        compute={"device": 3.0, "device-deep": 8.0, "edge": 3.0, "cloud": 4.0},
    )


def test_calibration_cascade_is_exact_on_aligned_items() -> None:
    cal = calibration()
    acc, share = cal.cascade(["edge", "cloud"], [0.85])
    # the edge answers its 50 confident items (all right); the cloud the other 50, right on 12..16 of them
    assert share == [0.5, 0.5]
    assert acc == pytest.approx(0.66)
    assert cal.best_threshold("edge", "cloud", 0.66) is not None
    assert cal.best_threshold("device", "edge", 0.99) is None


def test_good_links_send_text_to_the_cloud_not_hidden_states() -> None:
    plan = NetworkAware().plan(ctx(view(10, 15)))
    assert plan.expected_accuracy >= 0.65
    assert not plan.degraded
    # shipping 5 KB of hidden states never pays when the receiver recomputes one layer in microseconds
    assert plan.encoding == "text"
    assert "cloud" in plan.stages


def test_a_thin_uplink_rules_out_latent_relays_and_the_split_costs_bytes() -> None:
    c = ctx(view(60, 40, up_bps=1e6))
    split = estimate(c, fixed_split("device", "cloud", "float16").plan(c))
    text = estimate(c, remote_only("cloud").plan(c))
    assert split.bytes_up > 5000 > text.bytes_up
    assert split.tail_ms > text.tail_ms  # 5 KB at 1 Mbit/s is ~40 ms more
    plan = NetworkAware().plan(c)
    assert plan.encoding == "text"


def test_a_dead_link_makes_the_device_answer_flagged_degraded() -> None:
    plan = NetworkAware().plan(ctx(view(20, 20, up=False)))
    assert plan.kind == "local"
    assert plan.stages == ("device-deep",)  # the most accurate exit the device can run
    assert plan.degraded
    assert plan.fallback is None


def test_a_far_cloud_under_a_tight_deadline_falls_back_to_the_best_exit_in_time() -> None:
    plan = NetworkAware().plan(ctx(view(5, 400), deadline=0.2))
    assert "cloud" not in plan.stages or plan.kind == "hedge"
    assert plan.tail_ms <= 0.2 * 1e3
    assert plan.degraded  # below the target: the cloud cannot answer in time


def test_remote_plans_arm_a_deadline_fallback_on_the_device() -> None:
    plan = NetworkAware().plan(ctx(view(10, 15), deadline=1.0))
    assert plan.fallback == "device-deep"
    assert plan.fallback_after_s is not None and 0 < plan.fallback_after_s < 1.0


def test_the_replica_with_the_better_measured_route_is_chosen() -> None:
    members = [
        *MEMBERS[:3],
        Member("cloud-a", "cloud-a", "cloud", "cloud", 6),
        Member("cloud-b", "cloud-b", "cloud", "cloud", 6),
    ]
    cal = calibration()
    cal.confidence["cloud"] = [0.8] * 100
    for slow, fast in (("cloud-a", "cloud-b"), ("cloud-b", "cloud-a")):
        v = StaticView(
            paths={
                "edge": LinkView(rtt_ms=15),
                slow: LinkView(rtt_ms=315, jitter_ms=60),
                fast: LinkView(rtt_ms=40, jitter_ms=4),
            }
        )
        plan = NetworkAware().plan(PlanContext(members, cal, v, 1.0, 0.65))
        assert fast in plan.stages and slow not in plan.stages


def test_unstable_routes_to_two_replicas_are_raced() -> None:
    members = [
        *MEMBERS[:3],
        Member("cloud-a", "cloud-a", "cloud", "cloud", 6),
        Member("cloud-b", "cloud-b", "cloud", "cloud", 6),
    ]
    steady = StaticView(
        paths={"cloud-a": LinkView(rtt_ms=40, jitter_ms=3), "cloud-b": LinkView(rtt_ms=45, jitter_ms=3)}
    )
    shaky = StaticView(
        paths={"cloud-a": LinkView(rtt_ms=40, jitter_ms=150), "cloud-b": LinkView(rtt_ms=45, jitter_ms=150)}
    )
    # steady routes: one replica (a race would only cost bytes); shaky ones: both, first answer stands
    calm = NetworkAware().plan(PlanContext(members, calibration(), steady, 1.0, 0.65))
    assert calm.kind != "race" and "cloud-b" not in calm.stages
    raced = NetworkAware().plan(PlanContext(members, calibration(), shaky, 1.0, 0.65))
    assert raced.kind == "race" and set(raced.stages) == {"cloud-a", "cloud-b"}


def test_static_policies_plan_the_same_whatever_the_network() -> None:
    for v in (view(5, 5), view(200, 400, up=False)):
        c = ctx(v)
        assert local_only("device").plan(c).stages == ("device",)
        assert remote_only("cloud").plan(c).stages == ("cloud",)
        assert confidence_cascade(["device", "edge", "cloud"], [0.7, 0.7]).plan(c).kind == "cascade"


# -- the Scheduled pattern on a bus (in-memory broker: pattern semantics, real familial agents) --------
async def _manager(memory, namespace, local_nodes, agents):
    from topologies import TopologyManager

    await local_nodes(agents, memory, namespace)
    mgr = TopologyManager(memory, namespace=namespace)
    await mgr.__aenter__()
    await mgr.client.wait_for_agents([a.split(":")[1].split("?")[0] for a in agents], timeout=30)
    return mgr


async def test_a_hanging_remote_is_answered_by_the_device_within_the_deadline(memory, namespace, local_nodes) -> None:
    from topologies.scheduling import Scheduled

    mgr = await _manager(
        memory,
        namespace,
        local_nodes,
        ["familial-device:device", "familial:device-deep?exit=edge", "scripted:cloud?hang=true"],
    )
    try:
        members = [MEMBERS[0], MEMBERS[1], MEMBERS[3]]
        pat = Scheduled(NetworkAware(), members, calibration(), view(10, 15), deadline_s=1.5)
        r = await mgr.run(pat, "12+30", timeout=1.5)
        assert r.ok and r.answer == "42"
        assert r.outcome.details["degraded"] is True
        assert r.outcome.details["answered_by"] == "device-deep"
        assert r.outcome.details["reason"].startswith("deadline fallback")
        # the static cloud-only policy has no fallback: the same request fails at its deadline
        static = Scheduled(remote_only("cloud"), members, calibration(), view(10, 15), deadline_s=1.0)
        s = await mgr.run(static, "12+30", timeout=1.0)
        assert not s.ok
    finally:
        await mgr.__aexit__(None, None, None)


async def test_plans_run_their_stages_with_the_chosen_encoding(memory, namespace, local_nodes) -> None:
    from topologies.scheduling import Scheduled

    mgr = await _manager(
        memory,
        namespace,
        local_nodes,
        ["familial-device:device", "familial-edge:edge", "familial-cloud:cloud"],
    )
    try:
        members = [MEMBERS[0], MEMBERS[2], MEMBERS[3]]
        cal = calibration()
        split16 = await mgr.run(
            Scheduled(fixed_split("device", "cloud", "float16"), members, cal, view(10, 15), deadline_s=5), "12+30"
        )
        split_text = await mgr.run(
            Scheduled(fixed_split("device", "cloud", "text"), members, cal, view(10, 15), deadline_s=5), "12+30"
        )
        for r in (split16, split_text):
            assert r.ok and r.answered_by == "cloud" and r.answer == "42"
        fwd16 = [e for e in split16.trace.events if e.kind == "forward"]
        fwd_text = [e for e in split_text.trace.events if e.kind == "forward"]
        assert fwd16 and fwd_text
        # float16 ships the device's hidden states (5 KB); "text" ships the prompt only
        assert fwd16[0].bytes > 5000 > fwd_text[0].bytes
        adaptive = await mgr.run(
            Scheduled(NetworkAware(), members, cal, view(10, 15), deadline_s=5), "12+30", timeout=5
        )
        assert adaptive.ok and adaptive.answer == "42"
        assert adaptive.outcome.details["answered_by"] in {"device", "edge", "cloud"}
    finally:
        await mgr.__aexit__(None, None, None)


def test_scenarios_ship_and_validate() -> None:
    from aiflow_agents.testbed import ScenarioError, load_scenario, shipped_scenarios

    names = set(shipped_scenarios())
    assert {"mobile-4g", "vehicle-tunnels", "factory-wifi", "good-5g"} <= names
    for n in names:
        sc = load_scenario(n)
        assert sc.tiers[sc.device].kind == "device"
    veh = load_scenario("vehicle-tunnels")
    assert veh.outages and veh.outages[0].down_at(6.0) and not veh.outages[0].down_at(10.0)
    assert veh.outages[0].down_at(18.0)  # periodic: the next tunnel
    assert veh.path("device", "cloud") == ["device", "edge"]
    with pytest.raises(ScenarioError, match="parent"):
        load_scenario({"name": "x", "tiers": {"device": {"kind": "device", "parent": "nowhere"}}})
    with pytest.raises(ScenarioError, match="root"):
        load_scenario(
            {
                "name": "x",
                "tiers": {
                    "device": {"kind": "device", "parent": "edge", "link": {}},
                    "edge": {"kind": "edge", "parent": "device", "link": {}},
                },
            }
        )


_ = asyncio


# -- execution of every plan kind, with scripted agents (in-memory broker) ----------------------------
class _Always:
    """A policy that returns one fixed plan (to drive Scheduled's execution paths)."""

    def __init__(self, plan) -> None:
        self.plan_ = plan
        self.name = plan.name

    def plan(self, ctx: PlanContext):
        return self.plan_


SCRIPTED = [
    Member("dev", "device", "device", "edge", 3, local=True),
    Member("edge", "edge", "edge", "edge", 3),
    Member("cloud", "cloud", "cloud", "cloud", 6),
    Member("cloud-a", "cloud-a", "cloud", "cloud", 6),
    Member("cloud-b", "cloud-b", "cloud", "cloud", 6),
]


async def _run_plan(mgr, plan, deadline: float = 3.0):
    from protocols import Envelope
    from topologies.scheduling import Scheduled

    pat = Scheduled(_Always(plan), SCRIPTED, calibration(), StaticView(), deadline_s=deadline)
    return await mgr.run(pat, Envelope.request("q"), timeout=deadline, check_online=False)


async def test_every_plan_kind_runs_and_flags_what_it_had_to_give_up(memory, namespace, local_nodes) -> None:
    from topologies.scheduling import Plan

    mgr = await _manager(
        memory,
        namespace,
        local_nodes,
        [
            "scripted:dev?answer=5&confidence=0.5",
            "scripted:edge?answer=7&confidence=0.9",
            "scripted:cloud?fail=true",
            "scripted:cloud-a?answer=1&delay=0.5",
            "scripted:cloud-b?answer=2",
        ],
    )
    try:
        # race: the first answer stands; the loser's request is still in the trace (its bytes crossed links)
        r = await _run_plan(mgr, Plan("race", "race", ("cloud-a", "cloud-b")))
        assert r.answer == "2" and r.outcome.details["answered_by"] == "cloud-b"
        assert not r.outcome.details["degraded"]
        lost = [e for e in r.trace.events if e.recipient == "cloud-a" and e.kind == "request"]
        assert lost and lost[0].bytes > 0 and "cancelled" in lost[0].label
        # hedge: a confident shallow answer stands at once
        h = await _run_plan(mgr, Plan("hedge", "hedge", ("edge", "cloud-a"), (0.8,)))
        assert h.answer == "7" and h.outcome.details["answered_by"] == "edge" and not h.outcome.details["degraded"]
        # hedge whose shallow tier is slow: the deeper answer stands as soon as it is back
        slow = await _run_plan(mgr, Plan("hedge", "hedge", ("cloud-a", "cloud-b"), (0.5,)))
        # (cloud-a's answer, confident, would stand if the hedge waited for the shallow tier first)
        assert slow.answer == "2" and slow.outcome.details["answered_by"] == "cloud-b"
        # hedge whose deeper tier fails: the unconfident shallow answer, flagged degraded
        d = await _run_plan(mgr, Plan("hedge", "hedge", ("edge", "cloud"), (0.95,)))
        assert d.answer == "7" and d.outcome.details["degraded"] and "cloud failed" in d.outcome.details["reason"]
        # a cascade whose last stage fails keeps the earlier answer, flagged degraded
        c = await _run_plan(mgr, Plan("cascade", "cascade", ("dev", "cloud"), (0.99,)))
        assert c.answer == "5" and c.outcome.details["degraded"]
    finally:
        await mgr.__aexit__(None, None, None)


async def test_a_failing_fallback_does_not_throw_away_a_remote_answer_in_time(memory, namespace, local_nodes) -> None:
    from topologies.scheduling import Plan

    mgr = await _manager(
        memory, namespace, local_nodes, ["scripted:dev?fail=true", "scripted:cloud-a?answer=1&delay=0.4"]
    )
    try:
        # the fallback starts after 0.1 s and fails at once; the remote answer arrives at 0.4 s, in time
        plan = Plan("text", "text", ("cloud-a",), fallback="dev", fallback_after_s=0.1)
        r = await _run_plan(mgr, plan, deadline=3.0)
        assert r.ok and r.answer == "1" and not r.outcome.details["degraded"]
        assert [e.kind for e in r.trace.events if e.sender == "dev"] == ["error"]  # the fallback ran, and failed
    finally:
        await mgr.__aexit__(None, None, None)


def test_the_telemetry_view_never_treats_an_unmeasured_or_dead_link_as_free() -> None:
    from types import SimpleNamespace

    from topologies.scheduling import TelemetryView

    est = {
        "n-edge": SimpleNamespace(
            rtt_ms=20.0,
            recent_rtt_ms=80.0,
            rtt_var_ms=2.0,
            throughput_bps=8e6,
            up=True,
            age=0.1,
            consecutive_failures=0,
        ),
        "n-cloud": SimpleNamespace(
            rtt_ms=30.0,
            recent_rtt_ms=30.0,
            rtt_var_ms=1.0,
            throughput_bps=None,
            up=False,
            age=3.0,
            consecutive_failures=2,
        ),
    }
    tel = SimpleNamespace(link=lambda n: est.get(n), agent=lambda a: None)
    view = TelemetryView(tel, {"edge": "n-edge", "cloud": "n-cloud", "far": "n-far"})
    assert view.path("edge").rtt_ms == 80.0  # a lasting rise in recent samples counts before the smoothed RTT
    assert not view.path("cloud").up
    assert view.path("far").rtt_ms is None  # never measured
    c = PlanContext(
        [Member("d", "device", "device", "device", 1, local=True), Member("f", "far", "cloud", "cloud", 6)],
        calibration(),
        view,
        1.0,
        0.65,
    )
    assert math.isinf(estimate(c, remote_only("f").plan(c)).mean_ms)


def test_bytes_are_attributed_to_every_link_a_message_crosses() -> None:
    from types import SimpleNamespace

    from aiflow_agents.testbed import load_scenario
    from demos.testbed_eval import _bytes_by_link
    from topologies.trace import MANAGER, Trace

    sc = load_scenario("mobile-4g")  # device -(device link)- edge -(edge link)- cloud
    trace = Trace()
    trace.record(MANAGER, "device", "request", nbytes=100, start=0, end=0)
    trace.record("device", "cloud", "forward", nbytes=5000, start=0, end=0)
    trace.record("cloud", MANAGER, "reply", nbytes=300, start=0, end=0)
    trace.record(MANAGER, "edge", "request", nbytes=50, start=0, end=0)
    r = SimpleNamespace(trace=trace)
    out = _bytes_by_link(r, sc, {"device": "device", "edge": "edge", "cloud": "cloud"})
    assert out == {"device": 5000 + 300 + 50, "edge": 5000 + 300}


def test_a_cascade_is_never_estimated_faster_than_sending_its_last_stage_the_text() -> None:
    from topologies.scheduling import Plan

    for v in (view(60, 40, up_bps=3e6), view(5, 10, up_bps=None), view(20, 300, up_bps=1e6, jitter=50)):
        c = ctx(v)
        text = estimate(c, remote_only("cloud").plan(c))
        chain = estimate(c, Plan("k", "cascade", ("device", "cloud"), (0.99,), "text"))
        assert chain.tail_ms >= text.tail_ms and chain.mean_ms >= text.mean_ms - 1e-9


def test_open_loop_arrivals_are_poisson_and_reproducible() -> None:
    from demos.testbed_eval import _poisson_arrivals

    a = _poisson_arrivals(2000, 20.0, seed=7)
    assert a == _poisson_arrivals(2000, 20.0, seed=7) and a[0] == 0.0
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert all(g >= 0 for g in gaps)
    assert 0.045 < sum(gaps) / len(gaps) < 0.055  # mean gap 1/rate
    assert sum(g < 0.05 for g in gaps) / len(gaps) > 0.55  # exponential: most gaps below the mean (1 - 1/e)
