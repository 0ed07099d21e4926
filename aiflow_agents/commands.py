"""The built-in ``aiflow`` commands (broker, node, agents, send). :mod:`aiflow_agents.cli` lists
them by name and imports this module only when one of them runs, so ``aiflow --help`` never pays
for the runtime's imports."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from protocols import DEFAULT_LIMITS, Limits

from .broker import ENV_BROKER, EmbeddedBroker, broker_from_env, broker_scope
from .cli import broker_or_exit, fail, signing_key_or_exit
from .client import Client
from .errors import AiflowError
from .log import configure_logging
from .node import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_MAX_DEADLINE,
    DEFAULT_MAX_FRAME_AGE,
    DEFAULT_MAX_QUEUED_BYTES,
    NODE_KEEPALIVE,
    Node,
)
from .registry import AgentSpec, available
from .telemetry import DEFAULT_TELEMETRY_INTERVAL

agents_app = typer.Typer(help="Agent types and online agents.", no_args_is_help=True, rich_markup_mode=None)
console = Console()
err = Console(stderr=True)

BrokerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--broker",
        "-b",
        envvar=ENV_BROKER,
        help="mqtt[s]://[user:pass@]host:port; repeat it or give a comma list of cluster members to fail over "
        "between; none = embedded broker",
    ),
]
NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", envvar="AIFLOW_NAMESPACE", help="topic namespace")]
LogOpt = Annotated[str, typer.Option("--log-level", envvar="AIFLOW_LOG_LEVEL")]
#: One-shot commands print their result or one error line; the connection's per-attempt lines are debug.
QuietLogOpt = Annotated[str, typer.Option("--log-level", envvar="AIFLOW_LOG_LEVEL", help="log level on stderr")]


def broker(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 1883,
    log_level: LogOpt = "info",
) -> None:
    """Run the embedded (amqtt, MQTT 3.1.1) broker in the foreground until Ctrl-C."""
    configure_logging(log_level)

    async def main() -> None:
        b = EmbeddedBroker(host, port)
        url = await b.start()
        console.print(f"embedded broker listening on [bold]{url}[/] (Ctrl-C to stop)")
        try:
            await asyncio.Event().wait()
        finally:
            await b.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except AiflowError as e:
        raise fail(str(e)) from None


def node(
    agent: Annotated[list[str], typer.Option("--agent", "-a", help="NAME[:ID][?key=value&...] (repeatable)")],
    broker: BrokerOpt = None,
    namespace: NamespaceOpt = "default",
    node_id: Annotated[str | None, typer.Option(help="stable node id (default: host-pid-random)")] = None,
    tier: Annotated[str | None, typer.Option(help="device, edge or cloud (shown in presence)")] = None,
    concurrency: Annotated[int, typer.Option(help="handlers running at once, per agent")] = 64,
    max_pending: Annotated[
        int, typer.Option(help="requests waiting beyond that, per agent, before 'overloaded'")
    ] = 1024,
    max_queued_mib: Annotated[
        float, typer.Option(min=0, help="MiB of request frames a node holds before 'overloaded' (0: no bound)")
    ] = DEFAULT_MAX_QUEUED_BYTES / (1 << 20),
    max_deadline: Annotated[
        float, typer.Option(min=0, help="cap on a request's deadline, in seconds from arrival (0: none)")
    ] = DEFAULT_MAX_DEADLINE,
    max_frame_age: Annotated[
        float, typer.Option(min=0, help="refuse requests created longer ago than this many seconds (0: never)")
    ] = DEFAULT_MAX_FRAME_AGE,
    clock_skew: Annotated[float, typer.Option(min=0, help="seconds participants' clocks may disagree")] = (
        DEFAULT_CLOCK_SKEW
    ),
    max_frame_bytes: Annotated[
        int, typer.Option(min=64, help="refuse frames (in and out) larger than this many bytes")
    ] = DEFAULT_LIMITS.max_frame_bytes,
    max_header_bytes: Annotated[
        int, typer.Option(min=64, help="refuse frames whose JSON header is larger than this")
    ] = DEFAULT_LIMITS.max_header_bytes,
    heartbeat: Annotated[
        float, typer.Option(min=0, help="seconds between presence heartbeats (0: none, the Last Will only)")
    ] = 2.0,
    keepalive: Annotated[
        int, typer.Option(min=1, max=65535, help="MQTT keepalive in seconds: a frozen node's Will fires ~1.5x this")
    ] = NODE_KEEPALIVE,
    telemetry: Annotated[
        float,
        typer.Option(min=0, help="seconds between telemetry records (load, cost per agent); 0: none, no probe answers"),
    ] = DEFAULT_TELEMETRY_INTERVAL,
    log_level: LogOpt = "info",
) -> None:
    """Host agents on a node until SIGINT/SIGTERM. With $AIFLOW_SIGNING_KEY (hex) set, it accepts
    only frames signed with that key and signs its own."""
    configure_logging(log_level)
    signing_key = signing_key_or_exit()
    broker_url = broker_or_exit(broker)
    limits = Limits(max_frame_bytes=max_frame_bytes, max_header_bytes=max_header_bytes)
    try:
        overrides = {"tier": tier} if tier else {}
        specs = [AgentSpec.parse(a) for a in agent]
        for spec in specs:  # every spec checked (type, config keys) before any agent loads a model
            spec.check(**overrides)
        agents = [spec.create(**overrides) for spec in specs]
    except (AiflowError, ValueError, TypeError) as e:
        raise fail(str(e)) from None

    async def main() -> None:
        async with broker_scope(broker_url) as url:
            if broker_from_env(broker_url) is None:
                err.print(f"no broker configured: started an embedded one at [bold]{url}[/]")
            n = Node(
                agents,
                url,
                node_id=node_id,
                namespace=namespace,
                tier=tier,
                max_concurrency=concurrency,
                max_pending=max_pending,
                max_queued_bytes=int(max_queued_mib * (1 << 20)) or None,
                max_deadline=max_deadline or None,
                max_frame_age=max_frame_age or None,
                clock_skew=clock_skew,
                limits=limits,
                signing_key=signing_key,
                heartbeat=heartbeat or None,
                keepalive=keepalive,
                telemetry_interval=telemetry or None,
            )
            await n.run()

    try:
        asyncio.run(main())
    except AiflowError as e:
        raise fail(str(e)) from None


@agents_app.command("list")
def agents_list(
    online: Annotated[bool, typer.Option("--online", help="also list agents online on the broker")] = False,
    broker: BrokerOpt = None,
    namespace: NamespaceOpt = "default",
    wait: Annotated[float, typer.Option(help="seconds to collect presence")] = 1.0,
    log_level: QuietLogOpt = "warning",
) -> None:
    """Installed agent types (entry-point group aiflow_agents.agents) and, with --online, live agents."""
    configure_logging(log_level)
    table = Table(title="installed agent types")
    table.add_column("name")
    table.add_column("class")
    table.add_column("distribution")
    for name, ep in sorted(available().items()):
        dist = ep.dist.name if ep.dist is not None else "?"
        table.add_row(name, ep.value, dist)
    console.print(table)
    if not online:
        return

    broker_url = broker_or_exit(broker)

    async def main() -> None:
        url = broker_from_env(broker_url)
        if url is None:
            raise fail("--online needs --broker or AIFLOW_BROKER")
        async with Client(url, namespace=namespace) as c:
            await asyncio.sleep(wait)
            t = Table(title=f"online agents on {url}")
            for col in ("agent", "type", "tier", "nodes"):
                t.add_column(col)
            for agent_id, hosts in sorted(c.presence.online().items()):
                t.add_row(
                    agent_id, hosts[0].agent_type or "?", hosts[0].tier or "", ", ".join(h.node_id for h in hosts)
                )
            console.print(t)

    try:
        asyncio.run(main())
    except AiflowError as e:
        raise fail(str(e)) from None


def send(
    agent_id: Annotated[str, typer.Argument(help="the agent to ask")],
    text: Annotated[str, typer.Argument(help="the request text")],
    broker: BrokerOpt = None,
    namespace: NamespaceOpt = "default",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the reply")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the reply as JSON")] = False,
    log_level: QuietLogOpt = "warning",
) -> None:
    """Send one request and print the reply (exit code 1 with the reason if it fails). Signs it with
    $AIFLOW_SIGNING_KEY when set."""
    configure_logging(log_level)
    signing_key = signing_key_or_exit()
    broker_url = broker_or_exit(broker)

    async def main() -> None:
        async with broker_scope(broker_url) as url, Client(url, namespace=namespace, signing_key=signing_key) as c:
            reply = await c.request(agent_id, text, timeout=timeout)
            if as_json:
                console.print_json(json.dumps(_reply_json(reply)))
                return
            console.print(reply.text)
            for part in reply.tensors():
                console.print(f"[dim]tensor {part.dtype} {list(part.shape)} role={part.role} space={part.space}[/]")
            if reply.meta:
                console.print(f"[dim]meta {json.dumps(reply.meta)}[/]")

    try:
        asyncio.run(main())
    except AiflowError as e:
        raise fail(str(e)) from None


def _reply_json(reply: Any) -> dict[str, Any]:
    return {
        "id": reply.id,
        "kind": str(reply.kind),
        "sender": reply.sender,
        "text": reply.text,
        "meta": reply.meta,
        "tensors": [{"dtype": str(p.dtype), "shape": list(p.shape), "role": str(p.role)} for p in reply.tensors()],
    }


__all__ = ["agents_app", "broker", "node", "send"]
