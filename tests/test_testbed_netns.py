"""Tiers in their own network namespaces: reach the host through the veth pair and nothing else, at the
bandwidth the link is shaped to."""

from __future__ import annotations

import itertools
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from aiflow_agents.testbed.netns import (
    NetNamespace,
    NetNamespaceError,
    free_subnet_index,
    netns_unavailable,
    shaping_unavailable,
)

PAYLOAD = 500_000  # bytes: about 1 s at 4 Mbit/s


def _netns_or_skip() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")


_counter = itertools.count()


@pytest.fixture
def make_ns() -> Iterator[Callable[[], NetNamespace]]:
    """Create namespaces on free subnets; every one is deleted however the test ends."""
    _netns_or_skip()
    made: list[NetNamespace] = []

    def make() -> NetNamespace:
        for _ in range(5):  # another test run may take the same free subnet between the look-up and create()
            ns = NetNamespace(f"t{os.getpid()}-{next(_counter)}", subnet_index=free_subnet_index(200))
            made.append(ns)
            try:
                return ns.create()
            except NetNamespaceError as e:
                if "already in use" not in str(e):
                    raise
        raise AssertionError("no free subnet after 5 tries")

    yield make
    for ns in made:
        ns.delete()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def serve() -> Iterator[Callable[[str, Callable[[socket.socket], None]], tuple[int, list[str]]]]:
    """Run a TCP server on (host, any port) whose handler gets each connection; returns (port, peers)."""
    servers: list[_Server] = []

    def start(host: str, handle: Callable[[socket.socket], None]) -> tuple[int, list[str]]:
        peers: list[str] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                peers.append(self.client_address[0])
                handle(self.request)

        server = _Server((host, 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address[1], peers

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _sink(conn: socket.socket) -> None:
    """Read an upload to its end, then acknowledge it (so the sender times the whole transfer)."""
    while conn.recv(65536):
        pass
    conn.sendall(b"k")


def _source(conn: socket.socket) -> None:
    """Send PAYLOAD bytes once asked."""
    conn.recv(1)
    conn.sendall(b"x" * PAYLOAD)


def _inside(ns: NetNamespace, script: str, *args: object) -> str:
    proc = subprocess.run(
        [*ns.exec_prefix(), sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


REACH = """
import errno, json, socket, sys
host, port, lo_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
with socket.create_connection((host, port), timeout=5) as c:
    c.sendall(b"ping")
    out["echo"] = c.recv(4).decode()
for key, addr in [("host_loopback", ("127.0.0.1", lo_port)), ("elsewhere", ("192.0.2.1", 9))]:
    try:
        socket.create_connection(addr, timeout=3).close()
        out[key] = "connected"
    except OSError as e:
        out[key] = errno.errorcode.get(e.errno, repr(e))
print(json.dumps(out))
"""

UPLOAD = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port), timeout=30) as c:
    t = time.perf_counter()
    c.sendall(b"x" * n)
    c.shutdown(socket.SHUT_WR)
    assert c.recv(1) == b"k"
    print(time.perf_counter() - t)
"""

DOWNLOAD = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port), timeout=30) as c:
    t = time.perf_counter()
    c.sendall(b"g")
    got = 0
    while chunk := c.recv(65536):
        got += len(chunk)
    assert got == n, got
    print(time.perf_counter() - t)
"""


def test_reaches_the_host_side_only(
    make_ns: Callable[[], NetNamespace],
    serve: Callable[[str, Callable[[socket.socket], None]], tuple[int, list[str]]],
) -> None:
    ns = make_ns()
    port, peers = serve(ns.host_address, _echo)
    lo_port, _ = serve("127.0.0.1", _echo)
    with socket.create_connection(("127.0.0.1", lo_port), timeout=5):
        pass  # the loopback server is up: not reaching it from inside is the namespace's doing
    out = json.loads(_inside(ns, REACH, ns.host_address, port, lo_port))
    assert out == {"echo": "ping", "host_loopback": "ECONNREFUSED", "elsewhere": "ENETUNREACH"}
    assert peers == [ns.ns_address]
    routes = _inside(ns, "import subprocess; subprocess.run(['ip', '-4', 'route'])").strip().splitlines()
    assert len(routes) == 1 and routes[0].startswith(f"10.213.{ns.subnet_index}.0/30 dev {ns.ns_veth}")


def test_shaping_limits_each_direction_to_its_rate(
    make_ns: Callable[[], NetNamespace],
    serve: Callable[[str, Callable[[socket.socket], None]], tuple[int, list[str]]],
) -> None:
    if (reason := shaping_unavailable()) is not None:
        pytest.skip(f"no tbf shaping here: {reason}")
    ns = make_ns()
    sink, _ = serve(ns.host_address, _sink)
    source, _ = serve(ns.host_address, _source)

    def mbps(script: str, port: int, tries: int = 1) -> float:
        """The best of ``tries`` transfers: a stalled process on a busy machine only ever makes one slower,
        while the token bucket caps every one of them."""
        return max(PAYLOAD * 8 / float(_inside(ns, script, ns.host_address, port, PAYLOAD)) / 1e6 for _ in range(tries))

    up_free, down_free = mbps(UPLOAD, sink), mbps(DOWNLOAD, source)
    ns.shape(up_mbps=4, down_mbps=None)
    up_4, down_still_free = mbps(UPLOAD, sink, tries=2), mbps(DOWNLOAD, source)
    ns.shape(up_mbps=None, down_mbps=2)
    up_again_free, down_2 = mbps(UPLOAD, sink), mbps(DOWNLOAD, source, tries=2)
    print(
        f"Mbit/s: up free {up_free:.0f}, up shaped to 4: {up_4:.2f}, then free again {up_again_free:.0f}; "
        f"down free {down_free:.0f}, while up shaped {down_still_free:.0f}, down shaped to 2: {down_2:.2f}"
    )
    assert up_4 == pytest.approx(4, rel=0.3)
    assert down_2 == pytest.approx(2, rel=0.3)
    for free in (up_free, up_again_free, down_free, down_still_free):
        assert free > 5 * 4
    ns.shape(up_mbps=None, down_mbps=None)
    qdiscs = subprocess.run(["tc", "-n", ns.name, "qdisc", "show", "dev", ns.ns_veth], capture_output=True, text=True)
    assert "tbf" not in qdiscs.stdout


def test_delete_removes_namespace_veth_and_processes_inside(make_ns: Callable[[], NetNamespace]) -> None:
    ns = make_ns()
    sleeper = subprocess.Popen([*ns.exec_prefix(), "sleep", "60"])
    try:
        for _ in range(100):
            if ns.pids():
                break
            threading.Event().wait(0.02)
        assert ns.pids() == [sleeper.pid]  # exec in place: the pid we started is the one inside
        ns.delete()
        assert sleeper.wait(timeout=5) == -9
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not ns.exists()
    assert subprocess.run(["ip", "link", "show", ns.host_veth], capture_output=True).returncode != 0
    assert ns.subnet_index not in _subnets_in_use()
    ns.delete()  # idempotent
    with ns:  # and the same name can be made again
        assert ns.exists()
    assert not ns.exists()


def _subnets_in_use() -> set[int]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return {int(word.split(".")[2]) for word in out.split() if word.startswith("10.213.")}


def test_refuses_a_name_or_subnet_in_use(make_ns: Callable[[], NetNamespace]) -> None:
    ns = make_ns()
    twin = NetNamespace(ns.name, subnet_index=(ns.subnet_index + 1) % 256)
    with pytest.raises(NetNamespaceError, match="already exists"):
        twin.create()
    twin.delete()  # deletes nothing: it did not create the namespace
    assert ns.exists()
    with pytest.raises(NetNamespaceError, match="already in use"):
        NetNamespace(f"{ns.name}-b", subnet_index=ns.subnet_index).create()


def test_names_and_addresses() -> None:
    ns = NetNamespace("run-1234abcd-device-with-a-long-name", subnet_index=7)
    assert (ns.host_address, ns.ns_address) == ("10.213.7.1", "10.213.7.2")
    assert ns.exec_prefix() == ["ip", "netns", "exec", "run-1234abcd-device-with-a-long-name"]
    other = NetNamespace("run-1234abcd-device-with-a-long-namf", subnet_index=8)
    for veth in (ns.host_veth, ns.ns_veth, other.host_veth):
        assert len(veth) <= 15
    assert len({ns.host_veth, ns.ns_veth, other.host_veth, other.ns_veth}) == 4
    for bad in ["", "a b", "a/b", "x" * 49]:
        with pytest.raises(ValueError, match="namespace name"):
            NetNamespace(bad, subnet_index=1)
    with pytest.raises(ValueError, match="subnet_index"):
        NetNamespace("ok", subnet_index=256)
    with pytest.raises(ValueError, match="positive"):
        ns.shape(up_mbps=0, down_mbps=None)
    with pytest.raises(NetNamespaceError, match="not created"):
        ns.shape(up_mbps=1, down_mbps=None)
