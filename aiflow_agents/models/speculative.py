"""Speculative decoding, the agents' side: sessions with a KV cache, drafting and verifying.

A drafter proposes tokens (from the whole model, or from an early exit, then optionally shipping
that exit layer's hidden states); a verifier runs a draft once (its whole model on the tokens, or
only the layers above the exit on the shipped states) and says how many stand. Both keep a KV
cache per session, so a round costs only its new positions. The protocol is ``draft`` and
``verify_tokens`` (``protocols/OPS.md`` §3.8-3.9); the pattern that drives it is
``topologies.speculative``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from aiflow_agents.errors import AgentError
from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, compress, decompress, ops

from .exits import FamilialLM, crop_cache, num_layers

M = TypeVar("M", bound=ops.DraftRequest | ops.VerifyTokensRequest)

#: Tokens of already streamed output decoded with each new piece (see ``Speculator._piece``).
_CONTEXT = 8

HIDDEN_ENCODINGS = ("float32", "float16", "bfloat16", "int8-rowwise")


@dataclass
class Session:
    """What one agent ran of one decoding: token ids, and the cache over exactly them."""

    tokens: list[int] = field(default_factory=list)
    cache: Any = None
    prompt: int = 0
    used: float = field(default_factory=time.monotonic)


class Sessions:
    """Bounded LRU of sessions; a forgotten one answers ``unknown_session`` and the requester restarts."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Session] = OrderedDict()

    def open(self, sid: str, start: int, *, on_crop: Callable[[Session, int], None]) -> Session:
        """The session with its first ``start`` positions kept (a new one when ``start`` is 0)."""
        sess = self._items.get(sid)
        if sess is None or start == 0:
            if start != 0:
                raise AgentError(
                    f"session {sid!r} is not held here (start {start}); restart it from 0", code="unknown_session"
                )
            sess = Session()
            self._items[sid] = sess
        elif len(sess.tokens) < start:
            raise AgentError(
                f"session {sid!r} holds {len(sess.tokens)} positions, the request relies on {start}",
                code="unknown_session",
            )
        if len(sess.tokens) > start:
            on_crop(sess, start)
            del sess.tokens[start:]
        sess.used = time.monotonic()
        self._items.move_to_end(sid)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return sess

    def __len__(self) -> int:
        return len(self._items)


def _checked(model: type[M], request: Envelope) -> M:
    """The request's op message, or ``bad_request`` naming the op and what is wrong."""
    try:
        return model.model_validate(request.meta)
    except ValueError as e:
        raise AgentError(f"{request.meta.get(ops.OP)} request: {e}", code="bad_request") from None


def _crop(sess: Session, keep: int) -> None:
    if sess.cache is not None:
        crop_cache(sess.cache, keep)


class Speculator:
    """Drafting and verifying for one loaded causal LM (``hf`` agents delegate both ops here).

    ``exit_layer`` makes it a familial drafter: it runs layers ``< exit_layer`` and reads the
    exit's head. ``prompt_ids`` renders a prompt exactly as the agent's ``generate`` would, so the
    speculative output equals that agent decoding alone.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        space: FeatureSpace,
        eos_ids: set[int],
        prompt_ids: Callable[[str], list[int]],
        familial: FamilialLM | None = None,
        exit_layer: int | None = None,
        sessions: int = 8,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.space = space
        self.eos_ids = eos_ids
        self.prompt_ids = prompt_ids
        self.familial = familial
        self.exit_layer = exit_layer
        self.total = num_layers(model)
        self.drafts = Sessions(sessions)
        self.verifies = Sessions(sessions)

    # -- running positions ----------------------------------------------------------------------
    def _full(self, ids: list[int], cache: Any, *, last_only: bool = False) -> tuple[torch.Tensor, Any]:
        kw = {"logits_to_keep": 1} if last_only else {}  # a drafter reads only the last position
        out = self.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, **kw)
        return out.logits[0].float(), out.past_key_values

    # -- draft ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def draft(self, request: Envelope, agent_id: str) -> Envelope:
        m = _checked(ops.DraftRequest, request)
        if m.ship_hidden and self.exit_layer is None:
            raise AgentError("ship_hidden needs a drafter with an exit (exit_layer)", code="bad_request")
        if m.encoding not in HIDDEN_ENCODINGS:
            raise AgentError(f"encoding must be one of {', '.join(HIDDEN_ENCODINGS)}", code="unsupported_encoding")
        sess = self.drafts.open(m.session, m.start, on_crop=_crop)
        prompt: list[int] | None = None
        new = list(m.tokens)
        if m.start == 0 and not new:
            if not request.text.strip():
                raise AgentError("draft at start 0 needs a prompt (text) or tokens", code="no_prompt")
            prompt = new = list(self.prompt_ids(request.text))
            sess.prompt = len(prompt)
        if not new:
            raise AgentError("draft needs new tokens (or a prompt at start 0)", code="bad_request")
        k = self.exit_layer
        hidden: list[torch.Tensor] = []
        drafts: list[int] = []
        confs: list[float] = []
        eos = False
        positions = 0
        x = new
        while True:
            if k is not None and self.familial is not None:
                h, sess.cache = self.familial.lower(k)(torch.tensor([x]), sess.cache)
                if m.ship_hidden:
                    hidden.append(h[0])
                logits = self.familial.exit_logits(k, h[:, -1])[0]
            else:
                all_logits, sess.cache = self._full(x, sess.cache, last_only=True)
                logits = all_logits[-1]
            sess.tokens.extend(x)
            positions += len(x)
            probs = torch.softmax(logits, -1)
            token = int(probs.argmax())
            drafts.append(token)
            confs.append(float(probs[token]))
            if token in self.eos_ids:
                eos = True
                break
            if len(drafts) >= m.gamma or confs[-1] < m.min_confidence:
                break
            x = [token]
        layers_per = k if k is not None else self.total
        meta: dict[str, Any] = {
            ops.DRAFT_TOKENS: drafts,
            "confidences": [round(c, 6) for c in confs],
            ops.PROCESSED: len(sess.tokens),
            "eos": eos,
            ops.COST: {
                **ops.Cost(model_calls=1, tokens=positions, layers=positions * layers_per).model_dump(),
                "forward_passes": len(drafts),
            },
        }
        if prompt is not None:
            meta[ops.PROMPT_TOKENS] = prompt
        parts: list[Any] = []
        if k is not None:
            meta[ops.LAYER] = k
        if m.ship_hidden and hidden:
            part = TensorPart(
                tensor=torch.cat(hidden).float().contiguous(),
                role=TensorRole.HIDDEN_STATE,
                space=self.space.model_copy(update={"layer": k}),
            )
            parts += compress(part, m.encoding) if m.encoding != "float32" else [part]
        return request.reply(self.tok.decode(drafts), *parts, sender=agent_id, meta=meta)

    # -- verify ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(self, request: Envelope, agent_id: str) -> Envelope:
        m = _checked(ops.VerifyTokensRequest, request)
        if m.draft >= len(m.tokens):
            raise AgentError("a draft needs a settled token before it (draft < len(tokens))", code="bad_request")
        hidden_parts = [p for p in request.parts if isinstance(p, TensorPart)]
        h: torch.Tensor | None = None
        layer = m.layer
        if hidden_parts:
            if self.familial is None:
                raise AgentError("this verifier cannot continue from hidden states", code="bad_request")
            try:
                part = decompress(hidden_parts)
            except ValueError as e:
                raise AgentError(f"hidden states: {e}", code="bad_request") from None
            if part.role != TensorRole.HIDDEN_STATE or part.space is None:
                raise AgentError("the tensor part must be hidden_state with a feature space", code="bad_request")
            if not self.space.compatible_with(part.space) or part.space.model != self.space.model:
                raise AgentError(
                    f"hidden states from {part.space}, this verifier is {self.space}", code="incompatible_latent"
                )
            layer = layer if layer is not None else part.space.layer
            if layer is None or not 1 <= layer < self.total:
                raise AgentError(f"layer must lie in 1..{self.total - 1}", code="bad_request")
            h = part.tensor.float()
            if h.ndim != 2 or h.shape[1] != self.familial.model.config.get_text_config().hidden_size:
                raise AgentError(f"hidden states of shape {tuple(h.shape)} do not fit", code="bad_request")
            if h.shape[0] > len(m.tokens) or h.shape[0] == 0:
                raise AgentError("hidden states must cover 1..len(tokens) positions", code="bad_request")
        sess = self.verifies.open(m.session, m.start, on_crop=_crop)
        if h is not None and self.familial is not None and layer is not None:
            f, sess.cache = self.familial.upper(layer)(h[None], sess.cache)
            logits = self.familial.final_logits(f)[0]
            layers_per = self.total - layer
        else:
            logits, sess.cache = self._full(list(m.tokens), sess.cache)
            layers_per = self.total
        ran = int(logits.shape[0])
        preds = logits.argmax(-1).tolist()
        tail = len(m.tokens) - m.draft
        accept, nxt, eos = 0, None, False
        for j in range(m.draft):
            i = tail + j - 1
            if i < 0:
                raise AgentError("a draft needs a settled token before it", code="bad_request")
            if i >= ran:
                break
            if preds[i] != m.tokens[tail + j]:
                nxt = int(preds[i])
                break
            accept += 1
            if m.tokens[tail + j] in self.eos_ids:
                eos = True
                break
        else:
            if tail + m.draft - 1 < ran:
                nxt = int(preds[tail + m.draft - 1])
        if nxt is not None and nxt in self.eos_ids:
            eos = True
        keep = m.start + min(ran, tail + accept)
        if m.start == 0:
            sess.prompt = tail  # a session starts with the prompt: its first settled tokens
        settled = sess.tokens + list(m.tokens[:tail])  # the output so far, prompt first
        sess.tokens.extend(m.tokens[:ran])
        if len(sess.tokens) > keep:
            _crop(sess, keep)
            del sess.tokens[keep:]
        new = list(m.tokens[tail : tail + accept]) + ([nxt] if nxt is not None else [])
        meta = {
            ops.ACCEPT: accept,
            ops.NEXT_TOKEN: nxt,
            "eos": eos,
            ops.PROCESSED: len(sess.tokens),
            ops.COST: {
                **ops.Cost(model_calls=1, tokens=ran, layers=ran * layers_per).model_dump(),
                "forward_passes": 1,
                "positions": ran,
            },
        }
        if layer is not None and h is not None:
            meta[ops.LAYER] = layer
        return request.reply(self._piece(settled[sess.prompt :], new), sender=agent_id, meta=meta)

    def _piece(self, before: list[int], new: list[int]) -> str:
        """The text ``new`` adds after ``before``: decoded in context, so a character split across
        rounds, or a word-initial space, comes out as it does in one decoding. A few tokens of
        context are enough, so a round costs the same however long the output has grown."""
        before = before[-_CONTEXT:]
        a = self.tok.decode(before, skip_special_tokens=True)
        b = self.tok.decode(before + new, skip_special_tokens=True)
        if b.startswith(a) and not a.endswith("\ufffd"):
            return b[len(a) :]
        return self.tok.decode([t for t in new if t not in self.eos_ids], skip_special_tokens=True)
