"""The plugin entry point with a real external distribution, and the CLI end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from aiflow_agents import BrokerURL, Client, available

PLUGIN = Path(__file__).parent / "plugin_pkg"
AIFLOW = [sys.executable, "-m", "aiflow_agents"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIFLOW, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the plugin distribution visible to child processes without installing it: its package and a
    ``*.dist-info`` (METADATA, and entry_points.txt written from the plugin's own pyproject) in a folder
    on their PYTHONPATH, which is what an installed distribution amounts to for ``importlib.metadata``."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    shutil.copytree(PLUGIN / "aiflow_plugin_reverse", site / "aiflow_plugin_reverse")
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items())
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return site


@pytest.mark.timeout(360)
async def test_external_plugin_is_listed_and_serves(
    plugin_on_path: Path, embedded: BrokerURL, namespace, spawn
) -> None:
    assert "reverse" not in available()  # this process never sees it: nothing was installed here
    listing = run_cli("agents", "list")
    assert listing.returncode == 0, listing.stderr
    assert "reverse" in listing.stdout and "aiflow-plugin-reverse" in listing.stdout
    assert "echo" in listing.stdout  # built-ins come through the same group
    spawn(["reverse:rev"], embedded, namespace)
    async with Client(embedded, namespace=namespace) as c:
        await c.wait_for_agents(["rev"], timeout=30)
        assert (await c.request("rev", "plugin", timeout=10)).text == "nigulp"
        rec = c.presence.record("rev")
        assert rec is not None and rec.agent_type == "reverse"


def test_builtins_registered_via_entry_points() -> None:
    eps = available()
    assert {"echo", "scripted", "tensor-stats"} <= set(eps)
    assert eps["echo"].value == "aiflow_agents.builtin_agents:EchoAgent"


def test_help_lists_commands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("broker", "node", "agents", "send", "demo"):
        assert cmd in out.stdout


def test_node_with_unknown_agent_type_fails_clearly() -> None:
    out = run_cli("node", "--agent", "no-such-agent", "--broker", "mqtt://127.0.0.1:1")
    assert out.returncode == 1
    assert "no agent type 'no-such-agent'" in out.stderr and "echo" in out.stderr


@pytest.mark.timeout(120)
async def test_send_prints_the_reply_and_fails_clearly(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    spawn(["scripted:s1?answer=pong&confidence=0.5"], mosquitto, namespace)
    async with Client(mosquitto, namespace=namespace) as c:
        await c.wait_for_agents(["s1"], timeout=30)
    import asyncio

    ok = await asyncio.to_thread(run_cli, "send", "s1", "ping", "--broker", str(mosquitto), "-n", namespace, "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["text"] == "pong" and data["meta"]["confidence"] == 0.5 and data["kind"] == "reply"
    missing = await asyncio.to_thread(run_cli, "send", "ghost", "hi", "--broker", str(mosquitto), "-n", namespace)
    assert missing.returncode == 1 and "'ghost' is not online" in missing.stderr


@pytest.mark.timeout(180)
def test_demo_hello_runs_end_to_end(tmp_path: Path) -> None:
    out = run_cli("demo", "hello", "--tasks", "2", "--out", str(tmp_path), timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "hello.json").read_text())
    assert report["demo"] == "hello" and len(report["requests"]) == 4
    assert all(r["ok"] for r in report["requests"])
    assert {r["tier"] for r in report["requests"]} == {"device", "edge"}
    assert all(r["bytes_out"] > 2048 for r in report["requests"])  # the latent crossed the wire


@pytest.mark.timeout(120)
def test_wrong_broker_port_is_one_error_not_a_warning_per_retry() -> None:
    """Issue 16: ``send``, ``agents list --online``, ``run`` and ``dashboard`` against a port nobody listens on
    print one error naming the broker, nothing about a "connection lost" (there was none) and no line per retry."""
    from aiflow_agents.testing import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("AIFLOW_LOG_LEVEL", "AIFLOW_BROKER")}
    env["COLUMNS"] = "400"  # one error line, not wrapped
    example = str(Path(__file__).resolve().parents[1] / "docs" / "examples" / "network.py") + ":graph"
    commands = {
        "send": ["send", "s1", "hi"],
        "list": ["agents", "list", "--online"],
        "run": ["run", example, "--task", "hi"],
        "dashboard": ["dashboard", "--port", "0"],
    }
    procs = {
        name: subprocess.Popen(
            [*AIFLOW, *args, "--broker", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for name, args in commands.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 1, (name, out, err)
        text = (out + err).lower()
        assert "connection lost" not in text, (name, err)
        assert "connect failed" not in text and "[warning" not in text, (name, err)
        errors = [line for line in err.splitlines() if line.strip()]
        assert len(errors) == 1, (name, err)
        assert errors[0].startswith(f"error: could not connect to broker {url}"), (name, err)


@pytest.mark.timeout(120)
def test_node_waiting_for_its_broker_says_so_once(tmp_path: Path) -> None:
    """A node keeps retrying a broker that is not there: one warning "connect failed: cannot reach broker ...,
    retrying in ...s", the retries after it at debug, never "connection lost"."""
    import signal
    import time

    from aiflow_agents.testing import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    log = tmp_path / "node.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [*AIFLOW, "node", "--agent", "echo:e1", "--broker", url, "--log-level", "debug"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AIFLOW_LOG_JSON": "1"},
        )
        try:
            deadline = time.monotonic() + 90
            while sum("connect failed" in line for line in log.read_text().splitlines()) < 4:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    failed = [r for r in records if r["event"].startswith("connect failed")]
    assert [r["level"] for r in failed[:4]] == ["warning", "debug", "debug", "debug"]
    assert failed[0]["event"].startswith(f"connect failed: cannot reach broker {url}, retrying in ")
    assert not [r for r in records if r["event"] == "connection lost"]
    events = [r["event"] for r in records]  # and stopping it says it never got there, not "offline"
    assert "stopped before it ever reached the broker" in events and "offline" not in events


def test_external_plugin_config_is_checked_like_the_builtins(plugin_on_path: Path) -> None:
    """A third-party type goes through the same config check: ReverseAgent takes no keys, so one is refused
    before the node starts (port 1: a started node would keep retrying)."""
    out = run_cli("node", "--agent", "reverse:rev?colour=red", "--broker", "mqtt://127.0.0.1:1")
    assert out.returncode == 1, out.stderr
    flat = " ".join(out.stderr.split())
    assert "agent type 'reverse' has no config key 'colour'" in flat and "accepted keys: groups, tier" in flat
