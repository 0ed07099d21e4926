"""Pattern semantics, exactly, with deterministic scripted agents.

The patterns run on nodes in this process over the in-memory broker (``memory`` + ``local_nodes``):
what is tested is the patterns, not the transport. Two tests keep nodes in separate processes on the
real Mosquitto: one where a node's process is killed, and one end-to-end ensemble.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiflow_agents import AgentContext, AgentSpec, AgentUnavailableError, BrokerURL, Node, Reply, ScriptedAgent
from protocols import Envelope
from topologies import (
    AgentGraph,
    GraphError,
    RunResult,
    TopologyManager,
    agent,
    cascade,
    debate,
    ensemble,
    mixture_of_agents,
    verifier,
)
from topologies.graph import TIER_COLORS, UNKNOWN_TIER
from topologies.trace import BROKER, COPY, MANAGER, Trace

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def start(launch, broker: BrokerURL, namespace: str, *nodes: list[str]) -> AsyncIterator[TopologyManager]:
    """Start one node per list of agent specs (``spawn``: a process, ``local_nodes``: in this process),
    and a manager that waits until all are online."""
    for agents in nodes:
        started = launch(agents, broker, namespace)
        if inspect.isawaitable(started):
            await started
    ids = [AgentSpec.parse(a).agent_id or AgentSpec.parse(a).type_name for agents in nodes for a in agents]
    async with TopologyManager(broker, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(ids, timeout=60)
        yield mgr


def requests_to(result: RunResult, agent: str) -> list[dict]:
    return [e for e in result.trace.to_list() if e["recipient"] == agent and e["kind"] in ("request", "forward")]


async def test_ensemble_vote_publishes_once_to_a_group(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await _vote_once_to_a_group(local_nodes, memory, namespace)


async def test_ensemble_vote_across_node_processes(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    """End to end: node processes on the real Mosquitto (shared subscriptions over a real broker)."""
    await _vote_once_to_a_group(spawn, mosquitto, namespace)


async def _vote_once_to_a_group(launch, broker: BrokerURL, namespace: str) -> None:
    async with start(
        launch, broker, namespace, ["scripted:a1?answer=7", "scripted:a2?answer=7"], ["scripted:a3?answer=5"]
    ) as mgr:
        r = await mgr.run(ensemble(["a1", "a2", "a3"], "vote"), "3+4?", timeout=20)
        assert r.ok and r.answer == "7"
        assert r.outcome.details["votes"] == {"7": 2.0, "5": 1.0}
        requests = [e for e in r.trace.to_list() if e["kind"] == "request"]
        assert len(requests) == 1 and requests[0]["via"] == "group" and requests[0]["recipient"].startswith("group:")
        assert requests[0]["members"] == ["a1", "a2", "a3"]  # whom the broker copies it to (timeline draws it)
        replies = sorted(e["sender"] for e in r.trace.to_list() if e["kind"] == "reply")
        assert replies == ["a1", "a2", "a3"]
        assert {c["agent"]: c["answer"] for c in r.contributions()} == {"a1": "7", "a2": "7", "a3": "5"}
        # weighted vote with explicit weights flips it
        w = await mgr.run(ensemble(["a1", "a2", "a3"], "weighted", weights={"a3": 5.0}), "3+4?", timeout=20)
        assert w.answer == "5"


async def test_ensemble_quorum_and_failures_are_listed(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(
        local_nodes, memory, namespace, ["scripted:ok1?answer=42", "scripted:bad?fail=true", "scripted:slow?hang=true"]
    ) as mgr:
        r = await mgr.run(ensemble(["ok1", "bad", "slow"], "vote"), "q", timeout=1)
        assert r.ok and r.answer == "42"
        failed = r.outcome.details["failed"]
        assert set(failed) == {"bad", "slow"}
        assert "scripted_failure" in failed["bad"] and "timeout" in failed["slow"]
        strict = await mgr.run(ensemble(["ok1", "bad", "slow"], "vote", quorum=2), "q", timeout=1)
        assert not strict.ok and "quorum not met" in (strict.error or "")


async def test_ensemble_cross_scoring_beats_the_vote_when_scores_say_so(
    memory: BrokerURL, namespace: str, local_nodes
) -> None:
    async with start(
        local_nodes,
        memory,
        namespace,
        ['scripted:c1?answer=7&scores={"7":-1,"5":-3}', 'scripted:c2?answer=5&scores={"7":-1,"5":-4}'],
        ['scripted:c3?answer=5&scores={"7":-1,"5":-2.5}'],
    ) as mgr:
        voted = await mgr.run(ensemble(["c1", "c2", "c3"], "vote"), "x", timeout=20)
        scored = await mgr.run(ensemble(["c1", "c2", "c3"], "cross_score"), "x", timeout=20)
        assert voted.answer == "5" and scored.answer == "7"
        d = scored.outcome.details
        assert d["candidates"] == ["7", "5"] and d["totals"] == [-3.0, -9.5]
        # each member scored every proposal: one score request (group) with both candidates
        score_reqs = [
            e for e in scored.trace.to_list() if e["label"].endswith("cross-score") and e["kind"] == "request"
        ]
        assert len(score_reqs) == 1


async def test_every_model_call_is_counted_in_the_cost(memory: BrokerURL, namespace: str, local_nodes) -> None:
    """Scoring, judging and aggregating are model calls too: a cost that counted only the proposals
    would make cross-scoring look as cheap as a vote (and shrink the self-ensemble baseline's budget)."""
    vocab = '["A","B","<eos>"]'
    async with start(
        local_nodes,
        memory,
        namespace,
        [
            'scripted:k1?answer=7&scores={"7":-1,"5":-3}',
            'scripted:k2?answer=5&scores={"7":-1,"5":-4}',
            'scripted:k3?answer=5&scores={"7":-1,"5":-2.5}',
        ],
        ["scripted:same1?answer=4", "scripted:same2?answer=4", "scripted:kj?judge_pick=5"],
        [f"scripted:l{i}?answer=A&vocab={vocab}&dist=[0.6,0.4,0]" for i in range(3)],
    ) as mgr:

        async def calls(pattern) -> int:
            r = await mgr.run(pattern, "x", timeout=20)
            assert r.ok, r.error
            return r.outcome.cost.model_calls

        trio = ["k1", "k2", "k3"]
        assert await calls(ensemble(trio, "vote")) == 3
        assert await calls(ensemble(trio, "cross_score")) == 3 + 3  # proposals, then one score call each
        assert await calls(ensemble(["same1", "same2"], "cross_score")) == 2  # unanimous: nothing to score
        assert await calls(ensemble(trio, "judge", judge="kj")) == 3 + 1
        assert await calls(debate(trio, rounds=2, aggregate="cross_score")) == 3 + 3 + 3
        assert await calls(debate(trio, rounds=2, aggregate="judge", judge="kj")) == 3 + 3 + 1
        assert await calls(mixture_of_agents([trio], aggregator="kj")) == 3 + 1
        # latent: every member is asked once per decoding step (token A, then end of sequence)
        assert await calls(ensemble(["l0", "l1", "l2"], "latent")) == 3 * 2


async def test_latent_averaging_differs_from_text_voting(memory: BrokerURL, namespace: str, local_nodes) -> None:
    vocab = '["A","B","<eos>"]'
    async with start(
        local_nodes,
        memory,
        namespace,
        [
            f"scripted:l1?answer=A&vocab={vocab}&dist=[0.51,0.49,0]",
            f"scripted:l2?answer=A&vocab={vocab}&dist=[0.51,0.49,0]",
        ],
        [f"scripted:l3?answer=B&vocab={vocab}&dist=[0,1,0]"],
    ) as mgr:
        voted = await mgr.run(ensemble(["l1", "l2", "l3"], "vote"), "pick", timeout=20)
        latent = await mgr.run(ensemble(["l1", "l2", "l3"], "latent"), "pick", timeout=20)
        assert voted.answer == "A"
        assert latent.answer == "B"  # (0.49 + 0.49 + 1) / 3 > (0.51 + 0.51 + 0) / 3
        steps = latent.outcome.details["steps"]
        assert steps[0]["token_id"] == 1 and steps[-1]["token_id"] == 2 and steps[0]["members"] == 3


async def test_ensemble_with_judge(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(
        local_nodes, memory, namespace, ["scripted:j1?answer=1", "scripted:j2?answer=2", "scripted:judge?judge_pick=2"]
    ) as mgr:
        r = await mgr.run(ensemble(["j1", "j2"], "judge", judge="judge"), "which?", timeout=20)
        assert r.answer == "2" and r.outcome.details["judge"] == "judge"


async def test_debate_rounds_see_peers_and_continue_without_a_dead_agent(
    mosquitto: BrokerURL, namespace: str, spawn
) -> None:
    async with start(
        spawn,
        mosquitto,
        namespace,
        ["scripted:d1?answer=5&follow_majority=true", "scripted:d2?answer=7"],
        ["scripted:d3?answer=7&crash_after=1"],
    ) as mgr:
        r = await mgr.run(debate(["d1", "d2", "d3"], rounds=2), "2+5?", timeout=10)
        rounds = r.outcome.details["rounds"]
        assert rounds[0]["answers"] == {"d1": "5", "d2": "7", "d3": "7"}
        # round 2: d1 saw the others' answers and changed its mind; d3's node died
        assert rounds[1]["answers"]["d1"] == "7" and rounds[1]["answers"]["d3"] is None
        assert "d3" in r.outcome.details["dropped"]
        assert r.ok and r.answer == "7"


async def test_cascade_escalates_in_direct_hops(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(
        local_nodes,
        memory,
        namespace,
        ["scripted:dev?answer=1&confidence=0.3"],
        ["scripted:edge?answer=2&confidence=0.9"],
        ["scripted:cloud?answer=3&confidence=1.0"],
    ) as mgr:
        r = await mgr.run(cascade(["dev", "edge", "cloud"], accept="confidence>=0.8"), "hard?", timeout=20)
        assert r.ok and r.answer == "2" and r.answered_by == "edge"
        events = r.trace.to_list()
        # one request from the manager, one forward device->edge, one reply edge->manager; cloud never asked
        assert [(e["sender"], e["recipient"], e["kind"]) for e in events] == [
            ("manager", "dev", "request"),
            ("dev", "edge", "forward"),
            ("edge", "manager", "reply"),
        ]
        stages = r.outcome.details["stages"]
        assert [(s["member"], s["answer"]) for s in stages] == [("dev", "1"), ("edge", "2")]
        per_stage = await mgr.run(cascade(["dev", "edge", "cloud"], accept=[0.5, 0.95]), "hard?", timeout=20)
        assert per_stage.answered_by == "cloud" and per_stage.answer == "3"  # edge's 0.9 < its own 0.95
        lenient = await mgr.run(cascade(["dev", "edge", "cloud"], accept=[0.2, 0.95]), "hard?", timeout=20)
        assert lenient.answered_by == "dev" and not requests_to(lenient, "edge")
        confident = await mgr.run(cascade(["edge", "cloud"], accept=0.8), "easy", timeout=20)
        assert confident.answered_by == "edge" and not requests_to(confident, "cloud")


async def test_cascade_falls_through_on_error_and_on_timeout(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(
        local_nodes,
        memory,
        namespace,
        ["scripted:broken?fail=true", "scripted:stuck?hang=true"],
        ["scripted:backup?answer=ok&confidence=0.95"],
    ) as mgr:
        r = await mgr.run(cascade(["broken", "backup"], accept=0.8), "x", timeout=20)
        assert r.answer == "ok" and r.answered_by == "backup"
        assert "scripted_failure" in r.outcome.details["stages"][0]["error"]
        r2 = await mgr.run(cascade(["stuck", "backup"], accept=0.8, hop_timeout=0.5), "x", timeout=60)
        assert r2.answer == "ok" and r2.answered_by == "backup"  # the stuck hop timed out, not the whole run
        assert "timeout" in r2.outcome.details["stages"][0]["error"]
        assert any(e["kind"] == "timeout" and e["sender"] == "stuck" for e in r2.trace.to_list())


async def test_cascade_with_a_verifier_agent(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(
        local_nodes,
        memory,
        namespace,
        ["scripted:v-dev?answer=1", "scripted:v-edge?answer=2", "scripted:v-cloud?answer=3"],
        ['scripted:ver?accept_answers=["2"]'],
    ) as mgr:
        r = await mgr.run(cascade(["v-dev", "v-edge", "v-cloud"], accept=verifier("ver")), "x", timeout=20)
        assert r.answer == "2" and r.answered_by == "v-edge"
        assert [s.get("verified") for s in r.outcome.details["stages"]] == [False, True]
        assert not requests_to(r, "v-cloud")
        assert len([e for e in r.trace.to_list() if e["recipient"] == "ver"]) == 2


async def test_patterns_nest(memory: BrokerURL, namespace: str, local_nodes) -> None:
    g = cascade(["n-dev", ensemble(["n1", "n2", "n3"], "vote", name="cloud-ensemble")], accept="confidence>=0.8")
    assert set(g.agent_ids()) == {"n-dev", "n1", "n2", "n3"}
    async with start(
        local_nodes,
        memory,
        namespace,
        ["scripted:n-dev?answer=9&confidence=0.2"],
        ["scripted:n1?answer=4", "scripted:n2?answer=4", "scripted:n3?answer=6"],
    ) as mgr:
        r = await mgr.run(g, "q", timeout=20)
        assert r.answer == "4" and r.answered_by == "cloud-ensemble"


async def test_mixture_of_agents_feeds_layers_forward(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(
        local_nodes,
        memory,
        namespace,
        ["scripted:p1?answer=x", "scripted:p2?answer=y", "scripted:p3?answer=y"],
        ["scripted:refine?answer=z&follow_majority=true", "scripted:agg?answer=none&follow_majority=true"],
    ) as mgr:
        r = await mgr.run(mixture_of_agents([["p1", "p2", "p3"], ["refine"]], aggregator="agg"), "q", timeout=20)
        layers = r.outcome.details["layers"]
        assert layers[0]["answers"] == {"p1": "x", "p2": "y", "p3": "y"}
        assert layers[1]["answers"] == {"refine": "y"}  # it saw layer 1's answers
        assert r.answer == "y" and r.outcome.details["aggregator"] == "agg"


async def test_hand_built_graph_runs_as_dataflow(memory: BrokerURL, namespace: str, local_nodes) -> None:
    g = AgentGraph("flow")
    for a, tier in (("g1", "device"), ("g2", "edge"), ("g3", "cloud")):
        g.add_agent(a, tier)
    g.add_flow("g1", "g3")
    g.add_flow("g2", "g3")
    async with start(
        local_nodes,
        memory,
        namespace,
        ["scripted:g1?answer=a", "scripted:g2?answer=b", "scripted:g3?follow_majority=true"],
    ) as mgr:
        r = await mgr.run(g, "q", timeout=20)
        assert r.answer == "a" and r.outcome.details["sinks"] == ["g3"]


async def test_nothing_hangs_past_the_run_deadline(memory: BrokerURL, namespace: str, local_nodes) -> None:
    async with start(local_nodes, memory, namespace, ["scripted:h1?hang=true", "scripted:h2?hang=true"]) as mgr:
        async with asyncio.timeout(60):  # far beyond the run's own deadline: a hang fails here
            r = await mgr.run(debate(["h1", "h2"], rounds=3), "q", timeout=0.5)
        assert not r.ok and r.error


async def test_offline_agents_fail_fast_and_validation_errors_are_clear(memory: BrokerURL, namespace: str) -> None:
    async with TopologyManager(memory, namespace=namespace, presence_timeout=0.5) as mgr:
        async with asyncio.timeout(15):  # presence_timeout, not the run's 60 s, decides
            with pytest.raises(AgentUnavailableError, match="ghost"):
                await mgr.run(ensemble(["ghost", "phantom"]), "q", timeout=60)
    with pytest.raises(GraphError, match="no members"):
        ensemble([]).validate()
    with pytest.raises(GraphError, match="rounds"):
        debate(["a", "b"], rounds=0)
    with pytest.raises(GraphError, match="quorum"):
        ensemble(["a", "b"], quorum=3)
    with pytest.raises(GraphError, match="judge"):
        ensemble(["a", "b"], "judge")
    with pytest.raises(GraphError, match="unknown aggregate"):
        ensemble(["a"], "median")
    with pytest.raises(GraphError, match="cycle"):
        cascade(["a", "b", "a"])
    with pytest.raises(GraphError, match="acceptance policy"):
        cascade(["a", "b"], accept="vibes")
    with pytest.raises(GraphError, match="invalid agent id"):
        ensemble(["bad/id"])
    with pytest.raises(GraphError, match="threshold"):
        cascade(["a"], accept=1.5)
    g = AgentGraph("loop")
    g.add_agent("x")
    g.add_agent("y")
    g.add_flow("x", "y")
    g.add_flow("y", "x")
    with pytest.raises(GraphError, match="cycle"):
        g.validate(acyclic=True)
    with pytest.raises(GraphError, match="unknown agent"):
        g.validate(known=["x"])


def test_graph_pictures_and_mermaid(tmp_path: Path) -> None:
    g = cascade(["dev", "edge", ensemble(["c1", "c2"], "vote")], accept=0.7).graph()
    mmd = g.to_mermaid()
    assert mmd.startswith("flowchart LR") and "escalate" in mmd
    svg = g.draw(tmp_path / "g.svg").read_text()
    assert svg.lstrip().startswith(("<?xml", "<svg")) and all(
        f"<!-- {a} -->" in svg for a in ("dev", "edge", "c1", "c2")
    )
    assert [p.name for p in tmp_path.iterdir()] == ["g.svg"]  # the format follows the suffix: one file
    assert g.draw(tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_graph_tiers_from_pattern_then_presence_and_legend_lists_only_known_ones() -> None:
    p = cascade([agent("dev", "device"), ensemble(["c1", "c2"], "vote", name="cloud-vote")], accept=0.7)
    g = p.graph()
    nodes, flows = g.legend()
    assert [lab for lab, _ in nodes] == ["device", UNKNOWN_TIER, "pattern step"]  # no edge/cloud: none drawn
    assert dict(nodes)[UNKNOWN_TIER] == TIER_COLORS[None]
    # presence fills the gaps; a tier the pattern sets wins over presence
    assert sorted(g.fill_tiers({"dev": "cloud", "c1": "cloud", "c2": "gpu-rack", "ghost": "edge"})) == ["c1", "c2"]
    assert (g.tier_of("dev"), g.tier_of("c1"), g.tier_of("c2")) == ("device", "cloud", "gpu-rack")
    nodes, _ = g.legend()
    assert [lab for lab, _ in nodes] == ["device", "cloud", "gpu-rack", "pattern step"]
    assert len({c for _, c in nodes}) == len(nodes)  # every tier its own fill
    mmd = g.to_mermaid()
    assert "classDef tier_device" in mmd and "classDef tier_gpu_rack" in mmd and "tier_edge" not in mmd
    untiered = ensemble(["u1", "u2"]).graph()
    assert [lab for lab, _ in untiered.legend()[0]] == [UNKNOWN_TIER, "pattern step"]
    assert "classDef" not in untiered.to_mermaid()
    assert len({c for _, c, _ in flows}) == len(flows)  # flows told apart by colour, one legend entry each


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_graph_layout_left_to_right_boxes_apart_and_edges_clear_of_boxes() -> None:
    long_id = "a-rather-long-agent-identifier_on_the-edge"
    p = cascade(["dev", long_id, ensemble(["c1", "c2", "c3"], "cross_score", name="cloud")], accept=0.7)
    g = p.graph()
    label = g.node_label(long_id)
    assert all(len(line) <= 18 for line in label.split("\n")) and label.replace("\n", "") == long_id
    lay = g.layout()
    x = {n: xy[0] for n, xy in lay.pos.items()}
    assert x["task"] < x["dev"] < x[long_id] < x["c1"] == x["c2"] == x["c3"] < x["answer"]
    boxes = list(lay.boxes.items())
    for i, (n, a) in enumerate(boxes):
        for m, b in boxes[i + 1 :]:
            assert not _overlap(a, b), (n, m)
    for e in lay.edges:  # an edge that skips columns bends around the boxes it passes
        for pt in e.points[1:-1]:
            assert not any(_overlap((*pt, *pt), b) for b in lay.boxes.values()), e
    assert any(len(e.points) > 2 for e in lay.edges)  # "accepted" from dev skips to the answer


def test_graph_debate_cycle_is_one_boxed_column() -> None:
    g = debate(["d1", "d2", "d3"], rounds=2).graph()
    lay = g.layout()
    assert len(lay.clusters) == 1 and sorted(lay.clusters[0].nodes) == ["d1", "d2", "d3"]
    assert "previous answer" in lay.clusters[0].caption
    assert "previous answer" not in [lab for lab, _, _ in g.legend()[1]]  # not drawn edge by edge
    assert {e.label for e in lay.edges} == {"task", "round 2", "answer"}


def _group_trace() -> Trace:
    t = Trace()
    t.record(MANAGER, "dev", "request", nbytes=10, start=0.0, end=0.0, label="c stage 1")
    t.record("dev", "edge", "forward", nbytes=20, start=0.001, end=0.002, via="forward")
    t.record("edge", MANAGER, "error", start=0.002, end=0.003, error="boom")
    t.record(MANAGER, "group:g-1", "request", nbytes=30, start=0.010, end=0.011, via="group", members=["a", "b"])
    t.record("a", MANAGER, "reply", start=0.010, end=0.020, via="group")
    t.record("b", MANAGER, "reply", start=0.010, end=0.030, via="group")
    t.record("edge", MANAGER, "event", start=0.031, end=0.031)
    return t


def test_timeline_colours_each_kind_apart_and_draws_the_broker_copies(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgb

    t = _group_trace()
    spec = t.timeline_spec()
    assert spec.lanes[:2] == [MANAGER, BROKER] and not any(x.startswith("group:") for x in spec.lanes)
    kinds = [k for k, _, _ in spec.legend]
    assert kinds == ["request", "reply", "event", "error", "forward", COPY]  # only kinds that occur
    solid = [to_rgb(c) for k, c, _ in spec.legend if k != COPY]
    for i, a in enumerate(solid):  # clearly apart: no two kinds within a small RGB distance
        for b in solid[i + 1 :]:
            assert sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5 > 0.3
    (publish,) = [a for a in spec.arrows_of("request") if a.y1 == spec.lanes.index(BROKER)]
    assert publish.y0 == spec.lanes.index(MANAGER)
    copies = spec.arrows_of(COPY)
    assert sorted(spec.lanes[c.y1] for c in copies) == ["a", "b"]
    assert all(c.y0 == spec.lanes.index(BROKER) and c.x0 == publish.x1 for c in copies)
    for r in spec.arrows_of("reply"):  # each member's reply leaves from where its copy landed
        copy = next(c for c in copies if c.y1 == r.y0)
        assert r.x0 == copy.x1 and r.y1 == spec.lanes.index(MANAGER)
    assert t.timeline(tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_trace_json_stays_compatible_and_old_traces_still_show_copies() -> None:
    t = _group_trace()
    events = json.loads(t.to_json())["events"]
    old_keys = {"seq", "sender", "recipient", "kind", "bytes", "start", "end", "label", "via", "error"}
    assert all(old_keys | {"correlation_id", "latency_ms"} <= set(ev) for ev in events)
    old = [{k: v for k, v in ev.items() if k != "members"} for ev in events]  # written before members existed
    spec = Trace.from_list(old).timeline_spec()
    assert sorted(spec.lanes[c.y1] for c in spec.arrows_of(COPY)) == ["a", "b"]  # inferred from the replies


async def test_trace_exports_json_and_timeline(memory: BrokerURL, namespace: str, local_nodes, tmp_path: Path) -> None:
    async with start(
        local_nodes, memory, namespace, ["scripted:t1?answer=1&confidence=0.1", "scripted:t2?answer=2"]
    ) as mgr:
        r = await mgr.run(cascade(["t1", "t2"], accept=0.5), "q", timeout=20)
    data = json.loads(r.to_json(tmp_path / "run.json"))
    assert data["answer"] == "2" and data["answered_by"] == "t2"
    for ev in data["trace"]:
        assert {"sender", "recipient", "kind", "bytes", "start", "end", "latency_ms", "error"} <= set(ev)
    assert sum(ev["bytes"] for ev in data["trace"]) == data["bytes_on_wire"] > 0
    assert r.trace.timeline(tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


async def test_large_ensemble_runs_concurrently(memory: BrokerURL, namespace: str) -> None:
    """All 8 members must be inside their handlers at once: each waits for the other 7, so a run that
    asked them one after another (or a node that served them in turn) would time out instead."""
    members = [f"w{i}" for i in range(8)]
    inside: set[str] = set()
    everyone = asyncio.Event()

    class Rendezvous(ScriptedAgent):
        async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
            inside.add(self.agent_id)
            if len(inside) == len(members):
                everyone.set()
            await everyone.wait()
            return await super().handle(request, ctx)

    nodes = [
        Node([Rendezvous(m, answer="1") for m in half], memory, namespace=namespace)
        for half in (members[:4], members[4:])
    ]
    for node in nodes:
        await node.start()
    try:
        async with TopologyManager(memory, namespace=namespace) as mgr:
            await mgr.client.wait_for_agents(members, timeout=10)
            r = await mgr.run(ensemble(members), "q", timeout=10)
        assert r.ok and r.answer == "1" and everyone.is_set()
        assert sorted(c["agent"] for c in r.contributions()) == members
    finally:
        for node in nodes:
            await node.stop(grace=1.0)
