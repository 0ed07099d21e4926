"""Agent plugins: every agent type, built-in or third-party, comes from the entry-point group
``aiflow_agents.agents`` (name -> ``module:Class``). A spec's config keys are checked against the type's
declared keys (:meth:`Agent.check_config`) before the agent is built, for every type the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import parse_qsl

from .agent import Agent
from .errors import AiflowError

GROUP = "aiflow_agents.agents"


class UnknownAgentTypeError(AiflowError, LookupError):
    code = "unknown_agent_type"


def available() -> dict[str, EntryPoint]:
    """Installed agent types by name (the last installed wins on a clash)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str) -> type[Agent]:
    eps = available()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise UnknownAgentTypeError(f"no agent type {name!r} is installed (group {GROUP}); available: {known}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise UnknownAgentTypeError(f"entry point {name!r} -> {eps[name].value} is not an Agent subclass")
    if cls.__dict__.get("type_name") is None or cls.type_name == "agent":
        cls.type_name = name
    return cls


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """``NAME[:ID][?key=value&...]`` as given to ``aiflow node --agent``.

    Values are read as JSON when they parse (numbers, booleans, objects), else as strings.
    """

    type_name: str
    agent_id: str | None
    config: dict[str, Any]

    @classmethod
    def parse(cls, spec: str) -> AgentSpec:
        head, _, query = spec.partition("?")
        type_name, _, agent_id = head.partition(":")
        if not type_name:
            raise ValueError(f"empty agent type in {spec!r} (expected NAME[:ID][?key=value])")
        config: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            try:
                config[key] = json.loads(value)
            except ValueError:
                config[key] = value
        return cls(type_name=type_name, agent_id=agent_id or None, config=config)

    def check(self, **overrides: Any) -> type[Agent]:
        """The agent class, once the config keys are known to it: :class:`UnknownAgentTypeError` for an
        unknown type, :class:`~aiflow_agents.errors.AgentConfigError` for a key the type does not take. Nothing
        is built (a node checks every ``--agent`` before loading any model)."""
        cls = load(self.type_name)
        cls.check_config({**self.config, **overrides})
        return cls

    def create(self, **overrides: Any) -> Agent:
        cls = self.check(**overrides)
        return cls(self.agent_id or self.type_name, **{**self.config, **overrides})


def create(spec: str, **overrides: Any) -> Agent:
    return AgentSpec.parse(spec).create(**overrides)
