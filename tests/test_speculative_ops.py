"""``draft`` / ``verify_tokens`` on the scripted reference agent (OPS.md §3.8, §3.9): sessions and
``start``, accept / correction / bonus, end of sequence, hidden states, and a whole exchange whose
output equals the verifier decoding alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from aiflow_agents.builtin_agents import ScriptedAgent
from aiflow_agents.errors import AgentError
from aiflow_agents.registry import AgentSpec
from protocols import Envelope, FeatureSpace, Kind, TensorPart, TensorRole, compression, ops

SEQ = [5, 6, 7, 8, 9, 2]  # the scripted continuation; 2 (its last) is the end-of-sequence id
PROMPT = "hi!"
P = list(PROMPT.encode())  # the trivial tokenizer: UTF-8 bytes
CTX: Any = SimpleNamespace(node_id="node-1")


async def ask(agent: ScriptedAgent, op: str, text: str = "", *parts: TensorPart, **meta: Any) -> Envelope:
    reply = await agent.handle(Envelope.request(text, *parts, meta={ops.OP: op, **meta}), CTX)
    assert isinstance(reply, Envelope) and reply.kind == Kind.REPLY
    ops.check_reply(op, reply.meta)  # every reply is a valid op message
    return reply


async def refused(agent: ScriptedAgent, op: str, text: str = "", *parts: TensorPart, **meta: Any) -> str:
    with pytest.raises(AgentError) as e:
        await agent.handle(Envelope.request(text, *parts, meta={ops.OP: op, **meta}), CTX)
    return e.value.code


# -- draft -------------------------------------------------------------------------------------------
async def test_draft_tokenises_the_prompt_and_proposes_the_continuation() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ)
    r = await ask(drafter, "draft", PROMPT, session="s", gamma=3)
    m = r.meta
    assert m[ops.PROMPT_TOKENS] == P and m[ops.DRAFT_TOKENS] == [5, 6, 7]
    assert m["confidences"] == [1.0, 1.0, 1.0] and m["eos"] is False
    assert m[ops.PROCESSED] == len(P) + 2  # the prompt and every draft token but the last
    assert r.text == "\x05\x06\x07" and ops.LAYER not in m and not r.tensors()
    assert m[ops.COST]["tokens"] == len(P) + 2 and m[ops.COST]["layers"] == 4 * (len(P) + 2)


async def test_draft_resumes_at_start_dropping_rejected_positions() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ)
    await ask(drafter, "draft", PROMPT, session="s", gamma=3)  # holds prompt + 5, 6
    # the verifier kept 5 and corrected 6 to 6 (say): the drafter keeps prompt + 5 and runs 6
    r = await ask(drafter, "draft", session="s", start=len(P) + 1, tokens=[6], gamma=2)
    assert r.meta[ops.DRAFT_TOKENS] == [7, 8] and r.meta[ops.PROCESSED] == len(P) + 3
    assert "prompt_tokens" not in r.meta


async def test_draft_beyond_what_is_held_is_an_unknown_session() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ)
    assert await refused(drafter, "draft", session="never", start=3, tokens=[5]) == "unknown_session"
    r = await ask(drafter, "draft", PROMPT, session="s", gamma=2)  # holds len(P) + 1
    held = r.meta[ops.PROCESSED]
    assert await refused(drafter, "draft", session="s", start=held + 1, tokens=[7]) == "unknown_session"
    await ask(drafter, "draft", session="s", start=held, tokens=[7])  # exactly what it holds: fine


async def test_a_forgotten_session_answers_unknown_session() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ, sessions=1)
    await ask(drafter, "draft", PROMPT, session="a", gamma=1)
    await ask(drafter, "draft", PROMPT, session="b", gamma=1)  # the LRU keeps one: "a" is forgotten
    assert await refused(drafter, "draft", session="a", start=len(P), tokens=[5]) == "unknown_session"
    await ask(drafter, "draft", session="b", start=len(P), tokens=[5])


async def test_draft_stops_after_end_of_sequence() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ)
    r = await ask(drafter, "draft", session="s", tokens=[*P, 5, 6, 7, 8], gamma=5)
    assert r.meta[ops.DRAFT_TOKENS] == [9, 2] and r.meta["eos"] is True
    assert r.meta[ops.PROCESSED] == len(P) + 4 + 1


async def test_wrong_every_and_min_confidence() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ, wrong_every=2, wrong_confidence=0.25, confidence=0.9)
    r = await ask(drafter, "draft", PROMPT, session="s", gamma=4)
    assert r.meta[ops.DRAFT_TOKENS] == [5, 7, 7, 9]  # the 2nd and 4th tokens of the continuation +1
    assert r.meta["confidences"] == [0.9, 0.25, 0.9, 0.25]
    r = await ask(drafter, "draft", PROMPT, session="t", gamma=4, min_confidence=0.5)
    assert r.meta[ops.DRAFT_TOKENS] == [5, 7]  # stops after the token below min_confidence


async def test_draft_ships_the_exit_layers_states_of_the_positions_it_ran() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ, exit_layer=2, hidden_size=3)
    r = await ask(drafter, "draft", session="s", tokens=[*P, 5], gamma=3, ship_hidden=True, encoding="float32")
    ran = [*P, 5, 6, 7]  # the new tokens and the draft but its last (8)
    assert r.meta[ops.DRAFT_TOKENS] == [6, 7, 8] and r.meta[ops.LAYER] == 2
    part = r.tensor(TensorRole.HIDDEN_STATE)
    assert part is not None and part.space is not None and part.space.layer == 2
    assert part.tensor.shape == (len(ran), 3) and r.meta[ops.PROCESSED] == len(ran)
    assert part.tensor[:, 0].tolist() == [float(t) for t in ran]
    assert r.meta[ops.COST]["layers"] == 2 * len(ran)
    r = await ask(drafter, "draft", session="q", tokens=P, gamma=2, ship_hidden=True, encoding="int8-rowwise")
    (dense,) = compression.expand(r.tensors())
    assert isinstance(dense, TensorPart) and dense.role == TensorRole.HIDDEN_STATE and dense.shape == (len(P) + 1, 3)
    assert await refused(drafter, "draft", session="x", tokens=P, ship_hidden=True, encoding="topk") == (
        "unsupported_encoding"
    )
    no_exit = ScriptedAgent("d2", sequence=SEQ)
    assert await refused(no_exit, "draft", session="x", tokens=P, ship_hidden=True) == "bad_request"


async def test_draft_request_errors() -> None:
    drafter = ScriptedAgent("d", sequence=SEQ)
    assert await refused(drafter, "draft", "", session="s") == "no_prompt"
    await ask(drafter, "draft", PROMPT, session="s")
    assert await refused(drafter, "draft", session="s", start=2) == "bad_request"  # nothing new to run
    assert await refused(drafter, "draft", PROMPT, session="s", gamma=0) == "bad_request"
    assert await refused(ScriptedAgent("plain"), "draft", PROMPT, session="s") == "unsupported_op"


# -- verify_tokens -----------------------------------------------------------------------------------
async def test_verify_accepts_the_whole_draft_and_adds_a_bonus_token() -> None:
    verifier = ScriptedAgent("v", sequence=SEQ)
    r = await ask(verifier, "verify_tokens", session="s", tokens=[*P, 5, 6, 7], draft=3)
    m = r.meta
    assert (m[ops.ACCEPT], m[ops.NEXT_TOKEN], m["eos"]) == (3, 8, False)
    assert m[ops.PROCESSED] == len(P) + 3 and r.text == "\x05\x06\x07\x08"
    assert m[ops.COST]["tokens"] == len(P) + 3 and m[ops.COST]["layers"] == 4 * (len(P) + 3)


async def test_verify_rejects_at_the_first_mismatch_and_corrects() -> None:
    verifier = ScriptedAgent("v", sequence=SEQ)
    r = await ask(verifier, "verify_tokens", session="s", tokens=[*P, 5, 0, 7], draft=3)
    assert (r.meta[ops.ACCEPT], r.meta[ops.NEXT_TOKEN]) == (1, 6)
    assert r.meta[ops.PROCESSED] == len(P) + 1  # settled only: the prompt and 5, not the correction
    # next round it runs the correction 6 and a new draft, resuming at what it holds
    r = await ask(verifier, "verify_tokens", session="s", start=len(P) + 1, tokens=[6, 7, 8], draft=2)
    assert (r.meta[ops.ACCEPT], r.meta[ops.NEXT_TOKEN], r.meta[ops.PROCESSED]) == (2, 9, len(P) + 4)
    assert await refused(verifier, "verify_tokens", session="s", start=len(P) + 5, tokens=[9], draft=0) == (
        "unknown_session"
    )


async def test_verify_without_draft_answers_the_next_token() -> None:
    verifier = ScriptedAgent("v", sequence=SEQ)
    r = await ask(verifier, "verify_tokens", session="s", tokens=P, draft=0)
    assert (r.meta[ops.ACCEPT], r.meta[ops.NEXT_TOKEN], r.meta[ops.PROCESSED]) == (0, 5, len(P))


async def test_verify_end_of_sequence() -> None:
    verifier = ScriptedAgent("v", sequence=SEQ)
    r = await ask(verifier, "verify_tokens", session="s", tokens=[*P, 5, 6, 7, 8, 9, 2], draft=2)
    assert (r.meta[ops.ACCEPT], r.meta[ops.NEXT_TOKEN], r.meta["eos"]) == (2, None, True)  # accepted eos
    r = await ask(verifier, "verify_tokens", session="t", tokens=[*P, 5, 6, 7, 8, 9], draft=1)
    assert (r.meta[ops.ACCEPT], r.meta[ops.NEXT_TOKEN], r.meta["eos"]) == (1, 2, True)  # eos as bonus
    assert r.text == "\x09"  # the end-of-sequence id is not text
    r = await ask(verifier, "verify_tokens", session="u", tokens=[*P, 5, 6, 7, 8, 0], draft=1)
    assert (r.meta[ops.NEXT_TOKEN], r.meta["eos"]) == (9, False)


def hidden(rows: int, layer: int | None = 2) -> list[TensorPart]:
    """A drafter's float16 states for ``rows`` positions (values do not matter to a scripted verifier)."""
    space = FeatureSpace(family="scripted", layer=layer, hidden_size=4, tokenizer="scripted-vocab")
    return compression.pack(torch.zeros(rows, 4), "float16", role=TensorRole.HIDDEN_STATE, space=space)


async def test_verify_from_hidden_states_runs_only_the_shipped_positions() -> None:
    verifier = ScriptedAgent("v", sequence=SEQ, num_layers=6)
    await ask(verifier, "verify_tokens", session="s", tokens=P, draft=0)
    # settled 5, draft 6 7 8; states for 5, 6, 7 (the drafter did not run 8): no bonus, 8 stands
    r = await ask(
        verifier, "verify_tokens", *hidden(3), session="s", start=len(P), tokens=[5, 6, 7, 8], draft=3, layer=2
    )
    m = r.meta
    assert (m[ops.ACCEPT], m[ops.NEXT_TOKEN], m[ops.PROCESSED], m[ops.LAYER]) == (3, None, len(P) + 3, 2)
    assert m[ops.COST]["tokens"] == 3 and m[ops.COST]["layers"] == 3 * (6 - 2)
    # the drafter runs 8 next round; the verifier resumes at the 3 positions it ran
    r = await ask(
        verifier, "verify_tokens", *hidden(2), session="s", start=len(P) + 3, tokens=[8, 9, 2], draft=2, layer=2
    )
    assert (r.meta[ops.ACCEPT], r.meta[ops.NEXT_TOKEN], r.meta["eos"]) == (2, None, True)


async def test_verify_hidden_state_errors() -> None:
    verifier = ScriptedAgent("v", sequence=SEQ)
    bad = "verify_tokens", *hidden(4)
    assert await refused(verifier, *bad, session="s", tokens=[1, 5, 6], draft=2, layer=2) == "bad_request"  # rows
    bad = "verify_tokens", *hidden(2, layer=None)
    assert await refused(verifier, *bad, session="s", tokens=[1, 5, 6], draft=2) == "bad_request"  # no layer
    bad = "verify_tokens", *hidden(2)
    assert await refused(verifier, *bad, session="s", tokens=[1, 5], draft=1, layer=4) == "bad_request"  # depth 4
    assert await refused(verifier, "verify_tokens", session="s", tokens=[5, 6], draft=2) == "bad_request"
    r = await ask(verifier, "verify_tokens", *hidden(len(P)), session="s", tokens=[*P, 5], draft=1)
    assert r.meta[ops.LAYER] == 2 and r.meta[ops.ACCEPT] == 1  # the layer read from the part's space


# -- the whole exchange --------------------------------------------------------------------------------
async def decode(drafter: ScriptedAgent, verifier: ScriptedAgent, *, gamma: int, ship_hidden: bool = False) -> dict:
    """Rounds as a requester runs them (OPS.md §3.8): ``start`` = the settled positions each agent holds."""
    session, seq, out, have_d, have_v, rounds = "s-1", [], [], 0, 0, 0
    while rounds < 50:
        rounds += 1
        meta: dict[str, Any] = {"session": session, "start": have_d, "gamma": gamma, "ship_hidden": ship_hidden}
        d = await ask(drafter, "draft", PROMPT if not seq else "", **meta, **({"tokens": seq[have_d:]} if seq else {}))
        if not seq:
            seq = list(d.meta[ops.PROMPT_TOKENS])
        drafts = d.meta[ops.DRAFT_TOKENS]
        vmeta = {"session": session, "start": have_v, "tokens": seq[have_v:] + drafts, "draft": len(drafts)}
        if ship_hidden:
            vmeta["layer"] = d.meta[ops.LAYER]
        v = await ask(verifier, "verify_tokens", "", *d.tensors(), **vmeta)
        accept, nxt = v.meta[ops.ACCEPT], v.meta[ops.NEXT_TOKEN]
        new = drafts[:accept] + ([nxt] if nxt is not None else [])
        before = len(seq)
        seq += new
        out += new
        have_v = v.meta[ops.PROCESSED]
        have_d = min(d.meta[ops.PROCESSED], before + accept)
        if v.meta["eos"]:
            break
    return {"tokens": out, "rounds": rounds}


@pytest.mark.parametrize("ship_hidden", [False, True])
@pytest.mark.parametrize("wrong_every", [0, 1, 3])
async def test_the_exchange_decodes_what_the_verifier_would(wrong_every: int, ship_hidden: bool) -> None:
    drafter = ScriptedAgent("d", sequence=SEQ, wrong_every=wrong_every, exit_layer=2)
    verifier = ScriptedAgent("v", sequence=SEQ)
    got = await decode(drafter, verifier, gamma=3, ship_hidden=ship_hidden)
    assert got["tokens"] == SEQ
    if wrong_every == 0 and not ship_hidden:
        assert got["rounds"] == 2  # 3 drafted + bonus, then 9 and eos


async def test_a_restarted_session_continues_where_it_was() -> None:
    """After an agent forgot the session the requester restarts from start 0 with every settled
    token under a new id: the scripted agents infer where the prompt ended and carry on."""
    drafter, verifier = ScriptedAgent("d", sequence=SEQ), ScriptedAgent("v", sequence=SEQ)
    settled = [*P, 5, 6]
    d = await ask(drafter, "draft", session="new", tokens=settled, gamma=2)
    assert d.meta[ops.DRAFT_TOKENS] == [7, 8]
    v = await ask(verifier, "verify_tokens", session="new", tokens=[*settled, 7, 8], draft=2)
    assert (v.meta[ops.ACCEPT], v.meta[ops.NEXT_TOKEN]) == (2, 9)


def test_config_from_the_command_line() -> None:
    agent = AgentSpec.parse("scripted:v?sequence=5,6,7,8,9,2&wrong_every=2&exit_layer=1").create()
    assert isinstance(agent, ScriptedAgent)
    assert agent._spec.sequence == (5, 6, 7, 8, 9, 2) and agent._spec.wrong_every == 2
    assert ScriptedAgent("x", sequence="7")._spec.sequence == (7,)
    for bad in ({"sequence": "5,x"}, {"sequence": [5, -1]}, {"sequence": ""}, {"exit_layer": 4}, {"sessions": 0}):
        with pytest.raises(ValueError):
            ScriptedAgent("x", **bad)
