"""What the dashboard's form can start, and one run as the dashboard keeps it.

The form builds the same patterns a user writes in Python (``ensemble``, ``debate``, ``cascade``,
``mixture_of_agents``), so a run started from the page is the run ``aiflow run`` would make."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

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


#: pixels per inch of :meth:`AgentGraph.layout` (its boxes fit labels at 9 pt, i.e. 12.5 px here)
GRAPH_PX = 100.0


def graph_json(graph: AgentGraph) -> dict[str, Any]:
    """The pattern as the page draws it: :meth:`AgentGraph.layout` (the layered layout ``aiflow graph draw``
    uses) in pixels, y down. Each node also carries its column ``x`` and its row ``y`` in that column."""
    lay = graph.layout()
    paths = [lay.path(e) for e in lay.edges]
    boxes = [*lay.boxes.values(), *((c.x0, c.y0, c.x1, c.y1) for c in lay.clusters)]
    boxes += [(x, y, x, y) for path in paths for x, y in path]  # long edges bend around the columns
    pad = 0.25
    left, top = min(b[0] for b in boxes) - pad, max(b[3] for b in boxes) + pad

    def px(p: tuple[float, float]) -> list[float]:
        return [round((p[0] - left) * GRAPH_PX, 1), round((top - p[1]) * GRAPH_PX, 1)]

    def rect(b: tuple[float, float, float, float]) -> list[float]:
        return [*px((b[0], b[3])), round((b[2] - b[0]) * GRAPH_PX, 1), round((b[3] - b[1]) * GRAPH_PX, 1)]

    columns = [sorted((n for n in layer if n in graph.g), key=lambda n: -lay.pos[n][1]) for layer in lay.layers]
    nodes = [
        {
            "id": n,
            "kind": graph.g.nodes[n].get("kind"),
            "tier": graph.tier_of(n),
            "label": graph.node_label(n),
            "x": x,
            "y": y,
            "rows": len(column),
            "box": rect(lay.boxes[n]),
        }
        for x, column in enumerate(columns)
        for y, n in enumerate(column)
    ]
    edges = [
        {"source": e.src, "target": e.dst, "kind": e.label, "points": [px(p) for p in path]}
        for e, path in zip(lay.edges, paths, strict=True)
    ]
    clusters = [{"nodes": c.nodes, "caption": c.caption, "box": rect((c.x0, c.y0, c.x1, c.y1))} for c in lay.clusters]
    bottom, right = min(b[1] for b in boxes) - pad, max(b[2] for b in boxes) + pad
    size = px((right, bottom))
    return {
        "name": graph.name,
        "nodes": nodes,
        "edges": edges,
        "clusters": clusters,
        "columns": len(columns),
        "width": size[0],
        "height": size[1],
    }


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
