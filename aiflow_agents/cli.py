"""The ``aiflow`` command: a thin, lazy dispatcher.

Start-up imports typer and nothing heavy. The built-in commands live in :mod:`.commands` and
are imported only when one of them runs; subcommands from other packages (topologies, demos,
the model agents) plug in through the entry-point groups ``aiflow_agents.cli`` and
``aiflow_agents.demos`` and are loaded only when invoked, so the runtime never imports them and
``aiflow --help`` never loads torch, transformers, matplotlib or a demo. Help is plain text
(typer's rich help costs as much again as importing typer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperGroup

from . import __version__

CLI_GROUP = "aiflow_agents.cli"
DEMO_GROUP = "aiflow_agents.demos"
BUILTINS_MODULE = "aiflow_agents.commands"

# built-in command -> its one-line help (the first sentence of its docstring in .commands)
BUILTINS: dict[str, str] = {
    "broker": "Run the embedded (amqtt, MQTT 3.1.1) broker in the foreground until Ctrl-C.",
    "node": "Host agents on a node until SIGINT/SIGTERM.",
    "agents": "Agent types and online agents.",
    "send": "Send one request and print the reply (exit code 1 with the reason if it fails).",
}


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as an error; return the exit to raise."""
    _err(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


_fail = fail


def broker_or_exit(values: list[str] | None) -> str | None:
    """One broker URL (list) from a repeated ``--broker``; a malformed one ends the command with its reason."""
    if not values:
        return None
    from .broker import BrokerURL

    try:
        return BrokerURL.join(list(values)).url()
    except ValueError as e:
        raise fail(str(e)) from None


def signing_key_or_exit() -> bytes | None:
    """The deployment's signing key from ``$AIFLOW_SIGNING_KEY`` (hex); never a CLI argument, which
    other users could read in the process list."""
    from protocols import key_from_env

    try:
        return key_from_env()
    except ValueError as e:
        raise fail(str(e)) from None


# this distribution's own entry-point commands -> one-line help (their first sentence), so ``aiflow --help``
# and ``aiflow demo --help`` describe them without importing them; third-party ones show where they come from
DIST = "aiflow-agents"
SHIPPED: dict[str, dict[str, str]] = {
    CLI_GROUP: {
        "bench": "Measure the framework against the raw floor (codec, MQTT clients, CLI start-up).",
        "dashboard": "A live web page of the network: nodes by tier, links, runs as they happen; start runs from it.",
        "eval": "Evaluate patterns against every member alone (--bench real LMs, --testbed scheduling policies).",
        "graph": "Agent graphs: draw them.",
        "models": "Real small models that ship inside PyPI packages (offline).",
        "run": "Run a graph or pattern on one task; print the answer and the trace.",
        "testbed": "Device-edge-cloud testbed: tiers as places, emulated links.",
        "train": "Train the shipped models.",
    },
    DEMO_GROUP: {
        "hello": "Two nodes (device, edge) in separate processes exchange text + latent envelopes.",
        "relay": "Device -> edge -> cloud familial cascade: hidden states relayed, not recomputed.",
        "ensemble": "Diverse members: vote vs cross-scoring vs latent (distribution) averaging vs each member.",
        "debate": "Multi-agent debate on arithmetic: accuracy per round.",
        "moa": "Mixture of agents: a layer of proposers, the cloud exit aggregates.",
        "cascade": "SmolLM2 (device) -> Gemma-3 (cloud): different architectures and tokenizers.",
        "speculative": "Speculative decoding across tiers: a device drafts, the cloud verifies.",
    },
}


@dataclass
class _Lazy:
    """A subcommand known by name and one-line help, imported only when it is used."""

    load: Callable[[], Any]  # -> a typer.Typer, a typer command function, or a click command
    help: str


def _as_click(name: str, obj: Any) -> Any:
    """The click command that ``app.add_typer(obj, name=name)`` or ``app.command(name)(obj)`` makes."""
    holder = typer.Typer(rich_markup_mode=None)  # plain help, like the root's (a sub-app keeps its own)
    holder.callback()(lambda: None)  # a callback keeps the holder a group even with one member
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
    else:
        holder.command(name)(obj)
    return typer.main.get_command(holder).commands[name]  # type: ignore[attr-defined]


class _LazyGroup(TyperGroup):
    """A group whose subcommands beyond the eager ones are listed from :meth:`lazy_commands` and
    imported on first use. A subcommand that fails to import is reported, never fatal."""

    def lazy_commands(self) -> dict[str, _Lazy]:
        return {}

    def _lazy(self) -> dict[str, _Lazy]:
        cached: dict[str, _Lazy] | None = getattr(self, "_lazy_cache", None)
        if cached is None:
            cached = self._lazy_cache = self.lazy_commands()
        return cached

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy()})

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        lazy = self._lazy().get(cmd_name)
        if cmd is not None or lazy is None:
            return cmd
        try:
            cmd = _as_click(cmd_name, lazy.load())
        except Exception as e:  # a broken plugin must not break the CLI
            _err(f"[yellow]warning:[/] command {cmd_name!r} failed to load: {type(e).__name__}: {e}")
            return None
        self.add_command(cmd, cmd_name)
        return cmd

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Like click's, but a command not yet imported shows its known help instead of being loaded."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None:
                rows.append((name, self._lazy()[name].help))
            elif not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _entry_point_commands(group: str) -> dict[str, _Lazy]:
    from importlib.metadata import entry_points

    out: dict[str, _Lazy] = {}
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        shipped = SHIPPED.get(group, {}).get(ep.name) if dist == DIST else None
        out[ep.name] = _Lazy(ep.load, shipped or f"(from {dist}: {ep.value})")
    return out


def _builtin(name: str) -> Callable[[], Any]:
    def load() -> Any:
        commands = importlib.import_module(BUILTINS_MODULE)
        return commands.agents_app if name == "agents" else getattr(commands, name)

    return load


class _RootGroup(_LazyGroup):
    def lazy_commands(self) -> dict[str, _Lazy]:
        builtins = {name: _Lazy(_builtin(name), text) for name, text in BUILTINS.items()}
        return {**_entry_point_commands(CLI_GROUP), **builtins}


class _DemoGroup(_LazyGroup):
    def lazy_commands(self) -> dict[str, _Lazy]:
        return _entry_point_commands(DEMO_GROUP)


_PLAIN: dict[str, Any] = {"rich_markup_mode": None, "no_args_is_help": True}
app = typer.Typer(cls=_RootGroup, help="aiflow-agents: heterogeneous model agents over MQTT.", **_PLAIN)
demo_app = typer.Typer(cls=_DemoGroup, help="Demo scenarios (each starts its own node processes).", **_PLAIN)
app.add_typer(demo_app, name="demo")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


__all__ = ["BUILTINS", "SHIPPED", "app", "broker_or_exit", "fail", "main", "signing_key_or_exit"]
