"""``aiflow eval --testbed SCENARIO``: static and adaptive scheduling policies on one testbed, same run.

Every policy answers every held-out task, interleaved (task i goes to all policies, in a rotating order)
so all of them meet the same link schedule: outages and congestion hit each policy alike. A request counts
as right only if its answer is right and arrived within the scenario's deadline. Bytes per task on each
link are attributed from the run's trace (each message crosses the links on the path between the tiers of
its sender and recipient; the requester sits on the device tier); the links' own counters give the total,
background traffic (presence, telemetry, probes) included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from aiflow_agents import AgentSpec
from aiflow_agents.models.tasks import SEEDS, Task, check_answer, generate_tasks
from aiflow_agents.testbed import Scenario, Testbed, load_scenario
from protocols import Envelope
from topologies import RunResult, TopologyManager
from topologies.scheduling import (
    Calibration,
    Member,
    NetworkAware,
    Policy,
    Scheduled,
    TelemetryView,
    confidence_cascade,
    fixed_split,
    local_only,
    remote_only,
)
from topologies.trace import MANAGER

from .harness import console
from .stats import finite, mcnemar_p, paired_quantile_diff_ci, percentile, wilson
from .tables import Col, emit, table

EXIT_OF_TYPE = {"familial-device": "device", "familial-edge": "edge", "familial-cloud": "cloud"}


# -- calibration (the tuning seed: never the evaluation's) --------------------------------------------
def familial_calibration(n: int = 1000) -> Calibration:
    """Per exit confidence and correctness on the tuning seed, plus how often a relay in each encoding
    leaves the deepest exit's answer unchanged, and the bytes of one relayed state."""
    import torch

    from aiflow_agents.models.familial import load_shipped
    from aiflow_agents.models.familial_agents import pack_latent
    from aiflow_agents.models.tasks import canonical_prompt
    from protocols import FeatureSpace
    from protocols import compression as C

    torch.set_num_threads(1)
    model = load_shipped("familial")
    tasks = generate_tasks(n, SEEDS["tune"])
    ids = model.encode_prompts([canonical_prompt(t.prompt) for t in tasks])
    conf: dict[str, list[float]] = {}
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        x = model.embed(ids)
        for i, name in enumerate(model.cfg.exit_names):
            logits, _ = model.continue_from(x, 0, i)
            dec = model.decode_logits(logits, _)
            conf[name] = [float(c) for c in dec.confidence]
            right[name] = [check_answer(t, a) for t, a in zip(tasks, dec.answers, strict=True)]
        _, h1 = model.continue_from(x, 0, 0)
        deep = model.continue_from(h1, model.cfg.exits[0], -1)
        ref = model.decode_logits(*deep).answers
        agree: dict[str, float] = {"text": 1.0}
        sizes: dict[str, int] = {}
        space = FeatureSpace(family=model.cfg.family, layer=model.cfg.exits[0], hidden_size=model.cfg.d_model)
        for enc in ("float16", "int8-rowwise"):
            same = 0
            for j in range(n):
                parts = pack_latent(h1[j : j + 1], space, enc)
                sizes[enc] = sum(p.nbytes for p in parts)
                restored = next(p for p in C.expand(parts) if hasattr(p, "tensor")).tensor.float()
                ans = model.decode_logits(*model.continue_from(restored, model.cfg.exits[0], -1)).answers[0]
                same += ans == ref[j]
            agree[enc] = same / n
    return Calibration(conf, right, relay_agreement=agree, hidden_bytes=sizes)


# -- members and policies ----------------------------------------------------------------------------
def members_of(scenario: Scenario) -> list[Member]:
    from aiflow_agents.models.familial import load_shipped

    cfg = load_shipped("familial").cfg
    out = []
    for tier, t in scenario.tiers.items():
        for a in t.agents:
            spec = AgentSpec.parse(a)
            exit_name = str(spec.config.get("exit", EXIT_OF_TYPE.get(spec.type_name, "")))
            if exit_name not in cfg.exit_names:
                continue
            depth = cfg.exits[cfg.exit_names.index(exit_name)]
            out.append(
                Member(spec.agent_id or spec.type_name, tier, t.kind, exit_name, depth, local=tier == scenario.device)
            )
    return out


def policies_for(members: list[Member]) -> list[Policy]:
    """The static choices of today (each local exit, each remote exit by text, the fixed split to the
    deepest remote exit, the tuned confidence cascade device -> edge -> cloud) and the adaptive policy."""
    local = [m for m in members if m.local]
    remote = sorted((m for m in members if not m.local), key=lambda m: m.depth)
    pols: list[Policy] = [local_only(m.agent_id) for m in local]
    pols += [remote_only(m.agent_id) for m in remote]
    shallow = min(local, key=lambda m: m.depth) if local else None
    if shallow is not None and remote:
        deepest = remote[-1]
        pols.append(fixed_split(shallow.agent_id, deepest.agent_id, "float16"))
        from aiflow_agents.models.familial import shipped_thresholds

        tuned = shipped_thresholds()
        chain = [shallow, *[m for m in remote if m.depth > shallow.depth]]
        # one member per exit depth along the chain (the first replica of each)
        seen: dict[int, Member] = {}
        for m in chain:
            seen.setdefault(m.depth, m)
        chain = list(seen.values())
        if len(chain) > 1:
            th = [float(tuned.get(m.exit, 0.9)) for m in chain[:-1]]
            pols.append(confidence_cascade([m.agent_id for m in chain], th, "float16", name="cascade"))
    pols.append(NetworkAware())
    return pols


# -- one run -------------------------------------------------------------------------------------------
@dataclass
class Row:
    policy: str
    task: int
    correct: bool
    answered: bool
    in_deadline: bool
    latency_ms: float
    degraded: bool
    plan: str
    answered_by: str | None
    during_outage: bool
    bytes_by_link: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def _bytes_by_link(r: RunResult, scenario: Scenario, tier_of: dict[str, str]) -> dict[str, int]:
    out: Counter[str] = Counter()
    dev = scenario.device
    for ev in r.trace.events:
        a = dev if ev.sender == MANAGER else tier_of.get(ev.sender)
        b = dev if ev.recipient == MANAGER else tier_of.get(ev.recipient)
        if a is None or b is None or not ev.bytes:
            continue
        for link in scenario.path(a, b):
            out[link] += ev.bytes
    return dict(out)


async def run_testbed_eval(
    scenario: str | Path | Scenario,
    *,
    tasks: int | None = None,
    seed: int | None = None,
    concurrency: int | None = None,
    policies: list[str] | None = None,
    quiet: bool = False,
    calibration: Calibration | None = None,
    probe_interval: float = 0.5,
) -> dict[str, Any]:
    from aiflow_agents.telemetry import Telemetry

    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    wl = sc.workload
    n, seed = tasks or wl.tasks, wl.seed if seed is None else seed
    if seed in (SEEDS["train"], SEEDS["tune"]):
        raise ValueError(f"seed {seed} is reserved for training/tuning")
    items = generate_tasks(n, seed)
    cal = calibration or familial_calibration()
    members = members_of(sc)
    tier_of = {m.agent_id: m.tier for m in members}
    pols = policies_for(members)
    if policies:
        unknown = sorted(set(policies) - {p.name for p in pols})
        if unknown:
            raise ValueError(f"no policy {unknown} in this scenario; its policies: {[p.name for p in pols]}")
        pols = [p for p in pols if p.name in policies]
    conc = concurrency or wl.concurrency
    async with Testbed(sc) as tb:
        if not quiet:
            console.print(f"[bold]testbed[/] {sc.name}: {', '.join(tb.tiers)}; warnings: {tb.warnings or 'none'}")
        async with TopologyManager(tb.url(), namespace=tb.namespace) as mgr, contextlib.AsyncExitStack() as stack:
            node_of_tier = {t: f"{tb.namespace}-{t}" for t, rt in tb.tiers.items() if rt.node is not None}
            telemetry = await Telemetry(mgr.client).start()
            stack.push_async_callback(telemetry.stop)  # stopped (with its prober) even if a job raises
            await telemetry.probe([v for k, v in node_of_tier.items() if k != sc.device], interval=probe_interval)
            view = TelemetryView(telemetry, node_of_tier)
            patterns = {
                p.name: Scheduled(
                    p,
                    members,
                    cal,
                    view,
                    deadline_s=wl.deadline_s,
                    accuracy_target=wl.accuracy_target,
                    tolerance=wl.tolerance,
                )
                for p in pols
            }
            target = next(iter(patterns.values())).accuracy_target
            for pat in patterns.values():
                pat.policy.plan(pat.context())  # memoises the calibration's cascades before the clock starts
            await asyncio.sleep(3.0)  # telemetry and probes warm up
            idle0, idle_t0 = await _link_bytes(tb), time.monotonic()
            await asyncio.sleep(3.0)
            idle1 = await _link_bytes(tb)
            idle = {t: (idle1[t] - idle0[t]) / (time.monotonic() - idle_t0) for t in idle0}
            link_bytes0 = idle1
            rows: list[Row] = []
            names = list(patterns)
            jobs = [(i, names[(i + k) % len(names)]) for i in range(n) for k in range(len(names))]
            # Closed loop (``concurrency`` in flight) by default; with ``rate``, open loop: task i arrives at a
            # Poisson time and all policies get it then, however slow the earlier ones are (no coordinated
            # omission: a policy that queues pays for it in its own latency).
            arrivals = _poisson_arrivals(n, wl.rate, seed) if wl.rate else None
            sem = asyncio.Semaphore(conc if arrivals is None else len(jobs))
            await tb.start_clock()
            t_start = time.monotonic()
            done = 0

            async def one(i: int, name: str) -> None:
                nonlocal done
                if arrivals is not None:
                    await asyncio.sleep(max(0.0, arrivals[i] - (time.monotonic() - t_start)))
                async with sem:
                    t_rel = tb.elapsed()
                    during = any(o.down_at(t_rel) for o in sc.outages)
                    r = await mgr.run(
                        patterns[name], Envelope.request(items[i].prompt), timeout=wl.deadline_s, check_online=False
                    )
                    during = during or any(o.down_at(tb.elapsed()) for o in sc.outages)
                rows.append(_row(name, i, items[i], r, wl.deadline_s, during, _bytes_by_link(r, sc, tier_of)))
                done += 1
                if not quiet and done % max(1, len(jobs) // 10) == 0:
                    console.print(f"  {done}/{len(jobs)} requests, {time.monotonic() - t_start:.0f} s")

            await asyncio.gather(*(one(i, name) for i, name in jobs))
            wall = time.monotonic() - t_start
            events = [asdict(e) for e in await tb.link_events()]
            await tb.stop_clock()
            end_bytes = await _link_bytes(tb)
            totals = {t: end_bytes[t] - link_bytes0[t] for t in link_bytes0}
            overhead = _overhead(telemetry.overhead())
        info = tb.describe()
    report = summarize(rows, sc, names, target)
    report.update(
        {
            "scenario": sc.model_dump(),
            "testbed": info,
            "n_tasks": n,
            "seed": seed,
            "concurrency": conc if not wl.rate else None,
            "rate_per_s": wl.rate,
            "deadline_s": wl.deadline_s,
            "accuracy_target": target,
            "calibration": cal.to_dict(),
            "wall_s": round(wall, 2),
            "link_bytes_total": totals,
            "link_idle_bytes_per_s": {k: round(v, 1) for k, v in idle.items()},
            "telemetry_overhead": overhead,
            "link_events": events,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
    return report


def _poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each of ``n`` tasks arrives, ``rate`` per second on average."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _overhead(o: Any) -> dict[str, Any]:
    """The scheduler's own telemetry cost at the requester (records in, probes out, answers in)."""
    return {
        "elapsed_s": round(o.elapsed_s, 1),
        "bytes_per_s": round(o.bytes_per_s, 1),
        "msgs_per_s": round(o.msgs_per_s, 2),
        "records_in_bytes_per_s": round(o.records_in.bytes_per_s, 1),
        "probes_out_bytes_per_s": round(o.probes_out.bytes_per_s, 1),
        "answers_in_bytes_per_s": round(o.answers_in.bytes_per_s, 1),
        "nodes": o.nodes,
        "probed": o.probed,
    }


async def _link_bytes(tb: Testbed) -> dict[str, int]:
    """Bytes each link carried so far (both directions)."""
    return {t: int(s.bytes_up + s.bytes_down) for t, s in (await tb.link_stats()).items()}


def _row(name: str, i: int, task: Task, r: RunResult, deadline: float, during: bool, by_link: dict[str, int]) -> Row:
    answered = r.ok
    in_time = answered and r.elapsed <= deadline + 1e-3
    det = r.outcome.details
    return Row(
        policy=name,
        task=i,
        correct=bool(in_time and r.answer is not None and check_answer(task, r.answer)),
        answered=answered,
        in_deadline=in_time,
        latency_ms=r.elapsed * 1e3,
        degraded=bool(det.get("degraded")),
        plan=str(det.get("plan", "")),
        answered_by=det.get("answered_by"),
        during_outage=during,
        bytes_by_link=by_link,
        error=r.error,
    )


# -- the summary ---------------------------------------------------------------------------------------
def summarize(rows: list[Row], sc: Scenario, names: list[str], target: float) -> dict[str, Any]:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[r.policy].append(r)
    for v in by.values():
        v.sort(key=lambda r: r.task)
    links = [t for t, s in sc.tiers.items() if s.parent is not None]
    pol: dict[str, Any] = {}
    for name in names:
        rs = by[name]
        k, m = sum(r.correct for r in rs), len(rs)
        lat = sorted(r.latency_ms for r in rs)
        outage = [r for r in rs if r.during_outage]
        pol[name] = {
            "accuracy": k / m,
            "ci95": wilson(k, m),
            "answered_in_deadline": sum(r.in_deadline for r in rs) / m,
            "latency_ms_p50": percentile(lat, 0.5),
            "latency_ms_p95": percentile(lat, 0.95),
            "latency_ms_p99": percentile(lat, 0.99),
            "latency_ms": [round(x, 2) for x in lat],
            "degraded_share": sum(r.degraded for r in rs) / m,
            "plans": dict(Counter(r.plan for r in rs).most_common(6)),
            "answered_by": dict(Counter(r.answered_by for r in rs if r.answered_by)),
            "bytes_per_task": {ln: sum(r.bytes_by_link.get(ln, 0) for r in rs) / m for ln in links},
            "errors": dict(Counter((r.error or "").split(":")[0] for r in rs if r.error).most_common(4)),
            "outage": {
                "requests": len(outage),
                "answered_in_deadline": (sum(r.in_deadline for r in outage) / len(outage)) if outage else None,
                "degraded_flagged": (sum(r.degraded for r in outage) / len(outage)) if outage else None,
            },
        }
    adaptive = "adaptive"
    goals: dict[str, Any] = {}
    if adaptive in pol:
        a = pol[adaptive]
        statics = {n: p for n, p in pol.items() if n != adaptive}
        front = pareto_front({n: (p["accuracy"], p["latency_ms_p95"]) for n, p in pol.items()})
        goals["pareto_front"] = front
        goals["adaptive_on_front"] = adaptive in front
        # dominated, but only by sampling noise? (no dominating static is significantly better on either axis)
        goals["dominated_by"] = {
            n: {
                "mcnemar_p": _paired_p(by[adaptive], by[n]),
                "p95_diff_ms_ci95": _p95_diff(by[adaptive], by[n]),
            }
            for n in statics
            if n in front and _dominates(pol[n], a)
        }
        goals["adaptive_on_front_within_noise"] = all(
            d["mcnemar_p"] >= 0.05 and d["p95_diff_ms_ci95"][1] <= 0 for d in goals["dominated_by"].values()
        )
        peers = {n: p for n, p in statics.items() if p["accuracy"] >= a["accuracy"] - 0.01}
        if peers:
            best = min(peers, key=lambda n: peers[n]["latency_ms_p95"])
            cut = 1 - a["latency_ms_p95"] / peers[best]["latency_ms_p95"]
            goals["vs_best_static_at_equal_accuracy"] = {
                "static": best,
                "static_accuracy": peers[best]["accuracy"],
                "static_p95_ms": peers[best]["latency_ms_p95"],
                "adaptive_p95_ms": a["latency_ms_p95"],
                "p95_cut": cut,
                "meets_30pct": cut >= 0.30,
                "p95_diff_ms_ci95": _p95_diff(by[adaptive], by[best]),
                "mcnemar_p": _paired_p(by[adaptive], by[best]),
            }
        else:
            top = max(statics, key=lambda n: statics[n]["accuracy"])
            goals["vs_best_static_at_equal_accuracy"] = {
                "static": None,
                "note": f"no static policy within 1 point of adaptive's accuracy; most accurate static is {top}",
                "most_accurate_static": top,
                "static_accuracy": statics[top]["accuracy"],
                "static_p95_ms": statics[top]["latency_ms_p95"],
                "adaptive_p95_ms": a["latency_ms_p95"],
                "accuracy_gain_points": 100 * (a["accuracy"] - statics[top]["accuracy"]),
                "mcnemar_p": _paired_p(by[adaptive], by[top]),
            }
        if sc.outages:
            goals["outage_answered_in_deadline"] = {n: p["outage"]["answered_in_deadline"] for n, p in pol.items()}
    return {"policies": pol, "goals": goals, "accuracy_target": target}


def _dominates(p: dict[str, Any], q: dict[str, Any]) -> bool:
    better_or_equal = p["accuracy"] >= q["accuracy"] and p["latency_ms_p95"] <= q["latency_ms_p95"]
    return better_or_equal and (p["accuracy"] > q["accuracy"] or p["latency_ms_p95"] < q["latency_ms_p95"])


def _p95_diff(a: list[Row], b: list[Row]) -> list[float]:
    """p95(a) - p95(b) in ms on the same tasks, with its paired-bootstrap 95% interval."""
    d, lo, hi = paired_quantile_diff_ci([r.latency_ms for r in a], [r.latency_ms for r in b])
    return [round(d, 1), round(lo, 1), round(hi, 1)]


def _paired_p(a: list[Row], b: list[Row]) -> float:
    """Exact McNemar on the same tasks (both lists sorted by task)."""
    only_a = sum(x.correct and not y.correct for x, y in zip(a, b, strict=True))
    only_b = sum(y.correct and not x.correct for x, y in zip(a, b, strict=True))
    return mcnemar_p(only_a, only_b)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names no other point beats on both accuracy (higher) and p95 latency (lower)."""
    front = []
    for n, (acc, lat) in points.items():
        dominated = any(
            (a2 >= acc and l2 <= lat) and (a2 > acc or l2 < lat) for m, (a2, l2) in points.items() if m != n
        )
        if not dominated:
            front.append(n)
    return front


# -- output ----------------------------------------------------------------------------------------
TESTBED_LEGEND = (
    "in dl: answered within the deadline; degr: answered on the device instead, flagged degraded (dead link "
    "or deadline fallback); outage: in dl for requests sent while a link was down (-: none). --wide adds "
    "p50/p99 and bytes per task per link"
)


def print_testbed_report(report: dict[str, Any], wide: bool = False, out: Console | None = None) -> None:
    """The policies table (80 columns unless ``wide``: then every column, at its natural width) and the goals."""
    con = out or console
    sc = report["scenario"]
    links = [t for t, s in sc["tiers"].items() if s.get("parent")]
    if wide:
        cols = [Col("policy", "label"), Col("acc %"), Col("in deadline %"), Col("p50 ms"), Col("p95 ms")]
        cols += [Col("p99 ms"), Col("degraded %"), *[Col(f"B/task {ln}") for ln in links]]
        cols += [Col("outage: in deadline %")]
    else:
        cols = [Col("policy", "label"), Col("acc %"), Col("in dl %"), Col("p95 ms"), Col("degr %"), Col("outage %")]
    t = table(
        f"{sc['name']}: {report['n_tasks']} held-out tasks (seed {report['seed']}), deadline "
        f"{report['deadline_s']:g} s, accuracy target {100 * report['accuracy_target']:.1f}%",
        cols,
        legend=None if wide else TESTBED_LEGEND,
    )
    for name, p in report["policies"].items():
        od = p["outage"]["answered_in_deadline"]
        row = [name, f"{100 * p['accuracy']:.1f}", f"{100 * p['answered_in_deadline']:.1f}"]
        if wide:
            row += [f"{p['latency_ms_p50']:.0f}", f"{p['latency_ms_p95']:.0f}", f"{p['latency_ms_p99']:.0f}"]
            row += [f"{100 * p['degraded_share']:.1f}", *[f"{p['bytes_per_task'].get(ln, 0):.0f}" for ln in links]]
        else:
            row += [f"{p['latency_ms_p95']:.0f}", f"{100 * p['degraded_share']:.1f}"]
        t.add_row(*row, "-" if od is None else f"{100 * od:.1f}")
    emit(con, t, wide=wide)
    g = report.get("goals", {})
    plain: dict[str, Any] = {"markup": False, "emoji": False}  # "text:cloud: ..." is no emoji code
    if g:
        con.print(f"pareto front (accuracy vs p95): {', '.join(g['pareto_front'])}", **plain)
        if not g["adaptive_on_front"]:
            why = "; ".join(
                f"{n}: McNemar p {d['mcnemar_p']:.2g}, p95 diff {d['p95_diff_ms_ci95'][0]:+.0f} ms "
                f"(95% CI {d['p95_diff_ms_ci95'][1]:+.0f}..{d['p95_diff_ms_ci95'][2]:+.0f})"
                for n, d in g["dominated_by"].items()
            )
            verdict = "within sampling noise" if g["adaptive_on_front_within_noise"] else "significantly"
            con.print(f"adaptive is dominated ({verdict}) by {why}", **plain)
        v = g.get("vs_best_static_at_equal_accuracy", {})
        if v.get("static"):
            con.print(
                f"adaptive vs {v['static']} (best static within 1 point): p95 {v['adaptive_p95_ms']:.0f} vs "
                f"{v['static_p95_ms']:.0f} ms, cut {100 * v['p95_cut']:.0f}% (goal 30%), "
                f"McNemar p {v['mcnemar_p']:.3g}",
                **plain,
            )
        elif v:
            con.print(v["note"], **plain)


def draw_testbed_charts(report: dict[str, Any], out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = report["policies"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, p in pol.items():
        lat = p["latency_ms"]
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ax1.step(lat, ys, where="post", label=name, linewidth=2.5 if name == "adaptive" else 1.2)
    ax1.axvline(report["deadline_s"] * 1e3, color="grey", linestyle="--", linewidth=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("end-to-end latency (ms, log)")
    ax1.set_ylabel("share of requests")
    ax1.set_title("latency CDF per policy (dashed: deadline)")
    ax1.legend(fontsize=7)
    for k, (name, p) in enumerate(pol.items()):
        ax2.scatter(p["latency_ms_p95"], 100 * p["accuracy"], s=80 if name == "adaptive" else 40)
        # staggered labels: statics that end at the same point stay readable
        ax2.annotate(
            name,
            (p["latency_ms_p95"], 100 * p["accuracy"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4 - 9 * (k % 4)),
        )
    ax2.set_xscale("log")
    ax2.set_xlabel("p95 latency (ms, log)")
    ax2.set_ylabel("accuracy within deadline (%)")
    ax2.set_title("accuracy vs p95 latency")
    fig.suptitle(f"{report['scenario']['name']} ({report['date']})")
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_testbed_report(report: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    stem = f"testbed-{report['scenario']['name']}"
    (out / f"{stem}.json").write_text(json.dumps(finite(report), indent=1, default=str, allow_nan=False))
    draw_testbed_charts(report, out, stem)
    console.print(f"report: {out / (stem + '.json')}, chart: {out / (stem + '.png')}")
