"""Runtime failures a caller can catch by type; each names the agent and the reason."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from difflib import get_close_matches

from protocols import ErrorInfo


class AiflowError(Exception):
    """Base of every runtime error of aiflow-agents."""

    code = "aiflow_error"


class BrokerUnavailableError(AiflowError):
    """The broker could not be reached (or refused us) within the allowed time."""

    code = "broker_unavailable"


class ConnectionLostError(AiflowError):
    """The broker connection dropped while a request was in flight; its reply can no longer arrive."""

    code = "connection_lost"


class AgentUnavailableError(AiflowError):
    """No online node hosts the agent: fail fast instead of waiting for a timeout."""

    code = "agent_unavailable"

    def __init__(self, agent_id: str, online: list[str] | None = None) -> None:
        hint = f"; online agents: {', '.join(sorted(online))}" if online else "; no agents are online"
        super().__init__(f"agent {agent_id!r} is not online{hint}")
        self.agent_id = agent_id


class AgentLostError(AgentUnavailableError):
    """The node holding the request went offline (Last Will, missed heartbeats) before answering.

    Retryable: the request may or may not have run. Raised within about a second of the node's
    loss instead of at the deadline; a request marked ``idempotent`` is re-sent instead."""

    code = "agent_lost"
    retryable = True

    def __init__(self, agent_id: str, node_id: str | None, reason: str, online: list[str] | None = None) -> None:
        super().__init__(agent_id, online)
        where = f"node {node_id!r}" if node_id else "its node"
        self.args = (f"agent {agent_id!r} lost: {where} went offline ({reason}) before answering",)
        self.node_id = node_id
        self.reason = reason


class RequestTimeoutError(AiflowError, TimeoutError):
    code = "timeout"

    def __init__(self, agent_id: str, timeout: float, request_id: str) -> None:
        super().__init__(f"no reply from agent {agent_id!r} within {timeout:.3g}s (request {request_id})")
        self.agent_id = agent_id
        self.timeout = timeout
        self.request_id = request_id


class RemoteAgentError(AiflowError):
    """The agent (or its node) answered with an error envelope."""

    def __init__(self, info: ErrorInfo, agent_id: str | None = None) -> None:
        who = info.agent or agent_id or "?"
        super().__init__(f"agent {who!r} failed [{info.code}]: {info.message}")
        self.info = info
        self.code = info.code
        self.agent_id = who


class AgentConfigError(AiflowError, ValueError):
    """An agent was given a config key its type does not take (``TYPE:ID?key=value`` or a keyword): a typo
    must never pass silently. Names the key(s), the agent type, the accepted keys and the closest match."""

    code = "bad_agent_config"

    def __init__(self, agent_type: str, unknown: Sequence[str], accepted: Iterable[str]) -> None:
        self.agent_type = agent_type
        self.unknown = tuple(unknown)
        self.accepted = tuple(sorted(accepted))
        self.suggestions = {k: m[0] for k in self.unknown if (m := get_close_matches(k, self.accepted, n=1))}
        what = ", ".join(
            repr(k) + (f" (did you mean {self.suggestions[k]!r}?)" if k in self.suggestions else "")
            for k in self.unknown
        )
        keys = "key" if len(self.unknown) == 1 else "keys"
        takes = ", ".join(self.accepted) if self.accepted else "none"
        super().__init__(f"agent type {agent_type!r} has no config {keys} {what}; accepted keys: {takes}")


class AgentError(AiflowError):
    """Raise from a handler to answer with a chosen error code instead of ``handler_error``."""

    def __init__(self, message: str, *, code: str = "agent_error", retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
