"""Helpers for tests and benchmarks: a node in a child process and a free loopback port.

Kept out of the package's public ``__init__`` because they serve harnesses, not applications;
demos that launch node processes use :mod:`aiflow_agents.launch` directly.
"""

from __future__ import annotations

from .broker import free_port
from .launch import NodeProcess

__all__ = ["NodeProcess", "free_port"]
