"""Conventions between model agents and the patterns that compose them, carried in ``Envelope.meta``.

A pattern asks an agent for one of three operations; every model agent that wants to take part in
cascades, ensembles, debates and cross-scoring implements them:

``generate`` (default)
    request text = the prompt. Reply: text = the answer; ``meta.answer`` = the normalised answer
    (what votes compare), ``meta.confidence`` in [0, 1], ``meta.cost`` (see :class:`Cost`). With
    ``meta.return`` listing ``"distribution"``, ``"hidden"`` or ``"embedding"``, the reply also
    carries those latents as tensor parts tagged with the agent's feature space.
``score``
    request text = the prompt, ``meta.candidates`` = list of answers. Reply ``meta.scores`` = one
    log-likelihood per candidate under the agent's own model and tokenizer (so cross-scoring works
    across tokenizers), and ``meta.token_counts``.
``next``
    request text = the prompt, ``meta.prefix`` = the answer so far (text). Reply: one tensor part with
    role ``token_distribution`` (probabilities over the agent's vocabulary for the next token) tagged
    with its feature space, so members sharing a tokenizer can average distributions step by step;
    ``meta.tokens`` maps the string form of the top token ids (at least 20) to their text, and
    ``meta.eos_id`` is the id that ends an answer. Fixed-width decoders say ``meta.last_step`` on the
    final position, and ``meta.answer_order = "reversed"`` when answers are written last digit first.

Optional operations (agents that do not implement them answer ``unsupported_op``):

``judge``
    request text = the task, ``meta.candidates`` = proposals. Reply ``meta.answer`` = the chosen one.
``verify``
    request text = the task, ``meta.candidate`` = one proposal. Reply ``meta.accept`` (bool) and
    ``meta.confidence``.

Collaboration context: a request may carry ``meta.peers`` = ``[{"agent", "answer", "confidence"}]``
(what other agents said in the previous debate round or mixture-of-agents layer). Agents decide how
to use it; the task text itself is left untouched so that narrow models still parse it.

Node-level control (handled by the node, not the agent): ``join_group`` with ``meta.group`` makes
the agent's node subscribe it to that group topic, so patterns can fan out with one publish.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Op(StrEnum):
    GENERATE = "generate"
    SCORE = "score"
    NEXT = "next"
    JUDGE = "judge"
    VERIFY = "verify"
    JOIN_GROUP = "join_group"


OP = "op"
ANSWER = "answer"
CONFIDENCE = "confidence"
COST = "cost"
CANDIDATES = "candidates"
SCORES = "scores"
TOKEN_COUNTS = "token_counts"
PREFIX = "prefix"
RETURN = "return"
TOKENS = "tokens"
EOS_ID = "eos_id"
CANDIDATE = "candidate"
ACCEPT = "accept"
PEERS = "peers"
GROUP = "group"
LAST_STEP = "last_step"
ANSWER_ORDER = "answer_order"


class Cost(BaseModel):
    """What an answer cost, so evaluations can compare patterns on compute, not only accuracy."""

    model_config = ConfigDict(extra="allow")

    model_calls: int = 1
    layers: int = Field(default=0, description="transformer layers run, summed over positions processed")
    tokens: int = Field(default=0, description="tokens processed (prompt + generated)")

    def add(self, other: Cost) -> Cost:
        return Cost(
            model_calls=self.model_calls + other.model_calls,
            layers=self.layers + other.layers,
            tokens=self.tokens + other.tokens,
        )


def op_of(meta: dict[str, Any]) -> Op:
    return Op(meta.get(OP, Op.GENERATE))
