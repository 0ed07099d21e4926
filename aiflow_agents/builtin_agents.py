"""Built-in agents for tests and demos; registered through the same entry-point group as plugins."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, TextPart, ops
from protocols import compression as C

from .agent import Accepts, Agent, AgentContext, Reply
from .errors import AgentError


class EchoAgent(Agent):
    """Answers with exactly what it was sent, latents included (useful for transport checks)."""

    type_name = "echo"
    accepts = Accepts(text=True, any_space=True)
    config_keys = ()

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

    Speculative decoding (``draft``, ``verify_tokens``; OPS.md §3.8, §3.9), exactly, without a model:

    - ``sequence``: token ids (a list, or ``5,6,7,2`` on the CLI), the greedy continuation of any
      prompt: after ``g`` generated tokens the next one is ``sequence[g]`` (``eos`` once it runs
      out). ``g`` counts the session's positions beyond its prompt. The prompt length is recorded
      when the agent tokenises a prompt (``draft``: UTF-8 bytes of the text as ids) and, for a session
      first seen with ``start`` 0 and ``tokens`` (a verifier's first round, a restart), inferred:
      the settled tokens minus their longest suffix that is a prefix of ``sequence`` (so a prompt
      must not itself end with such a prefix). Without ``sequence`` both ops answer ``unsupported_op``.
    - ``eos``: the end-of-sequence id (default: the last element of ``sequence``)
    - ``wrong_every``: n > 0 makes a drafter propose the n-th, 2n-th, ... token of the continuation
      wrong (+1), with probability ``wrong_confidence`` (default 0.5; right ones: ``confidence``)
    - ``exit_layer``: the drafter drafts from this early exit (reply ``layer``) and can ship its hidden
      states (``ship_hidden``: shape ``[positions, hidden_size]``, row = token id + arange/hidden_size);
      ``num_layers`` (default 4): the model's depth, for ``cost.layers`` and the verifier's layer check;
      ``hidden_size`` (default 4)
    - ``sessions``: sessions kept (LRU, default 8); a forgotten one answers ``unknown_session``
    """

    type_name = "scripted"
    accepts = Accepts(text=True, any_space=True)
    #: The keys above; any other is refused (``scripted:s2?answr=4`` fails at start, naming ``answer``).
    config_keys = (
        *("answer", "answers", "rules", "follow_majority", "confidence", "delay", "hang", "fail", "crash"),
        *("crash_after", "fail_on", "scores", "judge_pick", "accept_answers", "vocab", "dist", "space"),
        *("sequence", "eos", "wrong_every", "wrong_confidence", "exit_layer", "num_layers", "hidden_size"),
        "sessions",
    )

    def __init__(self, agent_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(agent_id, **kwargs)
        self._spec = _SpecConfig.from_config(self.config)  # a malformed key fails at start, not mid-run
        self._sessions: OrderedDict[str, _Held] = OrderedDict()

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
        if op == ops.Op.DRAFT:
            return self._draft(request, base, confidence)
        if op == ops.Op.VERIFY_TOKENS:
            return self._verify_tokens(request, base)
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

    # -- speculative decoding: sessions of token ids, the continuation read from ``sequence`` --------
    def _seq(self, op: ops.Op) -> tuple[tuple[int, ...], int]:
        spec = self._spec
        if spec.sequence is None:
            raise AgentError(f"{self.agent_id} has no sequence configured for {op.value!r}", code="unsupported_op")
        return spec.sequence, spec.eos if spec.eos is not None else spec.sequence[-1]

    def _greedy(self, held: _Held, positions: int) -> int:
        """The scripted model's argmax after the session's first ``positions`` tokens."""
        seq, eos = self._seq(ops.Op.DRAFT)
        g = positions - held.prompt
        return seq[g] if 0 <= g < len(seq) else eos

    def _open(self, session: str, start: int, settled: list[int] | None) -> _Held:
        """The session with its first ``start`` positions kept (OPS.md §3.8). ``settled``: the settled
        tokens of a request at ``start`` 0, from which a new session's prompt length is inferred."""
        held = self._sessions.get(session)
        if start == 0:
            held = _Held(prompt=self._prompt_length(settled or []))
            self._sessions[session] = held
        elif held is None or len(held.tokens) < start:
            have = "does not hold it" if held is None else f"holds {len(held.tokens)} positions"
            raise AgentError(
                f"session {session!r}: {self.agent_id} {have}, the request relies on {start}; restart from 0",
                code="unknown_session",
            )
        del held.tokens[start:]  # rejected draft tokens
        self._sessions.move_to_end(session)
        while len(self._sessions) > self._spec.sessions:
            self._sessions.popitem(last=False)
        return held

    def _prompt_length(self, settled: list[int]) -> int:
        seq = self._spec.sequence or ()
        for m in range(min(len(seq), len(settled) - 1), 0, -1):  # the longest generated suffix
            if settled[-m:] == list(seq[:m]):
                return len(settled) - m
        return len(settled)

    def _decode(self, ids: list[int], eos: int) -> str:
        """The trivial tokenizer's inverse: ids below 256 are UTF-8 bytes; the end-of-sequence id is dropped."""
        return bytes(t for t in ids if t < 256 and t != eos).decode("utf-8", "replace")

    def _draft(self, request: Envelope, base: dict[str, Any], confidence: float) -> Reply:
        seq, eos = self._seq(ops.Op.DRAFT)
        m = _checked(request, ops.DraftRequest)
        spec = self._spec
        if m.ship_hidden and spec.exit_layer is None:
            raise AgentError("ship_hidden needs a drafter with an exit (config exit_layer)", code="bad_request")
        if m.ship_hidden and m.encoding not in HIDDEN_ENCODINGS:
            raise AgentError(
                f"encoding {m.encoding!r}: hidden states travel as {', '.join(HIDDEN_ENCODINGS)}",
                code="unsupported_encoding",
            )
        prompt: list[int] | None = None
        new = list(m.tokens)
        if m.start == 0 and not new:
            if not request.text:
                raise AgentError("draft at start 0 without tokens needs the prompt as text", code="no_prompt")
            prompt = new = list(request.text.encode("utf-8"))
        elif not new:
            raise AgentError("draft needs new tokens (or, at start 0, a prompt)", code="bad_request")
        held = self._open(m.session, m.start, None if prompt is not None else new)
        if prompt is not None:
            held.prompt = len(prompt)  # tokenised here: the prompt length is known, not inferred
        held.tokens += new
        drafts: list[int] = []
        confidences: list[float] = []
        ended = False
        for _ in range(m.gamma):
            g = len(held.tokens) + len(drafts) - held.prompt
            token, p = (seq[g] if 0 <= g < len(seq) else eos), confidence
            if spec.wrong_every and (g + 1) % spec.wrong_every == 0:
                token, p = token + 1, spec.wrong_confidence
            drafts.append(token)
            confidences.append(p)
            if token == eos:
                ended = True
                break
            if p < m.min_confidence:
                break
        ran = new + drafts[:-1]  # the last draft token is proposed, not run
        held.tokens += drafts[:-1]
        layers = spec.exit_layer if spec.exit_layer is not None else spec.num_layers
        cost = ops.Cost(tokens=len(ran), layers=len(ran) * layers).model_dump()
        meta: dict[str, Any] = {
            **base,
            ops.COST: {**cost, "forward_passes": len(drafts)},
            ops.DRAFT_TOKENS: drafts,
            "confidences": confidences,
            ops.PROCESSED: len(held.tokens),
            "eos": ended,
        }
        if prompt is not None:
            meta[ops.PROMPT_TOKENS] = prompt
        if spec.exit_layer is not None:
            meta[ops.LAYER] = spec.exit_layer
        parts: list[TextPart | TensorPart] = [TextPart(text=self._decode(drafts, eos))]
        if m.ship_hidden:
            import torch  # only the ops that build tensors need it

            h = spec.hidden_size
            states = torch.tensor(ran, dtype=torch.float32)[:, None] + torch.arange(h, dtype=torch.float32) / h
            space = FeatureSpace.from_str(str(self.config.get("space", "scripted~scripted-vocab")))
            space = space.model_copy(update={"layer": spec.exit_layer, "hidden_size": h})
            parts += C.pack(states, m.encoding, role=TensorRole.HIDDEN_STATE, space=space)
        return request.reply(*parts, sender=self.agent_id, meta=meta)

    def _verify_tokens(self, request: Envelope, base: dict[str, Any]) -> Reply:
        _, eos = self._seq(ops.Op.VERIFY_TOKENS)
        m = _checked(request, ops.VerifyTokensRequest)
        spec = self._spec
        settled = len(m.tokens) - m.draft
        if settled < 1:
            msg = "verify_tokens: a draft needs a settled token before it (draft < len(tokens))"
            raise AgentError(msg, code="bad_request")
        try:
            tensors = [p for p in C.expand(request.parts) if isinstance(p, TensorPart)]
        except C.CompressionError as e:
            raise AgentError(str(e), code=e.code) from None
        ran, layers, layer = len(m.tokens), spec.num_layers, None
        if tensors:
            hidden = tensors[0]
            if len(tensors) > 1 or hidden.role != TensorRole.HIDDEN_STATE or hidden.tensor.ndim != 2:
                msg = "verify_tokens takes one hidden_state part of shape [positions, hidden]"
                raise AgentError(msg, code="bad_request")
            layer = m.layer if m.layer is not None else (hidden.space.layer if hidden.space is not None else None)
            if layer is None or not 1 <= layer < spec.num_layers:
                msg = f"hidden states need a layer in 1..{spec.num_layers - 1}, got {layer}"
                raise AgentError(msg, code="bad_request")
            ran, layers = int(hidden.tensor.shape[0]), spec.num_layers - layer
            if not 1 <= ran <= len(m.tokens):
                raise AgentError(f"{ran} rows of hidden states for {len(m.tokens)} tokens", code="bad_request")
        held = self._open(m.session, m.start, list(m.tokens[:settled]))
        before = len(held.tokens)
        preds = [self._greedy(held, before + i + 1) for i in range(ran)]  # after each position run
        accept, nxt, ended = 0, None, False
        for j in range(m.draft):
            i = settled + j - 1  # the position whose prediction this draft token must equal
            if i >= ran:  # the hidden states ended before it: the drafter runs it next round
                break
            if preds[i] != m.tokens[settled + j]:
                nxt = preds[i]  # correction
                break
            accept += 1
            if m.tokens[settled + j] == eos:
                ended = True
                break
        else:
            if len(m.tokens) <= ran:
                nxt = preds[-1]  # bonus: the verifier ran the last draft token too
        ended = ended or nxt == eos
        held.tokens += m.tokens[: min(ran, settled + accept)]  # settled positions only
        cost = ops.Cost(tokens=ran, layers=ran * layers).model_dump()
        meta: dict[str, Any] = {
            **base,
            ops.COST: {**cost, "forward_passes": 1, "positions": ran},
            ops.ACCEPT: accept,
            ops.NEXT_TOKEN: nxt,
            "eos": ended,
            ops.PROCESSED: len(held.tokens),
        }
        if layer is not None:
            meta[ops.LAYER] = layer
        text = self._decode(list(m.tokens[settled : settled + accept]) + ([nxt] if nxt is not None else []), eos)
        return request.reply(text, sender=self.agent_id, meta=meta)


#: Encodings a drafter's hidden states travel in (SPEC §17; top-k is for distributions).
HIDDEN_ENCODINGS = ("float32", "float16", "bfloat16", "int8-rowwise")  # SPEC §17 (literal: compress loads torch)


@dataclass(slots=True)
class _Held:
    """One session on a scripted agent: the token ids it has run, and where its prompt ends."""

    prompt: int
    tokens: list[int] = field(default_factory=list)


def _checked(request: Envelope, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(request.meta)
    except ValueError as e:
        raise AgentError(f"{request.meta.get(ops.OP)} request: {e}", code="bad_request") from None


def _ids(value: Any, key: str) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out: list[int] = []
    for x in items:
        if isinstance(x, str) and x.strip().isdigit():
            x = int(x.strip())
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"scripted agent: {key} must be token ids (integers >= 0), got {value!r}")
        out.append(x)
    if not out:
        raise ValueError(f"scripted agent: {key} is empty")
    return tuple(out)


def _int(config: dict[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = config.get(key, default)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"scripted agent: {key} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class _SpecConfig:
    """ScriptedAgent's speculative-decoding keys, checked when the agent is built."""

    sequence: tuple[int, ...] | None = None
    eos: int | None = None
    wrong_every: int = 0
    wrong_confidence: float = 0.5
    exit_layer: int | None = None
    num_layers: int = 4
    hidden_size: int = 4
    sessions: int = 8

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _SpecConfig:
        raw = config.get("sequence")
        sequence = None if raw is None else _ids(raw, "sequence")
        eos = None if config.get("eos") is None else _ids(config["eos"], "eos")
        if eos is not None and len(eos) != 1:
            raise ValueError(f"scripted agent: eos must be one token id, got {config['eos']!r}")
        wrong = float(config.get("wrong_confidence", 0.5))
        if not 0.0 <= wrong <= 1.0:
            raise ValueError(f"scripted agent: wrong_confidence must lie in [0, 1], got {wrong}")
        num_layers = _int(config, "num_layers", 4, 2)
        exit_layer = _int(config, "exit_layer", None, 1)
        assert num_layers is not None
        if exit_layer is not None and exit_layer >= num_layers:
            raise ValueError(f"scripted agent: exit_layer must lie below num_layers ({num_layers}), got {exit_layer}")
        return cls(
            sequence=sequence,
            eos=None if eos is None else eos[0],
            wrong_every=_int(config, "wrong_every", 0, 0) or 0,
            wrong_confidence=wrong,
            exit_layer=exit_layer,
            num_layers=num_layers,
            hidden_size=_int(config, "hidden_size", 4, 1) or 4,
            sessions=_int(config, "sessions", 8, 1) or 8,
        )


class TensorStatsAgent(Agent):
    """Consumes any latent and answers with its statistics: proof that tensors crossed intact."""

    type_name = "tensor-stats"
    accepts = Accepts(text=False, any_space=True)
    config_keys = ()

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
