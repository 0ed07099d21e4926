"""Property tests: whatever the sender builds round-trips exactly, and whatever the network
delivers either decodes or fails with a ProtocolError — never another exception."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import (
    PREAMBLE_SIZE,
    DType,
    Envelope,
    ErrorInfo,
    FeatureSpace,
    Kind,
    ProtocolError,
    TensorPart,
    TensorRole,
    TextPart,
    decode,
    encode,
)

# No example database: the suite should leave nothing behind in the working tree.
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# -- generators -----------------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
metas = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
short_text = st.text(min_size=1, max_size=40)
# Header strings that end up in MQTT packets (SPEC §6 check 12a): no control characters,
# surrogates or non-characters (all in Cc/Cs/Cn); topics also no wildcards and portable (§6.1: no space,
# no '.'), route hops no '/'.
mqtt_chars = st.characters(exclude_categories=("Cc", "Cs", "Cn"))
topic_chars = mqtt_chars.filter(lambda c: c not in "+#. ")
level_chars = topic_chars.filter(lambda c: c != "/")


def mqtt_text(min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(mqtt_chars, min_size=min_size, max_size=max_size)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, subnormals, -0.0 included) of any v1 dtype."""
    dtype = draw(st.sampled_from(list(DType)))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    if dtype is DType.BOOL:
        raw = bytes(b & 1 for b in raw)
    if not raw:
        return torch.empty(shape, dtype=dtype.torch_dtype)
    t = torch.frombuffer(bytearray(raw), dtype=dtype.torch_dtype).reshape(shape)
    if draw(st.booleans()) and t.dim() >= 2:  # sometimes hand the encoder a non-contiguous view
        t = t.transpose(0, -1)
    return t


spaces = st.none() | st.builds(
    FeatureSpace,
    family=short_text,
    model=st.none() | st.text(max_size=20),
    layer=st.none() | st.integers(-1, 100),
    hidden_size=st.none() | st.integers(1, 10_000),
    tokenizer=st.none() | st.text(max_size=20),
)
parts = st.one_of(
    st.builds(TextPart, text=st.text(max_size=60), meta=metas),
    st.builds(TensorPart, tensor=tensors(), role=st.sampled_from(list(TensorRole)), space=spaces, meta=metas),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
envelopes = st.builds(
    Envelope,
    id=mqtt_text(1, 128),
    kind=st.sampled_from(list(Kind)),
    sender=mqtt_text(1),
    recipient=st.none() | mqtt_text(),
    correlation_id=st.none() | mqtt_text(),
    reply_to=st.none() | st.text(topic_chars, min_size=1, max_size=80),
    trace_id=mqtt_text(1),
    parent_id=st.none() | mqtt_text(),
    created_at=finite,
    deadline=st.none() | finite,
    route=st.lists(st.text(level_chars, min_size=1, max_size=10), max_size=4),
    parts=st.lists(parts, max_size=5),
    error=st.none()
    | st.builds(
        ErrorInfo,
        code=short_text,
        message=st.text(max_size=40),
        agent=st.none() | st.text(max_size=10),
        retryable=st.booleans(),
        detail=metas,
    ),
    meta=metas,
)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: Envelope, b: Envelope) -> None:
    for field in ("id", "kind", "sender", "recipient", "correlation_id", "reply_to", "trace_id", "parent_id"):
        assert getattr(a, field) == getattr(b, field), field
    assert (a.created_at, a.deadline, a.route, a.error, a.meta) == (b.created_at, b.deadline, b.route, b.error, b.meta)
    assert len(a.parts) == len(b.parts)
    for p, q in zip(a.parts, b.parts, strict=True):
        assert type(p) is type(q) and p.meta == q.meta
        if isinstance(p, TextPart):
            assert p.text == q.text
        else:
            assert (p.dtype, p.shape, p.role, p.space) == (q.dtype, q.shape, q.role, q.space)
            assert _bits(p.tensor) == _bits(q.tensor)


# -- (a) everything the sender can build round-trips exactly --------------------------------------
@FUZZ
@given(envelopes)
def test_random_envelopes_round_trip_exactly(env: Envelope) -> None:
    frame = encode(env)
    out = decode(bytes(frame))
    _same(env, out)
    assert encode(out) == frame  # and re-encoding is byte-identical


# -- (b) whatever arrives: an Envelope or a ProtocolError, nothing else ----------------------------
def _decode_or_protocol_error(data: bytes) -> Envelope | None:
    try:
        env = decode(data)
    except ProtocolError:
        return None
    except Exception as e:  # pragma: no cover - this is the failure being looked for
        pytest.fail(f"decode raised {type(e).__name__}: {e}")
    # what the decoder accepts, the encoder can send on
    _same(env, decode(encode(env)))
    return env


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_random_bytes_behind_a_valid_preamble(body: bytes, header_len: int) -> None:
    if header_len > len(body) and header_len % 2:  # half the time, a header length that fits
        header_len = len(body)
    _decode_or_protocol_error(struct.pack("<4sBBHI", b"AIFL", 1, 0, 0, header_len) + body)


@FUZZ
@given(st.dictionaries(st.sampled_from(["id", "kind", "sender", "trace_id", "created_at", "parts", "x"]), json_values))
def test_random_json_headers(obj: dict[str, Any]) -> None:
    raw = json.dumps(obj).encode()
    _decode_or_protocol_error(struct.pack("<4sBBHI", b"AIFL", 1, 0, 0, len(raw)) + raw)


@FUZZ
@given(envelopes, st.data())
def test_truncated_or_extended_frames_are_always_rejected(env: Envelope, data: st.DataObject) -> None:
    frame = bytes(encode(env))
    cut = data.draw(st.integers(0, len(frame) - 1), label="cut")
    with pytest.raises(ProtocolError):
        decode(frame[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=70), label="extra")
    with pytest.raises(ProtocolError):
        decode(frame + extra)


@FUZZ
@given(envelopes, st.data())
def test_bit_flips(env: Envelope, data: st.DataObject) -> None:
    frame = bytearray(encode(env))
    header_end = PREAMBLE_SIZE + struct.unpack_from("<I", frame, 8)[0]
    # aim most flips at the preamble and header, where they change the meaning
    hi = data.draw(st.sampled_from([header_end, len(frame)]), label="region")
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, hi - 1), label="byte")
        frame[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    _decode_or_protocol_error(bytes(frame))
