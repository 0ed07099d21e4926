"""Every demo end to end at a small size (separate node processes, embedded broker), and ``aiflow eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aiflow_agents.models.tasks import generate_tasks

pytestmark = pytest.mark.timeout(950)

SUMMARY_FIELDS = {
    "accuracy",
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


def aiflow(*args: str, timeout: float = 540) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiflow_agents", *args], capture_output=True, text=True, timeout=timeout
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
    out = aiflow("demo", demo, "--tasks", "6", "--seed", "11", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for tier in ("device", "edge", "cloud"):
        assert tier in out.stdout  # the tiers are named in the output
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
        assert "relay_vs_cloud" in report
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
