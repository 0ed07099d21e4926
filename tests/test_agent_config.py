"""Agent config keys are checked one way for every type: a typo'd key (``scripted:s2?answr=4``) is a typed error
naming the key, the type, the accepted keys and the closest one, before anything is built; valid keys pass."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from aiflow_agents import Agent, AgentSpec, available, load
from aiflow_agents import registry as R
from aiflow_agents.errors import AgentConfigError

pytestmark = pytest.mark.timeout(120)

#: A config each built-in type must accept (built without loading a model: hf loads in setup, familial's
#: shipped weights are tiny).
VALID: dict[str, dict[str, Any]] = {
    "echo": {},
    "tensor-stats": {},
    "scripted": {"answer": "4", "confidence": 0.5, "sequence": "5,6,2"},
    "hf": {"path": "some/folder", "max_new_tokens": 3, "threads": 1},
    "familial": {"exit": "edge", "threshold": 0.5, "encoding": "int8-rowwise", "threads": 1},
    "familial-device": {"threshold": 0.5, "threads": 1},
    "familial-edge": {"next": "cloud", "threads": 1},
    "familial-cloud": {"temperature": 0.5, "seed": 3, "threads": 1},
    "familial-peer": {"threads": 1},
}


def _typo(key: str) -> str:
    """A near miss of ``key`` (one letter dropped), as a user would type it."""
    return key[:-2] + key[-1] if len(key) > 3 else key + "x"


def test_every_builtin_type_declares_its_config_keys() -> None:
    for name in VALID:
        cls = load(name)
        assert cls.config_keys is not None, f"{name} does not declare config_keys"
        assert set(VALID[name]) <= cls.accepted_config_keys()


@pytest.mark.parametrize("name", sorted(available()))
def test_every_installed_type_rejects_a_typo_with_a_suggestion(name: str) -> None:
    cls = load(name)
    keys = sorted(cls.accepted_config_keys() - Agent.BASE_KEYS)
    key = max(keys, key=len) if keys else "answer"
    typo = _typo(key)
    assert typo not in cls.accepted_config_keys()
    with pytest.raises(AgentConfigError) as info:
        AgentSpec.parse(f"{name}:x1?{typo}=4").create()
    e = info.value
    assert isinstance(e, ValueError)  # callers catching ValueError keep working
    assert e.code == "bad_agent_config" and e.agent_type == name and e.unknown == (typo,)
    msg = str(e)
    assert repr(typo) in msg and repr(name) in msg
    for k in keys:
        assert k in msg  # the accepted keys are listed
    if keys:
        assert e.suggestions[typo] == key and f"did you mean {key!r}" in msg
    if cls.config_keys is not None:  # the same check for a keyword given in Python
        with pytest.raises(AgentConfigError, match=typo):
            cls("x2", **{**VALID.get(name, {}), typo: 4})


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_keys_are_accepted(name: str) -> None:
    query = "&".join(f"{k}={v}" for k, v in VALID[name].items())
    agent = AgentSpec.parse(f"{name}:ok1?{query}" if query else f"{name}:ok1").create(tier="edge")
    assert agent.agent_id == "ok1" and agent.tier == "edge"
    assert type(agent).type_name == name


def test_scripted_typo_names_key_type_and_suggestion() -> None:
    with pytest.raises(AgentConfigError) as info:
        AgentSpec.parse("scripted:s2?answr=4").create()
    assert info.value.suggestions == {"answr": "answer"}
    assert "agent type 'scripted' has no config key 'answr' (did you mean 'answer'?)" in str(info.value)


class Undeclared(Agent):
    """A third-party type that declares no keys: its ``__init__``'s keywords are what it takes."""

    built = 0

    def __init__(self, agent_id: str | None = None, *, greeting: str = "hi", **kw: Any) -> None:
        super().__init__(agent_id, **kw)
        Undeclared.built += 1
        self.greeting = greeting


class Declared(Agent):
    config_keys = ("colour",)
    built = 0

    def __init__(self, agent_id: str | None = None, **kw: Any) -> None:
        Declared.built += 1  # counts constructions: the registry must refuse before this runs
        super().__init__(agent_id, **kw)


@pytest.fixture
def third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two third-party types in the entry-point group, loaded from this module like any plugin."""
    eps = dict(available())
    for name, cls in (("undeclared", "Undeclared"), ("declared", "Declared")):
        eps[name] = EntryPoint(name=name, value=f"{__name__}:{cls}", group=R.GROUP)
    monkeypatch.setattr(R, "available", lambda: eps)


def test_third_party_types_go_through_the_same_check(third_party: None) -> None:
    built = Declared.built
    with pytest.raises(AgentConfigError, match=r"'declared' has no config key 'color' \(did you mean 'colour'\?\)"):
        AgentSpec.parse("declared:d?color=red").create()
    assert Declared.built == built  # refused before the class was built
    assert AgentSpec.parse('declared:d?colour=red&groups=["g1"]').create().config == {"colour": "red"}
    with pytest.raises(AgentConfigError, match=r"'color'.*did you mean 'colour'"):
        Declared("d", color="red")  # a declared type is checked when built in Python too

    agent = AgentSpec.parse("undeclared:u?greeting=hello").create()
    assert isinstance(agent, Undeclared) and agent.greeting == "hello"
    with pytest.raises(AgentConfigError, match=r"'greting' \(did you mean 'greeting'\?\)"):
        AgentSpec.parse("undeclared:u?greting=hello").create()
    assert Undeclared("u", extra=1).config == {"extra": 1}  # built in Python, an undeclared type is not checked


def test_node_with_a_typo_exits_before_starting() -> None:
    """``aiflow node`` refuses the spec at once (no broker at port 1: a started node would keep retrying)."""
    agents = ["--agent", "echo:e1", "--agent", "scripted:s2?answr=4"]
    out = subprocess.run(
        [sys.executable, "-m", "aiflow_agents", "node", *agents, "--broker", "mqtt://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert out.returncode == 1, out.stderr
    assert "agent type 'scripted' has no config key 'answr' (did you mean 'answer'?)" in out.stderr
    assert "connect failed" not in out.stderr and "online" not in out.stderr
