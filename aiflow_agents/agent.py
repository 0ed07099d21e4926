"""The ``Agent`` base class: an id, what it accepts, and an async handler."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, TextPart, check_level

if TYPE_CHECKING:
    from .client import Client


@dataclass(frozen=True, slots=True)
class Accepts:
    """What an agent can consume. Latents from a space it does not list are never misused:
    with ``text`` accepted the agent still gets the envelope (and should read the text part);
    without it the node refuses the request with ``unsupported_input``."""

    text: bool = True
    spaces: tuple[FeatureSpace, ...] = ()
    roles: tuple[TensorRole, ...] = ()
    #: Takes latents of every space (relays, echo, statistics): the agent does not interpret them.
    any_space: bool = False

    def can_consume(self, part: TensorPart) -> bool:
        if self.roles and part.role not in self.roles:
            return False
        if self.any_space:
            return True
        if part.space is None:
            return not self.spaces
        return any(part.space.compatible_with(s) for s in self.spaces) if self.spaces else False

    def check(self, envelope: Envelope) -> str | None:
        """None if the envelope is acceptable, else the reason it is not."""
        has_text = any(isinstance(p, TextPart) for p in envelope.parts)
        tensors = envelope.tensors()
        usable = [t for t in tensors if self.can_consume(t)]
        if usable or (self.text and has_text) or (not tensors and not has_text):
            return None
        if tensors and not usable:
            spaces = sorted({str(t.space) for t in tensors if t.space is not None}) or ["<no space>"]
            fallback = "" if self.text else " and the agent does not take text"
            return f"latent from {', '.join(spaces)} is not consumable here{fallback}"
        return "the agent does not accept text"

    def describe(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "spaces": [str(s) for s in self.spaces],
            "roles": [str(r) for r in self.roles],
            "any_space": self.any_space,
        }


@dataclass(slots=True)
class AgentContext:
    """What a handler may use besides its input: its identity, the deadline, a client to call
    other agents over the bus, and a bound logger."""

    agent_id: str
    node_id: str
    client: Client
    deadline: float | None = None
    log: Any = field(default_factory=lambda: structlog.get_logger("aiflow.agent"))

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    async def request(self, agent_id: str, message: Envelope | str, timeout: float | None = None) -> Envelope:
        """Call another agent; the timeout never outlives this request's own deadline."""
        left = self.remaining()
        if left is not None:
            timeout = left if timeout is None else min(timeout, left)
        return await self.client.request(agent_id, message, timeout=timeout)


Reply = Envelope | str | Sequence[TextPart | TensorPart] | None


class Agent:
    """Subclass and implement :meth:`handle`. Register the class under the entry-point group
    ``aiflow_agents.agents`` so ``aiflow node --agent NAME`` can host it.

    ``handle`` may return a full :class:`Envelope` (its routing fields are filled in), a string
    (one text part), a list of parts, or None (an empty reply). Raise
    :class:`~aiflow_agents.errors.AgentError` to answer with a chosen error code; any other
    exception becomes a ``handler_error`` reply and the node keeps serving.
    """

    #: Registry name; set from the entry point when loaded by name.
    type_name: ClassVar[str] = "agent"
    accepts: Accepts = Accepts()

    def __init__(
        self, agent_id: str | None = None, *, tier: str | None = None, groups: Sequence[str] = (), **config: Any
    ) -> None:
        self.agent_id = check_level(agent_id or self.type_name)
        self.tier = tier
        self.groups = tuple(check_level(g, "group id") for g in groups)
        self.config = config

    async def setup(self) -> None:
        """Load models and other slow resources; runs once before the agent goes online."""

    async def teardown(self) -> None:
        """Release resources; runs after the agent went offline."""

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        raise NotImplementedError

    async def on_event(self, event: Envelope, ctx: AgentContext) -> None:
        """Non-request envelopes delivered to the inbox; ignored unless overridden."""

    def describe(self) -> dict[str, Any]:
        return {"type": self.type_name, "accepts": self.accepts.describe(), "tier": self.tier}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(agent_id={self.agent_id!r})"
