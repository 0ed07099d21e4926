"""Who is online, read from presence records.

Nodes own the Last Will, so a crashed node flips to offline on its own; an agent is online only
while at least one node hosting it is online (several nodes = replicas).

A Will fires only on the broker the node was connected to: when a bridged broker or a cluster
member dies, its nodes' Wills never reach us. So nodes also send heartbeats (a small QoS 0 record
on their presence topic every ``heartbeat`` seconds, the interval inside the record) and a node
that has been silent for more than ``misses`` intervals counts as offline. Silence is measured on
this process's own clock, from when records were *received*, never from the sender's timestamps,
so clock skew between machines does not matter. While our own connection is down, or our event
loop was stalled, nobody's silence counts (see :meth:`sweep`). Nodes that send no heartbeats
(older versions, ``heartbeat=None``) are judged by their Will alone, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from pydantic import ValidationError

from protocols import PresenceRecord, Status, Topics

# (node_id, agent ids it hosted, reason) — called when a node that was online goes offline
LostListener = Callable[[str, list[str], str], None]


class Presence:
    def __init__(self, topics: Topics, *, misses: float = 3.0) -> None:
        self.topics = topics
        self.misses = misses
        self.nodes: dict[str, PresenceRecord] = {}
        self.agents: dict[str, dict[str, PresenceRecord]] = {}  # agent -> its hosts' records
        # Agent ids ever announced (ids, not node ids: bounded by the deployment). Records of nodes
        # that went offline are dropped, so this is what says "presence has told us about it".
        self.known_agents: set[str] = set()
        self.last_seen: dict[str, float] = {}  # node -> monotonic time its last record arrived
        self.live_at: dict[str, float] = {}  # node -> when a record proved it connected and subscribed
        self.expired: set[str] = set()  # nodes whose heartbeats stopped (their record says online)
        self._claim_after: dict[str, float] = {}  # node -> from its last online record (Wills lack it)
        self.listeners: list[LostListener] = []
        self.paused = False  # our own connection is down: silence proves nothing
        self._last_sweep = time.monotonic()
        self._changed = asyncio.Condition()

    # -- input --------------------------------------------------------------------------------
    async def update(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Apply one presence message. ``retained``: a replay from the broker's store on
        subscribe (it says what was last announced, not that the node is connected now)."""
        parsed = self.topics.parse_presence(topic)
        if parsed is None:
            return
        kind, node_id, agent_id = parsed
        record: PresenceRecord | None = None
        if payload:
            with contextlib.suppress(ValueError, ValidationError):
                record = PresenceRecord.from_bytes(payload)
        was_online = self.node_online(node_id)
        now = time.monotonic()
        gone = False
        if kind == "node":
            if record is None:
                self.nodes.pop(node_id, None)
                gone = True
            else:
                gone = record.status != Status.ONLINE
                known = self.nodes.get(node_id)
                self.nodes[node_id] = record
                if record.status == Status.ONLINE:
                    self._heard(node_id, now, retained, known, record)
                    if record.claim_after is not None:
                        self._claim_after[node_id] = record.claim_after
        else:
            assert agent_id is not None
            hosts = self.agents.setdefault(agent_id, {})
            if record is None or record.status != Status.ONLINE:
                hosts.pop(node_id, None)
                if not hosts:
                    self.agents.pop(agent_id, None)
            else:
                hosts[node_id] = record
                self.known_agents.add(agent_id)
                if self.node_online(node_id) or node_id in self.expired:
                    self._heard(node_id, now, retained, None, None)
        if was_online and not self.node_online(node_id):
            self._lost(node_id, "offline record (Last Will or shutdown)")
        if gone:
            self._forget(node_id)
        async with self._changed:
            self._changed.notify_all()

    def _heard(
        self, node_id: str, now: float, retained: bool, known: PresenceRecord | None, record: PresenceRecord | None
    ) -> None:
        self.last_seen[node_id] = now
        self.expired.discard(node_id)
        # Live delivery, or a replay of an announcement newer than the one we knew: either way
        # the node has (re)connected and re-subscribed its inboxes since.
        newer = (
            record is not None
            and record.session is not None
            and (known is None or known.session is None or record.session > known.session)
        )
        if not retained or newer:
            self.live_at[node_id] = now

    def _forget(self, node_id: str) -> None:
        """Drop everything kept about a node that is gone (offline or deleted record), after the
        listeners were told: node ids hold a pid and a random suffix, so a long-lived client would
        otherwise grow with every node restart. A node that comes back is learnt afresh."""
        self.nodes.pop(node_id, None)
        self.last_seen.pop(node_id, None)
        self.live_at.pop(node_id, None)
        self._claim_after.pop(node_id, None)
        self.expired.discard(node_id)
        for agent_id in [a for a, hs in self.agents.items() if node_id in hs]:
            hosts = self.agents[agent_id]
            del hosts[node_id]
            if not hosts:
                del self.agents[agent_id]

    def _lost(self, node_id: str, reason: str) -> None:
        hosted = [a for a, hs in self.agents.items() if node_id in hs]
        for listener in list(self.listeners):
            listener(node_id, hosted, reason)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Mark nodes whose heartbeats stopped as offline; returns them. Call it often (the
        client does, every quarter second): it only compares numbers.

        A sweep that comes late (our loop was stalled, so records may sit unread in the socket)
        or while our connection is down expires nobody: everyone's silence clock is moved on by
        the gap instead."""
        now = time.monotonic() if now is None else now
        gap, self._last_sweep = now - self._last_sweep, now
        if self.paused or gap > 1.0:
            for n in self.last_seen:
                self.last_seen[n] += gap
            return []
        gone: list[str] = []
        for node_id, rec in self.nodes.items():
            beat = rec.heartbeat
            if (
                beat
                and rec.status == Status.ONLINE
                and node_id not in self.expired
                and now - self.last_seen.get(node_id, now) > self.misses * beat
            ):
                gone.append(node_id)
        for node_id in gone:
            self.expired.add(node_id)
            silent = now - self.last_seen.get(node_id, now)
            self._lost(node_id, f"no heartbeat for {silent:.1f}s")
            # Kept only while its record says online (``expired`` and ``claim_after`` go with the
            # record, see _forget); a beat brings the node back through _heard.
            self.last_seen.pop(node_id, None)
            self.live_at.pop(node_id, None)
        if gone:
            async with self._changed:
                self._changed.notify_all()
        return gone

    def resume(self) -> None:
        """Our connection is back: give every node a fresh window to be heard from."""
        now = time.monotonic()
        self.paused = False
        self._last_sweep = now
        for n in self.last_seen:
            self.last_seen[n] = now

    # -- queries ------------------------------------------------------------------------------
    def node_online(self, node_id: str) -> bool:
        rec = self.nodes.get(node_id)
        return rec is not None and rec.status == Status.ONLINE and node_id not in self.expired

    def hosts(self, agent_id: str) -> list[PresenceRecord]:
        """Presence records of the online replicas of an agent."""
        return [r for n, r in self.agents.get(agent_id, {}).items() if self.node_online(n)]

    def host_ids(self, agent_id: str) -> list[str]:
        return [n for n in self.agents.get(agent_id, {}) if self.node_online(n)]

    def is_online(self, agent_id: str) -> bool:
        return bool(self.hosts(agent_id))

    def online(self) -> dict[str, list[PresenceRecord]]:
        return {a: hs for a in self.agents if (hs := self.hosts(a))}

    def record(self, agent_id: str) -> PresenceRecord | None:
        hosts = self.hosts(agent_id)
        return hosts[0] if hosts else None

    def claim_after(self, node_id: str) -> float | None:
        """How soon the node claims a request it is still working on (None: it never does)."""
        return self._claim_after.get(node_id)

    def live_since(self, agent_id: str, since: float, *, strict: bool = False) -> bool:
        """Whether a host of the agent proved after ``since`` (monotonic) that it is connected
        and subscribed. Unless ``strict``, hosts that send no heartbeats (so could not prove it
        before their next reconnect) count as live."""
        for n in self.host_ids(agent_id):
            if self.live_at.get(n, -1.0) > since:
                return True
            rec = self.nodes.get(n)
            if not strict and (rec is None or rec.heartbeat is None):
                return True
        return False

    async def wait_online(self, agent_ids: Iterable[str], timeout: float) -> list[str]:
        """Wait until every agent is online; return those still missing at the timeout."""
        wanted = list(agent_ids)

        def missing() -> list[str]:
            return [a for a in wanted if not self.is_online(a)]

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: not missing()), timeout)
        return missing()

    async def wait_live(self, agent_id: str, since: float, timeout: float, *, strict: bool = False) -> bool:
        """Wait until a host of ``agent_id`` is heard live after ``since`` (see :meth:`live_since`)."""

        def live() -> bool:
            return self.live_since(agent_id, since, strict=strict)

        if timeout > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(live), timeout)
        return live()

    async def wait_offline(self, agent_id: str, timeout: float) -> bool:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: not self.is_online(agent_id)), timeout)
        return not self.is_online(agent_id)
