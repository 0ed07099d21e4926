"""MQTT binding of protocol v1: the topic scheme, presence records and MQTT 5 property mirroring.

Kept free of any MQTT client library so that other runtimes can reuse it.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .codec import CONTENT_TYPE
from .envelope import AGENT_ID_PATTERN, Envelope, is_valid_agent_id

TOPIC_ROOT = "aiflow/v1"
# An id as one topic level (SPEC §11.1), for fullmatch: a trailing newline does not pass.
_ID_LEVEL = re.compile(AGENT_ID_PATTERN)


def check_level(value: str, what: str = "agent id") -> str:
    """Reject ids that would break the topic tree (``/``, wildcards, empty) or make a topic that not
    every supported broker carries (a space or ``.``: SPEC §6.1), so our own topics are always portable."""
    if not is_valid_agent_id(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 characters of letters, digits, '_', '-' "
            "(no '/', '+', '#', '.' or spaces: '.' and spaces make the NATS MQTT listener drop the "
            "connection), starting with a letter, digit or '_'"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one deployment namespace, ``aiflow/v1/<namespace>/...``."""

    namespace: str = "default"

    def __post_init__(self) -> None:
        check_level(self.namespace, "namespace")

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.namespace}"

    def inbox(self, agent_id: str) -> str:
        """Requests addressed to one agent (every replica of it shares this topic)."""
        return f"{self.base}/agents/{check_level(agent_id)}/inbox"

    def shared_inbox(self, agent_id: str) -> str:
        """MQTT 5 shared subscription: replicas of one agent id split its requests."""
        return f"$share/{check_level(agent_id)}/{self.inbox(agent_id)}"

    def group(self, group_id: str) -> str:
        """Fan-out: publish once, every member subscribed to the group gets a copy from the broker."""
        return f"{self.base}/groups/{check_level(group_id, 'group id')}/inbox"

    @property
    def group_filter(self) -> str:
        """Matches every group inbox (nodes route all group traffic to their own dispatcher)."""
        return f"{self.base}/groups/+/inbox"

    def replies(self, client_id: str) -> str:
        return f"{self.base}/clients/{check_level(client_id, 'client id')}/replies"

    def events(self, agent_id: str) -> str:
        return f"{self.base}/events/{check_level(agent_id)}"

    def errors(self, agent_id: str) -> str:
        """Failures that had no reply address: published here so they are never silently dropped."""
        return f"{self.base}/errors/{check_level(agent_id)}"

    def node_presence(self, node_id: str) -> str:
        return f"{self.base}/presence/nodes/{check_level(node_id, 'node id')}"

    def agent_presence(self, agent_id: str, node_id: str) -> str:
        return f"{self.base}/presence/agents/{check_level(agent_id)}/{check_level(node_id, 'node id')}"

    @property
    def presence_filter(self) -> str:
        return f"{self.base}/presence/#"

    def telemetry(self, node_id: str) -> str:
        """A node's telemetry records (JSON, QoS 0, not retained: SPEC §11.4)."""
        return f"{self.base}/telemetry/nodes/{check_level(node_id, 'node id')}"

    @property
    def telemetry_filter(self) -> str:
        return f"{self.base}/telemetry/nodes/+"

    def parse_telemetry(self, topic: str) -> str | None:
        """The node id of a telemetry topic; None if ``topic`` is not one (or its id is not valid)."""
        return self._id_after(topic, f"{self.base}/telemetry/nodes/", "")

    def probe(self, node_id: str) -> str:
        """Link probes for one node, which it answers at once (SPEC §11.4)."""
        return f"{self.base}/probe/{check_level(node_id, 'node id')}"

    def probe_replies(self, client_id: str) -> str:
        """Where a node answers one client's probes: the only reply address a node accepts in a probe."""
        return f"{self.base}/clients/{check_level(client_id, 'client id')}/probes"

    def parse_probe_replies(self, topic: str) -> str | None:
        """The client id of a probe reply topic; None if ``topic`` is not exactly one."""
        return self._id_after(topic, f"{self.base}/clients/", "/probes")

    @staticmethod
    def _id_after(topic: str, prefix: str, suffix: str) -> str | None:
        if not (topic.startswith(prefix) and topic.endswith(suffix)) or len(topic) < len(prefix) + len(suffix):
            return None
        level = topic[len(prefix) : len(topic) - len(suffix)]
        return level if _ID_LEVEL.fullmatch(level) else None

    def parse_presence(self, topic: str) -> tuple[str, str, str | None] | None:
        """``("node", node_id, None)`` or ``("agent", node_id, agent_id)``; None if not a presence topic."""
        prefix = f"{self.base}/presence/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :].split("/")
        if len(rest) == 2 and rest[0] == "nodes":
            return ("node", rest[1], None)
        if len(rest) == 3 and rest[0] == "agents":
            return ("agent", rest[2], rest[1])
        return None


class Status(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class PresenceRecord(BaseModel):
    """Retained JSON on a presence topic. Nodes carry the Last Will; an agent counts as online
    only while the node hosting it is online."""

    model_config = ConfigDict(extra="ignore")

    status: Status
    node_id: str
    agent_id: str | None = None
    agent_type: str | None = None
    accepts: dict[str, Any] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)
    tier: str | None = None
    pid: int | None = None
    host: str | None = None
    ts: float = Field(default_factory=time.time)
    # Liveness (node records): seconds between heartbeats (None: the node sends none, only its
    # Will says it is gone); seconds after which a still-running request is claimed; a counter
    # that grows with every (re)connect, so a reader can tell a fresh announcement from a replay.
    heartbeat: float | None = None
    claim_after: float | None = None
    session: int | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PresenceRecord:
        return cls.model_validate(json.loads(data))


def mqtt5_properties(envelope: Envelope, now: float | None = None) -> dict[str, Any]:
    """What an MQTT 5 publisher mirrors from the envelope into PUBLISH properties.

    The envelope stays authoritative (so MQTT 3.1.1 brokers work); the properties let brokers
    expire stale requests and let a receiver answer even a frame it cannot decode.
    """
    props: dict[str, Any] = {
        "ContentType": CONTENT_TYPE,
        "UserProperty": [
            ("aiflow-kind", str(envelope.kind)),
            ("aiflow-id", envelope.id),
            ("aiflow-sender", envelope.sender),
        ],
    }
    if envelope.reply_to:
        props["ResponseTopic"] = envelope.reply_to
    corr = envelope.correlation_id or (envelope.id if envelope.reply_to else None)
    if corr:
        props["CorrelationData"] = corr.encode()
    if envelope.deadline is not None:
        remaining = envelope.deadline - (now if now is not None else time.time())
        # A Four Byte Integer in MQTT 5: a far-off deadline must not overflow the packet field.
        props["MessageExpiryInterval"] = min(0xFFFF_FFFF, max(1, math.ceil(remaining)))
    return props
