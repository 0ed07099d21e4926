"""An MQTT broker inside this process, for tests: ``memory://NAME`` selects it in place of a TCP broker.

:class:`MemorySession` has the interface of :class:`~aiflow_agents.mqtt.session.Session` (what
:class:`~aiflow_agents.connection.Connection` uses of it), so :class:`~aiflow_agents.Node`,
:class:`~aiflow_agents.Client` and ``TopologyManager`` run unchanged, all in one event loop, in milliseconds.
:class:`MemoryBroker` implements the semantics the runtime relies on, as Mosquitto does them (the same test
bodies run against both, ``tests/test_memory_broker.py``):

- routing by topic filter (``+``, ``#``; wildcards never match topics starting with ``$``), one delivery per
  matching subscription of a client (Mosquitto 2 sends overlapping subscriptions a copy each);
- shared subscriptions ``$share/<group>/<filter>``: each message goes to one member per group, in turn;
- retained messages (the last per topic, an empty payload deletes it) sent on subscribe with the retain flag,
  to shared subscriptions too (Mosquitto does; MQTT 5 says not to, so do not rely on either); live
  deliveries carry retain 0;
- the Last Will on an abnormal close (:meth:`MemoryBroker.drop`, :meth:`MemorySession.abort`, a client id
  taken over), not on an orderly DISCONNECT (unless reason 0x04);
- MQTT 5 properties passed through to MQTT 5 subscribers (3.1.1 ones get none); QoS delivered is the lower of
  the publish's and the subscription's;
- QoS 1/2 publishes acknowledged with reason 16 "no matching subscribers" when nobody matched (MQTT 5);
- clean sessions: subscriptions end with the connection, and the client restores them after reconnecting.

Not modelled: the wire (packet sizes, malformed packets, keepalive), QoS 2 handshakes, persistence,
Will delay, message expiry, ACLs. Transport behaviour is tested against real brokers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocols.mqtt_strings import topic_filter_problem

from .errors import AckError, ConnectionClosedError, InvalidTopicError
from .message import Message, Will
from .packets import MQTT_5, Connack, check_publish

__all__ = ["MemoryBroker", "MemorySession", "topic_matches"]

_log = structlog.get_logger("aiflow.mqtt")

NO_MATCHING_SUBSCRIBERS = 0x10
DISCONNECT_WITH_WILL = 0x04
_TOPIC_ALIAS = "TopicAlias"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching (``+`` one level, ``#`` this level and below; no wildcard matches a leading ``$``)."""
    if topic_filter == topic:
        return True
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _split_share(subscription: str) -> tuple[str | None, str]:
    """``$share/g/a/b`` -> (``g``, ``a/b``); a plain filter -> (None, filter)."""
    if subscription.startswith("$share/"):
        _, group, topic_filter = subscription.split("/", 2)
        return group, topic_filter
    return None, subscription


class MemoryBroker:
    """A named in-process broker. ``memory://NAME`` URLs connect to the one registered under ``NAME``
    (created on first use); ``async with MemoryBroker() as url`` gives a fresh one and forgets it at exit."""

    _registry: dict[str, MemoryBroker] = {}
    _closed: set[str] = set()  # names closed and not registered again: connecting there is refused
    _names = itertools.count(1)

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"broker-{next(self._names)}"
        self.sessions: dict[str, MemorySession] = {}
        self.retained: dict[str, Message] = {}
        self._turns: dict[tuple[str, str], int] = {}  # (share group, filter) -> next member index
        self.published = 0  # messages routed (a count for tests)

    # -- registry -------------------------------------------------------------------------------
    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The broker registered under ``name``, created (and registered) if there is none. A name whose broker
        was closed refuses connections (``ConnectionRefusedError``, as a broker that is down) until registered
        again, so a client that outlives its broker retries instead of finding an empty new one."""
        broker = cls._registry.get(name)
        if broker is None:
            if name in cls._closed:
                raise ConnectionRefusedError(f"the memory broker {name!r} is closed")
            broker = cls._registry[name] = cls(name)
        return broker

    def register(self) -> MemoryBroker:
        existing = self._registry.get(self.name)
        if existing is not None and existing is not self:
            raise ValueError(f"a memory broker named {self.name!r} already exists")
        self._registry[self.name] = self
        self._closed.discard(self.name)
        return self

    @property
    def url(self) -> Any:
        """This broker's :class:`~aiflow_agents.BrokerURL` (``memory://NAME``)."""
        from ..broker import BrokerURL

        return BrokerURL.memory(self.name)

    async def __aenter__(self) -> Any:
        self.register()
        return self.url

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection (as a broker shutting down: Wills are not sent) and unregister; clients
        reconnect (with backoff) once a broker of that name is registered again."""
        for session in list(self.sessions.values()):
            session._lost(ConnectionClosedError("the broker closed the connection", by_broker=True), will=False)
        self.retained.clear()
        if self._registry.get(self.name) is self:
            del self._registry[self.name]
            self._closed.add(self.name)

    # -- test controls --------------------------------------------------------------------------
    def drop(self, client_id: str) -> None:
        """Cut ``client_id``'s connection as a network failure would: its Will is published, it reconnects."""
        session = self.sessions.get(client_id)
        if session is not None:
            session._lost(ConnectionClosedError("connection lost: dropped by the memory broker"), will=True)

    def subscriptions(self, client_id: str) -> dict[str, int]:
        session = self.sessions.get(client_id)
        return dict(session._subs) if session is not None else {}

    # -- sessions -------------------------------------------------------------------------------
    def _attach(self, session: MemorySession) -> None:
        old = self.sessions.get(session.client_id)
        if old is not None:  # the newer connection takes the client id over; the old one's Will goes out
            # Mosquitto closes it without a DISCONNECT (other brokers send reason 0x8E "session taken over")
            old._lost(ConnectionClosedError("the broker closed the connection", by_broker=True), will=True)
        self.sessions[session.client_id] = session

    def _detach(self, session: MemorySession) -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    # -- routing --------------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: dict[str, Any]) -> int:
        """Route one message; returns the number of deliveries."""
        self.published += 1
        properties = {k: v for k, v in properties.items() if k != _TOPIC_ALIAS}
        if retain:
            if payload:
                self.retained[topic] = Message(topic, payload, qos, True, properties)
            else:
                self.retained.pop(topic, None)
        delivered = 0
        groups: dict[tuple[str, str], list[tuple[MemorySession, int]]] = {}
        for session in list(self.sessions.values()):
            for subscription, sub_qos in session._subs.items():
                group, topic_filter = _split_share(subscription)
                if not topic_matches(topic_filter, topic):
                    continue
                if group is None:
                    session._deliver(Message(topic, payload, min(qos, sub_qos), False, properties))
                    delivered += 1
                else:
                    groups.setdefault((group, topic_filter), []).append((session, sub_qos))
        for key, members in groups.items():
            turn = self._turns.get(key, 0)
            session, sub_qos = members[turn % len(members)]
            self._turns[key] = turn + 1
            session._deliver(Message(topic, payload, min(qos, sub_qos), False, properties))
            delivered += 1
        return delivered

    def _retained_for(self, topic_filter: str) -> list[Message]:
        return [m for t, m in self.retained.items() if topic_matches(topic_filter, t)]


@dataclass(eq=False)
class MemorySession:
    """One connection to a :class:`MemoryBroker`, with :class:`~aiflow_agents.mqtt.session.Session`'s interface."""

    broker: MemoryBroker
    client_id: str
    version: int = MQTT_5
    keepalive: int = 30
    will: Will | None = None
    on_message: Callable[[Message], None] = lambda m: None
    on_close: Callable[[ConnectionClosedError], None] | None = None
    connect_properties: dict[str, Any] = field(default_factory=dict)
    max_packet_size: int = 268_435_460
    receive_maximum: int = 65535

    def __post_init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._subs: dict[str, int] = {}
        self._paused = False
        self._held: deque[Message] = deque()
        self._open = True
        self.closed: asyncio.Future[ConnectionClosedError] = self._loop.create_future()
        self.connack = Connack(False, 0, {})
        self.connected_at = self._loop.time()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int = 0,
        *,
        client_id: str,
        version: int = MQTT_5,
        keepalive: int = 30,
        will: Will | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_close: Callable[[ConnectionClosedError], None] | None = None,
        connect_properties: dict[str, Any] | None = None,
        **_transport: Any,
    ) -> MemorySession:
        """Connect to the memory broker named ``host`` (``port``, TLS and credentials are ignored)."""
        broker = MemoryBroker.named(host)
        session = cls(
            broker,
            client_id,
            version,
            keepalive,
            will,
            on_message or (lambda m: None),
            on_close,
            dict(connect_properties or {}),
        )
        await asyncio.sleep(0)  # connecting yields to the loop, as a real one does
        broker._attach(session)
        return session

    @property
    def v5(self) -> bool:
        return self.version == MQTT_5

    @property
    def is_closed(self) -> bool:
        return not self._open

    # -- delivery -------------------------------------------------------------------------------
    def _deliver(self, message: Message) -> None:
        """Queue a delivery; it reaches ``on_message`` from the loop, as a socket read would, in order."""
        if not self.v5 and message.properties:
            message = Message(message.topic, message.payload, message.qos, message.retain, {})
        self._held.append(message)
        if len(self._held) == 1 and not self._paused:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        while self._held and not self._paused and self._open:
            message = self._held.popleft()
            try:
                self.on_message(message)
            except Exception:  # as Session: a failing callback never takes the connection down
                _log.exception("message callback failed", client=self.client_id, topic=message.topic)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._held:
                self._loop.call_soon(self._flush)

    # -- operations -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._open:
            raise ConnectionClosedError("not connected", unsent=True)

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
        """Publish; QoS 1/2 return the reason code on MQTT 5 (0, or 16 when nobody subscribes), else None."""
        if validate:
            check_publish(topic, properties)
        if qos not in (0, 1, 2):
            raise ValueError(f"bad QoS {qos}")
        self._check_open()
        if payload is None:
            data = b""
        elif isinstance(payload, str):
            data = payload.encode("utf-8")
        else:
            data = bytes(payload)  # the caller may reuse its buffer once we return
        props = dict(properties or {}) if self.v5 else {}
        delivered = self.broker._publish(topic, data, qos, retain, props)
        if qos == 0:
            return None
        await asyncio.sleep(0)  # the acknowledgement comes back through the loop
        self._check_open()
        if not self.v5:
            return None
        return 0 if delivered else NO_MATCHING_SUBSCRIBERS

    async def subscribe(self, subscriptions: list[tuple[str, int]], *, timeout: float | None = None) -> list[int]:
        for f, _ in subscriptions:
            problem = topic_filter_problem(f)
            if problem is not None:
                raise InvalidTopicError(f"invalid topic filter {f!r}: {problem}")
        self._check_open()
        await asyncio.sleep(0)
        self._check_open()
        codes = []
        for subscription, qos in subscriptions:
            if qos not in (0, 1, 2):
                raise AckError(f"subscribe refused ({subscription!r}: bad QoS {qos})", [0x80])
            self._subs[subscription] = qos
            codes.append(qos)
            _, topic_filter = _split_share(subscription)
            for m in self.broker._retained_for(topic_filter):  # shared ones too, as Mosquitto does
                self._deliver(Message(m.topic, m.payload, min(m.qos, qos), True, m.properties))
        return codes

    async def unsubscribe(self, filters: list[str], *, timeout: float | None = None) -> list[int]:
        self._check_open()
        codes = [0 if self._subs.pop(f, None) is not None else 0x11 for f in filters]
        await asyncio.sleep(0)
        return codes if self.v5 else []

    async def disconnect(self, reason_code: int = 0, *, timeout: float = 2.0) -> None:
        """Orderly DISCONNECT: the Will is discarded unless ``reason_code`` is 0x04."""
        if self._open:
            self._lost(
                ConnectionClosedError("disconnected by us", by_broker=False), will=reason_code == DISCONNECT_WITH_WILL
            )

    def abort(self) -> None:
        """Close without DISCONNECT: the broker publishes the Will."""
        if self._open:
            self._lost(ConnectionClosedError("aborted by us", by_broker=False), will=True)

    def _lost(self, error: ConnectionClosedError, *, will: bool) -> None:
        if not self._open:
            return
        self._open = False
        self._held.clear()
        self._subs.clear()
        self.broker._detach(self)
        if will and self.will is not None:
            w = self.will
            self.broker._publish(w.topic, bytes(w.payload), w.qos, w.retain, dict(w.properties) if self.v5 else {})
        if not self.closed.done():
            self.closed.set_result(error)
        if self.on_close is not None:
            self._loop.call_soon(self.on_close, error)
