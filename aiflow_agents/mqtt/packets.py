"""Sans-I/O MQTT 3.1.1 / 5 packets: encode to bytes, decode from bytes, an incremental stream parser.

No sockets here: :mod:`aiflow_agents.mqtt.session` feeds received bytes to :class:`StreamParser` and writes
what :func:`encode` returns. Malformed input raises :class:`MalformedPacketError`. MQTT 5 properties are plain
dicts keyed by the spec's names without spaces (``"ResponseTopic"``, ``"UserProperty"`` as a list of pairs),
the names the stock Python clients use, so call sites read like before.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from protocols.mqtt_strings import mqtt_string_problem, topic_name_problem

from .errors import InvalidTopicError, MalformedPacketError

__all__ = [
    "MQTT_5",
    "MQTT_311",
    "BadPublish",
    "Connack",
    "Connect",
    "Disconnect",
    "Packet",
    "PingReq",
    "PingResp",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "StreamParser",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "check_publish",
    "decode",
    "decode_properties",
    "encode",
    "encode_properties",
    "encode_publish_header",
]

MQTT_311 = 4  # protocol level byte of MQTT 3.1.1
MQTT_5 = 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
MAX_REMAINING = 268_435_455

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!L")


# -- primitives -----------------------------------------------------------------------------------
def vbi(x: int) -> bytes:
    """A Variable Byte Integer."""
    if x < 128:
        if x < 0:
            raise ValueError(f"negative length {x}")
        return bytes((x,))
    if x > MAX_REMAINING:
        raise ValueError(f"{x} does not fit a Variable Byte Integer (max {MAX_REMAINING})")
    out = bytearray()
    while True:
        digit, x = x & 0x7F, x >> 7
        out.append(digit | 0x80 if x else digit)
        if not x:
            return bytes(out)


def _read_vbi(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(4):
        if pos >= end:
            raise MalformedPacketError("truncated variable byte integer")
        digit = buf[pos]
        pos += 1
        value |= (digit & 0x7F) << shift
        if not digit & 0x80:
            return value, pos
        shift += 7
    raise MalformedPacketError("variable byte integer longer than 4 bytes")


def _utf(s: str) -> bytes:
    data = s.encode("utf-8")
    if len(data) > 65535:
        raise ValueError("MQTT string longer than 65535 bytes")
    return _U16.pack(len(data)) + data


def _bin(b: bytes | bytearray | memoryview) -> bytes:
    if len(b) > 65535:
        raise ValueError("MQTT binary data longer than 65535 bytes")
    return _U16.pack(len(b)) + bytes(b)


class _BadString(MalformedPacketError):
    """A well-framed string that is not valid MQTT UTF-8 (the packet's structure is intact)."""


class _Reader:
    """Bounds-checked reads over one packet's body."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def byte(self) -> int:
        if self.pos >= self.end:
            raise MalformedPacketError("truncated packet")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        if self.pos + 2 > self.end:
            raise MalformedPacketError("truncated packet")
        v: int = _U16.unpack_from(self.buf, self.pos)[0]
        self.pos += 2
        return v

    def u32(self) -> int:
        if self.pos + 4 > self.end:
            raise MalformedPacketError("truncated packet")
        v: int = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def vbi(self) -> int:
        v, self.pos = _read_vbi(self.buf, self.pos, self.end)
        return v

    def binary(self) -> bytes:
        n = self.u16()
        if self.pos + n > self.end:
            raise MalformedPacketError("truncated string or binary data")
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def string(self) -> str:
        raw = self.binary()
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadString(f"invalid UTF-8 in a string: {e}") from None
        if "\x00" in s:
            raise _BadString("U+0000 in a string")
        return s

    def rest(self) -> bytes:
        b = bytes(self.buf[self.pos : self.end])
        self.pos = self.end
        return b


# -- MQTT 5 properties ----------------------------------------------------------------------------
_BYTE, _U16T, _U32T, _VBI, _STR, _BIN, _PAIR = range(7)
PROPERTIES: dict[int, tuple[str, int]] = {
    0x01: ("PayloadFormatIndicator", _BYTE),
    0x02: ("MessageExpiryInterval", _U32T),
    0x03: ("ContentType", _STR),
    0x08: ("ResponseTopic", _STR),
    0x09: ("CorrelationData", _BIN),
    0x0B: ("SubscriptionIdentifier", _VBI),
    0x11: ("SessionExpiryInterval", _U32T),
    0x12: ("AssignedClientIdentifier", _STR),
    0x13: ("ServerKeepAlive", _U16T),
    0x15: ("AuthenticationMethod", _STR),
    0x16: ("AuthenticationData", _BIN),
    0x17: ("RequestProblemInformation", _BYTE),
    0x18: ("WillDelayInterval", _U32T),
    0x19: ("RequestResponseInformation", _BYTE),
    0x1A: ("ResponseInformation", _STR),
    0x1C: ("ServerReference", _STR),
    0x1F: ("ReasonString", _STR),
    0x21: ("ReceiveMaximum", _U16T),
    0x22: ("TopicAliasMaximum", _U16T),
    0x23: ("TopicAlias", _U16T),
    0x24: ("MaximumQoS", _BYTE),
    0x25: ("RetainAvailable", _BYTE),
    0x26: ("UserProperty", _PAIR),
    0x27: ("MaximumPacketSize", _U32T),
    0x28: ("WildcardSubscriptionAvailable", _BYTE),
    0x29: ("SubscriptionIdentifierAvailable", _BYTE),
    0x2A: ("SharedSubscriptionAvailable", _BYTE),
}
PROPERTY_IDS = {name: (ident, kind) for ident, (name, kind) in PROPERTIES.items()}
_MULTIPLE = {"UserProperty", "SubscriptionIdentifier"}  # lists of values

# strings every aiflow publish carries: length-prefixed once (see protocols.binding.mqtt5_properties)
_STRINGS: dict[str, bytes] = {
    s: _utf(s)
    for s in ("application/vnd.aiflow.v1", "aiflow-kind", "aiflow-id", "aiflow-sender", "request", "reply", "event")
}


def _pack_value(out: list[bytes], head: bytes, kind: int, v: Any) -> None:
    if kind == _STR:
        out.append(head)
        out.append(_STRINGS.get(v) or _utf(v))
    elif kind == _PAIR:
        k, val = v
        out.append(head)
        out.append(_STRINGS.get(k) or _utf(k))
        out.append(_STRINGS.get(val) or _utf(val))
    elif kind == _BIN:
        out.append(head)
        out.append(_bin(v))
    elif kind == _U32T:
        out.append(head + _U32.pack(v))
    elif kind == _U16T:
        out.append(head + _U16.pack(v))
    elif kind == _BYTE:
        out.append(head + bytes((v,)))
    else:
        out.append(head + vbi(v))


def encode_properties(props: dict[str, Any] | None) -> bytes:
    """The property block (length prefix included); unknown names raise ``ValueError``."""
    if not props:
        return b"\x00"
    out: list[bytes] = []
    for name, value in props.items():
        try:
            ident, kind = PROPERTY_IDS[name]
        except KeyError:
            raise ValueError(f"unknown MQTT 5 property {name!r}") from None
        head = bytes((ident,))
        try:
            if name in _MULTIPLE:
                for v in [value] if kind == _VBI and isinstance(value, int) else value:
                    _pack_value(out, head, kind, v)
            else:
                _pack_value(out, head, kind, value)
        except (struct.error, TypeError, OverflowError) as e:
            raise ValueError(f"bad value for MQTT 5 property {name}: {value!r} ({e})") from None
    body = b"".join(out)
    return vbi(len(body)) + body


def decode_properties(r: _Reader) -> dict[str, Any]:
    """Read a property block at the reader's position (advancing past it)."""
    length = r.vbi()
    end = r.pos + length
    if end > r.end:
        raise MalformedPacketError("property block runs past the packet")
    props: dict[str, Any] = {}
    if not length:
        return props
    sub = _Reader(r.buf, r.pos, end)
    while sub.pos < end:
        ident = sub.vbi()
        try:
            name, kind = PROPERTIES[ident]
        except KeyError:
            raise MalformedPacketError(f"unknown property id 0x{ident:02x}") from None
        if kind == _STR:
            v: Any = sub.string()
        elif kind == _PAIR:
            v = (sub.string(), sub.string())
        elif kind == _BIN:
            v = sub.binary()
        elif kind == _U32T:
            v = sub.u32()
        elif kind == _U16T:
            v = sub.u16()
        elif kind == _BYTE:
            v = sub.byte()
        else:
            v = sub.vbi()
        if name in _MULTIPLE:
            props.setdefault(name, []).append(v)
        elif name in props:
            raise MalformedPacketError(f"property {name} given twice")
        else:
            props[name] = v
    r.pos = end
    return props


# -- packets --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WillSpec:
    """The Last Will as it goes into CONNECT (see :class:`aiflow_agents.mqtt.Will`)."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    version: int = MQTT_5
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: WillSpec | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BadPublish:
    """A received PUBLISH, well framed, whose topic or a string property is not valid UTF-8: the session
    acknowledges and drops it rather than closing the connection (see ``Session._on_bad_publish``)."""

    qos: int
    packet_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class _IdAck:
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


class PubAck(_IdAck):
    __slots__ = ()


class PubRec(_IdAck):
    __slots__ = ()


class PubRel(_IdAck):
    __slots__ = ()


class PubComp(_IdAck):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: list[tuple[str, int]]  # (filter, options byte: QoS in bits 0-1, v5 flags above)
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  # empty on MQTT 3.1.1
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


Packet = (
    Connect
    | Connack
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | BadPublish
)


# -- validation -----------------------------------------------------------------------------------
_STRING_PROPS = ("ContentType", "ResponseTopic")


def check_publish(topic: str, properties: dict[str, Any] | None = None) -> None:
    """Raise :class:`InvalidTopicError` if a broker would refuse this publish's topic or string properties
    (a broker disconnects a client for these, so they must never be sent)."""
    problem = topic_name_problem(topic)
    if problem is not None:
        raise InvalidTopicError(f"invalid publish topic {topic!r}: {problem}")
    if properties:
        for name in _STRING_PROPS:
            value = properties.get(name)
            if value is not None:
                problem = topic_name_problem(value) if name == "ResponseTopic" else mqtt_string_problem(value)
                if problem is not None:
                    raise InvalidTopicError(f"invalid {name} {value!r}: {problem}")
        for pair in properties.get("UserProperty") or ():
            for s in pair:
                problem = mqtt_string_problem(s)
                if problem is not None:
                    raise InvalidTopicError(f"invalid UserProperty string {s!r}: {problem}")


# -- encoding -------------------------------------------------------------------------------------
def _fixed(first: int, body: bytes) -> bytes:
    return bytes((first,)) + vbi(len(body)) + body


def encode_publish_header(
    topic: bytes, payload_len: int, qos: int, retain: bool, dup: bool, packet_id: int, props: bytes | None
) -> bytes:
    """Everything of a PUBLISH before its payload (``topic`` already UTF-8; ``props`` a block or None on 3.1.1)."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    var = _U16.pack(len(topic)) + topic
    if qos:
        var += _U16.pack(packet_id)
    if props is not None:
        var += props
    return bytes((first,)) + vbi(len(var) + payload_len) + var


def encode(packet: Packet, version: int = MQTT_5) -> bytes:
    """One packet's bytes. ``version`` is the session's protocol level (4 = 3.1.1, 5)."""
    v5 = version == MQTT_5
    if isinstance(packet, Publish):
        props = encode_properties(packet.properties) if v5 else None
        head = encode_publish_header(
            packet.topic.encode("utf-8"),
            len(packet.payload),
            packet.qos,
            packet.retain,
            packet.dup,
            packet.packet_id,
            props,
        )
        return head + bytes(packet.payload)
    if isinstance(packet, _IdAck):
        first = {PubAck: 0x40, PubRec: 0x50, PubRel: 0x62, PubComp: 0x70}[type(packet)]
        if v5 and (packet.reason_code or packet.properties):
            body = _U16.pack(packet.packet_id) + bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
            return _fixed(first, body)
        return bytes((first, 2)) + _U16.pack(packet.packet_id)
    if isinstance(packet, PingReq):
        return b"\xc0\x00"
    if isinstance(packet, PingResp):
        return b"\xd0\x00"
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, Connack):
        body = bytes((1 if packet.session_present else 0, packet.reason_code))
        return _fixed(0x20, body + (encode_properties(packet.properties) if v5 else b""))
    if isinstance(packet, Subscribe):
        body = _U16.pack(packet.packet_id) + (encode_properties(packet.properties) if v5 else b"")
        for f, opts in packet.subscriptions:
            body += _utf(f) + bytes((opts if v5 else opts & 0x03,))
        return _fixed(0x82, body)
    if isinstance(packet, SubAck):
        body = _U16.pack(packet.packet_id) + (encode_properties(packet.properties) if v5 else b"")
        return _fixed(0x90, body + bytes(packet.reason_codes))
    if isinstance(packet, Unsubscribe):
        body = _U16.pack(packet.packet_id) + (encode_properties(packet.properties) if v5 else b"")
        return _fixed(0xA2, body + b"".join(_utf(f) for f in packet.filters))
    if isinstance(packet, UnsubAck):
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties) + bytes(packet.reason_codes)
        return _fixed(0xB0, body)
    if isinstance(packet, Disconnect):
        if not v5 or (not packet.reason_code and not packet.properties):
            return b"\xe0\x00"
        body = bytes((packet.reason_code,)) + (encode_properties(packet.properties) if packet.properties else b"")
        return _fixed(0xE0, body)
    raise TypeError(f"not an MQTT packet: {packet!r}")


def _encode_connect(p: Connect) -> bytes:
    v5 = p.version == MQTT_5
    flags = 0x02 if p.clean_start else 0
    if p.will is not None:
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        flags |= 0x40
    body = _utf("MQTT") + bytes((p.version, flags)) + _U16.pack(p.keepalive)
    if v5:
        body += encode_properties(p.properties)
    body += _utf(p.client_id)
    if p.will is not None:
        if v5:
            body += encode_properties(p.will.properties)
        body += _utf(p.will.topic) + _bin(p.will.payload)
    if p.username is not None:
        body += _utf(p.username)
    if p.password is not None:
        body += _bin(p.password)
    return _fixed(0x10, body)


# -- decoding -------------------------------------------------------------------------------------
def decode(first: int, body: bytes | memoryview, version: int = MQTT_5) -> Packet:
    """One packet from its first byte and its body (what follows the remaining length)."""
    kind, flags = first >> 4, first & 0x0F
    v5 = version == MQTT_5
    r = _Reader(body)
    if kind == PUBLISH:
        return decode_publish(first, body, v5)
    if kind in (CONNACK, SUBACK, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, CONNECT) and flags:
        raise MalformedPacketError(f"bad flags 0x{flags:x} on packet type {kind}")
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if flags != (0x02 if kind == PUBREL else 0):
            raise MalformedPacketError(f"bad flags 0x{flags:x} on packet type {kind}")
        pid = r.u16()
        code, props = 0, {}
        if v5 and r.left():
            code = r.byte()
            if r.left():
                props = decode_properties(r)
        cls = {PUBACK: PubAck, PUBREC: PubRec, PUBREL: PubRel, PUBCOMP: PubComp}[kind]
        packet: Packet = cls(pid, code, props)
    elif kind == CONNACK:
        ack_flags = r.byte()
        if ack_flags & 0xFE:
            raise MalformedPacketError("reserved CONNACK flags set")
        code = r.byte()
        # a broker refusing MQTT 5 may answer with a 3.1.1-shaped CONNACK: no property block
        props = decode_properties(r) if v5 and r.left() else {}
        packet = Connack(bool(ack_flags & 1), code, props)
    elif kind == SUBACK:
        pid = r.u16()
        props = decode_properties(r) if v5 else {}
        codes = list(r.rest())
        if not codes:
            raise MalformedPacketError("SUBACK without a reason code")
        packet = SubAck(pid, codes, props)
    elif kind == UNSUBACK:
        pid = r.u16()
        props = decode_properties(r) if v5 and r.left() else {}
        packet = UnsubAck(pid, list(r.rest()) if v5 else [], props)
    elif kind == PINGRESP:
        packet = PingResp()
    elif kind == PINGREQ:
        packet = PingReq()
    elif kind == DISCONNECT:
        code, props = 0, {}
        if v5 and r.left():
            code = r.byte()
            if r.left():
                props = decode_properties(r)
        packet = Disconnect(code, props)
    elif kind == SUBSCRIBE:
        if flags != 0x02:
            raise MalformedPacketError("bad SUBSCRIBE flags")
        pid = r.u16()
        props = decode_properties(r) if v5 else {}
        subs = []
        while r.left():
            subs.append((r.string(), r.byte()))
        if not subs:
            raise MalformedPacketError("SUBSCRIBE without a topic filter")
        packet = Subscribe(pid, subs, props)
    elif kind == UNSUBSCRIBE:
        if flags != 0x02:
            raise MalformedPacketError("bad UNSUBSCRIBE flags")
        pid = r.u16()
        props = decode_properties(r) if v5 else {}
        filters = []
        while r.left():
            filters.append(r.string())
        if not filters:
            raise MalformedPacketError("UNSUBSCRIBE without a topic filter")
        packet = Unsubscribe(pid, filters, props)
    elif kind == CONNECT:
        packet = _decode_connect(r)
    else:
        raise MalformedPacketError(f"unsupported packet type {kind}")
    if r.left():
        raise MalformedPacketError(f"{r.left()} trailing bytes in packet type {kind}")
    return packet


def decode_publish(first: int, body: bytes | memoryview, v5: bool) -> Publish | BadPublish:
    """A PUBLISH with one copy of its payload; a :class:`BadPublish` when only its strings are invalid."""
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise MalformedPacketError("PUBLISH with QoS 3")
    if not qos and first & 0x08:
        raise MalformedPacketError("PUBLISH with DUP set on QoS 0")
    n = len(body)
    if n < 2:
        raise MalformedPacketError("truncated PUBLISH")
    tlen = body[0] << 8 | body[1]
    pos = 2 + tlen
    if pos > n:
        raise MalformedPacketError("PUBLISH topic runs past the packet")
    bad: str | None = None
    try:
        topic = bytes(body[2:pos]).decode("utf-8")
    except UnicodeDecodeError:
        topic, bad = "", "PUBLISH topic is not UTF-8"
    else:
        if "\x00" in topic:
            topic, bad = "", "U+0000 in a PUBLISH topic"
    pid = 0
    if qos:
        if pos + 2 > n:
            raise MalformedPacketError("truncated PUBLISH packet id")
        pid = body[pos] << 8 | body[pos + 1]
        if not pid:
            raise MalformedPacketError("PUBLISH with packet id 0")
        pos += 2
    props: dict[str, Any] = {}
    if v5:
        if pos < n and body[pos] == 0:
            pos += 1
        else:
            r = _Reader(body, pos, n)
            try:
                props = decode_properties(r)
            except _BadString as e:
                if bad is None:
                    bad = f"PUBLISH property: {e}"
                length, after = _read_vbi(body, pos, n)  # well framed: skip the whole block
                r.pos = after + length
            pos = r.pos
        if not tlen and "TopicAlias" not in props and bad is None:
            raise MalformedPacketError("empty PUBLISH topic without a TopicAlias")
    elif not tlen:
        raise MalformedPacketError("empty PUBLISH topic")
    if bad is not None:
        return BadPublish(qos, pid, bad)
    return Publish(topic, bytes(body[pos:]), qos, bool(first & 1), bool(first & 8), pid, props)


def _decode_connect(r: _Reader) -> Connect:
    if r.string() != "MQTT":
        raise MalformedPacketError("bad protocol name")
    version = r.byte()
    if version not in (MQTT_311, MQTT_5):
        raise MalformedPacketError(f"unsupported protocol level {version}")
    v5 = version == MQTT_5
    flags = r.byte()
    if flags & 0x01:
        raise MalformedPacketError("reserved CONNECT flag set")
    keepalive = r.u16()
    props = decode_properties(r) if v5 else {}
    client_id = r.string()
    will = None
    if flags & 0x04:
        wprops = decode_properties(r) if v5 else {}
        wtopic = r.string()
        will = WillSpec(wtopic, r.binary(), (flags >> 3) & 3, bool(flags & 0x20), wprops)
    username = r.string() if flags & 0x80 else None
    password = r.binary() if flags & 0x40 else None
    return Connect(client_id, version, bool(flags & 0x02), keepalive, username, password, will, props)


class StreamParser:
    """Received bytes in, whole packets out. A packet larger than ``max_packet_size`` or a malformed header
    raises :class:`MalformedPacketError` (the session then closes the connection, as the spec requires).

    Two ways in: :meth:`feed` (any bytes), or :meth:`get_buffer` / :meth:`buffer_updated`, the
    :class:`asyncio.BufferedProtocol` pair: the socket is read straight into this parser's buffer, which
    grows (4x at a time) as a large packet's bytes arrive, never to the announced length up front (a 5-byte
    header announcing 256 MiB must not allocate 256 MiB), so a 1 MiB PUBLISH arrives in a few large reads."""

    __slots__ = ("_buf", "_end", "_need", "_start", "max_packet_size", "version")

    _CHUNK = 256 * 1024  # free space offered per read beyond what a pending packet needs
    _KEEP = 4 * 1024 * 1024  # a buffer grown beyond this is let go once empty

    def __init__(self, version: int = MQTT_5, max_packet_size: int = MAX_REMAINING + 5) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self._buf = bytearray(self._CHUNK)
        self._start = 0  # first byte not parsed yet
        self._end = 0  # end of the received bytes
        self._need = 0  # bytes the pending packet needs in all (0: not known yet)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space at the end of the buffer, enough for the pending packet (never resizes a buffer in use:
        a larger one is allocated and the pending bytes moved)."""
        pending = self._end - self._start
        # room for what has arrived and three times as much again (at least a chunk), up to the whole packet
        want = min(max(self._need, pending), 4 * pending + self._CHUNK) + self._CHUNK
        if len(self._buf) - self._start < want:
            if len(self._buf) >= want:  # room enough if the pending bytes move to the front
                self._buf[:pending] = self._buf[self._start : self._end]
            else:
                new = bytearray(want)
                new[:pending] = self._buf[self._start : self._end]
                self._buf = new
            self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Packet]:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view: parse what is complete."""
        self._end += nbytes
        if self._need and self._end - self._start < self._need:
            return []  # the rest of a large packet: nothing to parse until it is complete
        out: list[Packet] = []
        buf = self._buf
        pos, end = self._start, self._end
        view = memoryview(buf)
        v5 = self.version == MQTT_5
        try:
            while pos + 2 <= end:
                first = buf[pos]
                length = buf[pos + 1]
                hpos = pos + 2
                if length & 0x80:  # a multi-byte remaining length (the common case is one byte)
                    if end - pos - 1 < 4 and all(b & 0x80 for b in buf[pos + 1 : end]):
                        break  # the length itself is incomplete
                    length, hpos = _read_vbi(buf, pos + 1, end)
                total = hpos - pos + length
                if total > self.max_packet_size:
                    raise MalformedPacketError(f"packet of {total} bytes exceeds the maximum {self.max_packet_size}")
                if pos + total > end:
                    self._need = total
                    break
                if first >> 4 == PUBLISH:
                    out.append(decode_publish(first, view[hpos : hpos + length], v5))
                else:
                    out.append(decode(first, view[hpos : hpos + length], self.version))
                pos += total
                self._need = 0
        finally:
            view.release()
        if pos == end:
            pos = self._end = 0
            if len(buf) > self._KEEP:
                self._buf = bytearray(self._CHUNK)
        self._start = pos
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Parse ``data`` (any length); returns the packets it completes."""
        out: list[Packet] = []
        src = memoryview(data).cast("B")
        while src:
            dst = self.get_buffer(len(src))
            n = min(len(dst), len(src))
            dst[:n] = src[:n]
            dst.release()
            out += self.buffer_updated(n)
            src = src[n:]
        return out
