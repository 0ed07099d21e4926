"""Write the golden frames of latent-message protocol v1.

Every valid vector is a pair ``NAME.bin`` (the frame) + ``NAME.json`` (what it decodes to); every
invalid one is ``bad_NAME.bin`` + ``bad_NAME.json`` (the error code a decoder must raise). The
files are data for other implementations, so this script is deterministic: fixed ids, fixed
timestamps, tensors built from ``torch.arange``. Run it from the repository root::

    PYTHONPATH=. python protocols/vectors/generate.py          # (re)write the files
    PYTHONPATH=. python protocols/vectors/generate.py --check  # exit 1 if the files are stale

Signed frames (SPEC §13.1) live in ``signed/``, apart from the unsigned set, because a decoder
checks them with a key: ``signed/NAME.json`` adds ``key_hex`` (the published test key
``000102...1f``), ``key_id`` and ``signed_length`` (bytes covered before the MAC) to the fields
below; ``signed/bad_NAME.json`` adds ``key_hex``, the key the decoder must be given.

``NAME.json`` (valid vectors)::

    {"description": str, "frame_size": int, "header_length": int,
     "header": <the frame's JSON header, exactly as decoded>,
     "tensors": [{"part": index in header.parts, "dtype": str, "shape": [int],
                  "values": [flat row-major values]}]}

Tensor values are JSON numbers (bool tensors: true/false). Floating-point values that JSON
cannot carry are the strings "NaN", "Infinity" and "-Infinity".
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from protocols import (
    ALIGNMENT,
    MAGIC,
    PREAMBLE_SIZE,
    WIRE_VERSION,
    BadMagicError,
    DType,
    Envelope,
    ErrorInfo,
    FeatureSpace,
    FrameTooShortError,
    HeaderDecodeError,
    HeaderTooLargeError,
    HeaderValidationError,
    Keyring,
    Kind,
    ProtocolError,
    SegmentError,
    SignatureError,
    SigningKey,
    TensorPart,
    TensorRole,
    TextPart,
    UnsignedFrameError,
    UnsupportedVersionError,
    decode,
    encode,
    ops,
)
from protocols import compression as C
from protocols.codec import MAX_JSON_DEPTH
from protocols.signing import FLAG_SIGNED, KEY_ID_SIZE, MAC_SIZE, TRAILER_SIZE

HERE = Path(__file__).resolve().parent
SIGNED_DIR = "signed"
TEST_KEY = bytes(range(32))  # published on purpose: a test vector key, never a deployment's
OTHER_KEY = bytes(range(100, 132))
CREATED_AT = 1_700_000_000.25
DEADLINE = 1_700_000_030.5


def _id(n: int) -> str:
    return f"{n:032x}"


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _env(n: int, *parts: TextPart | TensorPart, **fields: Any) -> Envelope:
    base: dict[str, Any] = {
        "id": _id(n),
        "trace_id": _id(0x7000 + n),
        "created_at": CREATED_AT,
        "sender": "vector-gen",
    }
    base.update(fields)
    return Envelope(parts=list(parts), **base)


def _dtype_tensor(dtype: DType) -> torch.Tensor:
    """A small (2, 3) or so tensor per dtype whose values include each type's edge cases."""
    if dtype is DType.FLOAT64:
        return torch.tensor([[0.1, -2.5, 1e-300], [1.7976931348623157e308, -0.0, 3.0]], dtype=torch.float64)
    if dtype is DType.FLOAT32:
        return (torch.arange(6, dtype=torch.float32) * 0.25 - 0.5).reshape(2, 3)
    if dtype is DType.FLOAT16:
        return torch.tensor([[65504.0, -65504.0, 2.0**-24], [0.5, -1.0, 1024.0]], dtype=torch.float16)
    if dtype is DType.BFLOAT16:
        return (torch.arange(-4, 4, dtype=torch.bfloat16) * 0.375).reshape(2, 4)
    if dtype is DType.INT64:
        return torch.tensor([-(2**63), -1, 0, 1, 2**53 + 1, 2**63 - 1], dtype=torch.int64)
    if dtype is DType.INT32:
        return torch.tensor([[-(2**31), -1, 0], [1, 65536, 2**31 - 1]], dtype=torch.int32)
    if dtype is DType.INT16:
        return torch.tensor([-(2**15), -2, 0, 3, 2**15 - 1], dtype=torch.int16)
    if dtype is DType.INT8:
        return torch.arange(-128, 128, 51, dtype=torch.int8)
    if dtype is DType.UINT8:
        return torch.arange(0, 256, 51, dtype=torch.uint8).reshape(2, 3)
    if dtype is DType.BOOL:
        return (torch.arange(6) % 3 == 0).reshape(3, 2)
    raise AssertionError(dtype)  # pragma: no cover


def valid_envelopes() -> dict[str, tuple[str, Envelope]]:
    """name -> (description, envelope)."""
    space = FeatureSpace(family="qwen2", model="Qwen2-0.5B-Instruct", layer=-1, hidden_size=8, tokenizer="qwen2")
    out: dict[str, tuple[str, Envelope]] = {}
    out["example_small"] = (
        "The worked example of SPEC.md: one text part and one float16 tensor.",
        Envelope(
            id="m1",
            kind=Kind.REQUEST,
            sender="a",
            recipient="b",
            trace_id="t1",
            created_at=1_700_000_000.0,
            parts=[
                TextPart(text="hi"),
                TensorPart(tensor=torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16), role=TensorRole.HIDDEN_STATE),
            ],
        ),
    )
    out["text_only"] = (
        "A request with a single text part and a reply address; no tensor bytes, so the frame ends at 12 + header.",
        _env(
            1,
            TextPart(text="What is the capital of France?"),
            kind=Kind.REQUEST,
            recipient="qa-agent",
            reply_to="aiflow/v1/default/clients/cli-1/replies",
            deadline=DEADLINE,
        ),
    )
    out["hidden_state_f16"] = (
        "A text prompt plus a (1, 3, 8) float16 hidden state tagged with the feature space it lives in.",
        _env(
            2,
            TextPart(text="The quick brown fox"),
            TensorPart(
                tensor=(torch.arange(24, dtype=torch.float16) / 8 - 1.5).reshape(1, 3, 8),
                role=TensorRole.HIDDEN_STATE,
                space=space,
                meta={"tokens": [464, 2068, 7586], "pooling": None},
            ),
            recipient="decoder",
        ),
    )
    for dt in DType:
        out[f"dtype_{dt.value}"] = (
            f"One {dt.value} tensor ({dt.itemsize} byte{'s' if dt.itemsize > 1 else ''} per element) with edge values.",
            _env(10 + list(DType).index(dt), TensorPart(tensor=_dtype_tensor(dt))),
        )
    out["zero_size"] = (
        "Only a zero-size tensor: no tensor bytes, yet the frame runs to the aligned offset of that part.",
        _env(30, TensorPart(tensor=torch.zeros(0, 4, dtype=torch.float32), role=TensorRole.EMBEDDING)),
    )
    out["zero_size_mixed"] = (
        "Zero-size tensors between and after non-empty ones: the trailing one keeps the padding before it.",
        _env(
            31,
            TensorPart(tensor=torch.arange(3, dtype=torch.float16)),
            TensorPart(tensor=torch.zeros(0, dtype=torch.float32)),
            TensorPart(tensor=torch.arange(5, dtype=torch.int8)),
            TensorPart(tensor=torch.zeros(2, 0, 3, dtype=torch.bool)),
        ),
    )
    out["scalar"] = (
        "0-dimensional tensors: shape [] holds exactly one element.",
        _env(
            32,
            TensorPart(tensor=torch.tensor(3.5, dtype=torch.float32), meta={"name": "temperature"}),
            TensorPart(tensor=torch.tensor(-7, dtype=torch.int64), meta={"name": "step"}),
        ),
    )
    out["multi_tensor"] = (
        "Text and tensor parts interleaved; segments follow part order.",
        _env(
            33,
            TextPart(text="logits follow"),
            TensorPart(
                tensor=torch.softmax(torch.arange(8, dtype=torch.float32), 0).reshape(2, 4).round(decimals=3),
                role=TensorRole.TOKEN_DISTRIBUTION,
            ),
            TextPart(text="embedding follows"),
            TensorPart(tensor=torch.arange(4, dtype=torch.bfloat16) - 1.5, role=TensorRole.EMBEDDING),
            TensorPart(tensor=torch.arange(12, dtype=torch.int64).reshape(2, 3, 2), role=TensorRole.KV_CACHE),
        ),
    )
    out["special_floats"] = (
        "Tensor data may hold NaN, infinities, -0.0 and subnormals (only the JSON header forbids them).",
        _env(
            34,
            TensorPart(
                tensor=torch.tensor(
                    [float("nan"), float("inf"), float("-inf"), -0.0, 2.0**-149, 3.4028234663852886e38],
                    dtype=torch.float32,
                )
            ),
        ),
    )
    out["error"] = (
        "An error envelope answering request 1: kind error, error info, no parts.",
        _env(
            35,
            kind=Kind.ERROR,
            sender="qa-agent",
            recipient="cli-1",
            correlation_id=_id(1),
            parent_id=_id(1),
            trace_id=_id(0x7001),
            error=ErrorInfo(
                code="deadline_exceeded",
                message="the request expired before it was handled",
                agent="qa-agent",
                retryable=True,
                detail={"deadline": DEADLINE, "late_by_s": 0.5},
            ),
        ),
    )
    out["unicode_text"] = (
        "Non-ASCII text travels as raw UTF-8 (not \\u escapes); control characters are JSON-escaped.",
        _env(
            36,
            TextPart(text='héllo wörld — 你好 🌍 مرحبا\n\t"quoted" back\\slash nul:\u0000 bell:\u0007'),
            TextPart(text="", meta={"ключ": "значение", "emoji": "👍🏽"}),
            sender="agent-ü",
        ),
    )
    out["meta_nested"] = (
        "An event whose meta nests objects, arrays, null, booleans, integers and floats at every level.",
        _env(
            37,
            TextPart(text="progress", meta={"step": {"i": 3, "of": 10}, "tags": ["a", "b"]}),
            TensorPart(
                tensor=torch.arange(4, dtype=torch.int32),
                meta={"source": {"layer": [1, 2, {"x": None}]}, "ok": True, "scale": 0.5},
            ),
            kind=Kind.EVENT,
            meta={
                "nested": {"list": [1, 2.5, "three", None, True, False, {"deep": [[[]]]}], "empty": {}},
                "big_int": 2**64 + 1,
                "negative": -12.75,
            },
        ),
    )
    out["route"] = (
        "A reply in a cascade: route lists the agents the conversation passed through, in order.",
        _env(
            38,
            TextPart(text="final answer: Paris"),
            kind=Kind.REPLY,
            sender="judge",
            recipient="cli-1",
            correlation_id="req-42",
            parent_id=_id(1),
            trace_id=_id(0x7001),
            deadline=DEADLINE,
            route=["planner", "drafter@node-a", "critic", "judge"],
        ),
    )
    deep: dict[str, Any] = {}
    for _ in range(MAX_JSON_DEPTH - 4):  # header object, meta, the list and the innermost {}: the limit
        deep = {"d": deep}
    out["meta_depth_limit"] = (
        f"A header nested exactly {MAX_JSON_DEPTH} levels deep (SPEC §3.1: arrays and objects count alike).",
        _env(39, TextPart(text="deep"), meta={"deep": [deep]}),
    )
    out["layout_least_fixed_point"] = _least_fixed_point()
    out.update(encoding_envelopes())
    return out


def _least_fixed_point() -> tuple[str, Envelope]:
    """A zero-size and a 4-element tensor, the header ending at byte 959: offsets 960/960 are
    consistent, and so are 1024/1024 (one more digit each pushes the header end past 960)."""
    parts = [torch.zeros(0, dtype=torch.float32), torch.arange(4, dtype=torch.float32)]
    for pad in range(1000):
        env = _env(41, TextPart(text="x" * pad), *[TensorPart(tensor=t) for t in parts])
        frame = encode(env)
        header_len = struct.unpack_from("<I", frame, 8)[0]
        if PREAMBLE_SIZE + header_len == 959:
            description = (
                "A zero-size and a 4-element tensor whose header ends at byte 959: both canonical offsets "
                "are 960. Writing 1024 for both would also be self-consistent (two more digits push the "
                "header end to 961, so data_start is 1024), but the canonical layout is the least fixed "
                "point, reached by iterating from one-digit offsets (SPEC §5)."
            )
            return description, env
    raise AssertionError("no padding puts the header end at 959")  # pragma: no cover


def encoding_envelopes() -> dict[str, tuple[str, Envelope]]:
    """The latent encodings of SPEC §17, one vector each (their JSON adds ``restored``)."""
    space = FeatureSpace(family="demo", model="demo-1", layer=2, hidden_size=4, tokenizer="demo")
    hidden = torch.tensor([[1.0, -2.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0], [127.0, 63.5, -254.0, 1.0]])
    probs = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]])
    logits = torch.tensor([[2.0, -1.0, 3.5, 0.0, 3.5]], dtype=torch.float16)
    hs = TensorRole.HIDDEN_STATE
    out: dict[str, tuple[str, Envelope]] = {}
    for name in C.PLAIN:
        out[f"encoding_{name}"] = (
            f"A hidden state in the plain encoding {name}: one part of that dtype, meta.encoding = {name!r}.",
            _env(50, TextPart(text="p"), *C.pack(hidden, name, role=hs, space=space)),
        )
    out["encoding_int8_rowwise"] = (
        "A (3, 4) float32 hidden state as int8-rowwise: the int8 head (role other, meta names role and "
        "dtype) and its float32 scales (3, 1); one row is all zeros (scale 0).",
        _env(51, TextPart(text="p"), *C.pack(hidden, C.INT8_ROWWISE, role=hs, space=space, meta={"layer": 2})),
    )
    out["encoding_topk"] = (
        "Two probability rows over 6 tokens as topk k=3 (fill 0): values descending, ties to the lower "
        "index, then the int32 indices part.",
        _env(52, *C.pack(probs, C.TOPK, role=TensorRole.TOKEN_DISTRIBUTION, space=space, k=3, fill=0.0)),
    )
    out["encoding_topk_logits"] = (
        'float16 logits as topk k=2 with fill "-inf": a tie at 3.5 keeps index 2 before 4.',
        _env(53, *C.pack(logits, C.TOPK, role=TensorRole.TOKEN_DISTRIBUTION, k=2)),
    )
    unknown = TensorPart(tensor=torch.arange(8, dtype=torch.uint8), role=hs, meta={"encoding": "zstd"})
    out["encoding_unknown"] = (
        "A valid frame whose tensor part names an encoding this version does not define: a receiver "
        "MUST NOT use the part and answers unsupported_encoding if it cannot do without it (SPEC §17.4).",
        _env(54, TextPart(text="p"), unknown),
    )
    return out


def restored_of(frame: bytes) -> dict[str, Any]:
    """What the encodings of a decoded frame restore to (SPEC §17): the parts after expansion, or
    the error code a receiver answers."""
    try:
        parts = C.expand(decode(frame).parts)
    except C.CompressionError as e:
        return {"restored_error": e.code}
    return {
        "restored": [
            {
                "part": i,
                "role": p.role.value,
                "dtype": p.dtype.value,
                "shape": list(p.shape),
                "meta": p.meta,
                "values": _values(p.tensor),
            }
            for i, p in enumerate(parts)
            if isinstance(p, TensorPart)
        ]
    }


def _values(t: torch.Tensor) -> list[Any]:
    flat = t.reshape(-1).tolist()
    if not t.dtype.is_floating_point:
        return flat
    return [_float_value(v) for v in flat]


def _float_value(v: float) -> float | str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def expected_of(description: str, envelope: Envelope, frame: bytes) -> dict[str, Any]:
    header_len = struct.unpack_from("<I", frame, 8)[0]
    header = json.loads(frame[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len])
    tensors = [
        {"part": i, "dtype": p.dtype.value, "shape": list(p.shape), "values": _values(p.tensor)}
        for i, p in enumerate(envelope.parts)
        if isinstance(p, TensorPart)
    ]
    return {
        "description": description,
        "frame_size": len(frame),
        "header_length": header_len,
        "header": header,
        "tensors": tensors,
    }


# -- invalid frames --------------------------------------------------------------------------
def _preamble(
    header_len: int, *, magic: bytes = MAGIC, version: int = WIRE_VERSION, flags: int = 0, reserved: int = 0
) -> bytes:
    return struct.pack("<4sBBHI", magic, version, flags, reserved, header_len)


def _header(**overrides: Any) -> dict[str, Any]:
    h: dict[str, Any] = {
        "id": _id(99),
        "kind": "request",
        "sender": "vector-gen",
        "trace_id": _id(0x7099),
        "created_at": CREATED_AT,
        "parts": [],
    }
    h.update(overrides)
    return h


def _tensor(dtype: str, shape: list[int], **overrides: Any) -> dict[str, Any]:
    n = math.prod(shape) * DType(dtype).itemsize
    p: dict[str, Any] = {"type": "tensor", "role": "other", "dtype": dtype, "shape": shape, "offset": 0, "nbytes": n}
    p.update(overrides)
    return p


def craft(
    header: dict[str, Any],
    *,
    layout: list[tuple[int, int]] | None = None,
    offsets: list[int | None] | None = None,
) -> bytes:
    """A frame with this header whose tensor parts' data (bytes 0x11) sit at ``data_start + rel`` for
    one ``(rel, nbytes)`` per tensor part (default: the encoder's own layout). ``offsets`` forces
    what the header declares for a part (None: the real position). The frame ends after the
    furthest data placed, or right after the header when there is none."""
    tensors = [p for p in header["parts"] if p["type"] == "tensor"]
    forced = offsets or [None] * len(tensors)
    if layout is None:
        layout, cursor = [], 0
        for p in tensors:
            layout.append((cursor, p["nbytes"]))
            cursor = _align(cursor + p["nbytes"])
    for _ in range(8):  # offsets change the header length, which moves data_start: iterate to a fixpoint
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        start = _align(PREAMBLE_SIZE + len(raw))
        changed = False
        for p, (rel, _n), force in zip(tensors, layout, forced, strict=True):
            want = start + rel if force is None else force
            if p["offset"] != want:
                p["offset"], changed = want, True
        if not changed:
            break
    end = max((start + rel + n for rel, n in layout if n), default=PREAMBLE_SIZE + len(raw))
    buf = bytearray(end)
    buf[:PREAMBLE_SIZE] = _preamble(len(raw))
    buf[PREAMBLE_SIZE : PREAMBLE_SIZE + len(raw)] = raw
    for rel, n in layout:
        buf[start + rel : start + rel + n] = b"\x11" * n
    return bytes(buf)


def _raw_frame(header_bytes: bytes, **preamble: Any) -> bytes:
    return _preamble(len(header_bytes), **preamble) + header_bytes


def invalid_frames(valid: dict[str, bytes]) -> dict[str, tuple[str, str, str, bytes]]:
    """name -> (description, error code, exception class, frame)."""
    good = valid["text_only"]
    tensor_frame = valid["dtype_float32"]
    h_ok = json.dumps(_header(), separators=(",", ":")).encode()
    out: dict[str, tuple[str, str, str, bytes]] = {}

    def add(name: str, description: str, exc: type[ProtocolError], frame: bytes) -> None:
        out[f"bad_{name}"] = (description, exc.code, exc.__name__, frame)

    add("empty", "Zero bytes: shorter than the preamble.", FrameTooShortError, b"")
    add("short_preamble", "Eight bytes: shorter than the 12-byte preamble.", FrameTooShortError, good[:8])
    add("magic", "Magic 'AIFX' instead of 'AIFL'.", BadMagicError, b"AIFX" + good[4:])
    add("version", "Wire version 2.", UnsupportedVersionError, good[:4] + b"\x02" + good[5:])
    add("version_zero", "Wire version 0.", UnsupportedVersionError, good[:4] + b"\x00" + good[5:])
    add(
        "flags",
        "Flags byte 0x02 (v1 defines bit 0, 'signed', only).",
        UnsupportedVersionError,
        good[:5] + b"\x02" + good[6:],
    )
    add(
        "signed_no_trailer",
        "Flag 'signed' set on a 20-byte frame: no room for the 40-byte key id + MAC trailer.",
        FrameTooShortError,
        (good[:5] + bytes([FLAG_SIGNED]) + good[6:])[:20],
    )
    add("reserved", "Reserved u16 = 1.", UnsupportedVersionError, good[:6] + b"\x01\x00" + good[8:])
    add(
        "header_too_large",
        "Header length 1 MiB + 1 (over the default limit), checked before the bytes are looked for.",
        HeaderTooLargeError,
        _preamble((1 << 20) + 1),
    )
    add(
        "truncated_header",
        "The header length runs past the end of the frame.",
        FrameTooShortError,
        good[: PREAMBLE_SIZE + 10],
    )
    add("header_utf8", "Header bytes are not UTF-8 (a lone 0xFF).", HeaderDecodeError, _raw_frame(h_ok[:-1] + b"\xff}"))
    add("header_json", "Header is not JSON (unterminated object).", HeaderDecodeError, _raw_frame(h_ok[:-1]))
    add("header_not_object", "Header is a JSON array, not an object.", HeaderDecodeError, _raw_frame(b"[]"))
    innermost = {"arrays": b"[]", "objects": b"{}"}
    for kind, (o, c) in {"arrays": (b"[", b"]"), "objects": (b'{"d":', b"}")}.items():
        n = MAX_JSON_DEPTH - 1  # with the header object: one level over the limit
        add(
            f"header_too_deep_{kind}",
            f"A header nested {MAX_JSON_DEPTH + 1} levels deep (meta holds {kind}): one over the limit (SPEC §3.1).",
            HeaderDecodeError,
            _raw_frame(h_ok[:-1] + b',"meta":{"x":' + o * (n - 1) + innermost[kind] + c * (n - 1) + b"}}"),
        )
    add(
        "header_bom",
        "Header starts with a UTF-8 byte-order mark.",
        HeaderDecodeError,
        _raw_frame(b"\xef\xbb\xbf" + h_ok),
    )
    add(
        "header_nan",
        "NaN in meta: not JSON.",
        HeaderDecodeError,
        _raw_frame(h_ok[:-1] + b',"meta":{"x":NaN}}'),
    )
    add(
        "header_infinity",
        "Infinity as a header number: not JSON.",
        HeaderDecodeError,
        _raw_frame(h_ok.replace(b'"created_at":1700000000.25', b'"created_at":Infinity')),
    )
    add(
        "header_float_overflow",
        "The literal 1e400 overflows a binary64 double (it would decode as infinity).",
        HeaderDecodeError,
        _raw_frame(h_ok[:-1] + b',"meta":{"x":1e400}}'),
    )
    add(
        "header_int_overflow_float",
        "created_at is an integer literal of 400 digits: out of range for a double.",
        HeaderValidationError,
        _raw_frame(h_ok.replace(b'"created_at":1700000000.25', b'"created_at":1' + b"0" * 400)),
    )
    add(
        "header_control_char",
        "A raw control character (U+0001) inside a JSON string.",
        HeaderDecodeError,
        _raw_frame(h_ok.replace(b'"sender":"vector-gen"', b'"sender":"vector\x01gen"')),
    )
    add(
        "lone_surrogate",
        "A \\ud800 escape (lone surrogate) in a string: not a Unicode scalar value.",
        HeaderValidationError,
        _raw_frame(h_ok.replace(b'"sender":"vector-gen"', b'"sender":"\\ud800"')),
    )
    add(
        "reply_to_nul",
        "reply_to holds U+0000 (escaped in JSON): not an MQTT topic name (SPEC §6 check 12a).",
        HeaderValidationError,
        craft(_header(reply_to="aiflow/v1/default/clients/x\u0000/replies")),
    )
    add(
        "reply_to_wildcard",
        "reply_to holds the wildcard '+': a topic filter, not a topic name one can publish to.",
        HeaderValidationError,
        craft(_header(reply_to="aiflow/v1/default/clients/+/replies")),
    )
    add(
        "sender_noncharacter",
        "sender holds the non-character U+FFFF, which MQTT brokers refuse in a user property.",
        HeaderValidationError,
        craft(_header(sender="vector\uffffgen")),
    )
    add(
        "route_hop",
        "A route hop 'judge/#' that would become a topic level: '/' and wildcards are refused.",
        HeaderValidationError,
        craft(_header(route=["critic", "judge/#"])),
    )
    add(
        "reply_to_levels",
        "reply_to has 201 levels: Mosquitto 2.0 disconnects a publisher beyond 200 '/' (SPEC §6.1).",
        HeaderValidationError,
        craft(_header(reply_to="r/" * 200 + "r")),
    )
    add(
        "reply_to_space",
        "reply_to holds a space: not portable, the NATS MQTT listener closes the connection (SPEC §6.1).",
        HeaderValidationError,
        craft(_header(reply_to="aiflow/v1/default/clients/cli 1/replies")),
    )
    add(
        "reply_to_dot",
        "reply_to holds a '.': not portable, the NATS MQTT listener closes the connection (SPEC §6.1).",
        HeaderValidationError,
        craft(_header(reply_to="aiflow/v1/default/clients/cli.1/replies")),
    )
    add(
        "route_hop_dot",
        "A route hop 'judge.v2' would become an inbox topic level holding a '.': not portable (SPEC §6.1).",
        HeaderValidationError,
        craft(_header(route=["critic", "judge.v2"])),
    )
    add("unknown_kind", "kind 'command' is not a v1 kind.", HeaderValidationError, craft(_header(kind="command")))
    add("unknown_field", "An unknown top-level field 'priority'.", HeaderValidationError, craft(_header(priority=1)))
    h = _header()
    del h["trace_id"]
    add("missing_field", "The required field trace_id is missing.", HeaderValidationError, craft(h))
    add("empty_id", "id is the empty string (1..128 characters).", HeaderValidationError, craft(_header(id="")))
    add("id_too_long", "id has 129 characters (limit 128).", HeaderValidationError, craft(_header(id="x" * 129)))
    add(
        "string_created_at",
        'created_at is the string "1700000000": no coercion.',
        HeaderValidationError,
        craft(_header(created_at="1700000000")),
    )
    add(
        "null_meta",
        "meta is null (must be an object, may be omitted).",
        HeaderValidationError,
        craft(_header(meta=None)),
    )
    add(
        "route_not_strings",
        "route holds a number.",
        HeaderValidationError,
        craft(_header(route=["a", 2])),
    )
    add(
        "unknown_part_type",
        "A part of type 'image'.",
        HeaderValidationError,
        craft(_header(parts=[{"type": "image", "url": "x"}])),
    )
    add(
        "unknown_dtype",
        "A tensor of dtype 'complex64'.",
        HeaderValidationError,
        craft(_header(parts=[{**_tensor("float32", [2]), "dtype": "complex64"}])),
    )
    add(
        "unknown_role",
        "A tensor of role 'attention'.",
        HeaderValidationError,
        craft(_header(parts=[_tensor("float32", [2], role="attention")])),
    )
    add(
        "float_shape",
        "A shape entry 2.0 (a float, not an integer).",
        HeaderValidationError,
        craft(_header(parts=[_tensor("float32", [2]) | {"shape": [2.0]}])),
    )
    add(
        "bool_retryable",
        "error.retryable is 1 instead of a boolean.",
        HeaderValidationError,
        craft(_header(kind="error", error={"code": "x", "message": "m", "retryable": 1})),
    )
    add(
        "space_hidden_size_zero",
        "A feature space with hidden_size 0 (must be >= 1).",
        HeaderValidationError,
        craft(_header(parts=[_tensor("float32", [2], space={"family": "f", "hidden_size": 0})])),
    )
    add(
        "negative_offset",
        "A negative tensor offset.",
        HeaderValidationError,
        _raw_frame(json.dumps(_header(parts=[_tensor("uint8", [0], offset=-64)]), separators=(",", ":")).encode()),
    )
    add(
        "too_many_dims",
        "A tensor of 33 dimensions (default limit 32).",
        SegmentError,
        craft(_header(parts=[_tensor("uint8", [1] * 33)])),
    )
    add(
        "negative_dim",
        "Shape [2, -1].",
        SegmentError,
        craft(_header(parts=[_tensor("float32", [2, -1], nbytes=0)]), layout=[(0, 0)]),
    )
    add(
        "shape_overflow",
        "A zero-size tensor of shape [0, 2**62, 4]: more elements than an int64 counts in its non-zero dims.",
        SegmentError,
        craft(_header(parts=[_tensor("float32", [0, 2**62, 4])])),
    )
    add(
        "huge_shape",
        "Shape [65536, 65536, 65536] float32 with a matching nbytes: runs far past the frame (no allocation).",
        SegmentError,
        craft(_header(parts=[_tensor("float32", [65536] * 3)]), layout=[(0, 0)]),
    )
    add(
        "nbytes_mismatch",
        "Shape [4] float32 declares nbytes 12 (must be 16).",
        SegmentError,
        craft(_header(parts=[_tensor("float32", [4], nbytes=12)])),
    )
    add(
        "misaligned_offset",
        "A tensor offset 8 bytes past a 64-byte boundary.",
        SegmentError,
        craft(_header(parts=[_tensor("float32", [4])]), layout=[(8, 16)]),
    )
    add(
        "offset_in_header",
        "An aligned offset of 0: inside the preamble and header.",
        SegmentError,
        craft(_header(parts=[_tensor("uint8", [4])]), offsets=[0]),
    )
    add(
        "overlap",
        "Two 16-byte segments at the same offset.",
        SegmentError,
        craft(_header(parts=[_tensor("float32", [4]), _tensor("float32", [4])]), layout=[(0, 16), (0, 16)]),
    )
    add(
        "overlap_partial",
        "A 128-byte segment and a later one starting 64 bytes into it.",
        SegmentError,
        craft(_header(parts=[_tensor("uint8", [128]), _tensor("uint8", [64])]), layout=[(0, 128), (64, 64)]),
    )
    add(
        "truncated_segment",
        "dtype_float32 with its last 4 bytes cut: the segment runs past the end.",
        SegmentError,
        tensor_frame[:-4],
    )
    add("trailing_bytes", "text_only with one extra byte after the header.", SegmentError, good + b"\x00")
    add(
        "trailing_after_segment",
        "dtype_float32 followed by 64 bytes of zero padding that no part accounts for.",
        SegmentError,
        tensor_frame + b"\x00" * 64,
    )
    add(
        "padding_only",
        "No tensor parts, but padding to the 64-byte boundary after the header.",
        SegmentError,
        good + b"\x00" * (_align(len(good)) - len(good) or 64),
    )
    return out


def build() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Every vector, in memory: name -> (frame, expectation)."""
    vectors: dict[str, tuple[bytes, dict[str, Any]]] = {}
    frames: dict[str, bytes] = {}
    for name, (description, env) in valid_envelopes().items():
        frame = bytes(encode(env))
        decode(frame)  # the reference decoder must accept every valid vector
        frames[name] = frame
        vectors[name] = (frame, expected_of(description, env, frame))
        if name.startswith("encoding_"):
            vectors[name][1].update(restored_of(frame))
    for name, (description, code, exc, frame) in invalid_frames(frames).items():
        try:
            decode(frame)
        except ProtocolError as e:
            if e.code != code:
                raise AssertionError(f"{name}: expected {code}, reference decoder raised {e.code}: {e}") from e
        else:
            raise AssertionError(f"{name}: the reference decoder accepted it")
        vectors[name] = (frame, {"description": description, "error": code, "exception": exc})
    return vectors


def build_signed() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """The vectors of ``signed/``: name -> (frame, expectation)."""
    key, other = SigningKey(TEST_KEY), SigningKey(OTHER_KEY)
    env = _env(
        40,
        TextPart(text="signed hello"),
        TensorPart(tensor=torch.arange(6, dtype=torch.float16).reshape(2, 3), role=TensorRole.HIDDEN_STATE),
        kind=Kind.REQUEST,
        recipient="edge-llm",
        reply_to="aiflow/v1/default/clients/cli-1/replies",
        deadline=DEADLINE,
    )
    frame = bytes(encode(env, signing_key=key))
    decode(frame, signing_key=key)
    body = frame[:-TRAILER_SIZE]
    expected = expected_of(
        "A request signed with the test key: flag bit 0 set, then key id (8 bytes) and HMAC-SHA256 (32 bytes).",
        env,
        body,
    )
    expected = {
        "description": expected["description"],
        "key_hex": TEST_KEY.hex(),
        "key_id": key.key_id.hex(),
        "frame_size": len(frame),
        "signed_length": len(frame) - MAC_SIZE,
        "header_length": expected["header_length"],
        "header": expected["header"],
        "tensors": expected["tensors"],
    }
    vectors: dict[str, tuple[bytes, dict[str, Any]]] = {"signed_request": (frame, expected)}

    def flip(data: bytes, at: int) -> bytes:
        out = bytearray(data)
        out[at] ^= 0x01
        return bytes(out)

    header_at = PREAMBLE_SIZE + body[PREAMBLE_SIZE:].index(b"signed hello")
    # The MAC binds what a receiver checks besides authenticity: the recipient (a frame replayed to
    # another agent is refused) and created_at (the freshness window, SPEC §12 item 8).
    recipient_at = PREAMBLE_SIZE + body[PREAMBLE_SIZE:].index(b'"recipient":"edge-llm"') + len('"recipient":"edge-ll')
    created_at = PREAMBLE_SIZE + body[PREAMBLE_SIZE:].index(b'"created_at":1700000000.25') + len('"created_at":')
    bad: dict[str, tuple[str, type[ProtocolError], bytes]] = {
        "bad_mac": ("signed_request with the last bit of its MAC flipped.", SignatureError, flip(frame, -1)),
        "bad_tampered_header": (
            "signed_request with one header byte changed ('signed hello' -> 'rigned hello'), MAC left as it was.",
            SignatureError,
            flip(frame, header_at),
        ),
        "bad_tampered_recipient": (
            "signed_request readdressed to another agent ('edge-llm' -> 'edge-lll'), MAC left as it was.",
            SignatureError,
            flip(frame, recipient_at),
        ),
        "bad_tampered_created_at": (
            "signed_request made to look newer (created_at 1700000000.25 -> 0700000000.25), MAC left as it was.",
            SignatureError,
            flip(frame, created_at),
        ),
        "bad_tampered_tensor": (
            "signed_request with one tensor byte changed, MAC left as it was.",
            SignatureError,
            flip(frame, len(body) - 1),
        ),
        "bad_flag_cleared": (
            "signed_request with the signed flag cleared: to a receiver that requires signatures it is unsigned.",
            UnsignedFrameError,
            frame[:5] + b"\x00" + frame[6:],
        ),
        "bad_unsigned": ("The same request, not signed at all.", UnsignedFrameError, bytes(encode(env))),
        "bad_wrong_key": (
            "The same request signed with another key: its key id is not the test key's.",
            SignatureError,
            bytes(encode(env, signing_key=other)),
        ),
        "bad_key_id": (
            "signed_request with its key id changed but the MAC kept: the key id is unknown.",
            SignatureError,
            flip(frame, len(frame) - TRAILER_SIZE),
        ),
    }
    keyring = Keyring(key)
    for name, (description, exc, data) in bad.items():
        try:
            decode(data, signing_key=keyring)
        except ProtocolError as e:
            if e.code != exc.code:
                raise AssertionError(f"signed/{name}: expected {exc.code}, got {e.code}: {e}") from e
        else:
            raise AssertionError(f"signed/{name}: accepted")
        vectors[name] = (
            data,
            {"description": description, "key_hex": TEST_KEY.hex(), "error": exc.code, "exception": exc.__name__},
        )
    assert len(key.key_id) == KEY_ID_SIZE and frame[5] == FLAG_SIGNED
    return vectors


# -- ops (protocols/OPS.md): one request and its reply per operation ------------------------------
OPS_DIR = "ops"
CLIENT_REPLIES = "aiflow/v1/default/clients/cli-1/replies"


def ops_exchanges() -> dict[str, tuple[str, str, str, Envelope]]:
    """name -> (description, op, "request" | "reply" | "event", envelope), deterministic."""
    space = FeatureSpace(family="demo", model="demo-1", layer=-1, hidden_size=4, tokenizer="demo-vocab")
    out: dict[str, tuple[str, str, str, Envelope]] = {}
    n = 0x600

    def exchange(name: str, op: str, description: str, request: Envelope, *reply: Envelope) -> None:
        nonlocal n
        out[f"{name}_request"] = (description, op, "request", request)
        for r in reply:
            out[f"{name}_reply"] = (description, op, "reply", r)
        n += 0x10

    def req(text: str, meta: dict[str, Any], *parts: TensorPart, **fields: Any) -> Envelope:
        base: dict[str, Any] = {"recipient": "agent-a", "reply_to": CLIENT_REPLIES, "deadline": DEADLINE}
        return _env(n, TextPart(text=text), *parts, kind=Kind.REQUEST, sender="cli-1", meta=meta, **{**base, **fields})

    def rep(request: Envelope, *parts: TextPart | TensorPart, sender: str = "agent-a", **meta: Any) -> Envelope:
        r = request.reply(*parts, sender=sender, meta=meta)
        return r.model_copy(update={"id": _id(n + 1), "created_at": CREATED_AT + 1})

    cost = {"model_calls": 1, "layers": 48, "tokens": 12}
    r = req("What is 2+2?", {"op": "generate", "return": ["distribution"]})
    dist = torch.tensor([[0.0625, 0.75, 0.125, 0.0625]])
    exchange(
        "generate",
        "generate",
        "generate: the answer as text and meta.answer, with confidence and cost; meta.return asked for "
        "the answer's token distribution (one row per generated token), tagged with the agent's space.",
        r,
        rep(
            r,
            TextPart(text="4"),
            TensorPart(tensor=dist, role=TensorRole.TOKEN_DISTRIBUTION, space=space),
            answer="4",
            confidence=0.75,
            cost=cost,
        ),
    )
    peers = [
        {"agent": "agent-b", "answer": "5", "confidence": 0.4},
        {"agent": "agent-c", "answer": "4", "confidence": 0.9},
    ]
    r = req("What is 2+2?", {"peers": peers})
    exchange(
        "generate_peers",
        "generate",
        "generate in a debate round: meta.peers says what the others answered last round (no op: generate).",
        r,
        rep(r, TextPart(text="4"), answer="4", confidence=0.8, cost=cost),
    )
    r = req("What is 2+2?", {"op": "score", "candidates": ["4", "5"]})
    exchange(
        "score",
        "score",
        "score: one log-likelihood per candidate under the agent's own model, with token counts.",
        r,
        rep(r, TextPart(text="4"), scores=[-0.125, -3.5], token_counts=[1, 1], answer="4", confidence=0.97, cost=cost),
    )
    r = req("What is 2+2?", {"op": "next", "prefix": ""})
    vocab = torch.tensor([0.0625, 0.75, 0.125, 0.0625])
    exchange(
        "next",
        "next",
        "next: the probabilities of the next token as one token_distribution part; meta.tokens names ids, "
        "meta.eos_id ends an answer.",
        r,
        rep(
            r,
            TensorPart(tensor=vocab, role=TensorRole.TOKEN_DISTRIBUTION, space=space),
            tokens={"0": "3", "1": "4", "2": "5", "3": "<eos>"},
            eos_id=3,
            last_step=False,
            cost=cost,
        ),
    )
    r = req("What is 2+2?", {"op": "judge", "candidates": ["5", "4", "4"]})
    exchange("judge", "judge", "judge: meta.answer is the chosen candidate.", r, rep(r, TextPart(text="4"), answer="4"))
    r = req("What is 2+2?", {"op": "verify", "candidate": "4"})
    exchange(
        "verify",
        "verify",
        "verify: meta.accepted is the verdict (a boolean), with confidence.",
        r,
        rep(r, accepted=True, confidence=0.9, cost=cost),
    )
    r = req("", {"op": "join_group", "group": "g-1f2e"})
    exchange(
        "join_group",
        "join_group",
        "join_group (node-level): the node subscribes the agent to the group inbox and confirms.",
        r,
        rep(r, group="g-1f2e", joined=True),
    )
    r = req("What is 2+2?", {"op": "translate"})
    err = r.error_reply("unsupported_op", "unknown op 'translate'", sender="agent-a")
    exchange(
        "unsupported_op",
        "translate",
        "An op the agent does not implement: an error reply with code unsupported_op.",
        r,
        err.model_copy(update={"id": _id(n + 1), "created_at": CREATED_AT + 1}),
    )
    # a cascade the nodes run by themselves: dev answers below its threshold, its node forwards
    policy = ops.AcceptancePolicy(per_stage={"dev": 0.8, "cloud": 0.0}).to_meta()
    r = req("What is 17*23?", policy, recipient="dev", route=["cloud"])
    hop = {
        "agent": "dev",
        "node": "node-1",
        "answer": "381",
        "confidence": 0.5,
        "error": None,
        "error_message": None,
        "cost": cost,
        "start": CREATED_AT + 0.5,
        "end": CREATED_AT + 0.75,
        "forwarded_to": "cloud",
        "bytes": 0,
    }
    event = Envelope(
        id=_id(n + 2),
        kind=Kind.EVENT,
        sender="dev",
        recipient="cli-1",
        correlation_id=r.id,
        trace_id=r.trace_id,
        parent_id=r.id,
        created_at=CREATED_AT + 1,
        meta={"hop": hop},
    )
    fwd = r.model_copy(
        update={
            "id": _id(n + 3),
            "recipient": "cloud",
            "correlation_id": r.id,
            "parent_id": r.id,
            "route": [],
            "meta": {**r.meta, "hops": [hop]},
        }
    )
    out["cascade_request"] = (
        "A cascade request to dev with route [cloud] and meta.acceptance (OPS.md §4).",
        "generate",
        "request",
        r,
    )
    out["cascade_event"] = (
        "dev's node found the reply below dev's threshold: a progress event to reply_to, meta.hop.",
        "generate",
        "event",
        event,
    )
    out["cascade_forward"] = (
        "What dev's node sends to cloud's inbox: the request, correlation_id kept, route shortened, "
        "meta.hops extended (and any tensor parts dev's reply carried appended).",
        "generate",
        "request",
        fwd,
    )
    final = fwd.reply(TextPart(text="391"), sender="cloud", meta={"answer": "391", "confidence": 0.99, "cost": cost})
    final = final.model_copy(
        update={"id": _id(n + 4), "created_at": CREATED_AT + 2, "meta": {**final.meta, "hops": [hop]}}
    )
    out["cascade_reply"] = (
        "cloud's reply, at the original reply_to with the original correlation_id; meta.hops lists the stages passed.",
        "generate",
        "reply",
        final,
    )
    r = req(
        "Which gas do plants take in for photosynthesis?",
        {
            "op": "choose",
            "candidates": ["oxygen", "carbon dioxide", "nitrogen"],
            "peers": [{"agent": "agent-b", "answer": "oxygen", "confidence": 0.5}],
        },
    )
    exchange(
        "choose",
        "choose",
        "choose: a multiple-choice item; the reply names the chosen option's index and answer, with the "
        "length-normalised score and probability of every option (peers: what others chose last round).",
        r,
        rep(
            r,
            TextPart(text="carbon dioxide"),
            choice=1,
            answer="carbon dioxide",
            confidence=0.625,
            scores=[-1.5, -0.75, -2.5],
            probs=[0.25, 0.625, 0.125],
            token_counts=[1, 2, 1],
            cost=cost,
        ),
    )
    # speculative decoding, one mid-session round: both agents hold the session's first 5 positions;
    # 17 is the settled token neither has run (the verifier's last correction)
    exit_space = space.model_copy(update={"layer": 2})
    hidden = C.pack(
        (torch.arange(12, dtype=torch.float16) / 4 - 1.5).reshape(3, 4),
        "float16",
        role=TensorRole.HIDDEN_STATE,
        space=exit_space,
    )
    session = {"session": "s-7f3a", "start": 5}
    r = req(
        "",
        {
            "op": "draft",
            **session,
            "tokens": [17],
            "gamma": 3,
            "ship_hidden": True,
            "encoding": "float16",
            "min_confidence": 0.25,
        },
    )
    exchange(
        "draft",
        "draft",
        "draft: the drafter runs the settled token 17, then proposes up to gamma=3 tokens from its early exit "
        "at layer 2, shipping that layer's output (float16) for the 3 positions it ran: 17 and all draft "
        "tokens but the last; processed = 5 + 3.",
        r,
        rep(
            r,
            TextPart(text=" four is it"),
            *hidden,
            draft=[23, 9, 41],
            confidences=[0.875, 0.75, 0.5],
            processed=8,
            layer=2,
            eos=False,
            cost={"model_calls": 1, "layers": 6, "tokens": 3},
        ),
    )
    r = req("", {"op": "verify_tokens", **session, "tokens": [17, 23, 9, 41], "draft": 3, "layer": 2}, *hidden)
    exchange(
        "verify_tokens",
        "verify_tokens",
        "verify_tokens: settled 17 then the 3 draft tokens, with the drafter's layer-2 states of the first 3 "
        "positions; the verifier runs only its layers above 2 there: 23 stands, 9 does not (its own token is "
        "12, the correction); processed = 5 + 2 (17 and 23).",
        r,
        rep(
            r,
            TextPart(text=" four."),
            accept=1,
            next=12,
            eos=False,
            processed=7,
            layer=2,
            cost={"model_calls": 1, "layers": 6, "tokens": 3},
        ),
    )
    return out


def build_ops() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """The vectors of ``ops/``: name -> (frame, expectation with ``op`` and ``message``)."""
    vectors: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for name, (description, op, message, env) in ops_exchanges().items():
        frame = bytes(encode(env))
        decode(frame)
        expected = expected_of(description, env, frame)
        vectors[name] = (frame, {"op": op, "message": message, **expected})
    return vectors


def _json_text(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: next to this script)")
    args = ap.parse_args(argv)
    sets = {args.out: build(), args.out / SIGNED_DIR: build_signed(), args.out / OPS_DIR: build_ops()}
    stale: list[str] = []
    extra: list[str] = []
    for folder, vectors in sets.items():
        prefix = "" if folder == args.out else f"{folder.name}/"
        if not args.check:
            folder.mkdir(exist_ok=True)
        for name, (frame, expected) in vectors.items():
            bin_path, json_path = folder / f"{name}.bin", folder / f"{name}.json"
            text = _json_text(expected)
            if args.check:
                if not bin_path.exists() or bin_path.read_bytes() != frame or json_path.read_text("utf-8") != text:
                    stale.append(prefix + name)
                continue
            bin_path.write_bytes(frame)
            json_path.write_text(text, "utf-8")
        known = {f"{n}.{ext}" for n in vectors for ext in ("bin", "json")}
        if folder.is_dir():
            extra += sorted(
                prefix + p.name for p in folder.iterdir() if p.suffix in (".bin", ".json") and p.name not in known
            )
    vectors = {n: v for vs in sets.values() for n, v in vs.items()}
    if args.check:
        if stale or extra:
            print(f"stale: {stale}; unexpected files: {extra}", file=sys.stderr)
            return 1
        print(f"{len(vectors)} vectors up to date")
        return 0
    print(f"wrote {len(vectors)} vectors to {args.out}" + (f" (unexpected files left: {extra})" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
