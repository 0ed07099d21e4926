"""``aiflow demo speculative``: cross-tier speculative decoding with real LMs, over emulated links.

Two flavours, each against its verifier decoding alone (one streamed ``generate`` request):

- **familial**: SmolLM2-135M on the device runs layers 1-20 and drafts from the exit after layer 20
  (``aiflow train exits``); it ships the layer-20 hidden states, and the cloud's SmolLM2 runs only
  layers 21-30 on them to verify (self-speculative decoding across machines);
- **pair**: Qwen2.5-Coder-0.5B on the device drafts token ids for Qwen2.5-Coder-1.5B in the cloud.

Each link profile is a two-tier testbed (one broker on the device, the cloud's node behind the
link), so a draft never leaves the device and each verification crosses the link once each way.
"loopback" is the same two processes with no link. The report has tokens/s for the device's
user, acceptance, tokens and bytes per round, the verifier's compute per generated token, whether
the output was identical, and the break-even round-trip time.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from protocols import Envelope, Kind, ops
from topologies import TopologyManager, speculative

from .harness import NodeSpec, console, deployment
from .tables import Col, emit, table

#: Device-to-cloud paths. ``up`` is the device's uplink. None = no link (loopback).
PROFILES: dict[str, dict[str, float] | None] = {
    "loopback": None,
    "lan": {"rtt_ms": 4, "jitter_ms": 1, "up_mbps": 200, "down_mbps": 200},
    "5g": {"rtt_ms": 25, "jitter_ms": 3, "up_mbps": 100, "down_mbps": 300},
    "4g": {"rtt_ms": 100, "jitter_ms": 15, "up_mbps": 3, "down_mbps": 15},
}

FLAVOURS: dict[str, dict[str, Any]] = {
    "familial": {
        "drafter": "hf:draft-smol?model=smollm2-135m&exit_layer=20",
        "verifier": "hf:verify-smol?model=smollm2-135m",
        "ship_hidden": True,
        "gamma": 2,
        "label": "SmolLM2-135M exit 20 -> layers 21-30",
    },
    "pair": {
        "drafter": "hf:draft-qwen?model=qwen2.5-coder-0.5b",
        "verifier": "hf:verify-qwen?model=qwen2.5-coder-1.5b",
        "ship_hidden": False,
        "gamma": 2,
        "label": "Qwen2.5-Coder 0.5B -> 1.5B",
    },
}

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain how photosynthesis works in two sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What causes the seasons on Earth?",
    "Write a JavaScript function that sums an array of numbers.",
    "Describe the water cycle.",
]


def _agent_id(spec: str) -> str:
    return spec.split("?", 1)[0].split(":", 1)[1]


def _scenario(profile: str, link: dict[str, float]) -> dict[str, Any]:
    """Two tiers, one broker on the device: drafts stay on the device, and the cloud's node reaches
    the broker through the device's uplink (the testbed orients the profile for that)."""
    return {
        "name": f"speculative-{profile}",
        "description": f"device and cloud over a {profile} path",
        "brokers": "shared",
        "broker_at": "device",
        "heartbeat_s": 2.0,
        "telemetry_s": 5.0,
        "tiers": {
            "device": {
                "kind": "device",
                "parent": "cloud",
                "agents": [],
                "link": {
                    "rtt_ms": link["rtt_ms"],
                    "jitter_ms": link.get("jitter_ms", 0),
                    "up_mbps": link["up_mbps"],
                    "down_mbps": link["down_mbps"],
                },
            },
            "cloud": {"kind": "cloud", "agents": []},
        },
    }


async def _baseline(mgr: TopologyManager, verifier: str, prompt: str, max_new: int, timeout: float) -> dict[str, Any]:
    """The verifier decoding alone: one request, tokens streamed back as progress events."""
    client = mgr.client
    env = Envelope.request(prompt, meta={ops.OP: "generate", "stream": True, "max_new_tokens": max_new})
    t0 = time.time()
    first: float | None = None
    events = 0
    ids: list[int] = []
    async with client.conversation(env, timeout=timeout) as conv:
        sent = await conv.send(client.topics.inbox(verifier))
        while True:
            reply, size = await conv.receive(max(0.001, t0 + timeout - time.time()))
            if reply.kind == Kind.EVENT:
                events += 1
                first = first or time.time()
                piece = reply.meta.get("stream")
                if isinstance(piece, dict) and isinstance(piece.get("token"), int):
                    ids.append(int(piece["token"]))
                continue
            break
    end = time.time()
    if reply.kind == Kind.ERROR:
        raise RuntimeError(f"{verifier}: {reply.error}")
    cost = reply.meta.get(ops.COST) or {}
    tokens = int(cost.get("new_tokens", 0))
    return {
        "text": reply.text,
        "token_ids": ids,
        "tokens": tokens,
        "seconds": end - t0,
        "tokens_per_s": tokens / (end - t0) if end > t0 else None,
        "first_token_s": (first - t0) if first else None,
        "stream_events": events,
        "verifier_seconds": float(cost.get("seconds", 0.0)),
        "verifier_layers": int(cost.get("layers", 0)),
        "prompt_tokens": int(cost.get("prompt_tokens", 0)),
        "bytes": sent + size,
    }


async def _speculative(
    mgr: TopologyManager,
    flavour: dict[str, Any],
    prompt: str,
    max_new: int,
    gamma: int,
    encoding: str,
    timeout: float,
    show: bool = False,
    min_confidence: float = 0.0,
) -> dict[str, Any]:
    def echo(text: str, _ids: list[int]) -> None:  # the user sees text appear as it is accepted
        console.print(text, end="", style="green", highlight=False, markup=False)

    pattern = speculative(
        _agent_id(flavour["drafter"]),
        _agent_id(flavour["verifier"]),
        gamma=gamma,
        max_new_tokens=max_new,
        ship_hidden=flavour["ship_hidden"],
        encoding=encoding,
        min_confidence=min_confidence,
        on_tokens=echo if show else None,
    )
    if show:
        console.print(f"  [dim]{prompt}[/]\n  ", end="")
    res = await mgr.run(pattern, prompt, timeout=timeout)
    if show:
        console.print()
    o = res.outcome
    if o.error:
        raise RuntimeError(f"speculative: {o.error}")
    d = o.details
    events = res.trace.to_list()
    by = {"draft": [0, 0], "verify": [0, 0]}  # [to the agent, back]
    verify_rounds: dict[str, int] = {}  # label -> bytes both ways
    for e in events:
        for key in by:
            if f" {key} " in f" {e['label']} ":
                by[key][0 if e["kind"] == "request" else 1] += int(e["bytes"])
                if key == "verify":
                    verify_rounds[e["label"]] = verify_rounds.get(e["label"], 0) + int(e["bytes"])
    later = [b for label, b in verify_rounds.items() if not label.endswith(" verify 1")]  # round 1 carries the prompt
    rounds = max(1, d["rounds"])
    per = d["per_round"]
    layers_per = [r["verifier_cost"]["layers"] / max(1, r["verifier_cost"]["tokens"]) for r in per]
    v_layers = sum(r["verifier_cost"]["layers"] for r in per)
    prompt_layers = d["prompt_tokens"] * (layers_per[0] if layers_per else 0)
    v_seconds = sum(float(c.cost.model_dump().get("seconds", 0.0)) for c in o.children if "verify" in c.label)
    d_seconds = sum(float(c.cost.model_dump().get("seconds", 0.0)) for c in o.children if "draft" in c.label)
    return {
        "text": o.text,
        "token_ids": d["token_ids"],
        "tokens": d["tokens"],
        "seconds": o.latency,
        "tokens_per_s": d["tokens_per_s"],
        "first_token_s": d["first_token_s"],
        "rounds": d["rounds"],
        "acceptance": d["acceptance"],
        "tokens_per_round": d["tokens_per_round"],
        "verify_bytes_per_round": (by["verify"][0] + by["verify"][1]) / rounds,
        "verify_bytes_per_later_round": statistics.fmean(later) if later else None,
        "verify_bytes_per_token": (by["verify"][0] + by["verify"][1]) / max(1, d["tokens"]),
        "uplink_bytes_per_round": by["verify"][0] / rounds,
        "draft_bytes_per_round": (by["draft"][0] + by["draft"][1]) / rounds,
        "verifier_layers_generation": v_layers - prompt_layers,
        "verifier_seconds": v_seconds,
        "drafter_seconds": d_seconds,
        "prompt_tokens": d["prompt_tokens"],
    }


def _gmean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def sign_test(wins: int, n: int) -> float:
    """Two-sided exact sign test: how likely so lopsided a split of ``n`` paired prompts is by chance."""
    k = max(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
    return min(1.0, 2 * tail)


def _summary(rows: list[dict[str, Any]], total_layers: int) -> dict[str, Any]:
    ratio = [r["spec"]["tokens_per_s"] / r["base"]["tokens_per_s"] for r in rows if r["base"]["tokens_per_s"]]
    faster = sum(x > 1 for x in ratio)
    spec_tok = sum(r["spec"]["tokens"] for r in rows)
    base_tok = sum(r["base"]["tokens"] for r in rows)
    layers_spec = sum(r["spec"]["verifier_layers_generation"] for r in rows) / max(1, spec_tok)
    sec_spec = sum(r["spec"]["verifier_seconds"] for r in rows) / max(1, spec_tok)
    sec_base = sum(r["base"]["verifier_seconds"] for r in rows) / max(1, base_tok)
    rounds = sum(r["spec"]["rounds"] for r in rows)
    # Break-even RTT: the extra round trips speculative decoding pays (one per round, the baseline
    # pays one per request) that would eat its whole time advantage, from this run's own times.
    saved = sum(r["base"]["seconds"] - r["spec"]["seconds"] for r in rows)
    extra_trips = sum(r["spec"]["rounds"] - 1 for r in rows)
    return {
        "prompts": len(rows),
        "speedup_gmean": _gmean(ratio),
        "speedup_min": min(ratio) if ratio else None,
        "speedup_max": max(ratio) if ratio else None,
        "faster_on": faster,
        "sign_test_p": sign_test(faster, len(ratio)) if ratio else None,
        "spec_tokens_per_s": spec_tok / max(1e-9, sum(r["spec"]["seconds"] for r in rows)),
        "base_tokens_per_s": base_tok / max(1e-9, sum(r["base"]["seconds"] for r in rows)),
        "acceptance": statistics.fmean(r["spec"]["acceptance"] or 0 for r in rows),
        "tokens_per_round": spec_tok / max(1, rounds),
        "verify_bytes_per_round": statistics.fmean(r["spec"]["verify_bytes_per_round"] for r in rows),
        "verify_bytes_per_later_round": statistics.fmean(r["spec"]["verify_bytes_per_later_round"] or 0 for r in rows),
        "verify_bytes_per_token": statistics.fmean(r["spec"]["verify_bytes_per_token"] for r in rows),
        "uplink_bytes_per_round": statistics.fmean(r["spec"]["uplink_bytes_per_round"] for r in rows),
        "verifier_layers_per_token": layers_spec,
        "verifier_layers_per_token_alone": float(total_layers),
        "verifier_compute_saved_layers": 1 - layers_spec / total_layers,
        "verifier_seconds_per_token": sec_spec,
        "verifier_seconds_per_token_alone": sec_base,
        "verifier_compute_saved_seconds": 1 - sec_spec / sec_base if sec_base else None,
        "identical": sum(r["identical"] for r in rows),
        "first_token_s_spec": statistics.fmean(r["spec"]["first_token_s"] or 0 for r in rows),
        "first_token_s_base": statistics.fmean(r["base"]["first_token_s"] or 0 for r in rows),
        "break_even_extra_rtt_ms": 1e3 * saved / extra_trips if extra_trips > 0 else None,
    }


async def _run(
    flavours: list[str],
    profiles: list[str],
    prompts: list[str],
    max_new: int,
    encoding: str,
    gamma: int | None,
    broker: str | None,
    timeout: float,
    min_conf: float = 0.0,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "prompts": prompts,
        "max_new_tokens": max_new,
        "encoding": encoding,
        "min_confidence": min_conf,
        "runs": {},
    }
    for name in flavours:
        fl = FLAVOURS[name]
        g = gamma or fl["gamma"]
        for profile in profiles:
            link = PROFILES[profile]
            nodes = [NodeSpec("device", "device", [fl["drafter"]]), NodeSpec("cloud", "cloud", [fl["verifier"]])]
            testbed = None if link is None else _scenario(profile, link)
            console.print(f"[bold]{name}[/] ({fl['label']}), {profile}, gamma {g}")
            rows: list[dict[str, Any]] = []
            async with deployment(nodes, broker, testbed=testbed, quiet=True, ready_timeout=600) as (mgr, _):
                layers = await _verifier_layers(mgr, _agent_id(fl["verifier"]))
                # warm both paths once (first-call allocations), then alternate which goes first
                await _baseline(mgr, _agent_id(fl["verifier"]), prompts[0], 4, timeout)
                await _speculative(mgr, fl, prompts[0], 4, g, encoding, timeout)
                for i, prompt in enumerate(prompts):
                    if i % 2 == 0:
                        base = await _baseline(mgr, _agent_id(fl["verifier"]), prompt, max_new, timeout)
                        spec = await _speculative(mgr, fl, prompt, max_new, g, encoding, timeout, i == 0, min_conf)
                    else:
                        spec = await _speculative(mgr, fl, prompt, max_new, g, encoding, timeout, False, min_conf)
                        base = await _baseline(mgr, _agent_id(fl["verifier"]), prompt, max_new, timeout)
                    same = spec["token_ids"] == base["token_ids"]
                    rows.append({"prompt": prompt, "spec": spec, "base": base, "identical": same})
                    console.print(
                        f"  {i + 1}/{len(prompts)}: {spec['tokens_per_s']:.1f} vs {base['tokens_per_s']:.1f} tok/s, "
                        f"acceptance {100 * (spec['acceptance'] or 0):.0f}%, "
                        f"{spec['tokens_per_round']:.2f} tok/round, identical {same}"
                    )
            report["runs"][f"{name}/{profile}"] = {
                "flavour": name,
                "profile": profile,
                "link": link,
                "gamma": g,
                "label": fl["label"],
                "summary": _summary(rows, layers),
                "rows": rows,
            }
    return report


async def _verifier_layers(mgr: TopologyManager, agent: str) -> int:
    """The verifier's depth, from what one token costs it (``cost.layers`` / ``cost.tokens``)."""
    reply = await mgr.client.request(agent, Envelope.request("hi", meta={"max_new_tokens": 1}), timeout=600)
    cost = reply.meta.get(ops.COST) or {}
    return int(cost.get("layers", 0)) // max(1, int(cost.get("tokens", 1)))


def _link_label(link: dict[str, float] | None) -> str:
    if link is None:
        return "no link"
    return f"{link['rtt_ms']:.0f} ms\n{link['up_mbps']:.0f}/{link['down_mbps']:.0f} Mbit/s"


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    flavours = sorted({r["flavour"] for r in runs.values()})
    profiles = [p for p in PROFILES if any(r["profile"] == p for r in runs.values())]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    width = 0.8 / max(1, len(flavours))
    colours = {"familial": "#1f77b4", "pair": "#d62728"}
    for i, fl in enumerate(flavours):
        xs, ratio, lo, hi, acc = [], [], [], [], []
        for j, p in enumerate(profiles):
            r = runs.get(f"{fl}/{p}")
            if r is None:
                continue
            s = r["summary"]
            xs.append(j + (i - (len(flavours) - 1) / 2) * width)
            ratio.append(s["speedup_gmean"] or 0)
            lo.append((s["speedup_gmean"] or 0) - (s["speedup_min"] or 0))
            hi.append((s["speedup_max"] or 0) - (s["speedup_gmean"] or 0))
            acc.append(100 * s["acceptance"])
        label = f"{fl}: {runs[next(k for k in runs if k.startswith(fl + '/'))]['label']}"
        axes[0].bar(xs, ratio, width, yerr=[lo, hi], capsize=3, color=colours.get(fl), label=label)
        for x, y in zip(xs, ratio, strict=True):
            axes[0].annotate(f"{y:.2f}x", (x, 0.03), ha="center", color="white", fontsize=8, fontweight="bold")
        axes[1].bar(xs, acc, width, color=colours.get(fl), label=label)
        for x, y in zip(xs, acc, strict=True):
            axes[1].annotate(f"{y:.0f}%", (x, y + 1), ha="center", fontsize=8)
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].axhline(1.3, color="grey", lw=0.8, ls="--")
    axes[0].annotate("goal 1.3x", (len(profiles) - 0.5, 1.31), ha="right", fontsize=8, color="grey")
    axes[0].set_ylim(0, 1.55)
    axes[0].set_ylabel("tokens/s, x the verifier alone")
    axes[1].set_ylabel("draft tokens accepted (%)")
    axes[1].set_ylim(0, 100)
    for ax in axes:
        ax.set_xticks(range(len(profiles)))
        ax.set_xticklabels([f"{p}\n{_link_label(PROFILES.get(p))}" for p in profiles], fontsize=8)
    axes[0].set_title(
        "end-to-end speed for the device's user\n(geometric mean; bars: min-max over prompts)", fontsize=9
    )
    axes[1].set_title("acceptance (greedy: the same on every link)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    n = len(report["prompts"])
    fig.suptitle(
        f"cross-tier speculative decoding, {n} prompts x {report['max_new_tokens']} tokens, greedy", fontsize=11
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


SPEC_LEGEND = (
    "B/rnd: bytes of one verification (both ways) after the first, which carries the prompt; "
    "verif. saved: the verifier's layers / seconds per generated token, against it decoding alone"
)
SPEC_LEGEND_NARROW = (
    "alone: the verifier decoding alone; x: speedup over it (geometric mean); accept: drafted tokens accepted; "
    "tok/rnd: tokens per verification round; same: outputs equal to the verifier's alone. --wide adds B/rnd "
    "and verif. saved. "
)


def print_speculative_report(report: dict[str, Any], wide: bool = False, out: Console | None = None) -> None:
    """One row per flavour and link; 80 columns unless ``wide`` (then every column, at its natural width)."""
    names = ["flavour", "link", "tok/s", "alone", "x", "accept", "tok/rnd"]
    names += ["B/rnd", "verif. saved", "same"] if wide else ["same"]
    t = table(
        "speculative decoding vs the verifier alone",
        [Col(c, "label" if c in ("flavour", "link") else "num") for c in names],
        legend=SPEC_LEGEND if wide else SPEC_LEGEND_NARROW + SPEC_LEGEND,
    )
    for r in report["runs"].values():
        s = r["summary"]
        row = [r["flavour"], r["profile"], f"{s['spec_tokens_per_s']:.1f}", f"{s['base_tokens_per_s']:.1f}"]
        row += [f"{s['speedup_gmean']:.2f}", f"{100 * s['acceptance']:.0f}%", f"{s['tokens_per_round']:.2f}"]
        if wide:
            row += [f"{s['verify_bytes_per_later_round']:.0f}"]
            row += [
                f"{100 * s['verifier_compute_saved_layers']:.0f}% / "
                f"{100 * (s['verifier_compute_saved_seconds'] or 0):.0f}%"
            ]
        t.add_row(*row, f"{s['identical']}/{s['prompts']}")
    emit(out or console, t, wide=wide)


def speculative_demo(
    flavour: Annotated[str, typer.Option(help="familial, pair or both")] = "both",
    profiles: Annotated[
        str, typer.Option(help=f"comma-separated link profiles: {', '.join(PROFILES)}")
    ] = "loopback,4g",
    prompts: Annotated[int, typer.Option(help=f"prompts per profile (at most {len(PROMPTS)})")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 32,
    gamma: Annotated[int | None, typer.Option(help="draft length (default: per flavour)")] = None,
    encoding: Annotated[str, typer.Option(help="hidden states on the wire (familial)")] = "float16",
    min_confidence: Annotated[float, typer.Option(help="drafters stop below this probability")] = 0.0,
    out: Annotated[Path | None, typer.Option("--out", help="folder for speculative.json and speculative.png")] = None,
    broker: Annotated[str | None, typer.Option("--broker", "-b", envvar="AIFLOW_BROKER")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 600.0,
    wide: Annotated[bool, typer.Option("--wide", help="show every column (the default table fits 80 columns)")] = False,
) -> None:
    """Speculative decoding across tiers: a device drafts, the cloud verifies (both flavours, per link)."""
    names = list(FLAVOURS) if flavour == "both" else [flavour]
    bad = [n for n in names if n not in FLAVOURS] + [p for p in profiles.split(",") if p not in PROFILES]
    if bad:
        raise typer.BadParameter(f"unknown {bad}; flavours: {', '.join(FLAVOURS)}; profiles: {', '.join(PROFILES)}")
    chosen = PROMPTS[: max(1, min(prompts, len(PROMPTS)))]
    report = asyncio.run(
        _run(names, profiles.split(","), chosen, max_new_tokens, encoding, gamma, broker, timeout, min_confidence)
    )
    print_speculative_report(report, wide)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "speculative.json").write_text(json.dumps(report, indent=1, default=str))
        _chart(report, out / "speculative.png")
        console.print(f"report: {out / 'speculative.json'}, {out / 'speculative.png'}")
