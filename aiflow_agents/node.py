"""A node: one process-level MQTT connection hosting one or more agents.

A node never dies on a bad frame or a raising handler: every failure becomes an error envelope
to the requester when a reply address is known (from the envelope, or from the MQTT 5
ResponseTopic/CorrelationData of a frame that could not be decoded), and otherwise a log line
plus an error envelope on the agent's ``errors`` topic. Header strings that would become MQTT
topics or properties are checked when the frame is decoded (SPEC §6.1), so no frame can make the
node publish something the broker disconnects it for; a bad reply address is never used.

Replay (SPEC §12 item 8): a request whose ``recipient`` is not the agent (or group) of the inbox it
arrived on, or whose ``created_at`` lies outside ``max_frame_age`` +- ``clock_skew``, is refused and
reported on the errors topic, never answered; ids are remembered for that whole window.

Load policy, per agent: at most ``max_concurrency`` handlers run at once; up to ``max_pending``
more wait; per node, at most ``max_queued_bytes`` of request frames are held; a sender's deadline
is capped at ``max_deadline``. Beyond a bound requests are refused at once with the retryable
error ``overloaded``, and one agent's stuck handler never makes another refuse. Refusals go
out at QoS 0 from background tasks (at most ``_MAX_REFUSALS`` unsent), so the message loop never
waits on the socket per refused request: under a flood it keeps draining its queue before more
is read (see ``connection``), a refused request's payload is freed as soon as it is read, and
the node's memory stays flat. A refusal lost with a dropped connection becomes the requester's
timeout.

With ``signing_key`` the node accepts only frames signed with the deployment's key and signs
everything it sends. A frame that fails the check never reaches a handler and is never answered
at the address it names (that address is unauthenticated): it is logged and reported on the
agent's ``errors`` topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import structlog

from protocols import (
    DEFAULT_LIMITS,
    Envelope,
    ErrorInfo,
    Kind,
    Limits,
    PresenceRecord,
    ProtocolError,
    SignatureError,
    SigningKeyLike,
    Status,
    TensorPart,
    TextPart,
    Topics,
    UnsignedFrameError,
    as_keyring,
    decode,
    encode,
    mqtt5_properties,
    mqtt_string_problem,
    new_id,
    ops,
    peek_header,
    portable_topic_problem,
)

from .agent import Agent, AgentContext, Emit, Reply
from .broker import BrokerURL, broker_from_env
from .client import Client
from .connection import Connection, incoming_limits
from .errors import AgentError, BrokerUnavailableError
from .forwarding import Forwarding, RouteForwarding
from .mqtt import Message, Will
from .probe import ProbeResponder
from .telemetry import DEFAULT_TELEMETRY_INTERVAL, NodeMeter, served_properties

DEFAULT_MAX_FRAME_AGE = 300.0  # s: older requests are refused (replay bound, SPEC §12 item 8)
DEFAULT_CLOCK_SKEW = 30.0  # s: how far participants' clocks may disagree
DEFAULT_MAX_DEADLINE = 600.0  # s: the longest a sender may ask a handler to run
DEFAULT_MAX_QUEUED_BYTES = 256 << 20  # request frames held by one node (running + waiting)
_MAX_REFUSALS = 256  # overload refusals not yet written to the socket; beyond that the loop waits
_MAX_PROBE_ANSWERS = 64  # probe answers not yet written; beyond that new ones are dropped (a lost probe)
NODE_KEEPALIVE = 5  # s: MQTT keepalive of a node; the broker fires a frozen node's Will ~1.5x this later
_REANNOUNCE_AFTER = 30.0  # seconds between re-publishing the retained agent records


def _usable(value: Any, max_len: int, *, topic: bool = False) -> str | None:
    """A string from a broken frame's header (or MQTT properties), if an error envelope and its
    MQTT packet can carry it: length, and MQTT's rules for strings (topic names for ``topic``)."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        return None
    return value if (portable_topic_problem if topic else mqtt_string_problem)(value) is None else None


def _error_address(header: dict[str, Any], props: dict[str, Any]) -> tuple[str | None, str | None]:
    """Where to answer a frame that failed to decode, and with which correlation id (SPEC §12
    item 6): the header's ``reply_to`` and ``correlation_id`` (or ``id``) when the header has them,
    else the MQTT 5 ResponseTopic and CorrelationData. A header address that is not a publishable
    topic (§6.1) is never replaced by the properties: (None, ...) sends the report to errors/<agent>."""
    if header.get("reply_to") is not None:
        reply_to = _usable(header["reply_to"], 1024, topic=True)
    else:
        reply_to = _usable(props.get("ResponseTopic"), 1024, topic=True)
    # an empty correlation_id counts as absent (SPEC §12 item 3), as in Envelope.reply
    corr = _usable(header.get("correlation_id"), 128) or _usable(header.get("id"), 128)
    if corr is None:
        raw = props.get("CorrelationData")
        corr = _usable(raw.decode("utf-8", "replace"), 128) if isinstance(raw, (bytes, bytearray)) else None
    return reply_to, corr


class _Slot:
    """One agent's share of the node: its own concurrency and queue bound."""

    __slots__ = ("limit", "queued", "sem")

    def __init__(self, concurrency: int, pending: int) -> None:
        self.sem = asyncio.Semaphore(concurrency)
        self.limit = concurrency + pending
        self.queued = 0  # requests of this agent running or waiting for the semaphore


class _RecentIds:
    """Message ids seen lately: QoS 1 may redeliver, and a request must run once.

    An id is kept for ``ttl`` seconds (the freshness window and clock skew, so a replay that is
    still fresh enough to be accepted is always recognised), and at most ``size`` ids are kept;
    beyond that the oldest go first (bounded memory: ~200 bytes an id)."""

    def __init__(self, size: int, ttl: float | None = None) -> None:
        self.size = size
        self.ttl = ttl
        self._ids: OrderedDict[str, float] = OrderedDict()

    def seen(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        ids = self._ids
        if key in ids:
            return True
        if self.ttl is not None:
            while ids:
                oldest, expires = next(iter(ids.items()))
                if expires > now:
                    break
                del ids[oldest]
        ids[key] = now + (self.ttl or 0.0)
        if len(ids) > self.size:
            ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)


class Node:
    def __init__(
        self,
        agents: Sequence[Agent],
        broker: str | BrokerURL | None = None,
        *,
        node_id: str | None = None,
        namespace: str = "default",
        max_concurrency: int = 64,
        max_pending: int = 1024,
        limits: Limits = DEFAULT_LIMITS,
        dedupe_window: int = 100_000,
        tier: str | None = None,
        signing_key: SigningKeyLike | None = None,
        max_frame_age: float | None = DEFAULT_MAX_FRAME_AGE,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        max_deadline: float | None = DEFAULT_MAX_DEADLINE,
        max_queued_bytes: int | None = DEFAULT_MAX_QUEUED_BYTES,
        heartbeat: float | None = 2.0,
        claim_after: float | None = 0.2,
        keepalive: int = NODE_KEEPALIVE,
        forwarding: Forwarding | None = RouteForwarding(),
        telemetry_interval: float | None = DEFAULT_TELEMETRY_INTERVAL,
    ) -> None:
        if not agents:
            raise ValueError("a node needs at least one agent")
        ids = [a.agent_id for a in agents]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate agent ids on one node: {ids}")
        url = broker_from_env(broker)
        if url is None:
            raise BrokerUnavailableError("no broker configured: pass a URL or set AIFLOW_BROKER")
        self.url = url
        self.agents = {a.agent_id: a for a in agents}
        self.node_id = node_id or f"node-{socket.gethostname().split('.')[0][:20]}-{os.getpid()}-{new_id()[:6]}"
        # A node id is a topic level: ASCII letters, digits, '_' and '-' only (no '.': SPEC §6.1, §11.1)
        self.node_id = "".join(c if (c.isascii() and c.isalnum()) or c in "_-" else "-" for c in self.node_id)
        self.topics = Topics(namespace)
        self.limits = limits
        self.keyring = as_keyring(signing_key)
        self.tier = tier
        # Escalation along a request's route (a topology behaviour, see forwarding.py); None: never
        self.forwarding = forwarding
        # Liveness (see presence.py and client.py): a beat every ``heartbeat`` s; a request still
        # running after ``claim_after`` s is claimed, so its requester knows which node holds it.
        self.heartbeat = heartbeat
        self.claim_after = claim_after
        self._session = 0
        self._beating: asyncio.Task[None] | None = None
        # Telemetry (see telemetry.py): per-agent meters, always kept (a few float ops per request);
        # every ``telemetry_interval`` s a record, and answers to link probes; None/0: neither.
        self.telemetry_interval = telemetry_interval or None
        self.meter = NodeMeter(a.agent_id for a in agents)
        self._probes = ProbeResponder(self.topics, self.node_id, max_bytes=min(256 * 1024, limits.max_frame_bytes))
        self._reporting: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()  # probe answers being published
        self._claims: set[asyncio.Task[None]] = set()
        # Load bounds, per agent (one agent's stuck handler never makes its siblings refuse) and,
        # in bytes of request frames held, per node.
        self.max_concurrency = max_concurrency
        self.max_pending = max_pending
        self.max_queued_bytes = max_queued_bytes
        self._slots = {a.agent_id: _Slot(max_concurrency, max_pending) for a in agents}
        self._queued_bytes = 0
        self._inflight: set[asyncio.Task[None]] = set()
        self._refusing: set[asyncio.Task[None]] = set()
        # Replay bounds: requests older than max_frame_age (+ skew) are refused, so ids need to be
        # remembered only that long (+ skew for frames dated up to ``skew`` in the future).
        self.max_frame_age = max_frame_age
        self.clock_skew = clock_skew
        self.max_deadline = max_deadline
        ttl = None if max_frame_age is None else max_frame_age + 2 * clock_skew
        self._recent = _RecentIds(dedupe_window, ttl)
        # group topic -> agent ids on this node in that group (static from config, or joined at run time)
        self._groups: dict[str, set[str]] = {}
        for a in agents:
            for g in a.groups:
                self._groups.setdefault(self.topics.group(g), set()).add(a.agent_id)
        offline = PresenceRecord(status=Status.OFFLINE, node_id=self.node_id, tier=tier, pid=os.getpid())
        self.connection = Connection(
            url,
            client_id=self.node_id,
            will=Will(self.topics.node_presence(self.node_id), offline.to_bytes(), qos=1, retain=True),
            keepalive=keepalive,
            **incoming_limits(limits.max_frame_bytes, max_queued_bytes),
        )
        self.client = Client(connection=self.connection, namespace=namespace, limits=limits, signing_key=self.keyring)
        self.stats: dict[str, int] = {
            "requests": 0,
            "replies": 0,
            "errors": 0,
            "bad_frames": 0,
            "duplicates": 0,
            "overloaded": 0,
            "unsigned_rejected": 0,
            "wrong_recipient": 0,
            "stale": 0,
            "deadlines_clamped": 0,
            "telemetry_records": 0,
            "telemetry_bytes": 0,
            "probes_answered": 0,
            "probes_refused": 0,
            "probes_dropped": 0,  # not answered: _MAX_PROBE_ANSWERS answers were still being written
        }
        self._stopped = asyncio.Event()
        self._started = False
        self.log = structlog.get_logger("aiflow.node").bind(node=self.node_id)

    # -- subscriptions ------------------------------------------------------------------------
    def _inbox_subscription(self, agent_id: str) -> str:
        # MQTT 5: a shared subscription, so replicas of this agent on other nodes split the load.
        if self.connection.is_v5:
            return self.topics.shared_inbox(agent_id)
        return self.topics.inbox(agent_id)

    async def _announce(self) -> None:
        """(Re)subscribe inboxes for the negotiated protocol and publish presence."""
        for agent in self.agents.values():
            plain, shared = self.topics.inbox(agent.agent_id), self.topics.shared_inbox(agent.agent_id)
            want = self._inbox_subscription(agent.agent_id)
            stale = shared if want == plain else plain
            if stale in self.connection.subscriptions:
                await self.connection.unsubscribe(stale)
            await self.connection.subscribe(want, qos=1)
        for topic in self._groups:
            await self.connection.subscribe(topic, qos=1)
        await self.connection.publish(
            self.topics.node_presence(self.node_id), self._node_record(new_session=True), qos=1, retain=True
        )
        await self._publish_agent_records()
        self.log.info("online", broker=str(self.url), agents=list(self.agents), v5=self.connection.is_v5)

    async def _publish_agent_records(self) -> None:
        for agent in self.agents.values():
            rec = PresenceRecord(
                status=Status.ONLINE,
                node_id=self.node_id,
                agent_id=agent.agent_id,
                agent_type=agent.type_name,
                accepts=agent.accepts.describe(),
                groups=list(agent.groups),
                tier=agent.tier or self.tier,
                pid=os.getpid(),
            )
            await self.connection.publish(
                self.topics.agent_presence(agent.agent_id, self.node_id), rec.to_bytes(), qos=1, retain=True
            )

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, timeout: float | None = 10.0) -> Node:
        if self._started:
            return self
        self._started = True
        for agent in self.agents.values():
            await agent.setup()
        for agent in self.agents.values():
            self.connection.route(self.topics.inbox(agent.agent_id), self._on_message)
        self.connection.route(self.topics.group_filter, self._on_message)
        if self.telemetry_interval:
            self.connection.route(self.topics.probe(self.node_id), self._on_probe)
            await self.connection.subscribe(self.topics.probe(self.node_id), qos=0)
        await self.client.start()
        self.connection.on_connect(self._announce)
        await self.connection.start(timeout=timeout)
        if self.heartbeat:
            self._beating = asyncio.create_task(self._beat(self.heartbeat), name=f"heartbeat-{self.node_id}")
        if self.telemetry_interval:
            self._reporting = asyncio.create_task(
                self._report_telemetry(self.telemetry_interval), name=f"telemetry-{self.node_id}"
            )
        return self

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, let in-flight ones finish (or fail them), then go offline."""
        if not self._started:
            return
        self._started = False
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                await self.connection.unsubscribe(self._inbox_subscription(agent.agent_id))
        for topic in self._groups:
            with contextlib.suppress(Exception):
                await self.connection.unsubscribe(topic)
        if self._inflight:
            _, still = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in still:
                task.cancel()  # the task answers its requester with ``node_stopping``
            if still:
                await asyncio.wait(still, timeout=1.0)
        if self._refusing:
            await asyncio.wait(set(self._refusing), timeout=1.0)
        await self._stop_beating()
        await self._stop_reporting()
        # Not connected: nothing can be cleared now (each publish would wait out its timeout). A connection that
        # was lost left our Will with the broker, which has said "offline" for us; one never made left nothing.
        if self.connection.connected:
            with contextlib.suppress(Exception):
                for agent in self.agents.values():
                    # An empty retained payload deletes the retained record.
                    await self.connection.publish(
                        self.topics.agent_presence(agent.agent_id, self.node_id), b"", qos=1, retain=True, timeout=2.0
                    )
                offline = PresenceRecord(status=Status.OFFLINE, node_id=self.node_id, tier=self.tier, pid=os.getpid())
                await self.connection.publish(
                    self.topics.node_presence(self.node_id), offline.to_bytes(), qos=1, retain=True, timeout=2.0
                )
        await self.client.stop()
        await self.connection.stop()
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                await agent.teardown()
        self._stopped.set()
        if self.connection.connects:
            self.log.info("offline", stats=self.stats)
        else:
            self.log.info("stopped before it ever reached the broker", broker=str(self.connection.url))

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, *, handle_signals: bool = True, connect_timeout: float | None = None) -> None:
        """Serve until SIGINT/SIGTERM (or :meth:`request_stop`), then stop gracefully.

        Like any service, a node keeps retrying (with backoff) until the broker answers; pass
        ``connect_timeout`` to give up instead. A broker that refuses us for good (bad password,
        untrusted certificate) still fails at once."""
        self._stopped.clear()
        stop = asyncio.Event()
        self._stop_request = stop
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        try:
            starting = asyncio.create_task(self.start(timeout=connect_timeout))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # re-raise a failed start
                await stopping
            else:  # asked to stop before the broker ever answered
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        stop = getattr(self, "_stop_request", None)
        if stop is not None:
            stop.set()

    # -- message handling ---------------------------------------------------------------------
    def _targets(self, topic: str) -> list[Agent]:
        members = self._groups.get(topic)
        if members is not None:
            return [self.agents[a] for a in sorted(members)]
        return [a for a in self.agents.values() if topic == self.topics.inbox(a.agent_id)]

    async def _join_group(self, agent: Agent, env: Envelope) -> None:
        """Node-level control: subscribe an agent to a group so a pattern can fan out with one publish."""
        group = env.meta.get(ops.GROUP)
        try:
            topic = self.topics.group(str(group))
        except ValueError as e:
            await self._send_error(agent, env, "bad_request", str(e))
            return
        members = self._groups.setdefault(topic, set())
        if not members:
            await self.connection.subscribe(topic, qos=1)
        members.add(agent.agent_id)
        await self._send(agent, env, env.reply(sender=agent.agent_id, meta={ops.GROUP: group, "joined": True}))

    async def _on_message(self, message: Message) -> None:
        topic = message.topic
        targets = self._targets(topic)
        if not targets:
            return
        payload = message.payload
        try:
            env = decode(payload, self.limits, signing_key=self.keyring)  # type: ignore[arg-type]
        except ProtocolError as e:
            self.stats["bad_frames"] += 1
            await self._reject_frame(targets[0], message, e)
            return
        for agent in targets:
            await self._accept(agent, env, len(payload), topic)  # type: ignore[arg-type]

    def _misaddressed(self, agent: Agent, env: Envelope, topic: str) -> str | None:
        """Why ``env`` is not for ``agent`` (SPEC §12 item 8), or None. Binding the recipient (which
        the MAC covers) stops a captured signed request from being replayed to another agent."""
        recipient = env.recipient
        if recipient is None:
            if self.keyring is None:
                return None  # unsigned deployments: nothing is authenticated anyway
            return "a signed request must name its recipient"
        if recipient == agent.agent_id:
            return None
        if topic in self._groups:
            group = topic[len(self.topics.base) + len("/groups/") : -len("/inbox")]
            if recipient == group:
                return None
            return f"recipient {recipient!r} is neither group {group!r} nor its member {agent.agent_id!r}"
        return f"recipient {recipient!r} is not {agent.agent_id!r}, whose inbox it arrived on"

    def _stale(self, env: Envelope, now: float) -> str | None:
        """Why ``env`` is outside the freshness window (too old, or dated in the future), or None."""
        if self.max_frame_age is None:
            return None
        age = now - env.created_at
        if age > self.max_frame_age + self.clock_skew:
            return f"created {age:.0f} s ago; this node accepts requests up to {self.max_frame_age:g} s old"
        if age < -self.clock_skew:
            return f"created {-age:.0f} s in the future (allowed clock skew {self.clock_skew:g} s)"
        return None

    async def _accept(self, agent: Agent, env: Envelope, size: int, topic: str = "") -> None:
        if env.kind != Kind.REQUEST:
            with contextlib.suppress(Exception):
                await agent.on_event(env, self._context(agent, env))
            return
        now = time.time()
        why = self._misaddressed(agent, env, topic) if topic else None
        if why is not None:
            self.stats["wrong_recipient"] += 1
            await self._report(agent, env, "wrong_recipient", why)
            return
        why = self._stale(env, now)
        if why is not None:
            self.stats["stale"] += 1
            await self._report(agent, env, "stale_frame", why, created_at=env.created_at, now=now)
            return
        if self._recent.seen(f"{agent.agent_id}/{env.id}"):
            self.stats["duplicates"] += 1
            self.log.info("duplicate request ignored", agent=agent.agent_id, id=env.id)
            return
        self.stats["requests"] += 1
        if env.expired(now):
            await self._send_error(agent, env, "deadline_exceeded", "request arrived after its deadline")
            return
        if self.max_deadline is not None:
            # The sender chooses the deadline; the node caps it (the handler's timeout, the reply's
            # expiry and any forwarded hop all follow the capped value).
            cap = now + self.max_deadline
            if env.deadline is None or env.deadline > cap:
                if env.deadline is not None:
                    self.stats["deadlines_clamped"] += 1
                env.deadline = cap
        if env.meta.get(ops.OP) == ops.Op.JOIN_GROUP:
            await self._join_group(agent, env)
            return
        reason = agent.accepts.check(env)
        if reason is not None:
            await self._send_error(agent, env, "unsupported_input", reason)
            return
        slot = self._slots[agent.agent_id]
        if slot.queued >= slot.limit:
            self.stats["overloaded"] += 1
            await self._refuse(agent, env, f"agent {agent.agent_id} has {slot.queued} requests queued")
            return
        if (
            self.max_queued_bytes is not None
            and self._queued_bytes
            and self._queued_bytes + size > self.max_queued_bytes
        ):
            self.stats["overloaded"] += 1
            held = self._queued_bytes
            await self._refuse(
                agent, env, f"node {self.node_id} holds {held} bytes of requests (bound {self.max_queued_bytes})"
            )
            return
        slot.queued += 1
        self._queued_bytes += size
        task = asyncio.create_task(self._serve(agent, env), name=f"serve-{agent.agent_id}-{env.id[:8]}")
        self._inflight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._inflight.discard(t)
            slot.queued -= 1
            self._queued_bytes -= size

        task.add_done_callback(done)
        if self.claim_after is not None and env.reply_to:
            asyncio.get_running_loop().call_later(self.claim_after, self._claim, agent, env, task)

    # -- liveness -----------------------------------------------------------------------------
    def _node_record(self, *, new_session: bool = False) -> bytes:
        """This node's online record: announced (retained) on connect, repeated as the heartbeat."""
        if new_session:
            self._session += 1
        record = PresenceRecord(
            status=Status.ONLINE,
            node_id=self.node_id,
            tier=self.tier,
            pid=os.getpid(),
            host=socket.gethostname(),
            heartbeat=self.heartbeat,
            claim_after=self.claim_after,
            session=self._session,
        )
        return record.to_bytes()

    async def _beat(self, interval: float) -> None:
        """Heartbeats: one small QoS 0, not retained record per interval, while connected. Clients
        treat a node silent for several intervals as offline even when its Will cannot reach them
        (a dead bridge or cluster member)."""
        topic = self.topics.node_presence(self.node_id)
        every = max(1, round(_REANNOUNCE_AFTER / interval))
        beats = 0
        while True:
            await asyncio.sleep(interval)
            if not self.connection.connected:
                continue
            beats += 1
            try:
                await self.connection.publish(topic, self._node_record(), qos=0, timeout=interval)
                if beats % every == 0:
                    # Retained agent records again, now and then: a cluster that lost one (seen on a NATS
                    # cluster: a record never reached a client on another member) heals without a restart.
                    await self._publish_agent_records()
            except Exception as e:  # a missed beat is the signal itself: never stop beating
                self.log.debug("heartbeat not sent", error=str(e))

    async def _stop_beating(self) -> None:
        task, self._beating = self._beating, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- telemetry ----------------------------------------------------------------------------
    def _telemetry_record(self) -> bytes:
        """This node's next telemetry record (SPEC §11.4)."""
        record = self.meter.record(
            self.node_id,
            tier=self.tier,
            interval=self.telemetry_interval or DEFAULT_TELEMETRY_INTERVAL,
            held={a: slot.queued for a, slot in self._slots.items()},
            probes_answered=self._probes.answered,
            probes_refused=self._probes.refused_total,
        )
        return record.to_bytes()

    async def _report_telemetry(self, interval: float) -> None:
        """One small QoS 0, not retained record now and every ``interval`` s while connected."""
        topic = self.topics.telemetry(self.node_id)
        while True:
            if self.connection.connected:
                try:
                    payload = self._telemetry_record()
                    await self.connection.publish(topic, payload, qos=0, timeout=interval)
                    self.stats["telemetry_records"] += 1
                    self.stats["telemetry_bytes"] += len(payload)
                except Exception as e:  # a missed record shows as staleness: never stop reporting
                    self.log.debug("telemetry record not sent", error=str(e))
            await asyncio.sleep(interval)

    async def _stop_reporting(self) -> None:
        task, self._reporting = self._reporting, None
        tasks = [t for t in (task, *self._answering) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_probe(self, message: Message) -> None:
        """Answer a link probe at once, outside the agents' slots (see probe.py); refuse a bad one. The
        answer is written from a task: a backed-up connection must never hold up the requests queued
        behind a probe. With ``_MAX_PROBE_ANSWERS`` answers still unwritten, a probe is dropped unread
        (counted): the prober then sees the slow link it is measuring."""
        if len(self._answering) >= _MAX_PROBE_ANSWERS:
            self.stats["probes_dropped"] += 1
            return
        answer = self._probes.answer(bytes(message.payload))
        if answer is None:
            self.stats["probes_refused"] += 1
            return
        self.stats["probes_answered"] += 1
        task = asyncio.create_task(self._answer_probe(*answer), name=f"probe-answer-{self.node_id}")
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer_probe(self, topic: str, payload: bytes) -> None:
        with contextlib.suppress(Exception):  # a lost answer is what the prober measures
            await self.connection.publish(topic, payload, qos=0, timeout=1.0)

    def _claim(self, agent: Agent, env: Envelope, task: asyncio.Task[None]) -> None:
        """Tell the requester this node is working on ``env`` (only requests still running after
        ``claim_after``: fast ones cost nothing), so it can fail them at once if this node dies."""
        if task.done() or not env.reply_to:
            return
        event = _event(agent, env, {"claimed": self.node_id})

        async def publish(topic: str) -> None:
            # QoS 0: a lost claim only makes a requester treat the request as lost if a replica dies
            with contextlib.suppress(Exception):
                await self.connection.publish(topic, self._encode(event), qos=0, timeout=5.0)

        claim = asyncio.create_task(publish(env.reply_to))
        self._claims.add(claim)
        claim.add_done_callback(self._claims.discard)

    async def _refuse(self, agent: Agent, env: Envelope, message: str) -> None:
        """Answer ``overloaded`` without waiting for the socket (see the module doc)."""
        if not env.reply_to:
            await self._send_error(agent, env, "overloaded", message, retryable=True)
            return
        self.stats["errors"] += 1
        reply = env.error_reply("overloaded", message, sender=agent.agent_id, retryable=True)
        frame, props, topic = self._encode(reply), mqtt5_properties(reply), env.reply_to
        if len(self._refusing) >= _MAX_REFUSALS:  # the socket is not keeping up: that is backpressure
            await asyncio.wait(set(self._refusing), return_when=asyncio.FIRST_COMPLETED)

        async def publish() -> None:
            try:
                await self.connection.publish(topic, frame, qos=0, properties=props, timeout=5.0)
            except (BrokerUnavailableError, ValueError) as e:
                self.log.warning("overload refusal lost", agent=agent.agent_id, error=str(e))

        task = asyncio.create_task(publish())
        self._refusing.add(task)
        task.add_done_callback(self._refusing.discard)

    def _context(self, agent: Agent, env: Envelope) -> AgentContext:
        streams = env.kind == Kind.REQUEST and bool(env.reply_to)
        return AgentContext(
            agent_id=agent.agent_id,
            node_id=self.node_id,
            client=self.client,
            deadline=env.deadline,
            log=self.log.bind(agent=agent.agent_id, request=env.id, trace=env.trace_id),
            emit=self._progress_emitter(agent, env) if streams else None,
        )

    def _progress_emitter(self, agent: Agent, env: Envelope) -> Emit:
        """How a handler's progress events (``AgentContext.progress``) reach its requester: EVENT
        envelopes like a forwarding hop's, at ``reply_to`` under the request's correlation id.
        QoS 1 on the node's one connection, which keeps them in the order they were written."""
        assert env.reply_to
        reply_to = env.reply_to

        async def emit(meta: dict[str, Any], parts: tuple[TextPart | TensorPart, ...]) -> bool:
            if "claimed" in meta:  # the node's own liveness event (see _claim): a handler may not fake it
                self.log.warning("progress event not sent: meta key 'claimed' is reserved", agent=agent.agent_id)
                return False
            try:
                frame = self._encode(_event(agent, env, meta, parts))
            except (ProtocolError, ValueError, TypeError) as e:  # the handler's meta or parts
                self.log.warning("progress event not sent: cannot be encoded", agent=agent.agent_id, error=str(e))
                return False
            remaining = env.remaining()
            try:
                await self.connection.publish(
                    reply_to, frame, qos=1, timeout=max(1.0, remaining) if remaining is not None else None
                )
            except Exception as e:  # never the handler's problem: the reply still goes out
                self.log.info("progress event lost", agent=agent.agent_id, request=env.id, error=str(e))
                return False
            return True

        return emit

    async def _serve(self, agent: Agent, env: Envelope) -> None:
        started = time.time()
        arrived = time.perf_counter()
        ctx = self._context(agent, env)
        meter = self.meter.agents[agent.agent_id]
        ran: float | None = None  # when the handler started (telemetry)
        try:
            async with self._slots[agent.agent_id].sem:
                ran = meter.start()
                remaining = env.remaining()
                async with asyncio.timeout(remaining if remaining is not None else None):
                    result = await agent.handle(env, ctx)
            reply = self._as_reply(agent, env, result)
        except asyncio.CancelledError:
            if ran is not None:
                meter.finish(ran, None)
            await self._send_error(
                agent, env, "node_stopping", f"node {self.node_id} stopped before the handler finished"
            )
            raise
        except TimeoutError:
            ctx.log.warning("handler missed the deadline")
            reply = env.error_reply(
                "deadline_exceeded", "the handler did not finish before the deadline", sender=agent.agent_id
            )
        except AgentError as e:
            ctx.log.info("handler refused", code=e.code, error=str(e))
            reply = env.error_reply(e.code, str(e), sender=agent.agent_id, retryable=e.retryable)
        except Exception as e:
            ctx.log.exception("handler raised")
            reply = env.error_reply(
                "handler_error", f"{type(e).__name__}: {e}", sender=agent.agent_id, exception=type(e).__name__
            )
        if ran is not None:
            meter.finish(ran, reply)
        try:
            await ctx.flush()  # the handler's progress events all go out before its answer
            if self.forwarding is not None:
                nxt = self.forwarding.next_hop(env, reply)
                if nxt is not None:
                    await self._forward(self.forwarding, nxt, agent, env, reply, started)
                    return
                reply = self.forwarding.final(env, reply)
            await self._send(agent, env, reply, held=time.perf_counter() - arrived)
        except Exception:  # never an unhandled task exception: the node keeps serving
            ctx.log.exception("answer lost")

    async def _forward(
        self, forwarding: Forwarding, nxt: str, agent: Agent, env: Envelope, reply: Envelope, started: float
    ) -> None:
        """Escalate straight to the next agent on the route: one hop, not a round trip through the
        requester. The requester gets a progress event so it can time the hop and fall through if
        the next stage never answers. What is forwarded is ``forwarding``'s decision."""
        try:
            next_inbox = self.topics.inbox(nxt)
        except ValueError as e:  # the hop is no agent id: tell the requester, do not guess
            self.log.warning("forward refused: bad route hop", agent=agent.agent_id, to=nxt)
            await self._send(agent, env, env.error_reply("bad_route", str(e), sender=agent.agent_id, hop=nxt))
            return
        fwd, hop = forwarding.forwarded(env, reply, nxt, agent_id=agent.agent_id, node_id=self.node_id, started=started)
        try:
            frame = self._encode(fwd)
        except ProtocolError as e:
            self.log.error("forward failed", agent=agent.agent_id, to=nxt, error=str(e))
            await self._send(agent, env, env.error_reply("forward_failed", str(e), sender=agent.agent_id))
            return
        hop["bytes"] = len(frame)
        # The progress event goes first: MQTT keeps one client's publishes in order, so the
        # requester learns of the hop before the next stage can possibly answer.
        if env.reply_to:
            with contextlib.suppress(BrokerUnavailableError, ValueError):
                await self.connection.publish(env.reply_to, self._encode(_event(agent, env, {"hop": hop})), qos=1)
        try:
            await self.connection.publish(next_inbox, frame, qos=1, properties=mqtt5_properties(fwd))
        except (BrokerUnavailableError, ValueError) as e:
            self.log.error("forward failed", agent=agent.agent_id, to=nxt, error=str(e))

    def _as_reply(self, agent: Agent, env: Envelope, result: Reply) -> Envelope:
        if isinstance(result, Envelope):
            return result.model_copy(
                update={
                    "kind": result.kind if result.kind in (Kind.REPLY, Kind.ERROR) else Kind.REPLY,
                    "sender": agent.agent_id,
                    "recipient": env.sender,
                    "correlation_id": env.correlation_id or env.id,
                    "trace_id": env.trace_id,
                    "parent_id": env.id,
                    "reply_to": None,
                }
            )
        if result is None:
            return env.reply(sender=agent.agent_id)
        if isinstance(result, str):
            return env.reply(result, sender=agent.agent_id)
        if isinstance(result, (list, tuple)) and all(isinstance(p, (TextPart, TensorPart)) for p in result):
            return env.reply(*result, sender=agent.agent_id)
        raise TypeError(f"handler returned {type(result).__name__}; expected Envelope, str, list of parts or None")

    async def _send(self, agent: Agent, request: Envelope, reply: Envelope, *, held: float | None = None) -> None:
        """Publish ``reply`` at the request's ``reply_to``. ``held``: seconds the request spent on this
        node, stamped into MQTT 5 user properties for the requester's link estimate (telemetry.py)."""
        if reply.kind == Kind.ERROR:
            self.stats["errors"] += 1
        else:
            self.stats["replies"] += 1
        if not request.reply_to:
            return  # fire-and-forget request: nobody waits for the answer
        try:
            frame = self._encode(reply)
        except ProtocolError as e:
            self.log.error("reply could not be encoded", agent=agent.agent_id, error=str(e))
            await self._send_error(agent, request, "bad_reply", f"the agent's reply could not be encoded: {e}")
            return
        remaining = request.remaining()
        props = mqtt5_properties(reply)
        if held is not None and self.telemetry_interval:
            props["UserProperty"] = [*props["UserProperty"], *served_properties(self.node_id, held)]
        try:
            await self.connection.publish(
                request.reply_to,
                frame,
                qos=1,
                properties=props,
                timeout=max(1.0, remaining) if remaining is not None else None,
            )
        except BrokerUnavailableError as e:
            self.log.error("reply lost: broker unavailable", agent=agent.agent_id, request=request.id, error=str(e))
        except ValueError as e:  # reply_to is not a topic one can publish to (wildcards, empty)
            self.log.warning("reply lost: bad reply_to", agent=agent.agent_id, reply_to=request.reply_to, error=str(e))

    def _encode(self, envelope: Envelope) -> bytes:
        return encode(envelope, self.limits, signing_key=self.keyring)

    async def _send_error(
        self, agent: Agent, request: Envelope, code: str, message: str, *, retryable: bool = False, **detail: Any
    ) -> None:
        reply = request.error_reply(code, message, sender=agent.agent_id, retryable=retryable, **detail)
        if not request.reply_to:
            self.stats["errors"] += 1
            self.log.warning("request failed with no reply address", agent=agent.agent_id, code=code, error=message)
            with contextlib.suppress(Exception):
                await self.client.publish(self.topics.errors(agent.agent_id), reply)
            return
        await self._send(agent, request, reply)

    async def _report(self, agent: Agent, env: Envelope, code: str, message: str, **detail: Any) -> None:
        """Refuse a decoded request without answering it: log it and report it on the agent's
        errors topic (SPEC §12 items 7-8). For frames that are authentic but out of place (another
        agent's, or too old), where an answer at ``reply_to`` could fail a genuine pending request."""
        claimed = {"id": env.id, "sender": env.sender, "recipient": env.recipient}
        self.log.warning("request refused", agent=agent.agent_id, code=code, error=message, claimed=claimed)
        await self._publish_report(agent, code, message, {"claimed": claimed, **detail})

    async def _publish_report(self, agent: Agent, code: str, message: str, detail: dict[str, Any]) -> None:
        self.stats["errors"] += 1
        info = ErrorInfo(code=code, message=message, agent=agent.agent_id, detail=detail)
        with contextlib.suppress(Exception):
            await self.client.publish(
                self.topics.errors(agent.agent_id),
                Envelope(kind=Kind.ERROR, sender=agent.agent_id, created_at=time.time(), error=info),
            )

    async def _reject_frame(self, agent: Agent, message: Message, error: ProtocolError) -> None:
        """Answer a frame we could not decode, if we can tell where the answer should go."""
        payload: bytes = message.payload  # type: ignore[assignment]
        header = error.header or {}
        unsigned = isinstance(error, (SignatureError, UnsignedFrameError))
        if not header and (unsigned or error.code in ("frame_too_large", "header_too_large")):
            # Refused before its header was read: read it now (bounded by the default limits) to
            # name the sender in the log and, for an oversized frame, to answer it.
            with contextlib.suppress(ProtocolError):
                header = peek_header(payload)
        if unsigned:
            # Not from the deployment: everything in it is unauthenticated, so answering at its
            # reply address would let anyone make this node publish anywhere. Log and report only.
            reply_to = corr = None
            claimed = {k: header.get(k) for k in ("id", "sender") if isinstance(header.get(k), str)}
            self.stats["unsigned_rejected"] += 1
            self.log.warning(
                "frame rejected: not signed by the deployment",
                agent=agent.agent_id,
                code=error.code,
                error=error.message,
                claimed=claimed,
                size=len(payload),
            )
            await self._publish_report(agent, error.code, error.message, {"claimed": claimed})
            return
        reply_to, corr = _error_address(header, message.properties)
        sender = _usable(header.get("sender"), 256) or "unknown"
        self.log.warning(
            "bad frame",
            agent=agent.agent_id,
            code=error.code,
            error=error.message,
            field=error.field,
            reply_to=reply_to,
            size=len(payload),
        )
        detail = {"field": error.field} if error.field else {}
        info = ErrorInfo(
            code="bad_frame", message=f"{error.code}: {error.message}", agent=agent.agent_id, detail=detail
        )
        reply = Envelope(
            kind=Kind.ERROR,
            sender=agent.agent_id,
            recipient=sender,
            correlation_id=corr,
            created_at=time.time(),
            error=info,
        )
        if reply_to and corr:
            try:
                await self.connection.publish(reply_to, self._encode(reply), qos=1, properties=mqtt5_properties(reply))
            except BrokerUnavailableError:
                self.log.error("error reply lost: broker unavailable", agent=agent.agent_id)
            except ValueError as e:
                self.log.warning("error reply lost: bad reply_to", agent=agent.agent_id, error=str(e))
        else:
            with contextlib.suppress(Exception):
                await self.client.publish(self.topics.errors(agent.agent_id), reply)


def _event(
    agent: Agent, request: Envelope, meta: dict[str, Any], parts: Sequence[TextPart | TensorPart] = ()
) -> Envelope:
    """An EVENT about ``request`` for its requester (claims, cascade hops, a handler's progress):
    addressed and correlated like the answer will be (SPEC §12 items 3 and 10)."""
    return Envelope(
        kind=Kind.EVENT,
        sender=agent.agent_id,
        recipient=request.sender,
        correlation_id=request.correlation_id or request.id,
        trace_id=request.trace_id,
        parent_id=request.id,
        meta=meta,
        parts=list(parts),
    )
