"""The CLI starts without the heavy stack: what ``aiflow --help`` and the packages import, lazy
commands (listed without loading, loaded when run, a broken one reported), and ``aiflow bench``
outside a checkout. Start-up *time* is a benchmark (bench/bench_cli.py), not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import aiflow_agents
from aiflow_agents import benchcli, cli

HEAVY = ("torch", "transformers", "matplotlib", "networkx", "aiflow_agents.models", "demos", "topologies")


def _imported(code: str, *args: str) -> set[str]:
    """Top-level and dotted module names a fresh interpreter imported running ``code``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_help_imports_nothing_heavy_and_lists_every_command() -> None:
    code = "import sys; sys.argv = ['aiflow', '--help']; from aiflow_agents.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("broker", "node", "agents", "send", "demo", "version", "graph", "run", "models", "eval", "bench"):
        assert f"\n  {name} " in proc.stdout, name
    modules = _imported(code)
    assert _heavy(modules) == []
    assert "aiflow_agents.node" not in modules and "protocols" not in modules  # not even the runtime


def test_the_runtime_modules_import_no_torch_besides_compress() -> None:
    """Every runtime module, with ``protocols.compress`` stubbed out (its own rewrite is what makes
    ``import protocols`` torch-free, checked below)."""
    code = (
        "import sys, types\n"
        "class Stub(types.ModuleType):\n"
        "    def __getattr__(self, name): return object()\n"
        "sys.modules['protocols.compress'] = Stub('protocols.compress')\n"
        "import protocols, aiflow_agents\n"
        "from aiflow_agents import Agent, Client, Node, EchoAgent, ScriptedAgent, broker_scope\n"
        "import aiflow_agents.commands, aiflow_agents.forwarding, aiflow_agents.testing, aiflow_agents.presence\n"
        "from protocols import Envelope, decode, encode\n"
        "assert decode(encode(Envelope.request('text only'))).text == 'text only'\n"
    )
    assert _heavy(_imported(code)) == []


def test_import_protocols_and_aiflow_agents_loads_no_torch() -> None:
    assert "torch" not in _imported("import protocols, aiflow_agents")


def test_lazy_exports_resolve_and_match_all() -> None:
    names = set(aiflow_agents.__all__) - {"__version__"}
    assert names == set(aiflow_agents._EXPORTS)
    for name in names:
        assert getattr(aiflow_agents, name) is not None
    assert set(aiflow_agents.__all__) <= set(dir(aiflow_agents))
    with pytest.raises(AttributeError):
        _ = aiflow_agents.NodeProcess  # a test helper: aiflow_agents.testing


def test_builtin_help_lines_match_the_commands() -> None:
    group = typer.main.get_command(cli.app)
    ctx = group.make_context("aiflow", ["version"])
    for name, text in cli.BUILTINS.items():
        cmd = group.get_command(ctx, name)
        assert cmd is not None and text.rstrip(".") in " ".join((cmd.help or "").split()), name


def test_shipped_entry_point_help_lines_match_the_commands() -> None:
    """``aiflow --help`` lists this distribution's plugin commands with a real description, not a module path,
    and each description is what the command itself says (its first sentence, or the start of it)."""
    group = typer.main.get_command(cli.app)
    ctx = group.make_context("aiflow", ["version"])
    demos = group.get_command(ctx, "demo")
    dctx = demos.make_context("demo", ["hello"])
    for grp, names in cli.SHIPPED.items():
        where, wctx = (demos, dctx) if grp == cli.DEMO_GROUP else (group, ctx)
        assert names.keys() == where._lazy().keys() - cli.BUILTINS.keys() - {"demo"}, grp
        for name, text in names.items():
            assert where._lazy()[name].help == text
            cmd = where.get_command(wctx, name)
            said = " ".join((cmd.help or "").split())
            assert said.startswith(text[:40]), (name, said)


class _Plugins(cli._LazyGroup):
    loads: list[str] = []

    def lazy_commands(self) -> dict[str, cli._Lazy]:
        def good() -> object:
            _Plugins.loads.append("good")

            def hello(name: str = "you") -> None:
                """Say hello."""
                typer.echo(f"hello {name}")

            return hello

        def broken() -> object:
            raise ImportError("no module named 'missing_dependency'")

        return {"good": cli._Lazy(good, "a good plugin"), "broken": cli._Lazy(broken, "a broken plugin")}


def test_lazy_commands_are_listed_unloaded_loaded_when_run_and_a_broken_one_is_reported() -> None:
    app = typer.Typer(cls=_Plugins, rich_markup_mode=None)
    app.callback()(lambda: None)  # a group, even with one eager command

    @app.command()
    def eager() -> None:
        """Always there."""

    runner = CliRunner()
    _Plugins.loads.clear()
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0 and "a good plugin" in out.output and "a broken plugin" in out.output
    assert "Always there." in out.output and _Plugins.loads == []  # listed without importing
    out = runner.invoke(app, ["good", "--name", "bench"])
    assert out.exit_code == 0 and "hello bench" in out.output and _Plugins.loads == ["good"]
    out = runner.invoke(app, ["broken"])
    assert out.exit_code != 0 and "No such command 'broken'" in out.output


def test_bench_runs_only_from_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert benchcli.source_checkout() == Path(__file__).resolve().parents[1]
    monkeypatch.setattr(benchcli, "CHECKOUT", tmp_path)
    monkeypatch.setattr(benchcli, "BENCH_DIR", tmp_path / "bench")
    (tmp_path / "bench").mkdir()  # a stray bench/ folder is not a checkout
    assert benchcli.source_checkout() is None
    app = typer.Typer()
    app.command()(benchcli.bench_command)
    out = CliRunner().invoke(app, ["codec"], env={"COLUMNS": "200"})
    assert out.exit_code == 2 and "needs a source checkout" in out.output


def test_bench_summary_reports_the_start_up_ratios() -> None:
    result = {
        "baseline_ms": 80.0,
        "rows": [
            {"command": "baseline", "ratio": 1.0},
            {"command": "aiflow --help", "ratio": 1.3},
            {"command": "aiflow send", "ratio": 2.9},
            {"command": "typer floor: one command", "ratio": 2.4},
        ],
    }
    rows = {r[0]: r for r in benchcli._rows({"cli": {"ok": True, "result": result}})}
    assert rows["start-up: aiflow --help vs `import typer, rich`"][1:3] == ("1.30x", "<= 1.5x")
    assert "met" in rows["start-up: aiflow --help vs `import typer, rich`"][3]
    assert "missed" in rows["start-up: aiflow send vs `import typer, rich`"][3]
    assert rows["start-up: typer floor: one command"][1] == "2.40x"
