"""A tier's place on the network: its own network namespace, joined to the host by one veth pair.

Processes started with :meth:`NetNamespace.exec_prefix` see only their loopback and the pair's /30
(``10.213.<subnet_index>.0/30``: host side ``.1``, namespace side ``.2``). No default route and no other
address, so the only way out is to the host side of the pair: what a tier reaches is what the testbed
chose to expose on :attr:`NetNamespace.host_address`. :meth:`NetNamespace.shape` adds kernel bandwidth
limits (``tbf``) per direction of the pair, for everything the namespace sends or receives. The testbed does
not shape here: a tier's pair also carries traffic that crosses no link (the requester reaching the device's
broker, a child's link reaching its parent's broker), so its links emulate bandwidth, delay and loss per link
in the user-space proxies (this kernel has no ``netem`` anyway).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import TracebackType

__all__ = [
    "NetNamespace",
    "NetNamespaceError",
    "free_subnet_index",
    "netns_unavailable",
    "shaping_unavailable",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
SUBNET_PREFIX = "10.213"
_PREFIX_LEN = 30
_ETH_FRAME = 1514  # MTU 1500 + Ethernet header: a token bucket must hold at least one frame
QUEUE_LATENCY_MS = 100  # how long a packet may wait in a shaped queue before it is dropped (tbf "latency")


class NetNamespaceError(RuntimeError):
    """A namespace command failed (the message has the command and the kernel's answer)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetNamespaceError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@functools.cache
def _probe() -> tuple[str | None, str | None]:
    """(why namespaces do not work, why tbf shaping does not work), by building and removing a real pair."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux", "network namespaces need Linux"
    if os.geteuid() != 0:
        reason = f"creating network namespaces needs root (running as uid {os.geteuid()})"
        return reason, reason
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed", "the 'ip' command (iproute2) is not installed"
    probe = NetNamespace(f"aiflow-probe-{os.getpid()}", subnet_index=0)
    probe._created = True  # so that delete() removes what the probe built, whatever failed
    try:
        _run("ip", "netns", "add", probe.name)
        _run("ip", "link", "add", probe.host_veth, "type", "veth", "peer", "name", probe.ns_veth)
        _run("ip", "link", "set", probe.ns_veth, "netns", probe.name)
    except (NetNamespaceError, OSError, subprocess.SubprocessError) as e:
        probe.delete()
        return f"cannot create a network namespace with a veth pair: {e}", "no network namespaces"
    try:
        if shutil.which("tc") is None:
            return None, "the 'tc' command (iproute2) is not installed"
        try:
            _run("tc", "qdisc", "replace", "dev", probe.host_veth, "root", "tbf", "rate", "1mbit", "burst", "4096",
                 "latency", "50ms")  # fmt: skip
        except NetNamespaceError as e:
            return None, f"the kernel has no tbf qdisc: {e}"
        return None, None
    finally:
        probe.delete()


def netns_unavailable() -> str | None:
    """None when :class:`NetNamespace` works here (root, iproute2, veth), else the reason."""
    return _probe()[0]


def shaping_unavailable() -> str | None:
    """None when :meth:`NetNamespace.shape` works here (``tc`` with the ``tbf`` qdisc), else the reason."""
    return _probe()[1]


def _used_subnets() -> set[int]:
    out = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    return {int(m) for m in re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", out)}


def free_subnet_index(start: int = 1, stop: int = 256) -> int:
    """The first subnet index in ``range(start, stop)`` that no interface on the host uses yet."""
    used = _used_subnets()
    for index in range(start, stop):
        if index not in used:
            return index
    raise NetNamespaceError(f"every subnet {SUBNET_PREFIX}.{start}..{stop - 1}.0 is in use")


class NetNamespace:
    """A network namespace named ``name`` with a veth pair to the host on ``10.213.<subnet_index>.0/30``.

    Use as a context manager, or :meth:`create` / :meth:`delete` (idempotent). Names and subnet indices
    must be unique among the namespaces alive at once; veth names derive from a hash of the name, to fit
    the kernel's 15-character limit."""

    def __init__(self, name: str, *, subnet_index: int) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"namespace name {name!r} must be 1-48 letters, digits, '-' or '_'")
        if not 0 <= subnet_index <= 255:
            raise ValueError(f"subnet_index must be within 0..255, got {subnet_index}")
        self.name = name
        self.subnet_index = subnet_index
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        self.host_veth = f"atb{digest}h"
        self.ns_veth = f"atb{digest}n"
        self._created = False

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r}, subnet_index={self.subnet_index})"

    @property
    def host_address(self) -> str:
        """The host side of the pair: bind the servers a tier may reach here."""
        return f"{SUBNET_PREFIX}.{self.subnet_index}.1"

    @property
    def ns_address(self) -> str:
        """The namespace side of the pair: the address the host reaches the tier's servers on."""
        return f"{SUBNET_PREFIX}.{self.subnet_index}.2"

    def exec_prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace (same pid: ``ip netns exec`` execs in place)."""
        return ["ip", "netns", "exec", self.name]

    def exists(self) -> bool:
        return self.name in _run("ip", "netns", "list", check=False).stdout.split()

    def create(self) -> NetNamespace:
        """Build the namespace, the veth pair and their addresses; raises :class:`NetNamespaceError`."""
        if self._created:
            return self
        reason = netns_unavailable()
        if reason is not None:
            raise NetNamespaceError(reason)
        if self.exists():
            raise NetNamespaceError(
                f"network namespace {self.name!r} already exists: names must be unique "
                f"(or a crashed run left it: ip netns del {self.name})"
            )
        if _run("ip", "link", "show", self.host_veth, check=False).returncode == 0:
            raise NetNamespaceError(f"interface {self.host_veth} already exists (ip link del {self.host_veth})")
        if self.subnet_index in _used_subnets():
            raise NetNamespaceError(
                f"subnet {SUBNET_PREFIX}.{self.subnet_index}.0 is already in use: pick another subnet_index "
                "(free_subnet_index())"
            )
        self._created = True
        ns, host, peer = self.name, self.host_veth, self.ns_veth
        cidr = f"/{_PREFIX_LEN}"
        try:
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            # no IPv6 link-local addresses: the pair carries only the 10.213 addresses it is given
            _run("ip", "link", "set", peer, "netns", ns)  # (moving resets the peer's IPv6 settings)
            _run("ip", "link", "set", host, "addrgenmode", "none")
            _run("ip", "-n", ns, "link", "set", peer, "addrgenmode", "none")
            _run("ip", "addr", "add", self.host_address + cidr, "dev", host)
            _run("ip", "link", "set", host, "up")
            _run("ip", "-n", ns, "addr", "add", self.ns_address + cidr, "dev", peer)
            _run("ip", "-n", ns, "link", "set", peer, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def pids(self) -> list[int]:
        """The processes running inside the namespace."""
        return [int(p) for p in _run("ip", "netns", "pids", self.name, check=False).stdout.split()]

    def delete(self, *, kill_processes: bool = True) -> None:
        """Remove the veth pair and the namespace; by default SIGKILL what still runs inside first (a
        process left inside would keep the namespace alive, unreachable). Idempotent, and a no-op on a
        namespace this object did not create (one of that name may belong to someone else)."""
        if not self._created:
            return
        if kill_processes and self.exists():
            for _ in range(50):
                pids = self.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
        _run("ip", "link", "del", self.host_veth, check=False)  # takes the peer with it
        _run("ip", "netns", "del", self.name, check=False)
        self._created = False

    def shape(self, *, up_mbps: float | None, down_mbps: float | None, burst_bytes: int | None = None) -> None:
        """Limit bandwidth with a token bucket (``tbf``) per direction; None leaves a direction unshaped.

        ``up`` is namespace -> host (egress of the namespace-side veth), ``down`` host -> namespace.
        ``burst_bytes`` defaults to 10 ms of the rate (at least four frames). Replaces earlier shaping."""
        for mbps in (up_mbps, down_mbps):
            if mbps is not None and not (math.isfinite(mbps) and mbps > 0):
                raise ValueError(f"a rate must be a positive number of Mbit/s, got {mbps!r}")
        if burst_bytes is not None and burst_bytes < _ETH_FRAME:
            raise ValueError(f"burst_bytes must hold one frame ({_ETH_FRAME} bytes), got {burst_bytes}")
        if not self._created:
            raise NetNamespaceError(f"{self!r} is not created")
        if (up_mbps is not None or down_mbps is not None) and (reason := shaping_unavailable()) is not None:
            raise NetNamespaceError(reason)
        self._tbf(["-n", self.name], self.ns_veth, up_mbps, burst_bytes)
        self._tbf([], self.host_veth, down_mbps, burst_bytes)

    @staticmethod
    def _tbf(where: list[str], dev: str, mbps: float | None, burst_bytes: int | None) -> None:
        if mbps is None:
            _run("tc", *where, "qdisc", "del", "dev", dev, "root", check=False)  # none there: fine
            return
        rate_bit = max(round(mbps * 1e6), 8)
        burst = burst_bytes if burst_bytes is not None else max(rate_bit // 8 // 100, 4 * _ETH_FRAME)
        _run("tc", *where, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bit}bit",
             "burst", str(burst), "latency", f"{QUEUE_LATENCY_MS}ms")  # fmt: skip

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()
