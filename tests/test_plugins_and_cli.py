"""The plugin entry point with a real external distribution, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiflow_agents import BrokerURL, Client, available

PLUGIN = Path(__file__).parent / "plugin_pkg"
AIFLOW = [sys.executable, "-m", "aiflow_agents"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIFLOW, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plugin_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """pip-install the plugin package (a real distribution with its own pyproject), then remove it."""
    build = tmp_path_factory.mktemp("plugin-build")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", str(PLUGIN)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=build)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "--quiet", "aiflow-plugin-reverse"], timeout=120)


@pytest.mark.timeout(360)
async def test_external_plugin_is_listed_and_serves(
    plugin_installed: None, embedded: BrokerURL, namespace, spawn
) -> None:
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
