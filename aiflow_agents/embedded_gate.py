"""A gate between client sockets and the embedded amqtt broker.

Why: amqtt 0.12.1, when a client connects, iterates its whole subscription table and awaits the
replay of matching retained messages inside that loop (``Broker._handle_client_session``). A new
filter subscribed by another client, or a filter deleted when another client's session is cleaned
up, changes the table's size meanwhile, and the connecting session dies with ``RuntimeError:
dictionary changed size during iteration`` (its socket is closed right after CONNACK). With retained
presence records and one reply topic per client this hit 14 of 300 connects in a burst, 149 on a
busy machine (``tests/test_embedded_broker.py``).

How, with amqtt's public API only: the broker gets an ``external`` listener, and this module owns
the TCP server and hands each connection to ``Broker.external_connected`` through its own
``ReaderAdapter``/``WriterAdapter``, which read and write whole MQTT packets:

- a CONNECT opens a *connect phase*, exclusive: until amqtt has finished the retained replay for
  that session. The end is made visible by placing an UNSUBSCRIBE of a topic nobody uses right
  behind the CONNECT: amqtt handles it in the session's message loop, which starts only after the
  replay; its UNSUBACK is swallowed here;
- a SUBSCRIBE (which may add a filter) waits while a phase is open and holds phases off until its
  SUBACK is written;
- keys are never deleted: before a DISCONNECT or the end of the stream reaches amqtt, the session
  unsubscribes from all its filters (UNSUBSCRIBE leaves the key with an empty list, and amqtt's
  later clean-up then finds nothing of the session's to delete). The filter strings stay as empty
  keys, a small leak acceptable in a development broker.

While a packet waits, acknowledgements and PINGREQ from the same client overtake it: amqtt may be
waiting for this client's PUBACK (a retained replay) before it acknowledges an earlier SUBSCRIBE.

Not covered: sessions amqtt drops on its own (keep-alive expiry, take-over of a client id); their
filters are deleted by amqtt's clean-up, unguarded. Rare in tests; deployments use a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable

from amqtt.adapters import ReaderAdapter, WriterAdapter

log = logging.getLogger("aiflow.embedded")

CONNECT, CONNACK, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT = 1, 2, 8, 9, 10, 11, 14
OVERTAKING = frozenset({4, 5, 6, 7, 12})  # PUBACK, PUBREC, PUBREL, PUBCOMP, PINGREQ
PHASE_PACKET_ID = 0xFFFF  # our UNSUBSCRIBE behind a CONNECT
LEAVE_PACKET_ID = 0xFFFE  # our UNSUBSCRIBE before a DISCONNECT / end of stream
LEAVE_WAIT_S = 2.0  # amqtt may take long to answer a session stuck on a dead client's PUBACK
PHASE_TOPIC = b"$aiflow/embedded-gate"
END_OF_STREAM = b""
PHASE_TIMEOUT_S = 5.0  # a connect phase held longer (a stalled or SIGSTOPped client) is taken back


def _encode_length(n: int) -> bytes:
    out = b""
    while True:
        d, n = n % 128, n // 128
        out += bytes([d | (0x80 if n else 0)])
        if not n:
            return out


def _unsubscribe(packet_id: int, topics: list[bytes]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(struct.pack("!H", len(t)) + t for t in topics)
    return b"\xa2" + _encode_length(len(body)) + body


_PHASE_UNSUBSCRIBE = _unsubscribe(PHASE_PACKET_ID, [PHASE_TOPIC])
MQTT_5_LEVEL = 5
_REFUSE_V5 = b"\x20\x03\x00\x84\x00"  # MQTT 5 CONNACK: "unsupported protocol version", no properties


def _protocol_level(connect: bytes) -> int | None:
    """The protocol level byte of a CONNECT packet (4 = 3.1.1, 5 = MQTT 5)."""
    parsed = _remaining_length(connect, 1)
    if parsed is None:
        return None
    at = 1 + parsed[1] + 6  # after the fixed header and the protocol name "MQTT" with its length
    return connect[at] if at < len(connect) else None


def _remaining_length(buf: bytes | bytearray | memoryview, start: int) -> tuple[int, int] | None:
    """(length, bytes used) of the Remaining Length at ``start``, or None if incomplete."""
    n, mult = 0, 1
    for i in range(4):
        if start + i >= len(buf):
            return None
        b = buf[start + i]
        n += (b & 0x7F) * mult
        if not b & 0x80:
            return n, i + 1
        mult *= 128
    raise ValueError("malformed remaining length")


def _body(packet: bytes) -> memoryview:
    parsed = _remaining_length(packet, 1)
    assert parsed is not None
    return memoryview(packet)[1 + parsed[1] :]


def _topics(body: memoryview, with_qos: bool) -> list[bytes]:
    """The topic filters of an MQTT 3.1.1 SUBSCRIBE / UNSUBSCRIBE body (after the packet id)."""
    out, pos = [], 2
    while pos + 2 <= len(body):
        n = struct.unpack_from("!H", body, pos)[0]
        out.append(bytes(body[pos + 2 : pos + 2 + n]))
        pos += 2 + n + (1 if with_qos else 0)
    return out


class Gate:
    """Connect phases exclude each other and subscribes; subscribes only exclude connect phases.
    A waiting connect phase holds back new subscribes, so a stream of them cannot starve it."""

    def __init__(self, phase_timeout: float = PHASE_TIMEOUT_S) -> None:
        self.phase = False
        self.phase_timeout = phase_timeout
        self._phase_token = 0  # which phase is open: a late end of an expired phase must not end the next
        self._phase_timer: asyncio.TimerHandle | None = None
        self.subscribes = 0
        self.phases_waiting = 0
        self._changed = asyncio.Event()
        self.stats = Counter[str]()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            event = self._changed
            await event.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def begin_phase(self) -> int:
        """Wait for the exclusive connect phase; returns its token for :meth:`end_phase`. A phase not ended
        within ``phase_timeout`` (a client that stalls amqtt's retained replay) is ended for it, counted in
        ``stats["phase_timeouts"]`` and logged, so one stalled client cannot block every CONNECT/SUBSCRIBE."""
        self.phases_waiting += 1
        try:
            await self._wait(lambda: not self.phase and self.subscribes == 0)
        finally:
            self.phases_waiting -= 1
        self.phase = True
        self._phase_token += 1
        token = self._phase_token
        self._phase_timer = asyncio.get_running_loop().call_later(self.phase_timeout, self._expire, token)
        self.stats["connect_phases"] += 1
        return token

    def _expire(self, token: int) -> None:
        if self.phase and token == self._phase_token:
            self.stats["phase_timeouts"] += 1
            log.warning("connect phase held over %.1fs (a stalled client?): released", self.phase_timeout)
            self._phase_timer = None
            self.end_phase(token)

    def end_phase(self, token: int | None = None) -> None:
        if token is not None and token != self._phase_token:
            return  # that phase expired already; another may be open now
        if self._phase_timer is not None:
            self._phase_timer.cancel()
            self._phase_timer = None
        self.phase = False
        self._notify()

    async def begin_subscribe(self) -> None:
        await self._wait(lambda: not self.phase and self.phases_waiting == 0)
        self.subscribes += 1
        self.stats["subscribes"] += 1

    def end_subscribe(self, n: int = 1) -> None:
        if n:
            self.subscribes -= n
            self._notify()


class _Session:
    """What the gate knows and holds on behalf of one connection."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.connected = False  # a CONNECT has been read
        self.in_phase = False
        self.phase_token = 0
        self.subacks: Counter[int] = Counter()  # SUBSCRIBE packet ids whose SUBACK releases a hold
        self.filters: set[bytes] = set()
        self.leaving: asyncio.Future[None] | None = None  # our leave-UNSUBSCRIBE, until its UNSUBACK
        self.eof = False
        self.finished = False  # over: a hold that completes after this is given back at once
        self.writer: asyncio.StreamWriter | None = None  # the client's socket, to refuse an MQTT 5 CONNECT

    async def start_phase(self) -> bool:
        token = await self.gate.begin_phase()
        if self.finished:
            self.gate.end_phase(token)
            return False
        self.in_phase = True
        self.phase_token = token
        return True

    def end_phase(self) -> None:
        if self.in_phase:
            self.in_phase = False
            self.gate.end_phase(self.phase_token)

    async def hold_subscribe(self, packet_id: int) -> bool:
        await self.gate.begin_subscribe()
        if self.finished:
            self.gate.end_subscribe()
            return False
        self.subacks[packet_id] += 1
        return True

    def subacked(self, packet_id: int) -> None:
        if self.subacks[packet_id] > 0:
            self.subacks[packet_id] -= 1
            self.gate.end_subscribe()

    def leave(self) -> bytes:
        """Our UNSUBSCRIBE of every filter of this session (to go ahead of its DISCONNECT)."""
        self.leaving = asyncio.get_running_loop().create_future()
        self.gate.stats["leave_unsubscribes"] += 1
        return _unsubscribe(LEAVE_PACKET_ID, sorted(self.filters))

    async def left(self) -> bool:
        assert self.leaving is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.leaving), LEAVE_WAIT_S)
        except TimeoutError:
            self.gate.stats["leave_timeouts"] += 1
        return True

    def finish(self) -> None:
        self.finished = True
        self.end_phase()
        self.gate.end_subscribe(sum(self.subacks.values()))
        self.subacks.clear()
        if self.leaving is not None and not self.leaving.done():
            self.leaving.set_result(None)


class GatedReader(ReaderAdapter):
    """Whole packets from the client, some held back as the module doc says."""

    def __init__(self, reader: asyncio.StreamReader, session: _Session) -> None:
        self._reader = reader
        self._session = session
        self._buf = bytearray()
        self._filling: asyncio.Future[None] | None = None
        self._held: tuple[bytes, asyncio.Future[bool]] | None = None  # a packet waiting for its turn
        self._reading: asyncio.Future[tuple[int, bytes] | None] | None = None  # the next packet, once read

    async def _raw(self) -> tuple[int, bytes] | None:
        """(type, packet) of the next packet off the socket, or None at its end."""
        try:
            first = await self._reader.readexactly(1)
            header = bytearray(first)
            while True:
                header += await self._reader.readexactly(1)
                parsed = _remaining_length(header, 1)
                if parsed is not None:
                    break
            body = await self._reader.readexactly(parsed[0]) if parsed[0] else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return first[0] >> 4, bytes(header) + body

    def _classify(self, got: tuple[int, bytes] | None) -> None:
        """Pass a packet on, or hold it (``self._held``) until its turn."""
        s = self._session
        if got is None:
            if s.connected and s.filters and s.leaving is None:
                self._buf += s.leave()
                self._held = (END_OF_STREAM, asyncio.ensure_future(s.left()))
            else:
                s.eof = True
            return
        kind, packet = got
        if not s.connected and kind == CONNECT and _protocol_level(packet) == MQTT_5_LEVEL:
            # amqtt speaks 3.1.1 only, and a v5 CONNECT with a Will or properties makes it wait for bytes
            # that never come: refuse it as an MQTT 5 broker would (CONNACK 0x84), so clients fall back at once
            s.gate.stats["refused_connects"] += 1
            if s.writer is not None:
                s.writer.write(_REFUSE_V5)
                s.writer.close()
            s.eof = True
            return
        if not s.connected:
            s.connected = kind == CONNECT
            if s.connected:
                self._held = (packet, asyncio.ensure_future(s.start_phase()))
                return
        elif kind == SUBSCRIBE:
            body = _body(packet)
            if len(body) >= 2:
                s.filters.update(_topics(body, with_qos=True))
                packet_id = struct.unpack_from("!H", body)[0]
                self._held = (packet, asyncio.ensure_future(s.hold_subscribe(packet_id)))
                return
        elif kind == UNSUBSCRIBE:
            s.filters.difference_update(_topics(_body(packet), with_qos=False))
        elif kind == DISCONNECT and s.filters and s.leaving is None:
            self._buf += s.leave()
            self._held = (packet, asyncio.ensure_future(s.left()))
            return
        self._buf += packet

    async def _next_packet(self) -> None:
        if self._held is None:
            got = await (self._reading if self._reading is not None else self._raw())
            self._reading = None
            self._classify(got)
            if self._held is None or self._buf:
                return  # something for amqtt now (the leave-UNSUBSCRIBE goes ahead of what it holds)
        assert self._held is not None
        packet, turn = self._held
        while not turn.done():
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._raw())
            await asyncio.wait({turn, self._reading}, return_when=asyncio.FIRST_COMPLETED)
            if turn.done():
                break
            got = self._reading.result()
            if got is not None and got[0] in OVERTAKING:
                self._reading = None
                self._buf += got[1]
                return  # amqtt gets the acknowledgement now; the held packet keeps waiting
            await turn  # anything else keeps its order behind the held packet
        self._held = None
        if not await turn:
            return
        if packet is END_OF_STREAM:
            self._session.eof = True
            return
        self._buf += packet
        if packet[0] >> 4 == CONNECT:
            self._buf += _PHASE_UNSUBSCRIBE

    async def read(self, n: int = -1) -> bytes:
        while not self._buf or (n > 0 and len(self._buf) < n):
            if self._session.eof:
                break
            # in a task of its own: amqtt may cancel a read (keep-alive) and must not lose half a packet
            if self._filling is None or self._filling.done():
                self._filling = asyncio.ensure_future(self._next_packet())
            await asyncio.shield(self._filling)
        if n < 0:
            n = len(self._buf)
        if len(self._buf) < n:
            partial = bytes(self._buf)
            self._buf.clear()
            raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class GatedWriter(WriterAdapter):
    def __init__(self, writer: asyncio.StreamWriter, session: _Session) -> None:
        self._writer = writer
        self._session = session
        self._pending = bytearray()
        self.is_closed = False

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        self._pending += data
        view = memoryview(self._pending)
        pos, out = 0, []
        while pos < len(view):
            parsed = _remaining_length(view, pos + 1)
            if parsed is None or pos + 1 + parsed[1] + parsed[0] > len(view):
                break
            end = pos + 1 + parsed[1] + parsed[0]
            kind = view[pos] >> 4
            skip = False
            if kind == CONNACK and parsed[0] >= 2 and view[pos + 1 + parsed[1] + 1] != 0:
                # a refused CONNECT (e.g. MQTT 5, which amqtt does not speak): no replay will follow, and
                # the phase must not wait for amqtt to wind the session down (or for PHASE_TIMEOUT_S)
                self._session.end_phase()
                self._session.gate.stats["refused_connects"] += 1
            elif kind in (SUBACK, UNSUBACK) and parsed[0] >= 2:
                packet_id = struct.unpack_from("!H", view, pos + 1 + parsed[1])[0]
                session = self._session
                if kind == SUBACK:
                    session.subacked(packet_id)
                elif packet_id == PHASE_PACKET_ID and session.in_phase:
                    session.end_phase()
                    skip = True
                elif packet_id == LEAVE_PACKET_ID and session.leaving is not None:
                    if not session.leaving.done():
                        session.leaving.set_result(None)
                    skip = True
            if not skip:
                out.append(bytes(view[pos:end]))
            pos = end
        view.release()
        del self._pending[:pos]
        if out:
            if self._writer.transport.is_closing():
                # the client is gone: amqtt keeps flushing its QoS 1 queue to it, and asyncio would log
                # "socket.send() raised exception." for each write; the session's end is handled elsewhere
                self._session.gate.stats["writes_after_close"] += 1
                return
            self._writer.write(b"".join(out))

    async def drain(self) -> None:
        if not self.is_closed:
            await self._writer.drain()

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._writer.get_extra_info("peername")
        return (peer[0], peer[1]) if peer and len(peer) >= 2 else None

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        with contextlib.suppress(Exception):
            await self._writer.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def serve(broker: object, listener: str, host: str, port: int, gate: Gate) -> asyncio.AbstractServer:
    """Listen on host:port and hand each connection to ``broker`` through the gate."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:  # amqtt sets no TCP_NODELAY: every small reply would wait for a delayed ACK
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = _Session(gate)
        session.writer = writer
        w = GatedWriter(writer, session)
        try:
            await broker.external_connected(GatedReader(reader, session), w, listener)  # type: ignore[attr-defined]
        except Exception as e:  # a session amqtt failed on must not leak; the client sees a close and reconnects
            gate.stats["session_errors"] += 1
            log.warning("embedded broker session failed: %r", e)
        finally:
            session.finish()
            await w.close()

    return await asyncio.start_server(on_connect, host, port)
