"""Network-aware scheduling: per request, decide where a task runs and what crosses the network.

A :class:`Policy` turns what the scheduler knows — the members (which exit of the family runs on which
tier), their calibrated accuracy, and live telemetry (per tier link RTT, jitter, throughput and whether it
is up; per agent compute time and queue) — into a :class:`Plan`: answer on the device (which exit), relay
the device's hidden states to a deeper exit elsewhere (which encoding), send only the text, escalate by
confidence, ask two tiers at once and keep the first good answer (hedge), or ask replicas of one exit over
different routes and keep the first answer (race). :class:`Scheduled` is the pattern that
asks its policy for a plan and runs it, so static and adaptive policies are compared on the same runs.

The adaptive policy (:class:`NetworkAware`) minimises the expected tail (or mean) latency over the plans
whose calibrated accuracy meets the target and whose estimate fits the deadline; with no such plan it
takes the most accurate one that fits. It re-plans per request from fresh telemetry, so a dead link makes
it answer on the device (the reply says ``degraded``), and it arms a deadline fallback: if a remote answer
has not come back when only the local exit's own run time is left, the device answers, flagged degraded.
Anchors: Neurosurgeon (split point from layer cost and bandwidth), Edgent (exit and split under a
deadline), Petals (routing by measured RTT/throughput), "The Tail at Scale" (hedged requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from protocols import Envelope, encode

from .cascade import Cascade
from .graph import AgentGraph, AgentRef, GraphError, agent
from .pattern import Outcome, Pattern, Runtime
from .trace import MANAGER

PlanKind = Literal["local", "text", "relay", "cascade", "hedge", "race"]
#: Bytes of a text-only request / reply frame of the familial agents (header + prompt), for estimates.
TEXT_FRAME_BYTES = 700
#: Wire encodings a relay may use, and "text" (send the prompt; the receiver recomputes).
ENCODINGS = ("float16", "int8-rowwise", "text")


@dataclass(frozen=True)
class Member:
    """An agent the scheduler may use: where it runs and which exit of the family it is."""

    agent_id: str
    tier: str
    kind: str  # device | edge | cloud
    exit: str
    depth: int
    local: bool = False  # on the requester's own tier: no link to cross


@dataclass
class Calibration:
    """Per exit, on a tuning set: each item's confidence and whether the answer was right, aligned by item
    (so a cascade's accuracy is computed exactly, not assumed independent). ``relay_agreement`` is the
    share of answers a relay in that encoding leaves unchanged (1.0 for float16 and text)."""

    confidence: dict[str, list[float]]
    correct: dict[str, list[bool]]
    relay_agreement: dict[str, float] = field(default_factory=dict)
    hidden_bytes: dict[str, int] = field(default_factory=dict)  # encoding -> bytes of one relayed state

    def __post_init__(self) -> None:
        sizes = {len(v) for v in [*self.confidence.values(), *self.correct.values()]}
        if len(sizes) > 1 or not sizes or 0 in sizes:
            raise ValueError("calibration needs the same non-zero number of items for every exit")
        self.n = sizes.pop()
        self._cascades: dict[tuple[tuple[str, ...], tuple[float, ...]], tuple[float, list[float]]] = {}
        self._thresholds: dict[tuple[str, str, float], float | None] = {}

    def accuracy(self, exit: str, encoding: str = "text") -> float:
        """Alone, or reached by a relay in ``encoding`` (an answer the encoding changes counts as wrong)."""
        return sum(self.correct[exit]) / self.n * self.relay_agreement.get(encoding, 1.0)

    def cascade(self, exits: Sequence[str], thresholds: Sequence[float]) -> tuple[float, list[float]]:
        """(accuracy, share answered at each stage) of a confidence cascade over ``exits`` (memoised: a
        scheduler asks this per request, and must not hold the event loop)."""
        key = (tuple(exits), tuple(thresholds))
        if key not in self._cascades:
            self._cascades[key] = self._cascade(exits, thresholds)
        acc, share = self._cascades[key]
        return acc, list(share)

    def _cascade(self, exits: Sequence[str], thresholds: Sequence[float]) -> tuple[float, list[float]]:
        right, share = 0, [0] * len(exits)
        for i in range(self.n):
            for k, e in enumerate(exits):
                last = k == len(exits) - 1
                if last or self.confidence[e][i] >= thresholds[k]:
                    right += self.correct[e][i]
                    share[k] += 1
                    break
        return right / self.n, [s / self.n for s in share]

    def best_threshold(self, first: str, then: str, target: float) -> float | None:
        """The lowest threshold on ``first`` whose cascade into ``then`` still reaches ``target``."""
        key = (first, then, round(target, 6))
        if key not in self._thresholds:
            self._thresholds[key] = next(
                (t for t in (x / 100 for x in range(101)) if self._cascade([first, then], [t])[0] >= target), None
            )
        return self._thresholds[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": {e: self.accuracy(e) for e in self.correct},
            "relay_agreement": self.relay_agreement,
            "hidden_bytes": self.hidden_bytes,
        }


@dataclass(frozen=True)
class LinkView:
    """One tier's path from the requester, as measured: ``None`` where not measured yet."""

    rtt_ms: float | None = None
    jitter_ms: float = 0.0
    up_bps: float | None = None
    up: bool = True
    age_s: float | None = None


class NetworkView(Protocol):
    """What the scheduler reads: the requester's measured path to each tier, and agents' compute."""

    def path(self, tier: str) -> LinkView: ...

    def compute_ms(self, agent_id: str) -> float | None: ...

    def queued(self, agent_id: str) -> int: ...


class StaticView:
    """A fixed view (tests, and a baseline of what a scheduler would assume with no telemetry)."""

    def __init__(
        self,
        paths: Mapping[str, LinkView] | None = None,
        compute: Mapping[str, float] | None = None,
        queued: Mapping[str, int] | None = None,
    ) -> None:
        self.paths = dict(paths or {})
        self.compute = dict(compute or {})
        self._queued = dict(queued or {})

    def path(self, tier: str) -> LinkView:
        return self.paths.get(tier, LinkView(rtt_ms=0.0))

    def compute_ms(self, agent_id: str) -> float | None:
        return self.compute.get(agent_id)

    def queued(self, agent_id: str) -> int:
        return self._queued.get(agent_id, 0)


class TelemetryView:
    """:class:`NetworkView` over a client's live :class:`aiflow_agents.Telemetry`: per tier, the link
    estimate of that tier's node (probes plus real replies), per agent its nodes' records."""

    def __init__(self, telemetry: Any, node_of_tier: dict[str, str]) -> None:
        self.telemetry, self.node_of_tier = telemetry, node_of_tier

    def path(self, tier: str) -> LinkView:
        node = self.node_of_tier.get(tier)
        est = self.telemetry.link(node) if node else None
        if est is None or est.rtt_ms is None:
            return LinkView()
        # The median of the last 3 samples: it follows a lasting change within two samples (the smoothed RTT
        # takes ~8) and ignores one outlier (a probe answer held through a tunnel would otherwise keep a
        # recovered route "slow" for seconds). The spread is capped at one RTT for the same reason. A probe
        # that timed out counts as a spread of several RTTs until one succeeds again.
        rtt = est.recent_rtt_ms if est.recent_rtt_ms is not None else est.rtt_ms
        jitter = min(est.rtt_var_ms or 0.0, rtt) + (3 * rtt if est.consecutive_failures else 0.0)
        return LinkView(rtt_ms=rtt, jitter_ms=jitter, up_bps=est.throughput_bps, up=est.up, age_s=est.age)

    def compute_ms(self, agent_id: str) -> float | None:
        a = self.telemetry.agent(agent_id)
        return None if a is None or a.stale else a.service_ms

    def queued(self, agent_id: str) -> int:
        a = self.telemetry.agent(agent_id)
        return 0 if a is None or a.stale else int(a.in_flight + a.queued)


@dataclass(frozen=True)
class Plan:
    """What to do with one request, and why (the estimates are kept for the report)."""

    name: str
    kind: PlanKind
    stages: tuple[str, ...]
    thresholds: tuple[float, ...] = ()
    encoding: str = "text"
    expected_accuracy: float = float("nan")
    mean_ms: float = float("nan")
    tail_ms: float = float("nan")
    bytes_up: int = 0
    degraded: bool = False
    reason: str = ""
    #: A local agent that answers if the remote answer is not back when only its own run time is left.
    fallback: str | None = None
    fallback_after_s: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "plan": self.name,
            "kind": self.kind,
            "encoding": self.encoding,
            "expected_accuracy": _r(self.expected_accuracy),
            "expected_mean_ms": _r(self.mean_ms),
            "expected_tail_ms": _r(self.tail_ms),
            "degraded": self.degraded,
            "reason": self.reason,
        }


def _ms(x: float) -> float:
    """Rounded to the millisecond (estimates are not finer than that), infinity kept."""
    return x if math.isinf(x) or math.isnan(x) else float(round(x))


def _r(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else round(x, 3)


@dataclass
class PlanContext:
    members: Sequence[Member]
    calibration: Calibration
    view: NetworkView
    deadline_s: float
    accuracy_target: float

    def member(self, agent_id: str) -> Member:
        for m in self.members:
            if m.agent_id == agent_id:
                return m
        raise GraphError(f"no member {agent_id!r}")


class Policy(Protocol):
    """Pluggable: anything with a ``name`` and ``plan(ctx)``."""

    name: str

    def plan(self, ctx: PlanContext) -> Plan: ...


# -- estimates --------------------------------------------------------------------------------------
#: Compute time assumed for an agent no telemetry has described yet.
DEFAULT_COMPUTE_MS = 5.0


@dataclass(frozen=True)
class Estimate:
    mean_ms: float
    tail_ms: float
    reachable: bool


def _compute(ctx: PlanContext, agent_id: str) -> float:
    ms = ctx.view.compute_ms(agent_id)
    ms = DEFAULT_COMPUTE_MS if ms is None else ms
    return ms * (1 + ctx.view.queued(agent_id))


def _net(ctx: PlanContext, m: Member, up_bytes: int, down_bytes: int = TEXT_FRAME_BYTES) -> Estimate:
    """Request out, reply back over the requester's path to ``m``'s tier."""
    v = _view(ctx, m)
    if not v.up:
        return Estimate(math.inf, math.inf, False)
    mean = v.rtt + _tx_ms(up_bytes + down_bytes, v)
    return Estimate(mean, mean + 2 * v.jitter, True)


def estimate(ctx: PlanContext, plan: Plan) -> Plan:
    """``plan`` with its expected accuracy and latency filled in from the calibration and the view."""
    cal, ms = ctx.calibration, [ctx.member(s) for s in plan.stages]
    if plan.kind in ("local", "text"):
        m = ms[0]
        net = _net(ctx, m, TEXT_FRAME_BYTES)
        c = _compute(ctx, m.agent_id)
        return replace(
            plan,
            expected_accuracy=cal.accuracy(m.exit),
            mean_ms=net.mean_ms + c if net.reachable else math.inf,
            tail_ms=net.tail_ms + c if net.reachable else math.inf,
            bytes_up=0 if m.local else TEXT_FRAME_BYTES,
        )
    if plan.kind == "relay":  # always relay: the first stage's state goes to the second
        first, second = ms
        hb = TEXT_FRAME_BYTES + (cal.hidden_bytes.get(plan.encoding, 0) if plan.encoding != "text" else 0)
        net = _net(ctx, second, hb)
        c = _compute(ctx, first.agent_id) + _compute(ctx, second.agent_id)
        return replace(
            plan,
            expected_accuracy=cal.accuracy(second.exit, plan.encoding),
            mean_ms=net.mean_ms + c if net.reachable else math.inf,
            tail_ms=net.tail_ms + c if net.reachable else math.inf,
            bytes_up=hb if not second.local else 0,
        )
    if plan.kind == "cascade":
        acc, share = cal.cascade([m.exit for m in ms], plan.thresholds)
        acc *= cal.relay_agreement.get(plan.encoding, 1.0) ** (1 - share[0]) if len(ms) > 1 else 1.0
        # Latency of an item answered at stage k: one-way legs requester -> s0 -> ... -> sk -> requester
        # (paths are measured from the requester, so a leg between two tiers is half the difference of their
        # round trips, exact when one lies on the other's path, as in a device-edge-cloud tree), plus the
        # compute of every stage run.
        views = [_view(ctx, m) for m in ms]
        if not all(v.up for v in views):
            return replace(plan, expected_accuracy=acc, mean_ms=math.inf, tail_ms=math.inf)
        mean = tail = bytes_up = 0.0
        elapsed, prev_rtt, reached = 0.0, 0.0, 1.0
        for k, (m, v) in enumerate(zip(ms, views, strict=True)):
            payload = TEXT_FRAME_BYTES
            if k > 0 and plan.encoding != "text":
                payload += cal.hidden_bytes.get(plan.encoding, 0)
            elapsed += abs(v.rtt - prev_rtt) / 2 + _tx_ms(payload, v) + _compute(ctx, m.agent_id)
            done = elapsed + v.rtt / 2 + _tx_ms(TEXT_FRAME_BYTES, v)  # the reply comes back from this stage
            mean += share[k] * done
            if reached > 0.05:  # the deepest stage more than 5% of items reach sets the tail
                tail = done + 2 * v.jitter
            bytes_up += reached * (0 if m.local else payload)
            reached -= share[k]
            prev_rtt = v.rtt
        return replace(plan, expected_accuracy=acc, mean_ms=mean, tail_ms=tail, bytes_up=int(bytes_up))
    if plan.kind == "hedge":  # both at once; the first stands if confident, else the second
        a, b = ms
        acc, share = cal.cascade([a.exit, b.exit], plan.thresholds)
        la, lb = (replace(plan, kind="text", stages=(x.agent_id,)) for x in (a, b))
        ea, eb = estimate(ctx, la), estimate(ctx, lb)
        if math.isinf(ea.mean_ms) or math.isinf(eb.mean_ms):  # a hedge needs both tiers
            return replace(plan, expected_accuracy=acc, mean_ms=math.inf, tail_ms=math.inf)
        tail = max(ea.tail_ms, eb.tail_ms) if share[1] > 0.05 else ea.tail_ms
        mean = share[0] * ea.mean_ms + share[1] * max(ea.mean_ms, eb.mean_ms)
        return replace(plan, expected_accuracy=acc, mean_ms=mean, tail_ms=tail, bytes_up=ea.bytes_up + eb.bytes_up)
    if plan.kind == "race":  # replicas of one exit at once over different routes; the first answer stands
        singles = [estimate(ctx, replace(plan, kind="text", stages=(x.agent_id,))) for x in ms]
        means, tails = [e.mean_ms for e in singles], [e.tail_ms for e in singles]
        return replace(
            plan,
            expected_accuracy=min(e.expected_accuracy for e in singles),
            mean_ms=min(means),
            tail_ms=_race_quantile(means, tails),
            bytes_up=sum(e.bytes_up for e in singles),
        )
    raise GraphError(f"unknown plan kind {plan.kind!r}")


def _race_quantile(means: Sequence[float], tails: Sequence[float], q: float = 0.95) -> float:
    """The ``q`` quantile of the first of several independent routes to answer, each route's latency taken
    as uniform between its mean and its tail estimate: the race is late only when every route is."""
    finite = [(m, t) for m, t in zip(means, tails, strict=True) if not math.isinf(t)]
    if not finite:
        return math.inf

    def late(x: float) -> float:  # P(every route later than x)
        p = 1.0
        for m, t in finite:
            p *= 1.0 if x <= m else (0.0 if x >= t else (t - x) / (t - m))
        return p

    lo, hi = min(m for m, _ in finite), min(t for _, t in finite)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if late(mid) > 1 - q else (lo, mid)
    return hi


@dataclass(frozen=True)
class _PathView:
    rtt: float
    jitter: float
    up_bps: float | None
    up: bool


def _view(ctx: PlanContext, m: Member) -> _PathView:
    """The requester's path to ``m``'s tier; a tier never measured counts as unreachable, not as free."""
    if m.local:
        return _PathView(0.0, 0.0, None, True)
    p = ctx.view.path(m.tier)
    if p.rtt_ms is None:
        return _PathView(math.inf, 0.0, None, False)
    return _PathView(p.rtt_ms, p.jitter_ms, p.up_bps, p.up)


def _tx_ms(nbytes: int, v: _PathView) -> float:
    return nbytes * 8 / v.up_bps * 1e3 if v.up_bps else 0.0


# -- static policies --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fixed:
    """One plan for every request: today's static choices (device only, cloud only, a fixed split, a
    confidence cascade) as policies, so they run through the same scheduler as the adaptive one."""

    name: str
    kind: PlanKind
    stages: tuple[str, ...]
    thresholds: tuple[float, ...] = ()
    encoding: str = "text"

    def plan(self, ctx: PlanContext) -> Plan:
        return estimate(ctx, Plan(self.name, self.kind, self.stages, self.thresholds, self.encoding))


def local_only(agent_id: str, name: str | None = None) -> Fixed:
    return Fixed(name or f"local:{agent_id}", "local", (agent_id,))


def remote_only(agent_id: str, name: str | None = None) -> Fixed:
    """Send only the text to one remote agent."""
    return Fixed(name or f"text:{agent_id}", "text", (agent_id,))


def fixed_split(first: str, then: str, encoding: str = "float16", name: str | None = None) -> Fixed:
    """The device runs its layers and always ships its hidden states to ``then`` (Neurosurgeon's fixed split).
    "Always" is a confidence threshold of 1.0: the familial exits' confidence (the least top probability over
    the answer digits) stayed below 1.0 on all 1000 tuning items at every exit; a model that can report 1.0
    would answer on the device instead of relaying."""
    return Fixed(name or f"split:{first}>{then}/{encoding}", "relay", (first, then), (1.0,), encoding)


def confidence_cascade(
    stages: Sequence[str], thresholds: Sequence[float], encoding: str = "float16", name: str | None = None
) -> Fixed:
    return Fixed(name or "cascade:" + ">".join(stages), "cascade", tuple(stages), tuple(thresholds), encoding)


# -- the adaptive policy ----------------------------------------------------------------------------
@dataclass
class NetworkAware:
    """Chooses per request among every local exit, every remote exit by text, every device->remote relay
    (each encoding), device->remote confidence cascades and two-tier hedges, from calibrated accuracy
    and live telemetry. ``objective``: ``"tail"`` (p95-like estimate) or ``"mean"``."""

    name: str = "adaptive"
    objective: Literal["tail", "mean"] = "tail"
    encodings: tuple[str, ...] = ("float16", "int8-rowwise", "text")
    #: Share of the deadline a plan's estimate may use (the rest absorbs what the estimate misses).
    headroom: float = 0.8
    #: Arm the deadline fallback on the best local exit for remote plans.
    fallback: bool = True
    last: list[Plan] = field(default_factory=list, repr=False)

    def candidates(self, ctx: PlanContext) -> list[Plan]:
        local = [m for m in ctx.members if m.local]
        remote = [m for m in ctx.members if not m.local]
        cands = [Plan(f"local:{m.agent_id}", "local", (m.agent_id,)) for m in local]
        cands += [Plan(f"text:{m.agent_id}", "text", (m.agent_id,)) for m in remote]
        cal = ctx.calibration
        for d in local:
            for r in remote:
                if r.depth <= d.depth:
                    continue
                for enc in self.encodings:
                    cands.append(
                        Plan(f"split:{d.agent_id}>{r.agent_id}/{enc}", "relay", (d.agent_id, r.agent_id), (1.0,), enc)
                    )
                    t = cal.best_threshold(d.exit, r.exit, ctx.accuracy_target)
                    if t is not None and t < 1.0:
                        cands.append(
                            Plan(
                                f"cascade:{d.agent_id}>{r.agent_id}/{enc}",
                                "cascade",
                                (d.agent_id, r.agent_id),
                                (t,),
                                enc,
                            )
                        )
        for i, a in enumerate(remote):
            for b in remote[i + 1 :]:
                if a.exit == b.exit and a.tier != b.tier:
                    cands.append(Plan(f"race:{a.agent_id}|{b.agent_id}", "race", (a.agent_id, b.agent_id)))
        for a in remote:
            for b in remote:
                if a is b or b.depth <= a.depth:
                    continue
                t = cal.best_threshold(a.exit, b.exit, ctx.accuracy_target)
                if t is not None and t < 1.0:
                    cands.append(Plan(f"hedge:{a.agent_id}|{b.agent_id}", "hedge", (a.agent_id, b.agent_id), (t,)))
                    cands.append(
                        Plan(
                            f"cascade:{a.agent_id}>{b.agent_id}/text", "cascade", (a.agent_id, b.agent_id), (t,), "text"
                        )
                    )
        return [estimate(ctx, p) for p in cands]

    def plan(self, ctx: PlanContext) -> Plan:
        cands = self.candidates(ctx)
        self.last = cands
        budget = ctx.deadline_s * 1e3 * self.headroom

        def cost(p: Plan) -> tuple[float, float, float, int]:
            # the objective to the millisecond; at a tie the more accurate plan, then the other statistic
            main = p.tail_ms if self.objective == "tail" else p.mean_ms
            other = p.mean_ms if self.objective == "tail" else p.tail_ms
            return (_ms(main), -round(p.expected_accuracy, 4), _ms(other), p.bytes_up)

        fits = [p for p in cands if cost(p)[0] <= budget]
        good = [p for p in fits if p.expected_accuracy >= ctx.accuracy_target - 1e-9]
        if good:
            best = min(good, key=cost)
            reason = "meets the accuracy target, fastest"
        elif fits:
            best = max(fits, key=lambda p: (round(p.expected_accuracy, 3), -cost(p)[0]))
            reason = "no plan meets the accuracy target in time: most accurate that fits the deadline"
        else:
            reachable = [p for p in cands if not math.isinf(p.mean_ms)]
            best = min(reachable or cands, key=cost)
            reason = "nothing fits the deadline: fastest reachable"
            return self._arm(replace(best, degraded=True, reason=reason), cands, ctx, budget, cost)
        # below the target because the network or the deadline rules the better plans out
        best = replace(best, degraded=best.expected_accuracy < ctx.accuracy_target - 1e-9, reason=reason)
        return self._arm(best, cands, ctx, budget, cost)

    def _arm(self, best: Plan, cands: list[Plan], ctx: PlanContext, budget: float, cost: Any) -> Plan:
        """``best`` with the deadline fallback on the most accurate local exit that fits, for remote plans."""
        local = [p for p in cands if p.kind == "local"]
        all_local = all(ctx.member(s).local for s in best.stages)
        if self.fallback and not all_local and local:
            fb = max((p for p in local if cost(p)[0] <= budget), key=lambda p: p.expected_accuracy, default=None)
            if fb is not None:
                # start the local exit when only its own (tail) run time and a margin are left; the margin
                # (50 ms or a tenth of the deadline) covers what the estimate does not see: the event loop,
                # the local broker, a model that was swapped out
                margin = max(0.05, 0.1 * ctx.deadline_s)
                after = max(0.0, ctx.deadline_s - fb.tail_ms * 1.5 / 1e3 - margin)
                best = replace(best, fallback=fb.stages[0], fallback_after_s=after)
        return best


# -- the pattern ------------------------------------------------------------------------------------
class Scheduled(Pattern):
    """Ask ``policy`` for a plan per request and run it. ``view`` is the live telemetry (any
    :class:`NetworkView`); ``deadline_s`` is each request's deadline."""

    kind = "scheduled"

    def __init__(
        self,
        policy: Policy,
        members: Sequence[Member],
        calibration: Calibration,
        view: NetworkView,
        *,
        deadline_s: float,
        accuracy_target: float | None = None,
        tolerance: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(name or policy.name)
        if not members:
            raise GraphError("a scheduled pattern needs members")
        self.policy = policy
        self.sched_members = list(members)
        self.calibration = calibration
        self.view = view
        self.deadline_s = deadline_s
        best = max(calibration.accuracy(m.exit) for m in members)
        self.accuracy_target = best - tolerance if accuracy_target is None else accuracy_target

    def members(self) -> list[AgentRef | Pattern]:
        return [
            agent(m.agent_id, m.kind if m.kind in ("device", "edge", "cloud") else None) for m in self.sched_members
        ]

    def graph(self) -> AgentGraph:
        g = AgentGraph(self.name)
        g.add_step("task", "task")
        g.add_step("plan", "aggregate", how=f"policy {self.policy.name}")
        g.add_step("answer", "answer")
        g.add_flow("task", "plan", "telemetry + calibration")
        for m in self.sched_members:
            g.add_agent(agent(m.agent_id))
            g.add_flow("plan", m.agent_id, "plan")
            g.add_flow(m.agent_id, "answer", "reply")
        return g

    def context(self) -> PlanContext:
        return PlanContext(self.sched_members, self.calibration, self.view, self.deadline_s, self.accuracy_target)

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        plan = self.policy.plan(self.context())
        main = asyncio.ensure_future(self._execute(plan, task, rt))
        try:
            out, degraded_by = await self._with_fallback(plan, main, task, rt)
        finally:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await main
        # An answer from short of the plan's last stage (a cascade whose deeper stage failed, a hedge whose
        # deeper tier failed, the device's deadline fallback) is degraded, and says so.
        why = degraded_by or out.details.get("degraded_by")
        if why is None and "fallback" in out.details:
            why = str(out.details["fallback"])
        if why is not None:
            plan = replace(plan, degraded=True, reason=why)
        res = Outcome(source=self.name, kind=self.kind)
        res.children.append(out)
        res.answer, res.text, res.confidence, res.reply = out.answer, out.text, out.confidence, out.reply
        res.error, res.cost = out.error, out.cost
        res.details = {**plan.summary(), "answered_by": out.details.get("answered_by", out.source)}
        return res

    async def _with_fallback(
        self, plan: Plan, main: asyncio.Future[Outcome], task: Envelope, rt: Runtime
    ) -> tuple[Outcome, str | None]:
        """The plan's outcome; or, when it is not back (or failed) once only the local exit's own run time is
        left before the deadline, the local exit's answer (then the second item says why)."""
        if plan.fallback is None or plan.fallback_after_s is None:
            return await main, None
        local_budget = self.deadline_s - plan.fallback_after_s
        done, _ = await asyncio.wait({main}, timeout=max(0.0, rt.remaining() - local_budget))
        if main in done and main.result().ok:
            return main.result(), None
        fb = asyncio.ensure_future(self._ask(rt, plan.fallback, task, f"{self.name} fallback", {"threshold": 0.0}))
        try:
            pending: set[asyncio.Future[Outcome]] = {fb} if main.done() else {main, fb}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if main in done and main.result().ok:
                    return main.result(), None
                if fb in done and fb.result().ok:
                    return fb.result(), "deadline fallback: answered on the device"
            # both failed: report the plan's own failure (the fallback's if the plan never finished)
            return (main.result() if main.done() else fb.result()), None
        finally:
            if not fb.done():
                fb.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fb

    async def _ask(self, rt: Runtime, agent_id: str, task: Envelope, label: str, meta: dict[str, Any]) -> Outcome:
        """``rt.ask``, and if it is cancelled (a losing race or hedge, a fallback not needed), the request it
        sent still goes into the trace: its bytes crossed the links (its late reply is not counted)."""
        started = time.time()
        try:
            return await rt.ask(agent_id, task, label=label, meta=meta)
        except asyncio.CancelledError:
            size = len(encode(rt.derive(task, meta=meta)))
            rt.trace.record(
                MANAGER, agent_id, "request", nbytes=size, start=started, end=time.time(), label=f"{label} (cancelled)"
            )
            raise

    async def _execute(self, plan: Plan, task: Envelope, rt: Runtime) -> Outcome:
        label = f"{self.name} {plan.name}"
        if plan.kind in ("local", "text"):
            return await self._ask(rt, plan.stages[0], task, label, {"threshold": 0.0})
        if plan.kind in ("relay", "cascade"):
            c = Cascade(list(plan.stages), accept=list(plan.thresholds), name=plan.name)
            return await rt.ask(c, task, label=label, meta={"encoding": plan.encoding})
        if plan.kind == "hedge":
            return await self._hedge(plan, task, rt, label)
        if plan.kind == "race":
            return await self._race(plan, task, rt, label)
        raise GraphError(f"unknown plan kind {plan.kind!r}")

    async def _hedge(self, plan: Plan, task: Envelope, rt: Runtime, label: str) -> Outcome:
        """Both tiers at once: the shallow answer stands if confident, the deeper one as soon as it is back
        (it is the more accurate); an unconfident shallow answer only if the deeper tier fails (degraded)."""
        shallow, deep = plan.stages
        a = asyncio.ensure_future(self._ask(rt, shallow, task, f"{label} {shallow}", {"threshold": 0.0}))
        b = asyncio.ensure_future(self._ask(rt, deep, task, f"{label} {deep}", {"threshold": 0.0}))
        pending: set[asyncio.Future[Outcome]] = {a, b}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if b in done and b.result().ok:
                    rb = b.result()
                    rb.details = {**rb.details, "answered_by": deep}
                    return rb
                if a in done:
                    ra = a.result()
                    if ra.ok and ra.confidence is not None and ra.confidence >= plan.thresholds[0]:
                        ra.details = {**ra.details, "answered_by": shallow}
                        return ra
            ra = a.result()
            if ra.ok:  # the deeper tier failed: the shallower, unconfident answer is better than none
                ra.details = {**ra.details, "answered_by": shallow, "degraded_by": f"{deep} failed"}
            return ra
        finally:
            for t in (a, b):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _race(self, plan: Plan, task: Envelope, rt: Runtime, label: str) -> Outcome:
        tasks = {
            asyncio.ensure_future(self._ask(rt, s, task, f"{label} {s}", {"threshold": 0.0})): s for s in plan.stages
        }
        pending, failed = set(tasks), None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    out = t.result()
                    if out.ok:
                        out.details = {**out.details, "answered_by": tasks[t]}
                        return out
                    failed = out
            assert failed is not None
            return failed
        finally:
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
