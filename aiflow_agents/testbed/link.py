"""An emulated network link: a userspace TCP proxy that delays, paces, loses and cuts a byte stream.

This kernel has no ``netem``, so the testbed puts a :class:`LinkProxy` between a tier's MQTT
connections (or a Mosquitto bridge) and the broker they reach, the way toxiproxy works. Each
accepted connection gets its own upstream connection and two independent FIFO pipes:
``up`` (client -> target) and ``down`` (target -> client).

Timing model, per pipe (times from the event loop's monotonic clock):

- a chunk read at ``t`` is due at ``max(t + rtt/2 + U(0, jitter), previous due)``: jitter is drawn
  **uniformly** in ``[0, jitter_ms]`` per chunk and never reorders bytes;
- with a bandwidth, bytes are then serialised on a per-pipe "line busy until" clock
  (``len * 8 / bps``), in slices of a few milliseconds so one big write does not block the pipe
  and the receiver sees a smooth stream;
- ``loss`` is the probability that a 1448-byte segment is lost. TCP delivers it anyway, and all later
  bytes wait behind it (head-of-line), after a retransmission timeout ``max(200 ms, rtt + 4*jitter)``;
  a retransmission is lost with the same probability and the timeout doubles (TCP's backoff);
- the TCP handshake costs one round trip: the upstream connection opens ``rtt/2`` after the accept
  (when the SYN would arrive) and the client's first bytes leave no earlier than ``rtt`` after it;
- reading stops while more than ``max_buffer`` bytes are in flight in a pipe (backpressure: the
  sender's socket buffer fills as it would behind a slow link).

Outages (:meth:`LinkProxy.cut`): ``"blackhole"`` keeps connections open but delivers nothing either
way until :meth:`LinkProxy.restore` (then the held bytes arrive, as TCP retransmission would deliver
them); a connection opened during it is accepted and held too. ``"reset"`` closes every connection
now (RST) and every new one on accept until restore. :class:`Outage` describes periodic outages (a vehicle
driving through tunnels); the testbed's schedule (:mod:`aiflow_agents.testbed.links`) applies them.

Both sockets get TCP_NODELAY, and TCP_QUICKACK re-armed after every read: Mosquitto 2.0.11 keeps Nagle's
algorithm on for a bridge's outgoing socket, so without quick ACKs every small message through the proxy
waited for a delayed ACK (~44 ms per request/reply across a bridge, ~1.8 ms with them; numbers where it is set).

What it does not emulate: the proxy's kernel acknowledges bytes at once, so a sender's congestion
window and Nagle's algorithm see a zero-delay peer; loss costs delay, never bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["LinkProfile", "LinkProxy", "LinkStats", "Outage", "OutageMode"]

OutageMode = Literal["blackhole", "reset"]

SEGMENT = 1448  # payload bytes of one Ethernet-sized TCP segment (MSS 1460 minus timestamps)
MIN_RTO_S = 0.2  # Linux's minimum retransmission timeout
MAX_RETRANSMISSIONS = 15  # tcp_retries2: after this TCP would give up; we just stop adding delay
READ_SIZE = 64 * 1024
SLICE_S = 0.002  # bandwidth pacing granularity


def _number(d: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"link profile: {key} must be a number, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class LinkProfile:
    """What the link does to bytes crossing it. Delays in milliseconds, bandwidths in Mbit/s (10^6 bit/s)."""

    rtt_ms: float = 0.0  # round trip added by the link (half each way)
    jitter_ms: float = 0.0  # extra one-way delay per chunk, uniform in [0, jitter_ms]; never reorders bytes
    up_mbps: float | None = None  # client -> target bandwidth (None: unlimited)
    down_mbps: float | None = None  # target -> client bandwidth (None: unlimited)
    loss: float = 0.0  # probability that a 1448-byte segment is lost (delivered after a retransmission timeout)

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "jitter_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"link profile: {name} must be a finite number >= 0, not {value!r}")
        for name in ("up_mbps", "down_mbps"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"link profile: {name} must be > 0 Mbit/s or None (unlimited), not {value!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"link profile: loss must be in [0, 1), not {self.loss!r} (cut the link instead)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinkProfile:
        """From a scenario file's mapping; unknown keys are an error (a typo would silently mean 'no delay')."""
        unknown = set(d) - {"rtt_ms", "jitter_ms", "up_mbps", "down_mbps", "loss"}
        if unknown:
            raise ValueError(f"link profile: unknown keys {sorted(unknown)}")
        return cls(
            rtt_ms=_number(d, "rtt_ms", 0.0) or 0.0,
            jitter_ms=_number(d, "jitter_ms", 0.0) or 0.0,
            up_mbps=_number(d, "up_mbps", None),
            down_mbps=_number(d, "down_mbps", None),
            loss=_number(d, "loss", 0.0) or 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rto_s(self) -> float:
        """The retransmission timeout a lost segment costs."""
        return max(MIN_RTO_S, (self.rtt_ms + 4 * self.jitter_ms) / 1000)


@dataclass(frozen=True)
class LinkStats:
    """A snapshot of one link's counters (bytes are those delivered, not those read)."""

    name: str
    is_up: bool
    mode: OutageMode | None  # the current outage's mode, None while up
    connections: int  # accepted in all
    active: int  # open now
    refused: int  # closed on accept during a reset outage, or because the target refused
    bytes_up: int
    bytes_down: int
    held_bytes: int  # read from one side, not yet delivered to the other
    lost_segments: int  # segment transmissions lost (each costs a retransmission timeout)
    outages: int  # cuts that took the link down
    outage_s: float  # total time down, the current outage included


@dataclass(frozen=True)
class Outage:
    """The link is down from ``start_s`` for ``duration_s`` (seconds after the schedule's start), again every
    ``every_s`` seconds if given (``times`` occurrences, forever if None)."""

    start_s: float
    duration_s: float
    every_s: float | None = None
    mode: OutageMode = "blackhole"
    times: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.start_s) or self.start_s < 0:
            raise ValueError(f"outage: start_s must be >= 0, not {self.start_s!r}")
        if not math.isfinite(self.duration_s) or self.duration_s <= 0:
            raise ValueError(f"outage: duration_s must be > 0, not {self.duration_s!r}")
        if self.every_s is not None and not (math.isfinite(self.every_s) and self.every_s > self.duration_s):
            raise ValueError(f"outage: every_s must exceed duration_s ({self.duration_s}), not {self.every_s!r}")
        if self.mode not in ("blackhole", "reset"):
            raise ValueError(f"outage: mode must be 'blackhole' or 'reset', not {self.mode!r}")
        if self.times is not None and (
            isinstance(self.times, bool) or not isinstance(self.times, int) or self.times < 1
        ):
            raise ValueError(f"outage: times must be >= 1 or None, not {self.times!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Outage:
        unknown = set(d) - {"start_s", "duration_s", "every_s", "mode", "times"}
        if unknown:
            raise ValueError(f"outage: unknown keys {sorted(unknown)}")
        if "start_s" not in d or "duration_s" not in d:
            raise ValueError("outage: start_s and duration_s are required")
        return cls(
            start_s=_number(d, "start_s", 0.0) or 0.0,
            duration_s=_number(d, "duration_s", 0.0) or 0.0,
            every_s=_number(d, "every_s", None),
            mode=d.get("mode", "blackhole"),
            times=d.get("times"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def down_at(self, t: float) -> bool:
        """Whether the link is down ``t`` seconds after the schedule's start."""
        for start, end in self.windows():
            if start > t:
                return False
            if t < end:
                return True
        return False

    def windows(self) -> Iterator[tuple[float, float]]:
        """``(start, end)`` of each occurrence, in seconds after the schedule's start."""
        n = 0
        start = self.start_s
        while self.times is None or n < self.times:
            yield start, start + self.duration_s
            if self.every_s is None:
                return
            n += 1
            start += self.every_s


@dataclass
class _Chunk:
    data: bytes  # b"" marks the end of the stream (FIN)
    due: float
    bps: float | None


@dataclass
class _Pipe:
    """One direction of one connection: a bounded FIFO of timed chunks between two sockets."""

    link: LinkProxy
    src: socket.socket
    dst: socket.socket
    up: bool  # client -> target
    not_before: float = 0.0  # the emulated handshake: nothing leaves the client before this
    queue: deque[_Chunk] = field(default_factory=deque)
    queued: int = 0
    prev_due: float = 0.0
    line_free: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queued >= self.link.max_buffer:
                self.changed.clear()
                await self.changed.wait()
            data = await loop.sock_recv(self.src, READ_SIZE)
            if self.link.quickack:
                _quickack(self.src)
            self._schedule(data, loop.time())
            if not data:
                return

    def _schedule(self, data: bytes, now: float) -> None:
        profile = self.link.profile
        rng = self.link.rng
        t = max(now, self.not_before)
        base = max(t + profile.rtt_ms / 2000 + rng.uniform(0, profile.jitter_ms) / 1000, self.prev_due)
        bps = (profile.up_mbps if self.up else profile.down_mbps) or None
        if bps is not None:
            bps *= 1e6
        pieces: list[tuple[int, float]] = [(0, base)]  # (start offset, due) of runs of bytes sharing a due time
        if profile.loss > 0:
            due = base
            for start in range(0, len(data), SEGMENT):
                extra, rto = 0.0, profile.rto_s
                for _ in range(MAX_RETRANSMISSIONS):
                    if rng.random() >= profile.loss:
                        break
                    self.link._lost += 1
                    extra += rto
                    rto *= 2
                if base + extra > due:  # this segment and every later byte wait for its retransmission
                    due = base + extra
                    pieces.append((start, due))
        ends = [start for start, _ in pieces[1:]] + [len(data)]
        for (start, due), end in zip(pieces, ends, strict=True):
            if end > start or not data:
                self.queue.append(_Chunk(data[start:end], due, bps))
        self.prev_due = pieces[-1][1]
        self.queued += len(data)
        self.link._held += len(data)
        self.changed.set()

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.changed.clear()
                await self.changed.wait()
            chunk = self.queue[0]
            if not chunk.data:  # FIN
                while not await self._wait_until(chunk.due):
                    pass
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                self.queue.popleft()
                return
            view = memoryview(chunk.data)
            pos = 0
            while pos < len(view):
                if chunk.bps is None:
                    n = len(view) - pos
                    while not await self._wait_until(chunk.due):
                        pass
                else:
                    n = min(len(view) - pos, max(SEGMENT, int(chunk.bps / 8 * SLICE_S)))
                    while True:  # the slice's last bit arrives when the line has carried it
                        end = max(chunk.due, self.line_free) + n * 8 / chunk.bps
                        if await self._wait_until(end):
                            break
                    self.line_free = end
                await loop.sock_sendall(self.dst, view[pos : pos + n])
                pos += n
                self.link._count(self.up, n)
            self.queue.popleft()
            self.queued -= len(chunk.data)
            self.link._held -= len(chunk.data)
            self.changed.set()

    async def _wait_until(self, when: float) -> bool:
        """Sleep until ``when``; False if the link was down then (after waiting for its restore: ask again)."""
        loop = asyncio.get_running_loop()
        delay = when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.link._flowing.is_set():
            return True
        await self.link._flowing.wait()
        self.line_free = max(self.line_free, loop.time())  # held bytes restart the line, paced from now
        return False


def _quickack(sock: socket.socket) -> None:
    """Acknowledge received data at once: the kernel leaves quick-ack mode by itself, so re-arm it after every recv."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), the way a reset outage or a refused connection looks to a peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class LinkProxy:
    """A TCP proxy emulating one network link between clients and ``target`` (see the module docstring).

    Use it from the event loop that started it. ``seed`` makes jitter and loss draws repeatable (given the same
    reads); ``max_buffer`` bounds the bytes held per direction of a connection; ``quickack`` acknowledges
    received bytes at once (see the module docstring for why a Mosquitto bridge needs that).
    """

    def __init__(
        self,
        target: tuple[str, int],
        profile: LinkProfile = LinkProfile(),
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        name: str = "link",
        seed: int | None = None,
        max_buffer: int = 4 * 1024 * 1024,
        quickack: bool = True,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.profile = profile
        self.name = name
        self.max_buffer = max_buffer
        self.quickack = quickack
        self.connect_timeout = connect_timeout
        self.rng = random.Random(seed)
        self._listen = listen
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._mode: OutageMode | None = None
        self._down_since: float | None = None
        self._outage_s = 0.0
        self._outages = 0
        self._connections = 0
        self._refused = 0
        self._bytes = [0, 0]  # down, up
        self._held = 0
        self._lost = 0

    # lifecycle
    async def start(self) -> LinkProxy:
        if self._sock is not None:
            return self
        host, port = self._listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)  # SO_REUSEADDR on POSIX
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"{self.name}-accept")
        return self

    async def stop(self) -> None:
        tasks = [t for t in (self._accept_task, *self._conns) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> LinkProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect instead of the target."""
        if self._sock is None:
            raise RuntimeError(f"link {self.name} is not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    def url_for(self, scheme: str = "mqtt") -> str:
        """A broker URL for clients of this link, e.g. ``mqtt://127.0.0.1:40123``."""
        host, port = self.address
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    # control
    def set_profile(self, profile: LinkProfile | Mapping[str, Any]) -> None:
        """Change the link live: applies to bytes read from now on (bytes already in flight keep their timing)."""
        self.profile = profile if isinstance(profile, LinkProfile) else LinkProfile.from_dict(profile)

    @property
    def is_up(self) -> bool:
        return self._mode is None

    @property
    def mode(self) -> OutageMode | None:
        return self._mode

    def cut(self, mode: OutageMode = "blackhole") -> None:
        """An outage starts (or changes mode): see the module docstring for what each mode does."""
        if mode not in ("blackhole", "reset"):
            raise ValueError(f"cut mode must be 'blackhole' or 'reset', not {mode!r}")
        if mode == self._mode:
            return
        loop = asyncio.get_running_loop()
        if self._mode is None:
            self._outages += 1
            self._down_since = loop.time()
        self._mode = mode
        self._flowing.clear()
        if mode == "reset":
            for t in list(self._conns):
                t.cancel()

    def restore(self) -> None:
        """The outage ends: held bytes and held connections go on."""
        if self._mode is None:
            return
        loop = asyncio.get_running_loop()
        if self._down_since is not None:
            self._outage_s += loop.time() - self._down_since
            self._down_since = None
        self._mode = None
        self._flowing.set()

    def stats(self) -> LinkStats:
        outage_s = self._outage_s
        if self._down_since is not None:
            outage_s += asyncio.get_running_loop().time() - self._down_since
        return LinkStats(
            name=self.name,
            is_up=self.is_up,
            mode=self._mode,
            connections=self._connections,
            active=len(self._conns),
            refused=self._refused,
            bytes_up=self._bytes[1],
            bytes_down=self._bytes[0],
            held_bytes=self._held,
            lost_segments=self._lost,
            outages=self._outages,
            outage_s=outage_s,
        )

    def _count(self, up: bool, n: int) -> None:
        self._bytes[up] += n

    # connections
    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self._sock)
            client.setblocking(False)
            self._connections += 1
            if self._mode == "reset":
                self._refused += 1
                _abort(client)
                continue
            task = asyncio.create_task(self._serve(client), name=f"{self.name}-conn")
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream: socket.socket | None = None
        pipes: list[_Pipe] = []
        tasks: list[asyncio.Task[None]] = []
        clean = False
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.quickack:
                # Mosquitto 2.0.11 leaves Nagle on for a bridge's outgoing socket, so a small message waits for
                # our ACK of the previous one, which delayed ACKs hold ~40 ms. Quick ACKs on the accepted socket
                # release it at once. Measured: 100 QoS 1 request/replies, client on the bridging broker A, echo
                # node on B, bridge A -> zero-delay proxy -> B; median / p99 ms, 2 runs each:
                #   bridge direct 44.0 / 47.4, 44.0 / 45.4; proxy without QUICKACK 44.0 / 47.9, 44.0 / 44.7;
                #   proxy with QUICKACK 1.67 / 2.56, 1.91 / 2.54 (TCP_NODELAY forced on A by the LD_PRELOAD shim:
                #   direct 1.10, 0.97; through the proxy 1.4-1.8). So no shim is needed behind a LinkProxy.
                _quickack(client)
            await self._flowing.wait()  # a connection opened during a blackhole is held
            accepted = loop.time()
            rtt = self.profile.rtt_ms / 1000
            while True:  # the SYN reaches the far side half a round trip later (held again by a cut)
                await asyncio.sleep(max(0.0, accepted + rtt / 2 - loop.time()))
                if self._flowing.is_set():
                    break
                await self._flowing.wait()
                accepted = loop.time()
            upstream = await self._connect()
            if upstream is None:
                self._refused += 1
                return
            pipes = [
                _Pipe(self, client, upstream, up=True, not_before=accepted + rtt),
                _Pipe(self, upstream, client, up=False),
            ]
            tasks = [asyncio.create_task(c) for p in pipes for c in (p.read_loop(), p.write_loop())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
            clean = all(t.exception() is None for t in done)
            if clean:
                await asyncio.gather(*tasks)  # every direction delivered its bytes and its FIN
        except OSError:
            pass  # a peer reset or went away: the other side is reset below
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for p in pipes:
                self._held -= p.queued
            for s in (client, upstream):
                if s is not None:
                    if clean:
                        s.close()
                    else:
                        _abort(s)

    async def _connect(self) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        host, port = self.target
        try:  # a numeric address resolves here; only a name goes to the resolver's thread
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except OSError:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                return None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), self.connect_timeout)
            except (OSError, TimeoutError):
                sock.close()
                continue
            except BaseException:  # cancelled: a reset outage or stop()
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.quickack:
                _quickack(sock)
            return sock
        return None
