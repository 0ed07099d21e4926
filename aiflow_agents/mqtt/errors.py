"""Errors of the MQTT client, all :class:`aiflow_agents.errors.AiflowError` subclasses so callers catch one base."""

from __future__ import annotations

from ..errors import AiflowError

__all__ = [
    "AckError",
    "ConnectRefusedError",
    "ConnectionClosedError",
    "InvalidTopicError",
    "MalformedPacketError",
    "MqttError",
    "PacketTooLargeError",
    "reason_name",
]

# MQTT 5 reason codes (§2.4) worth naming in logs; 3.1.1 CONNACK return codes are mapped in session.py.
REASONS = {
    0x00: "success",
    0x04: "disconnect with will message",
    0x10: "no matching subscribers",
    0x11: "no subscription existed",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x96: "message rate too high",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def reason_name(code: int) -> str:
    return f"0x{code:02X} {REASONS.get(code, 'unknown reason')}"


class MqttError(AiflowError):
    """Base of the MQTT client's errors."""

    code = "mqtt_error"


class MalformedPacketError(MqttError, ValueError):
    """Bytes that are not a well-formed MQTT packet."""

    code = "malformed_packet"


class InvalidTopicError(MqttError, ValueError):
    """A topic name, filter or string property a broker would refuse (and disconnect us for): never sent."""

    code = "invalid_topic"


class PacketTooLargeError(MqttError, ValueError):
    """A packet larger than the broker's Maximum Packet Size: never sent."""

    code = "packet_too_large"


class ConnectRefusedError(MqttError):
    """The broker answered CONNECT with a failure code (``reason_code``; 3.1.1 return codes as they are)."""

    code = "connect_refused"

    def __init__(self, reason_code: int, message: str, *, version: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.version = version


class ConnectionClosedError(MqttError):
    """The connection ended. ``reason_code`` is the broker's DISCONNECT reason (MQTT 5) or None;
    ``before_connack`` says the broker closed it before answering CONNECT."""

    code = "connection_closed"

    def __init__(
        self,
        message: str,
        *,
        reason_code: int | None = None,
        before_connack: bool = False,
        unsent: bool = False,
        by_broker: bool = False,
        last_packet: bool = False,
    ) -> None:
        super().__init__(message)
        self.last_packet = last_packet  # (raised by a publish) that publish was the last packet written
        self.by_broker = by_broker  # the broker ended it (DISCONNECT or an orderly close), not us or the network
        self.reason_code = reason_code
        self.before_connack = before_connack
        self.unsent = unsent  # raised before anything was written (the connection was already gone)


class AckError(MqttError):
    """SUBSCRIBE/UNSUBSCRIBE answered with a failure reason code."""

    code = "mqtt_ack_error"

    def __init__(self, message: str, reason_codes: list[int]) -> None:
        super().__init__(message)
        self.reason_codes = reason_codes
