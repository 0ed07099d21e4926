"""The arithmetic scenarios shared by ``aiflow demo`` and ``aiflow eval``: who runs where, which
patterns exist, and how a run over a held-out task set is scored."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiflow_agents.models.tasks import SEEDS, Task, check_answer, generate_tasks
from protocols import Envelope
from topologies import Pattern, RunResult, TopologyManager, cascade, debate, ensemble, mixture_of_agents

from .charts import ci_bars, pyplot
from .harness import NodeSpec, console, run_all
from .stats import mcnemar_p, percentile, wilson

#: The deployment: the familial family's three exits on three tiers, two independent peers in the cloud.
NODES = [
    NodeSpec("device", "device", ["familial-device:device"]),
    NodeSpec("edge", "edge", ["familial-edge:edge"]),
    NodeSpec("cloud", "cloud", ["familial-cloud:cloud"]),
    NodeSpec("cloud-peers", "cloud", ["familial-peer:peer-a?model=peer-a", "familial-peer:peer-b?model=peer-b"]),
]
MEMBERS = ["device", "edge", "cloud", "peer-a", "peer-b"]
TIER = {"device": "device", "edge": "edge", "cloud": "cloud", "peer-a": "cloud", "peer-b": "cloud"}
TRIO = ["cloud", "peer-a", "peer-b"]
#: A gain over the best member counts as emergent only below this McNemar p-value (paired items).
EMERGENT_ALPHA = 0.05


def relay_thresholds() -> list[float]:
    """Per-exit cascade thresholds tuned on the tuning seed (never on evaluation seeds)."""
    from aiflow_agents.models.familial_agents import shipped_thresholds

    tuned = shipped_thresholds()
    return [float(tuned.get("device", 0.9)), float(tuned.get("edge", 0.9))]


def patterns() -> dict[str, Pattern]:
    return {
        "relay": cascade(["device", "edge", "cloud"], accept=relay_thresholds(), name="relay"),
        "ensemble-vote": ensemble(TRIO, "vote", name="ensemble-vote"),
        "ensemble-cross": ensemble(TRIO, "cross_score", name="ensemble-cross"),
        "ensemble-latent": ensemble(TRIO, "latent", max_steps=8, name="ensemble-latent"),
        "debate": debate(TRIO, rounds=2, aggregate="cross_score", name="debate"),
        "moa": mixture_of_agents([["device", "edge", "peer-a", "peer-b"]], aggregator="cloud", name="moa"),
    }


def members_of(p: Pattern) -> list[str]:
    return [a for a in p.agent_ids() if a in MEMBERS]


@dataclass
class Scored:
    """One pattern (or single member) over the task set."""

    name: str
    correct: list[bool]
    results: list[RunResult] = field(repr=False)
    tasks: list[Task] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    def summary(self) -> dict[str, Any]:
        n, k = len(self.correct), sum(self.correct)
        lo, hi = wilson(k, n)
        by_band: dict[str, list[bool]] = defaultdict(list)
        for t, c in zip(self.tasks, self.correct, strict=True):
            by_band[f"{t.difficulty}:{t.band}"].append(c)
        lat = [r.elapsed * 1e3 for r in self.results]
        calls = [r.outcome.cost.model_calls for r in self.results]
        layers = [r.outcome.cost.layers for r in self.results]
        answered = Counter(r.answered_by for r in self.results if r.answered_by)
        per_round: list[float] = []
        rounds = [r.outcome.details.get("rounds") for r in self.results]
        if rounds and all(rounds):
            for i in range(max(len(x) for x in rounds)):  # type: ignore[arg-type]
                hits = [
                    bool(x[i]["majority"]) and check_answer(t, x[i]["majority"]) if i < len(x) else False
                    for t, x in zip(self.tasks, rounds, strict=True)
                ]  # type: ignore[arg-type]
                per_round.append(sum(hits) / max(1, len(hits)))
        out = {
            "name": self.name,
            "n": n,
            "correct": k,
            "accuracy": k / max(1, n),
            "ci95": [lo, hi],
            "by_band": {b: sum(v) / len(v) for b, v in sorted(by_band.items())},
            "model_calls_mean": statistics.fmean(calls) if calls else 0.0,
            "layers_mean": statistics.fmean(layers) if layers else 0.0,
            "bytes_mean": statistics.fmean(r.trace.bytes_total for r in self.results) if self.results else 0.0,
            "tokens_mean": statistics.fmean(r.outcome.cost.tokens for r in self.results) if self.results else 0.0,
            "latency_ms_mean": statistics.fmean(lat) if lat else 0.0,
            "latency_ms_p50": percentile(lat, 0.5),
            "latency_ms_p95": percentile(lat, 0.95),
            "answered_by": {k2: v / max(1, n) for k2, v in answered.items()},
            "errors": sum(1 for r in self.results if r.error),
            "per_round": per_round,
        }
        if rounds and all(rounds):
            out["changes"] = answer_changes(self.tasks, rounds)  # type: ignore[arg-type]
        return out


def answer_changes(tasks: Sequence[Task], rounds: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per pair of consecutive debate rounds: how many agents changed their answer, and whether that
    fixed or broke it. A debate whose agents never change their answers is cross-scoring with extra
    calls, whatever its accuracy says."""
    out: list[dict[str, Any]] = []
    for i in range(1, max((len(x) for x in rounds), default=0)):
        compared = changed = to_wrong = to_right = tasks_changed = 0
        for t, x in zip(tasks, rounds, strict=True):
            if i >= len(x):
                continue
            before, after = x[i - 1]["answers"], x[i]["answers"]
            moved = 0
            for agent, a in after.items():
                b = before.get(agent)
                if a is None or b is None:
                    continue  # an agent that failed in either round has nothing to compare
                compared += 1
                if a == b:
                    continue
                moved += 1
                was, now = check_answer(t, b), check_answer(t, a)
                to_wrong += int(was and not now)
                to_right += int(now and not was)
            changed += moved
            tasks_changed += int(moved > 0)
        out.append(
            {
                "rounds": f"{i}->{i + 1}",
                "agent_answers_compared": compared,
                "changed": changed,
                "right_to_wrong": to_wrong,
                "wrong_to_right": to_right,
                "tasks_with_a_change": tasks_changed,
            }
        )
    return out


def score(name: str, tasks: Sequence[Task], results: Sequence[RunResult]) -> Scored:
    return Scored(
        name,
        [bool(r.answer) and check_answer(t, r.answer or "") for t, r in zip(tasks, results, strict=True)],
        list(results),
        list(tasks),
    )


async def evaluate(
    mgr: TopologyManager,
    names: Sequence[str],
    tasks: Sequence[Task],
    *,
    concurrency: int = 8,
    quiet: bool = False,
    self_ensemble: bool = True,
) -> dict[str, Any]:
    """Run the patterns and every member alone on the same tasks; compare honestly."""
    pats = patterns()
    unknown = [n for n in names if n not in pats]
    if unknown:
        raise ValueError(f"unknown pattern(s) {unknown}; choose from {sorted(pats)}")
    needed = sorted({m for n in names for m in members_of(pats[n])}, key=MEMBERS.index)
    jobs: list[tuple[str, Pattern, Any]] = []
    for m in needed:
        jobs += [(m, ensemble([m], name=m), t.prompt) for t in tasks]
    for n in names:
        jobs += [(n, pats[n], t.prompt) for t in tasks]
    raw = await run_all(mgr, jobs, concurrency=concurrency, description="tasks x (members + patterns)", quiet=quiet)
    singles = {m: score(m, tasks, raw[m]) for m in needed}
    report: dict[str, Any] = {"members": {m: s.summary() for m, s in singles.items()}, "patterns": {}}
    for n in names:
        sc = score(n, tasks, raw[n])
        mine = members_of(pats[n])
        best = max(mine, key=lambda m: singles[m].accuracy)
        any_right = [any(singles[m].correct[i] for m in mine) for i in range(len(tasks))]
        b = sum(1 for x, y in zip(sc.correct, singles[best].correct, strict=True) if x and not y)
        c = sum(1 for x, y in zip(sc.correct, singles[best].correct, strict=True) if y and not x)
        # a pattern that always answers like one member (an aggregator that keeps its own answer) is that member
        same = {
            m: sum(1 for r, q in zip(sc.results, singles[m].results, strict=True) if r.answer == q.answer)
            / max(1, len(tasks))
            for m in mine
        }
        p_value = mcnemar_p(b, c)
        entry = sc.summary()
        entry.update(
            {
                "members": mine,
                "best_member": best,
                "best_member_accuracy": singles[best].accuracy,
                "gain_points": 100 * (sc.accuracy - singles[best].accuracy),
                "paired_vs_best": {"pattern_only_right": b, "best_only_right": c, "mcnemar_p": p_value},
                "same_answer_as": same,
                "any_member_right_ceiling": sum(any_right) / max(1, len(tasks)),
            }
        )
        se_accuracy = None
        if self_ensemble:
            k = max(1, round(entry["model_calls_mean"]))
            se = await self_ensemble_baseline(mgr, best, tasks, k, concurrency=concurrency, quiet=quiet)
            entry["self_ensemble"] = se
            se_accuracy = se["accuracy"]
        entry["emergent"], entry["verdict"] = emergence(sc.accuracy, singles[best].accuracy, p_value, se_accuracy)
        report["patterns"][n] = entry
    return report


def emergence(accuracy: float, best: float, p_value: float, self_ensemble: float | None) -> tuple[bool, str]:
    """Whether a pattern's gain is emergent, and why (not): it must beat its best member, by more than
    chance on the paired items (McNemar p < ``EMERGENT_ALPHA``), and the best member's self-ensemble
    at the same number of calls (None: that baseline was not run)."""
    p = f"p={p_value:.2g}"
    if accuracy <= best:
        return False, f"no gain ({100 * (accuracy - best):+.1f} pts)"
    if not p_value < EMERGENT_ALPHA:
        return False, f"not significant ({p})"
    if self_ensemble is not None and accuracy <= self_ensemble:
        return False, f"not above the self-ensemble ({100 * self_ensemble:.1f}%)"
    return True, f"emergent ({p})" + ("" if self_ensemble is not None else "; no self-ensemble run")


async def self_ensemble_baseline(
    mgr: TopologyManager, member: str, tasks: Sequence[Task], k: int, *, concurrency: int, quiet: bool
) -> dict[str, Any]:
    """The best member asked ``k`` times (sampled at temperature 0.7 where it samples) and voted."""
    jobs = []
    for t in tasks:
        for i in range(k):
            env = Envelope.request(t.prompt, meta={"temperature": 0.7, "seed": i})
            jobs.append((f"{member}#{i}", ensemble([member], name=f"{member}-self"), env))
    raw = await run_all(mgr, jobs, concurrency=concurrency, description=f"self-ensemble {member} x{k}", quiet=quiet)
    correct = []
    varied = 0
    for j, t in enumerate(tasks):
        answers = [raw[f"{member}#{i}"][j].answer for i in range(k)]
        varied += len(set(answers)) > 1
        top = Counter(a for a in answers if a).most_common(1)
        correct.append(bool(top) and check_answer(t, top[0][0]))
    n, kk = len(correct), sum(correct)
    return {
        "member": member,
        "calls": k,
        "accuracy": kk / max(1, n),
        "ci95": list(wilson(kk, n)),
        "tasks_with_varied_answers": varied,
        "note": "" if varied else "the member decodes deterministically: its self-ensemble equals itself",
    }


#: Draws a report's PNG: (report, path, title).
Chart = Callable[[dict[str, Any], Path, str], None]
MEMBER_COLOUR, PATTERN_COLOUR, BEST_COLOUR, CEILING_COLOUR = "#8ecae6", "#fb8500", "#023047", "#2a9d8f"


def draw_chart(report: dict[str, Any], path: Path, title: str) -> None:
    """Accuracy with 95% CIs, members and patterns side by side, against the two lines a pattern must
    be read against: its best member alone and the any-member-right ceiling (an oracle picking the
    right member each time)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    members, pats = report.get("members", {}), report.get("patterns", {})
    rows = [*members.items(), *pats.items()]
    names = [r[0] for r in rows]
    colours = [MEMBER_COLOUR if n in members else PATTERN_COLOUR for n in names]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(names) + 3), 4.5))
    xs = range(len(names))
    stats = [r[1] for r in rows]
    ci_bars(ax, stats, colours, [f"{100 * s['accuracy']:.0f}%" for s in stats])
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    refs = {(p["best_member"], p["best_member_accuracy"], p["any_member_right_ceiling"]) for p in pats.values()}
    handles = [Patch(color=MEMBER_COLOUR, label="member alone"), Patch(color=PATTERN_COLOUR, label="pattern")]
    if len(refs) == 1:  # one reference for every pattern: lines across the chart
        [(best, best_acc, ceiling)] = refs
        ax.axhline(100 * best_acc, color=BEST_COLOUR, ls="--", lw=1.2)
        ax.axhline(100 * ceiling, color=CEILING_COLOUR, lw=3.5, alpha=0.45, zorder=0)
        handles += [
            Line2D([], [], color=BEST_COLOUR, ls="--", label=f"best member ({best}) {100 * best_acc:.0f}%"),
            Line2D(
                [],
                [],
                color=CEILING_COLOUR,
                lw=3.5,
                alpha=0.45,
                label=f"any member right (oracle ceiling) {100 * ceiling:.0f}%",
            ),
        ]
    elif refs:  # patterns over different members: each pattern's own references, over its bar
        for i, (_, p) in enumerate(pats.items(), start=len(members)):
            ax.hlines(100 * p["best_member_accuracy"], i - 0.45, i + 0.45, color=BEST_COLOUR, ls="--", lw=1.2)
            ax.hlines(100 * p["any_member_right_ceiling"], i - 0.45, i + 0.45, color=CEILING_COLOUR, lw=3.5, alpha=0.45)
        handles += [
            Line2D([], [], color=BEST_COLOUR, ls="--", label="its best member alone"),
            Line2D([], [], color=CEILING_COLOUR, lw=3.5, alpha=0.45, label="any of its members right (ceiling)"),
        ]
    n = report.get("n_tasks") or max((r[1].get("n", 0) for r in rows), default=0)
    ax.set_ylim(0, 112)
    ax.set_ylabel("accuracy % (95% Wilson CI)")
    ax.set_title(f"{title}\nn = {n} tasks per bar", fontsize=11)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: The relay's chart: (label, member in the report or "relay", marker, colour); points that coincide
#: (the exits alone send the same bytes) are dodged sideways by a few points so each stays visible.
RELAY_POINTS = (
    ("device only", "device", "v", "#219ebc"),
    ("edge only", "edge", "s", "#8ecae6"),
    ("cloud only", "cloud", "^", "#023047"),
    ("relay", "relay", "*", PATTERN_COLOUR),
)


def draw_relay_chart(report: dict[str, Any], path: Path, title: str) -> None:
    """The relay's point is cost: its accuracy against the compute (layers) and the bytes each task
    took, next to each exit of the family alone."""
    from matplotlib.transforms import offset_copy

    plt = pyplot()
    everyone = {**report.get("members", {}), "relay": report["patterns"]["relay"]}
    points = [(label, everyone[k], marker, c) for label, k, marker, c in RELAY_POINTS if k in everyone]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, label in (
        (axes[0], "layers_mean", "compute: model layers run per task"),
        (axes[1], "bytes_mean", "bytes on the broker per task (hidden states included)"),
    ):
        xs = [s[key] for _, s, _, _ in points]
        for i, (name, s, marker, colour) in enumerate(points):
            a = 100 * s["accuracy"]
            yerr = [[max(0.0, a - 100 * s["ci95"][0])], [max(0.0, 100 * s["ci95"][1] - a)]]
            dodge = offset_copy(ax.transData, fig=fig, x=6 * (i - (len(points) - 1) / 2), units="points")
            ax.errorbar(
                s[key],
                a,
                yerr=yerr,
                fmt=marker,
                ms=14 if name == "relay" else 9,
                color=colour,
                ecolor=colour,
                alpha=0.9,
                capsize=3,
                transform=dodge,
                label=name,
            )
        if max(xs) > 20 * max(1e-9, min(xs)):
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, max(xs) * 1.15)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy % (95% Wilson CI)")
    axes[0].set_ylim(0, 105)
    handles, _ = axes[0].get_legend_handles_labels()
    labels = [
        f"{name}: {100 * s['accuracy']:.0f}%, {s['layers_mean']:.0f} layers, {s['bytes_mean'] / 1e3:.1f} kB, "
        f"p50 {s['latency_ms_p50']:.0f} ms"
        for name, s, _, _ in points
    ]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    relay = everyone["relay"]
    share = "/".join(f"{100 * relay['answered_by'].get(m, 0.0):.0f}" for m in ("device", "edge", "cloud"))
    n = report.get("n_tasks") or relay.get("n", 0)
    fig.suptitle(f"{title}: n = {n} tasks; the relay answered at device/edge/cloud {share} %", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    report: dict[str, Any],
    out: Path | None,
    stem: str,
    title: str,
    chart: Chart = draw_chart,
) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    chart(report, out / f"{stem}.png", title)
    console.print(f"report: {out / (stem + '.json')}, chart: {out / (stem + '.png')}")


def held_out(n: int, seed: int) -> list[Task]:
    if seed in (SEEDS["train"], SEEDS["tune"]):
        raise ValueError(f"seed {seed} is reserved for training/tuning; evaluate on another seed")
    return generate_tasks(n, seed, split="heldout")
