"""Request/reply over the bus. A request never hangs: it returns the reply or raises a typed error
naming the agent (absent, timed out, failed, connection lost).

Replies are matched by correlation id, once: a second reply under the same id (a QoS 1
redelivery, a replica answering twice) is dropped and counted in ``stats``. With ``signing_key``
every frame sent is signed and a reply that is not signed with the deployment's key is dropped
(counted, logged) without failing the request: a forged reply cannot abort a genuine one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import aiomqtt
import structlog

from protocols import (
    DEFAULT_LIMITS,
    FLAG_SIGNED,
    PREAMBLE_SIZE,
    TRAILER_SIZE,
    Envelope,
    ErrorInfo,
    Kind,
    Limits,
    ProtocolError,
    SignatureError,
    SigningKeyLike,
    Topics,
    UnsignedFrameError,
    as_keyring,
    decode,
    encode,
    mqtt5_properties,
    new_id,
    peek_header,
)

from .broker import BrokerURL, broker_from_env
from .connection import Connection
from .errors import (
    AgentUnavailableError,
    AiflowError,
    BrokerUnavailableError,
    ConnectionLostError,
    RemoteAgentError,
    RequestTimeoutError,
)
from .presence import Presence


@dataclass(slots=True)
class Exchange:
    """One request and what came of it: the unit of a run's trace."""

    agent_id: str
    request: Envelope
    reply: Envelope | None = None
    error: AiflowError | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    started: float = field(default_factory=time.time)
    ended: float | None = None
    topic: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.reply is not None and self.reply.kind != Kind.ERROR

    @property
    def latency(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class _Pending:
    """What arrived under one correlation id: one reply, several (group scatter) or events too."""

    __slots__ = ("queue", "seen")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Envelope | None, int, AiflowError | None]] = asyncio.Queue()
        self.seen: set[str] = set()  # envelope ids delivered: a redelivered copy is not a second answer


class Client:
    """Sends requests to agents by id and matches replies by correlation id.

    Pass ``connection`` to ride on an existing connection (nodes do, so their agents can call
    other agents); otherwise the client owns one and must be started (``async with Client(...)``).
    """

    def __init__(
        self,
        broker: str | BrokerURL | None = None,
        *,
        namespace: str = "default",
        client_id: str | None = None,
        connection: Connection | None = None,
        limits: Limits = DEFAULT_LIMITS,
        presence_grace: float = 1.0,
        default_timeout: float = 30.0,
        qos: int = 1,
        signing_key: SigningKeyLike | None = None,
    ) -> None:
        self.topics = Topics(namespace)
        self.client_id = client_id or (connection.client_id if connection else f"client-{new_id()[:12]}")
        if connection is None:
            url = broker_from_env(broker)
            if url is None:
                raise BrokerUnavailableError(
                    "no broker configured: pass a URL, set AIFLOW_BROKER, "
                    "or start one with aiflow_agents.broker_scope()"
                )
            connection = Connection(url, client_id=self.client_id)
            self._owns_connection = True
        else:
            self._owns_connection = False
        self.connection = connection
        self.limits = limits
        self.keyring = as_keyring(signing_key)
        self.presence = Presence(self.topics)
        self.presence_grace = presence_grace
        self.default_timeout = default_timeout
        self.qos = qos
        self.reply_topic = self.topics.replies(self.client_id)
        self._pending: dict[str, _Pending] = {}
        self._connected_at = 0.0
        self._started = False
        self.stats = {"late_or_duplicate_replies": 0, "bad_replies": 0, "unsigned_replies": 0}
        self.on_exchange: list[Callable[[Exchange], Awaitable[None] | None]] = []
        self.log = structlog.get_logger("aiflow.client").bind(client=self.client_id)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> Client:
        if self._started:
            return self
        self._started = True
        conn = self.connection
        conn.route(self.reply_topic, self._on_reply)
        conn.route(self.topics.presence_filter, self._on_presence)
        conn.on_connect(self._on_connect)
        conn.on_disconnect(self._on_disconnect)
        await conn.subscribe(self.reply_topic, qos=self.qos)
        await conn.subscribe(self.topics.presence_filter, qos=1)
        if conn.connected:
            self._connected_at = time.monotonic()
        if self._owns_connection:
            await conn.start(timeout=timeout)
        return self

    async def stop(self) -> None:
        for p in self._pending.values():
            p.queue.put_nowait((None, 0, ConnectionLostError("client stopped")))
        if self._owns_connection:
            await self.connection.stop()
        self._started = False

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_connect(self) -> None:
        self._connected_at = time.monotonic()

    async def _on_disconnect(self) -> None:
        # Our reply subscription is gone with the session: no in-flight reply can arrive any more.
        for p in self._pending.values():
            p.queue.put_nowait((None, 0, ConnectionLostError(f"connection to {self.connection.url} lost")))

    async def _on_presence(self, message: aiomqtt.Message) -> None:
        await self.presence.update(message.topic.value, bytes(message.payload))  # type: ignore[arg-type]

    async def _on_reply(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        size = len(payload)  # type: ignore[arg-type]
        try:
            env = decode(payload, self.limits, signing_key=self.keyring)  # type: ignore[arg-type]
        except (SignatureError, UnsignedFrameError) as e:
            self.stats["unsigned_replies"] += 1
            self.log.warning("reply dropped: not signed by the deployment", code=e.code, error=e.message)
            return
        except ProtocolError as e:
            self.stats["bad_replies"] += 1
            corr = None
            with contextlib.suppress(ProtocolError):
                corr = peek_header(payload).get("correlation_id")  # type: ignore[arg-type]
            self.log.warning("undecodable reply", error=str(e), code=e.code, correlation_id=corr)
            if isinstance(corr, str) and corr in self._pending and self._authentic(payload):  # type: ignore[arg-type]
                self._pending[corr].queue.put_nowait((None, size, AiflowError(f"undecodable reply [{e.code}]: {e}")))
            return
        pending = self._pending.get(env.correlation_id or "")
        if pending is None or env.id in pending.seen:
            self.stats["late_or_duplicate_replies"] += 1
            self.log.debug("late or duplicate reply dropped", correlation_id=env.correlation_id, sender=env.sender)
            return
        pending.seen.add(env.id)
        pending.queue.put_nowait((env, size, None))

    def _authentic(self, payload: bytes) -> bool:
        """Whether a frame that failed to decode may fail a pending request: with a key, only if it
        is signed with it (else anyone could abort requests by sending junk under their ids)."""
        if self.keyring is None:
            return True
        view = memoryview(payload)
        if len(view) < PREAMBLE_SIZE + TRAILER_SIZE or not view[5] & FLAG_SIGNED:
            return False
        try:
            self.keyring.verify(view)
        except SignatureError:
            return False
        return True

    # -- presence -----------------------------------------------------------------------------
    async def wait_for_agents(self, agent_ids: Iterable[str], timeout: float = 10.0) -> None:
        missing = await self.presence.wait_online(agent_ids, timeout)
        if missing:
            raise AgentUnavailableError(missing[0], list(self.presence.online()))

    async def ensure_online(self, agent_id: str) -> None:
        """Fail fast for an absent agent, allowing retained presence a moment to arrive after connect."""
        if self.presence.is_online(agent_id):
            return
        grace = self._connected_at + self.presence_grace - time.monotonic()
        if grace > 0 and not await self.presence.wait_online([agent_id], grace):
            return
        raise AgentUnavailableError(agent_id, list(self.presence.online()))

    # -- requests -----------------------------------------------------------------------------
    def prepare(self, agent_id: str | None, message: Envelope | str, timeout: float) -> Envelope:
        """Address a request: reply address, correlation id, deadline (never later than the caller's)."""
        env = Envelope.request(message) if isinstance(message, str) else message
        deadline = time.time() + timeout
        if env.deadline is not None:
            deadline = min(deadline, env.deadline)
        return env.model_copy(
            update={
                "kind": Kind.REQUEST,
                "recipient": agent_id if agent_id is not None else env.recipient,
                "reply_to": self.reply_topic,
                "correlation_id": env.correlation_id or env.id,
                "sender": env.sender if env.sender != "anonymous" else self.client_id,
                "deadline": deadline,
            }
        )

    async def request(
        self,
        agent_id: str,
        message: Envelope | str,
        *,
        timeout: float | None = None,
        raise_on_error: bool = True,
        check_presence: bool = True,
    ) -> Envelope:
        """Send one request and return the reply; raise a typed :class:`AiflowError` otherwise."""
        ex = await self.exchange(agent_id, message, timeout=timeout, check_presence=check_presence)
        if ex.error is not None:
            raise ex.error
        assert ex.reply is not None
        if raise_on_error and ex.reply.kind == Kind.ERROR:
            raise RemoteAgentError(
                ex.reply.error or ErrorInfo(code="unknown", message="error without details"), agent_id
            )
        return ex.reply

    async def exchange(
        self,
        agent_id: str,
        message: Envelope | str,
        *,
        timeout: float | None = None,
        check_presence: bool = True,
        topic: str | None = None,
    ) -> Exchange:
        """Like :meth:`request`, but never raises for the remote side: failures land in the record."""
        timeout = self.default_timeout if timeout is None else timeout
        env = self.prepare(agent_id, message, timeout)
        ex = Exchange(agent_id=agent_id, request=env, topic=topic or self.topics.inbox(agent_id))
        try:
            if check_presence:
                await self.ensure_online(agent_id)
            results = await self._send_and_collect(ex.topic, env, 1, timeout, ex)
            reply, size, error = results[0]
            ex.reply, ex.bytes_in, ex.error = reply, size, error
            if error is None and reply is not None and reply.kind == Kind.ERROR and reply.error is not None:
                ex.error = RemoteAgentError(reply.error, agent_id)
        except AiflowError as e:
            ex.error = e
        ex.ended = time.time()
        await self._notify(ex)
        return ex

    def conversation(self, message: Envelope | str, *, timeout: float | None = None) -> Conversation:
        """Open a conversation: everything that comes back under the request's correlation id
        (replies from one or many agents, progress events from forwarding nodes, errors).

        The building block of patterns: ``async with client.conversation(env) as conv: await
        conv.send(topic); reply, size = await conv.receive(timeout)``.
        """
        timeout = self.default_timeout if timeout is None else timeout
        return Conversation(self, self.prepare(None, message, timeout))

    async def scatter(
        self, topic: str, message: Envelope | str, *, expected: int, timeout: float | None = None
    ) -> tuple[Envelope, int, list[tuple[Envelope, int]], bool]:
        """Publish once to a group topic and collect up to ``expected`` replies (the broker fans out).

        Returns (request sent, its size, [(reply, size)], timed_out).
        """
        timeout = self.default_timeout if timeout is None else timeout
        replies: list[tuple[Envelope, int]] = []
        timed_out = False
        async with self.conversation(message, timeout=timeout) as conv:
            size = await conv.send(topic)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(replies) < expected:
                try:
                    env, n = await conv.receive(deadline - loop.time())
                except TimeoutError:
                    timed_out = True
                    break
                if env.kind != Kind.EVENT:
                    replies.append((env, n))
        return conv.request, size, replies, timed_out

    async def _send_and_collect(
        self, topic: str, env: Envelope, expected: int, timeout: float, ex: Exchange
    ) -> list[tuple[Envelope | None, int, AiflowError | None]]:
        results: list[tuple[Envelope | None, int, AiflowError | None]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with Conversation(self, env) as conv:
            ex.bytes_out = await conv.send(topic)
            while len(results) < expected:
                try:
                    reply, size = await conv.receive(deadline - loop.time())
                except TimeoutError:
                    results.append((None, 0, RequestTimeoutError(ex.agent_id, timeout, env.id)))
                    break
                except AiflowError as e:
                    results.append((None, 0, e))
                    break
                if reply.kind != Kind.EVENT:
                    results.append((reply, size, None))
        return results

    async def publish(self, topic: str, envelope: Envelope, *, qos: int | None = None) -> int:
        """Fire-and-forget publish of an envelope (events); returns bytes on the wire."""
        frame = self.encode(envelope)
        await self.connection.publish(
            topic, frame, qos=self.qos if qos is None else qos, properties=mqtt5_properties(envelope)
        )
        return len(frame)

    def encode(self, envelope: Envelope) -> bytes:
        """One frame for ``envelope`` under this client's limits (signed if it has a key).

        Raises :class:`protocols.EncodeError` when the envelope exceeds the limits: nothing is sent."""
        return encode(envelope, self.limits, signing_key=self.keyring)

    async def _notify(self, ex: Exchange) -> None:
        for hook in self.on_exchange:
            r = hook(ex)
            if r is not None:
                await r


class Conversation:
    """The replies, errors and events that come back under one correlation id."""

    def __init__(self, client: Client, request: Envelope) -> None:
        self.client = client
        self.request = request
        self.correlation_id = request.correlation_id or request.id
        self._pending: _Pending | None = None

    async def __aenter__(self) -> Conversation:
        if self.correlation_id in self.client._pending:
            raise AiflowError(f"correlation id {self.correlation_id!r} is already in flight")
        self._pending = self.client._pending[self.correlation_id] = _Pending()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client._pending.pop(self.correlation_id, None)

    async def send(self, topic: str, envelope: Envelope | None = None) -> int:
        """Publish the request (or a follow-up under the same correlation id); returns bytes on the wire."""
        env = envelope or self.request
        frame = self.client.encode(env)
        remaining = env.remaining()
        await self.client.connection.publish(
            topic,
            frame,
            qos=self.client.qos,
            properties=mqtt5_properties(env),
            timeout=max(remaining, 0.001) if remaining is not None else None,
        )
        return len(frame)

    async def receive(self, timeout: float | None) -> tuple[Envelope, int]:
        """The next envelope and its size; raises TimeoutError, or the connection/decoding error."""
        assert self._pending is not None, "use the conversation as an async context manager"
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        queue = self._pending.queue
        if queue.empty():
            # asyncio.timeout, not wait_for: no extra task (and event-loop turn) per reply
            async with asyncio.timeout(timeout):
                env, size, error = await queue.get()
        else:
            env, size, error = queue.get_nowait()
        if error is not None:
            raise error
        assert env is not None
        return env, size
