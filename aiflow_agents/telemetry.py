"""Telemetry: what a scheduler knows about compute on each agent and transfer over each link, and how
old that knowledge is (SPEC §11.4).

Nodes measure and publish. Around each handler run a node counts calls and errors and smooths
(EWMA) the service time and, where the reply's ``meta.cost`` says how much work it was, the time per
layer and per token; it adds the requests running and waiting per agent and the process's CPU load,
and every ``telemetry_interval`` seconds publishes one :class:`TelemetryRecord` (JSON, QoS 0, not
retained) on ``<base>/telemetry/nodes/<node>``. It answers link probes (:mod:`.probe`) at once.

Clients listen and probe. :class:`Telemetry` rides on a :class:`~aiflow_agents.Client`'s connection::

    async with Telemetry(client) as tm:          # or: tm = await Telemetry(client).start()
        await tm.probe(["node-a", "node-b"])     # optional: RTT and throughput per node
        tm.agent("small").ms_per_layer, tm.link("node-a").rtt_ms, tm.is_stale("node-a")

It keeps the latest record per node with its receive time on this process's monotonic clock (never
the sender's ``ts``), so staleness is immune to clock skew: a record older than ``stale_after`` times
its own interval is stale, and a node that stops (frozen, crashed, partitioned) visibly goes stale.
Link estimates come from probes and from real traffic: a reply whose node stamped the time the request
spent there (MQTT 5 user properties ``aiflow-node``/``aiflow-service-ms``, stamped by nodes with
telemetry on; none over MQTT 3.1.1; trusted only from a node presence lists as a host of the replying
agent) is fed in automatically as ``elapsed - service``;
:meth:`Telemetry.observe` takes other timings. Everything from the network is parsed with bounds;
a bad record or answer is counted in ``stats`` and ignored. :meth:`Telemetry.overhead` says what
all this costs in messages and bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols import AGENT_ID_PATTERN, Envelope, Kind, new_id, ops

from .errors import BrokerUnavailableError
from .probe import SMALL_PROBE_BYTES, Prober, Targets, make_probe, parse_answer

if TYPE_CHECKING:
    from .client import Client, Exchange
    from .mqtt import Message

DEFAULT_TELEMETRY_INTERVAL = 2.0  # s between a node's records
STALE_AFTER = 3.0  # a record older than this many of its intervals is stale
MAX_RECORD_BYTES = 64 * 1024  # receivers drop larger records unread
MAX_RECORD_AGENTS = 256  # agents one record may list
EWMA_ALPHA = 0.2  # weight of a new sample in the node's smoothed costs
SERVED_BY = "aiflow-node"  # reply user property: the node that answered
SERVICE_MS = "aiflow-service-ms"  # reply user property: ms the request spent on that node
MAX_PROBE_TIMEOUT = 5.0  # s: a lost probe doubles the next one's timeout up to this (RFC 6298 backoff)
_RTT_BYTES = 2048  # a sample moving at most this much is timed as pure RTT
_LATE_MEMORY = 256  # probes given up that a late answer can still be matched to (all nodes together)
_WIRE_EXTRA = 5  # MQTT bytes besides topic and payload (fixed header, topic length, properties length)
_MAX_COUNT = 1 << 63

Count = Annotated[int, Field(ge=0, le=_MAX_COUNT)]
Ms = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
_ID = re.compile(AGENT_ID_PATTERN)


# -- the record (wire format, SPEC §11.4) ----------------------------------------------------------
class AgentLoad(BaseModel):
    """One agent on one node: how busy it is and what its work costs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    calls: Count = 0  # handler runs finished (errors included)
    errors: Count = 0  # of which ended in an error reply (deadline, refusal, exception)
    in_flight: Count = 0  # handlers running now
    queued: Count = 0  # accepted, waiting for a free handler slot
    service_ms: Ms | None = None  # EWMA of the handler time of successful runs
    ms_per_layer: Ms | None = None  # EWMA of handler ms / meta.cost.layers (replies that report layers)
    ms_per_token: Ms | None = None  # EWMA of handler ms / meta.cost.tokens (replies that report tokens)


class CpuLoad(BaseModel):
    """The node process's CPU use over the last interval (1.0 = one core busy) and the host's load."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    process: float = Field(default=0.0, ge=0, le=1e6, allow_inf_nan=False)
    loadavg1: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    cores: int | None = Field(default=None, ge=1, le=1 << 20)


class TelemetryRecord(BaseModel):
    """What a node publishes every ``interval`` seconds. ``ts`` is its wall clock (informative only:
    receivers judge age by their own receive time); ``seq`` grows by one per record of a run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    node_id: AgentId
    tier: str | None = Field(default=None, max_length=64)
    ts: float = Field(allow_inf_nan=False)
    seq: Count = 0
    interval: float = Field(gt=0, le=86400, allow_inf_nan=False)
    cpu: CpuLoad = CpuLoad()
    agents: dict[AgentId, AgentLoad] = Field(default_factory=dict, max_length=MAX_RECORD_AGENTS)
    probes_answered: Count = 0
    probes_refused: Count = 0

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_RECORD_BYTES) -> TelemetryRecord:
        """Parse a record; ``ValueError`` when it is oversized or malformed (pydantic's is one)."""
        if len(data) > max_bytes:
            raise ValueError(f"telemetry record of {len(data)} bytes (at most {max_bytes})")
        return cls.model_validate_json(data)


# -- the node's side -------------------------------------------------------------------------------
def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)


def _units(cost: Any, key: str) -> int:
    value = cost.get(key) if isinstance(cost, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class AgentMeter:
    """Counters and smoothed costs of one agent, updated around each handler run (a few float ops)."""

    __slots__ = ("alpha", "calls", "errors", "ms_per_layer", "ms_per_token", "running", "service_ms")

    def __init__(self, alpha: float = EWMA_ALPHA) -> None:
        self.alpha = alpha
        self.calls = self.errors = self.running = 0
        self.service_ms: float | None = None
        self.ms_per_layer: float | None = None
        self.ms_per_token: float | None = None

    def start(self) -> float:
        """A handler starts; returns the time to pass to :meth:`finish`."""
        self.running += 1
        return time.perf_counter()

    def finish(self, started: float, reply: Envelope | None) -> None:
        """The handler ended with ``reply`` (None: cancelled). Only successful runs are timed."""
        self.running -= 1
        self.calls += 1
        if reply is None or reply.kind == Kind.ERROR:
            self.errors += 1
            return
        ms = (time.perf_counter() - started) * 1000.0
        a = self.alpha
        self.service_ms = _ewma(self.service_ms, ms, a)
        cost = reply.meta.get(ops.COST)
        if layers := _units(cost, "layers"):
            self.ms_per_layer = _ewma(self.ms_per_layer, ms / layers, a)
        if tokens := _units(cost, "tokens"):
            self.ms_per_token = _ewma(self.ms_per_token, ms / tokens, a)

    def load(self, waiting: int) -> AgentLoad:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return AgentLoad(
            calls=self.calls,
            errors=self.errors,
            in_flight=self.running,
            queued=max(0, waiting),
            service_ms=r(self.service_ms),
            ms_per_layer=r(self.ms_per_layer),
            ms_per_token=r(self.ms_per_token),
        )


class NodeMeter:
    """A node's meters: one :class:`AgentMeter` per agent and the process's CPU load between records."""

    def __init__(self, agent_ids: Iterable[str], alpha: float = EWMA_ALPHA) -> None:
        self.agents = {a: AgentMeter(alpha) for a in agent_ids}
        self.seq = 0
        self._cpu_at = (time.monotonic(), time.process_time())

    def cpu(self) -> CpuLoad:
        """CPU seconds per second of this process since the last call, and the 1-minute load average."""
        wall, cpu = time.monotonic(), time.process_time()
        (wall0, cpu0), self._cpu_at = self._cpu_at, (wall, cpu)
        load: float | None = None
        with contextlib.suppress(OSError, AttributeError):
            load = round(os.getloadavg()[0], 3)
        return CpuLoad(
            process=round(max(0.0, cpu - cpu0) / max(wall - wall0, 1e-6), 4), loadavg1=load, cores=os.cpu_count()
        )

    def record(
        self,
        node_id: str,
        *,
        tier: str | None,
        interval: float,
        held: Mapping[str, int],
        probes_answered: int = 0,
        probes_refused: int = 0,
    ) -> TelemetryRecord:
        """The next record. ``held``: per agent, requests running or waiting (the node's slot count)."""
        self.seq += 1
        return TelemetryRecord(
            node_id=node_id,
            tier=tier,
            ts=time.time(),
            seq=self.seq,
            interval=interval,
            cpu=self.cpu(),
            agents={a: m.load(held.get(a, 0) - m.running) for a, m in self.agents.items()},
            probes_answered=probes_answered,
            probes_refused=probes_refused,
        )


def served_properties(node_id: str, service_s: float) -> list[tuple[str, str]]:
    """The user properties a node adds to a reply: who answered and how long the request was there."""
    return [(SERVED_BY, node_id), (SERVICE_MS, f"{service_s * 1000.0:.3f}")]


def parse_served(properties: Mapping[str, Any]) -> tuple[str, float] | None:
    """(node id, seconds on the node) from a reply's user properties; None if absent or implausible."""
    node: str | None = None
    ms: float | None = None
    for pair in properties.get("UserProperty") or ():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            continue
        key, value = pair
        if key == SERVED_BY and isinstance(value, str):
            node = value
        elif key == SERVICE_MS and isinstance(value, str) and len(value) <= 32:
            with contextlib.suppress(ValueError):
                ms = float(value)
    if node is None or ms is None or not (0.0 <= ms < 1e9) or not _valid_id(node):
        return None
    return node, ms / 1000.0


def _valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


# -- what a client reads ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NodeTelemetry:
    """A node's latest record, when it arrived (this process's monotonic clock) and how old it is."""

    record: TelemetryRecord
    received_at: float
    age: float
    stale: bool


@dataclass(frozen=True, slots=True)
class AgentHost:
    """One host of an agent, as its latest record describes it."""

    node_id: str
    load: AgentLoad
    cpu: CpuLoad
    tier: str | None
    age: float
    stale: bool


def _weighted(hosts: tuple[AgentHost, ...], attr: str) -> float | None:
    pairs = [(v, max(h.load.calls, 1)) for h in hosts if (v := getattr(h.load, attr)) is not None]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


@dataclass(frozen=True, slots=True)
class AgentTelemetry:
    """An agent over all its hosts. Aggregates use fresh hosts only (costs weighted by calls); an agent
    whose every host is stale says so in ``stale`` and aggregates nothing."""

    agent_id: str
    hosts: tuple[AgentHost, ...]

    @property
    def fresh(self) -> tuple[AgentHost, ...]:
        return tuple(h for h in self.hosts if not h.stale)

    @property
    def stale(self) -> bool:
        return not self.fresh

    @property
    def age(self) -> float:
        return min(h.age for h in self.hosts)

    @property
    def in_flight(self) -> int:
        return sum(h.load.in_flight for h in self.fresh)

    @property
    def queued(self) -> int:
        return sum(h.load.queued for h in self.fresh)

    @property
    def service_ms(self) -> float | None:
        return _weighted(self.fresh, "service_ms")

    @property
    def ms_per_layer(self) -> float | None:
        return _weighted(self.fresh, "ms_per_layer")

    @property
    def ms_per_token(self) -> float | None:
        return _weighted(self.fresh, "ms_per_token")


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """The path from this client to a node (through the broker), from probes and real traffic.

    ``rtt_ms``/``rtt_var_ms``: smoothed round trip of small messages and its mean deviation (RFC 6298
    weights); ``throughput_bps``: **bits** per second beyond the RTT for larger messages (None: not
    measured yet; ``inf``: too fast to tell with the sizes seen). Probes time the client-to-node
    direction (answers are small); replies fed in mix both directions. ``last_ok``/``age``: when the
    last sample arrived (monotonic) and how long ago; ``up``: a sample arrived and fewer than
    ``down_after`` probes in a row have failed since."""

    rtt_ms: float | None
    rtt_var_ms: float | None
    throughput_bps: float | None
    samples: int
    last_ok: float | None
    consecutive_failures: int
    up: bool
    age: float | None
    #: Median of the last 3 small samples: follows a lasting change within 2 samples (the smoothed RTT takes
    #: ~8), while one outlier (a retransmission) moves it not at all. Schedulers read it beside ``rtt_ms``.
    recent_rtt_ms: float | None = None
    node_id: str = ""

    def transfer_time(self, nbytes: int) -> float | None:
        """Seconds of network time for a request/reply moving ``nbytes`` in all (service time not
        included): the RTT plus the bytes at the measured throughput (the RTT alone while unmeasured);
        None while the RTT is unknown."""
        if self.rtt_ms is None:
            return None
        rate = self.throughput_bps
        return self.rtt_ms / 1000.0 + (nbytes * 8.0 / rate if rate else 0.0)


class _Link:
    """Mutable estimator behind a :class:`LinkEstimate`."""

    __slots__ = ("backoff", "failures", "last_ok", "recent", "rttvar", "samples", "spb", "srtt")

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=3)  # s, the last small samples
        self.srtt: float | None = None  # s
        self.rttvar: float | None = None  # s
        self.spb: float | None = None  # s per byte beyond the RTT
        self.samples = 0
        self.last_ok: float | None = None
        self.failures = 0
        self.backoff = 0  # probes lost in a row, capped: the next timeout is doubled this many times

    def sample(self, nbytes: int, net_s: float, now: float) -> None:
        """A request/reply moving ``nbytes`` took ``net_s`` of network time: small ones time the RTT,
        large ones (once the RTT is known) the time per byte beyond it."""
        self.samples += 1
        self.last_ok = now
        self.failures = self.backoff = 0
        net_s = max(0.0, net_s)
        if nbytes <= _RTT_BYTES or self.srtt is None:
            if nbytes <= _RTT_BYTES:
                self.recent.append(net_s)
                if self.srtt is None or self.rttvar is None:
                    self.srtt, self.rttvar = net_s, net_s / 2
                else:
                    self.rttvar += 0.25 * (abs(self.srtt - net_s) - self.rttvar)
                    self.srtt += 0.125 * (net_s - self.srtt)
            return
        spb = max(0.0, net_s - self.srtt) / max(1, nbytes - SMALL_PROBE_BYTES)
        self.spb = _ewma(self.spb, spb, 0.25)

    def lost(self) -> None:
        """A probe went unanswered in time: one more failure, and the next probe is waited for twice as
        long, so an RTT that jumped past the timeout is still caught instead of reading as dead."""
        self.failures += 1
        self.backoff = min(self.backoff + 1, 32)

    def timeout(self, nbytes: int, floor: float, cap: float = MAX_PROBE_TIMEOUT) -> float:
        """How long a probe of ``nbytes`` may take before it counts as lost: ``max(floor, 4 x RTT)`` plus
        the expected transfer, doubled per probe lost in a row since the last sample, the doubling
        stopping at ``cap`` seconds."""
        base = max(floor, 1.0) if self.srtt is None else max(floor, 4 * self.srtt) + 4 * nbytes * (self.spb or 0.0)
        return max(base, min(cap, base * 2.0**self.backoff))

    def estimate(self, node_id: str, now: float, down_after: int) -> LinkEstimate:
        rate = None if self.spb is None else (math.inf if self.spb <= 0 else 8.0 / self.spb)
        return LinkEstimate(
            node_id=node_id,
            rtt_ms=None if self.srtt is None else self.srtt * 1000.0,
            rtt_var_ms=None if self.rttvar is None else self.rttvar * 1000.0,
            throughput_bps=rate,
            samples=self.samples,
            last_ok=self.last_ok,
            consecutive_failures=self.failures,
            up=self.samples > 0 and self.failures < down_after,
            age=None if self.last_ok is None else now - self.last_ok,
            recent_rtt_ms=statistics.median(self.recent) * 1000.0 if self.recent else None,
        )


@dataclass(frozen=True, slots=True)
class Flow:
    """Messages and bytes (payload + topic + a few MQTT header bytes) of one kind, and their rates."""

    msgs: int
    bytes: int
    msgs_per_s: float
    bytes_per_s: float


@dataclass(frozen=True, slots=True)
class Overhead:
    """What telemetry cost this client since :meth:`Telemetry.start`: records received, probes sent,
    answers received; ``nodes``: nodes heard from, ``probed``: nodes probed."""

    elapsed_s: float
    records_in: Flow
    probes_out: Flow
    answers_in: Flow
    nodes: int
    probed: int

    @property
    def bytes_per_s(self) -> float:
        return self.records_in.bytes_per_s + self.probes_out.bytes_per_s + self.answers_in.bytes_per_s

    @property
    def msgs_per_s(self) -> float:
        return self.records_in.msgs_per_s + self.probes_out.msgs_per_s + self.answers_in.msgs_per_s


class Telemetry:
    """A client's view of node telemetry and link estimates (see the module doc).

    ``stale_after``: records older than this many of their own intervals are stale; ``down_after``:
    failed probes in a row that take a link down; ``min_timeout``: the shortest a probe is waited for
    (else ``4 x RTT``); ``max_timeout``: how far lost probes back that off (doubling per loss);
    ``record_traffic``: feed replies that carry their service time into the link estimates;
    ``max_nodes``: nodes remembered, records and links each (the least recently heard goes first).
    One per client: it owns the client's probe reply topic. ``on_record``: callables given each
    accepted record (a scheduler can re-plan on news instead of polling).

    A probe's answer that arrives after its timeout, while the link is still up and within
    ``max_timeout`` of the probe, is a sample like any other (a slow link is alive); once a link is
    down, late answers are only counted: those released together when an outage ends time the
    outage, not the link."""

    def __init__(
        self,
        client: Client,
        *,
        stale_after: float = STALE_AFTER,
        down_after: int = 2,
        min_timeout: float = 0.25,
        max_timeout: float = MAX_PROBE_TIMEOUT,
        record_traffic: bool = True,
        max_nodes: int = 4096,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.client = client
        self.topics = client.topics
        self.stale_after = stale_after
        self.down_after = down_after
        self.min_timeout = min_timeout
        self.max_timeout = max(max_timeout, min_timeout)
        self.record_traffic = record_traffic
        self.max_nodes = max_nodes
        self.max_record_bytes = max_record_bytes
        self.reply_topic = self.topics.probe_replies(client.client_id)
        self._records: OrderedDict[str, tuple[TelemetryRecord, float]] = OrderedDict()
        self._links: OrderedDict[str, _Link] = OrderedDict()
        self._outstanding: dict[str, tuple[str, asyncio.Future[float]]] = {}
        self._given_up: OrderedDict[str, tuple[str, float, int]] = OrderedDict()  # probe id -> (node, sent, bytes)
        self._probers: list[Prober] = []
        self._flows = {k: [0, 0] for k in ("records_in", "probes_out", "answers_in")}
        self._started_at: float | None = None
        self.on_record: list[Callable[[TelemetryRecord], None]] = []
        self.stats = {
            "records": 0,
            "bad_records": 0,  # oversized, malformed, or naming another node than its topic
            "retained_records": 0,  # records are never retained: a retained one is ignored
            "answers": 0,
            "bad_answers": 0,  # oversized, malformed, or from another node than the probed one
            "late_answers": 0,  # for a probe already given up (or never sent)
            "late_samples": 0,  # of which timed and fed in (the link was still up)
            "probes_lost": 0,
            "traffic_samples": 0,
        }
        self.log = structlog.get_logger("aiflow.telemetry").bind(client=client.client_id)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> Telemetry:
        """Subscribe to records and probe answers on the client's connection (before or after the
        client starts)."""
        if self._started_at is not None:
            return self
        conn = self.client.connection
        conn.route(self.topics.telemetry_filter, self._on_record)
        conn.route(self.reply_topic, self._on_answer)
        await conn.subscribe(self.topics.telemetry_filter, qos=0)
        await conn.subscribe(self.reply_topic, qos=0)
        if self.record_traffic:
            self.client.on_exchange.append(self._on_exchange)
        self._started_at = time.monotonic()
        return self

    async def stop(self) -> None:
        if self._started_at is None:
            return
        self._started_at = None
        for prober in self._probers:
            await prober.stop()
        self._probers.clear()
        with contextlib.suppress(ValueError):
            self.client.on_exchange.remove(self._on_exchange)
        conn = self.client.connection
        conn.unroute(self.topics.telemetry_filter)
        conn.unroute(self.reply_topic)
        await conn.unsubscribe(self.topics.telemetry_filter)
        await conn.unsubscribe(self.reply_topic)

    async def __aenter__(self) -> Telemetry:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- node records -------------------------------------------------------------------------
    def node(self, node_id: str) -> NodeTelemetry | None:
        kept = self._records.get(node_id)
        if kept is None:
            return None
        record, at = kept
        age = time.monotonic() - at
        return NodeTelemetry(record, at, age, age > self.stale_after * record.interval)

    def nodes(self) -> dict[str, NodeTelemetry]:
        return {n: t for n in list(self._records) if (t := self.node(n)) is not None}

    def age(self, node_id: str) -> float | None:
        """Seconds since the node's latest record arrived (None: never heard)."""
        kept = self._records.get(node_id)
        return None if kept is None else time.monotonic() - kept[1]

    def is_stale(self, node_id: str, max_age: float | None = None) -> bool:
        """Whether what we know of the node is too old to use: no record, or one older than
        ``max_age`` (default: ``stale_after`` x the record's interval)."""
        kept = self._records.get(node_id)
        if kept is None:
            return True
        limit = self.stale_after * kept[0].interval if max_age is None else max_age
        return time.monotonic() - kept[1] > limit

    def agent(self, agent_id: str) -> AgentTelemetry | None:
        """The agent over its online hosts (from presence) that have a record listing it; if presence
        knows no host yet, over every node whose record lists it. None when no record does."""
        ids = self.client.presence.host_ids(agent_id) or [
            n for n, (r, _) in self._records.items() if agent_id in r.agents
        ]
        hosts = []
        for node_id in ids:
            t = self.node(node_id)
            if t is not None and (load := t.record.agents.get(agent_id)) is not None:
                hosts.append(AgentHost(node_id, load, t.record.cpu, t.record.tier, t.age, t.stale))
        return AgentTelemetry(agent_id, tuple(hosts)) if hosts else None

    async def _on_record(self, message: Message) -> None:
        payload = bytes(message.payload)
        self._count("records_in", message.topic, len(payload))
        node_id = self.topics.parse_telemetry(message.topic)
        if node_id is None:
            self.stats["bad_records"] += 1
            return
        if message.retain:
            self.stats["retained_records"] += 1
            return
        try:
            record = TelemetryRecord.from_bytes(payload, self.max_record_bytes)
        except (ValueError, ValidationError) as e:
            self.stats["bad_records"] += 1
            self.log.debug("telemetry record ignored", node=node_id, error=str(e)[:200])
            return
        if record.node_id != node_id:
            self.stats["bad_records"] += 1
            return
        self.stats["records"] += 1
        self._records[node_id] = (record, time.monotonic())
        self._records.move_to_end(node_id)
        while len(self._records) > self.max_nodes:
            self._records.popitem(last=False)
        for listener in list(self.on_record):
            try:
                listener(record)
            except Exception:
                self.log.exception("telemetry listener failed")

    # -- links --------------------------------------------------------------------------------
    def link(self, node_id: str) -> LinkEstimate | None:
        link = self._links.get(node_id)
        return None if link is None else link.estimate(node_id, time.monotonic(), self.down_after)

    def links(self) -> dict[str, LinkEstimate]:
        now = time.monotonic()
        return {n: link.estimate(n, now, self.down_after) for n, link in self._links.items()}

    def observe(self, node_id: str, bytes_out: int, bytes_in: int, elapsed_s: float, service_s: float) -> None:
        """Feed one request's timing: ``elapsed_s`` from send to reply, of which ``service_s`` on the
        node; the rest is network time over ``bytes_out + bytes_in`` bytes."""
        if not (math.isfinite(elapsed_s) and math.isfinite(service_s)) or elapsed_s < 0 or not _valid_id(node_id):
            return
        self.stats["traffic_samples"] += 1
        self._link(node_id).sample(bytes_out + bytes_in, elapsed_s - service_s, time.monotonic())

    def _link(self, node_id: str) -> _Link:
        """The node's estimator, made on first use; at most ``max_nodes`` kept (least recently used go)."""
        link = self._links.get(node_id)
        if link is None:
            link = self._links[node_id] = _Link()
            while len(self._links) > self.max_nodes:
                self._links.popitem(last=False)
        else:
            self._links.move_to_end(node_id)
        return link

    def _on_exchange(self, ex: Exchange) -> None:
        # ``served_by`` is set only when presence lists that node as a host of the replying agent (client.py)
        if ex.served_by is None or ex.service_s is None or ex.error is not None or ex.latency is None:
            return
        if ex.request.route or ex.reply is None:
            return  # forwarded along a route: the time includes other nodes' work
        self.observe(ex.served_by, ex.bytes_out, ex.bytes_in, ex.latency, ex.service_s)

    async def ping(self, node_id: str, size: int = SMALL_PROBE_BYTES, *, timeout: float | None = None) -> float | None:
        """Probe ``node_id`` once with about ``size`` bytes: the round trip in seconds, fed into its link
        estimate, or None when unanswered in time (``timeout``, default ``max(min_timeout, 4 x RTT)``
        plus the expected transfer, backed off after losses), which counts as a failure; its answer
        may still arrive late and be fed in then (see the class doc)."""
        link = self._link(node_id)
        probe_id = new_id()[:16]
        topic = self.topics.probe(node_id)
        payload = make_probe(probe_id, self.reply_topic, size, node_id)
        wait = timeout if timeout is not None else link.timeout(len(payload), self.min_timeout, self.max_timeout)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._outstanding[probe_id] = (node_id, fut)
        sent = time.monotonic()
        published = False
        try:
            async with asyncio.timeout(wait):
                await self.client.connection.publish(topic, payload, qos=0, timeout=wait)
                published = True
                self._count("probes_out", topic, len(payload))
                answered = await fut
        except (TimeoutError, BrokerUnavailableError):
            link.lost()
            self.stats["probes_lost"] += 1
            if published:  # its answer may yet come: remember when it left
                self._given_up[probe_id] = (node_id, sent, len(payload))
                while len(self._given_up) > _LATE_MEMORY:
                    self._given_up.popitem(last=False)
            return None
        finally:
            self._outstanding.pop(probe_id, None)
        rtt = answered - sent
        link.sample(len(payload), rtt, answered)
        return rtt

    async def probe(self, nodes: Targets = None, **kwargs: Any) -> Prober:
        """Start a :class:`~aiflow_agents.probe.Prober` on ``nodes`` (None: every online node);
        stopped with this telemetry. ``kwargs``: its ``interval``, ``small_bytes``, ``large_bytes``,
        ``large_every``."""
        prober = Prober(self, nodes, **kwargs)
        self._probers.append(prober)
        return await prober.start()

    async def _on_answer(self, message: Message) -> None:
        payload = bytes(message.payload)
        now = time.monotonic()
        self._count("answers_in", message.topic, len(payload))
        answer = parse_answer(payload)
        if answer is None:
            self.stats["bad_answers"] += 1
            return
        waiting = self._outstanding.get(answer.id)
        if waiting is None:
            self.stats["late_answers"] += 1
            self._late(answer.id, answer.node_id, now)
            return
        node_id, fut = waiting
        if answer.node_id != node_id:
            self.stats["bad_answers"] += 1
            return
        self.stats["answers"] += 1
        if not fut.done():
            fut.set_result(now)

    def _late(self, probe_id: str, node_id: str, now: float) -> None:
        """An answer to a probe already given up: timed and fed in if the probed node sent it, the link
        is still up and it came within ``max_timeout`` (a slow link, not a dead one)."""
        given_up = self._given_up.pop(probe_id, None)
        if given_up is None:
            return
        probed, sent, nbytes = given_up
        if node_id != probed:
            self.stats["bad_answers"] += 1
            return
        link = self._links.get(node_id)
        if link is None or link.failures >= self.down_after or now - sent > self.max_timeout:
            return
        self.stats["late_samples"] += 1
        link.sample(nbytes, now - sent, now)

    # -- overhead -----------------------------------------------------------------------------
    def _count(self, flow: str, topic: str, size: int) -> None:
        f = self._flows[flow]
        f[0] += 1
        f[1] += size + len(topic) + _WIRE_EXTRA

    def overhead(self) -> Overhead:
        elapsed = time.monotonic() - self._started_at if self._started_at is not None else 0.0
        span = max(elapsed, 1e-9)

        def flow(name: str) -> Flow:
            msgs, size = self._flows[name]
            return Flow(msgs, size, msgs / span, size / span)

        return Overhead(
            elapsed_s=elapsed,
            records_in=flow("records_in"),
            probes_out=flow("probes_out"),
            answers_in=flow("answers_in"),
            nodes=len(self._records),
            probed=len(self._links),
        )
