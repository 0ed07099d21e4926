"""``aiflow graph draw`` / ``aiflow run`` on a user's file, and a user-written pattern."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from aiflow_agents import BrokerURL
from protocols import Envelope
from topologies import AgentGraph, Outcome, Pattern, RunResult, Runtime, TopologyManager, agent, ensemble
from topologies.cli import trace_table
from topologies.trace import Trace

USER_FILE = """
from topologies import cascade, ensemble
graph = cascade(["u-dev", ensemble(["u1", "u2"], "vote", name="cloud")], accept="confidence>=0.8")
def make():
    return ensemble(["u1", "u2"], "vote")
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiflow_agents", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_graph_draw_from_a_user_file(tmp_path: Path) -> None:
    f = tmp_path / "mygraph.py"
    f.write_text(USER_FILE)
    out = cli("graph", "draw", f"{f}:graph", "--out", str(tmp_path / "g.svg"))
    assert out.returncode == 0, out.stderr
    assert "flowchart LR" in out.stdout and "u-dev" in out.stdout
    assert (tmp_path / "g.svg").stat().st_size > 1000
    mmd = cli("graph", "draw", f"{f}:make", "--out", str(tmp_path / "g.mmd"))
    assert mmd.returncode == 0 and "u1" in (tmp_path / "g.mmd").read_text()


@pytest.mark.timeout(180)
async def test_run_command_prints_answer_and_writes_trace(
    mosquitto: BrokerURL, namespace: str, spawn, tmp_path: Path
) -> None:
    f = tmp_path / "mygraph.py"
    f.write_text(USER_FILE)
    spawn(["scripted:u-dev?answer=1&confidence=0.1"], mosquitto, namespace, tier="device")
    spawn(["scripted:u1?answer=2", "scripted:u2?answer=2"], mosquitto, namespace, tier="cloud")
    async with TopologyManager(mosquitto, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["u-dev", "u1", "u2"], timeout=60)
    args = [
        "run",
        f"{f}:graph",
        "--task",
        "1+1",
        "--broker",
        str(mosquitto),
        "-n",
        namespace,
        "--trace-out",
        str(tmp_path / "run.json"),
        "--timeline",
        str(tmp_path / "t.png"),
    ]
    out = await asyncio.to_thread(cli, *args, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "answer:" in out.stdout and "answered by" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 80 and "…" not in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert {"u-dev", "group[2]", "u1", "u2", "manager"} <= {w for r in rows for w in r[1:3]}  # whole ids
    wide = await asyncio.to_thread(cli, *args, "--wide", env={"COLUMNS": "250"})
    assert wide.returncode == 0 and "group:g-" in wide.stdout and "correlation id" in wide.stdout
    # the pattern sets no tiers: without a broker they are unknown, with one presence has them
    drawn = await asyncio.to_thread(cli, "graph", "draw", f"{f}:graph", "--out", str(tmp_path / "g.png"))
    assert drawn.returncode == 0 and "tier unknown: u-dev, u1, u2" in drawn.stdout
    args = ["graph", "draw", f"{f}:graph", "--out", str(tmp_path / "g.png"), "-b", str(mosquitto), "-n", namespace]
    drawn = await asyncio.to_thread(cli, *args)
    assert drawn.returncode == 0, drawn.stdout + drawn.stderr
    assert "tiers from presence: u-dev=device, u1=cloud, u2=cloud" in drawn.stdout
    assert "tier unknown" not in drawn.stdout and "classDef tier_cloud" in drawn.stdout
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["answer"] == "2" and data["answered_by"] == "cloud"
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def _fake_run() -> RunResult:
    t = Trace()
    long_label = "a rather long label that says which stage of which nested pattern this was"
    t.record("manager", "device-llm-q4", "request", nbytes=551, start=0.0, end=0.0, label=long_label)
    t.record("device-llm-q4", "edge-llm", "forward", nbytes=791, start=0.001, end=0.01, via="forward")
    t.record("manager", "group:g-0123456789ab", "request", start=0.02, end=0.021, via="group", members=["c1", "c2"])
    t.record("c1", "manager", "reply", nbytes=551, start=0.02, end=0.05, via="group", label="cloud round 1")
    t.record("c2", "manager", "error", start=0.02, end=0.06, via="group", error="timeout: no reply from 'c2' " * 3)
    return RunResult("cascade", "q", "2", Outcome(source="cascade", kind="cascade"), t, 0.0, 0.06)


def test_run_table_fits_80_columns_without_cutting_ids() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(trace_table(_fake_run()))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 5  # one line per message: nothing wraps
    assert [r[1:3] for r in rows] == [
        ["manager", "device-llm-q4"],
        ["device-llm-q4", "edge-llm"],
        ["manager", "group[2]"],
        ["c1", "manager"],
        ["c2", "manager"],
    ]
    assert "cloud round 1" in text and "timeout: no reply" in text  # the error stands in for the label
    assert "a rather long lab" in text  # a long label is cut to the room left, ids never
    wide = Console(width=300, record=True, file=io.StringIO())
    wide.print(trace_table(_fake_run(), wide=True))
    full = wide.export_text()
    assert "group:g-0123456789ab" in full and "c1, c2" in full and "…" not in full
    assert "which nested pattern this was" in full


class MostConfident(Pattern):
    """A user's own pattern, built from the same public blocks as the built-ins."""

    kind = "most_confident"

    def __init__(self, members: list[str]) -> None:
        super().__init__()
        self._members = [agent(m) for m in members]

    def members(self) -> list:
        return list(self._members)

    def graph(self) -> AgentGraph:
        g = AgentGraph(self.name)
        g.add_step("task", "task")
        g.add_step("answer", "answer")
        for m in self._members:
            g.add_agent(m)
            g.add_flow("task", m.agent_id)
            g.add_flow(m.agent_id, "answer")
        return g

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        outs = await rt.ask_many(self._members, task, label="ask")
        best = max((o for o in outs if o.ok), key=lambda o: o.confidence or 0.0)
        return Outcome(
            source=self.name, kind=self.kind, answer=best.answer, children=outs, details={"picked": best.source}
        )


async def test_user_pattern_runs_and_nests(memory: BrokerURL, namespace: str, local_nodes) -> None:
    await local_nodes(
        ["scripted:m1?answer=a&confidence=0.2", "scripted:m2?answer=b&confidence=0.9", "scripted:m3?answer=c"],
        memory,
        namespace,
    )
    async with TopologyManager(memory, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["m1", "m2", "m3"], timeout=60)
        r = await mgr.run(MostConfident(["m1", "m2"]), "q", timeout=20)
        assert r.answer == "b" and r.outcome.details["picked"] == "m2"
        nested = await mgr.run(ensemble([MostConfident(["m1", "m2"]), "m3", "m2"], "vote"), "q", timeout=20)
        assert nested.answer == "b"
