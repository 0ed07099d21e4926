"""Helpers for tests and benchmarks: a node in a child process, a free loopback port, a frozen process.

Kept out of the package's public ``__init__`` because they serve harnesses, not applications;
demos that launch node processes use :mod:`aiflow_agents.launch` directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from .broker import free_port
from .launch import NodeProcess


@contextlib.contextmanager
def frozen(proc: NodeProcess) -> Iterator[None]:
    """SIGSTOP a node process; it is always resumed (SIGCONT) afterwards."""
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


__all__ = ["NodeProcess", "free_port", "frozen"]
