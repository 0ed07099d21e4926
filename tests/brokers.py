"""Broker topologies that tests start themselves, on free ports, and stop by pid.

- :class:`BridgedMosquittos`: a "cloud" Mosquitto and a "device" Mosquitto bridged to it
  (the configuration docs/deployment.md recommends).
- :class:`NatsCluster`: three ``nats-server`` members in one cluster, each with JetStream and an
  MQTT 3.1.1 listener.

A missing binary skips the test locally and fails it under CI (``.ci/run`` installs both).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from aiflow_agents import BrokerURL
from aiflow_agents.testing import free_port


def need_binary(name: str) -> str:
    exe = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(exe):
        msg = f"{name} is not installed (apt-get install -y {name}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Server:
    """One broker process of ours: started with a config file, stopped (or killed) by its pid."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path) -> None:
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, so nothing is said to peers or clients."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def mosquitto_conf(port: int, extra: str = "") -> str:
    user = "user root\n" if os.geteuid() == 0 else ""
    return (
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"set_tcp_nodelay true\nmax_queued_messages 100000\n{user}{extra}"
    )


def bridge_conf(name: str, remote_port: int) -> str:
    """The bridge section of the device broker (docs/deployment.md shows the same)."""
    return (
        f"connection {name}\naddress 127.0.0.1:{remote_port}\ntopic aiflow/v1/# both 1\n"
        "bridge_protocol_version mqttv50\ntry_private true\ncleansession true\nnotifications true\n"
    )


class BridgedMosquittos:
    """cloud <- bridge - device: two Mosquittos; the device one opens the bridge."""

    def __init__(self, workdir: Path, *, preload: str | None = None) -> None:
        exe = need_binary("mosquitto")
        self.cloud_port, self.device_port = free_port(), free_port()
        self.bridge_name = f"dev-cloud-{self.device_port}"
        (workdir / "cloud.conf").write_text(mosquitto_conf(self.cloud_port))
        (workdir / "device.conf").write_text(
            mosquitto_conf(self.device_port, bridge_conf(self.bridge_name, self.cloud_port))
        )
        self.cloud = Server(
            "cloud mosquitto", [exe, "-c", str(workdir / "cloud.conf")], self.cloud_port, workdir / "cloud.log"
        )
        self.device = Server(
            "device mosquitto", [exe, "-c", str(workdir / "device.conf")], self.device_port, workdir / "device.log"
        )
        self.preload = preload

    @property
    def cloud_url(self) -> BrokerURL:
        return BrokerURL(host="127.0.0.1", port=self.cloud_port)

    @property
    def device_url(self) -> BrokerURL:
        return BrokerURL(host="127.0.0.1", port=self.device_port)

    @property
    def state_topic(self) -> str:
        """Mosquitto's bridge notification topic: retained "1" while up, "0" (its Will) when down."""
        return f"$SYS/broker/connection/{self.bridge_name}/state"

    def start(self) -> BridgedMosquittos:
        self.cloud.start()
        if self.preload:
            env = {**os.environ, "LD_PRELOAD": self.preload}
            with open(self.device.log, "ab") as out:
                self.device.proc = subprocess.Popen(self.device.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 15
            while not listening(self.device_port):
                if time.monotonic() > deadline:
                    raise RuntimeError("device mosquitto did not start")
                time.sleep(0.05)
        else:
            self.device.start()
        self.wait_bridged()
        return self

    def wait_bridged(self, timeout: float = 15.0) -> None:
        """Until the device broker's log says the bridge connected (ss would show it too)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _bridge_established(self.device_port, self.cloud_port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"bridge did not connect: {self.device.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        self.device.stop()
        self.cloud.stop()


def _bridge_established(device_port: int, cloud_port: int) -> bool:
    """Whether some TCP connection to the cloud port is established (the bridge's)."""
    try:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return True
    want = f"{cloud_port:04X}"
    for row in rows:
        parts = row.split()
        if parts[2].endswith(":" + want) and parts[3] == "01":
            return True
    return False


class NatsCluster:
    """Three nats-server members, routes between all, JetStream + MQTT listener on each."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        exe = need_binary("nats-server")
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.mqtt_ports = [free_port() for _ in range(size)]
        self.members: list[Server] = []
        name = f"c{self.route_ports[0]}"
        for i in range(size):
            store = workdir / f"js{i}"
            store.mkdir(exist_ok=True)
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
            conf = workdir / f"nats{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nlisten: 127.0.0.1:{self.client_ports[i]}\n"
                f'jetstream {{ store_dir: "{store}" }}\n'
                f"cluster {{ name: {name}, listen: 127.0.0.1:{self.route_ports[i]}, routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]}, stream_replicas: {size} }}\n"
            )
            self.members.append(
                Server(f"nats n{i}", [exe, "-c", str(conf)], self.mqtt_ports[i], workdir / f"nats{i}.log")
            )

    def url(self, i: int) -> BrokerURL:
        """MQTT 3.1.1 only: NATS refuses an MQTT 5 CONNECT."""
        return BrokerURL(host="127.0.0.1", port=self.mqtt_ports[i], protocol="3.1.1")

    def url_list(self, first: int = 0) -> str:
        """All members, ``first`` first, as the comma list ``--broker`` / AIFLOW_BROKER take."""
        order = [first] + [i for i in range(len(self.members)) if i != first]
        return ",".join(self.url(i).url() for i in order)

    def start(self) -> NatsCluster:
        # members start together: JetStream needs a quorum of the cluster before MQTT accepts
        import threading

        errors: list[BaseException] = []

        def run(m: Server) -> None:
            try:
                m.start(timeout=60)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(m,)) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        for m in self.members:
            m.stop()
