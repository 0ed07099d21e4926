"""``aiflow graph draw`` and ``aiflow run``: graphs defined in a user's Python file."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aiflow_agents import AiflowError, Client, broker_scope, configure_logging
from aiflow_agents.cli import signing_key_or_exit
from aiflow_agents.commands import QuietLogOpt

from .graph import AgentGraph, GraphError
from .manager import RunResult, TopologyManager
from .pattern import Pattern

graph_app = typer.Typer(help="Agent graphs: draw them.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def load_object(ref: str) -> Pattern | AgentGraph:
    """``module:OBJECT`` or ``path/to/file.py:OBJECT``; OBJECT may be a pattern, a graph, or a
    zero-argument function returning one."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise typer.BadParameter(f"expected MODULE:OBJECT or FILE.py:OBJECT, got {ref!r}")
    if target.endswith(".py"):
        path = Path(target).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise typer.BadParameter(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(target)
    obj: Any = getattr(module, attr)
    if callable(obj) and not isinstance(obj, (Pattern, AgentGraph)):
        obj = obj()
    if not isinstance(obj, (Pattern, AgentGraph)):
        raise typer.BadParameter(f"{ref} is a {type(obj).__name__}, not a pattern or AgentGraph")
    return obj


async def presence_tiers(
    broker: str, agent_ids: list[str], *, namespace: str = "default", wait: float = 1.0
) -> dict[str, str | None]:
    """The tier each agent's online node announces (None: offline, or its node names no tier)."""
    async with Client(broker, namespace=namespace) as c:
        await c.presence.wait_online(agent_ids, wait)
        return {a: (rec.tier if (rec := c.presence.record(a)) is not None else None) for a in agent_ids}


@graph_app.command("draw")
def draw(
    ref: Annotated[str, typer.Argument(help="MODULE:OBJECT or FILE.py:OBJECT")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".svg, .png or .mmd (Mermaid)")],
    broker: Annotated[
        str | None, typer.Option("--broker", "-b", help="take tiers the pattern does not set from presence here")
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", envvar="AIFLOW_NAMESPACE")] = "default",
    wait: Annotated[float, typer.Option(help="seconds to wait for the agents' presence (with --broker)")] = 1.0,
    log_level: QuietLogOpt = "warning",
) -> None:
    """Render a graph or pattern (tiers shown as colours); also prints its Mermaid text.

    Tiers come from the pattern (``agent(id, tier=...)``); with ``--broker``, agents without one
    take the tier their online node announces. Agents with neither are drawn grey, "tier unknown"."""
    configure_logging(log_level)
    obj = load_object(ref)
    try:
        if isinstance(obj, Pattern):
            obj.validate()
        graph = obj.graph() if isinstance(obj, Pattern) else obj
    except GraphError as e:
        err.print(f"[bold red]invalid graph:[/] {e}")
        raise typer.Exit(1) from None
    if broker is not None:
        try:
            tiers = asyncio.run(presence_tiers(broker, graph.agent_ids(), namespace=namespace, wait=wait))
        except AiflowError as e:
            err.print(f"[bold red]cannot read presence:[/] {e}")
            raise typer.Exit(1) from None
        filled = graph.fill_tiers(tiers)
        if filled:
            console.print("tiers from presence: " + ", ".join(f"{a}={graph.tier_of(a)}" for a in filled))
    unknown = [a for a in graph.agent_ids() if graph.tier_of(a) is None]
    if unknown:
        hint = "" if broker else " (pass --broker to read them from presence)"
        console.print(f"tier unknown: {', '.join(unknown)}{hint}")
    graph.draw(out)
    console.print(graph.to_mermaid())
    console.print(f"written {out}")


def short_id(name: str, members: int = 0) -> str:
    """An id for the narrow table: a group topic (``group:g-<hash>``) becomes ``group[N]``."""
    if name.startswith("group:"):
        return f"group[{members}]" if members else "group"
    return name


def trace_table(result: RunResult, *, wide: bool = False, width: int | None = None) -> Table:
    """The run's messages. Narrow (fits 80 columns): #, from, to, kind, ms, bytes, and the label —
    or the error, for failed ones; ids are never cut, long labels are (to ``width``, default the
    console's). ``wide``: every field."""
    title = f"trace of {result.pattern} ({result.elapsed * 1e3:.1f} ms, {result.trace.bytes_total} bytes)"
    events = result.trace.to_list()
    t0 = min((ev["start"] for ev in events), default=0.0)
    if wide:
        table = Table(title=title)
        cols = ("#", "from", "to", "kind", "via", "label", "bytes", "at ms", "ms", "correlation id", "members", "error")
        for col in cols:
            table.add_column(col, overflow="fold", justify="right" if col in ("#", "bytes", "at ms", "ms") else "left")
        for ev in events:
            table.add_row(
                str(ev["seq"]),
                ev["sender"],
                ev["recipient"],
                ev["kind"],
                ev["via"],
                ev["label"],
                str(ev["bytes"]),
                f"{(ev['start'] - t0) * 1e3:.1f}",
                f"{ev['latency_ms']:.1f}",
                ev["correlation_id"] or "",
                ", ".join(ev.get("members") or []),
                ev["error"] or "",
            )
        return table
    rows = []
    for ev in events:
        n = len(ev.get("members") or [])
        rows.append(
            [
                str(ev["seq"]),
                short_id(ev["sender"], n),
                short_id(ev["recipient"], n),
                ev["kind"],
                f"{ev['latency_ms']:.1f}",
                str(ev["bytes"]),
                ev["error"] or ev["label"],
            ]
        )
    heads = ["#", "from", "to", "kind", "ms", "bytes", "label / error"]
    fixed = [max([len(h), *(len(r[k]) for r in rows)]) for k, h in enumerate(heads[:-1])]
    # every column but the last keeps its full width; the label gets what is left of the line
    # (a space either side of each column divider)
    room = (width or console.width) - sum(fixed) - 3 * (len(heads) - 1)
    show_note = room >= 10  # ids so long that no label fits: --wide has them
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    if not show_note:
        table.caption = "labels and errors: --wide"
    for k, h in enumerate(heads[:-1]):
        justify: Literal["left", "right"] = "right" if h in ("#", "ms", "bytes") else "left"
        table.add_column(h, justify=justify, no_wrap=True, min_width=fixed[k])
    if show_note:
        table.add_column(heads[-1], no_wrap=True, max_width=room)
    for r, ev in zip(rows, events, strict=True):
        note = r[-1] if len(r[-1]) <= room else r[-1][: room - 1] + "…"
        cells = [*r[:-1], f"[red]{escape(note)}[/]" if ev["error"] else escape(note)]
        table.add_row(*cells[: len(heads) if show_note else -1])
    return table


def run(
    ref: Annotated[str, typer.Argument(help="MODULE:OBJECT or FILE.py:OBJECT")],
    task: Annotated[str, typer.Option("--task", "-t", help="the task text")],
    broker: Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER")] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", envvar="AIFLOW_NAMESPACE")] = "default",
    timeout: Annotated[float, typer.Option(help="run deadline in seconds")] = 60.0,
    trace_out: Annotated[Path | None, typer.Option(help="write the run (answer, contributions, trace) as JSON")] = None,
    timeline: Annotated[Path | None, typer.Option(help="write a message timeline picture (.png/.svg)")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="every trace field (via, times, correlation ids, full errors)")
    ] = False,
    log_level: QuietLogOpt = "warning",
) -> None:
    """Run a graph or pattern on one task; print the answer and the trace. Signs its requests with
    $AIFLOW_SIGNING_KEY (hex) when set."""
    configure_logging(log_level)
    obj = load_object(ref)
    signing_key = signing_key_or_exit()

    async def main() -> Any:
        async with (
            broker_scope(broker) as url,
            TopologyManager(url, namespace=namespace, signing_key=signing_key) as mgr,
        ):
            return await mgr.run(obj, task, timeout=timeout)

    try:
        result = asyncio.run(main())
    except (AiflowError, GraphError) as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    console.print(trace_table(result, wide=wide))
    if result.answered_by:
        console.print(f"answered by [bold]{result.answered_by}[/]")
    if trace_out is not None:
        result.to_json(trace_out)
        console.print(f"run written to {trace_out}")
    if timeline is not None:
        result.trace.timeline(timeline, title=f"{result.pattern}: {task[:60]}")
        console.print(f"timeline written to {timeline}")
    if not result.ok:
        err.print(f"[bold red]run failed:[/] {result.error}")
        raise typer.Exit(1)
    console.print(f"[bold]answer:[/] {result.answer}")
