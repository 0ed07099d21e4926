"""What SPEC v1.1 settles that an independent implementation could not tell from v1: the JSON
nesting limit, the error-reply address, empty correlation ids, the float form of times, and the
one acceptance policy (OPS.md §4) shared by nodes, agents and the cascade."""

from __future__ import annotations

import json

import pytest

from aiflow_agents.forwarding import accepted as _accepted
from aiflow_agents.node import _error_address
from protocols import EncodeError, Envelope, HeaderDecodeError, HeaderValidationError, decode, encode, ops
from protocols.codec import MAX_JSON_DEPTH, PREAMBLE, json_depth
from topologies.policy import ConfidenceAtLeast


def _frame(header: str) -> bytes:
    raw = header.encode()
    return PREAMBLE.pack(b"AIFL", 1, 0, 0, len(raw)) + raw


def _nested(kind: str, levels: int) -> str:
    """A header object whose ``meta`` holds ``levels`` containers: depth ``levels + 2``."""
    if kind == "array":
        return '{"meta":{"x":' + "[" * levels + "]" * levels + "}}"
    return '{"meta":' + '{"x":' * levels + "{}" + "}" * levels + "}"


@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_limit_is_one_rule_for_arrays_and_objects(kind: str) -> None:
    at_limit, over = _nested(kind, MAX_JSON_DEPTH - 2), _nested(kind, MAX_JSON_DEPTH - 1)
    assert json_depth(at_limit) == MAX_JSON_DEPTH and json_depth(over) == MAX_JSON_DEPTH + 1
    # at the limit the header parses (and then fails the schema); one level more is header_decode
    with pytest.raises(HeaderValidationError):
        decode(_frame(at_limit))
    for levels in (MAX_JSON_DEPTH - 1, 199, 200, 990, 5000):
        with pytest.raises(HeaderDecodeError, match="levels deep") as info:
            decode(_frame(_nested(kind, levels)))
        assert info.value.code == "header_decode"


def test_brackets_inside_strings_do_not_count() -> None:
    assert json_depth('{"a":"[[[{{{","b":"\\"[[","c":[]}') == 2


def test_encoder_refuses_what_the_decoder_would() -> None:
    meta: dict = {}
    for _ in range(MAX_JSON_DEPTH - 2):
        meta = {"x": meta}
    assert decode(encode(Envelope.request("x", meta=meta))).meta == meta
    with pytest.raises(EncodeError, match="levels deep"):
        encode(Envelope.request("x", meta={"y": meta}))


def test_error_address_header_wins_over_properties() -> None:
    props = {"ResponseTopic": "p/replies", "CorrelationData": b"pc"}
    header = {"id": "i1", "reply_to": "h/replies", "correlation_id": "hc"}
    assert _error_address(header, props) == ("h/replies", "hc")
    # no header (checks 1-10): the properties
    assert _error_address({}, props) == ("p/replies", "pc")
    # an unpublishable header address is not replaced by the properties: errors/<agent>
    assert _error_address({**header, "reply_to": "h/+/replies"}, props) == (None, "hc")
    # an empty correlation_id is absent: the id correlates
    assert _error_address({**header, "correlation_id": ""}, props) == ("h/replies", "i1")


def test_empty_correlation_id_counts_as_absent() -> None:
    req = Envelope.request("x", correlation_id="")
    assert req.reply("y").correlation_id == req.id
    assert decode(encode(req)).correlation_id == ""  # still a valid v1 frame, kept as sent


def test_times_are_written_as_floats() -> None:
    frame = encode(Envelope.request("x", created_at=1_700_000_000, deadline=1_700_000_060))
    text = frame[12 : 12 + PREAMBLE.unpack_from(frame)[4]].decode()
    assert '"created_at":1700000000.0' in text and '"deadline":1700000060.0' in text
    assert json.loads(text)["created_at"] == 1_700_000_000


def test_one_acceptance_policy_and_default() -> None:
    pol = ops.AcceptancePolicy(min_confidence=0.5, per_stage={"edge": 0.9})
    assert ops.AcceptancePolicy.from_meta(pol.to_meta()) == pol
    assert ops.AcceptancePolicy.from_meta({}) is None
    for bad in ({"min_confidence": 2}, {"min_confidence": "0.5"}, {"min_confidence": {"a": 0.5}}, {"x": 1}):
        with pytest.raises(ValueError, match="acceptance"):
            ops.AcceptancePolicy.from_meta({ops.ACCEPTANCE: bad})
    req = Envelope.request("x", recipient="edge", meta=pol.to_meta())
    reply = req.reply("a", meta={ops.CONFIDENCE: 0.6})
    assert not _accepted(req, reply)  # edge's own threshold
    assert _accepted(req.model_copy(update={"recipient": "dev"}), reply)  # min_confidence
    # a stage the policy says nothing about: its reply stands (the one default, nodes and agents)
    only_edge = ops.AcceptancePolicy(per_stage={"edge": 0.9})
    assert only_edge.accepts_confidence(0.0, "dev") and only_edge.accepts_confidence(None, "dev")
    assert _accepted(Envelope.request("x", recipient="dev", meta=only_edge.to_meta()), reply)
    assert not _accepted(req, req.error_reply("boom", "x"))  # an error always escalates
    assert not pol.accepts_confidence(True, "dev")  # a boolean is no confidence
    assert ConfidenceAtLeast(0.5).wire() == ops.AcceptancePolicy(min_confidence=0.5)
