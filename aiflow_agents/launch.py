"""Start nodes as separate OS processes (demos, tests, local deployments)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .broker import BrokerURL


class NodeProcess:
    """``aiflow node`` in a child process; its output goes to ``log_path`` (or is discarded)."""

    def __init__(
        self,
        agents: Sequence[str],
        broker: BrokerURL | str,
        *,
        node_id: str | None = None,
        namespace: str = "default",
        tier: str | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | str | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        url = broker.url() if isinstance(broker, BrokerURL) else broker
        if any(m.in_memory for m in BrokerURL.parse(url).members()):
            raise ValueError(f"{url}: an in-memory broker lives in one process; run a Node in this process instead")
        # ``prefix`` wraps the command, e.g. ``ip netns exec NAME`` to run the node in a network namespace
        self.args = [*prefix, sys.executable, "-m", "aiflow_agents", "node", "--broker", url, "--namespace", namespace]
        for a in agents:
            self.args += ["--agent", a]
        if node_id:
            self.args += ["--node-id", node_id]
        if tier:
            self.args += ["--tier", tier]
        self.args += list(extra_args)
        self.log_path = Path(log_path) if log_path else None
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful: in-flight work finishes, presence goes offline), then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    async def astop(self, timeout: float = 10.0) -> int | None:
        """:meth:`stop` without blocking the event loop (which may be running the embedded broker
        the node needs in order to go offline cleanly)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while self.proc.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)
        return self.proc.returncode

    async def wait_exit(self, timeout: float) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc is not None and self.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.returncode if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
