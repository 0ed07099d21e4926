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


# -- MQTT 5 PUBLISH properties: our packer and lazy parser against paho's own --------------------
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
        "ResponseTopic": "aiflow/v1/ns/clients/c/replies",
        "CorrelationData": b"\x00\xffcorr",
        "MessageExpiryInterval": 4_000_000_000,
        "UserProperty": [("k", "v"), ("ключ", "значение ✓")],
        "ContentType": "text/é",
    },
    {"PayloadFormatIndicator": 1, "TopicAlias": 7, "SubscriptionIdentifier": 300_000},
]


@pytest.mark.parametrize("values", _PROPERTY_SETS, ids=range(len(_PROPERTY_SETS)))
def test_publish_properties_pack_and_parse_like_paho(values: dict) -> None:
    from aiflow_agents.connection import PublishProperties

    packed = PublishProperties(values).pack()
    assert packed == _paho_properties(values).pack()  # type: ignore[attr-defined]
    parsed, end = PublishProperties().unpack(packed + b"payload")
    assert end == len(packed)
    for name, value in values.items():
        expected = [value] if name == "SubscriptionIdentifier" else value
        assert getattr(parsed, name) == expected
    assert parsed.json() == _paho_properties(values).json()  # type: ignore[attr-defined]
    assert not hasattr(parsed, "ResponseTopic") or "ResponseTopic" in values


def test_received_properties_are_parsed_only_when_read_and_a_bad_block_reads_as_none() -> None:
    from aiflow_agents.connection import PublishProperties

    good = PublishProperties({"ContentType": "x"}).pack()
    parsed, _ = PublishProperties().unpack(good)
    assert "ContentType" not in vars(parsed)  # nothing parsed yet
    assert parsed.ContentType == "x"
    # a string claiming 9 bytes where 2 follow: dropped, not raised from an attribute read
    bad, end = PublishProperties().unpack(b"\x05\x03\x00\x09ab" + b"rest")
    assert end == 6 and getattr(bad, "ContentType", None) is None and bad.isEmpty()
    # a block whose length runs past the packet is paho's error, at once, as before
    with pytest.raises(Exception):  # noqa: B017 - whatever paho raises, as before
        PublishProperties().unpack(b"\x7f\x03")


def test_publish_decoding_matches_paho_for_good_and_bad_packets() -> None:
    """The one-copy PUBLISH decoder returns what paho's returns, and fails where paho fails."""
    import random

    import paho.mqtt.client as mqtt
    from paho.mqtt import _packet

    from aiflow_agents.connection import _PAHO_DECODE_PUBLISH, PublishProperties, _decode_publish

    assert _packet.decode_publish is _decode_publish  # installed on import
    rng = random.Random(7)
    props = PublishProperties({"ContentType": "x", "CorrelationData": b"c", "UserProperty": [("a", "b")]}).pack()
    cases = []
    for qos in (0, 1, 2):
        for v5 in (True, False):
            for topic in (b"a/b", b"", "ü/t".encode()):
                body = struct_topic(topic) + (b"\x01\x02" if qos else b"") + (props if v5 else b"")
                for payload in (b"", b"p" * 100, bytes(rng.randrange(256) for _ in range(300))):
                    cases.append((0x30 | qos << 1 | rng.choice((0, 1, 8, 9)), bytearray(body + payload), v5))
    for header, packet, v5 in cases:  # plus truncations of each: malformed packets
        cases_to_try = [packet, packet[:1], packet[: max(0, len(packet) // 2)]]
        for p in cases_to_try:
            protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
            try:
                want = _PAHO_DECODE_PUBLISH(header, bytes(p), protocol)
            except Exception as e:
                with pytest.raises(type(e)):
                    _decode_publish(header, bytearray(p), protocol)
                continue
            got = _decode_publish(header, bytearray(p), protocol)
            assert got._replace(properties=None) == want._replace(properties=None)
            assert type(got.payload) is bytes
            if want.properties is not None:
                assert got.properties.json() == want.properties.json()


def struct_topic(topic: bytes) -> bytes:
    return len(topic).to_bytes(2, "big") + topic
