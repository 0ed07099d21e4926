"""The README's Quick start is what CI runs: keep the two from drifting apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"(?im)^#+\s*quick\s*start.*$", text)
    assert m, "README has no Quick start heading"
    block = re.search(r"```[a-z]*\n(.*?)```", text[m.end() :], re.S)
    assert block, "Quick start has no fenced command block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_quick_start_has_demo_and_test_commands() -> None:
    cmds = quick_start_commands()
    assert len(cmds) == 2
    assert "aiflow demo" in cmds[0] and "pytest" in cmds[1]
    assert all(c.startswith("pip install torch==2.13.0") for c in cmds)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert quick_start_commands()[1] in ci.splitlines()
