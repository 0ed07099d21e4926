"""The device-edge-cloud testbed: tiers as places (own processes, brokers, CPU quotas, optionally network
namespaces) joined by emulated links (RTT, jitter, bandwidth, loss, outages) described by scenario files.

``aiflow testbed up SCENARIO`` starts one; :class:`Testbed` is the Python API. Names are exported lazily
so importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LinkProfile": "link",
    "LinkProxy": "link",
    "LinkStats": "link",
    "CpuQuota": "compute",
    "cpu_quota_unavailable": "compute",
    "NetNamespace": "netns",
    "netns_unavailable": "netns",
    "MosquittoProcess": "mosquitto",
    "TestbedError": "mosquitto",
    "Scenario": "scenario",
    "ScenarioError": "scenario",
    "TierSpec": "scenario",
    "LinkSpec": "scenario",
    "Outage": "link",
    "OutageMode": "link",
    "LinkOutage": "scenario",
    "CpuQuotaError": "compute",
    "QuotaUsage": "compute",
    "DutyCycleLimiter": "compute",
    "NetNamespaceError": "netns",
    "free_subnet_index": "netns",
    "shaping_unavailable": "netns",
    "Change": "scenario",
    "Workload": "scenario",
    "load_scenario": "scenario",
    "shipped_scenarios": "scenario",
    "Testbed": "testbed",
    "TierRuntime": "testbed",
    "LinkEvent": "links",
    "LinkHostError": "links",
}

if TYPE_CHECKING:
    from .compute import CpuQuota, CpuQuotaError, DutyCycleLimiter, QuotaUsage, cpu_quota_unavailable
    from .link import LinkProfile, LinkProxy, LinkStats, Outage, OutageMode
    from .links import LinkEvent, LinkHostError
    from .mosquitto import MosquittoProcess, TestbedError
    from .netns import NetNamespace, NetNamespaceError, free_subnet_index, netns_unavailable, shaping_unavailable
    from .scenario import (
        Change,
        LinkOutage,
        LinkSpec,
        Scenario,
        ScenarioError,
        TierSpec,
        Workload,
        load_scenario,
        shipped_scenarios,
    )
    from .testbed import Testbed, TierRuntime

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = [
    "Change",
    "CpuQuota",
    "CpuQuotaError",
    "DutyCycleLimiter",
    "LinkEvent",
    "LinkHostError",
    "LinkOutage",
    "LinkProfile",
    "LinkProxy",
    "LinkSpec",
    "LinkStats",
    "MosquittoProcess",
    "NetNamespace",
    "NetNamespaceError",
    "Outage",
    "OutageMode",
    "QuotaUsage",
    "Scenario",
    "ScenarioError",
    "Testbed",
    "TestbedError",
    "TierRuntime",
    "TierSpec",
    "Workload",
    "cpu_quota_unavailable",
    "free_subnet_index",
    "load_scenario",
    "netns_unavailable",
    "shaping_unavailable",
    "shipped_scenarios",
]
