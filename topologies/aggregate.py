"""Ways to turn several members' outputs into one answer."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import torch

from protocols import Envelope, TensorPart, TensorRole, compression, ops, vocab_signature

from .graph import GraphError
from .pattern import Outcome, Runtime


class Aggregate(StrEnum):
    VOTE = "vote"
    WEIGHTED = "weighted"  # weights per member, or each vote weighted by its confidence
    JUDGE = "judge"
    CROSS_SCORE = "cross_score"
    LATENT = "latent"  # average token distributions of members sharing a feature space
    AVERAGE = "average"  # average the members' distributions over a multiple-choice item's options
    TOKEN_MIX = "token_mix"  # the same, token by token, for members sharing one tokenizer

    @classmethod
    def parse(cls, value: str | Aggregate) -> Aggregate:
        try:
            return cls(value)
        except ValueError:
            raise GraphError(f"unknown aggregate {value!r}; choose from {', '.join(a.value for a in cls)}") from None


def vote(
    outcomes: Sequence[Outcome], weights: Mapping[str, float] | None = None, *, by_confidence: bool = False
) -> tuple[str | None, dict[str, Any]]:
    """Majority (or weighted) vote over answers. Ties go to the higher summed confidence, then to
    the answer proposed first — deterministic, so runs reproduce."""
    tally: dict[str, float] = defaultdict(float)
    conf: dict[str, float] = defaultdict(float)
    first: dict[str, int] = {}
    for i, o in enumerate(outcomes):
        if not o.ok or o.answer is None:
            continue
        w = (weights or {}).get(o.source, 1.0)
        if by_confidence:
            w *= o.confidence if o.confidence is not None else 0.0
        tally[o.answer] += w
        conf[o.answer] += o.confidence or 0.0
        first.setdefault(o.answer, i)
    if not tally:
        return None, {"votes": {}}
    winner = max(tally, key=lambda a: (tally[a], conf[a], -first[a]))
    return winner, {"votes": dict(tally)}


async def judged(
    rt: Runtime, judge: Any, task: Envelope, proposals: Sequence[Outcome], *, label: str = "judge"
) -> tuple[str | None, dict[str, Any], Outcome]:
    """A judge agent picks among the distinct proposals; if it fails or invents an answer, vote."""
    candidates = list(dict.fromkeys(p.answer for p in proposals if p.ok and p.answer is not None))
    verdict = await rt.judge(judge, task, candidates, label=label)
    if verdict.ok and verdict.answer in candidates:
        return verdict.answer, {"judge": verdict.source, "candidates": candidates}, verdict
    answer, extra = vote(proposals)
    extra["fallback"] = f"vote: judge failed ({verdict.error or 'answer not among candidates'})"
    return answer, extra, verdict


async def cross_score(
    rt: Runtime, scorers: Sequence[Any], task: Envelope, proposals: Sequence[Outcome], *, label: str = "cross-score"
) -> tuple[str | None, dict[str, Any]]:
    """Every scorer scores every distinct proposal by its own log-likelihood; the highest sum wins.
    Works across tokenizers: each member scores in its own. ``details["cost"]`` is what the score
    calls cost (one model call per scorer that answered; nothing when the proposals agree), for the
    caller to add to its own."""
    candidates = list(dict.fromkeys(o.answer for o in proposals if o.ok and o.answer is not None))
    if not candidates:
        return None, {"candidates": [], "scores": {}, "cost": ops.Cost(model_calls=0)}
    if len(candidates) == 1:
        return candidates[0], {
            "candidates": candidates,
            "scores": {},
            "unanimous": True,
            "cost": ops.Cost(model_calls=0),
        }
    meta = {ops.OP: ops.Op.SCORE, ops.CANDIDATES: candidates}
    outs = await rt.ask_many(scorers, task, label=label, meta=meta)  # what rt.score does, keeping the costs
    cost = ops.Cost(model_calls=0)
    per_member: dict[str, list[float] | None] = {}
    for o in outs:
        cost = cost.add(o.cost)
        scores = o.reply.meta.get(ops.SCORES) if (o.reply is not None and o.error is None) else None
        ok = isinstance(scores, list) and len(scores) == len(candidates)
        per_member[o.source] = [float(s) for s in scores] if ok else None  # type: ignore[union-attr]
    usable = {m: s for m, s in per_member.items() if s is not None}
    if not usable:
        winner, _ = vote(proposals)
        return winner, {
            "candidates": candidates,
            "scores": {},
            "fallback": "vote: no member could score",
            "cost": cost,
        }
    totals = [sum(s[i] for s in usable.values()) for i in range(len(candidates))]
    best = max(range(len(candidates)), key=lambda i: (totals[i], -i))
    return candidates[best], {
        "candidates": candidates,
        "scores": usable,
        "totals": totals,
        "failed_scorers": sorted(m for m, s in per_member.items() if s is None),
        "cost": cost,
    }


async def latent_average(
    rt: Runtime, members: Sequence[Any], task: Envelope, *, max_steps: int = 64, quorum: int = 1, label: str = "latent"
) -> tuple[str | None, dict[str, Any]]:
    """Decode together on latents: at each step every member sends its next-token distribution, the
    distributions are averaged, the most probable token is appended for everyone.

    Only members whose distributions live in one feature space (same tokenizer) can be averaged; a
    member from another space is an error, never silently mixed in.
    """
    prefix = ""
    steps: list[dict[str, Any]] = []
    failed: set[str] = set()
    space = None
    reverse = False
    cost = ops.Cost(model_calls=0)
    for _ in range(max_steps):
        last_step = False
        outs = await rt.next_distributions(members, task, prefix, label=f"{label} step {len(steps) + 1}")
        dists: list[torch.Tensor] = []
        tokens: dict[str, str] = {}
        eos: int | None = None
        for o in outs:
            cost = cost.add(o.cost)
            part = _distribution(o.reply) if (o.reply is not None and not o.error) else None
            if part is None:
                failed.add(o.source)
                continue
            # distributions are over a vocabulary: what must match is the tokenizer, not the width
            if space is None:
                space = part.space
            elif part.space is None or space is None or part.space.tokenizer != space.tokenizer:
                raise GraphError(
                    f"latent aggregation needs one tokenizer: {o.source} sent {part.space}, others {space}"
                )
            dists.append(part.tensor.to(torch.float32).reshape(-1))
            tokens.update({str(k): str(v) for k, v in (o.reply.meta.get(ops.TOKENS) or {}).items()})  # type: ignore[union-attr]
            eos = o.reply.meta.get(ops.EOS_ID, eos)  # type: ignore[union-attr]
            last_step = last_step or bool(o.reply.meta.get(ops.LAST_STEP))  # type: ignore[union-attr]
            reverse = reverse or o.reply.meta.get(ops.ANSWER_ORDER) == "reversed"  # type: ignore[union-attr]
        if len(dists) < quorum:
            return (prefix or None), {"steps": steps, "failed": sorted(failed), "error": "quorum lost", "cost": cost}
        if len({d.numel() for d in dists}) != 1:
            raise GraphError("latent aggregation: members sent distributions over different vocabulary sizes")
        avg = torch.stack(dists).mean(0)
        token_id = int(avg.argmax())
        steps.append({"token_id": token_id, "p": round(float(avg[token_id]), 6), "members": len(dists)})
        if eos is not None and token_id == int(eos):
            break
        if str(token_id) not in tokens:
            raise GraphError(f"latent aggregation: chosen token {token_id} is in no member's top tokens")
        prefix += tokens[str(token_id)]
        if last_step:
            break
    answer = prefix[::-1] if reverse else prefix
    details = {"steps": steps, "failed": sorted(failed), "space": str(space) if space else None, "cost": cost}
    return answer.strip(), details


def _distribution(reply: Envelope) -> TensorPart | None:
    """The reply's token distribution, restored when it came top-k or int8 encoded (SPEC §17);
    None when it has none or only in an encoding this pattern does not know."""
    try:
        parts = compression.expand(reply.tensors())
    except compression.CompressionError:
        return None
    return next((p for p in parts if isinstance(p, TensorPart) and p.role == TensorRole.TOKEN_DISTRIBUTION), None)


def average(
    task: Envelope, outcomes: Sequence[Outcome], weights: Mapping[str, float] | None = None
) -> tuple[str | None, float | None, dict[str, Any]]:
    """(answer, its averaged probability, details): a weighted mean of the members' probabilities over
    a multiple-choice item's options (``choose`` replies' ``probs``). Each member scored in its own
    tokenizer, so this mixes models that share nothing but the options; a member without a
    distribution is left out (and named), and with none at all the answers are voted."""
    options = task.meta.get(ops.CANDIDATES)
    if not isinstance(options, list) or not options:
        raise GraphError("aggregate='average' needs a multiple-choice task: meta.candidates lists the options")
    total = [0.0] * len(options)
    mass = 0.0
    used: dict[str, float] = {}
    missing: list[str] = []
    for o in outcomes:
        probs = o.reply.meta.get(ops.PROBS) if (o.ok and o.reply is not None) else None
        if not (isinstance(probs, list) and len(probs) == len(options)):
            missing.append(o.source)
            continue
        w = float((weights or {}).get(o.source, 1.0))
        for i, p in enumerate(probs):
            total[i] += w * float(p)
        mass += w
        used[o.source] = w
    if mass <= 0:
        winner, extra = vote(outcomes)
        return winner, None, {**extra, "without_distribution": missing, "fallback": "vote: no member sent probs"}
    mean = [t / mass for t in total]
    best = max(range(len(options)), key=lambda i: (mean[i], -i))
    return str(options[best]), mean[best], {"probs": mean, "weights": used, "without_distribution": missing}


def token_mix(
    task: Envelope, outcomes: Sequence[Outcome], weights: Mapping[str, float] | None = None
) -> tuple[str | None, float | None, dict[str, Any]]:
    """(answer, its probability, details) under the mixture of the members' token distributions.

    Members that share a tokenizer see each option as the same tokens, so their next-token
    distributions can be mixed at every position (a weighted mean of probabilities), not only their
    verdicts: each option is scored by its mean log-probability per token under that mixture. Only
    the probabilities of the option's own tokens are needed (``choose`` replies' ``token_logprobs``).
    Members with another tokenizer are an error, never silently mixed in."""
    options = task.meta.get(ops.CANDIDATES)
    if not isinstance(options, list) or not options:
        raise GraphError("aggregate='token_mix' needs a multiple-choice task: meta.candidates lists the options")
    usable: list[tuple[str, float, list[list[float]]]] = []
    tokenizer: str | None = None
    missing: list[str] = []
    for o in outcomes:
        meta = o.reply.meta if (o.ok and o.reply is not None) else {}
        lps = meta.get(ops.TOKEN_LOGPROBS)
        if not (isinstance(lps, list) and len(lps) == len(options)):
            missing.append(o.source)
            continue
        tok = meta.get(ops.TOKENIZER)
        tok = vocab_signature(tok) if isinstance(tok, str) else None
        if tokenizer is None:
            tokenizer = tok
        elif tok != tokenizer or tok is None:
            raise GraphError(f"token_mix needs one tokenizer: {o.source} scored in {tok}, others in {tokenizer}")
        if usable and [len(x) for x in lps] != [len(x) for x in usable[0][2]]:
            raise GraphError(f"token_mix: {o.source} split the options into other tokens")
        usable.append((o.source, float((weights or {}).get(o.source, 1.0)), lps))
    mass = sum(w for _, w, _ in usable)
    if not usable or mass <= 0:
        winner, extra = vote(outcomes)
        return winner, None, {**extra, "without_tokens": missing, "fallback": "vote: no member sent token_logprobs"}
    scores = []
    for i in range(len(options)):
        n = len(usable[0][2][i])
        mixed = [math.log(max(1e-300, sum(w * math.exp(lps[i][t]) for _, w, lps in usable) / mass)) for t in range(n)]
        scores.append(sum(mixed) / n if n else -1e9)
    top = max(scores)
    exps = [math.exp(x - top) for x in scores]
    probs = [e / sum(exps) for e in exps]
    best = max(range(len(options)), key=lambda i: (probs[i], -i))
    details = {"probs": probs, "scores": scores, "tokenizer": tokenizer, "weights": {m: w for m, w, _ in usable}}
    return str(options[best]), probs[best], {**details, "without_tokens": missing}
