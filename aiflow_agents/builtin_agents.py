"""Built-in agents for tests and demos; registered through the same entry-point group as plugins."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections import Counter
from typing import Any

from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, TextPart, ops

from .agent import Accepts, Agent, AgentContext, Reply
from .errors import AgentError


class EchoAgent(Agent):
    """Answers with exactly what it was sent, latents included (useful for transport checks)."""

    type_name = "echo"
    accepts = Accepts(text=True, any_space=True)

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        return request.reply(*request.parts, sender=self.agent_id, meta=dict(request.meta))


class ScriptedAgent(Agent):
    """A deterministic stand-in for a model, configured by keyword (or ``?key=value`` on the CLI).

    It speaks every op of :mod:`protocols.ops`, so patterns can be tested exactly without models.

    - ``answer``: reply text; ``{text}`` is replaced by the request text (default: ``"{text}"``)
    - ``answers``: dict mapping request text to reply text (overrides ``answer`` when it matches)
    - ``rules``: list of ``[substring, answer]``; the first whose substring occurs in the text wins
    - ``follow_majority``: with ``meta.peers`` present (debate, mixture of agents), answer with the
      most common peer answer (ties: the earliest) instead of the scripted one
    - ``confidence``: reported in ``meta.confidence`` (default 1.0)
    - ``delay``: seconds to wait before answering; ``hang``: never answer
    - ``fail``: raise (code ``scripted_failure``); ``crash``: kill the whole node process (SIGKILL)
    - ``crash_after``: serve this many requests, then SIGKILL the node on the next one
    - ``fail_on``: fail only when the request text contains this string
    - ``scores``: dict answer -> log-likelihood for ``score`` and ``choose`` (default: 0 for its own
      answer, -10 else); ``choose`` picks the best-scored option and sends the softmax as ``probs``
    - ``judge_pick``: the candidate a ``judge`` request returns (default: the majority candidate)
    - ``accept_answers``: answers a ``verify`` request accepts (default: its own answer only)
    - ``vocab`` + ``dist``: a vocabulary and the next-token distribution ``next`` returns for the first
      step (afterwards end-of-sequence, the last vocab entry); ``space``: its feature space
      (``FeatureSpace.from_str`` form)
    """

    type_name = "scripted"
    accepts = Accepts(text=True, any_space=True)

    def _answer(self, request: Envelope) -> str:
        cfg, text = self.config, request.text
        peers = request.meta.get(ops.PEERS)
        if cfg.get("follow_majority") and peers:
            counts = Counter(str(p.get(ops.ANSWER)) for p in peers)
            return max(counts, key=lambda a: (counts[a], -[str(p.get(ops.ANSWER)) for p in peers].index(a)))
        answers: dict[str, Any] = cfg.get("answers") or {}
        if text in answers:
            return str(answers[text])
        for substring, answer in cfg.get("rules") or []:
            if str(substring) in text:
                return str(answer)
        return str(cfg.get("answer", "{text}")).replace("{text}", text)

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        cfg = self.config
        text = request.text
        self._served = getattr(self, "_served", 0) + 1
        if cfg.get("crash") or ("crash_after" in cfg and self._served > int(cfg["crash_after"])):
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.get("hang"):
            await asyncio.Event().wait()
        delay = float(cfg.get("delay", 0) or 0)
        if delay > 0:
            await asyncio.sleep(delay)
        if cfg.get("fail") or (cfg.get("fail_on") and str(cfg["fail_on"]) in text):
            raise AgentError(f"{self.agent_id} was scripted to fail", code="scripted_failure")
        confidence = float(cfg.get("confidence", 1.0))
        base = {"agent": self.agent_id, "node": ctx.node_id, ops.COST: ops.Cost(tokens=len(text)).model_dump()}
        op = ops.op_of(request.meta)
        own = self._answer(request)
        if op == ops.Op.SCORE:
            table: dict[str, float] = cfg.get("scores") or {}
            cands = [str(c) for c in request.meta.get(ops.CANDIDATES, [])]
            scores = [float(table.get(c, 0.0 if c == own else -10.0)) for c in cands]
            return request.reply(sender=self.agent_id, meta={**base, ops.SCORES: scores})
        if op == ops.Op.CHOOSE:  # the options scored as for ``score``; the best one chosen
            table = cfg.get("scores") or {}
            cands = [str(c) for c in request.meta.get(ops.CANDIDATES, [])]
            if len(cands) < 2:
                raise AgentError("choose needs meta.candidates: at least two options", code="bad_request")
            scores = [float(table.get(c, 0.0 if c == own else -10.0)) for c in cands]
            top = max(scores)
            weights = [math.exp(x - top) for x in scores]
            probs = [w / sum(weights) for w in weights]
            pick = max(range(len(cands)), key=lambda i: (scores[i], -i))
            meta = {**base, ops.CHOICE: pick, ops.ANSWER: cands[pick], ops.CONFIDENCE: probs[pick]}
            return request.reply(cands[pick], sender=self.agent_id, meta={**meta, ops.SCORES: scores, ops.PROBS: probs})
        if op == ops.Op.JUDGE:
            cands = [str(c) for c in request.meta.get(ops.CANDIDATES, [])]
            pick = cfg.get("judge_pick")
            if pick is None and cands:
                counts = Counter(cands)
                pick = max(counts, key=lambda a: (counts[a], -cands.index(a)))
            return request.reply(str(pick), sender=self.agent_id, meta={**base, ops.ANSWER: pick})
        if op == ops.Op.VERIFY:
            accepted = [str(a) for a in cfg.get("accept_answers", [own])]
            ok = str(request.meta.get(ops.CANDIDATE)) in accepted
            return request.reply(sender=self.agent_id, meta={**base, ops.ACCEPTED: ok, ops.CONFIDENCE: confidence})
        if op == ops.Op.NEXT:
            return self._next(request, base)
        meta = {**base, ops.CONFIDENCE: confidence, ops.ANSWER: own}
        return request.reply(own, sender=self.agent_id, meta=meta)

    def _next(self, request: Envelope, base: dict[str, Any]) -> Reply:
        vocab = [str(v) for v in self.config.get("vocab") or []]
        if not vocab:
            raise AgentError(f"{self.agent_id} has no vocab configured for 'next'", code="unsupported_op")
        eos = len(vocab) - 1
        if request.meta.get(ops.PREFIX):
            probs = [0.0] * len(vocab)
            probs[eos] = 1.0
        else:
            probs = [float(p) for p in self.config.get("dist") or []]
        space = FeatureSpace.from_str(str(self.config.get("space", "scripted~scripted-vocab")))
        import torch  # only the ops that build tensors need it: a text-only node starts without torch

        part = TensorPart(
            tensor=torch.tensor(probs, dtype=torch.float32), role=TensorRole.TOKEN_DISTRIBUTION, space=space
        )
        meta = {**base, ops.TOKENS: {str(i): v for i, v in enumerate(vocab)}, ops.EOS_ID: eos}
        return request.reply(part, sender=self.agent_id, meta=meta)


class TensorStatsAgent(Agent):
    """Consumes any latent and answers with its statistics: proof that tensors crossed intact."""

    type_name = "tensor-stats"
    accepts = Accepts(text=False, any_space=True)

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        tensors = request.tensors()
        if not tensors:
            raise AgentError("send at least one tensor part", code="no_tensor")
        import torch  # loaded already: the request holds tensors

        lines, rows = [], []
        for i, part in enumerate(tensors):
            t = part.tensor.to(torch.float64)
            mean = t.mean().item() if t.numel() else 0.0
            norm = t.norm().item() if t.numel() else 0.0
            lines.append(f"part {i}: {part.dtype} {list(part.shape)} {part.role} mean={mean:.6g} norm={norm:.6g}")
            rows.append([float(t.numel()), mean, norm])
        stats = TensorPart(
            tensor=torch.tensor(rows, dtype=torch.float64),
            role=TensorRole.OTHER,
            meta={"columns": ["numel", "mean", "norm"]},
        )
        return [TextPart(text="\n".join(lines)), stats]
