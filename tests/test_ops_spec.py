"""protocols/OPS.md: the op vectors are current, canonical frames whose meta matches the op
messages; the reference agents' replies match them too; the cascade vectors follow the policy."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aiflow_agents.builtin_agents import ScriptedAgent
from aiflow_agents.forwarding import accepted as _accepted
from protocols import Envelope, Kind, TensorRole, decode, encode, ops

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "protocols" / "vectors" / "ops"
NAMES = sorted(p.stem for p in OPS.glob("*.bin"))
HOP_KEYS = {"agent", "node", "answer", "confidence", "error", "error_message", "cost", "start", "end", "forwarded_to"}


def _load(name: str) -> tuple[Envelope, dict[str, Any], bytes]:
    frame = (OPS / f"{name}.bin").read_bytes()
    return decode(frame), json.loads((OPS / f"{name}.json").read_text("utf-8")), frame


def test_ops_vectors_cover_every_op() -> None:
    """(That the files are current is checked with the other vectors, test_protocol_vectors.py.)"""
    assert {json.loads((OPS / f"{n}.json").read_text())["op"] for n in NAMES} >= {o.value for o in ops.Op}


@pytest.mark.parametrize("name", NAMES)
def test_op_vector_is_a_canonical_frame_with_a_valid_op_message(name: str) -> None:
    env, expected, frame = _load(name)
    assert bytes(encode(env)) == frame  # canonical (SPEC §5, §8.2): another encoder can reproduce it
    assert env.meta == expected["header"]["meta"]
    message, op = expected["message"], expected["op"]
    if message == "request":
        assert env.kind == Kind.REQUEST
        if op in {o.value for o in ops.Op}:
            ops.check_request(env.meta)
        else:
            with pytest.raises(ValueError, match="unknown op"):
                ops.check_request(env.meta)
    elif message == "reply" and env.kind == Kind.ERROR:
        assert env.error is not None and env.error.code == "unsupported_op"
    elif message == "reply":
        ops.check_reply(op, env.meta)
    else:
        assert env.kind == Kind.EVENT and set(env.meta["hop"]) >= HOP_KEYS


#: the speculative ops are stateful: the scripted agent's continuation (``sequence``) is chosen so that
#: its replies reproduce the vectors' token ids, after the session's first 5 positions (the prompt)
SPECULATIVE: dict[str, dict[str, Any]] = {
    "draft": {"sequence": [17, 23, 9, 41, 2], "exit_layer": 2},
    "verify_tokens": {"sequence": [17, 23, 12, 2]},
}
REPRODUCED = {"draft": ("draft", "processed", "layer", "eos"), "verify_tokens": ("accept", "next", "processed", "eos")}


@pytest.mark.parametrize(
    "op", ["generate", "generate_peers", "score", "choose", "judge", "verify", "next", "draft", "verify_tokens"]
)
async def test_reference_agent_replies_match_the_op_messages(op: str) -> None:
    """The scripted reference agent, given each request vector, answers what OPS.md says."""
    request, expected, _ = _load(f"{op}_request")
    extra = SPECULATIVE.get(op, {})
    agent = ScriptedAgent("agent-a", answer="4", vocab=["3", "4", "5", "<eos>"], dist=[0.1, 0.7, 0.1, 0.1], **extra)
    ctx = SimpleNamespace(node_id="node-1")
    if extra:  # the vector's request relies on the session's first `start` positions: run them first
        prompt = "hello"
        assert len(prompt.encode()) == request.meta[ops.START]
        meta = {ops.OP: op, ops.SESSION: request.meta[ops.SESSION]}
        if op == "verify_tokens":
            meta |= {ops.TOKENS: list(prompt.encode()), ops.DRAFT_TOKENS: 0}
        first = await agent.handle(Envelope.request(prompt, meta=meta), ctx)  # type: ignore[arg-type]
        assert isinstance(first, Envelope) and first.kind == Kind.REPLY
    reply = await agent.handle(request, ctx)  # type: ignore[arg-type]
    assert isinstance(reply, Envelope) and reply.kind == Kind.REPLY
    msg = ops.check_reply(expected["op"], reply.meta)
    if expected["op"] == "next":
        assert reply.tensor(TensorRole.TOKEN_DISTRIBUTION) is not None and isinstance(msg, ops.NextReply)
    if op in REPRODUCED:
        want = _load(f"{op}_reply")[1]["header"]["meta"]
        assert {k: reply.meta.get(k) for k in REPRODUCED[op]} == {k: want.get(k) for k in REPRODUCED[op]}
        assert {k: reply.meta[ops.COST][k] for k in want[ops.COST]} == want[ops.COST]
    if op == "draft":  # the exit layer's states of every position run in this call
        hidden = reply.tensor(TensorRole.HIDDEN_STATE)
        assert hidden is not None and hidden.space is not None and hidden.space.layer == 2
        assert list(hidden.shape) == [reply.meta[ops.PROCESSED] - request.meta[ops.START], 4]
        assert hidden.meta.get("encoding") == request.meta[ops.ENCODING] == hidden.dtype.value


def test_cascade_vectors_follow_the_acceptance_policy() -> None:
    request, _, _ = _load("cascade_request")
    event, _, _ = _load("cascade_event")
    forward, _, _ = _load("cascade_forward")
    final, _, _ = _load("cascade_reply")
    policy = ops.AcceptancePolicy.from_meta(request.meta)
    assert policy is not None and policy.threshold("dev") == 0.8
    hop = event.meta["hop"]
    below = request.reply("381", meta={ops.CONFIDENCE: hop["confidence"]})
    assert not _accepted(request, below)  # so dev's node forwarded, as the vectors show
    assert _accepted(request, request.reply("381", meta={ops.CONFIDENCE: 0.8}))
    assert forward.recipient == request.route[0] and forward.route == request.route[1:]
    assert forward.correlation_id == event.correlation_id == final.correlation_id == request.id
    assert forward.meta["hops"] == [hop] == final.meta["hops"]
    assert _accepted(forward, final)  # cloud's threshold 0.0: the last stage always stands
