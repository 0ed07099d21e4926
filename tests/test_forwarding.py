"""The node's forwarding seam: the default route forwarding's decisions and envelopes, and a node
that is given no forwarding (or its own) answering or escalating accordingly."""

from __future__ import annotations

from typing import Any

import torch

from aiflow_agents import Client, Forwarding, Node, RouteForwarding, ScriptedAgent
from aiflow_agents.forwarding import HOPS
from protocols import Envelope, Kind, TensorPart, TensorRole
from protocols import ops as O

ACCEPT_NOTHING = {"acceptance": {"min_confidence": 1.0}}


def _reply(request: Envelope, confidence: float, answer: str = "41") -> Envelope:
    return request.reply(answer, sender=request.recipient or "a", meta={O.CONFIDENCE: confidence, O.ANSWER: answer})


def test_route_forwarding_escalates_only_a_rejected_reply_with_a_route() -> None:
    fwd = RouteForwarding()
    req = Envelope.request("q", recipient="a", route=["b", "c"], meta={"acceptance": {"min_confidence": 0.5}})
    assert fwd.next_hop(req, _reply(req, 0.4)) == "b"
    assert fwd.next_hop(req, _reply(req, 0.6)) is None
    assert fwd.next_hop(req, req.error_reply("handler_error", "boom", sender="a")) == "b"
    no_route = Envelope.request("q", recipient="a", meta={"acceptance": {"min_confidence": 0.5}})
    assert fwd.next_hop(no_route, _reply(no_route, 0.1)) is None


def test_route_forwarding_builds_the_next_request_and_carries_the_hops() -> None:
    fwd = RouteForwarding()
    req = Envelope.request("q", recipient="a", route=["b", "c"], meta=ACCEPT_NOTHING)
    req = req.model_copy(update={"reply_to": "ns/replies/x", "correlation_id": "corr"})
    reply = _reply(req, 0.1)
    reply.parts.append(TensorPart(tensor=torch.ones(1, 2), role=TensorRole.HIDDEN_STATE))
    nxt, hop = fwd.forwarded(req, reply, "b", agent_id="a", node_id="n1", started=1.0)
    assert (nxt.kind, nxt.recipient, nxt.route, nxt.reply_to, nxt.correlation_id) == (
        Kind.REQUEST,
        "b",
        ["c"],
        "ns/replies/x",
        "corr",
    )
    assert nxt.parent_id == req.id and nxt.text == "q" and len(nxt.tensors()) == 1  # input + this stage's latent
    assert (hop["agent"], hop["node"], hop["answer"], hop["confidence"], hop["forwarded_to"]) == (
        "a",
        "n1",
        "41",
        0.1,
        "b",
    )
    assert nxt.meta[HOPS] == [hop]
    # the last stage's answer carries every hop taken
    final = fwd.final(nxt, _reply(nxt, 0.9, "42"))
    assert final.meta[HOPS] == [hop] and final.text == "42"


async def test_a_node_without_forwarding_answers_a_routed_request_itself(embedded, namespace: str) -> None:
    low = ScriptedAgent(agent_id="low", answer="1", confidence=0.1)
    high = ScriptedAgent(agent_id="high", answer="2", confidence=0.9)
    req = Envelope.request("q", route=["high"], meta=ACCEPT_NOTHING)
    async with Node([high], embedded, namespace=namespace), Client(embedded, namespace=namespace) as c:
        async with Node([low], embedded, namespace=namespace, forwarding=None):
            assert (await c.request("low", req, timeout=10)).text == "1"
        async with Node([low], embedded, namespace=namespace):
            assert (await c.request("low", req, timeout=10)).text == "2"  # the default escalates


class _Detour:
    """A topology's own forwarding: always send a stage's answer to one fixed agent, once."""

    def __init__(self, to: str) -> None:
        self.to = to
        self.route = RouteForwarding()

    def next_hop(self, request: Envelope, reply: Envelope) -> str | None:
        return None if request.meta.get(HOPS) else self.to

    def forwarded(self, request: Envelope, reply: Envelope, to: str, **kw: Any) -> tuple[Envelope, dict[str, Any]]:
        return self.route.forwarded(request, reply, to, **kw)

    def final(self, request: Envelope, reply: Envelope) -> Envelope:
        return self.route.final(request, reply)


async def test_a_node_takes_a_custom_forwarding(embedded, namespace: str) -> None:
    detour = _Detour("judge")
    assert isinstance(detour, Forwarding)
    first = ScriptedAgent(agent_id="first", answer="1", confidence=0.99)
    judge = ScriptedAgent(agent_id="judge", answer="2", confidence=0.99)
    async with (
        Node([judge], embedded, namespace=namespace),
        Node([first], embedded, namespace=namespace, forwarding=detour),
        Client(embedded, namespace=namespace) as c,
    ):
        reply = await c.request("first", "q", timeout=10)
    assert reply.text == "2" and [h["agent"] for h in reply.meta[HOPS]] == ["first"]
