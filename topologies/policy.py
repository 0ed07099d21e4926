"""Cascade acceptance policies: when does a stage's answer stand, and when does it escalate."""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocols import ops

from .graph import AgentRef, GraphError, agent


@dataclass(frozen=True, slots=True)
class ConfidenceAtLeast:
    """Accept when the agent's own reported confidence reaches the threshold. Nodes can apply it
    themselves, which lets a cascade escalate in one direct hop."""

    threshold: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise GraphError(f"confidence threshold must be in [0, 1], got {self.threshold}")

    def accepts(self, confidence: float | None) -> bool:
        return self.wire().accepts_confidence(confidence)

    def wire(self) -> ops.AcceptancePolicy:
        """The policy as nodes apply it (request ``meta.acceptance``)."""
        return ops.AcceptancePolicy(min_confidence=self.threshold)

    def __str__(self) -> str:
        return f"confidence>={self.threshold:g}"


@dataclass(frozen=True, slots=True)
class PerStageConfidence:
    """One confidence threshold per stage (e.g. tuned per exit of a familial model). Stage ``i``
    answers when its confidence reaches ``thresholds[i]``; the last stage always answers."""

    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        for t in self.thresholds:
            if not 0.0 <= t <= 1.0:
                raise GraphError(f"confidence thresholds must be in [0, 1], got {t}")

    def at(self, stage: int) -> ConfidenceAtLeast:
        return ConfidenceAtLeast(self.thresholds[stage] if stage < len(self.thresholds) else 0.0)

    def __str__(self) -> str:
        return "confidence>=" + "/".join(f"{t:g}" for t in self.thresholds)


@dataclass(frozen=True, slots=True)
class Verifier:
    """Accept when a verifier agent accepts the stage's answer (op ``verify``)."""

    verifier: AgentRef

    def __str__(self) -> str:
        return f"verifier:{self.verifier.agent_id}"


AcceptPolicy = ConfidenceAtLeast | PerStageConfidence | Verifier
_CONF = re.compile(r"^\s*confidence\s*>=\s*([0-9]*\.?[0-9]+)\s*$")


def verifier(agent_id: str) -> Verifier:
    return Verifier(agent(agent_id))


def parse_policy(value: str | float | list[float] | tuple[float, ...] | AcceptPolicy) -> AcceptPolicy:
    """``"confidence>=0.8"``, a bare number, a list of per-stage thresholds, ``"verifier:AGENT"``,
    or a policy object."""
    if isinstance(value, (ConfidenceAtLeast, PerStageConfidence, Verifier)):
        return value
    if isinstance(value, (list, tuple)):
        return PerStageConfidence(tuple(float(v) for v in value))
    if isinstance(value, (int, float)):
        return ConfidenceAtLeast(float(value))
    m = _CONF.match(value)
    if m:
        return ConfidenceAtLeast(float(m.group(1)))
    if value.startswith("verifier:"):
        return verifier(value.split(":", 1)[1])
    raise GraphError(f"bad acceptance policy {value!r}: use 'confidence>=X' or 'verifier:AGENT'")
