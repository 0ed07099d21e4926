"""Link probes (SPEC §11.4): a client times a small message to a node and its answer, to know the path's
RTT and, from a larger one, its throughput.

A probe is a JSON header line, ``\\n``, then padding; the node answers at once (not through its agents'
slots) with a small JSON record on the probe's ``reply_to``. Nothing in a probe is trusted: the node
answers only at a client's probe topic, ``<base>/clients/<client>/probes``, never with more bytes than
the probe had, and refuses (counts, never raises) anything oversized or malformed. So a probe can
neither be aimed at another topic nor amplified.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols import AGENT_ID_PATTERN, Topics, portable_topic_problem

if TYPE_CHECKING:
    from .telemetry import Telemetry

MAX_PROBE_BYTES = 256 * 1024  # a node refuses larger probes
MAX_PROBE_HEADER = 1024  # the JSON line must end within this many bytes
MAX_ANSWER_BYTES = 1024  # a client drops larger answers unread
SMALL_PROBE_BYTES = 128  # RTT probes
LARGE_PROBE_BYTES = 16 * 1024  # throughput probes

ProbeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
NodeId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]


class ProbeHeader(BaseModel):
    """The JSON line that starts a probe."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    id: ProbeId
    reply_to: str = Field(max_length=1024)


class ProbeAnswer(BaseModel):
    """A node's answer: which probe, who answered, and how many bytes of it arrived."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    id: ProbeId
    node_id: NodeId
    size: int = Field(ge=0, le=MAX_PROBE_BYTES)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def make_probe(probe_id: str, reply_to: str, size: int, node_id: str) -> bytes:
    """A probe of at least ``size`` bytes, padded so that ``node_id``'s answer fits in it (a node
    answers no probe smaller than its answer)."""
    header = ProbeHeader(id=probe_id, reply_to=reply_to).model_dump_json().encode() + b"\n"
    answer = len(ProbeAnswer(id=probe_id, node_id=node_id, size=MAX_PROBE_BYTES).to_bytes())
    size = min(max(size, len(header), answer), MAX_PROBE_BYTES)
    return header + bytes(size - len(header))


def parse_answer(payload: bytes) -> ProbeAnswer | None:
    """The answer in ``payload``; None when it is oversized or malformed."""
    if len(payload) > MAX_ANSWER_BYTES:
        return None
    try:
        return ProbeAnswer.model_validate_json(payload)
    except (ValidationError, ValueError):
        return None


class ProbeResponder:
    """A node's side: checks a probe and builds its answer. Counts what it answers and refuses."""

    def __init__(self, topics: Topics, node_id: str, max_bytes: int = MAX_PROBE_BYTES) -> None:
        self.topics = topics
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.answered = 0
        self.refused: dict[str, int] = {}

    def answer(self, payload: bytes) -> tuple[str, bytes] | None:
        """(topic, answer) for a valid probe; None (counted in ``refused`` by reason) otherwise."""
        why, result = self._check(payload)
        if why is not None:
            self.refused[why] = self.refused.get(why, 0) + 1
            return None
        self.answered += 1
        return result

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def _check(self, payload: bytes) -> tuple[str | None, tuple[str, bytes] | None]:
        if len(payload) > self.max_bytes:
            return "too_large", None
        end = payload.find(b"\n", 0, MAX_PROBE_HEADER)
        if end < 0:
            if len(payload) > MAX_PROBE_HEADER:
                return "bad_header", None
            end = len(payload)
        try:
            header = ProbeHeader.model_validate_json(payload[:end])
        except (ValidationError, ValueError):
            return "bad_header", None
        if self.topics.parse_probe_replies(header.reply_to) is None or portable_topic_problem(header.reply_to):
            return "bad_reply_to", None
        answer = ProbeAnswer(id=header.id, node_id=self.node_id, size=len(payload)).to_bytes()
        if len(answer) > len(payload):
            return "too_small", None
        return None, (header.reply_to, answer)


Targets = Iterable[str] | Callable[[], Iterable[str]] | None


class Prober:
    """Probes nodes every ``interval`` seconds through a :class:`~aiflow_agents.telemetry.Telemetry`: a
    small probe per node each round (RTT), a large one instead every ``large_every``-th probe of that
    node (throughput). ``nodes``: ids, a callable giving them each round, or None for every node
    presence says is online. A node whose last probe is still out (awaiting its answer or timeout,
    which backs off on a lossy link) is skipped that round: a slow or dead link is probed less often,
    never by piling probes up, and never holds up the probing of the others."""

    def __init__(
        self,
        telemetry: Telemetry,
        nodes: Targets = None,
        *,
        interval: float = 1.0,
        small_bytes: int = SMALL_PROBE_BYTES,
        large_bytes: int = LARGE_PROBE_BYTES,
        large_every: int = 10,
    ) -> None:
        if interval <= 0 or large_every < 1:
            raise ValueError("interval must be > 0 and large_every >= 1")
        self.telemetry = telemetry
        self.nodes = nodes
        self.interval = interval
        self.small_bytes = small_bytes
        self.large_bytes = large_bytes
        self.large_every = large_every
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._pinging: dict[str, asyncio.Task[None]] = {}  # node -> its probe still out
        self._sent: dict[str, int] = {}  # node -> probes sent to it

    def targets(self) -> list[str]:
        nodes = self.nodes
        if nodes is None:
            presence = self.telemetry.client.presence
            return [n for n in list(presence.nodes) if presence.node_online(n)]
        return list(nodes() if callable(nodes) else nodes)

    async def start(self) -> Prober:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="telemetry-prober")
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Prober:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        try:
            while True:
                began = time.monotonic()
                targets = set(self.targets())
                for node in [n for n in self._sent if n not in targets]:
                    del self._sent[node]
                for node in sorted(targets - self._pinging.keys()):
                    n = self._sent[node] = self._sent.get(node, 0) + 1
                    large = self.large_bytes > self.small_bytes and n % self.large_every == 0
                    task = asyncio.create_task(self._ping(node, self.large_bytes if large else self.small_bytes))
                    self._pinging[node] = task
                    task.add_done_callback(lambda _, node=node: self._pinging.pop(node, None))
                self.rounds += 1
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))
        finally:
            pinging = list(self._pinging.values())
            for task in pinging:
                task.cancel()
            await asyncio.gather(*pinging, return_exceptions=True)

    async def _ping(self, node: str, size: int) -> None:
        try:
            await self.telemetry.ping(node, size)
        except Exception as e:
            self.telemetry.log.warning("probe failed", node=node, error=repr(e))
