"""Who is online, read from retained presence records.

Nodes own the Last Will, so a crashed node flips to offline on its own; an agent is online only
while at least one node hosting it is online (several nodes = replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from pydantic import ValidationError

from protocols import PresenceRecord, Status, Topics


class Presence:
    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.nodes: dict[str, PresenceRecord] = {}
        self.agents: dict[str, dict[str, PresenceRecord]] = {}
        self._changed = asyncio.Condition()

    async def update(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_presence(topic)
        if parsed is None:
            return
        kind, node_id, agent_id = parsed
        record: PresenceRecord | None = None
        if payload:
            with contextlib.suppress(ValueError, ValidationError):
                record = PresenceRecord.from_bytes(payload)
        if kind == "node":
            if record is None:
                self.nodes.pop(node_id, None)
            else:
                self.nodes[node_id] = record
        else:
            assert agent_id is not None
            hosts = self.agents.setdefault(agent_id, {})
            if record is None or record.status != Status.ONLINE:
                hosts.pop(node_id, None)
                if not hosts:
                    self.agents.pop(agent_id, None)
            else:
                hosts[node_id] = record
        async with self._changed:
            self._changed.notify_all()

    def node_online(self, node_id: str) -> bool:
        rec = self.nodes.get(node_id)
        return rec is not None and rec.status == Status.ONLINE

    def hosts(self, agent_id: str) -> list[PresenceRecord]:
        """Presence records of the online replicas of an agent."""
        return [r for n, r in self.agents.get(agent_id, {}).items() if self.node_online(n)]

    def is_online(self, agent_id: str) -> bool:
        return bool(self.hosts(agent_id))

    def online(self) -> dict[str, list[PresenceRecord]]:
        return {a: hs for a in self.agents if (hs := self.hosts(a))}

    def record(self, agent_id: str) -> PresenceRecord | None:
        hosts = self.hosts(agent_id)
        return hosts[0] if hosts else None

    async def wait_online(self, agent_ids: Iterable[str], timeout: float) -> list[str]:
        """Wait until every agent is online; return those still missing at the timeout."""
        wanted = list(agent_ids)

        def missing() -> list[str]:
            return [a for a in wanted if not self.is_online(a)]

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: not missing()), timeout)
        return missing()

    async def wait_offline(self, agent_id: str, timeout: float) -> bool:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: not self.is_online(agent_id)), timeout)
        return not self.is_online(agent_id)
