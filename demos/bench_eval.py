"""``aiflow eval --bench NAME``: real language models on public multiple-choice benchmarks.

Each model runs as an agent in its own node process (the small ones on the device and edge tiers,
the 1.5B in the cloud) and answers with the ``choose`` op: every option of an item scored in one
batched pass over a shared prefix. Patterns compose them over the bus — vote, cross-scoring,
distribution averaging, a debate in which agents read the others' answers and may revise, a
mixture of agents with the 1.5B as aggregator, and cascades small → 1.5B — and every pattern is
compared, on the same items, with each member alone, the "any member right" ceiling and the best
member's own ensembles at equal calls (self-consistency at a temperature, option-order
permutations). A gain is called significant only with McNemar p < 0.05.

Thresholds and weights are tuned on the first items of each split (the tuning slice), which are
never part of the reported numbers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from aiflow_agents.models.benchmarks import MCItem, get_benchmark, load_benchmark, tuning_slice
from protocols import Envelope, ops
from topologies import Pattern, RunResult, TopologyManager, cascade, debate, ensemble, mixture_of_agents

from .harness import NodeSpec, console, deployment, run_all
from .stats import finite, mcnemar_p, wilson
from .tables import Col, emit, table

#: agent id -> (hf agent config: a catalog model or a path, tier). One node process per model.
POOL: dict[str, tuple[str, str]] = {
    "smollm2": ("model=smollm2-135m", "device"),
    "gemma": ("model=gemma3-270m", "device"),
    "qwen0_5b": ("model=qwen2.5-coder-0.5b", "edge"),
    "qwen1_5b": ("model=qwen2.5-coder-1.5b", "cloud"),
}
LARGE = "qwen1_5b"
DEFAULT_BENCHES = ("arc-easy", "arc-challenge", "sciq")
TEMPERATURE = 0.7  # self-consistency samples
ALPHA = 0.05


def nodes_for(pool: dict[str, tuple[str, str]], models: Sequence[str], threads: int = 1) -> list[NodeSpec]:
    return [NodeSpec(m, pool[m][1], [f"hf:{m}?{pool[m][0]}&threads={threads}&score_cache=20000"]) for m in models]


def task_of(item: MCItem, *, with_context: bool = False, **meta: Any) -> Envelope:
    """The item as a ``choose`` request. Closed book unless the passage is part of the task (BoolQ,
    Social IQa): SciQ's support paragraph would hand the answer over."""
    if with_context and item.context:
        meta[ops.CONTEXT] = item.context
    return Envelope.request(
        item.question, meta={ops.OP: ops.Op.CHOOSE, ops.CANDIDATES: list(item.options), ops.MC: True, **meta}
    )


def fetching_loader(name: str) -> list[MCItem]:
    """The benchmark's items, downloading the data package on first use."""
    return load_benchmark(name, fetch=True)


def tuning_size(name: str) -> int:
    try:
        return get_benchmark(name).tuning
    except Exception:  # a caller's own loader
        return 100


def needs_context(name: str) -> bool:
    try:
        return get_benchmark(name).context_required
    except Exception:  # a caller's own loader: its items say
        return False


# -- what one run says ------------------------------------------------------------------------------
def choice_of(item: MCItem, r: RunResult) -> int | None:
    if not r.ok or r.answer is None:
        return None
    try:
        return list(item.options).index(r.answer)
    except ValueError:
        return None


def is_right(item: MCItem, r: RunResult) -> bool:
    """By text, not index: a few items list the right option twice (CommonsenseQA, MMLU)."""
    return r.ok and r.answer == item.options[item.answer]


def probs_of(r: RunResult) -> list[float] | None:
    reply = r.outcome.reply
    if reply is None:
        kids = [c for c in r.outcome.children if c.reply is not None]
        reply = kids[0].reply if len(kids) == 1 else None
    p = reply.meta.get(ops.PROBS) if reply is not None else None
    return [float(x) for x in p] if isinstance(p, list) else None


def compute_seconds(r: RunResult) -> float:
    """Seconds the agents spent on this run (sum over every reply in the outcome tree)."""
    total = 0.0

    def walk(o: Any) -> None:
        nonlocal total
        if o.reply is not None:
            c = o.reply.meta.get(ops.COST) or {}
            total += float(c.get("seconds", 0.0) or 0.0)
        for ch in o.children:
            walk(ch)

    walk(r.outcome)
    return total


def agent_calls(r: RunResult, agent: str) -> int:
    n = 0

    def walk(o: Any) -> None:
        nonlocal n
        if o.kind == "agent" and o.source == agent and (o.reply is not None or o.error):
            n += 1
        for ch in o.children:
            walk(ch)

    walk(r.outcome)
    return n


@dataclass
class Scored:
    """One member, pattern or baseline over the reported items."""

    name: str
    correct: list[bool]
    calls: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    large_calls: list[float] = field(default_factory=list)
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    def summary(self) -> dict[str, Any]:
        n, k = len(self.correct), sum(self.correct)
        out: dict[str, Any] = {
            "n": n,
            "correct": k,
            "accuracy": k / max(1, n),
            "ci95": list(wilson(k, n)),
            "calls_per_item": statistics.fmean(self.calls) if self.calls else 0.0,
            "seconds_per_item": statistics.fmean(self.seconds) if self.seconds else 0.0,
            "errors": self.errors,
        }
        if self.large_calls:
            out["large_calls_per_item"] = statistics.fmean(self.large_calls)
        out.update(self.extra)
        return out


def paired(a: Scored, b: Scored) -> dict[str, Any]:
    """McNemar's exact test of ``a`` against ``b`` on the same items."""
    only_a = sum(1 for x, y in zip(a.correct, b.correct, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a.correct, b.correct, strict=True) if y and not x)
    return {"vs": b.name, "only_this_right": only_a, "only_other_right": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)}


def score_runs(name: str, items: Sequence[MCItem], runs: Sequence[RunResult], large: str | None = None) -> Scored:
    correct = [is_right(it, r) for it, r in zip(items, runs, strict=True)]
    return Scored(
        name,
        correct,
        calls=[float(r.outcome.cost.model_calls) for r in runs],
        seconds=[compute_seconds(r) for r in runs],
        large_calls=[float(agent_calls(r, large)) for r in runs] if large else [],
        errors=sum(1 for r in runs if not r.ok),
    )


# -- tuning on the tuning slice (offline, from the members' own distributions) ----------------------
def mix(probs: Sequence[Sequence[float] | None], weights: Sequence[float]) -> list[float] | None:
    usable = [(p, w) for p, w in zip(probs, weights, strict=True) if p is not None]
    if not usable:
        return None
    n = len(usable[0][0])
    total = sum(w for _, w in usable) or 1.0
    return [sum(w * p[i] for p, w in usable) / total for i in range(n)]


def tune_weights(
    items: Sequence[MCItem], member_probs: dict[str, list[list[float] | None]], members: Sequence[str]
) -> dict[str, float]:
    """Weights (steps of 0.1) of a weighted sum of the members' option distributions that answer the
    tuning slice best; ties go to the most even weights."""
    best: tuple[float, float, tuple[float, ...]] = (-1.0, 0.0, tuple(1.0 for _ in members))
    steps = [i / 10 for i in range(11)]
    for w in itertools.product(steps, repeat=len(members)):
        if abs(sum(w) - 1.0) > 1e-9:
            continue
        hits = 0
        for j, it in enumerate(items):
            p = mix([member_probs[m][j] for m in members], w)
            hits += p is not None and max(range(len(p)), key=p.__getitem__) == it.answer
        evenness = -max(w)
        if (hits, evenness) > best[:2]:
            best = (hits, evenness, w)
    return {m: float(x) for m, x in zip(members, best[2], strict=True)}


def tune_threshold(
    correct_small: Sequence[bool], conf: Sequence[float], correct_large: Sequence[bool], keep: float = 0.95
) -> dict[str, Any]:
    """The lowest confidence threshold below which items go to the large model such that the cascade
    keeps ``keep`` of the large model's accuracy on the tuning slice (fewest escalations)."""
    n = len(conf)
    large_acc = sum(correct_large) / max(1, n)
    for t in sorted({0.0, *conf, 1.01}):
        acc = sum((s if c >= t else g) for s, c, g in zip(correct_small, conf, correct_large, strict=True)) / max(1, n)
        share = sum(1 for c in conf if c < t) / max(1, n)
        if acc >= keep * large_acc:
            return {
                "threshold": float(t),
                "tune_accuracy": acc,
                "tune_escalated": share,
                "tune_large_accuracy": large_acc,
            }
    return {"threshold": 1.01, "tune_accuracy": large_acc, "tune_escalated": 1.0, "tune_large_accuracy": large_acc}


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    benches: Sequence[str] = DEFAULT_BENCHES
    models: Sequence[str] = tuple(POOL)
    items: int | None = None  # cap on reported items per benchmark (None: the whole split minus tuning)
    tune: int | None = None  # tuning items per benchmark (None: the benchmark's own default, 100 for most)
    concurrency: int = 12
    timeout: float = 600.0
    quiet: bool = False
    debate_rounds: int = 2
    pool: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(POOL))
    large: str | None = LARGE  # the big model of the "with the 1.5B" comparisons (None: small pool only)
    loader: Callable[[str], list[MCItem]] = fetching_loader
    #: two members sharing a tokenizer (the Qwen pair): their distributions are also mixed token by token
    pair: tuple[str, str] | None = ("qwen0_5b", LARGE)
    #: where each finished benchmark's report is written at once (a long run keeps what it finished)
    checkpoint: Path | None = None


async def run_bench(cfg: BenchConfig, broker: str | None = None) -> dict[str, Any]:
    unknown = [m for m in cfg.models if m not in cfg.pool]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(cfg.pool)}")
    small = [m for m in cfg.models if m != cfg.large]
    large = cfg.large if cfg.large in cfg.models else None
    if len(small) < 2:
        raise ValueError("need at least two small models for the ensembles")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "models": {m: cfg.pool[m][0] for m in cfg.models},
        "small_pool": small,
        "large": large,
        "tune_items": cfg.tune if cfg.tune is not None else "per benchmark",
        "benchmarks": {},
    }
    t_all = time.perf_counter()
    async with deployment(nodes_for(cfg.pool, cfg.models), broker, quiet=cfg.quiet, ready_timeout=900.0) as (mgr, url):
        report["broker"] = str(url)
        for bench in cfg.benches:
            t0 = time.perf_counter()
            report["benchmarks"][bench] = await _one_bench(mgr, bench, cfg, small, large)
            report["benchmarks"][bench]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            if cfg.checkpoint is not None:
                cfg.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                cfg.checkpoint.write_text(json.dumps(finite(report), indent=2, default=str, allow_nan=False))
    report["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    return report


async def _run(
    mgr: TopologyManager, jobs: list[tuple[str, Pattern, Any]], cfg: BenchConfig, what: str
) -> dict[str, list[RunResult]]:
    return await run_all(mgr, jobs, concurrency=cfg.concurrency, timeout=cfg.timeout, description=what, quiet=cfg.quiet)


async def _one_bench(
    mgr: TopologyManager, bench: str, cfg: BenchConfig, small: list[str], large: str | None
) -> dict[str, Any]:
    items = cfg.loader(bench)
    ctx = needs_context(bench)
    tune, rest = tuning_slice(items, tuning_size(bench) if cfg.tune is None else cfg.tune)
    evals = rest[: cfg.items] if cfg.items else rest
    members = [*small, *([large] if large else [])]
    if not cfg.quiet:
        console.print(f"[bold]{bench}[/]: {len(tune)} tuning items, {len(evals)} reported items, members {members}")

    # 1. every member alone, on the tuning slice and the reported items
    both = [*tune, *evals]
    # item-major order: the requests in flight span every model, so all of them (and all cores) stay busy
    jobs = [(m, ensemble([m], name=m), task_of(it, with_context=ctx)) for it in both for m in members]
    raw = await _run(mgr, jobs, cfg, f"{bench}: members alone")
    nt = len(tune)
    member_probs = {m: [probs_of(r) for r in raw[m]] for m in members}
    singles = {m: score_runs(m, evals, raw[m][nt:], large) for m in members}
    tune_correct = {m: [is_right(it, r) for it, r in zip(tune, raw[m][:nt], strict=True)] for m in members}
    # the reference of "beats its best member" is the best on the reported items (the hardest bar); whose
    # self-ensembles to run and which member fronts a cascade are configuration, chosen on the tuning slice
    best_small = max(small, key=lambda m: (singles[m].accuracy, -small.index(m)))

    # 2. tuning (first items only): ensemble weights, cascade thresholds, the member of the baselines
    tuning: dict[str, Any] = {
        "weights": tune_weights(tune, {m: member_probs[m][:nt] for m in small}, small),
        "member_accuracy": {m: sum(v) / max(1, nt) for m, v in tune_correct.items()},
    }
    tuned_best = max(small, key=lambda m: (tuning["member_accuracy"][m], -small.index(m)))
    tuning["best_small"] = tuned_best
    if large:
        avg_tune = [mix([member_probs[m][j] for m in small], [1.0] * len(small)) for j in range(nt)]
        conf = [max(p) if p else 0.0 for p in avg_tune]
        ens_right = [p is not None and p.index(max(p)) == it.answer for p, it in zip(avg_tune, tune, strict=True)]
        tuning["cascade_ensemble"] = tune_threshold(ens_right, conf, tune_correct[large])
        q = "qwen0_5b" if "qwen0_5b" in small else tuned_best
        qconf = [max(p) if p else 0.0 for p in member_probs[q][:nt]]
        tuning["cascade_single"] = {"member": q, **tune_threshold(tune_correct[q], qconf, tune_correct[large])}

    # 3. patterns on the reported items
    pats: dict[str, tuple[Pattern, str]] = {
        "vote": (ensemble(small, "vote", name="vote"), "small"),
        "cross-score": (ensemble(small, "cross_score", name="cross-score"), "small"),
        "average": (ensemble(small, "average", name="average"), "small"),
        "weighted": (ensemble(small, "average", weights=tuning["weights"], name="weighted"), "small"),
        "debate": (debate(small, rounds=cfg.debate_rounds, aggregate="average", name="debate"), "small"),
    }
    if large:
        thr = tuning["cascade_ensemble"]["threshold"]
        pats["moa"] = (mixture_of_agents([small], aggregator=large, name="moa"), "large")
        pats["cascade"] = (
            cascade([ensemble(small, "average", name="small-average"), large], accept=[min(thr, 1.0)], name="cascade"),
            "large",
        )
        one = tuning["cascade_single"]
        pats["cascade-single"] = (
            cascade([one["member"], large], accept=[min(one["threshold"], 1.0)], name="cascade-single"),
            "large",
        )
        pats["average-all"] = (ensemble(members, "average", name="average-all"), "large")
        if cfg.pair and all(m in members for m in cfg.pair) and large in cfg.pair:
            pats["pair-average"] = (ensemble(list(cfg.pair), "average", name="pair-average"), "large")
            pats["pair-tokens"] = (ensemble(list(cfg.pair), "token_mix", name="pair-tokens"), "large")
    # 4. with them, the best member's own ensembles at each small pattern's calls: k samples at a
    # temperature (majority) and k prompts listing the options in distinct orders (distributions
    # averaged); k covers the most calls a small pattern makes (a debate: rounds x members)
    k = len(small) * max(2, cfg.debate_rounds)
    solo = ensemble([tuned_best], name=f"{tuned_best}-self")
    orders = {it.id: permutations_for(it, k) for it in evals}
    jobs = []
    for it in evals:  # item-major, patterns and baselines together: every model has work queued
        jobs += [(n, p, task_of(it, with_context=ctx)) for n, (p, _) in pats.items()]
        for i in range(k):
            jobs.append((f"sc#{i}", solo, task_of(it, with_context=ctx, temperature=TEMPERATURE, seed=_seed(it, i))))
            if i < len(orders[it.id]):
                jobs.append((f"perm#{i}", solo, task_of(it, with_context=ctx, options_order=orders[it.id][i])))
    raw_all = await _run(mgr, jobs, cfg, f"{bench}: patterns and baselines of {tuned_best}")
    raw_p = {n: raw_all[n] for n in pats}
    raw_b = {n: v for n, v in raw_all.items() if n not in pats}
    sc_runs = [[raw_b[f"sc#{i}"][j] for i in range(k)] for j in range(len(evals))]
    perm_pos = {i: {it.id: n for n, it in enumerate(e for e in evals if i < len(orders[e.id]))} for i in range(k)}
    perm_runs = [[raw_b[f"perm#{i}"][perm_pos[i][it.id]] for i in range(k) if it.id in perm_pos[i]] for it in evals]

    # 5. statistics
    out: dict[str, Any] = {
        "items": len(evals),
        "tuning_items": len(tune),
        "tuning": tuning,
        "members": {m: s.summary() for m, s in singles.items()},
        "best_small": best_small,
        "baselines": {},
        "patterns": {},
    }

    def self_consistency(n: int) -> Scored:
        right = []
        for it, runs in zip(evals, sc_runs, strict=True):
            votes = Counter(choice_of(it, r) for r in runs[:n])
            votes.pop(None, None)
            right.append(bool(votes) and votes.most_common(1)[0][0] == it.answer)
        return Scored(f"self-consistency {tuned_best} x{n} (T={TEMPERATURE})", right, calls=[float(n)] * len(evals))

    def permutation(n: int) -> Scored:
        right = []
        for it, runs in zip(evals, perm_runs, strict=True):
            avg = mix([probs_of(r) for r in runs[:n]], [1.0] * len(runs[:n]))
            right.append(avg is not None and avg.index(max(avg)) == it.answer)
        calls = [float(min(n, len(r))) for r in perm_runs]
        return Scored(f"option-permutation {tuned_best} x{n}", right, calls=calls)

    ref_best = singles[tuned_best]
    for n in sorted({len(small), k}):
        sc, perm = self_consistency(n), permutation(n)
        varied = sum(
            1 for it, runs in zip(evals, sc_runs, strict=True) if len({choice_of(it, r) for r in runs[:n]}) > 1
        )
        out["baselines"][f"self_consistency_x{n}"] = {
            **sc.summary(),
            "items_with_varied_samples": varied,
            **paired(sc, ref_best),
        }
        out["baselines"][f"permutation_x{n}"] = {**perm.summary(), **paired(perm, ref_best)}
    any_small = Scored("any small member right", [any(singles[m].correct[j] for m in small) for j in range(len(evals))])
    out["ceilings"] = {"any_small_right": any_small.summary()}
    if large:
        any_all = Scored("any member right", [any(singles[m].correct[j] for m in members) for j in range(len(evals))])
        out["ceilings"]["any_member_right"] = any_all.summary()
    out["per_item"] = {
        "ids": [it.id for it in evals],
        "answer": [it.answer for it in evals],
        "members": {m: [choice_of(it, r) for it, r in zip(evals, raw[m][nt:], strict=True)] for m in members},
        "member_probs": {m: member_probs[m][nt:] for m in members},
        "patterns": {n: [choice_of(it, r) for it, r in zip(evals, raw_p[n], strict=True)] for n in pats},
        "self_consistency": {n: self_consistency(n).correct for n in range(1, k + 1)},
        "permutation": {n: permutation(n).correct for n in range(1, k + 1)},
    }
    for name, (_, pool) in pats.items():
        s = score_runs(name, evals, raw_p[name], large)
        entry = s.summary()
        entry["pool"] = pool
        ref = singles[best_small] if pool == "small" else singles[large]  # type: ignore[index]
        entry["vs_reference"] = paired(s, ref)
        entry["gain_points"] = 100 * (s.accuracy - ref.accuracy)
        if pool == "small":
            n = max(1, min(k, round(entry["calls_per_item"])))  # the baselines at this pattern's calls
            sc, perm = self_consistency(n), permutation(n)
            entry["vs_self_consistency"] = paired(s, sc)
            entry["vs_permutation"] = paired(s, perm)
            beats_base = all(
                s.accuracy > b.accuracy and entry[key]["mcnemar_p"] < ALPHA
                for b, key in ((sc, "vs_self_consistency"), (perm, "vs_permutation"))
            )
            sig = entry["vs_reference"]["mcnemar_p"] < ALPHA and s.accuracy > ref.accuracy
            entry["verdict"] = _verdict(sig, beats_base, entry["vs_reference"]["mcnemar_p"], n)
            if s.accuracy < ref.accuracy and entry["vs_reference"]["mcnemar_p"] < ALPHA:
                entry["verdict"] = f"worse than its best member (p={entry['vs_reference']['mcnemar_p']:.3g})"
        else:
            entry.update(_large_verdict(s, ref, name))
        if name == "debate":
            entry["changes"] = debate_changes(evals, raw_p[name])
        if name.startswith("cascade"):
            entry["escalated_share"] = statistics.fmean(s.large_calls) if s.large_calls else 0.0
        out["patterns"][name] = entry
    if "pair-tokens" in out["patterns"]:  # mixing per token vs mixing verdicts, for the same two models
        tok, avg = (score_runs(n, evals, raw_p[n], large) for n in ("pair-tokens", "pair-average"))
        out["patterns"]["pair-tokens"]["vs_pair_average"] = paired(tok, avg)
    return out


def _seed(item: MCItem, i: int) -> int:
    """A sample's seed, distinct per item and sample (the same seed on every item would correlate them)."""
    return int.from_bytes(hashlib.sha256(f"{item.id}/{i}".encode()).digest()[:4], "big")


def permutations_for(item: MCItem, k: int) -> list[list[int]]:
    """Up to ``k`` distinct orders of the item's options, the given order first, the rest drawn with a
    seed from the item's id (only n! exist: two options give two)."""
    n = len(item.options)
    rng = random.Random(_seed(item, -1))
    seen = [list(range(n))]
    budget = math.factorial(n)
    while len(seen) < min(k, budget):
        order = list(range(n))
        rng.shuffle(order)
        if order not in seen:
            seen.append(order)
    return seen


def _verdict(significant: bool, beats_baselines: bool, p: float, calls: int) -> str:
    if significant and beats_baselines:
        return f"beats its best member (p={p:.3g}) and, with p < 0.05, its self-ensembles at {calls} calls"
    if significant:
        return f"beats its best member (p={p:.3g}), not significantly its self-ensembles at {calls} calls"
    return f"no significant gain over its best member (p={p:.3g})"


def _large_verdict(s: Scored, large: Scored, name: str) -> dict[str, Any]:
    p = paired(s, large)["mcnemar_p"]
    lo, hi = wilson(sum(large.correct), len(large.correct))
    share = statistics.fmean(s.large_calls) if s.large_calls else 1.0
    within = lo <= s.accuracy <= hi
    kept = s.accuracy / large.accuracy if large.accuracy else float("nan")
    if s.accuracy > large.accuracy and p < ALPHA:
        v = f"beats the 1.5B (p={p:.3g})"
    elif s.accuracy < large.accuracy and p < ALPHA:
        v = f"worse than the 1.5B (p={p:.3g})"
    elif s.accuracy > hi:
        v = f"above the 1.5B's 95% CI, not significant (p={p:.3g}), {100 * share:.0f}% of its calls"
    elif within and share < 0.5:
        v = f"matches the 1.5B (inside its 95% CI) with {100 * share:.0f}% of its calls"
    elif within:
        v = f"matches the 1.5B but calls it on {100 * share:.0f}% of items"
    else:
        v = f"below the 1.5B's 95% CI ({100 * s.accuracy:.1f}% vs {100 * lo:.1f}-{100 * hi:.1f}%; p={p:.3g})"
    out = {"verdict": v, "kept_of_large": kept, "within_large_ci": within, "mcnemar_p_vs_large": p}
    if name.startswith("cascade"):
        out["goal_95pct_with_half_calls"] = bool(kept >= 0.95 and share <= 0.5)
        out["verdict"] += f"; keeps {100 * kept:.0f}% of its accuracy with {100 * share:.0f}% escalated"
    return out


def debate_changes(items: Sequence[MCItem], runs: Sequence[RunResult]) -> dict[str, Any]:
    """How often agents changed their answer between rounds, and in which direction."""
    changed = right_to_wrong = wrong_to_right = wrong_to_wrong = answers = 0
    per_agent: dict[str, Counter[str]] = {}
    for it, r in zip(items, runs, strict=True):
        rounds = (r.outcome.details or {}).get("rounds") or []
        for a, b in itertools.pairwise(rounds):
            for agent, before in (a.get("answers") or {}).items():
                after = (b.get("answers") or {}).get(agent)
                if before is None or after is None:
                    continue
                answers += 1
                c = per_agent.setdefault(agent, Counter())
                if before == after:
                    continue
                changed += 1
                c["changed"] += 1
                was = before == it.options[it.answer]
                now = after == it.options[it.answer]
                if was and not now:
                    right_to_wrong += 1
                    c["right_to_wrong"] += 1
                elif now and not was:
                    wrong_to_right += 1
                    c["wrong_to_right"] += 1
                else:
                    wrong_to_wrong += 1
    return {
        "answers_compared": answers,
        "changed": changed,
        "change_rate": changed / max(1, answers),
        "right_to_wrong": right_to_wrong,
        "wrong_to_right": wrong_to_right,
        "wrong_to_other_wrong": wrong_to_wrong,
        "per_agent": {a: dict(c) for a, c in per_agent.items()},
    }


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


# -- output -----------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


BENCH_LEGEND = (
    "p: McNemar p against the reference (the best member, or the 1.5B where the verdict names it); "
    "1.5B: calls of the 1.5B model per item; dim rows: ceilings (any model right) and baselines. "
    "--wide adds the reference, all calls and seconds per item"
)
#: the columns of a narrow table, as indices into the wide row
_NARROW = (0, 1, 2, 4, 6, 8)


def print_bench_report(report: dict[str, Any], wide: bool = False, out: Console | None = None) -> None:
    """One table per benchmark; 80 columns unless ``wide`` (then every column, at its natural width)."""
    con = out or console
    cols = [Col("who", "label"), Col("acc %"), Col("95% CI"), Col("vs", "label"), Col("p (McNemar)")]
    cols += [Col("calls/item"), Col("1.5B calls/item"), Col("s/item"), Col("verdict", "text")]
    if not wide:
        cols = [cols[i] for i in _NARROW]
        cols[3:5] = [Col("p"), Col("1.5B")]

    def head(who: str, s: dict[str, Any]) -> list[str]:  # whole CI points when narrow, as in eval's tables
        ci = _ci(s) if wide else f"{100 * s['ci95'][0]:.0f}-{100 * s['ci95'][1]:.0f}"
        return [who, pct(s["accuracy"]), ci]

    def p_of(x: float) -> str:
        return f"{x:.3g}" if wide else f"{x:.2g}"

    for bench, b in report["benchmarks"].items():
        rows: list[list[str]] = []
        for m, s in b["members"].items():
            rows.append([*head(m, s), "", "", f"{s['calls_per_item']:.1f}", "", f"{s['seconds_per_item']:.2f}", ""])
        for name, s in b["ceilings"].items():
            rows.append([*head(f"[dim]{name}[/]", s), "", "", "", "", "", "ceiling"])
        for name, s in b["baselines"].items():
            rows.append([*head(f"[dim]{name}[/]", s), s["vs"], p_of(s["mcnemar_p"]), f"{s['calls_per_item']:.1f}"])
            rows[-1] += ["", "", "baseline"]
        for name, s in b["patterns"].items():
            ref = s["vs_reference"]
            rows.append([*head(name, s), ref["vs"], p_of(ref["mcnemar_p"]), f"{s['calls_per_item']:.1f}"])
            rows[-1] += [f"{s.get('large_calls_per_item', 0.0):.2f}", f"{s['seconds_per_item']:.2f}", s["verdict"]]
        t = table(
            f"{bench}: {b['items']} items (tuning slice of {b['tuning_items']} excluded), {report['date']}",
            cols,
            legend=None if wide else BENCH_LEGEND,
        )
        for r in rows:
            t.add_row(*(r if wide else [r[i] for i in _NARROW]))
        emit(con, t, wide=wide)
        if "debate" in b["patterns"]:
            c = b["patterns"]["debate"]["changes"]
            con.print(
                f"debate: {c['changed']} of {c['answers_compared']} answers changed between rounds "
                f"({pct(c['change_rate'])}%): {c['wrong_to_right']} wrong→right, {c['right_to_wrong']} right→wrong, "
                f"{c['wrong_to_other_wrong']} wrong→another wrong"
            )


def _ci(s: dict[str, Any]) -> str:
    return f"{pct(s['ci95'][0])}-{pct(s['ci95'][1])}"


def draw_bench_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(report["benchmarks"].items())
    fig, axes = plt.subplots(len(benches), 1, figsize=(12, 3.6 * len(benches)), squeeze=False)
    for ax, (bench, b) in zip(axes[:, 0], benches, strict=True):
        rows = [(m, s, "#8ecae6") for m, s in b["members"].items()]
        rows += [(n, s, "#bbbbbb") for n, s in b["baselines"].items()]
        rows += [(n, s, "#fb8500") for n, s in b["patterns"].items()]
        names = [r[0] for r in rows]
        acc = [100 * r[1]["accuracy"] for r in rows]
        err = [
            [100 * (r[1]["accuracy"] - r[1]["ci95"][0]) for r in rows],
            [100 * (r[1]["ci95"][1] - r[1]["accuracy"]) for r in rows],
        ]
        ax.bar(names, acc, yerr=err, color=[r[2] for r in rows], capsize=3)
        ax.set_ylabel("accuracy % (95% CI)")
        ax.set_title(f"{bench} ({b['items']} items)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _md_row(name: str, s: dict[str, Any], vs: str = "", p: str = "", verdict: str = "") -> str:
    large = f"{s['large_calls_per_item']:.2f}" if "large_calls_per_item" in s else ""
    secs = f"{s['seconds_per_item']:.2f}" if s.get("seconds_per_item") else ""
    return (
        f"| {name} | {pct(s['accuracy'])} ({_ci(s)}) | {vs} | {p} | {s['calls_per_item']:.1f} | {large} "
        f"| {secs} | {verdict} |"
    )


def bench_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (one per benchmark), as the README shows them."""
    lines: list[str] = []
    for bench, b in report["benchmarks"].items():
        per_item = b.get("wall_seconds", 0.0) / max(1, b["items"] + b["tuning_items"])
        lines += [
            f"**{bench}** — {b['items']} items after a tuning slice of {b['tuning_items']}; "
            f"{b.get('wall_seconds', 0.0) / 60:.0f} min wall, {per_item:.1f} s per item in all",
            "",
            "| who | accuracy % (95% CI) | vs | McNemar p | calls / item | 1.5B calls / item | s / item | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]

        for m, s in b["members"].items():
            lines.append(_md_row(m, s))
        for name, s in b["ceilings"].items():
            lines.append(f"| {name.replace('_', ' ')} (ceiling) | {pct(s['accuracy'])} ({_ci(s)}) | | | | | | |")
        for name, s in b["baselines"].items():
            lines.append(_md_row(name.replace("_", " "), s, s["vs"], f"{s['mcnemar_p']:.2g}", "baseline"))
        for name, s in b["patterns"].items():
            ref = s["vs_reference"]
            lines.append(_md_row(name, s, ref["vs"], f"{ref['mcnemar_p']:.2g}", s["verdict"]))
        if "debate" in b["patterns"]:
            c = b["patterns"]["debate"]["changes"]
            lines += [
                "",
                f"Debate: {c['changed']} of {c['answers_compared']} answers changed between rounds "
                f"({pct(c['change_rate'])}%): {c['wrong_to_right']} wrong→right, {c['right_to_wrong']} right→wrong, "
                f"{c['wrong_to_other_wrong']} wrong→another wrong.",
            ]
        lines.append("")
    return "\n".join(lines)


def write_bench_report(report: dict[str, Any], out: Path | None, stem: str = "bench") -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(bench_markdown(report))
    (out / f"{stem}.json").write_text(json.dumps(finite(report), indent=2, default=str, allow_nan=False))
    draw_bench_chart(report, out / f"{stem}.png")
    print(f"report: {out / (stem + '.json')}, chart: {out / (stem + '.png')}", file=sys.stderr)


__all__ = [
    "POOL",
    "BenchConfig",
    "debate_changes",
    "print_bench_report",
    "run_bench",
    "tune_threshold",
    "tune_weights",
    "write_bench_report",
]
