"""The dashboard's view of the network: who is online where, how loaded, how far away, and the runs
it starts — pushed to every open page as events.

It is one ordinary client on the bus (presence, telemetry and link probes, a topology manager), so it
sees exactly what a scheduler would see from the same place. A page that cannot keep up is dropped
rather than slowing the rest (its browser reconnects and starts again from a fresh snapshot)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import structlog

from aiflow_agents import AgentUnavailableError, BrokerURL, Client, Telemetry
from protocols import SigningKeyLike, new_id

from ..graph import GraphError, Tier
from ..manager import TopologyManager
from ..trace import TraceEvent
from .runs import LiveTrace, RunRecord, RunSpec, graph_json

#: tiers in the order the page draws them; nodes without one go last
TIER_ORDER = [t.value for t in Tier] + ["unknown"]
_CLOSED = ("closed", {})


class Dashboard:
    """Live state for the web page. ``probe_interval``: seconds between link probes to each node (0:
    no probes, RTTs come from real traffic only); ``refresh``: seconds between state pushes (only
    when something changed); ``max_runs``: finished runs kept (the oldest go first)."""

    def __init__(
        self,
        broker: str | BrokerURL | None = None,
        *,
        namespace: str = "default",
        signing_key: SigningKeyLike | None = None,
        probe_interval: float = 2.0,
        refresh: float = 1.0,
        max_runs: int = 100,
        queue_size: int = 1000,
    ) -> None:
        self.client = Client(broker, namespace=namespace, signing_key=signing_key)
        self.manager = TopologyManager(client=self.client)
        self.telemetry = Telemetry(self.client)
        self.probe_interval = probe_interval
        self.refresh = refresh
        self.max_runs = max_runs
        self.queue_size = queue_size
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        self._last_state: str | None = None
        self._pump: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("aiflow.dashboard")

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> Dashboard:
        await self.client.start()
        await self.telemetry.start()
        if self.probe_interval > 0:
            await self.telemetry.probe(interval=self.probe_interval)
        self._pump = asyncio.create_task(self._push_state())
        return self

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.close_pages()
        await self.telemetry.stop()
        await self.client.stop()

    async def __aenter__(self) -> Dashboard:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the network --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Nodes grouped by tier with their agents, load and the measured path to each (from here)."""
        presence = self.client.presence
        hosted: dict[str, list[str]] = {}  # node -> the agents it hosts
        for agent_id, hosts in presence.agents.items():
            for node_id in hosts:
                hosted.setdefault(node_id, []).append(agent_id)
        nodes: list[dict[str, Any]] = []
        for node_id, rec in sorted(presence.nodes.items()):
            online = presence.node_online(node_id)
            tele = self.telemetry.node(node_id)
            loads = tele.record.agents if tele is not None and not tele.stale else {}
            agents = []
            for agent_id in sorted(hosted.get(node_id, ())):
                arec = presence.agents[agent_id][node_id]
                load = loads.get(agent_id)
                agents.append(
                    {
                        "id": agent_id,
                        "type": arec.agent_type,
                        "online": online,
                        "in_flight": load.in_flight if load else None,
                        "queued": load.queued if load else None,
                        "calls": load.calls if load else None,
                        "errors": load.errors if load else None,
                        "service_ms": _round(load.service_ms) if load else None,
                    }
                )
            link = self.telemetry.link(node_id)
            nodes.append(
                {
                    "id": node_id,
                    "tier": rec.tier or "unknown",
                    "online": online,
                    "host": rec.host,
                    "pid": rec.pid,
                    "agents": agents,
                    "cpu": (
                        {"process": round(tele.record.cpu.process, 2), "cores": tele.record.cpu.cores}
                        if tele is not None and not tele.stale
                        else None
                    ),
                    "link": _link_json(link) if link is not None else None,
                }
            )
        tiers = []
        for tier in TIER_ORDER:
            members = [n for n in nodes if n["tier"] == tier]
            if not members and tier == "unknown":
                continue
            links = [n["link"] for n in members if n["online"] and n["link"]]
            rtts = [x["rtt_ms"] for x in links if x["rtt_ms"]]
            tputs = [x["throughput_mbps"] for x in links if x["throughput_mbps"]]
            tiers.append(
                {
                    "tier": tier,
                    "nodes": [n["id"] for n in members],
                    "online": sum(n["online"] for n in members),
                    "rtt_ms": _round(statistics.median(rtts)) if rtts else None,
                    "throughput_mbps": _round(statistics.median(tputs)) if tputs else None,
                }
            )
        online_agents = sorted(a for a in presence.online())
        return {
            "broker": str(self.client.connection.url),
            "namespace": self.client.topics.namespace,
            "connected": self.client.connection.connected,
            "tiers": tiers,
            "nodes": nodes,
            "agents": online_agents,
        }

    # -- runs ---------------------------------------------------------------------------------
    async def start_run(self, spec: RunSpec) -> RunRecord:
        """Start ``spec`` in the background and return its record at once. Raises ``GraphError``/
        ``ValueError`` for a pattern that cannot be built, :class:`AgentUnavailableError` for members
        that are not online (checked now, so the form can say so)."""
        pattern = spec.build()
        pattern.validate()
        online = self.client.presence.online()
        missing = [a for a in pattern.agent_ids() if a not in online]
        if missing:
            raise AgentUnavailableError(", ".join(missing), sorted(online))
        record = RunRecord(new_id()[:12], spec, graph_json(pattern.graph()))
        self.runs[record.id] = record
        while len(self.runs) > self.max_runs:
            oldest = next(iter(self.runs))
            if self.runs[oldest].status == "running":
                break
            self.runs.pop(oldest)
        self._emit("run", {"run": record.summary(), "graph": record.graph})
        task = asyncio.create_task(self._run(record, pattern))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _run(self, record: RunRecord, pattern: Any) -> None:
        def on_event(ev: TraceEvent) -> None:
            self._emit("trace", {"run": record.id, "event": ev.to_dict()})

        try:
            result = await self.manager.run(
                pattern, record.spec.task, timeout=record.spec.timeout, trace=LiveTrace(on_event)
            )
            record.result = result.to_dict()
            record.status = "done" if result.ok else "failed"
        except (GraphError, AgentUnavailableError, ValueError) as e:
            record.status, record.error = "failed", str(e)
        except Exception as e:  # a run's failure is shown on the page, never takes the server down
            self.log.exception("dashboard_run_failed", run=record.id)
            record.status, record.error = "failed", f"{type(e).__name__}: {e}"
        self._emit("done", {"run": record.summary(), "result": record.to_dict()})

    # -- pushing to pages ---------------------------------------------------------------------
    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events for one page: a snapshot and the recent runs first, then changes as they happen."""
        q: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(self.queue_size)
        self._subscribers.add(q)
        try:
            yield "state", self.snapshot()
            yield "runs", {"runs": [r.summary() for r in self.runs.values()]}
            while True:
                kind, data = await q.get()
                if (kind, data) == _CLOSED:
                    return
                yield kind, data
        finally:
            self._subscribers.discard(q)

    def close_pages(self) -> None:
        """End every open event stream (before a server shuts down, so it need not wait for them)."""
        for q in list(self._subscribers):
            self._close(q)

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait((kind, data))
            except asyncio.QueueFull:
                self.log.warning("dashboard_page_too_slow", dropped=True)
                self._close(q)

    def _close(self, q: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        self._subscribers.discard(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(_CLOSED)

    async def _push_state(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            if not self._subscribers:  # no page open: each one gets a fresh snapshot when it connects
                self._last_state = None
                continue
            try:
                state = self.snapshot()
            except Exception:  # pragma: no cover - a snapshot bug must not stop the pushes
                self.log.exception("dashboard_snapshot_failed")
                continue
            text = json.dumps(state, sort_keys=True, default=str)
            if text != self._last_state:
                self._last_state = text
                self._emit("state", state)


def _round(x: float | None, digits: int = 2) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


def _link_json(link: Any) -> dict[str, Any]:
    tput = link.throughput_bps
    return {
        "rtt_ms": _round(link.recent_rtt_ms if link.recent_rtt_ms is not None else link.rtt_ms),
        "throughput_mbps": None if tput is None else (None if math.isinf(tput) else _round(tput / 1e6)),
        "fast": tput is not None and math.isinf(tput),
        "up": link.up,
        "samples": link.samples,
    }
