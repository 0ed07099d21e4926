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

``choose``
    request text = a multiple-choice question, ``meta.candidates`` = its options (optionally
    ``context``, ``options_order``, ``peers``, ``temperature``, ``seed``). Reply ``meta.choice`` =
    the chosen index, ``meta.answer`` = that option, ``meta.scores`` (length-normalised) and
    ``meta.probs`` over all options, so an ensemble can average distributions across tokenizers.

``draft`` / ``verify_tokens``
    speculative decoding: a drafter proposes ``meta.gamma`` tokens of session ``meta.session``
    (optionally with its exit layer's hidden states); a verifier runs the draft once and answers
    how many stand (``meta.accept``) and its own next token (``meta.next``). Both keep a KV cache
    per session; ``meta.start`` says how much of it the requester relies on.

``judge``
    request text = the task, ``meta.candidates`` = proposals. Reply ``meta.answer`` = the chosen one.
``verify``
    request text = the task, ``meta.candidate`` = one proposal. Reply ``meta.accepted`` (bool: the
    verdict) and ``meta.confidence``.

Collaboration context: a request may carry ``meta.peers`` = ``[{"agent", "answer", "confidence"}]``
(what other agents said in the previous debate round or mixture-of-agents layer). Agents decide how
to use it; the task text itself is left untouched so that narrow models still parse it.

Cascade acceptance: a request may carry ``meta.acceptance`` (an :class:`AcceptancePolicy`), the
policy under which a node escalates a stage's reply along ``route`` by itself. ``protocols/OPS.md``
specifies all of this for implementations in other languages.

Node-level control (handled by the node, not the agent): ``join_group`` with ``meta.group`` makes
the agent's node subscribe it to that group topic, so patterns can fan out with one publish.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .envelope import Envelope, Kind


class Op(StrEnum):
    GENERATE = "generate"
    SCORE = "score"
    NEXT = "next"
    JUDGE = "judge"
    VERIFY = "verify"
    JOIN_GROUP = "join_group"
    CHOOSE = "choose"
    DRAFT = "draft"
    VERIFY_TOKENS = "verify_tokens"


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
ACCEPTED = "accepted"  # verify's verdict (reply)
ACCEPTANCE = "acceptance"  # cascade acceptance policy (request)
PEERS = "peers"
GROUP = "group"
LAST_STEP = "last_step"
ANSWER_ORDER = "answer_order"
# multiple choice (``choose``, and ``score`` on a multiple-choice item)
MC = "mc"  # the request is a multiple-choice item: render its prompt, length-normalise scores
CONTEXT = "context"  # a passage printed before the question
OPTIONS_ORDER = "options_order"  # list the options, lettered, in this order (a permutation)
CHOICE = "choice"  # reply: index of the chosen option
PROBS = "probs"  # reply: the agent's probability of every option
TOKEN_LOGPROBS = "token_logprobs"  # reply: per option, the log-probability of each of its tokens
TOKENIZER = "tokenizer"  # reply: the tokenizer id those tokens are in (members sharing it can mix per token)
# speculative decoding (``draft``, ``verify_tokens``): a session's token ids, stateful on each agent
SESSION = "session"  # one decoding: the agent keeps its KV cache under this id
START = "start"  # how many of the session's positions precede ``tokens`` (the agent keeps those)
GAMMA = "gamma"  # draft: at most this many tokens
SHIP_HIDDEN = "ship_hidden"  # draft: also reply the exit layer's hidden states of the positions run
ENCODING = "encoding"  # how those hidden states travel (float32, float16, bfloat16, int8-rowwise)
MIN_CONFIDENCE = "min_confidence"  # draft: stop drafting after a token below this probability
DRAFT_TOKENS = "draft"  # draft reply: the proposed ids; verify_tokens request: how many of ``tokens`` are draft
PROMPT_TOKENS = "prompt_tokens"  # draft reply: the prompt's ids when this call tokenised it
PROCESSED = "processed"  # reply: the positions the agent now holds for the session
ACCEPT = "accept"  # verify_tokens reply: how many draft tokens stand
NEXT_TOKEN = "next"  # verify_tokens reply: the verifier's own next token (correction or bonus), or null
LAYER = "layer"  # the layer whose output the hidden states are


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


Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class AcceptancePolicy(BaseModel):
    """When a cascade stage's reply stands: its ``meta.confidence`` reaches the stage's threshold.

    The threshold of stage ``agent`` is ``per_stage[agent]`` if present, else ``min_confidence``;
    when neither is set the policy asks nothing of that stage and its reply stands (the one default,
    for nodes and agents alike). Carried in request ``meta.acceptance`` (:meth:`to_meta`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_confidence: Threshold | None = None
    per_stage: dict[str, Threshold] = Field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> AcceptancePolicy | None:
        """The policy in ``meta.acceptance``; None when absent. Raises ``ValueError`` if malformed."""
        raw = meta.get(ACCEPTANCE)
        if raw is None:
            return None
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ValueError(f"meta.{ACCEPTANCE}: {e.errors()[0]['msg']}") from None

    def to_meta(self) -> dict[str, Any]:
        """``{"acceptance": {...}}`` to merge into a request's meta."""
        return {ACCEPTANCE: self.model_dump(mode="json")}

    def threshold(self, agent_id: str | None) -> float | None:
        return self.per_stage.get(agent_id or "", self.min_confidence)

    def accepts_confidence(self, confidence: Any, agent_id: str | None = None) -> bool:
        """Whether a reply of this ``confidence`` from stage ``agent_id`` stands."""
        t = self.threshold(agent_id)
        if t is None:
            return True
        ok_type = isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
        return ok_type and confidence >= t

    def accepts(self, reply: Envelope, agent_id: str | None = None) -> bool:
        """Whether ``reply`` from stage ``agent_id`` stands (an error never does)."""
        return reply.kind == Kind.REPLY and self.accepts_confidence(reply.meta.get(CONFIDENCE), agent_id)


# -- the op messages (OPS.md §3): what a request's and a reply's meta must hold ---------------------
class _Meta(BaseModel):
    """Keys an op defines are checked; any other key is free (agents add their own)."""

    model_config = ConfigDict(extra="allow", strict=True)


Confidence = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Peer(_Meta):
    """What another agent said in the previous round (``meta.peers`` entries)."""

    agent: str
    answer: str | None = None
    confidence: Confidence | None = None


class GenerateRequest(_Meta):
    op: str = Op.GENERATE.value
    return_: str | list[str] = Field(default_factory=list, alias="return")
    peers: list[Peer] = Field(default_factory=list)
    acceptance: AcceptancePolicy | None = None


class Answer(_Meta):
    """Every reply to generate, score, judge and next may say these; a vote compares ``answer``."""

    answer: str | None = None
    confidence: Confidence | None = None
    cost: Cost | None = None


class ScoreRequest(_Meta):
    op: str = Op.SCORE.value
    candidates: list[str] = Field(min_length=1)


class ScoreReply(Answer):
    scores: list[Annotated[float, Field(allow_inf_nan=False)]]
    token_counts: list[int] | None = None


class NextRequest(_Meta):
    op: str = Op.NEXT.value
    prefix: str = ""


class NextReply(Answer):
    tokens: dict[str, str] = Field(default_factory=dict)
    eos_id: int | None = None
    last_step: bool = False
    answer_order: str = "normal"


class JudgeRequest(_Meta):
    op: str = Op.JUDGE.value
    candidates: list[str] = Field(min_length=1)


class VerifyRequest(_Meta):
    op: str = Op.VERIFY.value
    candidate: str


class VerifyReply(Answer):
    accepted: bool


class ChooseRequest(_Meta):
    op: str = Op.CHOOSE.value
    candidates: list[str] = Field(min_length=2)
    context: str = ""
    options_order: list[int] | None = None
    peers: list[Peer] = Field(default_factory=list)
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    seed: int = 0


class ChooseReply(Answer):
    choice: Annotated[int, Field(ge=0)]
    scores: list[float]
    probs: list[Confidence]
    token_counts: list[int] | None = None
    token_logprobs: list[list[float]] | None = None
    tokenizer: str | None = None


TokenId = Annotated[int, Field(ge=0)]


class DraftRequest(_Meta):
    """Text = the prompt when ``start`` is 0 and ``tokens`` is empty (the drafter tokenises it)."""

    op: str = Op.DRAFT.value
    session: str = Field(min_length=1, max_length=128)
    start: Annotated[int, Field(ge=0)] = 0
    tokens: list[TokenId] = Field(default_factory=list)
    gamma: Annotated[int, Field(ge=1, le=64)] = 4
    ship_hidden: bool = False
    encoding: str = "float16"
    min_confidence: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0


class DraftReply(Answer):
    draft: list[TokenId]
    confidences: list[Confidence]
    processed: Annotated[int, Field(ge=0)]
    prompt_tokens: list[TokenId] | None = None
    layer: int | None = None
    eos: bool = False


class VerifyTokensRequest(_Meta):
    """``tokens`` = the settled tokens the verifier has not run yet, then ``draft`` proposed ones.
    A hidden-state part (role ``hidden_state``, layer ``layer``) replaces the first positions' lower layers."""

    op: str = Op.VERIFY_TOKENS.value
    session: str = Field(min_length=1, max_length=128)
    start: Annotated[int, Field(ge=0)] = 0
    tokens: list[TokenId] = Field(min_length=1)
    draft: Annotated[int, Field(ge=0)]
    layer: Annotated[int, Field(ge=1)] | None = None


class VerifyTokensReply(Answer):
    accept: Annotated[int, Field(ge=0)]
    next: TokenId | None = None
    eos: bool = False
    processed: Annotated[int, Field(ge=0)]


class JoinGroupRequest(_Meta):
    op: str = Op.JOIN_GROUP.value
    group: str = Field(min_length=1)


class JoinGroupReply(_Meta):
    group: str
    joined: bool


#: op -> (request meta model, reply meta model)
MESSAGES: dict[Op, tuple[type[_Meta], type[_Meta]]] = {
    Op.GENERATE: (GenerateRequest, Answer),
    Op.SCORE: (ScoreRequest, ScoreReply),
    Op.NEXT: (NextRequest, NextReply),
    Op.JUDGE: (JudgeRequest, Answer),
    Op.VERIFY: (VerifyRequest, VerifyReply),
    Op.JOIN_GROUP: (JoinGroupRequest, JoinGroupReply),
    Op.CHOOSE: (ChooseRequest, ChooseReply),
    Op.DRAFT: (DraftRequest, DraftReply),
    Op.VERIFY_TOKENS: (VerifyTokensRequest, VerifyTokensReply),
}


def check_request(meta: dict[str, Any]) -> _Meta:
    """The request's op message, validated; ``ValueError`` (unknown op or bad meta) otherwise."""
    try:
        op = op_of(meta)
    except ValueError:
        raise ValueError(f"unknown op {meta.get(OP)!r}") from None
    try:
        return MESSAGES[op][0].model_validate(meta)
    except ValidationError as e:
        raise ValueError(f"{op} request: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None


def check_reply(op: Op | str, meta: dict[str, Any]) -> _Meta:
    """A reply's meta for ``op``, validated; ``ValueError`` otherwise."""
    try:
        return MESSAGES[Op(op)][1].model_validate(meta)
    except ValidationError as e:
        raise ValueError(f"{op} reply: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
