"""``aiflow testbed``: list, show and check scenarios; bring one up until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..cli import fail
from .compute import cpu_quota_unavailable
from .mosquitto import TestbedError, mosquitto_binary
from .netns import netns_unavailable
from .scenario import ScenarioError, load_scenario, shipped_scenarios
from .testbed import Testbed

testbed_app = typer.Typer(help="Device-edge-cloud testbed: tiers as places, emulated links.", no_args_is_help=True)
console = Console()
ScenarioArg = Annotated[str, typer.Argument(help="a shipped scenario name or a TOML file")]


@testbed_app.command("list")
def list_scenarios() -> None:
    """Shipped scenarios."""
    t = Table(title="shipped scenarios (aiflow testbed show NAME)")
    t.add_column("name")
    t.add_column("description")
    for name in sorted(shipped_scenarios()):
        t.add_row(name, load_scenario(name).description)
    console.print(t)


@testbed_app.command("show")
def show(scenario: ScenarioArg) -> None:
    """Tiers, links, outages and workload of a scenario."""
    try:
        sc = load_scenario(scenario)
    except ScenarioError as e:
        raise fail(str(e)) from None
    console.print(f"[bold]{sc.name}[/]: {sc.description}")
    t = Table()
    for col in ("tier", "kind", "cores", "parent", "uplink", "agents"):
        t.add_column(col)
    for name, tier in sc.tiers.items():
        link = tier.link.model_dump(exclude_none=True) if tier.link else {}
        t.add_row(name, tier.kind, str(tier.cores or "-"), tier.parent or "-", json.dumps(link), ", ".join(tier.agents))
    console.print(t)
    for o in sc.outages:
        when = _when(o.start_s, o.duration_s, o.every_s, o.times)
        console.print(f"outage: {o.link} uplink {o.mode} {when}")
    for c in sc.changes:
        when = _when(c.at_s, c.duration_s, c.every_s, None)
        console.print(f"change: {c.link} uplink -> {c.profile.model_dump(exclude_none=True)} {when}")
    console.print(f"workload: {sc.workload.model_dump()}")


def _when(start_s: float, duration_s: float | None, every_s: float | None, times: int | None) -> str:
    """``from 5 s for 4 s, every 12 s (3 times)``; a one-off says no period, a lasting change no duration."""
    out = f"from {start_s:g} s" + (f" for {duration_s:g} s" if duration_s is not None else " on")
    if every_s is not None:
        out += f", every {every_s:g} s" + (f" ({times} times)" if times is not None else "")
    return out


@testbed_app.command("check")
def check() -> None:
    """What this machine offers a testbed (mosquitto, CPU quotas, network namespaces)."""
    rows = [
        ("mosquitto (per-tier brokers)", None if mosquitto_binary() else "not installed: use brokers = 'shared'"),
        ("CPU quotas (cgroups)", cpu_quota_unavailable()),
        ("network namespaces", netns_unavailable()),
    ]
    t = Table(title=f"testbed capabilities (uid {os.geteuid()})")
    t.add_column("feature")
    t.add_column("status")
    for name, why in rows:
        t.add_row(name, "[green]yes[/]" if why is None else f"[yellow]no[/]: {why}")
    console.print(t)


@testbed_app.command("up")
def up(
    scenario: ScenarioArg,
    duration: Annotated[float, typer.Option(help="seconds to stay up (0: until Ctrl-C)")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="print where everything runs as JSON")] = False,
    strict: Annotated[bool, typer.Option(help="fail instead of running without quotas/namespaces")] = False,
) -> None:
    """Start the scenario's tiers, brokers and links, follow its outage schedule, stop on Ctrl-C."""
    try:
        sc = load_scenario(scenario)
    except ScenarioError as e:
        raise fail(str(e)) from None

    async def main() -> None:
        async with Testbed(sc, strict=strict) as tb:
            info = tb.describe()
            if as_json:
                print(json.dumps(info, indent=2), flush=True)
            else:
                t = Table(title=f"testbed {sc.name} up (namespace {tb.namespace}; logs in {tb.workdir})")
                for col in ("tier", "kind", "broker", "cores", "uplink", "agents"):
                    t.add_column(col)
                for name, d in info["tiers"].items():
                    up = d["uplink"] or {}
                    t.add_row(
                        name,
                        d["kind"],
                        d["url"],
                        str(d["cores"] or "-"),
                        ", ".join(f"{k}={v}" for k, v in up.items() if v) or "-",
                        ", ".join(d["agents"]),
                    )
                console.print(t)
                for w in tb.warnings:
                    console.print(f"[yellow]warning:[/] {w}")
                console.print(
                    f"try: aiflow send device '12+30' --broker {tb.url().url()} --namespace {tb.namespace}"
                    + ("" if duration else "   (Ctrl-C stops)")
                )
            await tb.start_clock()
            seen = 0
            try:
                while not duration or tb.elapsed() < duration:
                    await asyncio.sleep(0.2)
                    events = await tb.link_events()
                    for e in events[seen:]:
                        console.print(f"[dim]{e.t:7.2f} s[/] link {e.link}: {e.what}")
                    seen = len(events)
            finally:
                await tb.stop_clock()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except TestbedError as e:
        raise fail(str(e)) from None
