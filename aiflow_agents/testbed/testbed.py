"""The testbed: a scenario's tiers as places — their own processes, brokers, CPU quotas and (as root)
network namespaces — joined by emulated links that follow the scenario's outage and congestion schedule.

Every tier's node runs in its own OS process. With per-tier brokers, each tier has its own Mosquitto and
a child tier's broker bridges to its parent's through a :class:`LinkProxy`, so every byte between tiers
crosses a link with the scenario's delay, jitter, bandwidth and loss; traffic inside a tier does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..broker import BrokerURL, EmbeddedBroker, free_port
from ..client import Client
from ..launch import NodeProcess
from ..registry import AgentSpec
from .compute import CpuQuota, cpu_quota_unavailable
from .link import LinkProfile, LinkStats
from .links import LinkEvent, LinkHost, LinkPlan
from .mosquitto import MosquittoProcess, TestbedError, mosquitto_binary
from .netns import NetNamespace, free_subnet_index, netns_unavailable
from .scenario import Scenario, load_scenario

log = logging.getLogger(__name__)


@dataclass
class TierRuntime:
    """What runs for one tier, and where a client at that tier connects."""

    name: str
    kind: str
    url: BrokerURL
    broker: MosquittoProcess | None = None
    node: NodeProcess | None = None
    link: LinkPlan | None = None
    quota: CpuQuota | None = None
    netns: NetNamespace | None = None
    agents: list[str] = field(default_factory=list)


class Testbed:
    """Start with ``async with Testbed(scenario) as tb:``; ``tb.url("device")`` is where a device app connects."""

    def __init__(
        self,
        scenario: Scenario | str | Path,
        *,
        workdir: Path | None = None,
        namespace: str | None = None,
        strict: bool = False,
        ready_timeout: float = 120.0,
    ) -> None:
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.run_id = uuid.uuid4().hex[:6]
        self.namespace = namespace or f"tb{self.run_id}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"aiflow-testbed-{self.scenario.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.strict = strict
        self.ready_timeout = ready_timeout
        self.tiers: dict[str, TierRuntime] = {}
        self.warnings: list[str] = []
        self.links: LinkHost | None = None
        self._embedded: EmbeddedBroker | None = None
        self._t0: float | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Testbed:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _degrade(self, what: str) -> None:
        if self.strict:
            raise TestbedError(what)
        self.warnings.append(what)
        log.warning(what)

    async def start(self) -> Testbed:
        sc = self.scenario
        if sc.brokers == "per-tier" and mosquitto_binary() is None:
            raise TestbedError("per-tier brokers need mosquitto (apt-get install -y mosquitto), or brokers = 'shared'")
        quotas = any(t.cores for t in sc.tiers.values())
        why_no_quota = cpu_quota_unavailable() if quotas else None
        if why_no_quota:
            self._degrade(f"CPU quotas not applied: {why_no_quota}")
        use_netns = sc.isolation == "netns"
        if use_netns and (why := netns_unavailable()):
            self._degrade(f"network namespaces not used: {why}")
            use_netns = False
        for i, (name, t) in enumerate(self._top_down()):
            rt = TierRuntime(name=name, kind=t.kind, url=BrokerURL(), agents=list(t.agents))
            if t.cores and not why_no_quota:
                rt.quota = CpuQuota(f"{self.run_id}-{name}", t.cores).create()
            if use_netns:
                rt.netns = NetNamespace(f"aif{self.run_id}{i}", subnet_index=free_subnet_index())
                self.tiers[name] = rt  # registered first, so stop() deletes it if create() fails halfway
                rt.netns.create()
            self.tiers[name] = rt
        if sc.brokers == "per-tier":
            self._start_per_tier_brokers()
        else:
            await self._start_shared_broker()
        plans = [rt.link for rt in self.tiers.values() if rt.link is not None]
        if plans:
            self.links = await LinkHost(sc, plans, log_path=str(self.workdir / "links.log")).start()
        for rt in self.tiers.values():
            if rt.broker is not None:
                # Brokers stay out of the tier's CPU quota: the quota models the tier's model compute, and a
                # throttled broker would stall every message through it (a local broker on a real device
                # is a small fraction of its CPU).
                rt.broker.start()
        for rt in self.tiers.values():
            if rt.agents:
                rt.node = NodeProcess(
                    rt.agents,
                    rt.url,
                    namespace=self.namespace,
                    tier=rt.kind,
                    node_id=f"{self.namespace}-{rt.name}",
                    log_path=self.workdir / f"{rt.name}.node.log",
                    extra_args=[
                        "--heartbeat",
                        str(sc.heartbeat_s),
                        "--telemetry",
                        str(sc.telemetry_s),
                        "--log-level",
                        "warning",
                    ],
                    prefix=rt.netns.exec_prefix() if rt.netns else (),
                ).start()
                self._confine(rt, rt.node.pid)
        await self._wait_ready()
        return self

    def _confine(self, rt: TierRuntime, pid: int | None) -> None:
        if rt.quota is not None and pid is not None:
            rt.quota.add(pid)

    def _top_down(self) -> list[tuple[str, Any]]:
        sc = self.scenario
        order, frontier = [], [sc.root]
        while frontier:
            n = frontier.pop(0)
            order.append((n, sc.tiers[n]))
            frontier += [c for c, t in sc.tiers.items() if t.parent == n]
        return order

    def _host(self, rt: TierRuntime) -> str:
        return rt.netns.ns_address if rt.netns is not None else "127.0.0.1"

    def _start_per_tier_brokers(self) -> None:
        for name, t in self._top_down():
            rt = self.tiers[name]
            host, port = self._host(rt), free_port()
            bridge_to = None
            if t.parent is not None:
                parent = self.tiers[t.parent]
                assert parent.broker is not None
                host_side = rt.netns.host_address if rt.netns is not None else "127.0.0.1"
                listen = (host_side, free_port(host_side))
                rt.link = LinkPlan(name, listen, (parent.broker.host, parent.broker.port), rt.netns is not None)
                bridge_to = listen
                if rt.netns is not None:
                    spec = t.link
                    assert spec is not None
                    rt.netns.shape(up_mbps=spec.up_mbps, down_mbps=spec.down_mbps)
            rt.broker = MosquittoProcess(
                f"{self.run_id}-{name}",
                port,
                self.workdir,
                host=host,
                bridge_to=bridge_to,
                prefix=rt.netns.exec_prefix() if rt.netns else (),
            )
            rt.url = BrokerURL(host=host, port=port, protocol="5")

    async def _start_shared_broker(self) -> None:
        sc = self.scenario
        at = sc.broker_at or sc.root
        hub = self.tiers[at]
        if mosquitto_binary() is not None:
            hub.broker = MosquittoProcess(f"{self.run_id}-{at}", free_port(), self.workdir)
            host, port = hub.broker.host, hub.broker.port
            hub.url = BrokerURL(host=host, port=port, protocol="5")
        else:
            self._embedded = EmbeddedBroker("127.0.0.1", free_port())
            hub.url = await self._embedded.start()
            host, port = hub.url.host, hub.url.port
        for name, rt in self.tiers.items():
            if name == at:
                continue
            link_tier = name if sc.tiers[name].parent == at else at
            lp = free_port()
            rt.link = LinkPlan(link_tier, ("127.0.0.1", lp), (host, port))
            rt.url = BrokerURL(host="127.0.0.1", port=lp, protocol=hub.url.protocol)

    async def _wait_ready(self) -> None:
        want = [_agent_id(a) for rt in self.tiers.values() for a in rt.agents]
        # every tier must see every agent: that proves each bridge carries presence both ways
        for rt in self.tiers.values():
            async with Client(rt.url, namespace=self.namespace) as c:
                try:
                    await c.wait_for_agents(want, timeout=self.ready_timeout)
                except Exception as e:
                    logs = {p.name: p.read_text(errors="replace")[-800:] for p in self.workdir.glob("*.log")}
                    raise TestbedError(f"tier {rt.name}: agents not online: {e}; logs: {logs}") from None

    async def stop(self) -> None:
        await self.stop_clock()
        nodes = [rt.node for rt in self.tiers.values() if rt.node is not None]
        await asyncio.gather(*(n.astop() for n in nodes), return_exceptions=True)
        if self.links is not None:
            with contextlib.suppress(Exception):
                await self.links.stop()
            self.links = None
        for rt in self.tiers.values():
            if rt.broker is not None:
                rt.broker.stop()
        if self._embedded is not None:
            await self._embedded.stop()
            self._embedded = None
        for rt in self.tiers.values():
            if rt.quota is not None:
                rt.quota.remove()
            if rt.netns is not None:
                rt.netns.delete()

    # -- where things are -----------------------------------------------------------------------
    def url(self, tier: str | None = None) -> BrokerURL:
        """Where a client at ``tier`` (default: the device) connects."""
        return self.tiers[tier or self.scenario.device].url

    def _links(self) -> LinkHost:
        if self.links is None:
            raise TestbedError("this testbed has no links (one tier, or not started)")
        return self.links

    async def link_stats(self) -> dict[str, LinkStats]:
        """Counters of every link, by the tier whose uplink it is."""
        return await self._links().stats()

    async def cut(self, tier: str, mode: str = "blackhole") -> None:
        """Take ``tier``'s uplink down now (besides the schedule)."""
        await self._links().cut(tier, mode)

    async def restore(self, tier: str) -> None:
        await self._links().restore(tier)

    async def set_profile(self, tier: str, profile: LinkProfile) -> None:
        await self._links().set_profile(tier, profile)

    def describe(self) -> dict[str, Any]:
        sc = self.scenario
        return {
            "scenario": sc.name,
            "namespace": self.namespace,
            "brokers": sc.brokers,
            "isolation": "netns" if any(rt.netns for rt in self.tiers.values()) else "process",
            "workdir": str(self.workdir),
            "warnings": list(self.warnings),
            "tiers": {
                n: {
                    "kind": rt.kind,
                    "url": rt.url.url(),
                    "cores": sc.tiers[n].cores if rt.quota is not None else None,
                    "agents": rt.agents,
                    "node_pid": rt.node.pid if rt.node else None,
                    "broker_pid": rt.broker.pid if rt.broker else None,
                    "uplink": (sc.tiers[n].link.model_dump() if sc.tiers[n].link else None),
                    "parent": sc.tiers[n].parent,
                }
                for n, rt in self.tiers.items()
            },
        }

    # -- the schedule ---------------------------------------------------------------------------
    async def start_clock(self) -> None:
        """t = 0 of the scenario's outage and congestion schedule (call when traffic starts)."""
        if self._t0 is None:
            self._t0 = time.monotonic()
            if self.links is not None:
                await self.links.start_clock()

    async def stop_clock(self) -> None:
        if self.links is not None and self._t0 is not None:
            with contextlib.suppress(Exception):
                await self.links.stop_clock()
        self._t0 = None

    def elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def outage_at(self, tier: str, t: float) -> bool:
        """Whether the schedule has ``tier``'s uplink down at ``t``."""
        return any(o.link == tier and o.down_at(t) for o in self.scenario.outages)

    async def link_events(self) -> list[LinkEvent]:
        """What the schedule did to the links so far."""
        return await self.links.events() if self.links is not None else []


def _agent_id(spec: str) -> str:
    s = AgentSpec.parse(spec)
    return s.agent_id or s.type_name


@contextlib.asynccontextmanager
async def testbed(scenario: Scenario | str | Path, **kwargs: Any) -> AsyncIterator[Testbed]:
    """``async with testbed("mobile-4g") as tb: ...`` — the testbed up, then torn down."""
    async with Testbed(scenario, **kwargs) as tb:
        yield tb
