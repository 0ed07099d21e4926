"""Every demo end to end at a small size (separate node processes, embedded broker), and ``aiflow eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiflow_agents.models.tasks import generate_tasks

pytestmark = pytest.mark.timeout(950)

SUMMARY_FIELDS = {
    "accuracy",
    "tokens_mean",
    "latency_ms_mean",
    "ci95",
    "by_band",
    "model_calls_mean",
    "layers_mean",
    "bytes_mean",
    "latency_ms_p50",
    "latency_ms_p95",
}
PATTERN_FIELDS = SUMMARY_FIELDS | {
    "best_member",
    "gain_points",
    "paired_vs_best",
    "any_member_right_ceiling",
    "same_answer_as",
    "emergent",
    "verdict",
}


def aiflow(*args: str, timeout: float = 540, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)} if columns else None
    return subprocess.run(
        [sys.executable, "-m", "aiflow_agents", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    ("demo", "patterns"),
    [
        ("relay", ["relay"]),
        ("ensemble", ["ensemble-vote", "ensemble-cross", "ensemble-latent"]),
        ("debate", ["debate"]),
        ("moa", ["moa"]),
    ],
)
def test_demo_runs_and_reports_every_field(demo: str, patterns: list[str], tmp_path: Path) -> None:
    out = aiflow("demo", demo, "--tasks", "6", "--seed", "11", "--out", str(tmp_path), columns=80)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for tier in ("device", "edge", "cloud"):
        assert tier in out.stdout  # the tiers are named in the output
    assert "…" not in out.stdout  # at 80 columns no cell is cut
    for name in [*patterns, "single members", "any %"]:
        assert name in out.stdout
    report = json.loads((tmp_path / f"{demo}.json").read_text())
    assert (tmp_path / f"{demo}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(report["patterns"]) == set(patterns)
    for p in report["patterns"].values():
        assert PATTERN_FIELDS <= set(p) and p["n"] == 6
        assert set(p["same_answer_as"]) == set(p["members"]) and p["verdict"]
    for m in report["members"].values():
        assert SUMMARY_FIELDS <= set(m)
    if demo == "relay":
        assert set(report["patterns"]["relay"]["answered_by"]) <= {"device", "edge", "cloud"}
        assert {"accuracy_ratio", "layers_ratio", "cloud_share"} <= set(report["relay_vs_cloud"])
        assert "edge only" in out.stdout and "answered d/e/c %" in out.stdout
    if demo == "debate":
        debate = report["patterns"]["debate"]
        assert len(debate["per_round"]) == 2
        [ch] = debate["changes"]  # two rounds: one transition, every agent's answer compared
        assert ch["rounds"] == "1->2" and ch["agent_answers_compared"] == 6 * 3
        assert ch["right_to_wrong"] + ch["wrong_to_right"] <= ch["changed"] <= ch["agent_answers_compared"]
        assert "answer changes between rounds" in out.stdout


def test_eval_seeds_draw_different_sets_and_reproduce(tmp_path: Path) -> None:
    a, b = generate_tasks(40, 5), generate_tasks(40, 6)
    assert [t.prompt for t in a] != [t.prompt for t in b]
    assert [t.prompt for t in generate_tasks(40, 5)] == [t.prompt for t in a]

    def run(seed: int, *more: str) -> dict:
        out = aiflow("eval", "ensemble-vote", "relay", "--tasks", "8", "--seed", str(seed), "--json", *more)
        assert out.returncode == 0, out.stderr[-3000:]
        if more:  # where the report went is news for the terminal, not part of the JSON on stdout
            assert "report:" in out.stderr and "report:" not in out.stdout
        return json.loads(out.stdout)  # stdout is one JSON document, nothing before or after it

    first, again, other = run(21, "--out", str(tmp_path)), run(21), run(22)
    assert json.loads((tmp_path / "eval.json").read_text())["seed"] == 21

    def numbers(r: dict) -> dict:
        return {k: (v["correct"], v["layers_mean"]) for k, v in [*r["members"].items(), *r["patterns"].items()]}

    assert numbers(first) == numbers(again)  # same seed, same numbers on CPU
    assert first["seed"] == 21 and other["seed"] == 22
    with pytest.raises(ValueError, match="reserved"):
        from demos.scenarios import held_out

        held_out(10, 1001)


def test_emergent_needs_a_significant_gain_over_the_best_member_and_the_self_ensemble() -> None:
    from demos.scenarios import emergence

    assert emergence(0.525, 0.50, 1.0, 0.40) == (False, "not significant (p=1)")  # +2.5 points by chance
    assert emergence(0.50, 0.52, 0.2, 0.40) == (False, "no gain (-2.0 pts)")
    assert emergence(0.60, 0.50, 0.001, 0.61) == (False, "not above the self-ensemble (61.0%)")
    assert emergence(0.60, 0.50, 0.001, 0.55) == (True, "emergent (p=0.001)")


@pytest.mark.slow
def test_heterogeneous_cascade_demo_with_real_models(tmp_path: Path) -> None:
    out = aiflow("demo", "cascade", "--tasks", "3", "--out", str(tmp_path), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "cascade.json").read_text())
    assert set(report["results"]) == {"smol alone", "gemma alone", "cascade"}
    cas = report["results"]["cascade"]
    assert cas["n"] == 3 and abs(sum(cas["answered_by"].values()) - 1.0) < 1e-9
    assert (tmp_path / "cascade.png").read_bytes()[:4] == b"\x89PNG"


# --- tables at 80 columns and charts, from a synthetic report with the longest values a run produces ---


def _summary(name: str, acc: float, **more: object) -> dict:
    from demos.stats import wilson

    n = 300
    k = round(acc * n)
    return {
        "name": name,
        "n": n,
        "correct": k,
        "accuracy": k / n,
        "ci95": list(wilson(k, n)),
        "by_band": {b: acc for b in ("1:add-2x3", "2:add-3x3", "3:mul-2x1", "4:add-4x3", "5:expr-6x1")},
        "model_calls_mean": 15.0,
        "layers_mean": 1500.0,
        "tokens_mean": 120.0,
        "bytes_mean": 179731.0,
        "latency_ms_mean": 1234.5,
        "latency_ms_p50": 1234.5,
        "latency_ms_p95": 12345.6,
        "answered_by": {},
        **more,
    }


def synthetic_report() -> dict:
    from demos.scenarios import MEMBERS, emergence, patterns

    members = {m: _summary(m, 0.5 + 0.08 * i) for i, m in enumerate(MEMBERS)}
    pats = {}
    for i, name in enumerate(patterns()):
        acc = 0.55 + 0.07 * i
        best = "peer-b" if name != "relay" else "cloud"
        p = _summary(name, acc, answered_by={"device": 0.25, "edge": 0.5, "cloud": 0.25} if name == "relay" else {})
        se = 0.99 if i % 2 else 0.1
        p_value = 0.000123 if i % 3 else 0.5
        emergent, verdict = emergence(acc, members[best]["accuracy"], p_value, se)
        p.update(
            members=["cloud", "peer-a", "peer-b"],
            best_member=best,
            best_member_accuracy=members[best]["accuracy"],
            gain_points=100 * (acc - members[best]["accuracy"]),
            paired_vs_best={"pattern_only_right": 40, "best_only_right": 3, "mcnemar_p": p_value},
            any_member_right_ceiling=0.95 - 0.01 * i,
            self_ensemble={"accuracy": se, "calls": 15},
            emergent=emergent,
            verdict=verdict,
        )
        pats[name] = p
    pats["debate"]["changes"] = [
        {
            "rounds": "1->2",
            "agent_answers_compared": 900,
            "changed": 123,
            "right_to_wrong": 45,
            "wrong_to_right": 67,
            "tasks_with_a_change": 89,
        }
    ]
    return {"members": members, "patterns": pats, "n_tasks": 300, "seed": 7}


def render(fn: object, *args: object, width: int = 80) -> str:
    from rich.console import Console

    out = Console(width=width, record=True, color_system=None)
    fn(*args, out=out) if fn.__name__ == "print_report" else out.print(fn(*args))  # type: ignore[attr-defined]
    return out.export_text()


def test_demo_tables_fit_80_columns_without_cutting_a_cell() -> None:
    from demos.evaluation import changes_table, print_report, relay_table

    report = synthetic_report()
    text = render(print_report, report)
    text += render(relay_table, report) + render(changes_table, report["patterns"]["debate"])
    assert "…" not in text  # rich cuts a cell that does not fit with an ellipsis
    assert max(len(line) for line in text.splitlines()) <= 80
    for label in [*report["members"], *report["patterns"], "peer-b 82.0", "device only", "cloud only"]:
        assert label in text  # names are never wrapped or cut
    assert "25/50/25" in text and "right→wrong" in text and "tasks changed" in text
    assert "oracle ceiling" in text  # the legend explains the short headers
    flat = " ".join(text.split())
    for p in report["patterns"].values():  # a folded verdict still says all of it, over several lines
        assert all(word in flat for word in p["verdict"].split())


def test_wide_tables_show_every_column_past_the_terminal_edge() -> None:
    from rich.console import Console

    from demos.evaluation import print_report

    narrow = render(print_report, synthetic_report())
    out = Console(width=80, record=True, color_system=None)
    print_report(synthetic_report(), wide=True, out=out)
    wide = out.export_text()
    for header in ("McNemar p", "self-ens %", "any-right %", "calls", "bytes", "p95 ms"):
        assert f" {header} ┃" in wide and f" {header} ┃" not in narrow  # a column header, not the legend
    assert "…" not in wide and max(len(line) for line in wide.splitlines()) > 80
    assert out.width == 80  # the console is left as it was


def test_charts_carry_references_and_cost(tmp_path: Path) -> None:
    from demos.cascade_lm import _chart, answered_cell
    from demos.scenarios import draw_chart, draw_relay_chart
    from demos.stats import wilson

    report = synthetic_report()
    draw_chart(report, tmp_path / "eval.png", "eval")
    one = {**report, "patterns": {k: report["patterns"][k] for k in ("ensemble-vote", "ensemble-cross")}}
    draw_chart(one, tmp_path / "ensemble.png", "ensemble")  # one best member and ceiling: lines across
    draw_relay_chart(report, tmp_path / "relay.png", "relay")
    for k, n in ((4, 4), (0, 4), (12, 12)):  # an interval always holds k/n, so error bars are never negative
        lo, hi = wilson(k, n)
        assert lo <= k / n <= hi
    cascade = {
        "threshold": 0.5,
        "questions": ["q"] * 4,
        "results": {
            "smol alone": {"accuracy": 1.0, "ci95": list(wilson(4, 4)), "correct": 4, "n": 4, "stages": ["smol"]}
            | {"answered_by": {"smol": 1.0}},
            "cascade": {"accuracy": 0.75, "ci95": list(wilson(3, 4)), "correct": 3, "n": 4}
            | {"stages": ["smol", "gemma"], "answered_by": {"smol": 0.75, "gemma": 0.25}},
        },
    }
    _chart(cascade, tmp_path / "cascade.png")
    for name in ("eval", "ensemble", "relay", "cascade"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert answered_cell(cascade["results"]["smol alone"]) == "smol 100%"
    assert answered_cell(cascade["results"]["cascade"]) == "smol 75% / gemma 25%"


def test_cascade_rows_say_which_model_answered() -> None:
    from types import SimpleNamespace

    from demos.cascade_lm import answered_by

    alone = [SimpleNamespace(answer="Paris", answered_by=None), SimpleNamespace(answer=None, answered_by=None)]
    assert answered_by(["smol"], alone) == {"smol": 0.5}  # a model alone names no stage, yet it answered
    both = [SimpleNamespace(answer="x", answered_by=a) for a in ("smol", "smol", "gemma", "smol")]
    assert answered_by(["smol", "gemma"], both) == {"smol": 0.75, "gemma": 0.25}


RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def shipped_tables(wide: bool) -> list[tuple[str, list[str], list[str]]]:
    """(rendered text, row labels, wide-only headers) of the bench, testbed and speculative tables, drawn
    from the reports shipped in docs/results into an 80-column console."""
    from typing import Any

    from rich.console import Console

    from demos.bench_eval import print_bench_report
    from demos.speculative import print_speculative_report
    from demos.testbed_eval import print_testbed_report

    def text(fn: Any, report: dict[str, Any]) -> str:
        out = Console(width=80, record=True, color_system=None)
        fn(report, wide=wide, out=out)
        assert out.width == 80  # a wide table leaves the console as it was
        return out.export_text()

    bench = json.loads((RESULTS / "bench.json").read_text())
    labels = [
        n for b in bench["benchmarks"].values() for k in ("members", "ceilings", "baselines", "patterns") for n in b[k]
    ]
    tables = [
        (text(print_bench_report, bench), labels, ["vs", "p (McNemar)", "calls/item", "1.5B calls/item", "s/item"])
    ]
    testbeds = sorted(RESULTS.glob("testbed-*.json"))
    assert testbeds
    for path in testbeds:
        r = json.loads(path.read_text())
        links = [t for t, s in r["scenario"]["tiers"].items() if s.get("parent")]
        heads = ["in deadline %", "p50 ms", "p99 ms", "degraded %", "outage: in deadline %"]
        tables.append((text(print_testbed_report, r), list(r["policies"]), heads + [f"B/task {ln}" for ln in links]))
    spec = json.loads((RESULTS / "speculative.json").read_text())
    spec_text = text(print_speculative_report, spec)
    cells = {tuple(c.strip() for c in line.split("│")[1:3]) for line in spec_text.splitlines()}
    for r in spec["runs"].values():
        assert (r["flavour"], r["profile"]) in cells  # each flavour in full beside its link in full
    labels = sorted({v for r in spec["runs"].values() for v in (r["flavour"], r["profile"])})
    tables.append((spec_text, labels, ["B/rnd", "verif. saved"]))
    return tables


def has_header(text: str, header: str) -> bool:
    """Whether ``header`` is a column's header in full (not a word of a legend)."""
    import re

    return re.search(rf"┃ *{re.escape(header)} *┃", text) is not None


def test_bench_testbed_and_speculative_tables_fit_eighty_columns() -> None:
    for text, labels, wide_headers in shipped_tables(wide=False):
        assert "…" not in text  # no cell cut
        assert max(len(line) for line in text.splitlines()) <= 80
        for label in labels:
            assert label in text  # names never wrap or get cut
        assert "--wide adds" in text  # the legend explains the short headers and says what is left out
        for header in wide_headers:
            assert not has_header(text, header)  # kept for --wide


def test_bench_testbed_and_speculative_wide_tables_show_every_column() -> None:
    for text, labels, wide_headers in shipped_tables(wide=True):
        assert "…" not in text
        for label in labels:
            assert label in text
        for header in wide_headers:
            assert has_header(text, header)
