"""One resilient MQTT connection: TCP_NODELAY, MQTT 5 with 3.1.1 fallback, reconnect with backoff.

Reconnection story: the connection runs in a background task. When the broker goes away, the
message loop ends with an ``MqttError``; every ``on_disconnect`` hook runs (clients fail their
in-flight requests with :class:`ConnectionLostError`), then the task retries with exponential
backoff and jitter. After a reconnect it restores every subscription and runs the
``on_connect`` hooks (nodes republish presence). Publishes made while disconnected wait for the
next connection up to their timeout.

A refusal that retrying cannot fix (wrong user name or password, not authorised, a TLS certificate
that does not verify, a missing CA file) makes :meth:`Connection.start` fail at once with a clear
:class:`BrokerUnavailableError` instead of waiting out its timeout.

Incoming queue policy (backpressure): the loop dispatches every message already queued before it
lets paho read the socket again, so a flood waits in TCP buffers and in the broker's per-client
queue, not in this process. The queue is also capped at ``max_queued_incoming`` messages; beyond
that new ones are discarded, counted in ``dropped_incoming`` and logged (a dropped request's sender
sees a timeout).

Fast paths (measured in ``bench/bench_transport.py``, explained in ``docs/performance.md``): aiomqtt
connects, subscribes and reconnects; on an open connection this module writes each packet as paho
queues it, awaits acknowledgements and incoming messages on plain futures, parses MQTT 5 properties
only when read, and decodes a PUBLISH with one payload copy. They lean on internals of aiomqtt
(``Client._client``, ``_pending_publishes``, ``_disconnected``) and paho (``_packet_queue``,
``_in_callback_mutex``, ``paho.mqtt._packet.Properties`` and ``decode_publish``), which
``tests/test_transport.py`` checks are in place: the first thing to look at when upgrading either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as mqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt import _packet as _paho_packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .broker import BrokerURL
from .errors import BrokerUnavailableError

MessageHandler = Callable[[aiomqtt.Message], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
_log = structlog.get_logger("aiflow.connection")

# aiomqtt warns at every burst of >10 outstanding publishes, which a fan-out does by design.
_MQTT_LOG = logging.getLogger("aiflow.mqtt")
_MQTT_LOG.setLevel(logging.ERROR)


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.25

    def delays(self) -> Any:
        d = self.initial
        while True:
            yield d * (1 + random.uniform(-self.jitter, self.jitter))
            d = min(self.maximum, d * self.factor)


# CONNACK codes a retry cannot fix: MQTT 3.1.1 return codes 4/5, MQTT 5 reason codes 134/135/138/140.
_AUTH_REFUSED_V311 = {4: "bad user name or password", 5: "not authorised"}
_AUTH_REFUSED_V5 = {134, 135, 138, 140}


def _definitive(error: BaseException) -> str | None:
    """Why retrying cannot help, when that is so (bad credentials, TLS verification, config)."""
    if isinstance(error, MqttConnectError):
        rc = error.rc
        code = getattr(rc, "value", rc)
        if isinstance(rc, int) and rc in _AUTH_REFUSED_V311:
            return f"the broker refused the credentials ({_AUTH_REFUSED_V311[rc]}); check user name and password"
        if code in _AUTH_REFUSED_V5 and not isinstance(rc, int):
            return f"the broker refused the credentials ({rc}); check user name and password"
        return None
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # aiomqtt wraps the ssl error as the context
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({e.verify_message or e}); check the CA file and host name"
        e = e.__cause__ or e.__context__
    return None


# -- MQTT 5 PUBLISH properties, packed and parsed cheaply ------------------------------------------
# paho's Properties validates every assignment by scanning its name table with str.replace, and
# packs/unpacks by scanning it again: with the seven properties the binding mirrors, that cost more
# than the rest of a small publish (see docs/performance.md). The classes below produce the same
# bytes and the same attributes; anything unusual falls back to paho's own code.
_PAHO_DECODE_PUBLISH = _paho_packet.decode_publish
_TEMPLATE = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_PUBLISH_IDS: dict[str, int] = {
    name.replace(" ", ""): ident
    for name, ident in _TEMPLATE.names.items()
    if PacketTypes.PUBLISH in _TEMPLATE.properties[ident][1]
}
_PACK_ORDER = list(_PUBLISH_IDS)  # paho's packing order, so the bytes are identical
_TYPE_OF = {ident: _TEMPLATE.types[_TEMPLATE.properties[ident][0]] for ident in _PUBLISH_IDS.values()}
_NAME_OF = {ident: name for name, ident in _PUBLISH_IDS.items()}
_MULTIPLE = {11, 38}
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!L")


def _vbi(x: int) -> bytes:
    if not 0 <= x <= 268_435_455:
        raise ValueError(f"Value {x!r} must be in range 0-268435455")
    out = bytearray()
    while True:
        digit, x = x % 128, x // 128
        out.append(digit | 0x80 if x else digit)
        if not x:
            return bytes(out)


def _utf(value: str | bytes) -> bytes:
    data = value if isinstance(value, bytes) else value.encode()
    return _U16.pack(len(data)) + data


def _packer(ident: int) -> Callable[[Any, list[bytes]], None]:
    """A function appending one property's bytes to a list, for one property id (ids < 128 are a
    one-byte VBI)."""
    head = bytes((ident,))
    kind = _TYPE_OF[ident]
    pack16, pack32 = _U16.pack, _U32.pack

    def utf(value: str | bytes) -> bytes:
        return _STRINGS.get(value) or _utf(value)

    if kind == "UTF-8 Encoded String":
        return lambda v, out: out.extend((head, utf(v)))
    if kind == "UTF-8 String Pair":
        return lambda v, out: out.extend((head, utf(v[0]), utf(v[1])))
    if kind == "Binary Data":
        return lambda v, out: out.extend((head, pack16(len(v)), bytes(v)))
    if kind == "Four Byte Integer":
        return lambda v, out: out.extend((head, pack32(v)))
    if kind == "Two Byte Integer":
        return lambda v, out: out.extend((head, pack16(v)))
    if kind == "Byte":
        return lambda v, out: out.extend((head, bytes((v,))))
    return lambda v, out: out.extend((head, _vbi(v)))  # Variable Byte Integer


_PACKERS = {ident: _packer(ident) for ident in _PUBLISH_IDS.values()}
_PACK_PLAN = [(name, _PUBLISH_IDS[name] in _MULTIPLE, _PACKERS[_PUBLISH_IDS[name]]) for name in _PACK_ORDER]
# Strings every aiflow publish carries, length-prefixed once (see protocols.binding.mqtt5_properties).
_STRINGS: dict[str | bytes, bytes] = {
    v: _utf(v) for v in ("application/vnd.aiflow.v1", "aiflow-kind", "aiflow-id", "aiflow-sender", "request", "reply")
}


class PublishProperties(Properties):
    """PUBLISH properties built from a dict in one pass and packed once (same bytes as paho's)."""

    names = _TEMPLATE.names
    properties = _TEMPLATE.properties
    types = _TEMPLATE.types

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", None)
        for key, value in (values or {}).items():
            if key not in _PUBLISH_IDS or key in ("PayloadFormatIndicator", "TopicAlias"):
                setattr(self, key, value)  # paho validates the unusual ones (ranges, names)
                continue
            if _PUBLISH_IDS[key] in _MULTIPLE and not isinstance(value, list):
                value = [value]
            object.__setattr__(self, key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_packed", None)

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if "_unparsed" in self.__dict__:
            self._materialise()
        if packed is None:
            pieces: list[bytes] = []
            d = self.__dict__
            for name, multiple, packer in _PACK_PLAN:
                if name in d:
                    if multiple:
                        for v in d[name]:
                            packer(v, pieces)
                    else:
                        packer(d[name], pieces)
            body = b"".join(pieces)
            packed = _vbi(len(body)) + body
            object.__setattr__(self, "_packed", packed)
        return packed

    def unpack(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        """Take received PUBLISH properties, parsed when first read: most messages are handled on
        their envelope alone and never read them (a node reads them only to answer a frame it
        cannot decode). Only the block's length is read now, which paho needs to go on."""
        length, start = 0, 0
        for shift in (0, 7, 14, 21):  # the block length, a Variable Byte Integer (at most 4 bytes)
            if start >= len(buffer):
                break
            digit = buffer[start]
            start += 1
            length |= (digit & 0x7F) << shift
            if not digit & 0x80:
                end = start + length
                if end <= len(buffer):
                    object.__setattr__(self, "_unparsed", bytes(buffer[:end]))
                    return self, end
                break
        return self._parse(buffer)  # malformed: paho's parser raises exactly as it would have

    def __getattr__(self, name: str) -> Any:
        # Called only for attributes not set: the first read of any property parses the block.
        if "_unparsed" not in self.__dict__:
            raise AttributeError(name)
        self._materialise()
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def _materialise(self) -> None:
        d = self.__dict__
        raw = d.pop("_unparsed")
        try:
            self._parse(raw)
        except Exception as e:  # the broker forwarded a malformed block: read as no properties
            for key in [k for k in d if k in _PUBLISH_IDS]:
                del d[key]
            _log.warning("malformed MQTT 5 properties in a received PUBLISH ignored", error=str(e))

    def _parse(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        """Parse; malformed or unusual input goes to paho's parser, so errors are exactly paho's."""
        try:
            return self._fast_unpack(buffer)
        except Exception:
            for name in list(self.__dict__):
                if name in _PUBLISH_IDS:
                    object.__delattr__(self, name)
            return super().unpack(buffer)  # type: ignore[no-untyped-call,no-any-return]

    def _fast_unpack(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        first, start, shift = 0, 0, 0
        while True:  # the block length, a Variable Byte Integer (at most 4 bytes)
            if start >= 4:
                raise ValueError("bad length")
            digit = buffer[start]
            start += 1
            first |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        end = start + first
        if end > len(buffer):
            raise ValueError("truncated")
        view = bytes(buffer[start:end])
        d = self.__dict__
        pos = 0
        while pos < first:
            ident = view[pos]
            kind = _TYPE_OF[ident]  # KeyError on anything not a PUBLISH property
            name = _NAME_OF[ident]
            pos += 1
            if kind in ("UTF-8 Encoded String", "UTF-8 String Pair", "Binary Data"):
                n = _U16.unpack_from(view, pos)[0]
                raw = view[pos + 2 : pos + 2 + n]
                if len(raw) != n:
                    raise ValueError("truncated")
                pos += 2 + n
                if kind == "Binary Data":
                    value: Any = raw
                else:
                    value = _checked_utf(raw)
                    if kind == "UTF-8 String Pair":
                        n2 = _U16.unpack_from(view, pos)[0]
                        raw2 = view[pos + 2 : pos + 2 + n2]
                        if len(raw2) != n2:
                            raise ValueError("truncated")
                        pos += 2 + n2
                        value = (value, _checked_utf(raw2))
            elif kind == "Four Byte Integer":
                value = _U32.unpack_from(view, pos)[0]
                pos += 4
            else:
                raise ValueError("unusual property: let paho parse it")
            if ident in _MULTIPLE:
                d.setdefault(name, []).append(value)
            elif name in d:
                raise ValueError("duplicate property")
            else:
                d[name] = value
        if pos != first:
            raise ValueError("overrun")
        return self, end


def _checked_utf(raw: bytes) -> str:
    text = raw.decode("utf-8")
    if not text.isascii() or "\x00" in text:
        # the rare non-ASCII or NUL case: paho's per-character checks decide
        raise ValueError("let paho check this string")
    return text


class _SharedTableProperties(Properties):
    """paho's Properties with its (constant) name and type tables shared, not rebuilt per packet:
    paho builds one for every packet it reads or writes, PUBACKs included."""

    names = _TEMPLATE.names
    properties = _TEMPLATE.properties
    types = _TEMPLATE.types

    def __init__(self, packet_type: int) -> None:
        object.__setattr__(self, "packetType", packet_type)


class _ReceivedProperties(Properties):
    """What paho's packet code instantiates: PUBLISH properties get the fast parser and packer,
    every other packet type the shared tables."""

    def __new__(cls, packet_type: int) -> Properties:  # type: ignore[misc]
        if packet_type == PacketTypes.PUBLISH:
            return PublishProperties()
        return _SharedTableProperties(packet_type)


def _decode_publish(header: int, packet: bytes | bytearray, protocol: Any) -> Any:
    """paho's ``decode_publish`` with one copy of the payload instead of four (it splits the
    packet with ``struct.unpack`` three times, then slices it). Same result; anything it would
    reject goes to paho's own function, so its errors are exactly paho's."""
    view = memoryview(packet)
    try:
        n = len(view)
        slen = view[0] << 8 | view[1]
        pos = 2 + slen
        qos = (header & 0x06) >> 1
        v5 = protocol == mqtt.MQTTv5
        if pos > n or (not v5 and slen == 0):
            raise ValueError("let paho report it")
        topic = bytes(view[2:pos])
        mid = 0
        if qos > 0:
            if pos + 2 > n:
                raise ValueError("let paho report it")
            mid = view[pos] << 8 | view[pos + 1]
            pos += 2
        properties = None
        if v5:
            properties = _paho_packet.Properties(PacketTypes.PUBLISH)
            _, length = properties.unpack(view[pos:])
            pos += length
        return _paho_packet.PublishPacket(
            dup=bool(header & 0x08),
            qos=qos,
            retain=bool(header & 0x01),
            topic=topic,
            mid=mid,
            properties=properties,
            payload=bytes(view[pos:]),
        )
    except Exception:
        return _PAHO_DECODE_PUBLISH(header, packet, protocol)
    finally:
        view.release()  # paho reuses nothing, but a live export would pin the bytearray's size


class _Slices:
    """An outgoing packet whose slices are views: paho resends ``packet[pos:]`` after each partial
    write, which copies what is left every time (quadratic in the packet's size)."""

    __slots__ = ("view",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.view = memoryview(data)

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: slice) -> memoryview:
        return self.view[index]


_BIG_PACKET = 64 * 1024  # beyond one socket write: worth views instead of copies


def _zero_copy_resends(paho: mqtt.Client) -> None:
    queue = paho._packet_queue

    def packet_queue(command: int, packet: bytes | bytearray, mid: int, qos: int, info: Any = None) -> Any:
        if len(packet) > _BIG_PACKET:
            packet = _Slices(packet)  # type: ignore[assignment]
        return queue(command, packet, mid, qos, info)

    paho._packet_queue = packet_queue  # type: ignore[method-assign]


def install_fast_publish_properties() -> None:
    """Make paho build its per-packet Properties with the classes above (same values, same bytes),
    and decode PUBLISH packets with one payload copy."""
    # paho.mqtt._packet only constructs Properties; paho.mqtt.client also isinstance-checks: left alone
    if getattr(_paho_packet, "Properties", None) is Properties:
        _paho_packet.Properties = _ReceivedProperties  # type: ignore[misc]
    if _paho_packet.decode_publish is _PAHO_DECODE_PUBLISH:
        _paho_packet.decode_publish = _decode_publish  # type: ignore[assignment]


install_fast_publish_properties()


_CLOSED = object()  # put in the inbox when the connection drops: wakes the receive loop


class _Inbox(asyncio.Queue):  # type: ignore[type-arg]
    """aiomqtt's incoming queue, owned by us: the connection awaits it directly (see module doc),
    bounds it, counts what it discards when full (aiomqtt only logs that), and is woken through
    it when the connection drops."""

    def __init__(self, owner: Connection, maxsize: int = 0) -> None:
        super().__init__()  # bounded here, so that the close marker always fits
        self._bound = maxsize
        self._owner = owner
        owner._inbox = self

    def put_nowait(self, item: Any) -> None:
        if self._bound and self.qsize() >= self._bound:
            self._owner._dropped()
            raise asyncio.QueueFull
        super().put_nowait(item)

    def close(self) -> None:
        super().put_nowait(_CLOSED)


def _write_directly(client: aiomqtt.Client) -> None:
    """Send each packet when it is queued instead of on the event loop's next writable event.

    aiomqtt answers paho's "I have data to write" with ``call_soon_threadsafe(add_writer, ...)``:
    per publish a self-pipe write and read, two ``epoll_ctl`` calls and two more loop turns before
    the bytes reach the socket. Here, on the loop's thread and outside a paho callback (where paho
    itself would write at once if it ran its own loop), the packet is written straight away; only
    when the socket's buffer is full does aiomqtt's writer take over until it drains. Measured in
    ``bench/bench_transport.py``."""
    paho = client._client
    fallback = paho.on_socket_register_write  # aiomqtt's: add_writer via the self-pipe
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    in_callback = paho._in_callback_mutex
    scheduled = False

    def write() -> None:
        try:
            paho.loop_write()
        except Exception as exc:  # as aiomqtt's writer does: a broken socket ends the connection
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)
            return
        if paho.want_write():  # the socket's buffer is full: wait until it is writable
            fallback(paho, None, paho.socket())

    def flush() -> None:
        nonlocal scheduled
        scheduled = False
        write()

    def register_write(c: Any, userdata: Any, sock: Any) -> None:
        nonlocal scheduled
        if threading.get_ident() != loop_thread:
            fallback(c, userdata, sock)
        elif in_callback.acquire(False):
            in_callback.release()
            write()
        elif not scheduled:  # inside a paho callback: write once it has returned
            scheduled = True
            loop.call_soon(flush)

    paho.on_socket_register_write = register_write
    _zero_copy_resends(paho)


class _Confirmation:
    """Stands in aiomqtt's table of publishes awaiting their PUBACK/PUBCOMP: aiomqtt calls
    ``set()`` from paho's callback, and this resolves a future the publisher awaits directly."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def expire(self) -> None:
        self.fail(aiomqtt.MqttError("Operation timed out"))


async def _publish(
    client: aiomqtt.Client,
    topic: str,
    payload: bytes | bytearray | str | None,
    qos: int,
    retain: bool,
    properties: Properties | None,
    timeout: float,
) -> None:
    """aiomqtt's ``publish``, minus what it costs per call: the outgoing-call semaphore, an
    ``asyncio.Event`` and a ``wait_for`` task to await the acknowledgement (two more loop turns
    and ~50 µs of CPU per publish). Same paho call, same error types; the acknowledgement is a
    future, failed at once if the connection drops (see ``Connection._run``)."""
    info = client._client.publish(topic, payload, qos, retain, properties)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
    if qos == 0 or info.is_published():
        return
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    confirmation = _Confirmation(future)
    pending = client._pending_publishes
    pending[info.mid] = confirmation  # type: ignore[assignment]
    timer = loop.call_later(timeout, confirmation.expire)
    try:
        await future
    finally:
        timer.cancel()
        pending.pop(info.mid, None)


def _fail_confirmations(client: aiomqtt.Client, error: BaseException) -> None:
    for waiting in list(client._pending_publishes.values()):
        if isinstance(waiting, _Confirmation):
            waiting.fail(error)


def _filter_of(subscription: str) -> str:
    """The topic filter a (possibly shared) subscription matches."""
    if subscription.startswith("$share/"):
        return subscription.split("/", 2)[2]
    return subscription


class Connection:
    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str,
        will: aiomqtt.Will | None = None,
        keepalive: int = 30,
        backoff: Backoff = Backoff(),
        max_queued_incoming: int = 10_000,
        op_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self._will = will
        self._keepalive = keepalive
        self._backoff = backoff
        self._max_queued = max_queued_incoming
        self._op_timeout = op_timeout
        self._protocol = aiomqtt.ProtocolVersion.V311 if url.protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self._subs: dict[str, int] = {}
        self._routes: list[tuple[str, MessageHandler]] = []
        self._match_cache: dict[str, list[MessageHandler]] = {}
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Hook] = []
        self._client: aiomqtt.Client | None = None
        self._inbox: _Inbox | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_error: BaseException | None = None
        self._fatal: str | None = None
        self.connects = 0
        self.dropped_incoming = 0
        self.log = structlog.get_logger("aiflow.connection").bind(client=client_id)

    # -- configuration ------------------------------------------------------------------------
    @property
    def is_v5(self) -> bool:
        return self._protocol == aiomqtt.ProtocolVersion.V5

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> dict[str, int]:
        return dict(self._subs)

    def route(self, topic_filter: str, handler: MessageHandler) -> None:
        """Send messages whose topic matches ``topic_filter`` to ``handler`` (several may match)."""
        self._routes.append((topic_filter, handler))
        self._match_cache.clear()

    def unroute(self, topic_filter: str) -> None:
        self._routes = [(f, h) for f, h in self._routes if f != topic_filter]
        self._match_cache.clear()

    def on_connect(self, hook: Hook) -> None:
        self._on_connect.append(hook)

    def on_disconnect(self, hook: Hook) -> None:
        self._on_disconnect.append(hook)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, wait: bool = True, timeout: float | None = 10.0) -> None:
        if self._task is None:
            self._stopping = False
            self._fatal = None
            self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        if wait:
            try:
                await self.wait_connected(timeout)
            except BrokerUnavailableError:
                await self.stop()  # a failed start leaves no reconnect loop behind
                raise

    async def wait_connected(self, timeout: float | None) -> None:
        """Wait for the connection; fail early when the broker refused us for good (see module doc)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._connected.is_set():
            if self._fatal is not None:
                raise BrokerUnavailableError(f"cannot connect to broker {self.url}: {self._fatal}")
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                why = f": {self._last_error}" if self._last_error else ""
                raise BrokerUnavailableError(f"could not connect to broker {self.url} within {timeout:.3g}s{why}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.05 if left is None else min(0.05, left))

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._connected.clear()
        self._client = None

    async def __aenter__(self) -> Connection:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _make_client(self) -> aiomqtt.Client:
        url = self.url
        tls_context = None
        if url.tls:
            tls_context = ssl.create_default_context(cafile=url.ca_file)
            if url.cert_file:
                tls_context.load_cert_chain(url.cert_file, url.key_file)
            if url.tls_insecure:
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        return aiomqtt.Client(
            url.host,
            url.port,
            username=url.username,
            password=url.password,
            identifier=self.client_id,
            logger=_MQTT_LOG,
            protocol=self._protocol,
            will=self._will,
            keepalive=self._keepalive,
            timeout=self._op_timeout,
            tls_context=tls_context,
            tls_insecure=url.tls_insecure if url.tls else None,
            socket_options=NODELAY,
            max_queued_incoming_messages=self._max_queued,
            queue_type=cast(Any, functools.partial(_Inbox, self)),
            max_inflight_messages=1000,
            max_concurrent_outgoing_calls=10_000,
        )

    def _dropped(self) -> None:
        self.dropped_incoming += 1
        n = self.dropped_incoming
        if n == 1 or n % 1000 == 0:
            self.log.warning("incoming queue full: messages dropped", dropped=n, bound=self._max_queued)

    async def _run(self) -> None:
        delays = self._backoff.delays()
        while not self._stopping:
            try:
                try:
                    client = self._make_client()
                except OSError as e:  # e.g. a CA/cert file that is missing or not PEM (ssl.SSLError)
                    self._fatal = f"bad TLS settings: {e}"
                    raise
                inbox = self._inbox
                assert inbox is not None
                async with client:
                    _write_directly(client)
                    self._client = client
                    for sub, qos in list(self._subs.items()):
                        await client.subscribe(sub, qos=qos)
                    self.connects += 1
                    self._last_error = None
                    self._fatal = None
                    delays = self._backoff.delays()
                    self._connected.set()
                    if self.connects > 1:
                        self.log.info("reconnected", broker=str(self.url), attempt=self.connects)
                    for hook in list(self._on_connect):
                        await self._safe(hook, "on_connect")
                    await self._receive(client, inbox)
            except MqttConnectError as e:
                if self.url.protocol == "auto" and self.is_v5 and "protocol" in str(e).lower():
                    self.log.info("broker refused MQTT 5, falling back to 3.1.1", broker=str(self.url))
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                self._last_error = e
                self._fatal = _definitive(e)
                self.log.warning("connect failed", broker=str(self.url), error=str(e))
            except aiomqtt.MqttError as e:
                self._last_error = e
                self._fatal = _definitive(e)
                if not self._stopping:
                    self.log.warning("connection lost", broker=str(self.url), error=str(e))
            except OSError as e:  # includes ssl.SSLError
                self._last_error = e
                self._fatal = self._fatal or _definitive(e)
                self.log.warning("connect failed", broker=str(self.url), error=str(e))
            except Exception as e:  # the reconnect loop must outlive any surprise
                self._last_error = e
                self.log.exception("connection loop error", broker=str(self.url))
            finally:
                was_connected = self._connected.is_set()
                self._connected.clear()
                if self._client is not None:  # publishes awaiting an acknowledgement retry at once
                    _fail_confirmations(
                        self._client, aiomqtt.MqttError("connection lost before the broker acknowledged")
                    )
                self._client = None
                if was_connected:
                    for hook in list(self._on_disconnect):
                        await self._safe(hook, "on_disconnect")
            if not self._stopping:
                await asyncio.sleep(next(delays))

    async def _receive(self, client: aiomqtt.Client, inbox: _Inbox) -> None:
        """Dispatch incoming messages until the connection drops.

        aiomqtt's message iterator spends a task and an ``asyncio.wait`` on every message (two
        loop turns); here the loop awaits the queue itself, and the connection's end arrives in
        it as a marker. What is already queued is dispatched without a loop turn per message:
        paho reads nothing meanwhile, which is the backpressure (see module doc)."""
        disconnected: asyncio.Future[None] = client._disconnected
        disconnected.add_done_callback(lambda _: inbox.close())
        while True:
            message = await inbox.get()
            while True:
                if message is _CLOSED:
                    error = None if disconnected.cancelled() else disconnected.exception()
                    raise aiomqtt.MqttError("disconnected from the broker") from error
                await self._dispatch(message)
                if inbox.empty():
                    break
                message = inbox.get_nowait()

    async def _safe(self, hook: Hook, what: str) -> None:
        try:
            await hook()
        except aiomqtt.MqttError:
            raise
        except Exception:
            self.log.exception(f"{what} hook failed")

    def _handlers(self, topic: str) -> list[MessageHandler]:
        """The handlers whose filter matches ``topic``, memoised per topic (aiomqtt's
        ``Topic.matches`` builds a validated Wildcard per call: ~7 % of a node's time per message)."""
        handlers = self._match_cache.get(topic)
        if handlers is None:
            t = aiomqtt.Topic(topic)
            handlers = [h for f, h in self._routes if t.matches(f)]
            if len(self._match_cache) >= 4096:  # e.g. one reply topic per client: stay bounded
                self._match_cache.clear()
            self._match_cache[topic] = handlers
        return handlers

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        for handler in self._handlers(message.topic.value):
            try:
                await handler(message)
            except Exception:
                # A raising handler must never take the connection down.
                self.log.exception("message handler failed", topic=message.topic.value)

    # -- operations ---------------------------------------------------------------------------
    async def subscribe(self, subscription: str, qos: int = 1) -> None:
        self._subs[subscription] = qos
        client = self._client
        if client is not None:
            await client.subscribe(subscription, qos=qos)

    async def unsubscribe(self, subscription: str) -> None:
        self._subs.pop(subscription, None)
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(subscription)

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | str | None,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish, waiting for a connection if needed; retried across a reconnect until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self._op_timeout)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerUnavailableError(f"could not publish to {topic!r}: not connected to {self.url}")
            if not self._connected.is_set():
                try:
                    await asyncio.wait_for(self._connected.wait(), remaining)
                except TimeoutError:
                    continue
            client = self._client
            if client is None:
                await asyncio.sleep(0)
                continue
            try:
                await _publish(client, topic, payload, qos, retain, self._properties(properties), max(remaining, 0.001))
                return
            except aiomqtt.MqttCodeError as e:
                if not self._connected.is_set() or "not currently connected" in str(e).lower():
                    await asyncio.sleep(0.01)
                    continue
                raise BrokerUnavailableError(f"publish to {topic!r} failed: {e}") from e
            except aiomqtt.MqttError as e:
                if self._connected.is_set() and loop.time() >= deadline:
                    raise BrokerUnavailableError(f"publish to {topic!r} failed: {e}") from e
                await asyncio.sleep(0.01)

    def _properties(self, props: dict[str, Any] | None) -> Properties | None:
        if not props or not self.is_v5:
            return None
        return PublishProperties(props)
