"""``aiflow graph draw`` and ``aiflow run``: graphs defined in a user's Python file."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from aiflow_agents import AiflowError, broker_scope
from aiflow_agents.cli import signing_key_or_exit

from .graph import AgentGraph, GraphError
from .manager import TopologyManager
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


@graph_app.command("draw")
def draw(
    ref: Annotated[str, typer.Argument(help="MODULE:OBJECT or FILE.py:OBJECT")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".svg, .png or .mmd (Mermaid)")],
) -> None:
    """Render a graph or pattern (tiers shown as colours); also prints its Mermaid text."""
    obj = load_object(ref)
    try:
        if isinstance(obj, Pattern):
            obj.validate()
        graph = obj.graph() if isinstance(obj, Pattern) else obj
    except GraphError as e:
        err.print(f"[bold red]invalid graph:[/] {e}")
        raise typer.Exit(1) from None
    graph.draw(out)
    console.print(graph.to_mermaid())
    console.print(f"written {out}")


def run(
    ref: Annotated[str, typer.Argument(help="MODULE:OBJECT or FILE.py:OBJECT")],
    task: Annotated[str, typer.Option("--task", "-t", help="the task text")],
    broker: Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER")] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", envvar="AIFLOW_NAMESPACE")] = "default",
    timeout: Annotated[float, typer.Option(help="run deadline in seconds")] = 60.0,
    trace_out: Annotated[Path | None, typer.Option(help="write the run (answer, contributions, trace) as JSON")] = None,
    timeline: Annotated[Path | None, typer.Option(help="write a message timeline picture (.png/.svg)")] = None,
) -> None:
    """Run a graph or pattern on one task; print the answer and the trace. Signs its requests with
    $AIFLOW_SIGNING_KEY (hex) when set."""
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
    table = Table(title=f"trace of {result.pattern} ({result.elapsed * 1e3:.1f} ms, {result.trace.bytes_total} bytes)")
    for col in ("#", "from", "to", "kind", "label", "bytes", "ms", "error"):
        table.add_column(col)
    for ev in result.trace.to_list():
        table.add_row(
            str(ev["seq"]),
            ev["sender"],
            ev["recipient"],
            ev["kind"],
            ev["label"],
            str(ev["bytes"]),
            f"{ev['latency_ms']:.1f}",
            ev["error"] or "",
        )
    console.print(table)
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
