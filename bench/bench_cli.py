"""How fast the ``aiflow`` CLI starts, next to the floor of any typer CLI (``import typer, rich``).

    PYTHONPATH=. python bench/bench_cli.py [--repeat 15] [--broker mqtt://127.0.0.1:1883] [--json out.json]

Each round runs every command once, in turn (so load on a shared machine hits all of them
alike), and the report gives each command's median wall time and its ratio to the baseline's
median. ``aiflow send`` runs end to end: connect, find the agent online, one request to an echo
agent on a node started here, print the reply. A run with ``-X importtime`` also records whether
each command imported torch. For reference, the same is measured for a minimal typer program
that runs one command (typer itself imports pydantic to run a command): the floor of any typer CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET = 1.5  # issue 12: `aiflow --help` and `aiflow send` within 1.5x of `import typer, rich`
AIFLOW = [sys.executable, "-m", "aiflow_agents"]
TYPER_FLOOR = (
    "import typer\napp = typer.Typer()\n@app.command()\ndef a(x: int = 1) -> None:\n    print(x)\n"
    "@app.command()\ndef b() -> None:\n    pass\napp()\n"
)


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return elapsed


def _imports_torch(cmd: list[str], env: dict[str, str]) -> bool:
    """Whether the command imported torch (``-X importtime`` lists every module imported)."""
    traced = [cmd[0], "-X", "importtime", *cmd[1:]]
    proc = subprocess.run(traced, capture_output=True, text=True, env=env, timeout=120)
    return any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())


def measure(commands: dict[str, list[str]], repeat: int, env: dict[str, str]) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for cmd in commands.values():  # warm the OS caches once
        _time(cmd, env)
    for r in range(repeat):
        order = list(commands.items())
        if r % 2:  # alternate the order, so no command always runs right after another
            order.reverse()
        for name, cmd in order:
            samples[name].append(_time(cmd, env))
    base = statistics.median(samples["baseline"])
    rows = []
    for name, cmd in commands.items():
        med = statistics.median(samples[name])
        rows.append(
            {
                "command": name,
                "argv": " ".join(cmd[1:]) if cmd[0] == sys.executable else " ".join(cmd),
                "median_ms": med * 1e3,
                "min_ms": min(samples[name]) * 1e3,
                "ratio": med / base,
                "imports_torch": _imports_torch(cmd, env),
            }
        )
    return {"baseline_ms": base * 1e3, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="rounds (each runs every command once)")
    ap.add_argument("--broker", default=None, help="broker for `aiflow send` (default: an embedded one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from aiflow_agents.testing import NodeProcess, free_port

    env = {**os.environ, "AIFLOW_LOG_LEVEL": "warning"}
    env.pop("AIFLOW_BROKER", None)
    broker_proc = None
    broker = args.broker
    if broker is None:  # an embedded broker in its own process, like a deployment's
        port = free_port()
        broker = f"mqtt://127.0.0.1:{port}?protocol=3.1.1"  # amqtt speaks 3.1.1 only
        broker_proc = subprocess.Popen(
            [*AIFLOW, "broker", "--port", str(port), "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    namespace = f"bench-cli-{os.getpid()}"
    node = NodeProcess(["echo:cli-echo"], broker, namespace=namespace)
    try:
        node.start()
        send = [*AIFLOW, "send", "cli-echo", "hello", "--broker", broker, "--namespace", namespace, "--timeout", "10"]
        deadline = time.monotonic() + 60
        while True:  # until the node is up and its agent online
            if subprocess.run(send, capture_output=True, env=env, timeout=60).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the echo agent did not come online within 60 s")
            time.sleep(0.5)
        commands = {
            "baseline": [sys.executable, "-c", "import typer, rich"],
            "aiflow --help": [*AIFLOW, "--help"],
            "aiflow send": send,
            "aiflow send --help": [*AIFLOW, "send", "--help"],
            "typer floor: one command": [sys.executable, "-c", TYPER_FLOOR, "a"],
        }
        result = measure(commands, args.repeat, env)
    finally:
        node.stop()
        if broker_proc is not None:
            broker_proc.terminate()
            broker_proc.wait(10)

    result.update(
        {
            "target_ratio": TARGET,
            "repeat": args.repeat,
            "broker": "embedded (own process)" if args.broker is None else args.broker,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
    )
    print(f"baseline `python -c 'import typer, rich'`: {result['baseline_ms']:.0f} ms (median of {args.repeat})")
    for row in result["rows"]:
        torch_note = "  imports torch" if row["imports_torch"] else ""
        print(f"{row['command']:28s} {row['median_ms']:7.0f} ms  {row['ratio']:5.2f}x{torch_note}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
