"""Agents serving the familial model's exits (device / edge / cloud) and its independent peers.

Relay: an agent that is not confident enough (``confidence < threshold``) and has a ``next``
agent ships its trunk state after its own depth ``k`` (all positions) as a latent envelope;
the next agent continues from layer ``k`` (:meth:`FamilialModel.continue_from`) without
recomputing the trunk. Because one forward pass over prompt + answer slots yields the whole
answer, those hidden states are all the next exit needs: the relayed answer equals the deep exit
run on one machine (exactly with ``encoding=float32``; float16/bfloat16/int8 add rounding).

Wire format of the latent: the ``(1, T, D)`` state as a tensor of role
``hidden_state`` in ``FeatureSpace(family, model, layer=k, hidden_size, tokenizer)``, encoded by
:mod:`protocols.compress` (SPEC §17) in ``float16`` | ``bfloat16`` | ``float32`` (one part) or
``int8-rowwise`` (an int8 head part of role ``other`` and its float32 scales part), or ``text``: no
latent at all, the next exit recomputes from the prompt.

The request text still carries the prompt, so a receiver that cannot use the latent can answer
from text. Replies carry ``meta.answer``, ``meta.confidence``, ``meta.cost``, and for relays
``meta.answered_by``, ``meta.exit`` and ``meta.hops`` (one record per hop with its
``latent_bytes`` and ``frame_bytes``), so evaluations can report bytes per hop.

Config (keyword or ``?key=value`` on ``aiflow node --agent``): ``model`` (shipped name, default
``familial``) or ``path`` (a safetensors file), ``exit`` (name or index), ``next`` (agent id),
``threshold`` (min confidence to answer here; default: the thresholds tuned for the shipped family
in weights/metrics.json), ``encoding`` (wire encoding), ``timeout``, ``threads``, ``temperature``
(0 = greedy, the default) and ``seed`` (as for the ``hf`` agent).
Per request, ``meta.threshold``, ``meta.encoding``, ``meta.temperature`` and ``meta.seed`` override the
agent's own. With a temperature above 0 each answer digit is drawn from the exit's tempered digit
distribution with a generator seeded by ``seed`` (the same seed gives the same answer), so a
self-ensemble of one member is a real baseline; ``meta.confidence`` is then the lowest probability
(untempered) of the digits drawn, as it is the lowest top probability when decoding greedily.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch

from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, TextPart, encode
from protocols import compression as C
from protocols import ops as O

from ..agent import Accepts, Agent, AgentContext, Reply
from ..errors import AgentError, RemoteAgentError
from ..forwarding import accepts_confidence
from .familial import (
    ALPHABET,
    DIGITS,
    FamilialModel,
    load_model,
    load_shipped,
    shipped_thresholds,
)
from .tasks import answer_from_target, canonical_prompt, extract_expression

#: Used when neither the config nor the shipped metrics give a threshold.
FALLBACK_THRESHOLD = 0.9
#: The "encoding" that relays no latent: the next exit gets the prompt and recomputes the trunk (cheaper than
#: shipping hidden states whenever the link is slower than the layers it would save).
TEXT = "text"


class FamilialAgent(Agent):
    """One exit of a familial model; relays its trunk state to ``next`` when not confident."""

    type_name = "familial"
    #: The keys of the module doc; any other is refused before the model loads.
    config_keys = (
        *("model", "path", "exit", "next", "threshold", "encoding"),
        *("timeout", "threads", "temperature", "seed"),
    )
    default_model: ClassVar[str] = "familial"
    default_exit: ClassVar[str | int] = -1

    def __init__(self, agent_id: str | None = None, **config: Any) -> None:
        super().__init__(agent_id, **config)
        cfg = self.config
        self.model: FamilialModel = (
            load_model(cfg["path"]) if cfg.get("path") else load_shipped(str(cfg.get("model", self.default_model)))
        )
        mc = self.model.cfg
        self.exit = mc.exit_index(cfg.get("exit", self.default_exit))
        self.exit_name = mc.exit_names[self.exit]
        self.depth = mc.exits[self.exit]
        self.next: str | None = cfg.get("next") or None
        tuned = shipped_thresholds() if mc.name == "familial" else {}
        default_threshold = tuned.get(self.exit_name, FALLBACK_THRESHOLD) if self.next else 0.0
        self.threshold = float(cfg.get("threshold", default_threshold))
        self.encoding = str(cfg.get("encoding", "float16"))
        if (self.encoding not in C.ENCODINGS or self.encoding == C.TOPK) and self.encoding != TEXT:
            raise ValueError(f"encoding must be one of {C.PLAIN}, {C.INT8_ROWWISE} or {TEXT!r}")
        self.timeout = float(cfg.get("timeout", 30.0))
        self.temperature = float(cfg.get("temperature", 0.0))
        self.seed = int(cfg.get("seed", 0))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        torch.set_num_threads(int(cfg.get("threads", 1)))
        self.space = FeatureSpace(
            family=mc.family, model=mc.name, layer=self.depth, hidden_size=mc.d_model, tokenizer=mc.tokenizer
        )
        self.accepts = Accepts(
            text=True,
            spaces=(FeatureSpace(family=mc.family, hidden_size=mc.d_model, tokenizer=mc.tokenizer),),
            roles=(TensorRole.HIDDEN_STATE,),
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": self.model.cfg.name,
            "exit": self.exit_name,
            "depth": self.depth,
            "next": self.next,
            "threshold": self.threshold,
            "temperature": self.temperature,
        }

    # -- ops --------------------------------------------------------------------------------
    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        op = O.op_of(request.meta)
        if op == O.Op.SCORE:
            return self._score(request)
        if op == O.Op.NEXT:
            return self._next(request)
        return await self._generate(request, ctx)

    def _prompt(self, request: Envelope) -> str:
        text = request.text.strip()
        if not text:
            raise AgentError("send the expression as text", code="no_prompt")
        try:
            return canonical_prompt(extract_expression(text))
        except ValueError as e:
            raise AgentError(str(e), code="bad_prompt") from None

    def _score(self, request: Envelope) -> Reply:
        cands = request.meta.get(O.CANDIDATES)
        if not isinstance(cands, list) or not cands:
            raise AgentError("score needs meta.candidates (a list of answers)", code="bad_request")
        scores = self.model.score(self._prompt(request), [str(c) for c in cands], self.exit)
        w = self.model.cfg.answer_width
        meta = {
            O.SCORES: [s if s != float("-inf") else -1e30 for s in scores],
            O.TOKEN_COUNTS: [w] * len(cands),
            O.COST: self._cost(self.depth).model_dump(),
            "exit": self.exit_name,
        }
        return request.reply(sender=self.agent_id, meta=meta)

    def _next(self, request: Envelope) -> Reply:
        prefix = str(request.meta.get(O.PREFIX, ""))
        try:
            dist = self.model.next_distribution(self._prompt(request), prefix, self.exit)
        except ValueError as e:
            raise AgentError(str(e), code="bad_request") from None
        part = TensorPart(
            tensor=dist,
            role=TensorRole.TOKEN_DISTRIBUTION,
            space=self.space,
            meta={"vocab": ALPHABET, "position": len(prefix), "token_order": "lowest-digit-first"},
        )
        meta = {
            O.COST: self._cost(self.depth).model_dump(),
            "exit": self.exit_name,
            # what a latent-averaging pattern needs to turn the averaged token back into text
            O.TOKENS: {str(i): ALPHABET[i] for i in self.model.tok.digit_ids},
            O.EOS_ID: None,
            O.LAST_STEP: len(prefix) >= self.model.cfg.answer_width - 1,
            O.ANSWER_ORDER: "reversed",
        }
        return request.reply(part, sender=self.agent_id, meta=meta)

    def _cost(self, layers: int, calls: int = 1) -> O.Cost:
        t = self.model.cfg.seq_len
        return O.Cost(model_calls=calls, layers=layers * t, tokens=t, depth=layers)

    async def _generate(self, request: Envelope, ctx: AgentContext) -> Reply:
        t0 = time.perf_counter()
        prompt = self._prompt(request)
        latent = unpack_latent(request, self.model)
        if latent is not None:
            hidden, layer = latent
            if layer > self.depth:
                raise AgentError(
                    f"latent from layer {layer} is deeper than this exit (depth {self.depth})", code="unsupported_input"
                )
        else:
            hidden, layer = self.model.embed(self.model.encode_prompts([prompt])), 0
        with torch.no_grad():
            logits, h = self.model.continue_from(hidden, layer, self.exit)
            dec = self.model.decode_logits(logits, h)
        answer, conf = self._pick(dec.probs[0], dec.answers[0], float(dec.confidence[0]), request)
        ran = self.depth - layer
        threshold = float(request.meta.get("threshold", self.threshold))
        here = {
            "agent": self.agent_id,
            "exit": self.exit_name,
            "from_layer": layer,
            "to_layer": self.depth,
            "answer": answer,
            "confidence": conf,
            "ms": round((time.perf_counter() - t0) * 1000, 3),
        }
        peers = request.meta.get(O.PEERS)
        if peers and latent is None:
            answer, conf = self._reconsider(prompt, answer, conf, peers)
            here.update({"answer": answer, "confidence": conf, "reconsidered": True})
        if self.next is None or conf >= threshold:
            meta = self._answer_meta(answer, conf, self._cost(ran), [here], request)
            parts: list[TextPart | TensorPart] = [TextPart(text=answer)]
            parts += self._returns(request, dec.probs[0], h)
            encoding = str(request.meta.get("encoding", self.encoding))
            if self.next is None and encoding != TEXT and not accepts_confidence(request, conf):
                # A topology cascade will escalate this answer: hand the next stage our trunk state
                # so it continues from here instead of recomputing (the node forwards these parts).
                # With encoding "text" the next stage gets the prompt only and recomputes.
                parts += pack_latent(h, self.space, encoding)
            return request.reply(*parts, sender=self.agent_id, meta=meta)
        return await self._forward(request, ctx, prompt, h, here, ran)

    async def _forward(
        self, request: Envelope, ctx: AgentContext, prompt: str, h: torch.Tensor, here: dict[str, Any], ran: int
    ) -> Reply:
        assert self.next is not None
        encoding = str(request.meta.get("encoding", self.encoding))
        parts = [] if encoding == TEXT else pack_latent(h, self.space, encoding)
        meta = {O.OP: O.Op.GENERATE.value, "encoding": encoding, "relay_from": self.agent_id}
        for key in ("threshold", O.RETURN, "temperature", "seed"):
            if key in request.meta:
                meta[key] = request.meta[key]
        fwd = Envelope.request(prompt, *parts, sender=self.agent_id, meta=meta, trace_id=request.trace_id)
        here["latent_bytes"] = sum(p.nbytes for p in parts)
        here["frame_bytes"] = len(encode(fwd))
        here["encoding"] = encoding
        here["sent_to"] = self.next
        try:
            reply = await ctx.request(self.next, fwd, timeout=self.timeout)
        except RemoteAgentError as e:
            raise AgentError(f"relay to {self.next} failed: {e}", code="relay_failed", retryable=True) from e
        rm = reply.meta
        hops = [here, *rm.get("hops", [])]
        cost = self._cost(ran).add(O.Cost(**rm.get(O.COST, {})))
        cost = O.Cost(**{**cost.model_dump(), "depth": ran + int(rm.get(O.COST, {}).get("depth", 0))})
        meta = self._answer_meta(
            str(rm.get(O.ANSWER, reply.text)), float(rm.get(O.CONFIDENCE, 0.0)), cost, hops, request
        )
        meta["answered_by"] = rm.get("answered_by", reply.sender)
        meta["exit"] = rm.get("exit")
        return request.reply(*reply.parts, sender=self.agent_id, meta=meta)

    def _pick(self, probs: torch.Tensor, greedy: str, greedy_conf: float, request: Envelope) -> tuple[str, float]:
        """The greedy answer, or with ``temperature > 0`` one drawn digit by digit (seeded) from the
        tempered distribution ``probs`` (W, 10); confidence: the lowest probability of a digit drawn."""
        raw_t, raw_seed = request.meta.get("temperature"), request.meta.get("seed")
        try:
            temp = self.temperature if raw_t is None else float(raw_t)
            seed = self.seed if raw_seed is None else int(raw_seed)
        except (TypeError, ValueError):
            raise AgentError("meta.temperature must be a number and meta.seed an integer", code="bad_request") from None
        if not temp > 0:  # 0, absent (or NaN): greedy
            return greedy, greedy_conf
        gen = torch.Generator().manual_seed(seed)
        weights = probs.float().clamp_min(1e-30).log().div(temp).softmax(-1)
        idx = torch.multinomial(weights, 1, generator=gen).squeeze(-1)  # (W,) one draw per answer digit
        chosen = probs.gather(-1, idx[:, None]).squeeze(-1)
        answer = answer_from_target("".join(DIGITS[int(j)] for j in idx))
        return answer, float(chosen.min())

    def _reconsider(self, prompt: str, answer: str, conf: float, peers: list[dict[str, Any]]) -> tuple[str, float]:
        """Debate / mixture-of-agents for a model that cannot read prose: weigh its own answer against
        the peers' by its own likelihood of each, and keep the most likely one."""
        cands = list(dict.fromkeys([answer, *[str(p.get(O.ANSWER)) for p in peers if p.get(O.ANSWER) is not None]]))
        cands = [c for c in cands if c.strip().isdigit()] or [answer]
        if len(cands) == 1:
            return answer, conf
        scores = self.model.score(prompt, cands, self.exit)
        best = max(range(len(cands)), key=lambda i: (scores[i], i == 0))
        if cands[best] == answer:
            return answer, conf
        per_digit = math.exp(scores[best] / self.model.cfg.answer_width)
        return cands[best], float(per_digit)

    def _answer_meta(
        self, answer: str, conf: float, cost: O.Cost, hops: list[dict[str, Any]], request: Envelope
    ) -> dict[str, Any]:
        return {
            O.ANSWER: answer,
            O.CONFIDENCE: conf,
            O.COST: cost.model_dump(),
            "answered_by": self.agent_id,
            "exit": self.exit_name,
            "hops": hops,
            "bytes_per_hop": [hp["latent_bytes"] for hp in hops if "latent_bytes" in hp],
        }

    def _returns(self, request: Envelope, probs: torch.Tensor, h: torch.Tensor) -> list[TensorPart]:
        want = request.meta.get(O.RETURN) or []
        out: list[TensorPart] = []
        if "distribution" in want:
            dist = torch.zeros(probs.shape[0], self.model.tok.vocab_size)
            dist[:, self.model.digit_ids] = probs
            out.append(
                TensorPart(
                    tensor=dist,
                    role=TensorRole.TOKEN_DISTRIBUTION,
                    space=self.space,
                    meta={"vocab": ALPHABET, "token_order": "lowest-digit-first"},
                )
            )
        if "hidden" in want:
            out.append(
                TensorPart(tensor=h.detach().float().contiguous(), role=TensorRole.HIDDEN_STATE, space=self.space)
            )
        return out


def pack_latent(hidden: torch.Tensor, space: FeatureSpace, encoding: str = "float16") -> list[TensorPart]:
    """The tensor parts that carry ``hidden`` (see the module docstring for the format)."""
    meta = {"positions": "all", "layout": "prompt,=,answer-slots"}
    return C.pack(hidden, encoding, role=TensorRole.HIDDEN_STATE, space=space, meta=meta)


def unpack_latent(envelope: Envelope, model: FamilialModel) -> tuple[torch.Tensor, int] | None:
    """``(float32 hidden states, layer)`` from the first hidden-state part of ``model``'s space,
    or None when the envelope carries none."""
    try:
        parts = [p for p in C.expand(envelope.tensors()) if isinstance(p, TensorPart)]
    except C.CompressionError as e:
        raise AgentError(str(e), code=e.code) from None
    # A cascade may carry several relayed states (one per stage passed): continue from the deepest.
    parts.sort(key=lambda p: -(p.space.layer or 0) if p.space is not None else 0)
    for part in parts:
        if part.role != TensorRole.HIDDEN_STATE or part.space is None:
            continue
        sp, mc = part.space, model.cfg
        if sp.family != mc.family or sp.hidden_size != mc.d_model or sp.tokenizer != mc.tokenizer:
            continue
        if sp.model is not None and sp.model != mc.name:
            raise AgentError(
                f"latent from model {sp.model!r} cannot continue in {mc.name!r} (different trunk)",
                code="unsupported_input",
            )
        if sp.layer is None:
            raise AgentError("hidden_state part without a layer in its feature space", code="unsupported_input")
        if tuple(part.shape[1:]) != (mc.seq_len, mc.d_model):
            raise AgentError(
                f"latent shape {part.shape} does not match (1, {mc.seq_len}, {mc.d_model})", code="unsupported_input"
            )
        return part.tensor.float(), int(sp.layer)
    return None


class FamilialDeviceAgent(FamilialAgent):
    """The shallowest exit (runs on the device)."""

    type_name = "familial-device"
    default_exit = "device"


class FamilialEdgeAgent(FamilialAgent):
    type_name = "familial-edge"
    default_exit = "edge"


class FamilialCloudAgent(FamilialAgent):
    type_name = "familial-cloud"
    default_exit = "cloud"


class FamilialPeerAgent(FamilialAgent):
    """An independently trained peer (own seed / width / depth) at its deepest exit: a diverse
    ensemble member that shares the family's tokenizer (so distributions can be averaged) but not
    its trunk (so it never consumes the family's latents)."""

    type_name = "familial-peer"
    default_model = "peer-a"
    default_exit = -1
