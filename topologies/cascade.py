"""Cascade: ordered stages (typically device -> edge -> cloud); each answers or escalates.

Consecutive agent stages under a confidence policy form a **direct chain**: the manager sends the
task to the first stage with the rest of the chain as the envelope's ``route``, and a stage that is
not confident forwards the envelope itself (text plus its latents, e.g. hidden states) straight to
the next. Escalation costs one hop. Each forwarding node sends the manager a progress event, so the
trace has every hop and a stage that never answers is detected by its hop deadline: the manager
then falls through to the next stage itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiflow_agents import AiflowError
from protocols import Envelope, Kind, new_id, ops

from .graph import AgentGraph, AgentRef, GraphError
from .pattern import Outcome, Pattern, Runtime, as_member, member_name
from .policy import AcceptPolicy, ConfidenceAtLeast, PerStageConfidence, Verifier, parse_policy
from .trace import MANAGER


class Cascade(Pattern):
    kind = "cascade"

    def __init__(
        self,
        stages: Sequence[Any],
        *,
        accept: str | float | list[float] | AcceptPolicy = "confidence>=0.8",
        hop_timeout: float | None = None,
        direct: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.stages = [as_member(s) for s in stages]
        self.policy = parse_policy(accept)
        if hop_timeout is not None and hop_timeout <= 0:
            raise GraphError(f"cascade {self.name!r}: hop_timeout must be > 0")
        self.hop_timeout = hop_timeout
        self.direct = direct
        ids = [s.agent_id for s in self.stages if isinstance(s, AgentRef)]
        dup = sorted({a for a in ids if ids.count(a) > 1})
        if dup:
            raise GraphError(f"cascade {self.name!r}: stage(s) {dup} appear twice, which would make a cycle")

    def members(self) -> list[AgentRef | Pattern]:
        return list(self.stages)

    def helpers(self) -> list[AgentRef]:
        return [self.policy.verifier] if isinstance(self.policy, Verifier) else []

    def graph(self) -> AgentGraph:
        g = AgentGraph(self.name)
        g.add_step("task", "task")
        g.add_step("answer", "answer")
        prev_exit = "task"
        for i, s in enumerate(self.stages):
            entry, exit_ = self._entry_exit(g, s, f"{self.name}.{i}")
            g.add_flow(prev_exit, entry, "task" if i == 0 else f"escalate ({self.policy})")
            g.add_flow(exit_, "answer", "accepted" if i < len(self.stages) - 1 else "final")
            prev_exit = exit_
        return g

    def _hop_limit(self, rt: Runtime, stages_left: int) -> float:
        if self.hop_timeout is not None:
            return min(self.hop_timeout, rt.remaining())
        # by default the remaining time is split evenly over the stages still ahead
        return rt.remaining() / max(1, stages_left)

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        out = Outcome(source=self.name, kind=self.kind)
        stages_log: list[dict[str, Any]] = []
        carried: list[Any] = []  # latents from the last stage that escalated
        i = 0
        n = len(self.stages)
        final: Outcome | None = None
        answered_by: int | None = None
        while i < n:
            chain = self._chain_from(i)
            if len(chain) > 1:
                results, carried = await self._run_chain(chain, i, task, rt, carried)
            else:
                res = await rt.ask(
                    self.stages[i],
                    task,
                    label=f"{self.name} stage {i + 1}",
                    timeout=self._hop_limit(rt, n - i),
                    extra_parts=carried,
                )
                results = [(i, res)]
                if res.reply is not None:
                    carried = res.reply.tensors()
            for idx, res in results:
                out.children.append(res)
                out.cost = out.cost.add(res.cost)
                entry = {
                    "stage": idx + 1,
                    "member": member_name(self.stages[idx]),
                    "answer": res.answer,
                    "confidence": res.confidence,
                    "error": res.error,
                }
                stages_log.append(entry)
            idx, res = results[-1]
            i = idx + 1
            if not res.ok:
                continue  # fall through to the next stage on error or timeout
            accepted = i == n or await self._accepts(res, task, rt, entry, idx)
            if accepted:
                final, answered_by = res, idx
                break
        out.details = {"stages": stages_log, "policy": str(self.policy)}
        if final is None:
            earlier = [c for c in out.children if c.ok]
            if not earlier:
                out.error = "every stage failed"
                return out
            # the last stage failed: keep the most confident earlier answer, and say so
            final = max(earlier, key=lambda c: c.confidence if c.confidence is not None else -1.0)
            answered_by = next(j for j, s in enumerate(self.stages) if member_name(s) == final.source)
            out.details["fallback"] = "last stage failed; best earlier answer kept"
        out.answer, out.text, out.confidence = final.answer, final.text, final.confidence
        out.reply = final.reply
        out.details["answered_by"] = member_name(self.stages[answered_by])
        out.details["answered_stage"] = answered_by + 1
        return out

    def _chain_from(self, i: int) -> list[AgentRef]:
        """Consecutive agent stages starting at ``i`` that nodes can escalate between by themselves."""
        if not (self.direct and isinstance(self.policy, (ConfidenceAtLeast, PerStageConfidence))):
            return [self.stages[i]] if isinstance(self.stages[i], AgentRef) else []
        chain: list[AgentRef] = []
        for s in self.stages[i:]:
            if not isinstance(s, AgentRef):
                break
            chain.append(s)
        return chain

    async def _accepts(self, res: Outcome, task: Envelope, rt: Runtime, entry: dict[str, Any], stage: int = 0) -> bool:
        if isinstance(self.policy, PerStageConfidence):
            ok = self.policy.at(stage).accepts(res.confidence)
        elif isinstance(self.policy, ConfidenceAtLeast):
            ok = self.policy.accepts(res.confidence)
        else:
            verdict = await rt.verify(self.policy.verifier, task, res.answer or "", label=f"{self.name} verify")
            ok = bool(verdict.details.get("accepted"))
            entry["verified"] = ok
        entry["accepted"] = ok
        return ok

    async def _run_chain(
        self, chain: list[AgentRef], first: int, task: Envelope, rt: Runtime, carried: list[Any]
    ) -> tuple[list[tuple[int, Outcome]], list[Any]]:
        """Send once down the chain; follow progress events; fall through on a silent stage."""
        ids = [c.agent_id for c in chain]
        n_total = len(self.stages)
        results: list[tuple[int, Outcome]] = []
        if isinstance(self.policy, PerStageConfidence):
            wire = ops.AcceptancePolicy(per_stage={a: self.policy.at(first + k).threshold for k, a in enumerate(ids)})
        else:
            assert isinstance(self.policy, ConfidenceAtLeast)
            wire = self.policy.wire()
        env = rt.derive(task, meta=wire.to_meta(), extra_parts=carried)
        current = 0
        loop = asyncio.get_running_loop()
        client = rt.client
        async with client.conversation(env, timeout=rt.remaining()) as conv:

            async def send_to(k: int) -> float:
                base = conv.request  # addressed: reply-to, correlation id, deadline
                msg = base.model_copy(
                    update={"id": base.id if k == 0 else new_id(), "recipient": ids[k], "route": ids[k + 1 :]}
                )
                t = time.time()
                size = await conv.send(client.topics.inbox(ids[k]), msg)
                rt.trace.record(
                    MANAGER,
                    ids[k],
                    "request",
                    nbytes=size,
                    start=t,
                    end=time.time(),
                    label=f"{self.name} stage {first + k + 1}",
                    correlation_id=conv.correlation_id,
                )
                return t

            stage_start = await send_to(0)
            hop_end = loop.time() + self._hop_limit(rt, n_total - first)
            while True:
                try:
                    msg, size = await conv.receive(min(hop_end - loop.time(), rt.remaining()))
                except (TimeoutError, AiflowError) as e:
                    why = "timeout" if isinstance(e, TimeoutError) else f"{getattr(e, 'code', 'error')}: {e}"
                    label = f"{self.name} stage {first + current + 1}"
                    rt.trace.record(
                        ids[current],
                        MANAGER,
                        "timeout" if why == "timeout" else "error",
                        start=stage_start,
                        end=time.time(),
                        label=label,
                        error=why,
                    )
                    results.append(
                        (
                            first + current,
                            Outcome(
                                source=ids[current],
                                kind="agent",
                                label=label,
                                error=f"{why}: no answer from {ids[current]!r}",
                                latency=time.time() - stage_start,
                            ),
                        )
                    )
                    if current + 1 >= len(chain) or rt.remaining() <= 0 or not isinstance(e, TimeoutError):
                        return results, []
                    current += 1
                    stage_start = await send_to(current)
                    hop_end = loop.time() + self._hop_limit(rt, n_total - first - current)
                    continue
                if msg.kind == Kind.EVENT:
                    hop = msg.meta.get("hop") or {}
                    src, dst = hop.get("agent"), hop.get("forwarded_to")
                    if src not in ids or dst not in ids or ids.index(src) < current:
                        continue  # a late event from a stage we already skipped
                    k = ids.index(src)
                    rt.trace.record(
                        src,
                        dst,
                        "forward",
                        nbytes=int(hop.get("bytes", 0)),
                        start=float(hop["start"]),
                        end=float(hop["end"]),
                        label=f"{self.name} stage {first + k + 1}",
                        via="forward",
                        error=hop.get("error"),
                        correlation_id=conv.correlation_id,
                        answer=None if hop.get("error") else _str(hop.get("answer")),
                    )
                    res = Outcome(
                        source=src,
                        kind="agent",
                        label=f"{self.name} stage {first + k + 1}",
                        answer=None if hop.get("error") else _str(hop.get("answer")),
                        confidence=hop.get("confidence"),
                        error=_hop_error(hop),
                        latency=float(hop["end"]) - float(hop["start"]),
                    )
                    if isinstance(hop.get("cost"), dict):
                        res.cost = ops.Cost.model_validate(hop["cost"])
                    results.append((first + k, res))
                    current = ids.index(dst)
                    stage_start = float(hop["end"])
                    hop_end = loop.time() + self._hop_limit(rt, n_total - first - current)
                    continue
                if msg.sender not in ids or ids.index(msg.sender) < current:
                    continue
                k = ids.index(msg.sender)
                res = rt._outcome_from_exchange(
                    msg.sender, msg, size, stage_start, time.time(), None, f"{self.name} stage {first + k + 1}"
                )
                results.append((first + k, res))
                return results, msg.tensors()


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _hop_error(hop: dict[str, Any]) -> str | None:
    if hop.get("error"):
        return f"{hop['error']}: {hop.get('error_message', '')}"
    return None
