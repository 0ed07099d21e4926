"""Fixtures: real brokers (the embedded amqtt one and a real Mosquitto) and node processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from aiflow_agents import BrokerURL, EmbeddedBroker, MemoryBroker, Node, configure_logging, create
from aiflow_agents.testing import NodeProcess, free_port

MOSQUITTO = BrokerURL(host="127.0.0.1", port=1883)

configure_logging("warning")


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def mosquitto_or_skip() -> BrokerURL:
    if not _listening(MOSQUITTO.host, MOSQUITTO.port):
        if os.environ.get("CI"):
            pytest.fail("Mosquitto is not listening on 127.0.0.1:1883 (.ci/run should have started it)")
        pytest.skip(
            "Mosquitto is not listening on 127.0.0.1:1883 (start it: mosquitto -d -c /etc/mosquitto/mosquitto.conf)"
        )
    return MOSQUITTO


@pytest_asyncio.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerURL]:
    """The transport suite runs against both brokers."""
    if request.param == "mosquitto":
        yield mosquitto_or_skip()
        return
    async with EmbeddedBroker() as url:
        yield url


@pytest_asyncio.fixture
async def memory() -> AsyncIterator[BrokerURL]:
    """A fresh in-process broker (``memory://``): semantics without a transport, in milliseconds."""
    async with MemoryBroker() as url:
        yield url


@pytest_asyncio.fixture
async def local_nodes() -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """Start :class:`Node`s in this process (the in-process twin of ``spawn``); all stop at the end."""
    nodes: list[Node] = []

    async def _start(agents: list[str], broker: BrokerURL, namespace: str, **kw: object) -> Node:
        node = Node([create(a) for a in agents], broker, namespace=namespace, **kw)  # type: ignore[arg-type]
        await node.start()
        nodes.append(node)
        return node

    yield _start
    await asyncio.gather(*(n.stop(grace=1.0) for n in nodes))


@pytest_asyncio.fixture
async def embedded() -> AsyncIterator[BrokerURL]:
    async with EmbeddedBroker() as url:
        yield url


@pytest.fixture
def mosquitto() -> BrokerURL:
    return mosquitto_or_skip()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second torch thread only waits for a busy core
    (a training step measured 10 ms on one thread, 230 ms on two under load). Use it module-wide:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def namespace() -> str:
    """A fresh topic namespace per test, so retained presence on the shared broker never leaks."""
    return f"t{uuid.uuid4().hex[:10]}"


class PrivateMosquitto:
    """A Mosquitto of the test's own on a free port, which the test may stop and restart."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            pytest.skip("mosquitto is not installed")
        self.exe = exe
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"set_tcp_nodelay true\nmax_queued_messages 100000\n{user}{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> BrokerURL:
        return BrokerURL(host="127.0.0.1", port=self.port)

    def start(self) -> PrivateMosquitto:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not _listening("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private mosquitto did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    m = PrivateMosquitto(tmp_path)
    m.start()
    yield m
    m.stop()


@pytest_asyncio.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., NodeProcess]]:
    """Start ``aiflow node`` processes; all are stopped (without blocking the loop) at the end."""
    procs: list[NodeProcess] = []

    def _spawn(agents: list[str], broker: BrokerURL, namespace: str, **kw: object) -> NodeProcess:
        log = tmp_path / f"node-{len(procs)}.log"
        p = NodeProcess(agents, broker, namespace=namespace, log_path=log, **kw)  # type: ignore[arg-type]
        procs.append(p.start())
        return p

    yield _spawn
    await asyncio.gather(*(p.astop(timeout=10) for p in procs))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``mosquitto`` every test that gets a real Mosquitto from a fixture (the shared one, private or
    bridged ones); tests that start a PrivateMosquitto themselves carry the marker explicitly."""
    for item in items:
        if {"mosquitto", "private_mosquitto", "brokers", "bridged"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mosquitto)
