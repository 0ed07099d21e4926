"""Ensemble: fan out in parallel, then aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from protocols import Envelope

from .aggregate import Aggregate, average, cross_score, judged, latent_average, token_mix, vote
from .graph import AgentGraph, AgentRef, GraphError
from .pattern import Outcome, Pattern, Runtime, as_member


class Ensemble(Pattern):
    kind = "ensemble"

    def __init__(
        self,
        members: Sequence[Any],
        *,
        aggregate: str | Aggregate = Aggregate.VOTE,
        weights: Mapping[str, float] | None = None,
        judge: Any = None,
        quorum: int | float | None = None,
        grace: float | None = None,
        max_steps: int = 64,
        name: str | None = None,
    ) -> None:
        """``quorum``: members that must answer (an int, or a fraction of them); ``grace``: once
        the quorum has answered, seconds the others still get before they count as failed (None:
        wait for every member up to the deadline, or until presence says it is gone)."""
        super().__init__(name)
        self._members = [as_member(m) for m in members]
        self.aggregate = Aggregate.parse(aggregate)
        self.weights = dict(weights or {})
        self.judge = as_member(judge) if judge is not None else None
        self.max_steps = max_steps
        n = len(self._members)
        if quorum is None:
            self.quorum = 1
        elif isinstance(quorum, float) and 0 < quorum <= 1:
            self.quorum = max(1, math.ceil(quorum * n))
        else:
            self.quorum = int(quorum)
        if grace is not None and grace < 0:
            raise GraphError(f"ensemble {self.name!r}: grace must be >= 0 seconds, not {grace}")
        self.grace = grace
        if n and not 1 <= self.quorum <= n:
            raise GraphError(f"ensemble {self.name!r}: quorum {quorum} must be between 1 and {n} members")
        if self.aggregate == Aggregate.JUDGE and self.judge is None:
            raise GraphError(f"ensemble {self.name!r}: aggregate='judge' needs judge=AGENT")
        if self.aggregate in (Aggregate.CROSS_SCORE, Aggregate.LATENT):
            nested = [m.name for m in self._members if isinstance(m, Pattern)]
            if nested:
                raise GraphError(f"ensemble {self.name!r}: {self.aggregate} needs agent members, not {nested}")
        unknown = set(self.weights) - {m.agent_id for m in self._members if isinstance(m, AgentRef)}
        if unknown:
            raise GraphError(f"ensemble {self.name!r}: weights for non-members {sorted(unknown)}")

    def members(self) -> list[AgentRef | Pattern]:
        return list(self._members)

    def helpers(self) -> list[AgentRef]:
        return [self.judge] if isinstance(self.judge, AgentRef) else []

    def graph(self) -> AgentGraph:
        g = self._aggregating_graph(str(self.aggregate))
        for i, m in enumerate(self._members):
            entry, exit_ = self._entry_exit(g, m, f"{self.name}.{i}")
            g.add_flow("task", entry, "fan-out")
            g.add_flow(exit_, "aggregate", "proposal")
        return self._finish_with(g, self.judge)

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        out = Outcome(source=self.name, kind=self.kind)
        if self.aggregate == Aggregate.LATENT:
            answer, details = await latent_average(
                rt, self._members, task, max_steps=self.max_steps, quorum=self.quorum
            )
            out.cost = details.pop("cost", out.cost)
            out.answer, out.details = answer, {"aggregate": str(self.aggregate), **details}
            if answer is None:
                out.error = details.get("error", "no answer")
            return out
        proposals = await rt.ask_many(self._members, task, label=self.name, quorum=self.quorum, grace=self.grace)
        out.children = proposals
        for p in proposals:
            out.cost = out.cost.add(p.cost)
        ok = [p for p in proposals if p.ok]
        out.details = {
            "aggregate": str(self.aggregate),
            "proposals": {p.source: p.answer for p in proposals},
            "failed": {p.source: p.error for p in proposals if not p.ok},
            "quorum": self.quorum,
            "grace": self.grace,
        }
        if len(ok) < self.quorum:
            out.error = f"quorum not met: {len(ok)} of {len(proposals)} members answered, {self.quorum} needed"
            return out
        if self.aggregate == Aggregate.VOTE:
            out.answer, extra = vote(ok)
        elif self.aggregate == Aggregate.WEIGHTED:
            out.answer, extra = vote(ok, self.weights or None, by_confidence=not self.weights)
        elif self.aggregate in (Aggregate.AVERAGE, Aggregate.TOKEN_MIX):
            mixer = average if self.aggregate == Aggregate.AVERAGE else token_mix
            out.answer, conf, extra = mixer(task, ok, self.weights or None)
            out.details.update(extra)
            out.confidence = conf
            out.text = out.answer or ""
            return out
        elif self.aggregate == Aggregate.CROSS_SCORE:
            scorers = [m for m in self._members if m.agent_id in {p.source for p in ok}]  # type: ignore[union-attr]
            out.answer, extra = await cross_score(rt, scorers, task, ok, label=f"{self.name} cross-score")
            out.cost = out.cost.add(extra.pop("cost"))  # the score calls are model calls too
        else:  # judge
            out.answer, extra, verdict = await judged(rt, self.judge, task, ok, label=f"{self.name} judge")
            out.children.append(verdict)
            out.cost = out.cost.add(verdict.cost)
        out.details.update(extra)
        backers = [p.confidence for p in ok if p.answer == out.answer and p.confidence is not None]
        out.confidence = sum(backers) / len(ok) if backers else None
        out.text = out.answer or ""
        return out
