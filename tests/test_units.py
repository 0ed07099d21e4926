"""Pure units: broker URLs, agent specs, acceptance of latents, envelope helpers."""

from __future__ import annotations

import pytest
import torch

from aiflow_agents import Accepts, AgentSpec, BrokerURL, UnknownAgentTypeError, load
from protocols import Envelope, FeatureSpace, Kind, TensorPart, TensorRole


def test_broker_url_parsing() -> None:
    u = BrokerURL.parse("mqtt://alice:s%40cret@broker.local:1884?protocol=3.1.1")
    assert (u.host, u.port, u.username, u.password, u.protocol, u.tls) == (
        "broker.local",
        1884,
        "alice",
        "s@cret",
        "3.1.1",
        False,
    )
    assert "s@cret" not in str(u) and "***" in str(u)
    assert BrokerURL.parse(u.url()) == u
    t = BrokerURL.parse("mqtts://h?ca=/tmp/ca.pem")
    assert t.tls and t.port == 8883 and t.ca_file == "/tmp/ca.pem"
    assert BrokerURL.parse("localhost:1999").port == 1999
    with pytest.raises(ValueError, match="scheme"):
        BrokerURL.parse("http://x")
    with pytest.raises(ValueError, match="protocol"):
        BrokerURL.parse("mqtt://x?protocol=4")


def test_agent_spec_parsing() -> None:
    s = AgentSpec.parse('scripted:s1?answer=hi&confidence=0.25&answers={"a":"b"}&fail=true')
    assert s.type_name == "scripted" and s.agent_id == "s1"
    assert s.config == {"answer": "hi", "confidence": 0.25, "answers": {"a": "b"}, "fail": True}
    assert AgentSpec.parse("echo").agent_id is None
    agent = AgentSpec.parse("echo:e9").create()
    assert agent.agent_id == "e9" and agent.type_name == "echo"
    with pytest.raises(UnknownAgentTypeError, match="available"):
        load("nope")
    with pytest.raises(ValueError, match="invalid agent id"):
        AgentSpec.parse("echo:bad/id").create()


def test_accepts_never_misuses_a_foreign_latent() -> None:
    mine = FeatureSpace(family="fam", hidden_size=64, tokenizer="t")
    other = FeatureSpace(family="other", hidden_size=64, tokenizer="t")
    latent = TensorPart(tensor=torch.zeros(2, 64), role=TensorRole.HIDDEN_STATE, space=other)
    text_ok = Accepts(text=True, spaces=(mine,))
    latent_only = Accepts(text=False, spaces=(mine,))
    # with a text part, an incompatible latent falls back to text
    assert text_ok.check(Envelope.request("hi", latent)) is None
    reason = latent_only.check(Envelope.request("hi", latent))
    assert reason is not None and "other" in reason
    assert latent_only.check(Envelope.request(TensorPart(tensor=torch.zeros(64), space=mine))) is None
    assert Accepts(any_space=True, text=False).check(Envelope.request(latent)) is None
    assert mine.compatible_with(FeatureSpace(family="fam", model="x", layer=3, hidden_size=64, tokenizer="t"))


def test_reply_and_error_reply_keep_the_trace() -> None:
    req = Envelope.request("q", sender="client", recipient="agent", deadline=123.0)
    rep = req.reply("a")
    assert (rep.kind, rep.recipient, rep.sender, rep.correlation_id, rep.parent_id, rep.trace_id) == (
        Kind.REPLY,
        "client",
        "agent",
        req.id,
        req.id,
        req.trace_id,
    )
    err = req.error_reply("boom", "it broke", retryable=True, where="x")
    assert err.kind == Kind.ERROR and err.error is not None
    assert (err.error.code, err.error.agent, err.error.retryable, err.error.detail) == (
        "boom",
        "agent",
        True,
        {"where": "x"},
    )
