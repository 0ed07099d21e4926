"""What the dashboard's form can start, and one run as the dashboard keeps it.

The form builds the same patterns a user writes in Python (``ensemble``, ``debate``, ``cascade``,
``mixture_of_agents``), so a run started from the page is the run ``aiflow run`` would make."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..cascade import Cascade
from ..debate import Debate
from ..ensemble import Ensemble
from ..graph import AgentGraph, GraphError
from ..moa import MixtureOfAgents
from ..pattern import Pattern
from ..policy import parse_policy
from ..trace import Trace, TraceEvent

PatternKind = Literal["single", "ensemble", "debate", "cascade", "moa"]


class RunSpec(BaseModel):
    """A pattern over online agents and a task: what the page's form sends (``POST /api/runs``)."""

    model_config = ConfigDict(extra="forbid")

    pattern: PatternKind
    members: list[str] = Field(min_length=1, max_length=32)
    task: str = Field(min_length=1, max_length=8000)
    aggregate: Literal["vote", "weighted", "cross_score"] = "vote"
    rounds: int = Field(default=2, ge=1, le=8)  # debate rounds
    accept: str = "confidence>=0.8"
    aggregator: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=600)

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[str]) -> list[str]:
        if len(set(members)) != len(members):
            raise ValueError("members must be distinct")
        return members

    def build(self) -> Pattern:
        """The pattern; :class:`GraphError` or ``ValueError`` when the choice cannot run."""
        m = self.members
        if self.pattern == "single":
            if len(m) != 1:
                raise GraphError("a single-agent run takes exactly one member")
            return Ensemble(m, name=m[0])
        if self.pattern == "ensemble":
            return Ensemble(m, aggregate=self.aggregate)
        if self.pattern == "debate":
            return Debate(m, rounds=self.rounds, aggregate=self.aggregate)
        if self.pattern == "cascade":
            return Cascade(m, accept=parse_policy(self.accept))
        if not self.aggregator:
            raise GraphError("a mixture of agents needs an aggregator agent")
        # one layer of proposers (an agent in two layers would answer itself: the graph forbids it)
        return MixtureOfAgents([m], self.aggregator)


def graph_json(graph: AgentGraph) -> dict[str, Any]:
    """Nodes with a layered layout (left to right, by distance from the task) and edges, for the page."""
    g = graph.g
    try:
        layers = [sorted(gen) for gen in nx.topological_generations(g)]
    except nx.NetworkXUnfeasible:  # a debate: agents answer each other, so layer by distance instead
        sources = [n for n in g if g.in_degree(n) == 0] or list(g)[:1]
        depth: dict[str, int] = {}
        for s in sources:
            for n, d in nx.single_source_shortest_path_length(g, s).items():
                depth[n] = min(d, depth.get(n, d))
        for n in g:
            depth.setdefault(n, 0)
        layers = [sorted(n for n in g if depth[n] == d) for d in range(max(depth.values()) + 1)]
    pos = {n: (x, y) for x, layer in enumerate(layers) for y, n in enumerate(layer)}
    nodes = [
        {
            "id": n,
            "kind": d.get("kind"),
            "tier": d.get("tier"),
            "x": pos[n][0],
            "y": pos[n][1],
            "rows": len(layers[pos[n][0]]),
        }
        for n, d in g.nodes(data=True)
    ]
    seen: set[tuple[str, str, str]] = set()
    edges = []
    for u, v, d in g.edges(data=True):
        key = (u, v, str(d.get("kind", "")))
        if key not in seen:
            seen.add(key)
            edges.append({"source": u, "target": v, "kind": key[2]})
    return {"name": graph.name, "nodes": nodes, "edges": edges, "columns": len(layers)}


class LiveTrace(Trace):
    """A trace that also hands each event to ``on_event`` as it is recorded (messages move live)."""

    def __init__(self, on_event: Callable[[TraceEvent], None]) -> None:
        super().__init__()
        self.on_event = on_event

    def record(self, sender: str, recipient: str, kind: str, **kw: Any) -> TraceEvent:
        ev = super().record(sender, recipient, kind, **kw)
        self.on_event(ev)
        return ev


@dataclass
class RunRecord:
    """A run the dashboard started: its spec and graph, live status, and at the end the result."""

    id: str
    spec: RunSpec
    graph: dict[str, Any]
    started: float = field(default_factory=time.time)
    status: Literal["running", "done", "failed"] = "running"
    result: dict[str, Any] | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        r = self.result or {}
        return {
            "id": self.id,
            "pattern": self.spec.pattern,
            "members": self.spec.members,
            "task": self.spec.task,
            "status": self.status,
            "started": self.started,
            "answer": r.get("answer"),
            "answered_by": r.get("answered_by"),
            "elapsed_ms": r.get("elapsed_ms"),
            "error": self.error or r.get("error"),
        }

    def to_dict(self) -> dict[str, Any]:
        """The run as a file: the manager's ``RunResult`` JSON plus the spec, graph and status."""
        return {
            **(self.result or {}),
            "id": self.id,
            "spec": self.spec.model_dump(),
            "graph": self.graph,
            "status": self.status,
            "started": self.started,
            "dashboard_error": self.error,
        }
