"""Training of the familial model and its peers on the synthetic arithmetic of :mod:`.tasks`.

``aiflow train familial`` (:data:`train_app`) reproduces the shipped weights: fixed seeds, a fixed
number of steps (never a time budget, which would depend on the machine's load), two CPU threads.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer

from . import tasks as T
from .familial import WEIGHTS_DIR, FamilialConfig, FamilialModel, save_model


@dataclass
class TrainSpec:
    """One model to train: architecture, seeds and schedule."""

    cfg: FamilialConfig
    seed: int = 0
    data_seed: int = T.SEEDS["train"]
    steps: int = 2000
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    #: Loss weight per exit (None: equal weights).
    exit_weights: tuple[float, ...] | None = None
    #: Share of training items per difficulty level (None: equal shares).
    mix: dict[int, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def training_tasks(n: int, seed: int, mix: dict[int, float] | None = None) -> list[T.Task]:
    """``n`` training-split tasks; levels drawn in proportion to ``mix``, shuffled with ``seed``."""
    levels = sorted(mix or T.BANDS)
    shares = [(mix or {}).get(lv, 1.0) for lv in levels]
    total = sum(shares)
    counts = [int(n * s / total) for s in shares]
    counts[-1] += n - sum(counts)
    out: list[T.Task] = []
    for lv, c in zip(levels, counts, strict=True):
        out += T.generate_tasks(c, seed * 1000 + lv, lv, split="train")
    random.Random(seed).shuffle(out)
    return out


def encode_tasks(model: FamilialModel, items: Sequence[T.Task]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [t.prompt for t in items]
    answers = [t.answer for t in items]
    return model.encode_prompts(prompts, answers), model.targets(answers)


def train_model(spec: TrainSpec, log: Callable[[str], None] | None = print) -> tuple[FamilialModel, dict[str, Any]]:
    """Train one model from scratch; deterministic for a given spec and thread count."""
    torch.manual_seed(spec.seed)
    model = FamilialModel(spec.cfg)
    model.train()
    t0 = time.perf_counter()
    items = training_tasks(spec.steps * spec.batch, spec.data_seed, spec.mix)
    ids, tgt = encode_tasks(model, items)
    gen_s = time.perf_counter() - t0
    weights = list(spec.exit_weights or [1.0] * model.n_exits)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    t1 = time.perf_counter()
    running: list[float] = [0.0] * model.n_exits
    for step in range(spec.steps):
        sl = slice(step * spec.batch, (step + 1) * spec.batch)
        x, y = ids[sl], tgt[sl]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        outs = model(x)
        losses = [F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1)) for o in outs]
        loss = sum(w * lo for w, lo in zip(weights, losses, strict=True)) / sum(weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for i, lo in enumerate(losses):
            running[i] = 0.98 * running[i] + 0.02 * lo.item() if step else lo.item()
        if log and (step + 1) % max(1, spec.steps // 10) == 0:
            el = time.perf_counter() - t1
            log(
                f"  [{spec.cfg.name}] step {step + 1}/{spec.steps} loss "
                + " ".join(f"{r:.3f}" for r in running)
                + f" ({el:.0f}s)"
            )
    model.eval()
    stats = {
        "steps": spec.steps,
        "batch": spec.batch,
        "train_items": len(items),
        "data_gen_s": round(gen_s, 2),
        "train_s": round(time.perf_counter() - t1, 1),
        "final_loss": [round(r, 4) for r in running],
    }
    return model, stats


@torch.no_grad()
def evaluate(model: FamilialModel, items: Sequence[T.Task], batch: int = 500) -> dict[str, Any]:
    """Greedy exact-match accuracy per exit, overall and per difficulty level, plus the raw
    per-item answers, confidences and correctness (for cascades and error-overlap analyses)."""
    answers: list[list[str]] = [[] for _ in model.cfg.exits]
    conf: list[list[float]] = [[] for _ in model.cfg.exits]
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        if model.cfg.mode == "parallel":
            outs = model(model.encode_prompts([t.prompt for t in chunk]))
            for i, logits in enumerate(outs):
                dec = model.decode_logits(logits, logits)
                answers[i] += dec.answers
                conf[i] += dec.confidence.tolist()
        else:
            for i in range(model.n_exits):
                dec = model.generate([t.prompt for t in chunk], i)
                answers[i] += dec.answers
                conf[i] += dec.confidence.tolist()
    correct = [[a == t.answer for a, t in zip(ans, items, strict=True)] for ans in answers]
    result: dict[str, Any] = {"n": len(items), "exits": {}}
    for i, name in enumerate(model.cfg.exit_names):
        per: dict[int, list[bool]] = defaultdict(list)
        for ok, t in zip(correct[i], items, strict=True):
            per[t.difficulty].append(ok)
        result["exits"][name] = {
            "depth": model.cfg.exits[i],
            "accuracy": sum(correct[i]) / len(items),
            "by_level": {lv: sum(v) / len(v) for lv, v in sorted(per.items())},
        }
    result["answers"], result["confidence"], result["correct"] = answers, conf, correct
    return result


def summary(result: dict[str, Any]) -> str:
    lines = []
    for name, r in result["exits"].items():
        lv = " ".join(f"L{k}:{v * 100:5.1f}" for k, v in r["by_level"].items())
        lines.append(f"{name:>8} (depth {r['depth']}): {r['accuracy'] * 100:5.1f}%  {lv}")
    return "\n".join(lines)


def error_overlap(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Among items where at least one of two members is wrong, the share where both are."""
    either = sum(1 for x, y in zip(a, b, strict=True) if not (x and y))
    both = sum(1 for x, y in zip(a, b, strict=True) if not x and not y)
    return both / either if either else 0.0


# -- the recipe ------------------------------------------------------------------------------
#: Peers as (width, depth, seed offset). Plateaus are seed-sensitive at this budget: seed offset 202
#: stayed on the plateau for addition (17% held-out at 128 x 4 and at 112 x 6; it learned only the
#: products), offset 303 at 112 x 6 reached 45% and offset 404 at 128 x 4 61% on the *tuning* seed,
#: so peer-b is 128 x 4 with offset 404 (chosen on the tuning set, never on the held-out set).
PEER_SHAPES: list[tuple[int, int, int]] = [(96, 5, 101), (128, 4, 404), (112, 6, 303), (96, 4, 505)]


def peer_spec(k: int, seed: int = 0, steps: int | None = None, shape: tuple[int, int, int] | None = None) -> TrainSpec:
    """The ``k``-th peer (``peer-a``, ``peer-b``, ...): a single-exit model of its own width,
    depth and seeds, and its own feature-space family (its latents never mix with the family's)."""
    d, layers, offset = shape or PEER_SHAPES[k % len(PEER_SHAPES)]
    name = f"peer-{chr(ord('a') + k)}"
    cfg = FamilialConfig(
        name=name,
        family=f"aiflow-arith-{name}",
        d_model=d,
        n_heads=4,
        n_layers=layers,
        exits=(layers,),
        exit_names=("full",),
    )
    return TrainSpec(cfg=cfg, seed=seed + offset, data_seed=T.SEEDS["train"] + seed + offset, steps=steps or PEER_STEPS)


def default_specs(seed: int = 0, steps: int | None = None, peers: int = 2) -> list[TrainSpec]:
    """The family and its peers, as shipped. Peers differ in seed (init and data order), width and
    depth, so their mistakes overlap less than the exits of one model do."""
    family = TrainSpec(
        cfg=FamilialConfig(name="familial", d_model=128, n_heads=4, n_layers=6, exits=(1, 3, 6)),
        seed=seed,
        data_seed=T.SEEDS["train"] + seed,
        steps=steps or FAMILY_STEPS,
    )
    return [family, *(peer_spec(k, seed, steps) for k in range(peers))]


FAMILY_STEPS = 2400
PEER_STEPS = 1800


def _train_worker(spec: TrainSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.set_num_threads(1)
    model, stats = train_model(spec)
    return {k: v.clone() for k, v in model.state_dict().items()}, stats


def train_all(specs: Sequence[TrainSpec], jobs: int = 1) -> list[tuple[FamilialModel, dict[str, Any]]]:
    """Train ``specs``, ``jobs`` at a time in worker processes of one thread each (the result
    does not depend on ``jobs``: each model is trained by one single-threaded process)."""
    if jobs <= 1:
        torch.set_num_threads(1)
        return [train_model(s) for s in specs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        results = pool.map(_train_worker, specs, chunksize=1)
    out = []
    for spec, (state, stats) in zip(specs, results, strict=True):
        model = FamilialModel(spec.cfg)
        model.load_state_dict(state)
        out.append((model.eval(), stats))
    return out


def tune_thresholds(
    model: FamilialModel, items: Sequence[T.Task], max_cloud: float = 0.48, tolerance: float = 0.002
) -> dict[str, Any]:
    """Relay thresholds from a tuning split (never the reported one), two operating points:

    - ``cloud_capped`` (the default): among settings that keep the cloud share <= ``max_cloud``
      (0.48: two points under the 50% target) and come within ``tolerance`` of the best accuracy
      there, the one that sends the most items to the cloud (then the most accurate, then the
      lowest device threshold). Spending the budget is the accuracy margin: the single most
      accurate setting on the tuning set chases noise (one 2 items better on 2000 tuning items
      was 1.5 points worse on the held-out set);
    - ``accuracy_first``: the lowest cloud share that keeps 99.5% of the deepest exit's accuracy
      (a margin over 99%: thresholds tuned to exactly 99% undershoot on fresh data, FACTS.md).

    One forced float16 relay gives every exit's answer and confidence per item; the grid is then
    searched without running the model again."""
    from .familial import relay

    forced = relay(model, [t.prompt for t in items], [2.0] * (model.n_exits - 1), "float16")
    right = [[a == t.answer for a in per] for per, t in zip(forced.exit_answers, items, strict=True)]
    n = len(items)
    deep = sum(r[-1] for r in right) / n
    depths = list(model.cfg.exits)
    grid = sorted({round(0.5 + 0.01 * i, 3) for i in range(50)} | {0.995, 0.999, 1.01})
    rows = []
    for ths in itertools.product(grid, repeat=model.n_exits - 1):
        acc = cloud = depth = 0
        for r, conf in zip(right, forced.exit_confidence, strict=True):
            k = next((i for i, th in enumerate(ths) if conf[i] >= th), model.n_exits - 1)
            acc += r[k]
            cloud += k == model.n_exits - 1
            depth += depths[k]
        rows.append(
            {
                "thresholds": list(ths),
                "accuracy": acc / n,
                "ratio": acc / n / deep if deep else 0.0,
                "cloud_share": cloud / n,
                "mean_depth": depth / n,
            }
        )
    capped = [r for r in rows if r["cloud_share"] <= max_cloud]
    best = None
    if capped:
        top = max(r["accuracy"] for r in capped)
        near = [r for r in capped if r["accuracy"] >= top - tolerance]
        best = max(near, key=lambda r: (r["cloud_share"], r["accuracy"], -r["thresholds"][0]))
    safe = [r for r in rows if r["ratio"] >= 0.995]
    first = min(safe, key=lambda r: (r["cloud_share"], r["mean_depth"])) if safe else None
    chosen = best or first or rows[-1]
    return {
        "thresholds": chosen["thresholds"],
        "deep_accuracy": deep,
        "max_cloud": max_cloud,
        "cloud_capped": best,
        "accuracy_first": first,
    }


def relay_report(model: FamilialModel, items: Sequence[T.Task], thresholds: Sequence[float]) -> dict[str, Any]:
    """Relay on ``items``: accuracy vs the deepest exit, share answered per exit, bytes per hop,
    float16 vs int8 (answers equal to the float16 relay and to the one-machine deep exit)."""
    from .familial import relay

    prompts = [t.prompt for t in items]
    deep = evaluate(model, items)
    deep_name = model.cfg.exit_names[-1]
    deep_ans = deep["answers"][-1]
    out: dict[str, Any] = {"thresholds": list(thresholds), "deep_accuracy": deep["exits"][deep_name]["accuracy"]}
    results = {}
    for enc in ("float32", "float16", "int8-rowwise"):
        r = relay(model, prompts, list(thresholds), enc)
        acc = sum(a == t.answer for a, t in zip(r.answers, items, strict=True)) / len(items)
        results[enc] = r
        hop_bytes = sorted({b for per in r.latent_bytes for b in per})
        out[enc] = {
            "accuracy": acc,
            "ratio_to_deep": acc / out["deep_accuracy"],
            "answered_share": {
                name: sum(b == i for b in r.answered_by) / len(items) for i, name in enumerate(model.cfg.exit_names)
            },
            "bytes_per_hop": hop_bytes,
            "mean_bytes_per_item": sum(sum(per) for per in r.latent_bytes) / len(items),
        }
    # Forced relay (every item goes device -> edge -> cloud): the cloud answer must equal the deep exit.
    forced = {
        enc: relay(model, prompts, [2.0] * (model.n_exits - 1), enc).answers for enc in ("float16", "int8-rowwise")
    }
    out["forced_relay_agreement_with_deep"] = {
        enc: sum(a == b for a, b in zip(ans, deep_ans, strict=True)) / len(items) for enc, ans in forced.items()
    }
    out["int8_vs_float16_relay_agreement"] = sum(
        a == b for a, b in zip(results["int8-rowwise"].answers, results["float16"].answers, strict=True)
    ) / len(items)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _relay_table(rel: dict[str, Any]) -> list[str]:
    lines = [
        "| wire encoding | relay accuracy | of cloud exit | answered device / edge / cloud | bytes/hop | bytes/item |",
        "|---|---|---|---|---|---|",
    ]
    for enc in ("float32", "float16", "int8-rowwise"):
        r = rel[enc]
        share = " / ".join(_pct(v) for v in r["answered_share"].values())
        lines.append(
            f"| {enc} | {_pct(r['accuracy'])} | {_pct(r['ratio_to_deep'])} | {share} | {r['bytes_per_hop']} |"
            f" {r['mean_bytes_per_item']:.0f} |"
        )
    return lines


def write_model_card(out: Path, metrics: dict[str, Any]) -> Path:
    """MODEL_CARD.md from the metrics of a training run."""
    seeds, n = metrics["seeds"], metrics["heldout_n"]
    steps = f" --steps {metrics['steps_arg']}" if metrics.get("steps_arg") else ""
    lines = [
        "# Familial arithmetic models (shipped weights)",
        "",
        "An early-exit transformer family (shared trunk; exits for device, edge and cloud, each with its own",
        "LayerNorm and LM head; trained jointly on the equally weighted sum of the exits' losses) and independently",
        "trained peers (other seed, width, depth), on the synthetic arithmetic of `aiflow_agents.models.tasks`.",
        "",
        f"Reproduce: `aiflow train familial --seed {metrics.get('seed', 0)}{steps}` (or",
        "`python -m aiflow_agents.models.training familial`). Each model trains in one single-threaded process",
        "for a fixed number of steps (deterministic; `--jobs 2` trains two models at once with the same result).",
        "`--report-only` re-evaluates the weights in `--out` and rewrites this card.",
        "",
        "## Data",
        "",
        "- Generator: `aiflow_agents.models.tasks.generate_tasks(n, seed, difficulty, split=...)`. Prompts hash into 8",
        "  buckets; bucket 0 is the held-out split, which training never draws from.",
        f"- Seeds: training data `seed * 1000 + level` of the model's data seed (family: {seeds['train']}),",
        f"  relay threshold tuning {seeds['tune']}, reported held-out set {seeds['heldout']} (both unseen items).",
        f"- Format: operands zero-padded to their band's width, prompt left-padded to {T.PROMPT_WIDTH} characters,",
        f"  `=`, then {T.ANSWER_WIDTH} answer digits, lowest digit first. A significance embedding (which power",
        "  of ten a digit stands for) is added to token and position embeddings.",
        "- Decoding: parallel. The input is the prompt, `=` and answer slots `_`; one forward pass predicts every",
        "  answer digit. Pilot (8 bands, 1400 steps, d128 x 6 layers, exits 2/4/6): teacher-forced autoregressive",
        "  decoding reached 27.4 / 30.4 / 31.4% per exit, parallel 21.1 / 25.0 / 26.6%. Parallel was chosen anyway:",
        "  a relay then needs only the layer-k hidden states of all positions (no KV cache, which would have been",
        "  2k more tensors of the same size per hop, and no recomputation), it is exact by construction, and the",
        "  answer's carries must be resolved inside the network, so depth matters more.",
        "",
        "| level | band | template | operand digits |",
        "|---|---|---|---|",
    ]
    lines += [f"| {b.level} | {b.name} | `{b.template}` | {', '.join(map(str, b.digits))} |" for b in T.BANDS.values()]
    lines += [
        "",
        "## Models",
        "",
        "| model | d | layers | exits (depth) | params | steps | batch | train time | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["models"].items():
        c, tr = m["config"], m.get("train", {})
        ex = ", ".join(f"{e} ({d})" for e, d in zip(c["exit_names"], c["exits"], strict=True))
        lines.append(
            f"| {name} (seed {m['seed']}) | {c['d_model']} | {c['n_layers']} | {ex} | {m['params']:,} |"
            f" {tr.get('steps', '?')} | {tr.get('batch', '?')} | {tr.get('train_s', 0):.0f} s | {m['file_bytes']:,} B |"
        )
    wall = metrics.get("train_wall_s")
    if wall:
        lines += [
            "",
            f"Total training wall time: {wall:.0f} s ({metrics.get('jobs')} worker processes, 1 thread each, on 2"
            " cores shared with other jobs; the result does not depend on load or on --jobs).",
        ]
    levels = sorted(T.BANDS)
    lines += [
        "",
        f"## Held-out accuracy (greedy exact match, n = {n}, seed {seeds['heldout']}, {n // len(levels)} per level)",
        "",
        "| model / exit | overall | " + " | ".join(f"L{lv} {T.BANDS[lv].name}" for lv in levels) + " |",
        "|---" * (2 + len(levels)) + "|",
    ]
    for name, m in metrics["models"].items():
        for ex, r in m["heldout"].items():
            cells = " | ".join(_pct(r["by_level"].get(str(lv))) for lv in levels)
            lines.append(f"| {name} / {ex} (depth {r['depth']}) | {_pct(r['accuracy'])} | {cells} |")
    lines += [
        "",
        "## Error overlap (held-out)",
        "",
        "Among items where at least one of two members is wrong, the share where both are wrong:",
        "",
    ]
    lines += [f"- {pair}: {_pct(v)}" for pair, v in metrics["error_overlap"].items()]
    lines += [
        "",
        f"At least one of {', '.join(metrics['ensemble_members'])} is right on {_pct(metrics['any_member_right'])}",
        "of the held-out items (the ceiling for any aggregation of these members).",
    ]
    tuned, rel = metrics["tuned"], metrics["relay"]
    cap, first = tuned.get("cloud_capped"), tuned.get("accuracy_first")
    lines += [
        "",
        "## Relay (device -> edge -> cloud)",
        "",
        "An exit answers when its confidence (the lowest top probability over the answer digits) reaches its",
        "threshold; otherwise it ships its trunk state (all positions) to the next exit, which continues from that",
        f"layer. Thresholds are tuned on seed {seeds['tune']} (n = {metrics.get('tune_n')}),"
        f" reported on seed {seeds['heldout']}.",
        "",
    ]
    if cap:
        lines += [
            f"- Default (`cloud_capped`): device {cap['thresholds'][0]}, edge {cap['thresholds'][1]}: the",
            f"  setting within 0.2 points of the best accuracy with <= {tuned['max_cloud']:.0%} of items reaching the",
            "  cloud (a margin under 50%) that sends the most items to the cloud (a margin in accuracy). Tuning set:",
            f"  {_pct(cap['ratio'])} of the cloud exit's accuracy, cloud share {_pct(cap['cloud_share'])}.",
        ]
    if first:
        lines += [
            f"- `accuracy_first`: device {first['thresholds'][0]}, edge {first['thresholds'][1]}: the lowest cloud",
            "  share keeping >= 99.5% of the cloud exit's accuracy (a margin over 99%). Tuning set:",
            f"  {_pct(first['ratio'])}, cloud share {_pct(first['cloud_share'])}.",
        ]
    lines += [
        "",
        f"Held-out, default thresholds (cloud exit alone: {_pct(rel['deep_accuracy'])}):",
        "",
        *_relay_table(rel),
    ]
    if metrics.get("relay_accuracy_first"):
        lines += ["", "Held-out, `accuracy_first` thresholds:", "", *_relay_table(metrics["relay_accuracy_first"])]
    forced = rel["forced_relay_agreement_with_deep"]
    lines += [
        "",
        "Forced relay (every item through all three exits), answers equal to the cloud exit run on one machine:",
        f"float16 {_pct(forced['float16'])}, int8-rowwise {_pct(forced['int8-rowwise'])}."
        " With the default thresholds the",
        f"int8 relay gives the float16 relay's answer on {_pct(rel['int8_vs_float16_relay_agreement'])} of the items.",
        "Wire (SPEC §17): float16 = one `hidden_state` part (1, T, D); int8-rowwise = an int8 head part (role",
        "`other`, meta naming role `hidden_state`) plus one float32 scale per position in the next part (meta",
        "encoding `int8-rowwise-scales`); value = q * scale. Bytes per hop count tensor data; the frame adds a",
        "JSON header of about 0.5 KB.",
        "",
    ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def train_familial(
    seed: int = 0,
    steps: int | None = None,
    out: Path = WEIGHTS_DIR,
    peers: int = 2,
    jobs: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the family and ``peers`` peers, save them to ``out``, then write metrics and the
    model card (:func:`report_familial`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = default_specs(seed, steps, peers)
    t0 = time.perf_counter()
    trained = train_all(specs, jobs=jobs)
    wall = time.perf_counter() - t0
    for spec, (model, stats) in zip(specs, trained, strict=True):
        meta = {"seed": str(spec.seed), "data_seed": str(spec.data_seed), "train": json.dumps(stats)}
        save_model(model, out / f"{spec.cfg.name}.safetensors", meta)
    log(f"trained {len(specs)} models in {wall:.0f} s ({jobs} worker process(es), 1 thread each)")
    return report_familial(
        out,
        [s.cfg.name for s in specs],
        run={"seed": seed, "steps_arg": steps, "jobs": jobs, "train_wall_s": wall},
        log=log,
    )


def report_familial(
    out: Path = WEIGHTS_DIR,
    names: Sequence[str] | None = None,
    run: dict[str, Any] | None = None,
    heldout_n: int = 3000,
    tune_n: int = 2000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the models saved in ``out`` (held-out seed), tune relay thresholds (tuning seed),
    and write ``metrics.json`` and ``MODEL_CARD.md``."""
    from safetensors import safe_open

    from .familial import load_model

    out = Path(out)
    torch.set_num_threads(1)
    names = list(names or ["familial", *sorted(p.stem for p in out.glob("peer-*.safetensors"))])
    old = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    run = run or {k: old.get(k) for k in ("seed", "steps_arg", "jobs", "train_wall_s")}
    heldout = T.generate_tasks(heldout_n, T.SEEDS["heldout"])
    tune = T.generate_tasks(tune_n, T.SEEDS["tune"])
    metrics: dict[str, Any] = {**run, "seeds": dict(T.SEEDS), "heldout_n": heldout_n, "tune_n": tune_n, "models": {}}
    evals: dict[str, dict[str, Any]] = {}
    models: dict[str, FamilialModel] = {}
    for name in names:
        path = out / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        model = models[name] = load_model(path)
        ev = evals[name] = evaluate(model, heldout)
        metrics["models"][name] = {
            "config": json.loads(model.cfg.to_json()),
            "params": model.num_parameters(),
            "seed": int(meta.get("seed", -1)),
            "data_seed": int(meta.get("data_seed", -1)),
            "train": json.loads(meta.get("train", "{}")),
            "file_bytes": path.stat().st_size,
            "heldout": {
                k: {
                    "depth": v["depth"],
                    "accuracy": v["accuracy"],
                    "by_level": {str(a): b for a, b in v["by_level"].items()},
                }
                for k, v in ev["exits"].items()
            },
        }
        log(f"{name}:\n{summary(ev)}")
    fam = models["familial"]
    exit_keys = [f"familial/{n}" for n in fam.cfg.exit_names]
    correct = dict(zip(exit_keys, evals["familial"]["correct"], strict=True))
    peers = [n for n in names if n != "familial"]
    for name in peers:
        correct[name] = evals[name]["correct"][-1]
    keys = list(correct)
    metrics["error_overlap"] = {
        f"{a} vs {b}": error_overlap(correct[a], correct[b]) for i, a in enumerate(keys) for b in keys[i + 1 :]
    }
    members = [exit_keys[-1], *peers]
    metrics["ensemble_members"] = members
    metrics["any_member_right"] = sum(any(correct[m][i] for m in members) for i in range(heldout_n)) / heldout_n
    tuned = tune_thresholds(fam, tune)
    metrics["tuned"] = tuned
    metrics["relay"] = relay_report(fam, heldout, tuned["thresholds"])
    if tuned.get("accuracy_first"):
        metrics["relay_accuracy_first"] = relay_report(fam, heldout, tuned["accuracy_first"]["thresholds"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    write_model_card(out, metrics)
    log(f"metrics and model card written to {out}")
    return metrics


train_app = typer.Typer(help="Train the shipped models.", no_args_is_help=True)


@train_app.callback()
def _train_group() -> None:
    """Train the shipped models (a group, so ``aiflow train familial`` keeps its subcommand)."""


@train_app.command("familial")
def familial_cmd(
    seed: Annotated[int, typer.Option(help="base seed (init, data order; peers offset it)")] = 0,
    steps: Annotated[int | None, typer.Option(help="training steps per model (default: the shipped recipe)")] = None,
    out: Annotated[Path, typer.Option(help="where to write *.safetensors, metrics.json, MODEL_CARD.md")] = WEIGHTS_DIR,
    peers: Annotated[int, typer.Option(help="independent peers to train beside the family")] = 2,
    jobs: Annotated[int, typer.Option(help="models trained at once (one thread each; same result)")] = 2,
    report_only: Annotated[
        bool, typer.Option(help="only re-evaluate the weights in --out and rewrite the card")
    ] = False,
) -> None:
    """Train the familial model and its peers; reproduces the shipped weights with the defaults."""
    if report_only:
        report_familial(out)
        return
    train_familial(seed=seed, steps=steps, out=out, peers=peers, jobs=jobs)


@train_app.command("exits")
def exits_cmd(
    model: Annotated[str, typer.Option(help="catalog model (a splittable family: llama, qwen2)")] = "smollm2-135m",
    layers: Annotated[str, typer.Option(help="exit layers, comma-separated")] = "10,20",
    steps: Annotated[int, typer.Option(help="distillation steps")] = 400,
    sequences: Annotated[int, typer.Option(help="self-generated training sequences")] = 256,
    bench_items: Annotated[int, typer.Option(help="items per benchmark for the card's accuracy")] = 120,
    seed: Annotated[int, typer.Option(help="sampling and training seed")] = 0,
    out: Annotated[Path, typer.Option(help="folder for exits-<model>.safetensors and its card")] = WEIGHTS_DIR,
    relay_only: Annotated[
        bool, typer.Option(help="only measure the relay (exit or shipped states) with the exits in --out")
    ] = False,
) -> None:
    """Early exits for a real LM by self-distillation; reproduces the shipped exits with the defaults."""
    from .exits import EXITS_FILE, ExitRecipe, build_exits, report_relay, write_exit_card

    if relay_only:
        report_relay(out / EXITS_FILE.format(name=model), bench_items=bench_items)
        return

    recipe = ExitRecipe(
        model=model,
        layers=tuple(int(k) for k in layers.split(",")),
        steps=steps,
        sequences=sequences,
        bench_items=bench_items,
        seed=seed,
    )
    exits, info = build_exits(recipe)
    weights = exits.save(out / EXITS_FILE.format(name=model))
    info["total_layers"] = num_layers_of(model)
    exits.save(weights)  # again, with the layer count in the metadata
    card = write_exit_card(out / f"exits-{model}.md", exits, weights)
    (out / f"exits-{model}.json").write_text(json.dumps(info, indent=1) + "\n")
    typer.echo(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB), {card}")
    report_relay(weights, bench_items=bench_items)


def num_layers_of(model: str) -> int:
    from . import catalog

    folder = catalog.fetch(model)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return int(text["num_hidden_layers"])


if __name__ == "__main__":
    train_app()
