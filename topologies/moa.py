"""Mixture-of-agents: layers of proposers, each layer seeing the previous layer's answers, then an
aggregator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocols import Envelope, ops

from .aggregate import vote
from .graph import AgentGraph, AgentRef, GraphError
from .pattern import Outcome, Pattern, Runtime, as_member


class MixtureOfAgents(Pattern):
    kind = "mixture_of_agents"

    def __init__(
        self, layers: Sequence[Sequence[Any]], aggregator: Any, *, quorum: int = 1, name: str | None = None
    ) -> None:
        super().__init__(name or "moa")
        self.layers = [[as_member(m) for m in layer] for layer in layers]
        if not self.layers or any(not layer for layer in self.layers):
            raise GraphError(f"mixture_of_agents {self.name!r}: every layer needs at least one proposer")
        self.aggregator = as_member(aggregator)
        if quorum < 1:
            raise GraphError(f"mixture_of_agents {self.name!r}: quorum must be >= 1")
        self.quorum = quorum

    def members(self) -> list[AgentRef | Pattern]:
        return [m for layer in self.layers for m in layer] + [self.aggregator]

    def graph(self) -> AgentGraph:
        g = AgentGraph(self.name)
        g.add_step("task", "task")
        g.add_step("answer", "answer")
        prev = ["task"]
        for li, layer in enumerate(self.layers):
            cur = []
            for mi, m in enumerate(layer):
                entry, exit_ = self._entry_exit(g, m, f"{self.name}.{li}.{mi}")
                for p in prev:
                    g.add_flow(p, entry, "task" if p == "task" else f"layer {li} answer")
                cur.append(exit_)
            prev = cur
        entry, exit_ = self._entry_exit(g, self.aggregator, f"{self.name}.agg")
        for p in prev:
            g.add_flow(p, entry, "proposal")
        g.add_flow(exit_, "answer", "answer")
        return g

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        out = Outcome(source=self.name, kind=self.kind)
        peers: list[dict[str, Any]] | None = None
        layers_log: list[dict[str, Any]] = []
        last: list[Outcome] = []
        for li, layer in enumerate(self.layers, start=1):
            meta = {ops.PEERS: peers} if peers is not None else None
            results = await rt.ask_many(layer, task, label=f"{self.name} layer {li}", meta=meta)
            out.children.extend(results)
            for r in results:
                out.cost = out.cost.add(r.cost)
            ok = [r for r in results if r.ok]
            layers_log.append(
                {
                    "layer": li,
                    "answers": {r.source: r.answer for r in results},
                    "failed": {r.source: r.error for r in results if not r.ok},
                }
            )
            if len(ok) < self.quorum:
                out.error = f"layer {li}: {len(ok)} proposer(s) answered, quorum is {self.quorum}"
                out.details = {"layers": layers_log}
                return out
            peers = [{"agent": r.source, ops.ANSWER: r.answer, ops.CONFIDENCE: r.confidence} for r in ok]
            last = ok
        final = await rt.ask(self.aggregator, task, label=f"{self.name} aggregate", meta={ops.PEERS: peers})
        out.children.append(final)
        out.cost = out.cost.add(final.cost)
        out.details = {"layers": layers_log, "aggregator": final.source}
        if final.ok:
            out.answer, out.text, out.confidence = final.answer, final.text, final.confidence
        else:
            out.answer, extra = vote(last)
            out.details.update(extra)
            out.details["fallback"] = f"vote of the last layer: aggregator failed ({final.error})"
        return out
