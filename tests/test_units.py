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


# -- MQTT 5 PUBLISH properties: our codec against paho's public Properties class (an independent peer) --
def _paho_properties(values: dict) -> object:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    ref = Properties(PacketTypes.PUBLISH)
    for k, v in values.items():
        setattr(ref, k, v)
    return ref


_PROPERTY_SETS = [
    {},
    {"ContentType": "application/vnd.aiflow.v1", "UserProperty": [("aiflow-kind", "request"), ("aiflow-id", "x")]},
    {
        "ContentType": "text/é",
        "ResponseTopic": "aiflow/v1/ns/clients/c/replies",
        "CorrelationData": b"\x00\xffcorr",
        "MessageExpiryInterval": 4_000_000_000,
        "UserProperty": [("k", "v"), ("ключ", "значение ✓")],
    },
    {"PayloadFormatIndicator": 1, "SubscriptionIdentifier": [300_000], "TopicAlias": 7},
]


@pytest.mark.parametrize("values", _PROPERTY_SETS, ids=range(len(_PROPERTY_SETS)))
def test_publish_properties_read_what_paho_writes_and_back(values: dict) -> None:
    """Interoperability of the property block: what paho packs we parse to the same values, and what we
    pack paho parses to the same values (packing order may differ; both are valid)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from aiflow_agents.mqtt import decode_properties, encode_properties
    from aiflow_agents.mqtt.packets import _Reader

    theirs = _paho_properties(values).pack()  # type: ignore[attr-defined]
    assert decode_properties(_Reader(theirs)) == values
    ours = encode_properties(values)
    back = Properties(PacketTypes.PUBLISH)
    back.unpack(ours)
    assert back.json() == _paho_properties(values).json()  # type: ignore[attr-defined]
    assert len(ours) == len(theirs)


def test_publish_decoding_round_trips_and_refuses_truncations() -> None:
    """Every PUBLISH shape decodes to what was encoded; every truncation is a typed error, never a crash."""
    import random

    from aiflow_agents.mqtt import MalformedPacketError, Publish, decode, encode

    rng = random.Random(7)
    props = {"ContentType": "x", "CorrelationData": b"c", "UserProperty": [("a", "b")]}
    for qos in (0, 1, 2):
        for version in (5, 4):
            for topic in ("a/b", "ü/t"):
                for payload in (b"", b"p" * 100, bytes(rng.randrange(256) for _ in range(300))):
                    p = Publish(
                        topic, payload, qos, rng.random() < 0.5, False, 7 if qos else 0, props if version == 5 else {}
                    )
                    raw = encode(p, version)
                    body = raw[2:] if raw[1] < 128 else raw[3:]
                    assert decode(raw[0], body, version) == p
                    header = len(body) - len(payload)  # a cut inside the payload is still well formed
                    for cut in {0, 1, header // 2, header - 1}:
                        with pytest.raises(MalformedPacketError):
                            decode(raw[0], body[:cut], version)
