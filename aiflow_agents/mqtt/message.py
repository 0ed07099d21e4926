"""What the application sees of MQTT: a received :class:`Message` and the :class:`Will` a connection leaves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message", "Will"]


@dataclass(frozen=True, slots=True)
class Message:
    """One received PUBLISH. ``properties`` holds the MQTT 5 properties by their spec names without spaces
    (``"ResponseTopic"``, ``"CorrelationData"`` as bytes, ``"UserProperty"`` as a list of pairs, ...);
    empty on MQTT 3.1.1."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Will:
    """The Last Will the broker publishes when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)
