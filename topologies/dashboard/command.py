"""``aiflow dashboard``: serve the live page for a broker (the embedded one when none is given)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated

import typer

from aiflow_agents.commands import QuietLogOpt

#: ``--demo``: scripted stand-ins on three tiers, so a first look shows a network without models.
#: The device is quick and unsure, the edge pair disagree a little, the cloud is slow and sure.
DEMO_NODES: dict[str, list[str]] = {
    "device": ["scripted:phone?answer=381&confidence=0.45&delay=0.05"],
    "edge": [
        "scripted:edge-a?answer=391&confidence=0.7&delay=0.15",
        "scripted:edge-b?answer=391&confidence=0.75&delay=0.2",
        "scripted:edge-c?answer=393&confidence=0.6&delay=0.1",
    ],
    "cloud": ["scripted:cloud?answer=391&confidence=0.95&delay=0.4"],
}


@dataclass(frozen=True, slots=True)
class Served:
    """Where the page is: the URL to open and the bound socket's port (useful with ``port=0``)."""

    url: str
    port: int


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port=0``: any free port), bound before the server starts so the URL is
    known, and printed, before the first request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.asynccontextmanager
async def demo_nodes(url: str, namespace: str) -> AsyncIterator[list[str]]:
    """Start the ``--demo`` nodes as separate processes; stop them on exit."""
    from aiflow_agents.launch import NodeProcess

    procs = [
        NodeProcess(agents, url, node_id=f"demo-{tier}", namespace=namespace, tier=tier).start()
        for tier, agents in DEMO_NODES.items()
    ]
    try:
        yield [p.args[-1] for p in procs]
    finally:
        await asyncio.gather(*(p.astop() for p in procs))


async def serve(
    broker: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    namespace: str = "default",
    demo: bool = False,
    signing_key: bytes | None = None,
    probe_interval: float = 2.0,
    on_ready: Sequence[object] = (),
) -> None:
    """Run the dashboard until cancelled or interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    from aiflow_agents import broker_scope

    from .app import LOOPBACK_HOSTS, create_app
    from .hub import Dashboard

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    served = Served(f"http://{shown}:{bound}/", bound)
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(broker_scope(broker))
        if demo:
            await stack.enter_async_context(demo_nodes(url.url(), namespace))
        dashboard = await stack.enter_async_context(
            Dashboard(url, namespace=namespace, signing_key=signing_key, probe_interval=probe_interval)
        )
        app = create_app(dashboard, allowed_hosts=LOOPBACK_HOSTS if _loopback(host) else ["*"])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        typer.echo(f"dashboard: {served.url}  (broker {url}, namespace {namespace}; Ctrl-C stops)")
        for callback in on_ready:
            callback(served)  # type: ignore[operator]

        async def close_pages_on_exit() -> None:
            # open event streams would hold a graceful shutdown for its whole timeout
            while not server.should_exit:
                await asyncio.sleep(0.1)
            dashboard.close_pages()

        watcher = asyncio.create_task(close_pages_on_exit())
        # uvicorn handles SIGINT/SIGTERM itself and re-raises the signal once it has stopped: as
        # KeyboardInterrupt for both, so the demo nodes, the client and the broker shut down too
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            await server.serve(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            watcher.cancel()


def dashboard_command(
    broker: Annotated[
        list[str] | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER", help="mqtt[s]://host:port")
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", envvar="AIFLOW_NAMESPACE")] = "default",
    host: Annotated[str, typer.Option(help="address to serve on (loopback by default: the page can start runs)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="port to serve on (0: any free port)")] = 8765,
    demo: Annotated[bool, typer.Option("--demo", help="also start scripted device/edge/cloud nodes")] = False,
    probe_interval: Annotated[
        float, typer.Option(help="seconds between link probes to each node (0: measure real traffic only)")
    ] = 2.0,
    log_level: QuietLogOpt = "warning",
) -> None:
    """A live web page of the network: nodes by tier, links, runs as they happen; start runs from it."""
    from aiflow_agents import AiflowError, configure_logging
    from aiflow_agents.cli import broker_or_exit, fail, signing_key_or_exit

    configure_logging(log_level)

    url = broker_or_exit(broker)
    key = signing_key_or_exit()
    if not _loopback(host):
        typer.echo(f"warning: serving on {host}: anyone who reaches it can see the network and start runs", err=True)
    try:
        asyncio.run(
            serve(
                url,
                host=host,
                port=port,
                namespace=namespace,
                demo=demo,
                signing_key=key,
                probe_interval=probe_interval,
            )
        )
    except AiflowError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot serve the dashboard on {host}:{port}: {e}") from None
    except KeyboardInterrupt:
        pass
