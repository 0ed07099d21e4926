"""One resilient MQTT connection: our own client (:mod:`aiflow_agents.mqtt`), MQTT 5 with 3.1.1 fallback,
reconnect with backoff and failover across the members of a broker URL list.

Reconnection story: the connection runs in a background task. Each attempt connects to the next member of
the URL list (``mqtt://a:1883,mqtt://b:1883`` rotates a → b → a ...), with ``protocol=auto`` first as MQTT 5
and, when that member refuses it (CONNACK 0x84 / 3.1.1 return code 1) or closes the connection without a
CONNACK (RabbitMQ 3.10 does), again at once as 3.1.1. A refusal is remembered per member for good; a close
only when 3.1.1 then succeeds, and MQTT 5 is tried again on the reconnect after a stable connection (a
restarting or full broker closes unanswered too, and $share and reason codes must not be lost silently).
When the broker goes away the session's close callback marks the connection down at once and wakes the
task; every ``on_disconnect`` hook runs once (clients fail their in-flight requests with
:class:`ConnectionLostError`; these hooks must not publish), then the task retries with exponential backoff
and jitter; the backoff restarts only after a connection that stayed up for a while, so a broker that accepts
and then drops us is not hammered. After a reconnect it restores every subscription (one the broker now
refuses, e.g. after an ACL change, is dropped, logged and counted in ``refused_subscriptions``; only when all
are refused is the attempt failed: connected but deaf) and runs the ``on_connect`` hooks in a task of their
own (nodes republish presence), cancelled if that connection is lost first. Publishes made while
disconnected wait for the next connection up to their timeout. The reconnect task never awaits a message
handler or a hook that may publish, so a handler blocked on a publish cannot keep the connection down.

Logging tells the two failures apart. "connection lost" (a warning) is said once for a connection that was up
and went down. An attempt that never came up is "connect failed: cannot reach broker URL, retrying in Xs": while
:meth:`Connection.start` waits with a timeout (clients, CLI commands), at debug only, since the
:class:`BrokerUnavailableError` it then raises names the broker, the attempts and the last error once; otherwise
(a node waiting for its broker, reconnects) the first failure of a streak is a warning (info after "connection
lost") and then one line per 30 s at most, the attempts between at debug.

A refusal that retrying cannot fix (wrong user name or password, not authorised, a TLS certificate that does
not verify, a missing CA file) makes :meth:`Connection.start` fail at once with a clear
:class:`BrokerUnavailableError` instead of waiting out its timeout.

Publishes that must never be retried: a topic or string property the broker would refuse (U+0000, control
characters, wildcards, ...) raises :class:`InvalidTopicError` at once and is never sent. A QoS 1 publish that
was the last packet written when the broker dropped the connection right after it is retried once after the
reconnect; if that happens again, it is taken as the cause (a publish the broker refuses by rules beyond
ours), dropped, logged, counted in ``poisoned_publishes`` and raises :class:`PublishRejectedError`, never
retried again. Other publishes in flight are innocent and retried normally; nothing is blamed while a
client-id takeover streak explains the closes.

Client id clashes: when the broker says another connection took our session over (MQTT 5 DISCONNECT 0x8E),
or on 3.1.1 closes the connection soon after each successful connect several times in a row, a warning
names the client id, ``takeovers`` counts it, and the connection backs off (growing up to a minute) instead
of kicking the other client off in turn.

Incoming queue policy (backpressure): messages are read in the socket's callback and appended to a bounded
queue that one long-lived dispatcher task drains across connections, awaiting each handler in turn (no task
per message). When the queue holds ``max_queued_incoming`` messages or ``max_queued_incoming_bytes`` of
payload, reading from the socket pauses until it has drained to half, so a flood waits in TCP buffers and in
the broker's per-client queue, not in this process (the byte bound is exceeded by one read at most); messages
that arrive in the same read beyond the count bound are discarded, counted in ``dropped_incoming`` and logged
(a dropped request's sender sees a timeout). On MQTT 5, ``max_packet_size`` is announced in CONNECT
(MaximumPacketSize), so the broker drops larger messages for us instead of sending them.
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
    topic_filter_problem,
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
_FAILURE_LOG_EVERY = 30.0  # a service waiting for its broker logs a failed attempt this often at most (else debug)
_V5_PROBE_TIMEOUT = 3.0  # protocol=auto: an MQTT 5 CONNECT unanswered this long is retried as 3.1.1
MAX_PACKET = 268_435_460  # the protocol's largest packet (remaining length 268,435,455 + 5 header bytes)
_HEADER_ROOM = 64 * 1024  # MaximumPacketSize we announce = the largest frame we accept + room for topic/properties


def incoming_limits(max_frame_bytes: int, max_queued_bytes: int | None) -> dict[str, int]:
    """Connection arguments for a node: the MQTT 5 MaximumPacketSize we announce (the largest frame we accept
    plus room for topic and properties) and the incoming queue's byte bound (the node's ``max_queued_bytes``)."""
    return {
        "max_packet_size": min(MAX_PACKET, max_frame_bytes + _HEADER_ROOM),
        "max_queued_incoming_bytes": max_queued_bytes or 64 << 20,
    }


class PublishRejectedError(BrokerUnavailableError):
    """The broker closed the connection right after this publish twice (it refuses it by rules beyond ours,
    e.g. a size limit MQTT 3.1.1 cannot announce): dropped, never retried again."""

    code = "publish_rejected"


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
        max_queued_incoming_bytes: int = 64 << 20,
        max_packet_size: int | None = None,
        op_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self._will = will
        self._keepalive = keepalive
        self._backoff = backoff
        self._max_queued = max(1, max_queued_incoming)
        self._max_queued_bytes = max(1, max_queued_incoming_bytes)
        self._max_packet_size = max_packet_size
        self._inbox_bytes = 0
        self._op_timeout = op_timeout
        self._members = url.members()
        self._member = 0  # index into _members of the current (or next) attempt
        self._versions: dict[int, int] = {}  # member index -> protocol that member speaks (auto: learnt)
        self._retry_v5: set[int] = set()  # members learnt as 3.1.1 only from a close: try MQTT 5 again later
        self._version = MQTT_311 if url.protocol == "3.1.1" else MQTT_5
        self._subs: dict[str, int] = {}
        self._retries: set[asyncio.Task[None]] = set()  # background SUBSCRIBEs of filters a broker refused
        self._routes: list[tuple[str, MessageHandler]] = []
        self._match_cache: dict[str, list[MessageHandler]] = {}
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Hook] = []
        self._session: Session | MemorySession | None = None
        self._inbox: deque[Message] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._short_lived = 0  # connections in a row the broker closed right after CONNACK
        self._stopping = False
        self._last_error: BaseException | None = None
        self._fatal: str | None = None
        self._starting = False  # a start() with a timeout waits: it reports a failure itself, attempts log at debug
        self._failures = 0  # failed attempts in a row (never up, or since the last connection was lost)
        self._failure_logged = 0.0  # loop time of the last "connect failed" line above debug
        self.connects = 0
        self.dropped_incoming = 0
        self.poisoned_publishes = 0
        self.takeovers = 0
        self.refused_subscriptions = 0
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
        """Start the reconnect loop; with ``wait``, until connected. With a ``timeout`` the caller gets one
        :class:`BrokerUnavailableError` naming the broker and the last error, and the failed attempts before it
        log at debug only (a wrong port is one line, not one per retry); without one (a service waiting for its
        broker) each failed attempt streak logs ``connect failed: cannot reach broker ...`` (see ``_run``)."""
        quiet = wait and timeout is not None
        if self._task is None:
            self._stopping = False
            self._fatal = None
            self._failures = 0
            self._inbox.clear()
            self._inbox_bytes = 0
            self._starting = quiet
            self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
            self._dispatcher = asyncio.create_task(self._dispatch_loop(), name=f"mqtt-dispatch-{self.client_id}")
        if wait:
            self._starting = quiet
            try:
                await self.wait_connected(timeout)
            except BrokerUnavailableError:
                await self.stop()  # a failed start leaves no reconnect loop behind
                raise
            finally:
                self._starting = False

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
                tries = f" ({self._failures} attempts)" if self._failures > 1 else ""
                raise BrokerUnavailableError(
                    f"could not connect to broker {self.url} within {timeout:.3g}s{tries}{why}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.05 if left is None else min(0.05, left))

    async def stop(self) -> None:
        """Disconnect in order (the broker then discards the Will) and end the reconnect loop."""
        self._stopping = True
        session = self._session
        if session is not None and not session.is_closed:
            with contextlib.suppress(Exception):
                await session.disconnect(timeout=2.0)
        for task in (self._task, self._dispatcher, *self._retries):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._dispatcher = None
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
        self._inbox_bytes += len(message.payload)
        if len(inbox) >= self._max_queued or self._inbox_bytes >= self._max_queued_bytes:
            session = self._session
            if session is not None:
                session.pause_reading()  # the rest of this read still arrives: at most one read beyond the bound
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def _closed(self, error: ConnectionClosedError) -> None:
        """The session's close callback: mark the connection down at once (publishes then wait for the next
        one instead of retrying the dead session) and wake the reconnect loop, whatever handlers are doing."""
        session = self._session
        if session is None or not session.closed.done() or session.closed.result() is not error:
            return  # a session that never became ours (closed before CONNACK) or an old one
        self._connected.clear()
        self._session = None
        if session.connected_at:
            lived = asyncio.get_running_loop().time() - session.connected_at
            by_broker = error.reason_code is not None or error.by_broker
            self._short_lived = self._short_lived + 1 if (by_broker and lived < _SHORT_LIVED) else 0

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
        fell_back = False
        while True:
            props: dict[str, Any] = {}
            probing = auto and version == MQTT_5 and index not in self._versions
            if version == MQTT_5 and self._max_packet_size is not None:
                props["MaximumPacketSize"] = self._max_packet_size  # the broker drops larger messages for us
            try:
                session = await (MemorySession if url.in_memory else Session).connect(
                    url.host,
                    url.port,
                    ssl_context=context,
                    server_hostname=url.host,
                    # a broker that does not speak MQTT 5 may neither refuse nor close (amqtt reads a v5
                    # CONNECT with a Will as a shorter packet and waits for more): probe briefly in auto
                    timeout=min(self._op_timeout, _V5_PROBE_TIMEOUT if probing else _CONNECT_TIMEOUT),
                    client_id=self.client_id,
                    version=version,
                    keepalive=self._keepalive,
                    username=url.username,
                    password=url.password,
                    will=self._will,
                    on_message=self._incoming,
                    on_close=self._closed,
                    connect_properties=props,
                )
            except ConnectRefusedError as e:
                if auto and version == MQTT_5 and e.reason_code in (0x84, 1):
                    self.log.info("broker refused MQTT 5, falling back to 3.1.1", broker=str(url))
                    version = self._versions[index] = MQTT_311  # an explicit refusal: remembered for good
                    self._retry_v5.discard(index)
                    continue
                raise
            except TimeoutError:
                if probing:
                    self.log.info("no answer to an MQTT 5 CONNECT, trying 3.1.1", broker=str(url))
                    version = MQTT_311
                    fell_back = True
                    continue
                raise
            except ConnectionClosedError as e:
                if auto and version == MQTT_5 and e.before_connack:
                    # A restarting broker or a full one closes unanswered too: remembered only if 3.1.1 works.
                    self.log.info("broker closed an MQTT 5 CONNECT unanswered, trying 3.1.1", broker=str(url))
                    version = MQTT_311
                    fell_back = True
                    continue
                if auto and e.before_connack and index in self._versions and index in self._retry_v5:
                    del self._versions[index]  # 3.1.1 did no better: try MQTT 5 again next time
                    self._retry_v5.discard(index)
                raise
            if fell_back:
                self._versions[index] = MQTT_311
                self._retry_v5.add(index)  # retried as MQTT 5 after a stable connection (see _run)
            self._version = version
            return session

    async def _run(self) -> None:
        """Connect, restore subscriptions, run the hooks, wait for the loss, back off, again. Never awaits a
        message handler (the dispatcher task does), so a handler blocked on a publish cannot stall a reconnect."""
        loop = asyncio.get_running_loop()
        delays = self._backoff.delays()
        takeover_delay = self._backoff.maximum
        while not self._stopping:
            index = self._member % len(self._members)
            url = self._members[index]
            wait: float | None = None
            session: Session | MemorySession | None = None
            up = False
            hooks: asyncio.Task[None] | None = None
            failed = False  # this attempt never came up (as opposed to a connection that was up and was lost)
            try:
                session = await self._connect(index)
                self._session = session
                await self._restore(session)
                if session.closed.done():
                    raise session.closed.result()
                self.connects += 1
                self._last_error = None
                self._fatal = None
                self._failures = 0
                self._connected.set()
                up = True
                if self.connects > 1:
                    self.log.info("reconnected", broker=str(url), attempt=self.connects)
                if self._inbox and self._wakeup is not None and not self._wakeup.done():
                    self._wakeup.set_result(None)
                # on_connect hooks may publish: a task of their own, cancelled if this connection is lost first
                hooks = asyncio.create_task(self._run_hooks(self._on_connect, "on_connect"))
                raise await asyncio.shield(session.closed)
            except ConnectionClosedError as e:
                self._last_error = e
                self._fatal = _definitive(e)
                if up and not self._stopping:  # only a connection that was up can be lost
                    self.log.warning("connection lost", broker=str(url), error=str(e))
                failed = not up
            except ConnectRefusedError as e:
                self._last_error = e
                self._fatal = _definitive(e)
                failed = True
            except (OSError, TimeoutError) as e:  # includes ssl.SSLError
                self._last_error = e
                self._fatal = self._fatal or _definitive(e)
                failed = True
            except Exception as e:  # the reconnect loop must outlive any surprise
                self._last_error = e
                self.log.exception("connection loop error", broker=str(url))
            finally:
                if self._session is session:
                    self._connected.clear()
                    self._session = None
                if session is not None and not session.is_closed:
                    session.abort()
                if hooks is not None and not hooks.done():
                    hooks.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await hooks
                if up:  # once per lost connection; these hooks must not publish (nothing would carry it)
                    await self._run_hooks(self._on_disconnect, "on_disconnect")
            if self._stopping:
                break
            # -- how long to wait before the next attempt (and on which member) ---------------------
            if up and session is not None and session.closed.done():
                error = session.closed.result()
                lived = loop.time() - session.connected_at
                taken_over = error.reason_code == TAKEOVER or self._short_lived >= _CLASH_STREAK
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
                    self._short_lived = 0
                    if index in self._retry_v5:  # learnt 3.1.1 from a close that may have been transient
                        self._retry_v5.discard(index)
                        self._versions.pop(index, None)
            delay = max(next(delays), wait or 0.0)
            if failed:
                self._failed_attempt(url, delay)
            self._member += 1
            if len(self._members) > 1:
                (self.log.debug if self._starting else self.log.info)("next broker", broker=str(self.broker))
            await asyncio.sleep(delay)

    def _failed_attempt(self, url: BrokerURL, retry_in: float) -> None:
        """Log an attempt that never came up. Not "connection lost": there was no connection. While a
        ``start`` with a timeout waits, at debug (its error says it all, once); otherwise the first failure of a
        streak (a warning if we never connected, info after a "connection lost" warning), then one line per 30 s
        at most (the attempts between at debug), each naming the broker, the error and the next attempt."""
        self._failures += 1
        error = self._last_error
        fields: dict[str, Any] = {
            "broker": str(url),
            "error": (str(error) or type(error).__name__) if error is not None else "?",
            "attempts": self._failures,
        }
        if self._fatal:
            fields["why"] = self._fatal
        what = f"broker {url} refused us" if isinstance(error, ConnectRefusedError) else f"cannot reach broker {url}"
        message = f"connect failed: {what}, retrying in {retry_in:.1f}s"
        now = asyncio.get_running_loop().time()
        if self._starting or (self._failures > 1 and now - self._failure_logged < _FAILURE_LOG_EVERY):
            self.log.debug(message, **fields)
            return
        self._failure_logged = now
        log = self.log.warning if (self.connects == 0 and self._failures == 1) or self._fatal else self.log.info
        log(message, **fields)

    async def _restore(self, session: Session | MemorySession) -> None:
        """Subscribe again after a reconnect. A filter the broker now refuses is kept and retried in the
        background with backoff (a NATS member whose JetStream is coming back refuses some SUBSCRIBEs with 0x80
        for a while; an ACL change refuses it for good, which costs one SUBSCRIBE per 30 s), logged and counted;
        only when every one is refused is the connection failed (connected but deaf)."""
        if not self._subs:
            return
        subs = list(self._subs.items())
        try:
            await session.subscribe(subs, timeout=self._op_timeout)
            return
        except AckError as e:
            codes = e.reason_codes
            why = str(e)
            if len(codes) != len(subs):
                raise ConnectionClosedError(f"broker refused our subscriptions on connect: {e}") from e
        refused = [f for (f, _), c in zip(subs, codes, strict=True) if c >= 0x80]
        if len(refused) == len(subs):
            raise ConnectionClosedError(f"broker refused all our subscriptions on connect: {why}")
        self.refused_subscriptions += len(refused)
        self.log.error(
            "the broker refused subscriptions after a reconnect: retrying them",
            refused=refused,
            refused_subscriptions=self.refused_subscriptions,
        )
        task = asyncio.get_running_loop().create_task(self._retry_refused(session, refused))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry_refused(self, session: Session | MemorySession, refused: list[str]) -> None:
        """Subscribe ``refused`` again on this session, 0.5 s then doubling up to 30 s, until it takes them, the
        filter is unsubscribed, or the session ends (a new one restores every filter anyway)."""
        delay = 0.5
        while refused and not session.closed.done():
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)
            wanted = [(f, self._subs[f]) for f in refused if f in self._subs]
            if not wanted or session.closed.done():
                return
            try:
                await session.subscribe(wanted, timeout=self._op_timeout)
                codes = [0] * len(wanted)
            except AckError as e:
                codes = e.reason_codes if len(e.reason_codes) == len(wanted) else [0x80] * len(wanted)
            except (ConnectionClosedError, TimeoutError):
                return
            refused = [f for (f, _), c in zip(wanted, codes, strict=True) if c >= 0x80]
            taken = [f for (f, _), c in zip(wanted, codes, strict=True) if c < 0x80]
            if taken:
                self.log.info("a refused subscription was taken on retry", restored=taken)

    async def _run_hooks(self, hooks: list[Hook], what: str) -> None:
        for hook in list(hooks):
            await self._safe(hook, what)

    async def _dispatch_loop(self) -> None:
        """Dispatch queued messages, each handler awaited in turn, across connections (see module doc)."""
        loop = asyncio.get_running_loop()
        inbox = self._inbox
        resume_count = self._max_queued // 2
        resume_bytes = self._max_queued_bytes // 2
        while True:
            while inbox:
                message = inbox.popleft()
                self._inbox_bytes -= len(message.payload)
                if len(inbox) <= resume_count and self._inbox_bytes <= resume_bytes:
                    session = self._session
                    if session is not None:
                        session.resume_reading()
                await self._dispatch(message)
            self._wakeup = loop.create_future()
            await self._wakeup
            self._wakeup = None

    async def _safe(self, hook: Hook, what: str) -> None:
        try:
            await hook()
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
        """Subscribe now if connected (raising :class:`AckError` if the broker refuses) and after every reconnect.

        An invalid filter raises :class:`InvalidTopicError` at once and is never stored (it would make every
        reconnect fail)."""
        problem = topic_filter_problem(subscription)
        if problem is not None:
            raise InvalidTopicError(f"invalid topic filter {subscription!r}: {problem}")
        if qos not in (0, 1, 2):
            raise ValueError(f"bad QoS {qos}")
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
        would refuse (never sent), :class:`BrokerUnavailableError` when not done within ``timeout``, and
        :class:`PublishRejectedError` (a :class:`BrokerUnavailableError`) for a publish the broker dropped the
        connection for twice, right after it was the last packet we wrote (see module doc)."""
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
                if (
                    e.last_packet  # the last packet we wrote: other publishes in flight are innocent
                    and qos > 0
                    and loop.time() - sent <= _SUSPECT_WINDOW
                    and e.reason_code != TAKEOVER
                    and self._short_lived < _CLASH_STREAK  # a client-id clash closes us whatever we send
                ):
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
                        raise PublishRejectedError(
                            f"publish to {topic!r} dropped: the broker closed the connection right after it twice"
                        ) from e
                await asyncio.sleep(0.01 if e.unsent else 0)
            except TimeoutError as e:
                raise BrokerUnavailableError(f"publish to {topic!r} failed: no acknowledgement in time") from e
