"""``aiflow eval`` and the familial demos (``relay``, ``ensemble``, ``debate``, ``moa``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .harness import console, deployment
from .scenarios import (
    EMERGENT_ALPHA,
    MEMBERS,
    NODES,
    TIER,
    Chart,
    draw_chart,
    draw_relay_chart,
    evaluate,
    held_out,
    patterns,
    write_report,
)
from .tables import Col, emit, table

BrokerOpt = Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER", help="default: embedded")]
TasksOpt = Annotated[int, typer.Option("--tasks", help="held-out tasks to draw")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the held-out draw (not 0 or 1001: train/tune)")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="folder for the JSON report and PNG chart")]
ConcOpt = Annotated[int, typer.Option("--concurrency", help="runs in flight")]
WideOpt = Annotated[bool, typer.Option("--wide", help="show every column (the default tables fit 80 columns)")]
TestbedOpt = Annotated[
    str | None,
    typer.Option("--testbed", help="run on a testbed scenario (aiflow testbed list): tiers behind emulated links"),
]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def ci(lo_hi: Sequence[float], wide: bool = False) -> str:
    """A 95% CI in percent; whole points in narrow tables (the interval is wider than a point anyway)."""
    lo, hi = lo_hi
    return f"{pct(lo)}-{pct(hi)}" if wide else f"{100 * lo:.0f}-{100 * hi:.0f}"


def report_tables(report: dict[str, Any], wide: bool = False) -> list[Table]:
    """The members, patterns and per-band tables of an eval/demo report: 80 columns unless ``wide``."""
    n = report["n_tasks"]
    cols = [Col("member", "label"), Col("tier", "label"), Col("acc %"), Col("95% CI"), Col("layers")]
    cols += [Col("calls"), Col("bytes"), Col("p50 ms"), Col("p95 ms")] if wide else [Col("p50 ms")]
    members = table(
        f"single members ({n} held-out tasks, seed {report['seed']})",
        cols,
        legend=None if wide else "layers: model layers run per task; --wide adds calls, bytes and p95",
    )
    for m, s in report["members"].items():
        row = [m, TIER.get(m, ""), pct(s["accuracy"]), ci(s["ci95"], wide), f"{s['layers_mean']:.0f}"]
        if wide:
            row += [f"{s['model_calls_mean']:.1f}", f"{s['bytes_mean']:.0f}", f"{s['latency_ms_p50']:.1f}"]
            row += [f"{s['latency_ms_p95']:.1f}"]
        else:
            row += [f"{s['latency_ms_p50']:.0f}"]
        members.add_row(*row)
    if wide:
        cols = [Col("pattern", "label"), Col("acc %"), Col("95% CI"), Col("best member", "label"), Col("gain pts")]
        cols += [Col("McNemar p"), Col("self-ens %"), Col("any-right %"), Col("calls"), Col("layers"), Col("bytes")]
        cols += [Col("p50 ms"), Col("verdict", "text")]
        legend = None
    else:
        cols = [Col("pattern", "label"), Col("acc %"), Col("95% CI"), Col("best member", "label"), Col("gain")]
        cols += [Col("any %"), Col("verdict", "text")]
        legend = (
            "best member: the pattern's best member alone; gain: accuracy points over it; any: tasks where at "
            "least one member was right (the oracle ceiling); emergent = above the best member (McNemar "
            f"p<{EMERGENT_ALPHA}) and its self-ensemble. --wide: p, self-ensemble, calls, layers, bytes, latency"
        )
    pats = table("patterns vs their best member and the self-ensemble baseline", cols, legend=legend)
    for name, p in report["patterns"].items():
        se = p.get("self_ensemble", {})
        row = [name, pct(p["accuracy"]), ci(p["ci95"], wide), f"{p['best_member']} {pct(p['best_member_accuracy'])}"]
        row += [f"{p['gain_points']:+.1f}"]
        if wide:
            row += [f"{p['paired_vs_best']['mcnemar_p']:.3g}", pct(se["accuracy"]) if se else "-"]
            row += [pct(p["any_member_right_ceiling"]), f"{p['model_calls_mean']:.1f}", f"{p['layers_mean']:.0f}"]
            row += [f"{p['bytes_mean']:.0f}", f"{p['latency_ms_p50']:.1f}"]
        else:
            row += [pct(p["any_member_right_ceiling"])]
        pats.add_row(*row, _verdict(p))
    everyone = [*report["members"].items(), *report["patterns"].items()]
    bands = sorted({b for _, s in everyone for b in s["by_band"]})
    per_band = table(
        "accuracy % per difficulty band",
        [Col("who", "label"), *(Col(b) for b in bands)],
        legend="band = level:operation-<operands>x<digits>",
    )
    for name, s in everyone:
        per_band.add_row(name, *[pct(s["by_band"].get(b, float("nan"))) for b in bands])
    return [members, pats, per_band]


def print_report(report: dict[str, Any], wide: bool = False, out: Console | None = None) -> None:
    for t in report_tables(report, wide):
        emit(out or console, t, wide=wide)


def _verdict(p: dict[str, Any]) -> str:
    why = p.get("verdict") or ("emergent" if p["emergent"] else "not emergent")  # reports before the reason
    return f"[green]{why}[/]" if p["emergent"] else f"[red]{why}[/]"


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
    wide: Annotated[
        bool,
        typer.Option("--wide", help="show every column (the default tables fit 80 columns)"),
    ] = False,
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
    bench: Annotated[
        list[str] | None,
        typer.Option(
            "--bench",
            help="public multiple-choice benchmark(s) with real LMs instead (arc-easy, arc-challenge, sciq, "
            "openbookqa, ...; 'goals' = the three of the README); repeat or comma-separate",
        ),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option("--models", help="with --bench: agents to deploy (default smollm2,gemma,qwen0_5b,qwen1_5b)"),
    ] = None,
    items: Annotated[
        int | None, typer.Option("--items", help="with --bench: report at most N items per benchmark (default all)")
    ] = None,
    tune: Annotated[
        int | None,
        typer.Option(
            "--tune", help="with --bench: first N items of each split tune thresholds, never reported (default 100)"
        ),
    ] = None,
) -> None:
    """Evaluate patterns against every member alone on a fresh held-out task set, (--bench) real LMs on public
    multiple-choice benchmarks, or (--testbed) static and adaptive scheduling policies on a device-edge-cloud
    testbed."""
    if bench:
        _bench(bench, models, items, tune, as_json, out, broker, concurrency, wide)
        return
    if testbed is not None:
        from aiflow_agents import configure_logging
        from aiflow_agents.testbed import ScenarioError, TestbedError

        configure_logging("warning")  # late replies of losing hedges are expected, not news

        from .stats import finite
        from .testbed_eval import print_testbed_report, run_testbed_eval, write_testbed_report

        stdout = sys.stdout
        with _only_json_on_stdout(as_json):
            try:
                report = asyncio.run(
                    run_testbed_eval(
                        testbed, tasks=tasks, seed=seed, concurrency=concurrency, policies=pattern, quiet=as_json
                    )
                )
            except (ScenarioError, TestbedError, ValueError) as e:
                console.print(f"[bold red]error:[/] {e}")
                raise typer.Exit(1) from None
            if not as_json:
                print_testbed_report(report, wide)
            write_testbed_report(report, out)
        if as_json:
            print(json.dumps(finite(report), indent=2, default=str, allow_nan=False), file=stdout)
        return
    tasks = 300 if tasks is None else tasks
    seed = 7 if seed is None else seed
    concurrency = 8 if concurrency is None else concurrency
    names = pattern or list(patterns())
    stdout = sys.stdout
    with _only_json_on_stdout(as_json):
        report = asyncio.run(_run(names, tasks, seed, broker, concurrency, quiet=as_json))
        if not as_json:
            print_report(report, wide)
        write_report(report, out, "eval", f"aiflow eval: {tasks} tasks, seed {seed}")
    if as_json:
        print(json.dumps(report, indent=2, default=str), file=stdout)


def _bench(
    benches: list[str],
    models: str | None,
    items: int | None,
    tune: int | None,
    as_json: bool,
    out: Path | None,
    broker: str | None,
    concurrency: int | None,
    wide: bool = False,
) -> None:
    from aiflow_agents import configure_logging
    from aiflow_agents.models.benchmarks import BenchmarkError

    from .bench_eval import (
        DEFAULT_BENCHES,
        POOL,
        BenchConfig,
        print_bench_report,
        run_bench,
        write_bench_report,
    )
    from .stats import finite

    configure_logging("warning")
    names = [b.strip() for arg in benches for b in arg.split(",") if b.strip()]
    names = [n for b in names for n in (DEFAULT_BENCHES if b == "goals" else (b,))]
    chosen = tuple(m.strip() for m in models.split(",")) if models else tuple(POOL)
    cfg = BenchConfig(
        benches=tuple(names),
        models=chosen,
        items=items,
        tune=tune,
        concurrency=concurrency or 12,
        quiet=as_json,
        checkpoint=out / "bench.partial.json" if out is not None else None,
    )
    stdout = sys.stdout
    # a SIGTERM unwinds like Ctrl-C, so the node processes of a long run are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with _only_json_on_stdout(as_json):
        try:
            report = asyncio.run(run_bench(cfg, broker))
        except (BenchmarkError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1) from None
        if not as_json:
            print_bench_report(report, wide)
        write_bench_report(report, out)
    if as_json:
        print(json.dumps(finite(report), indent=2, default=str, allow_nan=False), file=stdout)


def _only_json_on_stdout(as_json: bool) -> contextlib.AbstractContextManager[Any]:
    """With --json, whatever else would be printed (where the report was written, notes) goes to
    stderr, so stdout is one JSON document a pipe can parse."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


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
    wide: bool = False,
    chart: Chart = draw_chart,
) -> dict[str, Any]:
    report = asyncio.run(
        _run(names, tasks, seed, broker, concurrency, quiet=False, self_ensemble=self_ensemble, testbed=testbed)
    )
    report["demo"] = title
    print_report(report, wide)
    write_report(report, out, title, f"demo {title}: {tasks} tasks, seed {seed}", chart)
    return report


#: The relay's baselines: every exit of the family alone, on its own tier.
RELAY_ALONE = (("device only", "device"), ("edge only", "edge"), ("cloud only", "cloud"))


def relay_table(report: dict[str, Any], wide: bool = False) -> Table:
    """The relay against each exit alone: accuracy next to what it cost (layers, bytes, latency)."""
    cols = [Col("setup", "label"), Col("acc %"), Col("95% CI"), Col("answered d/e/c %", "label")]
    cols += [Col("layers"), Col("bytes"), Col("p50 ms")] + ([Col("p95 ms")] if wide else [])
    t = table(
        "relay against each tier alone (device, edge, 'everything in the cloud')",
        cols,
        legend="answered: share of tasks whose answer came from the device/edge/cloud exit; layers, bytes: "
        "mean per task (bytes = every message on the broker, hidden states included)",
    )
    p = report["patterns"]["relay"]
    rows = [("relay", p, p["answered_by"])]
    rows += [(label, report["members"][m], {m: 1.0}) for label, m in RELAY_ALONE if m in report["members"]]
    for label, s, answered in rows:
        share = "/".join(f"{100 * answered.get(m, 0.0):.0f}" for m in ("device", "edge", "cloud"))
        row = [label, pct(s["accuracy"]), ci(s["ci95"], wide), share, f"{s['layers_mean']:.0f}"]
        row += [f"{s['bytes_mean']:.0f}", f"{s['latency_ms_p50']:.1f}"]
        t.add_row(*row, *([f"{s['latency_ms_p95']:.1f}"] if wide else []))
    return t


def relay(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
    wide: WideOpt = False,
) -> None:
    """Device -> edge -> cloud familial cascade: hidden states relayed, not recomputed."""
    report = _demo(
        ["relay"],
        "relay",
        tasks,
        seed,
        out,
        broker,
        concurrency,
        self_ensemble=False,
        testbed=testbed,
        wide=wide,
        chart=draw_relay_chart,
    )
    p = report["patterns"]["relay"]
    cloud = report["members"]["cloud"]
    emit(console, relay_table(report, wide), wide=wide)
    ratio = p["accuracy"] / cloud["accuracy"] if cloud["accuracy"] else float("nan")
    layers = p["layers_mean"] / cloud["layers_mean"] if cloud["layers_mean"] else float("nan")
    console.print(
        f"relay reaches {100 * ratio:.1f}% of the cloud's accuracy with {100 * layers:.0f}% of its layers; "
        f"the cloud ran {pct(p['answered_by'].get('cloud', 0.0))}% of the tasks"
    )
    if out is not None:
        report["relay_vs_cloud"] = {
            "accuracy_ratio": ratio,
            "layers_ratio": layers,
            "cloud_share": p["answered_by"].get("cloud", 0.0),
        }
        (out / "relay.json").write_text(json.dumps(report, indent=2, default=str))


def ensemble_demo(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
    wide: WideOpt = False,
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
        wide=wide,
    )


def changes_table(p: dict[str, Any]) -> Table:
    """Debate: how many agents revised their answer between rounds, and in which direction."""
    t = table(
        "answer changes between rounds (agents that revised after seeing their peers)",
        [
            Col("rounds", "label"),
            Col("answers"),
            Col("changed"),
            Col("right→wrong"),
            Col("wrong→right"),
            Col("tasks changed"),
        ],
        legend="answers: agent answers compared; tasks changed: tasks where at least one agent changed",
    )
    for ch in p.get("changes", []):
        t.add_row(
            ch["rounds"],
            str(ch["agent_answers_compared"]),
            str(ch["changed"]),
            str(ch["right_to_wrong"]),
            str(ch["wrong_to_right"]),
            str(ch["tasks_with_a_change"]),
        )
    return t


def debate_demo(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
    wide: WideOpt = False,
) -> None:
    """Multi-agent debate on arithmetic: accuracy per round."""
    report = _demo(["debate"], "debate", tasks, seed, out, broker, concurrency, testbed=testbed, wide=wide)
    p = report["patterns"]["debate"]
    console.print(f"per-round majority accuracy: {', '.join(pct(x) for x in p.get('per_round', []))} %")
    emit(console, changes_table(p), wide=wide)
    if p.get("changes") and not any(ch["changed"] for ch in p["changes"]):
        console.print(
            "no agent changed its answer in any round: this debate decided exactly what cross-scoring the "
            "first round would have"
        )


def moa_demo(
    tasks: TasksOpt = 200,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    broker: BrokerOpt = None,
    concurrency: ConcOpt = 8,
    testbed: TestbedOpt = None,
    wide: WideOpt = False,
) -> None:
    """Mixture of agents: a layer of proposers, the cloud exit aggregates."""
    _demo(["moa"], "moa", tasks, seed, out, broker, concurrency, testbed=testbed, wide=wide)


__all__ = ["MEMBERS", "debate_demo", "ensemble_demo", "eval_command", "moa_demo", "relay"]
