"""Start a deployment of node processes (named tiers), run a task set through patterns, with progress."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aiflow_agents import AgentSpec, BrokerURL, broker_from_env, broker_scope
from aiflow_agents.launch import NodeProcess
from topologies import Pattern, RunResult, TopologyManager

# logs and CI get room for --wide tables, unless COLUMNS says how wide the reader's window is
console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else Console(width=170)


@dataclass(frozen=True)
class NodeSpec:
    """One node process: its tier (shown in output and presence) and the agents it hosts."""

    name: str
    tier: str
    agents: Sequence[str]


@contextlib.asynccontextmanager
async def deployment(
    nodes: Sequence[NodeSpec],
    broker: str | None = None,
    *,
    quiet: bool = False,
    ready_timeout: float = 180.0,
    testbed: str | dict[str, Any] | None = None,
) -> AsyncIterator[tuple[TopologyManager, BrokerURL]]:
    """Embedded broker (unless ``broker``), one process per node, a manager once all agents are online.
    With ``testbed`` (a scenario), the nodes run on that testbed instead: each on the first tier of its
    kind, behind the scenario's links and CPU quotas, and the manager sits on the device tier."""
    if testbed is not None:
        async with _on_testbed(nodes, testbed, quiet=quiet, ready_timeout=ready_timeout) as out:
            yield out
        return
    logdir = Path(tempfile.mkdtemp(prefix="aiflow-demo-"))
    ns = f"demo{uuid.uuid4().hex[:8]}"
    async with broker_scope(broker) as url:
        if not quiet:
            where = "embedded broker" if broker_from_env(broker) is None else "broker"
            console.print(f"[bold]{where}[/] {url}  (namespace {ns}, node logs in {logdir})")
        procs = [
            NodeProcess(
                n.agents,
                url,
                namespace=ns,
                tier=n.tier,
                node_id=f"{ns}-{n.name}",
                log_path=logdir / f"{n.name}.log",
                extra_args=["--log-level", "warning"],
            ).start()
            for n in nodes
        ]
        try:
            async with TopologyManager(url, namespace=ns) as mgr:
                ids = [AgentSpec.parse(a).agent_id or AgentSpec.parse(a).type_name for n in nodes for a in n.agents]
                await _until_online(mgr, ids, procs, nodes, ready_timeout, logdir)
                if not quiet:
                    for n, p in zip(nodes, procs, strict=True):
                        console.print(f"  [cyan]{n.tier:>6}[/] node {n.name!r} (pid {p.pid}): {', '.join(n.agents)}")
                yield mgr, url
        finally:
            await asyncio.gather(*(p.astop() for p in procs))


async def _until_online(
    mgr: TopologyManager,
    ids: list[str],
    procs: Sequence[NodeProcess],
    nodes: Sequence[NodeSpec],
    timeout: float,
    logdir: Path,
) -> None:
    """Wait for every agent, but stop at once when a node process exits (a bad agent spec, a model
    that does not load) instead of waiting out the timeout; the error quotes the node's log."""
    waiting = asyncio.ensure_future(mgr.client.wait_for_agents(ids, timeout=timeout))
    try:
        while not waiting.done():
            dead = [(n, p) for n, p in zip(nodes, procs, strict=True) if not p.alive]
            if dead:
                n, p = dead[0]
                log = logdir / f"{n.name}.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-6:] if log.is_file() else []
                raise RuntimeError(
                    f"node {n.name!r} exited (code {p.proc.returncode if p.proc else '?'}) before its agents came "
                    f"online; its log ({log}):\n" + "\n".join(tail)
                )
            await asyncio.wait({waiting}, timeout=0.5)
        waiting.result()
    finally:
        waiting.cancel()


@contextlib.asynccontextmanager
async def _on_testbed(
    nodes: Sequence[NodeSpec], scenario: str | dict[str, Any], *, quiet: bool, ready_timeout: float
) -> AsyncIterator[tuple[TopologyManager, BrokerURL]]:
    from aiflow_agents.testbed import Testbed, load_scenario

    sc = load_scenario(scenario)
    by_kind = {}
    for name, t in sc.tiers.items():
        by_kind.setdefault(t.kind, name)
    agents: dict[str, list[str]] = {name: [] for name in sc.tiers}
    for n in nodes:
        tier = by_kind.get(n.tier)
        if tier is None:
            raise ValueError(f"scenario {sc.name!r} has no {n.tier} tier for node {n.name!r}")
        agents[tier] += list(n.agents)
    data = sc.model_dump()
    for name in data["tiers"]:
        data["tiers"][name]["agents"] = agents[name]
    async with Testbed(load_scenario(data), ready_timeout=ready_timeout) as tb:
        if not quiet:
            console.print(f"[bold]testbed[/] {sc.name} (namespace {tb.namespace}, logs in {tb.workdir})")
            for name, rt in tb.tiers.items():
                up = sc.tiers[name].link
                link = ", ".join(f"{k}={v}" for k, v in (up.model_dump() if up else {}).items() if v)
                console.print(f"  [cyan]{rt.kind:>6}[/] tier {name!r}: {', '.join(rt.agents) or '-'}  [dim]{link}[/]")
        await tb.start_clock()
        async with TopologyManager(tb.url(), namespace=tb.namespace) as mgr:
            yield mgr, tb.url()


async def run_all(
    mgr: TopologyManager,
    jobs: Sequence[tuple[str, Pattern, Any]],
    *,
    concurrency: int = 8,
    timeout: float = 60.0,
    description: str = "tasks",
    quiet: bool = False,
    on_result: Callable[[str, int, RunResult], None] | None = None,
) -> dict[str, list[RunResult]]:
    """Run every (name, pattern, task) job, ``concurrency`` at a time; results keep task order per name."""
    out: dict[str, list[RunResult | None]] = {}
    index: list[tuple[str, int]] = []
    for name, _, _ in jobs:
        out.setdefault(name, [])
        index.append((name, len(out[name])))
        out[name].append(None)
    sem = asyncio.Semaphore(concurrency)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        bar = progress.add_task(description, total=len(jobs))

        async def one(k: int) -> None:
            name, pattern, task = jobs[k]
            async with sem:
                r = await mgr.run(pattern, task, timeout=timeout, check_online=False)
            slot = index[k]
            out[slot[0]][slot[1]] = r
            if on_result is not None:
                on_result(name, slot[1], r)
            progress.advance(bar)

        await asyncio.gather(*(one(k) for k in range(len(jobs))))
    return {k: [r for r in v if r is not None] for k, v in out.items()}
