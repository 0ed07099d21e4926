"""``aiflow demo hello``: two nodes in separate processes exchange text and latents.

A "device" node hosts an echo agent and an "edge" node hosts a tensor-statistics agent. The demo
sends text and a float16 hidden-state latent to each, checks that what came back is exact, and
prints latency and bytes on the wire per request.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from aiflow_agents import Client, broker_from_env, broker_scope
from aiflow_agents.launch import NodeProcess
from protocols import Envelope, FeatureSpace, TensorPart, TensorRole

console = Console()


async def run_hello(broker: str | None, tasks: int, seed: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    space = FeatureSpace(family="demo", model="toy-device", layer=2, hidden_size=64)
    logdir = Path(tempfile.mkdtemp(prefix="aiflow-hello-"))
    async with broker_scope(broker) as url:
        where = "embedded broker" if broker_from_env(broker) is None else "broker"
        console.print(f"[bold]{where}[/] at {url}")
        nodes = [
            NodeProcess(["echo:device-echo"], url, tier="device", log_path=logdir / "device.log"),
            NodeProcess(["tensor-stats:edge-stats"], url, tier="edge", log_path=logdir / "edge.log"),
        ]
        for n in nodes:
            n.start()
        rows: list[dict[str, object]] = []
        try:
            async with Client(url) as client:
                await client.wait_for_agents(["device-echo", "edge-stats"], timeout=60)
                for name, n in zip(("device", "edge"), nodes, strict=True):
                    console.print(f"  {name} node up in its own process (pid {n.pid})")
                for i in range(tasks):
                    hidden = torch.randn(1, 16, 64, generator=gen).to(torch.float16)
                    req = Envelope.request(
                        f"task {i}: hello from the manager",
                        TensorPart(tensor=hidden, role=TensorRole.HIDDEN_STATE, space=space),
                    )
                    for agent in ("device-echo", "edge-stats"):
                        ex = await client.exchange(agent, req, timeout=30)
                        ok = ex.ok
                        if ok and agent == "device-echo":
                            back = ex.reply.tensor(TensorRole.HIDDEN_STATE) if ex.reply else None
                            ok = back is not None and torch.equal(back.tensor, hidden) and back.space == space
                        if ok and agent == "edge-stats" and ex.reply is not None:
                            stats = ex.reply.tensor()
                            ok = (
                                stats is not None
                                and abs(float(stats.tensor[0, 1]) - hidden.double().mean().item()) < 1e-9
                            )
                        rows.append(
                            {
                                "task": i,
                                "agent": agent,
                                "tier": "device" if agent == "device-echo" else "edge",
                                "ok": bool(ok),
                                "error": str(ex.error) if ex.error else None,
                                "bytes_out": ex.bytes_out,
                                "bytes_in": ex.bytes_in,
                                "latency_ms": round((ex.latency or 0) * 1e3, 3),
                            }
                        )
        finally:
            await asyncio.gather(*(n.astop() for n in nodes))
    table = Table(title="hello: text + float16 latent (1x16x64) round trips")
    for col in ("agent", "tier", "ok", "bytes out", "bytes in", "latency p50 ms"):
        table.add_column(col)
    summary = []
    for agent in ("device-echo", "edge-stats"):
        mine = [r for r in rows if r["agent"] == agent]
        lat = [float(r["latency_ms"]) for r in mine]  # type: ignore[arg-type]
        ok = sum(bool(r["ok"]) for r in mine)
        p50 = statistics.median(lat) if lat else float("nan")
        table.add_row(
            agent,
            str(mine[0]["tier"]) if mine else "",
            f"{ok}/{len(mine)}",
            str(mine[0]["bytes_out"]) if mine else "",
            str(mine[0]["bytes_in"]) if mine else "",
            f"{p50:.2f}",
        )
        summary.append({"agent": agent, "ok": ok, "total": len(mine), "latency_p50_ms": p50})
    console.print(table)
    report: dict[str, object] = {
        "demo": "hello",
        "broker": str(url),
        "tasks": tasks,
        "seed": seed,
        "summary": summary,
        "requests": rows,
        "node_logs": str(logdir),
    }
    return report


def hello(
    tasks: Annotated[int, typer.Option(help="requests per agent")] = 5,
    seed: Annotated[int, typer.Option(help="seed for the latents")] = 0,
    broker: Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for the JSON report")] = None,
) -> None:
    """Two nodes (device, edge) in separate processes exchange text + latent envelopes."""
    report = asyncio.run(run_hello(broker, tasks, seed))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "hello.json").write_text(json.dumps(report, indent=2))
        console.print(f"report written to {out / 'hello.json'}")
    failed = [r for r in report["requests"] if not r["ok"]]  # type: ignore[union-attr, index]
    if failed:
        console.print(f"[bold red]{len(failed)} request(s) failed[/]: {failed[0]}")
        raise typer.Exit(1)
    console.print("[bold green]all round trips exact[/]")
