"""Request/reply over the bus. A request never hangs: it returns the reply or raises a typed error
naming the agent (absent, timed out, failed, connection lost).

Replies are matched by correlation id, once: a second reply under the same id (a QoS 1
redelivery, a replica answering twice) is dropped and counted in ``stats``. With ``signing_key``
every frame sent is signed and a reply that is not signed with the deployment's key is dropped
(counted, logged) without failing the request: a forged reply cannot abort a genuine one.

Lost work fails fast. A node still working on a request after ``claim_after`` seconds (in its
presence record) sends a tiny "claimed" event to the reply topic, so the client knows which
replica holds each slow request (fast requests cost nothing extra). When a node goes offline
(its Last Will, or missed heartbeats: see :mod:`.presence`), the requests it claimed fail at once
with :class:`AgentLostError`, or are re-sent to a surviving replica when the caller said they are
``idempotent``; with no replica left, every request to the agent fails at once. An unclaimed
request may be on the dead node (not yet claimed) or waiting in a survivor's backlog (not yet
accepted, so not claimed either): it gets ``lost_after`` seconds from the loss (default: the dead
node's ``claim_after`` + 0.5 s), and at least until it is ``claim_after`` + 0.5 s old, for a claim
or a reply from a survivor, and is failed as lost only if none came (or no host is left). A
survivor whose backlog holds it longer than that makes this a false loss: the error is retryable,
an idempotent request is re-sent, and the client keeps one reply (the second is counted).

Nothing sent during an outage is silently lost. After our connection comes back, a request waits
until a host of its agent has been heard from live (an announcement or heartbeat delivered after
the reconnect, which a node sends only once it has re-subscribed); on MQTT 5 a PUBACK saying "no
matching subscribers" (reason 16) makes the request wait for the agent's next announcement and go
out again. Either way it is sent once someone can receive it, or fails with a typed error. When
our connection drops while a publish awaits its PUBACK, the publish is retried on the new session
(whose reply subscription is restored first), so the request waits for its reply there: only a
request sent completely before the drop fails with :class:`ConnectionLostError` (its reply had no
subscription to arrive on). If the first copy was delivered and answered during the outage, that
reply is lost and the node ignores the retried copy as a duplicate: the request then ends with
:class:`RequestTimeoutError` at its deadline, never with a second execution.

Replicas that each execute every request (on both sides of a bridge, or on an MQTT 3.1.1 broker,
where ``$share`` does not exist) show up as two distinct replies from one agent under one
correlation id: counted in ``stats["duplicate_executions"]`` and logged once per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

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
    AgentLostError,
    AgentUnavailableError,
    AiflowError,
    BrokerUnavailableError,
    ConnectionLostError,
    RemoteAgentError,
    RequestTimeoutError,
)
from .mqtt import Message
from .presence import Presence
from .telemetry import parse_served


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
    # From the reply's MQTT 5 user properties, when the node stamped them (see telemetry.py): the
    # node that answered and the seconds the request spent there, so ``latency - service_s`` is
    # network time. Only a node that presence lists as a host of the replying agent is believed.
    served_by: str | None = None
    service_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.reply is not None and self.reply.kind != Kind.ERROR

    @property
    def latency(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


CLAIMED = "claimed"  # meta key of a node's "I am working on it" event: its node id
CLAIM_MARGIN = 0.5  # seconds a claim may take beyond the node's claim_after (publish, broker, loaded loop)
NO_MATCHING_SUBSCRIBERS = 16  # MQTT 5 PUBACK reason code
_ANSWERED_MEMORY = 4096  # finished conversations remembered to spot a second execution


class _Pending:
    """What arrived under one correlation id: one reply, several (group scatter) or events too."""

    __slots__ = ("agent_id", "answers", "claimed_by", "gen", "queue", "resent", "seen", "sent_at", "served")

    def __init__(self) -> None:
        # (envelope, size, error, generation): an error tagged with a generation concerns the copies
        # sent until then, and is stale once a later send completed (see :meth:`fail_sent`).
        self.queue: asyncio.Queue[tuple[Envelope | None, int, AiflowError | None, int | None]] = asyncio.Queue()
        self.gen = 0  # sends completed (publish acknowledged, or written at QoS 0)
        self.seen: set[str] = set()  # envelope ids delivered: a redelivered copy is not a second answer
        self.agent_id: str | None = None  # set for a request to one agent: liveness applies
        self.claimed_by: str | None = None  # node that said it is working on it
        self.sent_at = 0.0  # monotonic
        self.resent = False  # we sent it twice ourselves: two answers are no replica fault
        self.answers: dict[str, str] | None = None  # replying agent -> reply envelope id
        self.served: dict[str, tuple[str, float]] = {}  # reply envelope id -> (node, seconds there)

    def put(self, env: Envelope | None, size: int, error: AiflowError | None = None) -> None:
        """An answer, or an error that ends the conversation whatever was sent."""
        self.queue.put_nowait((env, size, error, None))

    def fail_sent(self, error: AiflowError) -> None:
        """An error about the copies sent so far (our session dropped, their node died). A send that
        completes after it (a publish retried on the new session, a re-send) makes it stale."""
        self.queue.put_nowait((None, 0, error, self.gen))


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
        lost_after: float | None = None,
        default_timeout: float = 30.0,
        qos: int = 1,
        signing_key: SigningKeyLike | None = None,
        heartbeat_misses: float = 3.0,
        keepalive: int = 30,
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
            connection = Connection(url, client_id=self.client_id, keepalive=keepalive)
            self._owns_connection = True
        else:
            self._owns_connection = False
        self.connection = connection
        self.limits = limits
        self.keyring = as_keyring(signing_key)
        self.presence = Presence(self.topics, misses=heartbeat_misses)
        self.presence_grace = presence_grace
        # After a replica's loss, how long an unclaimed request waits for a survivor's claim or
        # reply before it is failed as lost (None: the lost node's claim_after + CLAIM_MARGIN).
        self.lost_after = lost_after
        self.default_timeout = default_timeout
        self.qos = qos
        self.reply_topic = self.topics.replies(self.client_id)
        self._pending: dict[str, _Pending] = {}
        self._connected_at = 0.0
        self._lost_at: float | None = None  # monotonic time our connection last dropped
        self._disconnects = 0  # connections lost so far: tells a send that spanned a reconnect
        self._started = False
        self._sweeper: asyncio.Task[None] | None = None
        self._answered: OrderedDict[str, tuple[dict[str, str], bool]] = OrderedDict()
        self._duplicate_warned: set[str] = set()
        self.stats = {
            "late_or_duplicate_replies": 0,
            "bad_replies": 0,
            "unsigned_replies": 0,
            "requests_lost": 0,  # failed (or re-sent) because their node went offline
            "resent": 0,  # idempotent requests re-sent after a loss, or after "no matching subscribers"
            "no_subscribers": 0,  # PUBACKs with reason 16
            "duplicate_executions": 0,  # one request answered by two executions (replicas without $share)
            "served_by_rejected": 0,  # replies stamped with a node that presence lists as no host of their sender
        }
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
        self.presence.listeners.append(self._on_node_lost)
        await conn.subscribe(self.reply_topic, qos=self.qos)
        await conn.subscribe(self.topics.presence_filter, qos=1)
        if conn.connected:
            self._connected_at = time.monotonic()
        if self._owns_connection:
            await conn.start(timeout=timeout)
        self._sweeper = asyncio.create_task(self._sweep(), name=f"presence-sweep-{self.client_id}")
        return self

    async def _sweep(self) -> None:
        """Expire nodes whose heartbeats stopped (a few comparisons, four times a second)."""
        while True:
            await asyncio.sleep(0.25)
            try:
                await self.presence.sweep()
            except Exception:
                self.log.exception("presence sweep failed")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        with contextlib.suppress(ValueError):
            self.presence.listeners.remove(self._on_node_lost)
        for p in self._pending.values():
            p.put(None, 0, ConnectionLostError("client stopped"))
        if self._owns_connection:
            await self.connection.stop()
        self._started = False

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_connect(self) -> None:
        self._connected_at = time.monotonic()
        self.presence.resume()

    async def _on_disconnect(self) -> None:
        self._lost_at = time.monotonic()
        self._disconnects += 1
        self.presence.paused = True
        # Our reply subscription is gone with the session: no reply to what was sent can arrive any
        # more. A publish still awaiting its PUBACK is retried on the next session, whose reply
        # subscription is restored first: that send completes later and makes this error stale.
        for p in self._pending.values():
            p.fail_sent(ConnectionLostError(f"connection to {self.connection.url} lost"))

    async def _on_presence(self, message: Message) -> None:
        # a retained replay says what was last announced, not that the node is connected now
        await self.presence.update(message.topic, bytes(message.payload), retained=message.retain)

    # -- lost work ----------------------------------------------------------------------------
    def _on_node_lost(self, node_id: str, hosted: list[str], reason: str) -> None:
        """A node went offline: fail (or re-send) the requests it holds, see the module doc."""
        if not self._pending or not hosted:
            return
        agents = set(hosted)
        now = time.monotonic()
        for p in list(self._pending.values()):
            if p.agent_id in agents and not p.answers:
                self._judge(p, node_id, reason, now)

    def _judge(self, p: _Pending, node_id: str, reason: str, now: float) -> None:
        assert p.agent_id is not None
        if p.claimed_by == node_id or not self.presence.is_online(p.agent_id):
            self._lose(p, node_id, reason)
            return
        if p.claimed_by is not None:
            return  # a surviving replica has it
        claim_after = self.presence.claim_after(node_id)
        if claim_after is None:
            return  # the node never claims (an older version): the deadline decides
        # Unclaimed: on the dead node, or in a survivor's backlog (not accepted yet, so not
        # claimed). A survivor claims it claim_after after accepting it: give it that long from
        # now (or lost_after), and the request at least claim_after + margin of age.
        window = self.lost_after if self.lost_after is not None else claim_after + CLAIM_MARGIN
        due = max(p.sent_at + claim_after + CLAIM_MARGIN - now, window)
        sent_at = p.sent_at

        def recheck() -> None:
            if p.sent_at == sent_at and p.claimed_by is None and not p.answers and p in self._pending.values():
                self._lose(p, node_id, reason)

        asyncio.get_running_loop().call_later(due, recheck)

    def _lose(self, p: _Pending, node_id: str, reason: str) -> None:
        assert p.agent_id is not None
        self.stats["requests_lost"] += 1
        p.fail_sent(AgentLostError(p.agent_id, node_id, reason, list(self.presence.online())))

    def _remember(self, correlation_id: str, p: _Pending) -> None:
        """Keep who answered a finished conversation for a while, to spot a second execution."""
        if p.answers:
            self._answered[correlation_id] = (p.answers, p.resent)
            if len(self._answered) > _ANSWERED_MEMORY:
                self._answered.popitem(last=False)

    def _duplicate(self, env: Envelope, first_id: str, resent: bool) -> None:
        """One request answered by two executions: replicas that each get every request."""
        if resent or env.id == first_id:
            return
        self.stats["duplicate_executions"] += 1
        agent = env.sender
        if agent in self._duplicate_warned:
            return
        self._duplicate_warned.add(agent)
        self.log.warning(
            "agent executed one request twice: its replicas each receive every request. $share splits "
            "requests only inside one MQTT 5 broker; replicas on both sides of a bridge or on an MQTT 3.1.1 "
            "broker all run them (see docs/deployment.md: one broker per replica set, or distinct agent ids)",
            agent=agent,
            correlation_id=env.correlation_id,
            nodes=self.presence.host_ids(agent),
        )

    async def _on_reply(self, message: Message) -> None:
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
                self._pending[corr].put(None, size, AiflowError(f"undecodable reply [{e.code}]: {e}"))
            return
        corr = env.correlation_id or ""
        pending = self._pending.get(corr)
        if env.kind == Kind.EVENT and CLAIMED in env.meta:
            node = env.meta[CLAIMED]
            if pending is not None and isinstance(node, str):
                pending.claimed_by = node
            return
        if pending is None or env.id in pending.seen:
            self.stats["late_or_duplicate_replies"] += 1
            self.log.debug("late or duplicate reply dropped", correlation_id=env.correlation_id, sender=env.sender)
            if pending is None and env.kind != Kind.EVENT and (done := self._answered.get(corr)) is not None:
                first = done[0].get(env.sender)
                if first is not None:
                    self._duplicate(env, first, done[1])
            return
        pending.seen.add(env.id)
        if env.kind != Kind.EVENT and (served := parse_served(message.properties)) is not None:
            # Anyone who can answer may stamp any node id: believe only a host of the replying agent
            # (else one node could poison another's link estimate, or grow them without bound).
            if served[0] in self.presence.host_ids(env.sender):
                pending.served[env.id] = served
            else:
                self.stats["served_by_rejected"] += 1
        if env.kind != Kind.EVENT:
            if pending.answers is None:
                pending.answers = {env.sender: env.id}
            elif (first := pending.answers.setdefault(env.sender, env.id)) != env.id:
                self._duplicate(env, first, pending.resent)
        pending.put(env, size)

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
        idempotent: bool = False,
    ) -> Envelope:
        """Send one request and return the reply; raise a typed :class:`AiflowError` otherwise.

        ``idempotent``: running it twice is harmless, so when its node goes offline before
        answering it is re-sent to a surviving replica instead of failing with
        :class:`AgentLostError`."""
        ex = await self.exchange(
            agent_id, message, timeout=timeout, check_presence=check_presence, idempotent=idempotent
        )
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
        idempotent: bool = False,
        on_event: Callable[[Envelope], None] | None = None,
    ) -> Exchange:
        """Like :meth:`request`, but never raises for the remote side: failures land in the record.

        ``on_event`` gets each progress event that arrives before the reply (see :meth:`stream`)."""
        timeout = self.default_timeout if timeout is None else timeout
        env = self.prepare(agent_id, message, timeout)
        ex = Exchange(agent_id=agent_id, request=env, topic=topic or self.topics.inbox(agent_id))
        try:
            if check_presence:
                await self.ensure_online(agent_id)
            reply, size, error = await self._send_and_wait(env, timeout, ex, idempotent, on_event)
            ex.reply, ex.bytes_in, ex.error = reply, size, error
            if error is None and reply is not None and reply.kind == Kind.ERROR and reply.error is not None:
                ex.error = RemoteAgentError(reply.error, agent_id)
        except AiflowError as e:
            ex.error = e
        ex.ended = time.time()
        await self._notify(ex)
        return ex

    async def stream(
        self,
        agent_id: str,
        message: Envelope | str,
        *,
        timeout: float | None = None,
        check_presence: bool = True,
    ) -> AsyncIterator[Envelope]:
        """Send one request and yield what comes back as it comes: each progress event (EVENT
        envelopes: an agent's partial results, e.g. ``meta["stream"]`` from a model generating
        with ``meta={"stream": True}``, and forwarding nodes' ``meta["hop"]``), then the final
        reply as the last item. An agent that sends no progress yields just its reply.

        Failures are :meth:`request`'s: an error reply raises :class:`RemoteAgentError`, no reply
        within ``timeout`` (the whole exchange, events included) :class:`RequestTimeoutError`, and
        so on, after the events that did arrive. The node publishes an agent's events before its
        reply, so none is lost behind it. Leaving the loop early abandons the request (a late
        reply is dropped). ``async for env in client.stream("llm", Envelope.request(q, meta=
        {"stream": True})): ...``"""
        queue: asyncio.Queue[Envelope | None] = asyncio.Queue()
        task = asyncio.create_task(
            self.exchange(agent_id, message, timeout=timeout, check_presence=check_presence, on_event=queue.put_nowait)
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every event: the reply is in
        try:
            while (event := await queue.get()) is not None:
                yield event
            ex = task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if ex.error is not None:
            raise ex.error
        assert ex.reply is not None
        if ex.reply.kind == Kind.ERROR:
            raise RemoteAgentError(
                ex.reply.error or ErrorInfo(code="unknown", message="error without details"), agent_id
            )
        yield ex.reply

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
        env = Envelope.request(message) if isinstance(message, str) else message
        prefix = f"{self.topics.base}/groups/"
        if env.recipient is None and topic.startswith(prefix) and topic.endswith("/inbox"):
            # Addressed to the group: signing nodes refuse requests that name no recipient (replay bound).
            env = env.model_copy(update={"recipient": topic[len(prefix) : -len("/inbox")]})
        async with self.conversation(env, timeout=timeout) as conv:
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

    async def _send_and_wait(
        self,
        env: Envelope,
        timeout: float,
        ex: Exchange,
        idempotent: bool,
        on_event: Callable[[Envelope], None] | None = None,
    ) -> tuple[Envelope | None, int, AiflowError | None]:
        """Send, then wait for the reply, re-sending where the module doc says it is safe."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        agent_id = ex.agent_id
        async with Conversation(self, env) as conv:
            pending = conv._pending
            assert pending is not None
            pending.agent_id = agent_id
            while True:
                try:
                    await self._reachable(agent_id, deadline)
                except AiflowError as e:
                    return None, 0, e
                pending.claimed_by = None
                pending.sent_at = time.monotonic()
                ex.bytes_out = await conv.send(ex.topic)
                if conv.no_subscribers:
                    # Nobody received it (the node is reconnecting): wait for its next announcement.
                    self.stats["no_subscribers"] += 1
                    since = pending.sent_at
                    left = deadline - loop.time()
                    if left <= 0 or not await self.presence.wait_live(agent_id, since, left, strict=True):
                        return None, 0, AgentUnavailableError(agent_id, list(self.presence.online()))
                    self._resend(pending, agent_id, "no matching subscribers")
                    continue
                lost_at = self._lost_at
                if (
                    conv.spanned_reconnect
                    and lost_at is not None
                    and not self.connection.is_v5
                    and agent_id in self.presence.known_agents
                    and not self.presence.live_since(agent_id, lost_at)
                ):
                    # MQTT 3.1.1 has no "no matching subscribers": a publish retried on the new
                    # session before any host was heard live on it may have reached nobody. Send
                    # it again once one is (a node drops an id it has seen: no second run there;
                    # hosts without heartbeats cannot be heard, as in _reachable: not re-sent).
                    left = deadline - loop.time()
                    if left <= 0 or not await self.presence.wait_live(agent_id, lost_at, left):
                        return None, 0, AgentUnavailableError(agent_id, list(self.presence.online()))
                    self._resend(pending, agent_id, "sent across a reconnect (MQTT 3.1.1)")
                    continue
                try:
                    while True:
                        reply, size = await conv.receive(deadline - loop.time())
                        if reply.kind == Kind.EVENT and on_event is not None:
                            on_event(reply)
                        if reply.kind != Kind.EVENT:
                            if (served := pending.served.get(reply.id)) is not None and not pending.resent:
                                ex.served_by, ex.service_s = served
                            return reply, size, None
                except TimeoutError:
                    return None, 0, RequestTimeoutError(agent_id, timeout, env.id)
                except AgentLostError as e:
                    left = deadline - loop.time()
                    if not idempotent or left <= 0:
                        return None, 0, e
                    if not self.presence.is_online(agent_id):
                        return None, 0, e  # no replica left to re-send to
                    self._resend(pending, agent_id, e.reason)
                except AiflowError as e:
                    return None, 0, e

    def _resend(self, pending: _Pending, agent_id: str, why: str) -> None:
        pending.resent = True
        self.stats["resent"] += 1
        self.log.info("re-sending request", agent=agent_id, reason=why)

    async def _reachable(self, agent_id: str, deadline: float) -> None:
        """After our connection dropped, hold a request until a host of its agent has been heard
        from live since, so it is not published before the node re-subscribed (module doc)."""
        lost_at = self._lost_at
        if lost_at is None:
            return
        loop = asyncio.get_running_loop()
        if not self.connection.connected:
            await self.connection.wait_connected(max(deadline - loop.time(), 0.001))
        if agent_id not in self.presence.known_agents or self.presence.live_since(agent_id, lost_at):
            return  # an agent presence never told us about: nothing to judge it by
        if not await self.presence.wait_live(agent_id, lost_at, deadline - loop.time()):
            raise AgentUnavailableError(agent_id, list(self.presence.online()))

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
        self.no_subscribers = False  # the last send's PUBACK said nobody is subscribed (MQTT 5)
        self.spanned_reconnect = False  # our connection dropped while the last send was under way

    async def __aenter__(self) -> Conversation:
        if self.correlation_id in self.client._pending:
            raise AiflowError(f"correlation id {self.correlation_id!r} is already in flight")
        self._pending = self.client._pending[self.correlation_id] = _Pending()
        return self

    async def __aexit__(self, *exc: object) -> None:
        p = self.client._pending.pop(self.correlation_id, None)
        if p is not None and p.answers:
            self.client._remember(self.correlation_id, p)

    async def send(self, topic: str, envelope: Envelope | None = None) -> int:
        """Publish the request (or a follow-up under the same correlation id); returns bytes on the wire."""
        env = envelope or self.request
        frame = self.client.encode(env)
        remaining = env.remaining()
        drops = self.client._disconnects
        rc = await self.client.connection.publish(
            topic,
            frame,
            qos=self.client.qos,
            properties=mqtt5_properties(env),
            timeout=max(remaining, 0.001) if remaining is not None else None,
        )
        self.no_subscribers = isinstance(rc, int) and rc == NO_MATCHING_SUBSCRIBERS
        self.spanned_reconnect = self.client._disconnects != drops
        if self._pending is not None:
            self._pending.gen += 1  # errors about earlier copies (or sessions) are stale now
        return len(frame)

    async def receive(self, timeout: float | None) -> tuple[Envelope, int]:
        """The next envelope and its size; raises TimeoutError, or the connection/decoding error."""
        assert self._pending is not None, "use the conversation as an async context manager"
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        pending = self._pending
        queue = pending.queue
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            if queue.empty():
                # asyncio.timeout, not wait_for: no extra task (and event-loop turn) per reply
                async with asyncio.timeout_at(end):
                    env, size, error, gen = await queue.get()
            else:
                env, size, error, gen = queue.get_nowait()
            if error is not None:
                if gen is not None and gen < pending.gen:
                    continue  # about a copy or session before the latest send: stale
                raise error
            assert env is not None
            return env, size
