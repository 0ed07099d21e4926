"""The v1 codec, envelope helpers and MQTT binding, rule by rule (see protocols/SPEC.md)."""

from __future__ import annotations

import ctypes
import gc
import json
import math
import struct
import warnings
from typing import Any

import pytest
import torch

from protocols import (
    ALIGNMENT,
    CONTENT_TYPE,
    DEFAULT_LIMITS,
    PREAMBLE_SIZE,
    BadMagicError,
    DType,
    EncodeError,
    Envelope,
    ErrorInfo,
    FeatureSpace,
    FrameTooLargeError,
    FrameTooShortError,
    HeaderDecodeError,
    HeaderTooLargeError,
    HeaderValidationError,
    Kind,
    Limits,
    PresenceRecord,
    ProtocolError,
    SegmentError,
    Status,
    TensorPart,
    TensorRole,
    TextPart,
    Topics,
    UnsupportedDTypeError,
    UnsupportedVersionError,
    check_level,
    decode,
    encode,
    is_valid_agent_id,
    mqtt5_properties,
    peek_header,
)

ALL_DTYPES = list(DType)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _sample(dtype: DType, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    td = dtype.torch_dtype
    if td.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(td)
    if td == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(td)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(td)


def _header_of(frame: bytes | bytearray) -> dict[str, Any]:
    (n,) = struct.unpack_from("<I", frame, 8)
    return json.loads(bytes(frame[PREAMBLE_SIZE : PREAMBLE_SIZE + n]))


def _payload_range(payload: bytearray) -> tuple[int, int]:
    base = ctypes.addressof((ctypes.c_char * len(payload)).from_buffer(payload))
    return base, base + len(payload)


# -- a hand-built frame, to break one rule at a time --------------------------------------------
def header(**overrides: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"id": "m", "kind": "request", "sender": "s", "trace_id": "t", "created_at": 1.0}
    h.update(overrides)
    return h


def tensor_part(dtype: str = "float32", shape: list[int] | None = None, **overrides: Any) -> dict[str, Any]:
    shape = [4] if shape is None else shape
    p: dict[str, Any] = {
        "type": "tensor",
        "role": "other",
        "dtype": dtype,
        "shape": shape,
        "offset": 0,
        "nbytes": math.prod(shape) * DType(dtype).itemsize,
    }
    p.update(overrides)
    return p


def frame_of(
    h: dict[str, Any] | bytes,
    *,
    rel: list[int] | None = None,
    absolute: list[int | None] | None = None,
    extra: int = 0,
    magic: bytes = b"AIFL",
    version: int = 1,
    flags: int = 0,
    reserved: int = 0,
    header_len: int | None = None,
    length: int | None = None,
) -> bytes:
    """A frame whose tensor parts sit at ``data_start + rel[i]`` (default: canonical layout), or
    declare ``absolute[i]`` as their offset; ``extra`` bytes appended (negative: cut). ``length``
    overrides where the frame ends (before ``extra``), for segments too big to materialise."""
    if isinstance(h, bytes):
        raw, end = h, PREAMBLE_SIZE + len(h)
    else:
        tensors = [p for p in h.get("parts", []) if p.get("type") == "tensor"]
        if rel is None:
            rel, cursor = [], 0
            for p in tensors:
                rel.append(cursor)
                cursor = _align(cursor + p["nbytes"])
        forced = absolute or [None] * len(tensors)
        for _ in range(8):
            raw = json.dumps(h, separators=(",", ":")).encode()
            start = _align(PREAMBLE_SIZE + len(raw))
            changed = False
            for p, r, a in zip(tensors, rel, forced, strict=True):
                want = start + r if a is None else a
                if p["offset"] != want:
                    p["offset"], changed = want, True
            if not changed:
                break
        end = max(
            [start + r + max(p["nbytes"], 0) for p, r in zip(tensors, rel, strict=True)] or [PREAMBLE_SIZE + len(raw)]
        )
    buf = bytearray(end if length is None else length)
    struct.pack_into("<4sBBHI", buf, 0, magic, version, flags, reserved, len(raw) if header_len is None else header_len)
    buf[PREAMBLE_SIZE : PREAMBLE_SIZE + len(raw)] = raw
    if extra >= 0:
        return bytes(buf) + b"\0" * extra
    return bytes(buf[:extra])


def raises(frame: bytes, exc: type[ProtocolError], *fragments: str, limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(exc) as info:
        decode(frame, limits)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert info.value.code == exc.code
    for f in fragments:
        assert f in str(info.value), f"{f!r} not in {str(info.value)!r}"
    return info.value


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (2, 3, 4, 5)], ids=str)
def test_every_dtype_round_trips_bit_exactly(dtype: DType, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape, seed=len(shape))
    env = Envelope.request("x", TensorPart(tensor=t, role=TensorRole.EMBEDDING, meta={"k": 1}), sender="a")
    out = decode(encode(env))
    part = out.parts[1]
    assert isinstance(part, TensorPart)
    assert part.tensor.dtype == t.dtype
    assert part.shape == shape
    assert part.dtype is dtype
    assert _bits(part.tensor) == _bits(t)
    assert part.role == TensorRole.EMBEDDING and part.meta == {"k": 1}


def test_float_specials_survive_in_tensor_data() -> None:
    t = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 5e-324], dtype=torch.float64)
    out = decode(encode(Envelope.request(TensorPart(tensor=t)))).parts[0].tensor
    assert _bits(out) == _bits(t)
    assert math.copysign(1.0, out[3].item()) == -1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
        lambda: torch.arange(40, dtype=torch.int16)[::3],
        lambda: torch.arange(5, dtype=torch.bfloat16).expand(3, 5),
        lambda: torch.arange(60, dtype=torch.float16).reshape(3, 4, 5)[1:, ::2, 1:4],
        lambda: (
            torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last)
        ),
        lambda: (torch.arange(12) % 2 == 0).reshape(3, 4).t(),
        lambda: torch.arange(100, dtype=torch.uint8)[10:20],  # contiguous, but with a storage offset
    ],
    ids=["transposed", "strided", "expanded", "sliced-3d", "channels-last", "bool-transposed", "storage-offset"],
)
def test_non_contiguous_tensors_encode_by_value(make: Any) -> None:
    t = make()
    out = decode(encode(Envelope.request(TensorPart(tensor=t)))).parts[0].tensor
    assert out.is_contiguous()
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(out, t)


def test_tensor_requiring_grad_encodes_its_values() -> None:
    t = torch.linspace(-1, 1, 6, requires_grad=True) * 2
    out = decode(encode(Envelope.request(TensorPart(tensor=t)))).parts[0].tensor
    assert not out.requires_grad
    assert torch.equal(out, t.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensor_encodes_and_decodes_on_cpu() -> None:
    t = torch.arange(12, dtype=torch.float16, device="cuda").reshape(3, 4)
    out = decode(encode(Envelope.request(TensorPart(tensor=t)))).parts[0].tensor
    assert out.device.type == "cpu"
    assert torch.equal(out, t.cpu())


def test_complete_header_round_trips() -> None:
    space = FeatureSpace(family="llama", model="Llama-3.2-1B", layer=12, hidden_size=2048, tokenizer="llama3")
    env = Envelope(
        id="id-1",
        kind=Kind.REPLY,
        sender="s",
        recipient="r",
        correlation_id="c",
        reply_to="aiflow/v1/default/clients/c1/replies",
        trace_id="tr",
        parent_id="p",
        created_at=1234.5,
        deadline=1299.75,
        route=["a", "b"],
        parts=[
            TextPart(text="ünï\n", meta={"x": [1, None]}),
            TensorPart(tensor=torch.ones(2, 2), role=TensorRole.HIDDEN_STATE, space=space),
        ],
        error=ErrorInfo(code="c", message="m", agent="ag", retryable=True, detail={"d": {"e": 1.5}}),
        meta={"nested": {"a": [True, False, None, 2**70]}},
    )
    out = decode(encode(env))
    for field in ("id", "kind", "sender", "recipient", "correlation_id", "reply_to", "trace_id", "parent_id"):
        assert getattr(out, field) == getattr(env, field)
    assert (out.created_at, out.deadline, out.route, out.meta) == (1234.5, 1299.75, ["a", "b"], env.meta)
    assert out.error == env.error
    assert out.parts[0] == env.parts[0]
    assert out.parts[1].space == space
    assert out.text == "ünï\n"


def test_encoding_is_deterministic_and_does_not_touch_the_envelope() -> None:
    env = Envelope.request("a", TensorPart(tensor=torch.arange(5.0)), id="x", trace_id="y", created_at=1.0)
    before = env.model_dump(exclude={"parts"})
    assert encode(env) == encode(env)
    assert env.model_dump(exclude={"parts"}) == before


def test_canonical_layout_and_zero_padding() -> None:
    env = Envelope.request(
        "t",
        TensorPart(tensor=torch.arange(3, dtype=torch.int8)),
        TensorPart(tensor=torch.zeros(0)),
        TensorPart(tensor=torch.arange(2, dtype=torch.float64)),
    )
    frame = encode(env)
    h = _header_of(frame)
    data_start = _align(PREAMBLE_SIZE + len(json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()))
    offsets = [p["offset"] for p in h["parts"] if p["type"] == "tensor"]
    assert offsets == [data_start, data_start + 64, data_start + 64]
    assert len(frame) == data_start + 64 + 16
    assert frame[data_start + 3 : data_start + 64] == b"\0" * 61


def test_trailing_zero_size_tensor_after_unaligned_segment_round_trips() -> None:
    """Regression: the decoder used to reject this encoder output as having trailing bytes."""
    env = Envelope.request(TensorPart(tensor=torch.arange(3, dtype=torch.float16)), TensorPart(tensor=torch.zeros(0)))
    frame = encode(env)
    h = _header_of(frame)
    assert len(frame) == h["parts"][1]["offset"] == h["parts"][0]["offset"] + 64
    out = decode(frame)
    assert out.parts[1].shape == (0,)
    assert torch.equal(out.parts[0].tensor, torch.arange(3, dtype=torch.float16))


def test_text_only_frame_ends_right_after_the_header() -> None:
    frame = encode(Envelope.request("hello"))
    (n,) = struct.unpack_from("<I", frame, 8)
    assert len(frame) == PREAMBLE_SIZE + n
    assert bytes(frame[:8]) == b"AIFL\x01\x00\x00\x00"


def test_only_zero_size_tensors_end_at_data_start() -> None:
    frame = encode(Envelope.request(TensorPart(tensor=torch.zeros(0, 3)), TensorPart(tensor=torch.zeros(2, 0))))
    (n,) = struct.unpack_from("<I", frame, 8)
    assert len(frame) == _align(PREAMBLE_SIZE + n)
    out = decode(frame)
    assert [p.shape for p in out.parts] == [(0, 3), (2, 0)]


# -- zero copy ----------------------------------------------------------------------------------
def test_decode_is_zero_copy_over_a_bytearray() -> None:
    t = torch.arange(4096, dtype=torch.float32)
    payload = bytearray(encode(Envelope.request(TensorPart(tensor=t))))
    part = decode(payload).parts[0]
    lo, hi = _payload_range(payload)
    offset = _header_of(payload)["parts"][0]["offset"]
    assert part.tensor.data_ptr() == lo + offset
    assert lo <= part.tensor.data_ptr() and part.tensor.data_ptr() + part.nbytes <= hi
    assert torch.frombuffer(payload, dtype=torch.uint8).data_ptr() == lo
    payload[offset : offset + 4] = struct.pack("<f", -1.0)  # the view sees writes to the payload
    assert part.tensor[0].item() == -1.0


def test_decode_is_zero_copy_over_bytes_and_memoryview() -> None:
    frame = bytes(encode(Envelope.request(TensorPart(tensor=torch.arange(100, dtype=torch.int64)))))
    offset = _header_of(frame)["parts"][0]["offset"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
    assert decode(frame).parts[0].tensor.data_ptr() == base + offset
    assert decode(memoryview(frame)).parts[0].tensor.data_ptr() == base + offset


def test_decoded_tensor_keeps_its_payload_alive() -> None:
    t = torch.arange(1000, dtype=torch.float64)
    payload = encode(Envelope.request(TensorPart(tensor=t)))
    part = decode(payload).parts[0]
    del payload
    gc.collect()
    _ = [bytearray(len(t) * 8) for _ in range(20)]  # give freed memory a chance to be reused
    assert torch.equal(part.tensor, t)


def test_writable_returns_a_private_copy() -> None:
    payload = bytearray(encode(Envelope.request(TensorPart(tensor=torch.arange(8, dtype=torch.int32)))))
    part = decode(payload).parts[0]
    w = part.writable()
    lo, hi = _payload_range(payload)
    assert not lo <= w.data_ptr() < hi
    w.add_(100)
    assert part.tensor.tolist() == list(range(8))
    assert w.tolist() == [i + 100 for i in range(8)]


# -- encode side --------------------------------------------------------------------------------
def test_encode_limits() -> None:
    env = Envelope.request("a", "b", "c")
    with pytest.raises(EncodeError, match="3 parts exceed the limit of 2"):
        encode(env, Limits(max_parts=2))
    with pytest.raises(EncodeError, match="5 dimensions, limit is 4"):
        encode(Envelope.request(TensorPart(tensor=torch.zeros(1, 1, 1, 1, 1))), Limits(max_ndim=4))
    with pytest.raises(EncodeError, match=r"header is \d+ bytes, limit is 100"):
        encode(Envelope.request("x" * 200), Limits(max_header_bytes=100))
    with pytest.raises(EncodeError, match=r"frame would be \d+ bytes, limit is 1000"):
        encode(Envelope.request(TensorPart(tensor=torch.zeros(500))), Limits(max_frame_bytes=1000))
    frame = encode(Envelope.request("x" * 200))  # and the defaults let it through
    assert decode(frame).text == "x" * 200


@pytest.mark.parametrize(
    "meta",
    [{"t": torch.zeros(1)}, {"s": {1, 2}}, {"b": b"raw"}, {"o": object()}, {"n": math.nan}, {"i": [math.inf]}],
    ids=["tensor", "set", "bytes", "object", "nan", "inf"],
)
def test_non_json_meta_is_refused_at_encode(meta: dict[str, Any]) -> None:
    env = Envelope.request(TextPart.model_construct(type="text", text="x", meta=meta))
    with pytest.raises(EncodeError, match="not JSON-serialisable"):
        encode(env)
    with pytest.raises(EncodeError, match="not JSON-serialisable"):
        encode(Envelope.request("x", meta=meta))


def test_non_finite_header_numbers_and_lone_surrogates_are_refused_at_encode() -> None:
    with pytest.raises(EncodeError, match="Out of range float"):
        encode(Envelope.request("x", created_at=math.inf))
    with pytest.raises(EncodeError, match="Out of range float"):
        encode(Envelope.request("x", deadline=math.nan))
    with pytest.raises(EncodeError, match="surrogate"):
        encode(Envelope.request("bad \ud800 text"))


def test_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(UnsupportedDTypeError, match="complex64"):
        TensorPart(tensor=torch.zeros(2, dtype=torch.complex64))
    sneaky = TensorPart.model_construct(type="tensor", tensor=torch.zeros(2, dtype=torch.uint16), meta={})
    with pytest.raises(UnsupportedDTypeError, match="uint16"):
        encode(Envelope.request(sneaky))
    assert UnsupportedDTypeError.code == "unsupported_dtype"


# -- decode side: every rule, in order ------------------------------------------------------------
def test_rule_frame_too_short() -> None:
    raises(b"AIFL\x01", FrameTooShortError, "5 bytes", "12-byte preamble")
    raises(b"", FrameTooShortError, "0 bytes")


def test_rule_frame_too_large_checked_first() -> None:
    frame = encode(Envelope.request("x" * 100))
    raises(bytes(frame), FrameTooLargeError, f"{len(frame)} bytes", "limit is 50", limits=Limits(max_frame_bytes=50))
    # even garbage is refused for its size before its magic is looked at
    raises(b"\0" * 100, FrameTooLargeError, limits=Limits(max_frame_bytes=99))


def test_rule_magic_version_flags() -> None:
    good = bytes(encode(Envelope.request("x")))
    raises(b"AIFX" + good[4:], BadMagicError, "AIFX")
    raises(good[:4] + b"\x02" + good[5:], UnsupportedVersionError, "wire version 2")
    raises(good[:5] + b"\x80" + good[6:], UnsupportedVersionError, "flags 0x80")
    raises(good[:6] + b"\x00\x01" + good[8:], UnsupportedVersionError, "reserved 0x100")
    assert decode(good).text == "x"


def test_rule_header_too_large_before_truncation() -> None:
    raises(frame_of(header(), header_len=2000), HeaderTooLargeError, "2000", limits=Limits(max_header_bytes=1000))
    raises(struct.pack("<4sBBHI", b"AIFL", 1, 0, 0, 0xFFFFFFFF), HeaderTooLargeError, "4294967295")


def test_rule_header_truncated() -> None:
    raises(frame_of(header(), header_len=10_000), FrameTooShortError, "header declares 10000 bytes")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"id":"\xff"}', "UTF-8"),
        (b'{"id":"\xed\xa0\x80"}', "UTF-8"),  # a UTF-8-encoded surrogate is not UTF-8
        (b'{"id":', "not valid JSON"),
        (b"{} {}", "not valid JSON"),
        (b"\xef\xbb\xbf{}", "BOM"),
        (b'{"x":NaN}', "NaN is not valid JSON"),
        (b'{"x":-Infinity}', "-Infinity is not valid JSON"),
        (b'{"x":[1e400]}', "1e400 is out of range"),
        (b'{"x":-2.5e308}', "out of range"),
        (b'{"x":"a\x01b"}', "control character"),
        (b'{"x":' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"[]", "JSON object, got list"),
        (b'"s"', "JSON object, got str"),
        (b"null", "JSON object, got NoneType"),
    ],
    ids=[
        "utf8",
        "utf8-surrogate",
        "truncated-json",
        "trailing-json",
        "bom",
        "nan",
        "neg-infinity",
        "overflow",
        "overflow-neg",
        "control-char",
        "huge-int",
        "deep-nesting",
        "array",
        "string",
        "null",
    ],
)
def test_rule_header_decode(raw: bytes, fragment: str) -> None:
    err = raises(frame_of(raw), HeaderDecodeError, fragment)
    assert err.header is None


def test_rule_too_many_parts_is_checked_before_the_schema() -> None:
    h = header(parts=[{"type": "text", "text": "a"}] * 5, bogus=True)
    raises(frame_of(h), HeaderValidationError, "5 parts exceed the limit of 4", limits=Limits(max_parts=4))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda h: h.update(kind="command"), "kind"),
        (lambda h: h.update(priority=1), "priority: Extra inputs are not permitted"),
        (lambda h: h.pop("trace_id"), "trace_id: Field required"),
        (lambda h: h.pop("created_at"), "created_at: Field required"),
        (lambda h: h.update(id=""), "id: String should have at least 1 character"),
        (lambda h: h.update(id="x" * 129), "id: String should have at most 128"),
        (lambda h: h.update(sender=5), "sender: Input should be a valid string"),
        (lambda h: h.update(reply_to="r" * 1025), "reply_to"),
        (lambda h: h.update(created_at="1700000000"), "created_at: Input should be a valid number"),
        (lambda h: h.update(created_at=True), "created_at"),
        (lambda h: h.update(deadline="soon"), "deadline"),
        (lambda h: h.update(route=["a", 1]), "route.1"),
        (lambda h: h.update(route=None), "route"),
        (lambda h: h.update(meta=None), "meta: Input should be an object"),
        (lambda h: h.update(meta=[]), "meta"),
        (lambda h: h.update(parts={}), "parts"),
        (lambda h: h.update(parts=[{"type": "image"}]), "'image'"),
        (lambda h: h.update(parts=[{"text": "no type"}]), "discriminator 'type'"),
        (lambda h: h.update(parts=[{"type": "text", "text": 1}]), "parts.0.text.text"),
        (lambda h: h.update(parts=[{"type": "text"}]), "parts.0.text.text: Field required"),
        (lambda h: h.update(parts=[{"type": "text", "text": "", "meta": []}]), "parts.0.text.meta"),
        (lambda h: h.update(parts=[tensor_part() | {"dtype": "complex64"}]), "parts.0.tensor.dtype"),
        (lambda h: h.update(parts=[tensor_part() | {"dtype": "FLOAT32"}]), "parts.0.tensor.dtype"),
        (lambda h: h.update(parts=[tensor_part(role="attention")]), "parts.0.tensor.role"),
        (lambda h: h.update(parts=[tensor_part(shape=[2]) | {"shape": [2.0]}]), "parts.0.tensor.shape.0"),
        (lambda h: h.update(parts=[tensor_part(shape=[2]) | {"shape": ["2"]}]), "parts.0.tensor.shape.0"),
        (lambda h: h.update(parts=[tensor_part(shape=[2]) | {"shape": [True]}]), "parts.0.tensor.shape.0"),
        (lambda h: h.update(parts=[tensor_part(offset=-64)]), "parts.0.tensor.offset"),
        (lambda h: h.update(parts=[tensor_part(nbytes=-1)]), "parts.0.tensor.nbytes"),
        (lambda h: h.update(parts=[{k: v for k, v in tensor_part().items() if k != "role"}]), "role: Field required"),
        (lambda h: h.update(parts=[tensor_part(space={"family": ""})]), "space.family"),
        (lambda h: h.update(parts=[tensor_part(space={"family": "f", "layer": -2})]), "space.layer"),
        (lambda h: h.update(parts=[tensor_part(space={"family": "f", "hidden_size": 0})]), "space.hidden_size"),
        (lambda h: h.update(parts=[tensor_part(space={"family": "f", "dim": 3})]), "space.dim"),
        (lambda h: h.update(error={"message": "m"}), "error.code: Field required"),
        (lambda h: h.update(error={"code": "", "message": "m"}), "error.code"),
        (lambda h: h.update(error={"code": "c", "message": "m", "retryable": 1}), "error.retryable"),
        (lambda h: h.update(error={"code": "c", "message": "m", "detail": None}), "error.detail"),
        (lambda h: h.update(created_at=int("1" + "0" * 400)), "created_at: Input should be a finite number"),
        (lambda h: h.update(id="\ud800"), "Invalid JSON"),
    ],
)
def test_rule_header_schema(mutate: Any, fragment: str) -> None:
    h = header()
    mutate(h)
    err = raises(frame_of(json.dumps(h).encode()), HeaderValidationError, "v1 schema", fragment)
    assert err.header is not None and err.header.get("sender") == h.get("sender")


def test_integer_literal_is_accepted_as_a_number_but_no_other_coercion() -> None:
    out = decode(frame_of(header(created_at=17, deadline=20)))
    assert out.created_at == 17.0 and isinstance(out.created_at, float)
    assert out.deadline == 20.0


def test_optional_fields_may_be_omitted_and_nullable_ones_null() -> None:
    out = decode(frame_of(header(recipient=None, error=None)))
    assert (out.recipient, out.error, out.route, out.parts, out.meta) == (None, None, [], [], {})
    t = tensor_part(dtype="uint8", shape=[2])
    out = decode(frame_of(header(parts=[t])))  # no space, no meta
    assert out.parts[0].space is None and out.parts[0].meta == {}


def test_rule_too_many_dims() -> None:
    h = header(parts=[tensor_part(dtype="uint8", shape=[1] * 5)])
    raises(frame_of(h), SegmentError, "part 0", "5 dimensions exceed the limit of 4", limits=Limits(max_ndim=4))


def test_rule_negative_dimension() -> None:
    h = header(parts=[tensor_part(shape=[2, -2], nbytes=0)])
    raises(frame_of(h), SegmentError, "negative dimension", "[2, -2]")


def test_rule_shape_overflow_on_zero_size_tensor() -> None:
    h = header(parts=[tensor_part(shape=[0, 2**40, 2**40])])
    raises(frame_of(h), SegmentError, "overflows a 64-bit element count")
    ok = header(parts=[tensor_part(shape=[0, 2**31, 2**31])])  # huge but representable: fine
    assert decode(frame_of(ok)).parts[0].shape == (0, 2**31, 2**31)


def test_rule_nbytes_must_match_shape() -> None:
    raises(frame_of(header(parts=[tensor_part(shape=[4], nbytes=12)])), SegmentError, "nbytes 12", "(16)")
    raises(frame_of(header(parts=[tensor_part(shape=[], nbytes=0)])), SegmentError, "nbytes 0")


def test_rule_offset_alignment() -> None:
    raises(frame_of(header(parts=[tensor_part()]), rel=[32]), SegmentError, "not 64-byte aligned")


def test_rule_offset_inside_header() -> None:
    h = header(parts=[tensor_part()])
    raises(frame_of(h, absolute=[0]), SegmentError, "offset 0 lies inside the header")
    raises(frame_of(header(parts=[tensor_part()]), rel=[-64]), SegmentError, "inside the header")


def test_rule_segment_past_end() -> None:
    raises(frame_of(header(parts=[tensor_part()]), extra=-1), SegmentError, "runs past the end")


def test_rule_overlap() -> None:
    h = header(parts=[tensor_part(dtype="uint8", shape=[100]), tensor_part(dtype="uint8", shape=[10])])
    raises(frame_of(h, rel=[0, 64]), SegmentError, "parts 0 and 1: segments overlap")
    h = header(parts=[tensor_part(dtype="uint8", shape=[10]), tensor_part(dtype="uint8", shape=[100])])
    raises(frame_of(h, rel=[64, 0]), SegmentError, "segments overlap")  # out of order, still caught


def test_rule_frame_length() -> None:
    raises(frame_of(header(), extra=1), SegmentError, "accounts for")
    raises(frame_of(header(parts=[tensor_part()]), extra=64), SegmentError, "accounts for")


def test_non_canonical_but_valid_layouts_are_accepted() -> None:
    """Gaps, reversed segment order and non-zero padding are not errors (SPEC §5)."""
    h = header(parts=[tensor_part(dtype="uint8", shape=[3]), tensor_part(dtype="uint8", shape=[3])])
    frame = bytearray(frame_of(h, rel=[256, 0]))
    offsets = [p["offset"] for p in _header_of(frame)["parts"]]
    frame[offsets[0] : offsets[0] + 3] = b"\x01\x02\x03"
    frame[offsets[1] + 3] = 0xEE  # padding byte after the second segment
    out = decode(bytes(frame))
    assert out.parts[0].tensor.tolist() == [1, 2, 3]
    assert out.parts[1].tensor.tolist() == [0, 0, 0]


def test_rules_apply_in_order() -> None:
    # misaligned *and* past the end: alignment (rule 17) is reported first
    raises(frame_of(header(parts=[tensor_part()]), rel=[8], extra=-20), SegmentError, "aligned")
    # bad magic *and* too large: size first
    raises(b"XXXX" + b"\0" * 100, FrameTooLargeError, limits=Limits(max_frame_bytes=50))
    # schema error in part 0, segment error in part 1: the schema wins
    h = header(parts=[tensor_part(role="nope"), tensor_part(nbytes=3)])
    raises(frame_of(h), HeaderValidationError)


def test_huge_declared_shape_is_rejected_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the decoder allocated a tensor for a frame it should reject")

    monkeypatch.setattr(torch, "empty", forbidden)
    monkeypatch.setattr(torch, "frombuffer", forbidden)
    cases = [
        ([2**20, 2**20, 2**10], "runs past the end"),  # 4 TiB of float32
        ([2**60, 2], "runs past the end"),
        ([1] * 31 + [2**40], "runs past the end"),
        ([2**62, 4], "overflows a 64-bit element count"),
    ]
    for shape, fragment in cases:
        frame = frame_of(header(parts=[tensor_part(shape=shape)]), rel=[0], length=4096)
        raises(frame, SegmentError, "part 0", fragment)


def test_segment_errors_carry_the_header_for_an_error_reply() -> None:
    h = header(reply_to="aiflow/v1/default/clients/c/replies", correlation_id="corr", parts=[tensor_part()])
    err = raises(frame_of(h, extra=-2), SegmentError)
    assert err.header is not None
    assert err.header["reply_to"] == "aiflow/v1/default/clients/c/replies"
    assert err.header["correlation_id"] == "corr"
    assert raises(b"AIFX" + b"\0" * 20, BadMagicError).header is None


def test_nothing_but_protocol_errors_escape_decode() -> None:
    class Weird:
        pass

    for payload in (Weird(), 42, memoryview(b"\0" * 64)[::2]):
        with pytest.raises(ProtocolError):
            decode(payload)  # type: ignore[arg-type]


def test_peek_header_skips_part_validation() -> None:
    h = header(reply_to="r", parts=[tensor_part(nbytes=3)])
    frame = frame_of(h)
    assert peek_header(frame)["reply_to"] == "r"
    with pytest.raises(SegmentError):
        decode(frame)
    with pytest.raises(BadMagicError):
        peek_header(b"XXXX" + frame[4:])
    with pytest.raises(ProtocolError):
        peek_header(object())  # type: ignore[arg-type]


# -- envelope helpers -----------------------------------------------------------------------------
def test_reply_and_error_reply_follow_the_correlation_rule() -> None:
    req = Envelope.request("q", sender="client", recipient="agent", reply_to="r", deadline=99.0)
    rep = req.reply("a")
    assert (rep.kind, rep.sender, rep.recipient) == (Kind.REPLY, "agent", "client")
    assert rep.correlation_id == req.id and rep.parent_id == req.id and rep.trace_id == req.trace_id
    assert rep.deadline == 99.0
    req2 = Envelope.request("q", sender="client", recipient="agent", correlation_id="fixed")
    err = req2.error_reply("busy", "try later", retryable=True, queue=3)
    assert (err.kind, err.correlation_id, err.recipient) == (Kind.ERROR, "fixed", "client")
    assert err.error == ErrorInfo(code="busy", message="try later", agent="agent", retryable=True, detail={"queue": 3})
    assert decode(encode(err)).error == err.error


def test_deadline_helpers() -> None:
    env = Envelope.request("x", deadline=100.0)
    assert not env.expired(now=99.9) and env.expired(now=100.0)
    assert env.remaining(now=90.0) == 10.0
    assert Envelope.request("x").remaining() is None and not Envelope.request("x").expired()


# -- FeatureSpace ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["qwen2", "qwen2/Qwen2-0.5B", "qwen2@-1", "qwen2#896", "qwen2~qwen2", "llama/meta-llama/Llama-3-8B@12#4096~llama3"],
)
def test_feature_space_string_round_trip(text: str) -> None:
    space = FeatureSpace.from_str(text)
    assert str(space) == text
    assert FeatureSpace.from_str(str(space)) == space


def test_feature_space_parse_fields() -> None:
    s = FeatureSpace.from_str("qwen2/Qwen2-0.5B@-1#896~qwen2-tok")
    assert (s.family, s.model, s.layer, s.hidden_size, s.tokenizer) == ("qwen2", "Qwen2-0.5B", -1, 896, "qwen2-tok")
    with pytest.raises(ValueError):
        FeatureSpace.from_str("qwen2#wide")
    with pytest.raises(ValueError):
        FeatureSpace.from_str("qwen2@-2")
    with pytest.raises(ValueError):
        FeatureSpace.from_str("/model")


def test_feature_space_compatibility() -> None:
    a = FeatureSpace(family="qwen2", model="Qwen2-0.5B", layer=-1, hidden_size=896, tokenizer="qwen2")
    same_space_other_member = FeatureSpace(
        family="qwen2", model="Qwen2-0.5B-Instruct", layer=10, hidden_size=896, tokenizer="qwen2"
    )
    assert a.compatible_with(same_space_other_member) and same_space_other_member.compatible_with(a)
    assert not a.compatible_with(a.model_copy(update={"hidden_size": 1536}))
    assert not a.compatible_with(a.model_copy(update={"tokenizer": "other"}))
    assert not a.compatible_with(a.model_copy(update={"family": "llama"}))
    assert not a.compatible_with(a.model_copy(update={"tokenizer": None}))
    assert FeatureSpace(family="f").compatible_with(FeatureSpace(family="f", model="m", layer=3))


# -- MQTT binding ---------------------------------------------------------------------------------
def test_topics() -> None:
    t = Topics("prod")
    assert t.inbox("qa") == "aiflow/v1/prod/agents/qa/inbox"
    assert t.shared_inbox("qa") == "$share/qa/aiflow/v1/prod/agents/qa/inbox"
    assert t.group("judges") == "aiflow/v1/prod/groups/judges/inbox"
    assert t.replies("cli-1") == "aiflow/v1/prod/clients/cli-1/replies"
    assert t.events("qa") == "aiflow/v1/prod/events/qa"
    assert t.errors("qa") == "aiflow/v1/prod/errors/qa"
    assert t.node_presence("n1") == "aiflow/v1/prod/presence/nodes/n1"
    assert t.agent_presence("qa", "n1") == "aiflow/v1/prod/presence/agents/qa/n1"
    assert t.presence_filter == "aiflow/v1/prod/presence/#"
    assert Topics().base == "aiflow/v1/default"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "a b", ".x", "-x", "$sys", "x" * 129, "é", "agent.v2"])
def test_invalid_ids_are_rejected_everywhere(bad: str) -> None:
    t = Topics()
    assert not is_valid_agent_id(bad)
    for make in (t.inbox, t.shared_inbox, t.group, t.replies, t.events, t.errors, t.node_presence, check_level):
        with pytest.raises(ValueError, match="invalid"):
            make(bad)
    with pytest.raises(ValueError, match="node id"):
        t.agent_presence("ok", bad)
    with pytest.raises(ValueError, match="namespace"):
        Topics(bad)


def test_valid_ids() -> None:
    for good in ("a", "_x", "9", "agent-v2_b", "x" * 128):
        assert is_valid_agent_id(good) and check_level(good) == good


def test_parse_presence() -> None:
    t = Topics("ns")
    assert t.parse_presence(t.node_presence("n1")) == ("node", "n1", None)
    assert t.parse_presence(t.agent_presence("qa", "n1")) == ("agent", "n1", "qa")
    assert t.parse_presence("aiflow/v1/other/presence/nodes/n1") is None
    assert t.parse_presence("aiflow/v1/ns/presence/nodes/n1/extra") is None
    assert t.parse_presence("aiflow/v1/ns/presence/agents/qa") is None
    assert t.parse_presence("aiflow/v1/ns/presence/things/a") is None
    assert t.parse_presence(t.inbox("qa")) is None


def test_presence_record_round_trip_and_leniency() -> None:
    rec = PresenceRecord(status=Status.ONLINE, node_id="n1", agent_id="qa", groups=["g"], ts=5.0)
    assert PresenceRecord.from_bytes(rec.to_bytes()) == rec
    newer = PresenceRecord.from_bytes(b'{"status":"offline","node_id":"n1","future_field":1}')
    assert newer.status == Status.OFFLINE and newer.agent_id is None
    with pytest.raises(ValueError):
        PresenceRecord.from_bytes(b'{"status":"away","node_id":"n1"}')


def test_mqtt5_properties() -> None:
    req = Envelope.request("q", sender="cli", reply_to="aiflow/v1/default/clients/cli/replies", deadline=110.2)
    props = mqtt5_properties(req, now=100.0)
    assert props["ContentType"] == CONTENT_TYPE == "application/vnd.aiflow.v1"
    assert props["UserProperty"] == [("aiflow-kind", "request"), ("aiflow-id", req.id), ("aiflow-sender", "cli")]
    assert props["ResponseTopic"] == req.reply_to
    assert props["CorrelationData"] == req.id.encode()  # no correlation id: the request id
    assert props["MessageExpiryInterval"] == 11
    rep = req.reply("a")
    props = mqtt5_properties(rep, now=100.0)
    assert props["CorrelationData"] == req.id.encode() and "ResponseTopic" not in props
    event = Envelope(kind=Kind.EVENT, sender="a")
    props = mqtt5_properties(event)
    assert set(props) == {"ContentType", "UserProperty"}
    assert mqtt5_properties(Envelope.request("x", deadline=50.0), now=100.0)["MessageExpiryInterval"] == 1
    far = Envelope.request("x", deadline=1e12)
    assert mqtt5_properties(far, now=0.0)["MessageExpiryInterval"] == 2**32 - 1


# -- the encoder's fast header path writes exactly what the reference form (SPEC §8.2) says ----
_AWKWARD_META: list[dict[str, Any]] = [
    {},
    {"nested": {"list": [1, 2.5, None, True, "x"], "deep": {"a": [[], {}]}}},
    {"unicode": "é ü 漢字 \u2028\u2029 \x7f", "controls": '\x00\x01\n\t\x1f"\\'},
    {"floats": [0.0, -0.0, 1e-4, 1.5e-4, 1e-05, 3e-7, 1e-10, 1e16, 1.7976931348623157e308, 5e-324, 0.1]},
    {"ints": [0, -1, 2**53 + 1, 2**70, -(2**70)], "bools": [True, False]},
    {"tuple": (1, 2), 'key with "quotes"': "v"},
]


@pytest.mark.parametrize("meta", _AWKWARD_META, ids=range(len(_AWKWARD_META)))
def test_fast_header_writer_matches_the_stdlib_reference_byte_for_byte(
    meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import protocols.codec as codec

    env = Envelope.request(
        TextPart(text="t", meta=meta),
        TensorPart(tensor=torch.arange(5, dtype=torch.int16), role=TensorRole.EMBEDDING, meta=meta),
        TensorPart(tensor=torch.zeros(0), role=TensorRole.OTHER),
        meta=meta,
        deadline=1e16,
    )
    fast = encode(env)
    monkeypatch.setattr(codec, "_plain", lambda *a: False)  # force the stdlib writer
    assert encode(env) == fast
    out = decode(fast)
    assert out.meta == json.loads(json.dumps(meta))


def test_a_meta_value_that_looks_like_an_offset_marker_does_not_confuse_the_layout() -> None:
    from protocols.codec import _OFFSET_MARK

    t = torch.arange(300, dtype=torch.float32)
    meta = {"offset": _OFFSET_MARK, "nbytes": 1}
    env = Envelope.request(TensorPart(tensor=t, role=TensorRole.EMBEDDING, meta=meta), meta=meta)
    frame = encode(env)
    out = decode(frame)
    assert torch.equal(out.parts[0].tensor, t)
    assert out.parts[0].meta == meta and out.meta == meta
    header = json.loads(frame[PREAMBLE_SIZE : PREAMBLE_SIZE + struct.unpack_from("<I", frame, 8)[0]])
    assert header["parts"][0]["offset"] == _align(PREAMBLE_SIZE + len(json.dumps(header, separators=(",", ":"))))
