"""The topology manager: binds a pattern's agents to live agents on the bus and runs it."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiflow_agents import AgentUnavailableError, BrokerURL, Client, RemoteAgentError
from protocols import Envelope, SigningKeyLike, ops

from .dataflow import Dataflow
from .graph import AgentGraph
from .pattern import Outcome, Pattern, Runtime, group_name
from .trace import Trace


@dataclass
class RunResult:
    """The answer, who contributed what (per round / stage / layer), and the trace of every message."""

    pattern: str
    task: str
    answer: str | None
    outcome: Outcome
    trace: Trace
    started: float
    ended: float
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.answer is not None

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def answered_by(self) -> str | None:
        """For a cascade: the member whose answer stood."""
        return self.outcome.details.get("answered_by")

    def contributions(self) -> list[dict[str, Any]]:
        """Every agent answer in the run, flattened, with the round/stage/layer it belongs to."""
        rows: list[dict[str, Any]] = []

        def walk(o: Outcome) -> None:
            if o.kind == "agent":
                rows.append(
                    {
                        "agent": o.source,
                        "label": o.label,
                        "answer": o.answer,
                        "confidence": o.confidence,
                        "error": o.error,
                        "latency_ms": round(o.latency * 1e3, 3),
                    }
                )
            for c in o.children:
                walk(c)

        walk(self.outcome)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "task": self.task,
            "answer": self.answer,
            "ok": self.ok,
            "error": self.error,
            "elapsed_ms": round(self.elapsed * 1e3, 3),
            "answered_by": self.answered_by,
            "cost": self.outcome.cost.model_dump(),
            "bytes_on_wire": self.trace.bytes_total,
            "outcome": self.outcome.to_dict(),
            "contributions": self.contributions(),
            "trace": self.trace.to_list(),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text


class TopologyManager:
    """Runs patterns over the bus. Every hop is a protocol envelope, so agents may live anywhere."""

    def __init__(
        self,
        broker: str | BrokerURL | None = None,
        *,
        namespace: str = "default",
        client: Client | None = None,
        presence_timeout: float = 2.0,
        signing_key: SigningKeyLike | None = None,
    ) -> None:
        # signing_key: sign every request and accept only signed replies (ignored with ``client``,
        # which carries its own key)
        self.client = client or Client(broker, namespace=namespace, signing_key=signing_key)
        self._owns_client = client is None
        self.presence_timeout = presence_timeout
        self._joined: dict[str, set[str]] = {}
        self._join_lock = asyncio.Lock()

    async def start(self) -> TopologyManager:
        await self.client.start()
        return self

    async def stop(self) -> None:
        if self._owns_client:
            await self.client.stop()

    async def __aenter__(self) -> TopologyManager:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def ensure_group(self, agent_ids: list[str]) -> str:
        """Make sure each agent is subscribed to the group topic for this member set (once)."""
        group = group_name(self.client.topics.namespace, agent_ids)
        async with self._join_lock:
            joined = self._joined.setdefault(group, set())
            missing = [a for a in agent_ids if a not in joined]
            if missing:
                msg = {ops.OP: ops.Op.JOIN_GROUP, ops.GROUP: group}
                exchanges = await asyncio.gather(
                    *(
                        self.client.exchange(a, Envelope.request(meta=msg), timeout=10, check_presence=False)
                        for a in missing
                    )
                )
                for a, ex in zip(missing, exchanges, strict=True):
                    if ex.ok:
                        joined.add(a)
            # Members that could not join still get nothing twice: they are asked one by one.
        return group

    async def run(
        self,
        pattern: Pattern | AgentGraph,
        task: str | Envelope,
        *,
        timeout: float = 60.0,
        check_online: bool = True,
        trace: Trace | None = None,
    ) -> RunResult:
        """Run ``pattern`` on ``task``; never takes longer than ``timeout`` (plus a small margin).
        ``trace``: record into this one (e.g. a subclass that shows messages as they happen)."""
        if isinstance(pattern, AgentGraph):
            pattern = Dataflow(pattern)
        pattern.validate()
        env = Envelope.request(task) if isinstance(task, str) else task
        env = env.model_copy(update={"sender": env.sender if env.sender != "anonymous" else self.client.client_id})
        if check_online:
            missing = await self.client.presence.wait_online(pattern.agent_ids(), self.presence_timeout)
            if missing:
                raise AgentUnavailableError(", ".join(missing), sorted(self.client.presence.online())) from None
        started = time.time()
        trace = Trace() if trace is None else trace
        rt = Runtime(self, started + timeout, trace)
        error = None
        try:
            async with asyncio.timeout(timeout + 0.5):
                outcome = await pattern.run(env, rt)
        except TimeoutError:
            outcome = Outcome(source=pattern.name, kind=pattern.kind, error=f"run deadline of {timeout:g}s exceeded")
        except RemoteAgentError as e:  # pragma: no cover - patterns turn remote errors into outcomes
            outcome = Outcome(source=pattern.name, kind=pattern.kind, error=str(e))
        if outcome.error:
            error = outcome.error
        return RunResult(
            pattern=pattern.name,
            task=env.text,
            answer=outcome.answer,
            outcome=outcome,
            trace=trace,
            started=started,
            ended=time.time(),
            error=error,
        )
