"""Patterns and the runtime they are built from.

A pattern is a tree: its members are agent ids or other patterns (so patterns nest). ``run`` gets
the task and a :class:`Runtime`, whose public building blocks — ``ask``, ``ask_many``, ``score``,
``judge``, ``verify``, ``next_distributions`` — are all the built-in patterns use, so a user's own
pattern has the same powers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from aiflow_agents import AiflowError, Client, RemoteAgentError
from protocols import Envelope, Kind, TensorPart, ops

from .graph import AgentGraph, AgentRef, GraphError, agent
from .trace import MANAGER, Trace

if TYPE_CHECKING:
    from .manager import TopologyManager


@dataclass(slots=True)
class Outcome:
    """What one agent or one (sub-)pattern produced."""

    source: str
    kind: str  # "agent" or the pattern kind
    answer: str | None = None
    text: str = ""
    confidence: float | None = None
    error: str | None = None
    reply: Envelope | None = field(default=None, repr=False)
    label: str = ""
    latency: float = 0.0
    cost: ops.Cost = field(default_factory=lambda: ops.Cost(model_calls=0))
    details: dict[str, Any] = field(default_factory=dict)
    children: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.answer is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "label": self.label,
            "answer": self.answer,
            "confidence": self.confidence,
            "error": self.error,
            "latency_ms": round(self.latency * 1e3, 3),
            "cost": self.cost.model_dump(),
            "details": self.details,
            "children": [c.to_dict() for c in self.children],
        }


def _answer_of(reply: Envelope) -> str:
    ans = reply.meta.get(ops.ANSWER)
    return str(ans) if ans is not None else reply.text.strip()


def member_name(m: Any) -> str:
    if isinstance(m, str):
        return m
    if isinstance(m, AgentRef):
        return m.agent_id
    return m.name


def as_member(m: Any) -> AgentRef | Pattern:
    if isinstance(m, (AgentRef, Pattern)):
        return m
    if isinstance(m, str):
        return agent(m)
    raise GraphError(f"a member must be an agent id, an AgentRef or a pattern, not {type(m).__name__}")


class Pattern(ABC):
    """Base of every pattern. Subclasses set ``kind``, keep ``members`` and implement ``run``."""

    kind: ClassVar[str] = "pattern"
    forbids_cycles: ClassVar[bool] = True

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind

    @abstractmethod
    def members(self) -> list[AgentRef | Pattern]:
        """Direct members (agents or nested patterns), in order."""

    def helpers(self) -> list[AgentRef]:
        """Agents the pattern uses besides its members (judges, verifiers, aggregators)."""
        return []

    def agent_ids(self) -> list[str]:
        out: list[str] = []
        for m in [*self.members(), *self.helpers()]:
            out.extend(m.agent_ids() if isinstance(m, Pattern) else [m.agent_id])
        return list(dict.fromkeys(out))

    def validate(self) -> None:
        if not self.members():
            raise GraphError(f"{self.kind} {self.name!r} has no members")
        for m in self.members():
            if isinstance(m, Pattern):
                m.validate()
        self.graph().validate(acyclic=self.forbids_cycles)

    @abstractmethod
    def graph(self) -> AgentGraph:
        """The message flows of this pattern (nested patterns included) as an AgentGraph."""

    @abstractmethod
    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        """Answer ``task`` using ``rt``'s building blocks."""

    # -- helpers for graph() ------------------------------------------------------------------
    def _aggregating_graph(self, how: str) -> AgentGraph:
        """A graph with the steps fan-in patterns share: task, aggregate, answer."""
        g = AgentGraph(self.name)
        g.add_step("task", "task")
        g.add_step("aggregate", "aggregate", how=how)
        g.add_step("answer", "answer")
        return g

    def _finish_with(self, g: AgentGraph, judge: AgentRef | Pattern | None) -> AgentGraph:
        """Aggregate -> answer, through a judge when the pattern has one."""
        if judge is not None:
            entry, exit_ = self._entry_exit(g, judge, f"{self.name}.judge")
            g.add_flow("aggregate", entry, "candidates")
            g.add_flow(exit_, "answer", "verdict")
        else:
            g.add_flow("aggregate", "answer", "answer")
        return g

    def _entry_exit(self, g: AgentGraph, m: AgentRef | Pattern, prefix: str) -> tuple[str, str]:
        """Add a member to ``g``; return the node ids where flows enter and leave it."""
        if isinstance(m, AgentRef):
            g.add_agent(m)
            return m.agent_id, m.agent_id
        sub = m.graph()
        renamed = AgentGraph(sub.name)
        mapping = {n: (n if d.get("kind") == "agent" else f"{prefix}/{n}") for n, d in sub.g.nodes(data=True)}
        for n, d in sub.g.nodes(data=True):
            renamed.g.add_node(mapping[n], **d)
        for u, v, d in sub.g.edges(data=True):
            renamed.g.add_edge(mapping[u], mapping[v], **d)
        g.merge(renamed)
        return mapping["task"], mapping["answer"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, members={[member_name(m) for m in self.members()]})"


class Runtime:
    """One run's view of the bus: deadline, trace, and the building blocks patterns use."""

    def __init__(self, manager: TopologyManager, deadline: float, trace: Trace) -> None:
        self.manager = manager
        self.client: Client = manager.client
        self.deadline = deadline  # absolute, time.time()
        self.trace = trace

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.time())

    def with_deadline(self, deadline: float) -> Runtime:
        """A runtime for a nested pattern with a tighter deadline (never a later one)."""
        return Runtime(self.manager, min(deadline, self.deadline), self.trace)

    @staticmethod
    def derive(
        task: Envelope, *, meta: dict[str, Any] | None = None, extra_parts: Sequence[TensorPart] = ()
    ) -> Envelope:
        """A fresh request for a hop: same parts and trace, new id, merged meta."""
        return Envelope(
            kind=Kind.REQUEST,
            sender=task.sender,
            trace_id=task.trace_id,
            parent_id=task.id,
            parts=[*task.parts, *extra_parts],
            meta={**task.meta, **(meta or {})},
        )

    # -- one member ---------------------------------------------------------------------------
    async def ask(
        self,
        member: Any,
        task: Envelope,
        *,
        label: str = "",
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
        extra_parts: Sequence[TensorPart] = (),
    ) -> Outcome:
        """Ask one agent (a request over the bus) or run one nested pattern."""
        m = as_member(member)
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        if isinstance(m, Pattern):
            sub_task = self.derive(task, meta=meta, extra_parts=extra_parts)
            started = time.time()
            try:
                async with asyncio.timeout(limit):
                    out = await m.run(sub_task, self.with_deadline(time.time() + limit))
            except TimeoutError:
                out = Outcome(source=m.name, kind=m.kind, error="timeout: nested pattern missed its deadline")
            out.label = out.label or label
            out.latency = time.time() - started
            return out
        env = self.derive(task, meta=meta, extra_parts=extra_parts)
        ex = await self.client.exchange(m.agent_id, env, timeout=max(limit, 0.001), check_presence=False)
        self.trace.record(
            MANAGER,
            m.agent_id,
            "request",
            nbytes=ex.bytes_out,
            start=ex.started,
            end=ex.started,  # the request is one publish; its latency is on the reply event
            label=label,
            correlation_id=ex.request.correlation_id,
        )
        return self._outcome_from_exchange(
            m.agent_id, ex.reply, ex.bytes_in, ex.started, ex.ended or time.time(), ex.error, label
        )

    def _outcome_from_exchange(
        self,
        agent_id: str,
        reply: Envelope | None,
        size: int,
        started: float,
        ended: float,
        error: AiflowError | None,
        label: str,
        via: str = "direct",
    ) -> Outcome:
        if reply is not None and reply.kind == Kind.ERROR and error is None and reply.error is not None:
            error = RemoteAgentError(reply.error, agent_id)
        err_text = None
        if error is not None:
            code = getattr(error, "code", type(error).__name__)
            err_text = f"{code}: {error}"
        kind = "error" if err_text else "reply"
        if reply is None and isinstance(error, TimeoutError):
            kind = "timeout"
        out = Outcome(source=agent_id, kind="agent", label=label, error=err_text, latency=ended - started, reply=reply)
        if reply is not None and err_text is None:
            out.answer = _answer_of(reply)
            out.text = reply.text
            conf = reply.meta.get(ops.CONFIDENCE)
            out.confidence = float(conf) if isinstance(conf, (int, float)) else None
            cost = reply.meta.get(ops.COST)
            out.cost = ops.Cost.model_validate(cost) if isinstance(cost, dict) else ops.Cost()
        self.trace.record(
            agent_id,
            MANAGER,
            kind,
            nbytes=size,
            start=started,
            end=ended,
            label=label,
            via=via,
            error=err_text,
            correlation_id=reply.correlation_id if reply else None,
            answer=out.answer,
        )
        return out

    # -- many members at once -----------------------------------------------------------------
    async def ask_many(
        self,
        members: Sequence[Any],
        task: Envelope,
        *,
        label: str = "",
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
        quorum: int | None = None,
        grace: float | None = None,
    ) -> list[Outcome]:
        """Ask every member concurrently. Plain agents get **one** publish to a group topic that the
        broker copies to each of them; nested patterns run side by side. Results keep member order.

        With ``quorum`` and ``grace``: once ``quorum`` members have answered, the others get
        ``grace`` more seconds, then count as failed — a frozen member no longer holds the whole
        run to its deadline."""
        resolved = [as_member(m) for m in members]
        agents = [m for m in resolved if isinstance(m, AgentRef)]
        patterns = [m for m in resolved if isinstance(m, Pattern)]
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        gate = _Quorum(quorum, grace) if quorum is not None and grace is not None else None
        # (name, coroutine): the name of what a coroutine answers for, None for the group ask
        # (which watches the quorum itself and returns an outcome for each of its members)
        coros: list[tuple[str | None, Any]] = [
            (p.name, self.ask(p, task, label=label, meta=meta, timeout=limit)) for p in patterns
        ]
        if len(agents) == 1:
            coros.append((agents[0].agent_id, self.ask(agents[0], task, label=label, meta=meta, timeout=limit)))
        elif agents:
            ids = [a.agent_id for a in agents]
            coros.append((None, self._group_ask(ids, task, label=label, meta=meta, timeout=limit, gate=gate)))
        if gate is None:
            results = await asyncio.gather(*(c for _, c in coros))
        else:
            results = await self._gather_with_grace(coros, gate, label)
        by_name: dict[str, Outcome] = {}
        for r in results:
            for o in r if isinstance(r, list) else [r]:
                by_name[o.source] = o
        return [by_name[member_name(m)] for m in resolved]

    async def _gather_with_grace(self, coros: list[tuple[str | None, Any]], gate: _Quorum, label: str) -> list[Any]:
        """Like gather, but members still running when the quorum's grace is over are cut off."""
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(c) for _, c in coros]

        def count(t: asyncio.Future[Any]) -> None:
            if not t.cancelled() and t.exception() is None and isinstance(r := t.result(), Outcome) and r.ok:
                gate.add(loop.time())

        for t in tasks:
            t.add_done_callback(count)
        waiting = set(tasks)
        while waiting:
            left = None if gate.until is None else gate.until - loop.time()
            if left is not None and left <= 0:
                break
            _, waiting = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        results: list[Any] = []
        for (name, _), t in zip(coros, tasks, strict=True):
            if name is not None and not t.done():
                t.cancel()
            try:
                results.append(await t)  # the group ask ends by itself within a poll interval
            except asyncio.CancelledError:
                err = f"timeout: cut off {gate.grace:.3g}s after a quorum of {gate.need} answered"
                results.append(Outcome(source=name or "?", kind="agent", label=label, error=err))
        return results

    async def _group_ask(
        self,
        agent_ids: list[str],
        task: Envelope,
        *,
        label: str,
        meta: dict[str, Any] | None,
        timeout: float,
        gate: _Quorum | None = None,
    ) -> list[Outcome]:
        group = await self.manager.ensure_group(agent_ids)
        # Addressed to the group: nodes refuse a request whose recipient is not theirs (replay bound).
        env = self.derive(task, meta=meta).model_copy(update={"recipient": group})
        outcomes: dict[str, Outcome] = {}
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        end_at = started_at + timeout
        started = time.time()
        async with self.client.conversation(env, timeout=timeout) as conv:
            size = await conv.send(self.client.topics.group(group))
            self.trace.record(
                MANAGER,
                f"group:{group}",
                "request",
                nbytes=size,
                start=started,
                end=time.time(),
                label=label,
                via="group",
                correlation_id=conv.correlation_id,
                members=agent_ids,  # the broker copies it to each: the timeline draws those copies
            )
            while len(outcomes) < len(agent_ids):
                if gate is not None and gate.until is not None:
                    end_at = min(end_at, gate.until)
                left = end_at - loop.time()
                if left <= 0:
                    break
                try:
                    # wake up now and then to notice members whose node went offline (Last Will)
                    reply, n = await conv.receive(min(left, 0.25))
                except TimeoutError:
                    for a in agent_ids:
                        if a not in outcomes and not self.client.presence.is_online(a):
                            err = _Offline(f"agent {a!r} went offline during the request")
                            outcomes[a] = self._outcome_from_exchange(
                                a, None, 0, started, time.time(), err, label, "group"
                            )
                    continue
                except AiflowError as e:  # connection lost: everyone still missing fails with it
                    for a in agent_ids:
                        if a not in outcomes:
                            outcomes[a] = self._outcome_from_exchange(
                                a, None, 0, started, time.time(), e, label, "group"
                            )
                    break
                if reply.kind == Kind.EVENT or reply.sender not in agent_ids or reply.sender in outcomes:
                    continue
                outcomes[reply.sender] = out = self._outcome_from_exchange(
                    reply.sender, reply, n, started, time.time(), None, label, "group"
                )
                if gate is not None and out.ok:
                    gate.add(loop.time())
        cut = gate is not None and gate.until is not None and loop.time() < started_at + timeout - 0.01
        for a in agent_ids:
            if a not in outcomes:
                if cut:
                    assert gate is not None
                    err = _Timeout(
                        f"no reply from agent {a!r} within {gate.grace:.3g}s after a quorum of {gate.need} answered"
                    )
                else:
                    err = _Timeout(f"no reply from agent {a!r} within {timeout:.3g}s")
                outcomes[a] = self._outcome_from_exchange(a, None, 0, started, time.time(), err, label, "group")
        return [outcomes[a] for a in agent_ids]

    # -- aggregation helpers ------------------------------------------------------------------
    async def score(
        self, members: Sequence[Any], task: Envelope, candidates: list[str], *, label: str = "score"
    ) -> dict[str, list[float] | None]:
        """Every member scores every candidate by its own log-likelihood (op ``score``)."""
        outs = await self.ask_many(members, task, label=label, meta={ops.OP: ops.Op.SCORE, ops.CANDIDATES: candidates})
        result: dict[str, list[float] | None] = {}
        for o in outs:
            scores = o.reply.meta.get(ops.SCORES) if (o.reply is not None and o.error is None) else None
            ok = isinstance(scores, list) and len(scores) == len(candidates)
            result[o.source] = [float(s) for s in scores] if ok else None  # type: ignore[union-attr]
        return result

    async def judge(self, judge: Any, task: Envelope, candidates: list[str], *, label: str = "judge") -> Outcome:
        return await self.ask(judge, task, label=label, meta={ops.OP: ops.Op.JUDGE, ops.CANDIDATES: candidates})

    async def verify(self, verifier: Any, task: Envelope, candidate: str, *, label: str = "verify") -> Outcome:
        """The verifier's outcome; ``details['accepted']`` says whether it accepted ``candidate``."""
        out = await self.ask(verifier, task, label=label, meta={ops.OP: ops.Op.VERIFY, ops.CANDIDATE: candidate})
        verdict = out.reply.meta.get(ops.ACCEPTED) if (out.reply is not None and out.error is None) else None
        out.details["accepted"] = bool(verdict) if verdict is not None else None
        return out

    async def next_distributions(
        self, members: Sequence[Any], task: Envelope, prefix: str, *, label: str = "next"
    ) -> list[Outcome]:
        """Each member's next-token distribution after ``prefix`` (op ``next``), as tensor parts."""
        return await self.ask_many(members, task, label=label, meta={ops.OP: ops.Op.NEXT, ops.PREFIX: prefix})


class _Timeout(AiflowError, TimeoutError):
    code = "timeout"


class _Quorum:
    """How many members of one fan-out have answered, and when the stragglers' grace ends."""

    def __init__(self, need: int, grace: float) -> None:
        self.need = need
        self.grace = grace
        self.answered = 0
        self.until: float | None = None  # loop time; set once ``need`` members answered

    def add(self, now: float) -> None:
        self.answered += 1
        if self.until is None and self.answered >= self.need:
            self.until = now + self.grace


class _Offline(AiflowError):
    code = "agent_offline"


def group_name(namespace: str, agent_ids: Sequence[str]) -> str:
    digest = hashlib.sha1((namespace + "|" + ",".join(sorted(agent_ids))).encode()).hexdigest()[:12]
    return f"g-{digest}"
