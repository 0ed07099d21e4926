"""aiflow-agents runtime: agents, nodes, request/reply client, brokers and plugins over MQTT."""

from .agent import Accepts, Agent, AgentContext, Reply
from .broker import BrokerURL, BrokerURLError, EmbeddedBroker, broker_from_env, broker_scope, free_port
from .builtin_agents import EchoAgent, ScriptedAgent, TensorStatsAgent
from .client import Client, Exchange
from .connection import Backoff, Connection
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
from .launch import NodeProcess
from .log import configure_logging
from .mqtt import InvalidTopicError, MemoryBroker, Message, Will
from .node import Node
from .presence import Presence
from .registry import AgentSpec, UnknownAgentTypeError, available, create, load

__version__ = "0.1.0"

__all__ = [
    "Accepts",
    "Agent",
    "AgentContext",
    "AgentError",
    "AgentLostError",
    "AgentSpec",
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
    "InvalidTopicError",
    "MemoryBroker",
    "Message",
    "Node",
    "NodeProcess",
    "Presence",
    "RemoteAgentError",
    "Reply",
    "RequestTimeoutError",
    "ScriptedAgent",
    "TensorStatsAgent",
    "UnknownAgentTypeError",
    "Will",
    "__version__",
    "available",
    "broker_from_env",
    "broker_scope",
    "configure_logging",
    "create",
    "free_port",
    "load",
]
