"""``aiflow eval`` and the familial demos (``relay``, ``ensemble``, ``debate``, ``moa``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .harness import console, deployment
from .scenarios import MEMBERS, NODES, TIER, evaluate, held_out, patterns, write_report

BrokerOpt = Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER", help="default: embedded")]
TasksOpt = Annotated[int, typer.Option("--tasks", help="held-out tasks to draw")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the held-out draw (not 0 or 1001: train/tune)")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="folder for the JSON report and PNG chart")]
ConcOpt = Annotated[int, typer.Option("--concurrency", help="runs in flight")]
TestbedOpt = Annotated[
    str | None,
    typer.Option("--testbed", help="run on a testbed scenario (aiflow testbed list): tiers behind emulated links"),
]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_report(report: dict[str, Any]) -> None:
    t = Table(title=f"single members ({report['n_tasks']} held-out tasks, seed {report['seed']})")
    for col in ("member", "tier", "acc %", "95% CI", "layers/task", "p50 ms"):
        t.add_column(col)
    for m, s in report["members"].items():
        t.add_row(
            m,
            TIER.get(m, ""),
            pct(s["accuracy"]),
            f"{pct(s['ci95'][0])}-{pct(s['ci95'][1])}",
            f"{s['layers_mean']:.0f}",
            f"{s['latency_ms_p50']:.1f}",
        )
    console.print(t)
    t = Table(title="patterns vs their best member and the self-ensemble baseline")
    for col in (
        "pattern",
        "acc %",
        "95% CI",
        "best member",
        "gain pts",
        "McNemar p",
        "self-ens %",
        "any-right %",
        "calls",
        "layers",
        "bytes",
        "p50 ms",
        "verdict",
    ):
        t.add_column(col)
    for n, p in report["patterns"].items():
        se = p.get("self_ensemble", {})
        t.add_row(
            n,
            pct(p["accuracy"]),
            f"{pct(p['ci95'][0])}-{pct(p['ci95'][1])}",
            f"{p['best_member']} {pct(p['best_member_accuracy'])}",
            f"{p['gain_points']:+.1f}",
            f"{p['paired_vs_best']['mcnemar_p']:.3g}",
            pct(se["accuracy"]) if se else "-",
            pct(p["any_member_right_ceiling"]),
            f"{p['model_calls_mean']:.1f}",
            f"{p['layers_mean']:.0f}",
            f"{p['bytes_mean']:.0f}",
            f"{p['latency_ms_p50']:.1f}",
            "[green]emergent[/]" if p["emergent"] else "[red]not emergent[/]",
        )
    console.print(t)
    bands = sorted({b for s in [*report["members"].values(), *report["patterns"].values()] for b in s["by_band"]})
    t = Table(title="accuracy % per difficulty band")
    t.add_column("who")
    for b in bands:
        t.add_column(b)
    for name, s in [*report["members"].items(), *report["patterns"].items()]:
        t.add_row(name, *[pct(s["by_band"].get(b, float("nan"))) for b in bands])
    console.print(t)


async def _run(
    names: list[str],
    n: int,
    seed: int,
    broker: str | None,
    concurrency: int,
    quiet: bool,
    self_ensemble: bool = True,
    testbed: str | None = None,
) -> dict[str, Any]:
    tasks = held_out(n, seed)
    async with deployment(NODES, broker, quiet=quiet, testbed=testbed) as (mgr, url):
        report = await evaluate(mgr, names, tasks, concurrency=concurrency, quiet=quiet, self_ensemble=self_ensemble)
    report.update({"seed": seed, "n_tasks": n, "broker": str(url), "patterns_run": names, "testbed": testbed})
    return report


def eval_command(
    pattern: Annotated[
        list[str] | None, typer.Argument(help="pattern names (default: all); with --testbed: policy names")
    ] = None,
    tasks: Annotated[int | None, typer.Option("--tasks", help="held-out tasks to draw (default 300)")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="seed of the held-out draw (default 7, or the scenario's)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="runs in flight (default 8)")] = None,
    testbed: Annotated[
        str | None,
        typer.Option(
            "--testbed",
            help="a testbed scenario (aiflow testbed list): compare scheduling policies on emulated "
            "device-edge-cloud links instead (tasks, deadline and concurrency default to the scenario's)",
        ),
    ] = None,
) -> None:
    """Evaluate patterns against every member alone on a fresh held-out task set, or (--testbed) static and
    adaptive scheduling policies on a device-edge-cloud testbed."""
    if testbed is not None:
        from aiflow_agents import configure_logging
        from aiflow_agents.testbed import ScenarioError, TestbedError

        configure_logging("warning")  # late replies of losing hedges are expected, not news

        from .testbed_eval import finite, print_testbed_report, run_testbed_eval, write_testbed_report

        try:
            report = asyncio.run(
                run_testbed_eval(
                    testbed, tasks=tasks, seed=seed, concurrency=concurrency, policies=pattern, quiet=as_json
                )
            )
        except (ScenarioError, TestbedError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1) from None
        if as_json:
            print(json.dumps(finite(report), indent=2, default=str, allow_nan=False))
        else:
            print_testbed_report(report)
        write_testbed_report(report, out)
        return
    tasks = 300 if tasks is None else tasks
    seed = 7 if seed is None else seed
    concurrency = 8 if concurrency is None else concurrency
    names = pattern or list(patterns())
    report = asyncio.run(_run(names, tasks, seed, broker, concurrency, quiet=as_json))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    write_report(report, out, "eval", f"aiflow eval: {tasks} tasks, seed {seed}")


def _demo(
    names: list[str],
    title: str,
    tasks: int,
    seed: int,
    out: Path | None,
    broker: str | None,
    concurrency: int,
    self_ensemble: bool = True,
    testbed: str | None = None,
) -> dict[str, Any]:
    report = asyncio.run(
        _run(names, tasks, seed, broker, concurrency, quiet=False, self_ensemble=self_ensemble, testbed=testbed)
    )
    report["demo"] = title
    print_report(report)
    write_report(report, out, title, f"demo {title}: {tasks} tasks, seed {seed}")
    return report


def relay(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
) -> None:
    """Device -> edge -> cloud familial cascade: hidden states relayed, not recomputed."""
    report = _demo(["relay"], "relay", tasks, seed, out, broker, concurrency, self_ensemble=False, testbed=testbed)
    p = report["patterns"]["relay"]
    cloud = report["members"]["cloud"]
    device = report["members"]["device"]
    t = Table(title="relay against 'everything in the cloud' and 'device only'")
    for col in ("setup", "acc %", "share answered device/edge/cloud", "layers/task", "bytes/task", "p50 ms", "p95 ms"):
        t.add_column(col)
    share = "/".join(pct(p["answered_by"].get(m, 0.0)) for m in ("device", "edge", "cloud"))
    t.add_row(
        "relay",
        pct(p["accuracy"]),
        share,
        f"{p['layers_mean']:.0f}",
        f"{p['bytes_mean']:.0f}",
        f"{p['latency_ms_p50']:.1f}",
        f"{p['latency_ms_p95']:.1f}",
    )
    for name, s in (("cloud only", cloud), ("device only", device)):
        t.add_row(
            name,
            pct(s["accuracy"]),
            "",
            f"{s['layers_mean']:.0f}",
            f"{s['bytes_mean']:.0f}",
            f"{s['latency_ms_p50']:.1f}",
            f"{s['latency_ms_p95']:.1f}",
        )
    console.print(t)
    ratio = p["accuracy"] / cloud["accuracy"] if cloud["accuracy"] else float("nan")
    console.print(
        f"relay reaches {100 * ratio:.1f}% of the cloud's accuracy; the cloud ran "
        f"{pct(p['answered_by'].get('cloud', 0.0))}% of the tasks"
    )
    if out is not None:
        report["relay_vs_cloud"] = {"accuracy_ratio": ratio, "cloud_share": p["answered_by"].get("cloud", 0.0)}
        (out / "relay.json").write_text(json.dumps(report, indent=2, default=str))


def ensemble_demo(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
) -> None:
    """Diverse members: vote vs cross-scoring vs latent (distribution) averaging vs each member."""
    _demo(
        ["ensemble-vote", "ensemble-cross", "ensemble-latent"],
        "ensemble",
        tasks,
        seed,
        out,
        broker,
        concurrency,
        testbed=testbed,
    )


def debate_demo(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
) -> None:
    """Multi-agent debate on arithmetic: accuracy per round."""
    report = _demo(["debate"], "debate", tasks, seed, out, broker, concurrency, testbed=testbed)
    console.print(f"per-round majority accuracy: {report['patterns']['debate'].get('per_round', 'see JSON')}")


def moa_demo(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
) -> None:
    """Mixture of agents: a layer of proposers, the cloud exit aggregates."""
    _demo(["moa"], "moa", tasks, seed, out, broker, concurrency, testbed=testbed)


__all__ = ["MEMBERS", "debate_demo", "ensemble_demo", "eval_command", "moa_demo", "relay"]
