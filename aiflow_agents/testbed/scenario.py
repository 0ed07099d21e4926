"""Scenario files: which tiers exist, what they run and on how much CPU, how they are linked, and what
happens to the links over time (outages, congestion), plus the workload an evaluation sends.

A scenario is TOML (``tomllib``; the shipped ones live in ``aiflow_agents/testbed/scenarios``). Tiers form a
tree: each tier but the root names its ``parent`` and the link to it. With ``brokers = "per-tier"``
(default) every tier runs its own Mosquitto and a child's broker bridges to its parent's through the link;
with ``brokers = "shared"`` one broker runs at ``broker_at`` and every other tier's processes reach it
through their own link (only tiers linked directly to ``broker_at``; not with ``isolation = "netns"``).
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .link import LinkProfile, Outage

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
Kind = Literal["device", "edge", "cloud"]


class ScenarioError(ValueError):
    """A scenario file that cannot describe a testbed (the message names the field)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkSpec(_Model):
    """The link from a tier up to its parent: the profile of :class:`LinkProfile`."""

    rtt_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    up_mbps: float | None = Field(None, gt=0)
    down_mbps: float | None = Field(None, gt=0)
    loss: float = Field(0.0, ge=0, lt=1)

    def profile(self) -> LinkProfile:
        return LinkProfile.from_dict(self.model_dump())


class TierSpec(_Model):
    """One place: a kind (device, edge or cloud), a CPU quota, the agents its node hosts."""

    kind: Kind
    cores: float | None = Field(
        None, ge=0.01, description="CPU quota in cores (None: unlimited; at least 0.01: 1 ms per 100 ms)"
    )
    agents: list[str] = Field(default_factory=list, description="aiflow node --agent specs")
    parent: str | None = None
    link: LinkSpec | None = None


class LinkOutage(_Model):
    """An :class:`~aiflow_agents.testbed.link.Outage` of one tier's uplink (a vehicle in tunnels)."""

    link: str = Field(description="the child tier whose uplink goes down")
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    every_s: float | None = Field(None, gt=0)
    times: int | None = Field(None, ge=1)
    mode: Literal["blackhole", "reset"] = "blackhole"

    @model_validator(mode="after")
    def _valid(self) -> LinkOutage:
        self.outage()  # the link's own rules (every_s > duration_s, ...)
        return self

    def outage(self) -> Outage:
        return Outage.from_dict(self.model_dump(exclude={"link"}))

    def down_at(self, t: float) -> bool:
        return self.outage().down_at(t)


class Change(_Model):
    """From ``at_s`` on (for ``duration_s``, again every ``every_s``) a link takes another profile:
    congestion that comes and goes, or moves between routes."""

    link: str
    at_s: float = Field(ge=0)
    duration_s: float | None = Field(None, gt=0)
    every_s: float | None = Field(None, gt=0)
    profile: LinkSpec

    @model_validator(mode="after")
    def _period(self) -> Change:
        if self.every_s is not None and (self.duration_s is None or self.every_s <= self.duration_s):
            raise ValueError("a periodic change needs duration_s shorter than every_s")
        return self

    def active_at(self, t: float) -> bool:
        if t < self.at_s:
            return False
        if self.every_s is None:
            return self.duration_s is None or t - self.at_s < self.duration_s
        return (t - self.at_s) % self.every_s < (self.duration_s or self.every_s)


class Workload(_Model):
    """What ``aiflow eval --testbed`` sends: held-out tasks, their deadline, how many at once."""

    tasks: int = Field(200, gt=0)
    seed: int = 7
    deadline_s: float = Field(2.0, gt=0)
    concurrency: int = Field(2, gt=0)
    #: Accuracy (0-1) the adaptive policy must expect to reach; None: the deepest exit's minus ``tolerance``.
    accuracy_target: float | None = Field(None, ge=0, le=1)
    tolerance: float = Field(0.01, ge=0, le=1)
    #: Tasks per second arriving (open loop, Poisson; every policy gets each task when it arrives); None: closed
    #: loop at ``concurrency``.
    rate: float | None = Field(None, gt=0)


class Scenario(_Model):
    name: str
    description: str = ""
    brokers: Literal["per-tier", "shared"] = "per-tier"
    broker_at: str | None = None
    isolation: Literal["process", "netns"] = "process"
    heartbeat_s: float = Field(0.5, gt=0)
    telemetry_s: float = Field(1.0, gt=0)
    tiers: dict[str, TierSpec]
    outages: list[LinkOutage] = Field(default_factory=list)
    changes: list[Change] = Field(default_factory=list)
    workload: Workload = Field(default_factory=Workload)

    @field_validator("tiers")
    @classmethod
    def _names(cls, tiers: dict[str, TierSpec]) -> dict[str, TierSpec]:
        for name in tiers:
            if not _NAME.match(name):
                raise ValueError(f"tier name {name!r}: lowercase letters, digits and '-', at most 16")
        return tiers

    @model_validator(mode="after")
    def _tree(self) -> Scenario:
        roots = [n for n, t in self.tiers.items() if t.parent is None]
        if len(roots) != 1:
            raise ValueError(f"exactly one tier must have no parent (the root), found {roots}")
        for n, t in self.tiers.items():
            if t.parent is not None:
                if t.parent not in self.tiers:
                    raise ValueError(f"tier {n!r}: parent {t.parent!r} is not a tier")
                if t.link is None:
                    raise ValueError(f"tier {n!r} has a parent, so it needs a [tiers.{n}.link]")
            elif t.link is not None:
                raise ValueError(f"tier {n!r} is the root: it has no uplink")
            seen, cur = {n}, t.parent
            while cur is not None:
                if cur in seen:
                    raise ValueError(f"tier {n!r}: parents form a cycle")
                seen.add(cur)
                cur = self.tiers[cur].parent
        for o in [*self.outages, *self.changes]:
            if o.link not in self.tiers or self.tiers[o.link].parent is None:
                raise ValueError(f"{o.link!r} is not a tier with an uplink (outages and changes name the child tier)")
        if self.brokers == "shared":
            if self.isolation == "netns":
                raise ValueError(
                    "brokers = 'shared' cannot run with isolation = 'netns': the shared broker and its links listen "
                    "on the host's loopback, which processes in a tier's namespace cannot reach (use per-tier brokers)"
                )
            at = self.broker_at or self.root
            if at not in self.tiers:
                raise ValueError(f"broker_at {at!r} is not a tier")
            for n, t in self.tiers.items():
                if n != at and t.parent != at and self.tiers[at].parent != n:
                    raise ValueError(f"shared broker at {at!r}: tier {n!r} must be linked to it directly")
        if not any(t.kind == "device" for t in self.tiers.values()):
            raise ValueError("a scenario needs a device tier (the requests start there)")
        return self

    @property
    def root(self) -> str:
        return next(n for n, t in self.tiers.items() if t.parent is None)

    @property
    def device(self) -> str:
        """The tier where requests start (the first device tier)."""
        return next(n for n, t in self.tiers.items() if t.kind == "device")

    def path(self, a: str, b: str) -> list[str]:
        """Uplinks crossed from tier ``a`` to tier ``b`` (each named by its child tier)."""
        up_a, up_b = self._ancestors(a), self._ancestors(b)
        common = next(x for x in up_a if x in up_b)
        return up_a[: up_a.index(common)] + up_b[: up_b.index(common)][::-1]

    def _ancestors(self, n: str) -> list[str]:
        out = [n]
        while (p := self.tiers[out[-1]].parent) is not None:
            out.append(p)
        return out


def shipped_scenarios() -> dict[str, Path]:
    """Scenario name -> file for the scenarios shipped with the package."""
    root = resources.files("aiflow_agents.testbed") / "scenarios"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def load_scenario(source: str | Path | dict[str, Any]) -> Scenario:
    """A scenario from a shipped name (``mobile-4g``), a TOML file, or a dict; :class:`ScenarioError` if bad."""
    if isinstance(source, dict):
        data, where = source, "<dict>"
    else:
        shipped = shipped_scenarios()
        path = shipped.get(str(source)) or Path(source)
        if not path.is_file():
            raise ScenarioError(f"no scenario {str(source)!r}: not a file, nor one of {sorted(shipped)}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ScenarioError(f"{path}: {e}") from None
        data.setdefault("name", path.stem)
        where = str(path)
    try:
        return Scenario.model_validate(data)
    except ValueError as e:
        raise ScenarioError(f"{where}: {e}") from None
