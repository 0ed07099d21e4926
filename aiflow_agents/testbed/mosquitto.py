"""A tier's own Mosquitto, optionally bridged up to its parent's broker through the tier's link.

The bridge carries the protocol tree (docs/deployment.md); the testbed narrows it so that a request to an
agent crosses only the links on its way (see :func:`bridge_topics`). ``keepalive_interval`` is short
so a link that goes dark is noticed in seconds, and ``restart_timeout`` is short so the bridge returns soon
after the link does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import AiflowError


class TestbedError(AiflowError, RuntimeError):
    """The testbed could not be built on this machine (the message says what is missing)."""

    code = "testbed_error"


def mosquitto_binary() -> str | None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return exe if os.path.exists(exe) else None


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


class MosquittoProcess:
    """One Mosquitto with its config file and log under ``workdir``."""

    def __init__(
        self,
        name: str,
        port: int,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        bridge_to: tuple[str, int] | None = None,
        bridge_topics: Sequence[str] = ("aiflow/v1/# both 1",),
        bridge_keepalive: int = 5,
        prefix: Sequence[str] = (),
    ) -> None:
        exe = mosquitto_binary()
        if exe is None:
            raise TestbedError("mosquitto is not installed (apt-get install -y mosquitto); use brokers = 'shared'")
        self.name, self.host, self.port = name, host, port
        lines = [
            f"listener {port} {host}",
            "allow_anonymous true",
            "persistence false",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        if bridge_to is not None:
            lines += [
                f"connection {name}-up",
                f"address {bridge_to[0]}:{bridge_to[1]}",
                *(f"topic {t}" for t in bridge_topics),
                "bridge_protocol_version mqttv50",
                "try_private true",
                "cleansession true",
                "notifications true",
                f"keepalive_interval {bridge_keepalive}",
                "restart_timeout 1 2",
            ]
        self.conf = workdir / f"{name}.mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / f"{name}.mosquitto.log"
        self.argv = [*prefix, exe, "-c", str(self.conf)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> MosquittoProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _listening(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise TestbedError(
                    f"mosquitto {self.name} did not start: {self.log.read_text(errors='replace')[-1500:]}"
                )
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def bridge_topics(
    inside_agents: Sequence[str],
    outside_agents: Sequence[str],
    inside_nodes: Sequence[str],
    outside_nodes: Sequence[str],
) -> list[str]:
    """The bridge of a tier whose subtree hosts ``inside_*``: requests (inboxes) and probes travel up only for
    agents and nodes outside the subtree, and down only for those inside, so a request to a local agent never
    crosses the uplink. Replies, presence, telemetry, groups, events and errors cross both ways (their
    readers can be anywhere; a client's id says nothing about where it runs)."""
    base = "aiflow/v1/+"
    topics = [f"{base}/agents/{a}/inbox out 1" for a in outside_agents]
    topics += [f"{base}/agents/{a}/inbox in 1" for a in inside_agents]
    topics += [f"{base}/probe/{n} out 0" for n in outside_nodes]
    topics += [f"{base}/probe/{n} in 0" for n in inside_nodes]
    for shared in ("clients/#", "presence/#", "telemetry/#", "groups/#", "events/#", "errors/#"):
        topics.append(f"{base}/{shared} both 1")
    return topics
