"""aiflow-agents runtime: agents, nodes, request/reply client, brokers and plugins over MQTT.

Names are resolved on first use (PEP 562), so ``import aiflow_agents`` and the ``aiflow`` CLI's
start-up load nothing heavy: ``from aiflow_agents import Agent, Node, Client`` works as before and
imports only the modules those names live in. Model agents live in :mod:`aiflow_agents.models`,
test helpers in :mod:`aiflow_agents.testing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the runtime module that defines it
_EXPORTS: dict[str, str] = {
    "Accepts": "agent",
    "Agent": "agent",
    "AgentContext": "agent",
    "Reply": "agent",
    "BrokerURL": "broker",
    "BrokerURLError": "broker",
    "EmbeddedBroker": "broker",
    "broker_from_env": "broker",
    "broker_scope": "broker",
    "EchoAgent": "builtin_agents",
    "ScriptedAgent": "builtin_agents",
    "TensorStatsAgent": "builtin_agents",
    "Client": "client",
    "Exchange": "client",
    "Backoff": "connection",
    "Connection": "connection",
    "PublishRejectedError": "connection",
    "AgentConfigError": "errors",
    "AgentError": "errors",
    "AgentLostError": "errors",
    "AgentUnavailableError": "errors",
    "AiflowError": "errors",
    "BrokerUnavailableError": "errors",
    "ConnectionLostError": "errors",
    "RemoteAgentError": "errors",
    "RequestTimeoutError": "errors",
    "Forwarding": "forwarding",
    "RouteForwarding": "forwarding",
    "configure_logging": "log",
    "InvalidTopicError": "mqtt",
    "MemoryBroker": "mqtt",
    "Message": "mqtt",
    "Will": "mqtt",
    "Node": "node",
    "Presence": "presence",
    "AgentSpec": "registry",
    "UnknownAgentTypeError": "registry",
    "available": "registry",
    "create": "registry",
    "load": "registry",
    "Prober": "probe",
    "AgentLoad": "telemetry",
    "AgentTelemetry": "telemetry",
    "LinkEstimate": "telemetry",
    "NodeTelemetry": "telemetry",
    "Overhead": "telemetry",
    "Telemetry": "telemetry",
    "TelemetryRecord": "telemetry",
}

if TYPE_CHECKING:
    from .agent import Accepts, Agent, AgentContext, Reply
    from .broker import BrokerURL, BrokerURLError, EmbeddedBroker, broker_from_env, broker_scope
    from .builtin_agents import EchoAgent, ScriptedAgent, TensorStatsAgent
    from .client import Client, Exchange
    from .connection import Backoff, Connection, PublishRejectedError
    from .errors import (
        AgentError,
        AgentLostError,
        AgentUnavailableError,
        AiflowError,
        BrokerUnavailableError,
        ConnectionLostError,
        RemoteAgentError,
        RequestTimeoutError,
    )
    from .forwarding import Forwarding, RouteForwarding
    from .log import configure_logging
    from .mqtt import InvalidTopicError, MemoryBroker, Message, Will
    from .node import Node
    from .presence import Presence
    from .probe import Prober
    from .registry import AgentSpec, UnknownAgentTypeError, available, create, load
    from .telemetry import (
        AgentLoad,
        AgentTelemetry,
        LinkEstimate,
        NodeTelemetry,
        Overhead,
        Telemetry,
        TelemetryRecord,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "Accepts",
    "Agent",
    "AgentConfigError",
    "AgentContext",
    "AgentError",
    "AgentLoad",
    "AgentLostError",
    "AgentSpec",
    "AgentTelemetry",
    "AgentUnavailableError",
    "AiflowError",
    "Backoff",
    "BrokerURL",
    "BrokerURLError",
    "BrokerUnavailableError",
    "Client",
    "Connection",
    "ConnectionLostError",
    "EchoAgent",
    "EmbeddedBroker",
    "Exchange",
    "Forwarding",
    "InvalidTopicError",
    "LinkEstimate",
    "MemoryBroker",
    "Message",
    "Node",
    "NodeTelemetry",
    "Overhead",
    "Presence",
    "Prober",
    "PublishRejectedError",
    "RemoteAgentError",
    "Reply",
    "RequestTimeoutError",
    "RouteForwarding",
    "ScriptedAgent",
    "Telemetry",
    "TelemetryRecord",
    "TensorStatsAgent",
    "UnknownAgentTypeError",
    "Will",
    "__version__",
    "available",
    "broker_from_env",
    "broker_scope",
    "configure_logging",
    "create",
    "load",
]
