"""Our own MQTT 3.1.1 / 5 client on asyncio: a sans-I/O packet codec (:mod:`.packets`), the application's
types (:mod:`.message`), one connection (:mod:`.session`), its errors (:mod:`.errors`) and an in-process broker
for tests (:mod:`.memory`, selected by ``memory://NAME`` broker URLs).

It replaces the third-party client (and its patched internals) at run time; see ``docs/performance.md``.
Reconnection, subscriptions across reconnects and routing live in :mod:`aiflow_agents.connection`.
"""

from protocols.mqtt_strings import mqtt_string_problem, topic_filter_problem, topic_name_problem

from .errors import (
    AckError,
    ConnectionClosedError,
    ConnectRefusedError,
    InvalidTopicError,
    MalformedPacketError,
    MqttError,
    PacketTooLargeError,
    reason_name,
)
from .memory import MemoryBroker, MemorySession, topic_matches
from .message import Message, Will
from .packets import (
    MQTT_5,
    MQTT_311,
    BadPublish,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    StreamParser,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    check_publish,
    decode,
    decode_properties,
    encode,
    encode_properties,
)
from .session import Session

__all__ = [
    "MQTT_5",
    "MQTT_311",
    "AckError",
    "BadPublish",
    "Connack",
    "Connect",
    "ConnectRefusedError",
    "ConnectionClosedError",
    "Disconnect",
    "InvalidTopicError",
    "MalformedPacketError",
    "MemoryBroker",
    "MemorySession",
    "Message",
    "MqttError",
    "Packet",
    "PacketTooLargeError",
    "PingReq",
    "PingResp",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "Session",
    "StreamParser",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "check_publish",
    "decode",
    "decode_properties",
    "encode",
    "encode_properties",
    "mqtt_string_problem",
    "reason_name",
    "topic_filter_problem",
    "topic_matches",
    "topic_name_problem",
]
