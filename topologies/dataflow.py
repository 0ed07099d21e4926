"""Run a hand-built acyclic AgentGraph as a dataflow: agents with no predecessors get the task;
every other agent also sees its predecessors' answers (``meta.peers``); the sinks' answers are
voted."""

from __future__ import annotations

import networkx as nx

from protocols import Envelope, ops

from .aggregate import vote
from .graph import AgentGraph, AgentRef
from .pattern import Outcome, Pattern, Runtime


class Dataflow(Pattern):
    kind = "dataflow"

    def __init__(self, graph: AgentGraph, name: str | None = None) -> None:
        super().__init__(name or graph.name)
        self._graph = graph

    def members(self) -> list[AgentRef | Pattern]:
        return list(self._graph.agents())

    def graph(self) -> AgentGraph:
        return self._graph

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        agents_only = nx.DiGraph(self._graph.g.subgraph(self._graph.agent_ids()))
        out = Outcome(source=self.name, kind=self.kind)
        done: dict[str, Outcome] = {}
        for level, generation in enumerate(nx.topological_generations(agents_only), start=1):
            batches: dict[tuple[str, ...], list[str]] = {}
            for a in sorted(generation):
                batches.setdefault(tuple(sorted(agents_only.predecessors(a))), []).append(a)
            for preds, members in batches.items():
                peers = [
                    {"agent": p, ops.ANSWER: done[p].answer, ops.CONFIDENCE: done[p].confidence}
                    for p in preds
                    if done[p].ok
                ]
                meta = {ops.PEERS: peers} if preds else None
                for r in await rt.ask_many(members, task, label=f"{self.name} level {level}", meta=meta):
                    done[r.source] = r
                    out.children.append(r)
                    out.cost = out.cost.add(r.cost)
        sinks = [a for a in agents_only if agents_only.out_degree(a) == 0]
        out.answer, extra = vote([done[s] for s in sinks])
        out.details = {"sinks": sinks, **extra, "failed": {k: v.error for k, v in done.items() if not v.ok}}
        if out.answer is None:
            out.error = "no sink agent answered"
        out.text = out.answer or ""
        return out
