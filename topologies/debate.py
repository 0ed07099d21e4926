"""Debate: N agents, R rounds; each round every agent sees the others' previous answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocols import Envelope, ops

from .aggregate import Aggregate, average, cross_score, judged, vote
from .graph import AgentGraph, AgentRef, GraphError
from .pattern import Outcome, Pattern, Runtime, as_member


class Debate(Pattern):
    kind = "debate"
    forbids_cycles = False  # agents answer each other: the graph is cyclic by design

    def __init__(
        self,
        agents: Sequence[Any],
        *,
        rounds: int = 2,
        aggregate: str | Aggregate = Aggregate.VOTE,
        judge: Any = None,
        quorum: int = 1,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self._members = [as_member(a) for a in agents]
        if rounds < 1:
            raise GraphError(f"debate {self.name!r}: rounds must be >= 1, got {rounds}")
        self.rounds = rounds
        self.aggregate = Aggregate.parse(aggregate)
        if self.aggregate not in (
            Aggregate.VOTE,
            Aggregate.WEIGHTED,
            Aggregate.JUDGE,
            Aggregate.CROSS_SCORE,
            Aggregate.AVERAGE,
        ):
            raise GraphError(f"debate {self.name!r}: aggregate must be vote, weighted, judge, cross_score or average")
        self.judge = as_member(judge) if judge is not None else None
        if self.aggregate == Aggregate.JUDGE and self.judge is None:
            raise GraphError(f"debate {self.name!r}: aggregate='judge' needs judge=AGENT")
        if not 1 <= quorum <= max(1, len(self._members)):
            raise GraphError(f"debate {self.name!r}: quorum {quorum} must be between 1 and {len(self._members)}")
        self.quorum = quorum

    def members(self) -> list[AgentRef | Pattern]:
        return list(self._members)

    def helpers(self) -> list[AgentRef]:
        return [self.judge] if isinstance(self.judge, AgentRef) else []

    def graph(self) -> AgentGraph:
        g = self._aggregating_graph(str(self.aggregate))
        ends = [self._entry_exit(g, m, f"{self.name}.{i}") for i, m in enumerate(self._members)]
        for entry, exit_ in ends:
            g.add_flow("task", entry, "task")
            g.add_flow(exit_, "aggregate", f"round {self.rounds}")
        if self.rounds > 1:
            for _, a_out in ends:
                for b_in, _ in ends:
                    if a_out != b_in:
                        g.add_flow(a_out, b_in, "previous answer")
        return self._finish_with(g, self.judge)

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        out = Outcome(source=self.name, kind=self.kind)
        active = list(self._members)
        peers: list[dict[str, Any]] | None = None
        rounds: list[dict[str, Any]] = []
        dropped: dict[str, str] = {}
        last: list[Outcome] = []
        for r in range(1, self.rounds + 1):
            meta = {ops.PEERS: peers} if peers is not None else None
            # each round gets its share of the time left, so one silent agent cannot eat the run
            share = rt.remaining() / (self.rounds - r + 1 + (self.aggregate not in (Aggregate.VOTE, Aggregate.AVERAGE)))
            results = await rt.ask_many(active, task, label=f"{self.name} round {r}", meta=meta, timeout=share)
            out.children.extend(results)
            for res in results:
                out.cost = out.cost.add(res.cost)
            ok = [res for res in results if res.ok]
            for res in results:
                if not res.ok:
                    dropped[res.source] = f"round {r}: {res.error}"
            majority, _ = vote(ok)
            rounds.append({"round": r, "answers": {res.source: res.answer for res in results}, "majority": majority})
            if len(ok) < self.quorum:
                out.error = f"round {r}: only {len(ok)} agent(s) answered, quorum is {self.quorum}"
                out.details = {"rounds": rounds, "dropped": dropped}
                return out
            # the debate goes on without agents that failed
            active = [m for m in active if any(res.source == _name(m) and res.ok for res in results)]
            peers = [{"agent": res.source, ops.ANSWER: res.answer, ops.CONFIDENCE: res.confidence} for res in ok]
            last = ok
        if self.aggregate == Aggregate.CROSS_SCORE:
            out.answer, extra = await cross_score(rt, active, task, last, label=f"{self.name} cross-score")
            out.cost = out.cost.add(extra.pop("cost"))  # the score calls are model calls too
        elif self.aggregate == Aggregate.AVERAGE:
            out.answer, out.confidence, extra = average(task, last)
        elif self.aggregate == Aggregate.JUDGE:
            out.answer, extra, verdict = await judged(rt, self.judge, task, last, label=f"{self.name} judge")
            out.children.append(verdict)
            out.cost = out.cost.add(verdict.cost)
        else:
            out.answer, extra = vote(last, by_confidence=self.aggregate == Aggregate.WEIGHTED)
        out.details = {"aggregate": str(self.aggregate), "rounds": rounds, "dropped": dropped, **extra}
        out.text = out.answer or ""
        return out


def _name(m: AgentRef | Pattern) -> str:
    return m.agent_id if isinstance(m, AgentRef) else m.name
