"""Where a node sends a stage's answer: back to the requester, or on along the request's route.

A cascade is a topology behaviour, so the runtime does not hard-wire it: :class:`~aiflow_agents.Node`
asks its :class:`Forwarding` what to do with each reply and keeps only the I/O (encoding,
publishing, error replies). :class:`RouteForwarding` is the default: a request that carries a
``route`` and whose reply the acceptance policy in ``meta.acceptance`` does not accept goes straight
to the next agent on the route (one hop, not a round trip through the requester), with the hops
so far in ``meta.hops``. ``Node(..., forwarding=None)`` answers every request itself; a topology
that escalates differently passes its own implementation.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

from protocols import Envelope, Kind, ops

from .errors import AgentError

HOPS = "hops"


def accepted(request: Envelope, reply: Envelope) -> bool:
    """Whether ``reply`` stands under the request's ``meta.acceptance`` (:class:`ops.AcceptancePolicy`,
    OPS.md §4); without a policy, or with a malformed one, a reply stands and an error escalates."""
    try:
        policy = ops.AcceptancePolicy.from_meta(request.meta) or ops.AcceptancePolicy()
    except ValueError:
        policy = ops.AcceptancePolicy()
    return policy.accepts(reply, request.recipient)


def accepts_confidence(request: Envelope, confidence: float) -> bool:
    """Whether a stage answering with ``confidence`` stands under the request's ``meta.acceptance``
    (the node decides the same way), so an agent knows before answering whether it will be
    escalated and should attach its latents; True outside a cascade. A malformed policy is the
    requester's error (``bad_request``)."""
    try:
        policy = ops.AcceptancePolicy.from_meta(request.meta)
    except ValueError as e:
        raise AgentError(str(e), code="bad_request") from None
    return policy is None or policy.accepts_confidence(confidence, request.recipient)


@runtime_checkable
class Forwarding(Protocol):
    """The node's seam for escalation: decide, and build the envelopes; the node publishes them."""

    def next_hop(self, request: Envelope, reply: Envelope) -> str | None:
        """The agent id to forward to instead of answering, or None to answer the requester."""
        ...

    def forwarded(
        self, request: Envelope, reply: Envelope, to: str, *, agent_id: str, node_id: str, started: float
    ) -> tuple[Envelope, dict[str, Any]]:
        """The request for ``to`` (what :meth:`next_hop` chose) and the hop record, which the node
        also sends the requester as a progress event."""
        ...

    def final(self, request: Envelope, reply: Envelope) -> Envelope:
        """The reply the requester gets when this stage answers (e.g. with the hops taken)."""
        ...


class RouteForwarding:
    """Forward along ``request.route`` while the acceptance policy rejects the stage's reply."""

    def next_hop(self, request: Envelope, reply: Envelope) -> str | None:
        if request.route and not request.expired() and not accepted(request, reply):
            return request.route[0]
        return None

    def forwarded(
        self, request: Envelope, reply: Envelope, to: str, *, agent_id: str, node_id: str, started: float
    ) -> tuple[Envelope, dict[str, Any]]:
        nxt, rest = to, request.route[1:]
        hop: dict[str, Any] = {
            "agent": agent_id,
            "node": node_id,
            "answer": reply.meta.get(ops.ANSWER, reply.text) if reply.kind == Kind.REPLY else None,
            "confidence": reply.meta.get(ops.CONFIDENCE),
            "error": reply.error.code if reply.error else None,
            "error_message": reply.error.message if reply.error else None,
            "cost": reply.meta.get(ops.COST),
            "start": started,
            "end": time.time(),
            "forwarded_to": nxt,
        }
        fwd = Envelope(
            kind=Kind.REQUEST,
            sender=request.sender,
            recipient=nxt,
            correlation_id=request.correlation_id or request.id,
            reply_to=request.reply_to,
            trace_id=request.trace_id,
            parent_id=request.id,
            deadline=request.deadline,
            route=rest,
            # the original input, plus whatever latents this stage produced (e.g. its hidden states)
            parts=[*request.parts, *reply.tensors()],
            meta={**request.meta, HOPS: [*request.meta.get(HOPS, []), hop]},
        )
        return fwd, hop

    def final(self, request: Envelope, reply: Envelope) -> Envelope:
        if request.meta.get(HOPS):
            reply.meta = {**reply.meta, HOPS: request.meta[HOPS]}
        return reply


__all__ = ["HOPS", "Forwarding", "RouteForwarding", "accepted", "accepts_confidence"]
