"""One MQTT connection on asyncio: CONNECT handshake, keepalive, QoS 0/1/2, SUBSCRIBE/UNSUBSCRIBE, DISCONNECT.

A :class:`Session` is an :class:`asyncio.BufferedProtocol`: the socket is read straight into the buffer of
the sans-I/O :class:`~aiflow_agents.mqtt.packets.StreamParser`, parsed in ``buffer_updated``, and every
PUBLISH is handed to one synchronous callback (no task, no queue per message: the owner decides how to queue).
Outgoing packets are written to the transport at once (TCP_NODELAY set); asyncio buffers what the socket
cannot take yet. Acknowledgements resolve plain futures. It does not reconnect:
:class:`aiflow_agents.connection.Connection` owns the reconnect story and builds a new Session per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from protocols.mqtt_strings import topic_filter_problem

from .errors import (
    AckError,
    ConnectionClosedError,
    ConnectRefusedError,
    InvalidTopicError,
    MalformedPacketError,
    PacketTooLargeError,
    reason_name,
)
from .message import Message, Will
from .packets import (
    MQTT_5,
    MQTT_311,
    BadPublish,
    Connack,
    Connect,
    Disconnect,
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
    WillSpec,
    check_publish,
    encode,
    encode_properties,
    encode_publish_header,
)

__all__ = ["CONNACK_311", "MQTT_5", "MQTT_311", "Session"]

_log = structlog.get_logger("aiflow.mqtt")

# MQTT 3.1.1 CONNACK return codes
CONNACK_311 = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
_BIG = 64 * 1024  # payloads beyond this go to the transport as they are, not copied behind their header
_PINGREQ = b"\xc0\x00"


def _payload_bytes(payload: bytes | bytearray | memoryview | str | None) -> bytes | bytearray | memoryview:
    if payload is None:
        return b""
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)):
        return payload
    if isinstance(payload, memoryview):
        return payload.cast("B") if payload.format != "B" or payload.ndim != 1 else payload
    raise TypeError(f"payload must be bytes, bytearray, memoryview, str or None, not {type(payload).__name__}")


class Session(asyncio.BufferedProtocol):
    """One connection to a broker. Create with :meth:`connect`; see the module docstring."""

    def __init__(
        self,
        *,
        client_id: str,
        version: int = MQTT_5,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_close: Callable[[ConnectionClosedError], None] | None = None,
        connect_properties: dict[str, Any] | None = None,
    ) -> None:
        self.client_id = client_id
        self.version = version
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.will = will
        self.on_message = on_message or (lambda m: None)
        self.on_close = on_close
        self.connect_properties = connect_properties or {}
        self.connack: Connack | None = None
        self.max_packet_size = 268_435_460  # the broker's (MQTT 5 CONNACK), else the protocol's maximum
        self.receive_maximum = 65535
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = StreamParser(version)
        if self.v5 and "MaximumPacketSize" in self.connect_properties:
            self._parser.max_packet_size = self.connect_properties["MaximumPacketSize"]  # what we announced
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # QoS 1/2 publishes we stopped waiting for (timeout, cancel) while the broker still holds them: their
        # packet id stays taken and their Receive Maximum slot held until the ack (or the session's end)
        self._tombstones: dict[int, asyncio.Semaphore | None] = {}
        self._ack_counts: dict[int, int] = {}  # SUBSCRIBE/UNSUBSCRIBE packet id -> number of filters sent
        self._writes = 0  # packets written so far (which publish was the last one before a close)
        self.bad_publishes = 0  # received PUBLISHes with invalid UTF-8: acknowledged and dropped
        self._next_id = 0
        self._inflight: asyncio.Semaphore | None = None
        self._qos2_in: set[int] = set()
        self._connack_future: asyncio.Future[Connack] = self._loop.create_future()
        self.closed: asyncio.Future[ConnectionClosedError] = self._loop.create_future()
        self._disconnect_reason: int | None = None
        self._disconnect_props: dict[str, Any] = {}
        self._close_reason: str | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._ping_outstanding = False
        self._reading_paused = False
        self._topic_cache: dict[str, bytes] = {}
        self.connected_at = 0.0

    # -- connecting ---------------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        **kw: Any,
    ) -> Session:
        """Open TCP (or TLS), send CONNECT and wait for a successful CONNACK.

        Raises :class:`ConnectRefusedError` on a failure code, :class:`ConnectionClosedError` (with
        ``before_connack``) when the broker closes without answering, ``OSError``/``ssl.SSLError`` and
        ``TimeoutError`` as the network gives them."""
        session = cls(**kw)
        loop = session._loop
        deadline = loop.time() + timeout
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: session,
                host,
                port,
                ssl=ssl_context,
                server_hostname=server_hostname if ssl_context is not None else None,
            )
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session._send_connect()
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(session._connack_future)
        except BaseException:
            transport.abort()
            raise
        return session

    def _send_connect(self) -> None:
        will = None
        if self.will is not None:
            w = self.will
            will = WillSpec(w.topic, bytes(w.payload), w.qos, w.retain, dict(w.properties) if self.v5 else {})
        password = self.password.encode("utf-8") if self.password is not None else None
        # No properties unless asked (absent ReceiveMaximum means 65535): a 3.1.1-only broker reading an MQTT 5
        # CONNECT then sees an empty block and answers "unsupported protocol" instead of waiting for bytes.
        props = dict(self.connect_properties) if self.v5 else {}
        packet = Connect(self.client_id, self.version, True, self.keepalive, self.username, password, will, props)
        self._write(encode(packet, self.version))

    @property
    def v5(self) -> bool:
        return self.version == MQTT_5

    @property
    def is_closed(self) -> bool:
        return self.closed.done() or self._transport is None or self._transport.is_closing()

    # -- asyncio.BufferedProtocol-----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            packets = self._parser.buffer_updated(nbytes)
        except MalformedPacketError as e:
            self._protocol_error(f"malformed packet from the broker: {e}", 0x81)
            return
        for p in packets:
            if type(p) is Publish:
                self._on_publish(p)
            elif type(p) is PubAck or type(p) is PubComp:
                fut = self._pending.get(p.packet_id)
                if fut is not None and not fut.done():
                    fut.set_result(p.reason_code)
                elif p.packet_id in self._tombstones:
                    self._bury(p.packet_id)
            elif type(p) is BadPublish:
                self._on_bad_publish(p)
            elif type(p) is PingResp:
                self._ping_outstanding = False
            else:
                self._on_other(p)

    def _on_publish(self, p: Publish) -> None:
        qos = p.qos
        if qos == 1:
            pid = p.packet_id
            self._write(bytes((0x40, 2, pid >> 8, pid & 0xFF)))
        elif qos == 2:
            pid = p.packet_id
            first = pid not in self._qos2_in
            self._qos2_in.add(pid)
            self._write(bytes((0x50, 2, pid >> 8, pid & 0xFF)))
            if not first:
                return  # a redelivery of a QoS 2 message we already handed over
        try:
            self.on_message(Message(p.topic, p.payload, qos, p.retain, p.properties))
        except Exception:
            _log.exception("message callback failed", client=self.client_id, topic=p.topic)

    def _on_bad_publish(self, p: BadPublish) -> None:
        """A PUBLISH whose topic or a string property is not valid UTF-8 (a broker that forwards raw bytes):
        acknowledged so it is not redelivered, dropped, counted and logged; the connection stays up (else any
        publisher could knock us off)."""
        pid = p.packet_id
        if p.qos == 1:
            self._write(bytes((0x40, 2, pid >> 8, pid & 0xFF)))
        elif p.qos == 2:
            self._qos2_in.add(pid)
            self._write(bytes((0x50, 2, pid >> 8, pid & 0xFF)))
        self.bad_publishes += 1
        n = self.bad_publishes
        if n == 1 or n % 1000 == 0:
            _log.warning("dropped a received PUBLISH", client=self.client_id, reason=p.reason, dropped=n)

    def _bury(self, pid: int) -> None:
        """The late ack of a publish we gave up on: its packet id and in-flight slot are free again."""
        sem = self._tombstones.pop(pid, None)
        if sem is not None:
            sem.release()

    def _on_other(self, p: Any) -> None:
        kind = type(p)
        if kind is Connack:
            self._on_connack(p)
        elif kind is PubRec:
            fut = self._pending.get(p.packet_id)
            if p.reason_code >= 0x80:
                if fut is not None and not fut.done():
                    fut.set_result(p.reason_code)
                elif p.packet_id in self._tombstones:
                    self._bury(p.packet_id)
            else:
                self._write(encode(PubRel(p.packet_id), self.version))
        elif kind is PubRel:
            self._qos2_in.discard(p.packet_id)
            self._write(encode(PubComp(p.packet_id), self.version))
        elif kind is SubAck or kind is UnsubAck:
            fut = self._pending.get(p.packet_id)
            expected = self._ack_counts.pop(p.packet_id, None)
            if (kind is SubAck or self.v5) and expected is not None and len(p.reason_codes) != expected:
                self._protocol_error(f"{kind.__name__} with {len(p.reason_codes)} codes for {expected} filters", 0x81)
                return
            if fut is not None and not fut.done():
                fut.set_result(p)
        elif kind is Disconnect:
            self._disconnect_reason = p.reason_code
            self._disconnect_props = p.properties
            if self._transport is not None:
                self._transport.close()
        else:
            self._protocol_error(f"unexpected packet from the broker: {type(p).__name__}", 0x82)

    def _on_connack(self, p: Connack) -> None:
        if self._connack_future.done():
            self._protocol_error("a second CONNACK", 0x82)
            return
        self.connack = p
        if p.reason_code != 0:
            if self.v5 and p.reason_code >= 0x80:
                why = reason_name(p.reason_code)
                reason = p.properties.get("ReasonString")
                if reason:
                    why += f" ({reason})"
            else:
                why = CONNACK_311.get(p.reason_code, f"return code {p.reason_code}")
            self._connack_future.set_exception(
                ConnectRefusedError(p.reason_code, f"the broker refused the connection: {why}", version=self.version)
            )
            self._close_reason = f"connection refused: {why}"
            if self._transport is not None:
                self._transport.close()
            return
        props = p.properties
        if "MaximumPacketSize" in props:
            self.max_packet_size = props["MaximumPacketSize"]
        if "ReceiveMaximum" in props:
            if props["ReceiveMaximum"] == 0:  # MQTT 5 §3.2.2.3.3: a protocol error
                error = ConnectionClosedError("the broker sent ReceiveMaximum 0 in CONNACK (a protocol error)")
                self._connack_future.set_exception(error)
                self._protocol_error("ReceiveMaximum 0 in CONNACK", 0x82)
                return
            self.receive_maximum = props["ReceiveMaximum"]
        if "ServerKeepAlive" in props:
            self.keepalive = props["ServerKeepAlive"]
        if self.v5 and self.receive_maximum < 65535:
            self._inflight = asyncio.Semaphore(self.receive_maximum)
        self.connected_at = self._loop.time()
        self._schedule_ping()
        self._connack_future.set_result(p)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        before = not self._connack_future.done()
        if self._disconnect_reason is not None:
            why = f"the broker disconnected us: {reason_name(self._disconnect_reason)}"
            reason = self._disconnect_props.get("ReasonString")
            if reason:
                why += f" ({reason})"
        elif self._close_reason is not None:
            why = self._close_reason
        elif exc is not None:
            why = f"connection lost: {exc}"
        elif before:
            why = "the broker closed the connection without answering CONNECT"
        else:
            why = "the broker closed the connection"
        by_broker = self._disconnect_reason is not None or (self._close_reason is None and exc is None)
        error = ConnectionClosedError(
            why, reason_code=self._disconnect_reason, before_connack=before, by_broker=by_broker
        )
        error.__cause__ = exc
        if before:
            self._connack_future.set_exception(error)
            self._connack_future.exception()  # retrieved: no "never retrieved" warning if nobody awaits
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        self._tombstones.clear()  # the session is over: nothing is held any more
        if not self.closed.done():
            self.closed.set_result(error)
        if self.on_close is not None:
            try:
                self.on_close(error)
            except Exception:
                _log.exception("close callback failed", client=self.client_id)

    def pause_reading(self) -> None:
        """Stop reading the socket (backpressure: the broker queues for us meanwhile)."""
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            self._ping_outstanding = False  # a PINGRESP may be waiting in the unread bytes
            self._transport.resume_reading()

    # -- keepalive ----------------------------------------------------------------------------
    def _schedule_ping(self) -> None:
        if self.keepalive > 0:
            self._ping_handle = self._loop.call_later(self.keepalive, self._ping)

    def _ping(self) -> None:
        if self._transport is None:
            return
        if self._ping_outstanding and not self._reading_paused:
            self._close_reason = f"no PINGRESP within the keepalive of {self.keepalive}s: the broker is unreachable"
            self._transport.abort()
            return
        self._ping_outstanding = True
        self._write(_PINGREQ)
        self._schedule_ping()

    # -- writing ------------------------------------------------------------------------------
    def _write(self, data: bytes | bytearray | memoryview) -> None:
        t = self._transport
        if t is not None:
            self._writes += 1
            t.write(data)

    def _protocol_error(self, message: str, reason: int) -> None:
        _log.warning("closing the connection", client=self.client_id, reason=message)
        self._close_reason = message
        if self._transport is not None:
            if self.v5 and self._connack_future.done():
                self._write(encode(Disconnect(reason), self.version))
            self._transport.close()

    def _packet_id(self) -> int:
        pending = self._pending
        tombstones = self._tombstones
        if len(pending) + len(tombstones) >= 65535:
            raise RuntimeError("no free MQTT packet identifier (65535 in flight)")
        n = self._next_id
        while True:
            n = n + 1 if n < 65535 else 1
            if n not in pending and n not in tombstones:
                self._next_id = n
                return n

    def _check_open(self) -> asyncio.Transport:
        t = self._transport
        if t is None or self.closed.done() or not self._connack_future.done():
            raise ConnectionClosedError("not connected", unsent=True)
        return t

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str | None = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        validate: bool = True,
    ) -> int | None:
        """Publish. QoS 0 returns once written; QoS 1/2 wait for PUBACK/PUBCOMP and return its reason code
        on MQTT 5 (0 success, 16 "no matching subscribers", >= 0x80 failures), ``None`` on 3.1.1.

        An invalid topic or string property raises :class:`InvalidTopicError` before anything is sent;
        a packet over the broker's maximum size raises :class:`PacketTooLargeError`."""
        if validate:
            check_publish(topic, properties)
        if qos not in (0, 1, 2):
            raise ValueError(f"bad QoS {qos}")
        data = _payload_bytes(payload)
        tb = self._topic_cache.get(topic)
        if tb is None:
            tb = topic.encode("utf-8")
            if len(self._topic_cache) < 1024:
                self._topic_cache[topic] = tb
        v5 = self.version == MQTT_5
        props = encode_properties(properties) if v5 else None
        if qos == 0:
            t = self._check_open()
            head = encode_publish_header(tb, len(data), 0, retain, False, 0, props)
            self._send_publish(t, head, data)
            return None
        sem = self._inflight
        if sem is not None:
            if sem.locked():  # the broker's Receive Maximum is reached: wait for a slot, within the timeout
                try:
                    async with asyncio.timeout(timeout):
                        await sem.acquire()
                except TimeoutError:
                    raise TimeoutError("no free in-flight slot (broker's Receive Maximum) in time") from None
            else:
                await sem.acquire()
        try:
            t = self._check_open()
            pid = self._packet_id()
            head = encode_publish_header(tb, len(data), qos, retain, False, pid, props)
            fut: asyncio.Future[int] = self._loop.create_future()
            self._send_publish(t, head, data)
            mine = self._writes
            self._pending[pid] = fut
            timer = self._loop.call_later(timeout, _expire, fut) if timeout is not None else None
            try:
                code = await fut
            except ConnectionClosedError as e:
                if self._writes == mine:  # nothing written after it: it may be what the broker closed us for
                    raise ConnectionClosedError(
                        str(e), reason_code=e.reason_code, by_broker=e.by_broker, last_packet=True
                    ) from e
                raise
            finally:
                self._pending.pop(pid, None)
                if timer is not None:
                    timer.cancel()
                acked = fut.done() and not fut.cancelled() and fut.exception() is None
                if not acked and not self.closed.done():
                    # given up (timeout, cancel) but the broker still holds it: keep the id and slot taken
                    self._tombstones[pid] = sem
                    sem = None
        finally:
            if sem is not None:
                sem.release()
        return code if v5 else None

    def _send_publish(self, t: asyncio.Transport, head: bytes, data: bytes | bytearray | memoryview) -> None:
        if len(head) + len(data) > self.max_packet_size:
            raise PacketTooLargeError(
                f"PUBLISH of {len(head) + len(data)} bytes exceeds the broker's maximum packet size "
                f"{self.max_packet_size}"
            )
        self._writes += 1
        if len(data) > _BIG:
            t.write(head)
            t.write(data)
        else:
            t.write(head + data)

    async def _acked(self, packet: Subscribe | Unsubscribe, timeout: float | None) -> Any:
        t = self._check_open()
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[packet.packet_id] = fut
        n = len(packet.subscriptions) if isinstance(packet, Subscribe) else len(packet.filters)
        self._ack_counts[packet.packet_id] = n
        self._writes += 1
        t.write(encode(packet, self.version))
        timer = self._loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            return await fut
        finally:
            self._pending.pop(packet.packet_id, None)
            self._ack_counts.pop(packet.packet_id, None)
            if timer is not None:
                timer.cancel()

    async def subscribe(self, subscriptions: list[tuple[str, int]], *, timeout: float | None = None) -> list[int]:
        """Subscribe (filter, QoS) pairs; returns the granted QoS / reason codes, raises :class:`AckError`
        if any is a failure (>= 0x80)."""
        for f, _ in subscriptions:
            problem = topic_filter_problem(f)
            if problem is not None:
                raise InvalidTopicError(f"invalid topic filter {f!r}: {problem}")
        self._check_open()
        ack: SubAck = await self._acked(Subscribe(self._packet_id(), list(subscriptions)), timeout)
        codes = ack.reason_codes
        failed = [(f, c) for (f, _), c in zip(subscriptions, codes, strict=False) if c >= 0x80]
        if failed or len(codes) != len(subscriptions):
            detail = ", ".join(f"{f!r}: {reason_name(c)}" for f, c in failed) or "wrong number of codes"
            raise AckError(f"subscribe refused ({detail})", codes)
        return codes

    async def unsubscribe(self, filters: list[str], *, timeout: float | None = None) -> list[int]:
        self._check_open()
        ack: UnsubAck = await self._acked(Unsubscribe(self._packet_id(), list(filters)), timeout)
        failed = [c for c in ack.reason_codes if c >= 0x80]
        if failed:
            raise AckError(f"unsubscribe refused ({', '.join(reason_name(c) for c in failed)})", ack.reason_codes)
        return ack.reason_codes

    async def disconnect(self, reason_code: int = 0, *, timeout: float = 2.0) -> None:
        """Orderly DISCONNECT (the broker then discards the Will, unless ``reason_code`` is 0x04)."""
        t = self._transport
        if t is not None and not t.is_closing():
            if self._connack_future.done():
                t.write(encode(Disconnect(reason_code), self.version))
            self._close_reason = "disconnected by us"
            t.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        if self._transport is not None:
            self._transport.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._close_reason = self._close_reason or "aborted by us"
            self._transport.abort()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no acknowledgement from the broker in time"))
