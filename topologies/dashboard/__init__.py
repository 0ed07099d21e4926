"""``aiflow dashboard``: a live page of the network (nodes by tier, links, runs as they happen)."""

from .app import create_app
from .command import DEMO_NODES, Served, dashboard_command, serve
from .hub import Dashboard
from .runs import LiveTrace, RunRecord, RunSpec, graph_json

__all__ = [
    "DEMO_NODES",
    "Dashboard",
    "LiveTrace",
    "RunRecord",
    "RunSpec",
    "Served",
    "create_app",
    "dashboard_command",
    "graph_json",
    "serve",
]
