"""One resilient MQTT connection: our own client (:mod:`aiflow_agents.mqtt`), MQTT 5 with 3.1.1 fallback,
reconnect with backoff and failover across the members of a broker URL list.

Reconnection story: the connection runs in a background task. Each attempt connects to the next member of
the URL list (``mqtt://a:1883,mqtt://b:1883`` rotates a → b → a ...), with ``protocol=auto`` first as MQTT 5
and, when that member refuses it (CONNACK 0x84 / 3.1.1 return code 1) or closes the connection without a
CONNACK (RabbitMQ 3.10 does), again at once as 3.1.1 (remembered per member). When the broker goes away every
``on_disconnect`` hook runs (clients fail their in-flight requests with :class:`ConnectionLostError`), then the
task retries with exponential backoff and jitter; the backoff restarts only after a connection that stayed up
for a while, so a broker that accepts and then drops us is not hammered. After a reconnect it restores every
subscription and runs the ``on_connect`` hooks (nodes republish presence). Publishes made while disconnected
wait for the next connection up to their timeout.

A refusal that retrying cannot fix (wrong user name or password, not authorised, a TLS certificate that does
not verify, a missing CA file) makes :meth:`Connection.start` fail at once with a clear
:class:`BrokerUnavailableError` instead of waiting out its timeout.

Publishes that must never be retried: a topic or string property the broker would refuse (U+0000, control
characters, wildcards, ...) raises :class:`InvalidTopicError` at once and is never sent. A QoS 1 publish that
was in flight when the broker dropped the connection right after it was sent is retried once after the
reconnect; if the connection drops right after it again, it is taken as the cause (a publish the broker
refuses by rules beyond ours), dropped, logged and counted in ``poisoned_publishes``, never retried again.

Client id clashes: when the broker says another connection took our session over (MQTT 5 DISCONNECT 0x8E),
or on 3.1.1 closes the connection soon after each successful connect several times in a row, a warning
names the client id, ``takeovers`` counts it, and the connection backs off (growing up to a minute) instead
of kicking the other client off in turn.

Incoming queue policy (backpressure): messages are read in the socket's callback and appended to a bounded
queue that one dispatcher task drains, awaiting each handler in turn (no task per message). When the queue
holds ``max_queued_incoming`` messages, reading from the socket pauses until it has drained to half, so a
flood waits in TCP buffers and in the broker's per-client queue, not in this process; messages that arrive
in the same read beyond the bound are discarded, counted in ``dropped_incoming`` and logged (a dropped
request's sender sees a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from .broker import BrokerURL
from .errors import BrokerUnavailableError
from .mqtt import (
    MQTT_5,
    MQTT_311,
    AckError,
    ConnectionClosedError,
    ConnectRefusedError,
    InvalidTopicError,
    MemorySession,
    Message,
    Session,
    Will,
    check_publish,
    reason_name,
)

MessageHandler = Callable[[Message], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

_log = structlog.get_logger("aiflow.connection")

TAKEOVER = 0x8E  # MQTT 5 DISCONNECT reason: "session taken over"
_STABLE_AFTER = 10.0  # a connection that lived this long resets the backoff
_SHORT_LIVED = 2.0  # a connection the broker closed within this after CONNACK counts towards a suspected clash
_CLASH_STREAK = 3  # ... this many times in a row (MQTT 3.1.1 has no reason code to say so)
_SUSPECT_WINDOW = 1.0  # a drop within this many seconds of sending a publish makes that publish a suspect
_CONNECT_TIMEOUT = 10.0


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
_AUTH_REFUSED_V5 = {0x86, 0x87, 0x8A, 0x8C}


_CLIENT_CERT_REFUSED = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
}


def _definitive(error: BaseException) -> str | None:
    """Why retrying cannot help, when that is so (bad credentials, TLS verification, config)."""
    if isinstance(error, ConnectRefusedError):
        rc = error.reason_code
        if error.version == MQTT_311 or rc < 0x80:
            if rc in _AUTH_REFUSED_V311:
                return f"the broker refused the credentials ({_AUTH_REFUSED_V311[rc]}); check user name and password"
            return None
        if rc in _AUTH_REFUSED_V5:
            return f"the broker refused the credentials ({reason_name(rc)}); check user name and password"
        return None
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({e.verify_message or e}); check the CA file and host name"
        if isinstance(e, ssl.SSLError) and e.reason in _CLIENT_CERT_REFUSED:
            return f"the broker refused our TLS client certificate or needs one ({e.reason}); check cert= and key="
        e = e.__cause__ or e.__context__
    return None


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching (``+`` one level, ``#`` the rest; wildcards never match a leading ``$``)."""
    if topic_filter == topic:
        return True
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def _filter_of(subscription: str) -> str:
    """The topic filter a (possibly shared) subscription matches."""
    if subscription.startswith("$share/"):
        return subscription.split("/", 2)[2]
    return subscription


def _ssl_context(url: BrokerURL) -> ssl.SSLContext | None:
    if not url.tls:
        return None
    context = ssl.create_default_context(cafile=url.ca_file)
    if url.cert_file:
        context.load_cert_chain(url.cert_file, url.key_file)
    if url.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connection:
    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str,
        will: Will | None = None,
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
        self._max_queued = max(1, max_queued_incoming)
        self._op_timeout = op_timeout
        self._members = url.members()
        self._member = 0  # index into _members of the current (or next) attempt
        self._versions: dict[int, int] = {}  # member index -> protocol that member speaks (auto: learnt)
        self._version = MQTT_311 if url.protocol == "3.1.1" else MQTT_5
        self._subs: dict[str, int] = {}
        self._routes: list[tuple[str, MessageHandler]] = []
        self._match_cache: dict[str, list[MessageHandler]] = {}
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Hook] = []
        self._session: Session | MemorySession | None = None
        self._inbox: deque[Message] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_error: BaseException | None = None
        self._fatal: str | None = None
        self.connects = 0
        self.dropped_incoming = 0
        self.poisoned_publishes = 0
        self.takeovers = 0
        self.log = structlog.get_logger("aiflow.connection").bind(client=client_id)

    # -- configuration ------------------------------------------------------------------------
    @property
    def is_v5(self) -> bool:
        return self._version == MQTT_5

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> dict[str, int]:
        return dict(self._subs)

    @property
    def broker(self) -> BrokerURL:
        """The member of the URL list this connection uses (or tries) now."""
        return self._members[self._member % len(self._members)]

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
            self._inbox.clear()
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
        """Disconnect in order (the broker then discards the Will) and end the reconnect loop."""
        self._stopping = True
        session = self._session
        if session is not None and not session.is_closed:
            with contextlib.suppress(Exception):
                await session.disconnect(timeout=2.0)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._connected.clear()
        self._session = None

    async def __aenter__(self) -> Connection:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _incoming(self, message: Message) -> None:
        """The session's per-message callback (in the socket's read callback): queue and wake the dispatcher."""
        inbox = self._inbox
        if len(inbox) >= self._max_queued:
            self._dropped()
            return
        inbox.append(message)
        if len(inbox) >= self._max_queued and self._session is not None:
            self._session.pause_reading()
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def _closed(self, error: ConnectionClosedError) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def _dropped(self) -> None:
        self.dropped_incoming += 1
        n = self.dropped_incoming
        if n == 1 or n % 1000 == 0:
            self.log.warning("incoming queue full: messages dropped", dropped=n, bound=self._max_queued)

    async def _connect(self, index: int) -> Session | MemorySession:
        """One attempt on member ``index``, falling back to MQTT 3.1.1 at once where ``auto`` allows it."""
        url = self._members[index]
        auto = url.protocol == "auto"
        version = self._versions.get(index, MQTT_311 if url.protocol == "3.1.1" else MQTT_5)
        context = None
        try:
            context = _ssl_context(url)
        except OSError as e:  # e.g. a CA/cert file that is missing or not PEM (ssl.SSLError)
            self._fatal = f"bad TLS settings: {e}"
            raise
        while True:
            try:
                session = await (MemorySession if url.in_memory else Session).connect(
                    url.host,
                    url.port,
                    ssl_context=context,
                    server_hostname=url.host,
                    timeout=min(self._op_timeout, _CONNECT_TIMEOUT),
                    client_id=self.client_id,
                    version=version,
                    keepalive=self._keepalive,
                    username=url.username,
                    password=url.password,
                    will=self._will,
                    on_message=self._incoming,
                    on_close=self._closed,
                )
            except ConnectRefusedError as e:
                if auto and version == MQTT_5 and e.reason_code in (0x84, 1):
                    self.log.info("broker refused MQTT 5, falling back to 3.1.1", broker=str(url))
                    version = self._versions[index] = MQTT_311
                    continue
                raise
            except ConnectionClosedError as e:
                if auto and version == MQTT_5 and e.before_connack:
                    self.log.info("broker closed an MQTT 5 CONNECT unanswered, trying 3.1.1", broker=str(url))
                    version = self._versions[index] = MQTT_311
                    continue
                if auto and e.before_connack and index in self._versions:
                    del self._versions[index]  # 3.1.1 did no better: try MQTT 5 again next time
                raise
            self._version = version
            return session

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delays = self._backoff.delays()
        takeover_delay = self._backoff.maximum
        short_lived = 0
        while not self._stopping:
            index = self._member % len(self._members)
            url = self._members[index]
            wait: float | None = None
            session: Session | MemorySession | None = None
            try:
                session = await self._connect(index)
                self._session = session
                if self._subs:
                    subs = list(self._subs.items())
                    try:
                        await session.subscribe(subs, timeout=self._op_timeout)
                    except AckError as e:
                        # Connected but deaf (a NATS member whose JetStream is not back yet refuses every
                        # SUBSCRIBE with 0x80): a failed attempt, so we back off and retry or fail over.
                        raise ConnectionClosedError(f"broker refused our subscriptions on connect: {e}") from e
                self.connects += 1
                self._last_error = None
                self._fatal = None
                self._connected.set()
                if self.connects > 1:
                    self.log.info("reconnected", broker=str(url), attempt=self.connects)
                for hook in list(self._on_connect):
                    await self._safe(hook, "on_connect")
                await self._receive(session)
            except ConnectionClosedError as e:
                self._last_error = e
                self._fatal = _definitive(e)
                if not self._stopping:
                    self.log.warning(
                        "connection lost" if session is not None else "connect failed", broker=str(url), error=str(e)
                    )
            except ConnectRefusedError as e:
                self._last_error = e
                self._fatal = _definitive(e)
                self.log.warning("connect failed", broker=str(url), error=str(e))
            except (OSError, TimeoutError) as e:  # includes ssl.SSLError
                self._last_error = e
                self._fatal = self._fatal or _definitive(e)
                self.log.warning("connect failed", broker=str(url), error=str(e) or type(e).__name__)
            except Exception as e:  # the reconnect loop must outlive any surprise
                self._last_error = e
                self.log.exception("connection loop error", broker=str(url))
            finally:
                was_connected = self._connected.is_set()
                self._connected.clear()
                self._session = None
                if session is not None and not session.is_closed:
                    session.abort()
                if was_connected:
                    for hook in list(self._on_disconnect):
                        await self._safe(hook, "on_disconnect")
            if self._stopping:
                break
            # -- how long to wait before the next attempt (and on which member) ---------------------
            if session is not None and session.closed.done():
                error = session.closed.result()
                lived = loop.time() - session.connected_at
                taken_over = error.reason_code == TAKEOVER
                by_broker = error.reason_code is not None or error.by_broker
                short_lived = short_lived + 1 if (by_broker and lived < _SHORT_LIVED) else 0
                if not taken_over and short_lived >= _CLASH_STREAK:
                    taken_over = True
                if taken_over:
                    self.takeovers += 1
                    self.log.warning(
                        "another client with the same client id took the session over: backing off"
                        if error.reason_code == TAKEOVER
                        else "the broker keeps closing the connection right after connecting: another client "
                        "may be using the same client id; backing off",
                        client_id=self.client_id,
                        broker=str(url),
                        takeovers=self.takeovers,
                        retry_in=round(takeover_delay, 1),
                    )
                    wait = takeover_delay
                    takeover_delay = min(60.0, takeover_delay * 2)
                elif lived >= _STABLE_AFTER:
                    delays = self._backoff.delays()
                    takeover_delay = self._backoff.maximum
                    short_lived = 0
            self._member += 1
            if len(self._members) > 1:
                self.log.info("next broker", broker=str(self.broker))
            await asyncio.sleep(max(next(delays), wait or 0.0))

    async def _receive(self, session: Session | MemorySession) -> None:
        """Dispatch queued messages, each handler awaited in turn, until the connection drops (see module doc)."""
        loop = asyncio.get_running_loop()
        inbox = self._inbox
        resume_at = self._max_queued // 2
        while True:
            while inbox:
                message = inbox.popleft()
                if len(inbox) <= resume_at:
                    session.resume_reading()
                await self._dispatch(message)
            if session.closed.done():
                raise session.closed.result()
            self._wakeup = loop.create_future()
            await self._wakeup
            self._wakeup = None

    async def _safe(self, hook: Hook, what: str) -> None:
        try:
            await hook()
        except ConnectionClosedError:
            raise
        except Exception:
            self.log.exception(f"{what} hook failed")

    def _handlers(self, topic: str) -> list[MessageHandler]:
        """The handlers whose filter matches ``topic``, memoised per topic."""
        handlers = self._match_cache.get(topic)
        if handlers is None:
            handlers = [h for f, h in self._routes if _matches(f, topic)]
            if len(self._match_cache) >= 4096:  # e.g. one reply topic per client: stay bounded
                self._match_cache.clear()
            self._match_cache[topic] = handlers
        return handlers

    async def _dispatch(self, message: Message) -> None:
        for handler in self._handlers(message.topic):
            try:
                await handler(message)
            except Exception:
                # A raising handler must never take the connection down.
                self.log.exception("message handler failed", topic=message.topic)

    # -- operations ---------------------------------------------------------------------------
    async def subscribe(self, subscription: str, qos: int = 1) -> None:
        """Subscribe now if connected (raising :class:`AckError` if the broker refuses) and after every reconnect."""
        self._subs[subscription] = qos
        session = self._session
        if session is not None and self._connected.is_set():
            try:
                await session.subscribe([(subscription, qos)], timeout=self._op_timeout)
            except ConnectionClosedError:
                pass  # restored on reconnect
            except (AckError, InvalidTopicError):
                self._subs.pop(subscription, None)
                raise

    async def unsubscribe(self, subscription: str) -> None:
        self._subs.pop(subscription, None)
        session = self._session
        if session is not None and self._connected.is_set():
            with contextlib.suppress(ConnectionClosedError, AckError, TimeoutError):
                await session.unsubscribe([subscription], timeout=self._op_timeout)

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str | None,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int | None:
        """Publish, waiting for a connection if needed; retried across a reconnect until ``timeout``.

        Returns the PUBACK reason code for QoS 1/2 on MQTT 5 (0 success, 16 "no matching subscribers"),
        otherwise None. Raises :class:`InvalidTopicError` at once for a topic or string property the broker
        would refuse (never sent), :class:`BrokerUnavailableError` when not done within ``timeout``. A publish
        the broker dropped the connection for twice is dropped (see module doc) and returns None."""
        check_publish(topic, properties)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self._op_timeout)
        suspected = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerUnavailableError(f"could not publish to {topic!r}: not connected to {self.url}")
            session = self._session
            if session is None or not self._connected.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._connected.wait(), remaining)
                continue
            sent = loop.time()
            try:
                return await session.publish(
                    topic, payload, qos, retain, properties if self.is_v5 else None, timeout=remaining, validate=False
                )
            except ConnectionClosedError as e:
                if not e.unsent and qos > 0 and loop.time() - sent <= _SUSPECT_WINDOW:
                    suspected += 1
                    if suspected >= 2:
                        self.poisoned_publishes += 1
                        self.log.error(
                            "publish dropped: the broker closed the connection right after it twice",
                            topic=topic,
                            size=len(payload or b""),
                            error=str(e),
                            poisoned=self.poisoned_publishes,
                        )
                        return None
                await asyncio.sleep(0.01 if e.unsent else 0)
            except TimeoutError as e:
                raise BrokerUnavailableError(f"publish to {topic!r} failed: no acknowledgement in time") from e
