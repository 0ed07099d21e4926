"""``aiflow graph draw`` / ``aiflow run`` on a user's file, and a user-written pattern."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aiflow_agents import BrokerURL
from protocols import Envelope
from topologies import AgentGraph, Outcome, Pattern, Runtime, TopologyManager, agent, ensemble

USER_FILE = """
from topologies import cascade, ensemble
graph = cascade(["u-dev", ensemble(["u1", "u2"], "vote", name="cloud")], accept="confidence>=0.8")
def make():
    return ensemble(["u1", "u2"], "vote")
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiflow_agents", *args], capture_output=True, text=True, timeout=120)


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
    spawn(
        ["scripted:u-dev?answer=1&confidence=0.1", "scripted:u1?answer=2", "scripted:u2?answer=2"], mosquitto, namespace
    )
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
    out = await asyncio.to_thread(cli, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "answer:" in out.stdout and "answered by" in out.stdout
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["answer"] == "2" and data["answered_by"] == "cloud"
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


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
