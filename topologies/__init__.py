"""Agent graphs and collaboration patterns over the bus: debate, cascade, ensemble,
mixture-of-agents (and any pattern you write with the same building blocks)."""

from collections.abc import Sequence
from typing import Any

from .aggregate import Aggregate, cross_score, judged, latent_average, vote
from .cascade import Cascade
from .dataflow import Dataflow
from .debate import Debate
from .ensemble import Ensemble
from .graph import AgentGraph, AgentRef, GraphError, Tier, agent
from .manager import RunResult, TopologyManager
from .moa import MixtureOfAgents
from .pattern import Outcome, Pattern, Runtime
from .policy import AcceptPolicy, ConfidenceAtLeast, PerStageConfidence, Verifier, parse_policy, verifier
from .scheduling import (
    Calibration,
    LinkView,
    Member,
    NetworkAware,
    NetworkView,
    Plan,
    PlanContext,
    Policy,
    Scheduled,
    StaticView,
    TelemetryView,
    confidence_cascade,
    fixed_split,
    local_only,
    remote_only,
)
from .speculative import Speculative
from .trace import Trace, TraceEvent


def ensemble(members: Sequence[Any], aggregate: str = "vote", **kw: Any) -> Ensemble:
    return Ensemble(members, aggregate=aggregate, **kw)


def debate(agents: Sequence[Any], rounds: int = 2, aggregate: str = "vote", **kw: Any) -> Debate:
    return Debate(agents, rounds=rounds, aggregate=aggregate, **kw)


def cascade(
    stages: Sequence[Any], accept: str | float | list[float] | AcceptPolicy = "confidence>=0.8", **kw: Any
) -> Cascade:
    return Cascade(stages, accept=accept, **kw)


def speculative(drafter: Any, verifier: Any, gamma: int = 4, **kw: Any) -> Speculative:
    """Draft near the user, verify far away; greedy output equals the verifier's own."""
    return Speculative(drafter, verifier, gamma=gamma, **kw)


def mixture_of_agents(layers: Sequence[Sequence[Any]], aggregator: Any, **kw: Any) -> MixtureOfAgents:
    return MixtureOfAgents(layers, aggregator, **kw)


__all__ = [
    "AcceptPolicy",
    "AgentGraph",
    "AgentRef",
    "Aggregate",
    "Calibration",
    "Cascade",
    "ConfidenceAtLeast",
    "Dataflow",
    "Debate",
    "Ensemble",
    "GraphError",
    "LinkView",
    "Member",
    "MixtureOfAgents",
    "NetworkAware",
    "NetworkView",
    "Outcome",
    "Pattern",
    "PerStageConfidence",
    "Plan",
    "PlanContext",
    "Policy",
    "RunResult",
    "Runtime",
    "Scheduled",
    "Speculative",
    "StaticView",
    "TelemetryView",
    "Tier",
    "TopologyManager",
    "Trace",
    "TraceEvent",
    "Verifier",
    "agent",
    "cascade",
    "confidence_cascade",
    "cross_score",
    "debate",
    "ensemble",
    "fixed_split",
    "judged",
    "latent_average",
    "local_only",
    "mixture_of_agents",
    "parse_policy",
    "remote_only",
    "speculative",
    "verifier",
    "vote",
]
