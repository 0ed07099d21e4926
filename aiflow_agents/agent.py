"""The ``Agent`` base class: an id, what it accepts, and an async handler."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, TextPart, check_level

from .errors import AgentConfigError

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
        role = part.role
        if role == TensorRole.OTHER and isinstance(part.meta.get("role"), str):
            # a compressed part (int8-rowwise, top-k) carries its tensor's role in its meta
            with contextlib.suppress(ValueError):
                role = TensorRole(part.meta["role"])
        if self.roles and role not in self.roles:
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


#: What a node gives a context to publish one progress event: (meta, parts) -> published?
Emit = Callable[[dict[str, Any], tuple[TextPart | TensorPart, ...]], Awaitable[bool]]


@dataclass(slots=True)
class AgentContext:
    """What a handler may use besides its input: its identity, the deadline, a client to call
    other agents over the bus, a bound logger, and a way to stream progress to the requester.

    Progress events (``progress``, ``progress_threadsafe``) go to the request's ``reply_to`` as
    EVENT envelopes under its correlation id, in the order they were made, and all of them before
    the final reply: the node awaits :meth:`flush` before it answers. ``emit`` is set by the node;
    a context built without one (unit tests) reports every event as not sent."""

    agent_id: str
    node_id: str
    client: Client
    deadline: float | None = None
    log: Any = field(default_factory=lambda: structlog.get_logger("aiflow.agent"))
    emit: Emit | None = None
    #: The loop the context was made on: worker threads schedule their events onto it.
    loop: asyncio.AbstractEventLoop | None = None
    _sending: set[asyncio.Task[bool]] = field(default_factory=set, init=False, repr=False)
    _sealed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.loop is None:
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:  # built outside a loop (a unit test): only the async API can work
                self.loop = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def _start(self, meta: dict[str, Any], parts: tuple[TextPart | TensorPart, ...]) -> asyncio.Task[bool] | None:
        """Start publishing one event (on the loop's thread). Tasks start in call order and each
        writes its frame before its first wait, so one connection keeps the events in order."""
        if self.emit is None or self._sealed:
            return None
        task = asyncio.ensure_future(self.emit(dict(meta), parts))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return task

    async def progress(self, meta: dict[str, Any], *parts: TextPart | TensorPart) -> bool:
        """Send a progress event (``meta``, optional parts) to the requester now; True once the broker
        has it. False, never an exception, when nobody can receive it: no ``reply_to``, no node, the
        reply already sent, or the publish failed."""
        task = self._start(meta, parts)
        if task is None:
            return False
        try:
            return await asyncio.shield(task)  # a cancelled handler does not abort a half-sent event
        except Exception:
            return False

    def progress_threadsafe(self, meta: dict[str, Any], *parts: TextPart | TensorPart) -> bool:
        """:meth:`progress` for code running in a worker thread (``asyncio.to_thread``): schedules the
        event onto the context's loop and returns at once, never waiting on the network. True if it
        was scheduled; events keep the order of the calls and all precede the final reply."""
        loop = self.loop
        if self.emit is None or self._sealed or loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(self._start, meta, parts)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True

    async def flush(self) -> None:
        """Wait until every event sent so far is published (or failed); later ones are refused.
        The node calls this before the final reply, so progress never arrives after it."""
        # Worker threads' events are callbacks already queued on the loop: let them start first.
        await asyncio.sleep(0)
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        self._sealed = True

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

    Config: declare the keys the type takes in ``config_keys``; they arrive in ``self.config``. Any other key
    (``aiflow node --agent 'TYPE:ID?answr=4'`` or a keyword) raises :class:`AgentConfigError` naming it, the
    type, the accepted keys and the closest one, before anything loads: one check for every type, built in or
    plugin. ``tier`` and ``groups`` are always accepted. A class that declares nothing (``config_keys`` None)
    takes the keyword parameters its own ``__init__`` names, and nothing else from a spec string
    (:mod:`aiflow_agents.registry`); constructed directly in Python it is not checked (older plugins).
    """

    #: Registry name; set from the entry point when loaded by name.
    type_name: ClassVar[str] = "agent"
    accepts: Accepts = Accepts()
    #: The config keys this type takes (see the class doc); None: not declared.
    config_keys: ClassVar[Collection[str] | None] = None
    #: Keywords of ``Agent.__init__`` itself, accepted by every type.
    BASE_KEYS: ClassVar[frozenset[str]] = frozenset({"tier", "groups"})

    def __init__(
        self, agent_id: str | None = None, *, tier: str | None = None, groups: Sequence[str] = (), **config: Any
    ) -> None:
        if type(self).config_keys is not None:
            type(self).check_config(config)
        self.agent_id = check_level(agent_id or self.type_name)
        self.tier = tier
        self.groups = tuple(check_level(g, "group id") for g in groups)
        self.config = config

    @classmethod
    def accepted_config_keys(cls) -> frozenset[str]:
        """Every key this type takes: ``config_keys`` (or, undeclared, its ``__init__``'s named keywords) plus
        ``tier`` and ``groups``."""
        if cls.config_keys is not None:
            return frozenset(cls.config_keys) | cls.BASE_KEYS
        named: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if klass is Agent or init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "agent_id"):
                    named.add(p.name)
        return frozenset(named) | cls.BASE_KEYS

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Raise :class:`AgentConfigError` for any key this type does not take (see the class doc)."""
        accepted = cls.accepted_config_keys()
        unknown = [k for k in config if k not in accepted]
        if unknown:
            raise AgentConfigError(cls.type_name, unknown, accepted)

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
