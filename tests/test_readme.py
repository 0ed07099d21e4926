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


def layout_map() -> set[Path]:
    """The paths the README's Layout section names (a ``text`` block, nested by indentation)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"(?m)^## Layout\n", text)
    assert m, "README has no Layout section"
    block = re.search(r"```text\n(.*?)```", text[m.end() :], re.S)
    assert block, "Layout has no map"
    paths: set[Path] = set()
    parents: list[tuple[int, Path]] = []  # (indent, folder)
    for line in block.group(1).splitlines():
        indent = len(line) - len(line.lstrip())
        names = re.split(r"\s{2,}", line.strip())[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        base = parents[-1][1] if parents else Path()
        for name in (n.strip() for n in names.split(",")):
            if not re.fullmatch(r"[\w.-]+/?", name):
                continue
            paths.add(base / name.rstrip("/"))
            if name.endswith("/"):
                parents.append((indent, base / name.rstrip("/")))
    return paths


def test_layout_map_matches_the_tree() -> None:
    named = layout_map()
    missing = sorted(str(p) for p in named if not (ROOT / p).exists())
    assert not missing, f"README Layout names paths that do not exist: {missing}"
    modules = [
        p
        for pkg in ("protocols", "aiflow_agents", "aiflow_agents/models", "topologies")
        for p in (ROOT / pkg).glob("*.py")
    ]
    unnamed = sorted(
        str(p.relative_to(ROOT))
        for p in modules
        if p.name not in ("__init__.py", "__main__.py") and p.relative_to(ROOT) not in named
    )
    assert not unnamed, f"modules missing from README Layout: {unnamed}"
