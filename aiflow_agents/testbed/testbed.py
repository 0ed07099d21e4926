"""The testbed: a scenario's tiers as places — their own processes, brokers, CPU quotas and (as root)
network namespaces — joined by emulated links that follow the scenario's outage and congestion schedule.

Every tier's node runs in its own OS process. With per-tier brokers, each tier has its own Mosquitto and
a child tier's broker bridges to its parent's through a :class:`LinkProxy`, so every byte between tiers
crosses a link with the scenario's delay, jitter, bandwidth and loss; traffic inside a tier does not.
Network namespaces isolate the tiers' network stacks only: the links' proxies emulate every property of a
link, bandwidth included, so the veth pairs (which also carry traffic inside a tier) are not shaped.

What cannot be had on this machine (CPU quotas, namespaces) is left out with a warning in
:attr:`Testbed.warnings`, or refused with :class:`TestbedError` when ``strict``.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..broker import BrokerURL, EmbeddedBroker, free_port
from ..client import Client
from ..launch import NodeProcess
from ..registry import AgentSpec
from .compute import CpuQuota, CpuQuotaError, cpu_quota_unavailable
from .link import LinkProfile, LinkStats
from .links import LinkEvent, LinkHost, LinkPlan
from .mosquitto import MosquittoProcess, TestbedError, bridge_topics, mosquitto_binary
from .netns import NetNamespace, NetNamespaceError, free_subnet_index, netns_unavailable
from .scenario import Scenario, TierSpec, load_scenario

log = logging.getLogger(__name__)


@dataclass
class TierRuntime:
    """What runs for one tier, and where a client at that tier connects."""

    name: str
    kind: str
    url: BrokerURL
    broker: MosquittoProcess | None = None
    node: NodeProcess | None = None
    node_id: str | None = None  # the node's id (f"{namespace}-{tier}") when the tier hosts agents
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
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _degrade(self, what: str) -> None:
        """Go on without something this machine cannot give (a warning), or refuse when strict."""
        if self.strict:
            raise TestbedError(what)
        self.warnings.append(what)
        log.warning(what)

    async def start(self) -> Testbed:
        """Bring every tier up; if anything fails, what was started is stopped again before this raises."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        sc = self.scenario
        if sc.brokers == "per-tier" and mosquitto_binary() is None:
            raise TestbedError("per-tier brokers need mosquitto (apt-get install -y mosquitto), or brokers = 'shared'")
        for name, t in self._top_down():  # registered first: stop() undoes whatever is built from here on
            self.tiers[name] = TierRuntime(name=name, kind=t.kind, url=BrokerURL(), agents=list(t.agents))
        await self._create_quotas()
        await self._create_namespaces()
        if sc.brokers == "per-tier":
            self._plan_per_tier_brokers()
        else:
            await self._plan_shared_broker()
        plans = [rt.link for rt in self.tiers.values() if rt.link is not None]
        if plans:
            self.links = LinkHost(sc, plans, log_path=str(self.workdir / "links.log"))
            await self.links.start()
        # Brokers stay out of the tier's CPU quota: the quota models the tier's model compute, and a throttled
        # broker would stall every message through it (a local broker on a real device is a small fraction of
        # its CPU). A child's bridge retries until its parent's broker listens, so they start all at once.
        brokers = [rt.broker for rt in self.tiers.values() if rt.broker is not None]
        started = await asyncio.gather(*(asyncio.to_thread(b.start) for b in brokers), return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        for rt in self.tiers.values():
            if rt.agents:
                self._start_node(rt)
        await self._wait_ready()

    async def _create_quotas(self) -> None:
        """A CPU quota for every tier with ``cores``: all of them or (with a warning) none, since a comparison
        with some tiers throttled and others not would measure the wrong machine."""
        wanted = [(rt, t.cores) for rt, t in self._runtimes() if t.cores]
        if not wanted:
            return
        why = await asyncio.to_thread(cpu_quota_unavailable)
        if why is None:
            try:
                for rt, cores in wanted:
                    rt.quota = await asyncio.to_thread(CpuQuota(f"{self.run_id}-{rt.name}", cores).create)
                return
            except CpuQuotaError as e:
                why = str(e)
                await self._remove_quotas()
        self._degrade(f"CPU quotas not applied: {why}")

    async def _create_namespaces(self) -> None:
        if self.scenario.isolation != "netns":
            return
        why = await asyncio.to_thread(netns_unavailable)
        if why is None:
            try:
                for i, rt in enumerate(self.tiers.values()):
                    index = await asyncio.to_thread(free_subnet_index)
                    rt.netns = NetNamespace(f"aif{self.run_id}{i}", subnet_index=index)
                    await asyncio.to_thread(rt.netns.create)
                return
            except NetNamespaceError as e:
                why = str(e)
                await self._delete_namespaces()
        self._degrade(f"network namespaces not used: {why}")

    def _node_id(self, rt: TierRuntime) -> str:
        return f"{self.namespace}-{rt.name}"

    def _start_node(self, rt: TierRuntime) -> None:
        sc = self.scenario
        rt.node_id = self._node_id(rt)
        rt.node = NodeProcess(
            rt.agents,
            rt.url,
            namespace=self.namespace,
            tier=rt.kind,
            node_id=rt.node_id,
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
        if rt.quota is not None and rt.node.pid is not None:
            try:
                rt.quota.add(rt.node.pid)
            except (CpuQuotaError, OSError) as e:  # a node that died at once is reported by _wait_ready
                self._degrade(f"tier {rt.name}: node not in its CPU quota: {e}")

    def _top_down(self) -> list[tuple[str, TierSpec]]:
        sc = self.scenario
        order, frontier = [], [sc.root]
        while frontier:
            n = frontier.pop(0)
            order.append((n, sc.tiers[n]))
            frontier += [c for c, t in sc.tiers.items() if t.parent == n]
        return order

    def _runtimes(self) -> list[tuple[TierRuntime, TierSpec]]:
        return [(rt, self.scenario.tiers[name]) for name, rt in self.tiers.items()]

    def _bridge_topics(self, tier: str) -> list[str]:
        """What tier's bridge carries: requests only towards the subtree that hosts their agent."""
        sc = self.scenario
        subtree = {tier}
        while grown := {n for n, t in sc.tiers.items() if t.parent in subtree} - subtree:
            subtree |= grown
        inside = [self.tiers[n] for n in sc.tiers if n in subtree]
        outside = [self.tiers[n] for n in sc.tiers if n not in subtree]
        agents = lambda rts: [_agent_id(a) for rt in rts for a in rt.agents]  # noqa: E731
        nodes = lambda rts: [self._node_id(rt) for rt in rts if rt.agents]  # noqa: E731
        return bridge_topics(agents(inside), agents(outside), nodes(inside), nodes(outside))

    def _plan_per_tier_brokers(self) -> None:
        """Each tier's Mosquitto (not started yet) and, for a child tier, the link its bridge crosses."""
        for rt, t in self._runtimes():  # top-down: a parent's broker is planned before its children's
            host = rt.netns.ns_address if rt.netns is not None else "127.0.0.1"
            port = free_port()  # inside a namespace every port is free; on the host, this one is
            bridge_to = None
            if t.parent is not None:
                parent = self.tiers[t.parent]
                assert parent.broker is not None
                host_side = rt.netns.host_address if rt.netns is not None else "127.0.0.1"
                bridge_to = (host_side, free_port(host_side))
                rt.link = LinkPlan(rt.name, bridge_to, (parent.broker.host, parent.broker.port))
            rt.broker = MosquittoProcess(
                f"{self.run_id}-{rt.name}",
                port,
                self.workdir,
                host=host,
                bridge_to=bridge_to,
                bridge_topics=self._bridge_topics(rt.name),
                prefix=rt.netns.exec_prefix() if rt.netns else (),
            )
            rt.url = BrokerURL(host=host, port=port, protocol="5")

    async def _plan_shared_broker(self) -> None:
        """One broker at ``broker_at``; every other tier reaches it through the link between the two."""
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
            lp = free_port()
            if sc.tiers[name].parent == at:  # a child of the hub: its uplink, in the uplink's direction
                rt.link = LinkPlan(name, ("127.0.0.1", lp), (host, port))
            else:  # the hub's parent: the hub's uplink, crossed from its far end
                rt.link = LinkPlan(at, ("127.0.0.1", lp), (host, port), reverse=True)
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
        """Stop and remove everything started, each part on its own: one that fails to go away (logged and
        added to :attr:`warnings`) does not keep the others. Idempotent."""
        await self.stop_clock()
        nodes = [rt.node for rt in self.tiers.values() if rt.node is not None]
        await asyncio.gather(*(self._cleanup(f"stopping node {n.pid}", n.astop()) for n in nodes))
        links, self.links = self.links, None
        if links is not None:
            await self._cleanup("stopping the link process", links.stop())
        brokers = [rt.broker for rt in self.tiers.values() if rt.broker is not None]
        await asyncio.gather(
            *(self._cleanup(f"stopping mosquitto {b.name}", asyncio.to_thread(b.stop)) for b in brokers)
        )
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await self._cleanup("stopping the embedded broker", embedded.stop())
        await self._remove_quotas()
        await self._delete_namespaces()

    async def _remove_quotas(self) -> None:
        for rt in self.tiers.values():
            if rt.quota is not None and await self._cleanup(
                f"removing cgroup {rt.quota.name}", asyncio.to_thread(rt.quota.remove)
            ):
                rt.quota = None

    async def _delete_namespaces(self) -> None:
        for rt in self.tiers.values():
            if rt.netns is not None and await self._cleanup(
                f"deleting namespace {rt.netns.name}", asyncio.to_thread(rt.netns.delete)
            ):
                rt.netns = None

    async def _cleanup(self, what: str, step: Awaitable[object]) -> bool:
        """Await one cleanup step; a failure is logged and kept in :attr:`warnings`, never raised."""
        try:
            await step
        except Exception as e:
            msg = f"{what} failed: {type(e).__name__}: {e}"
            self.warnings.append(msg)
            log.error("testbed cleanup: %s", msg)
            return False
        return True

    # -- where things are -----------------------------------------------------------------------
    def url(self, tier: str | None = None) -> BrokerURL:
        """Where a client at ``tier`` (default: the device) connects."""
        return self.tiers[tier or self.scenario.device].url

    def _links(self) -> LinkHost:
        if self.links is None:
            raise TestbedError("this testbed has no links (one tier, or not started)")
        return self.links

    async def link_stats(self) -> dict[str, LinkStats]:
        """Counters of every link, by the tier whose uplink it is (``bytes_up``: towards the parent)."""
        return await self._links().stats()

    async def cut(self, tier: str, mode: str = "blackhole") -> None:
        """Take ``tier``'s uplink down now (besides the schedule)."""
        await self._links().cut(tier, mode)

    async def restore(self, tier: str) -> None:
        await self._links().restore(tier)

    async def set_profile(self, tier: str, profile: LinkProfile) -> None:
        """Give ``tier``'s uplink another profile now (``up_mbps``: towards the parent)."""
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
                    "node_id": rt.node_id,
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
        """End the schedule: links it cut come back and links it changed get their base profile."""
        if self.links is not None and self._t0 is not None:
            await self._cleanup("stopping the schedule", self.links.stop_clock())
        self._t0 = None

    def elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    async def link_events(self) -> list[LinkEvent]:
        """What the schedule did to the links since :meth:`start_clock`."""
        return await self.links.events() if self.links is not None else []


def _agent_id(spec: str) -> str:
    s = AgentSpec.parse(spec)
    return s.agent_id or s.type_name
