"""Binary codec: one MQTT payload = preamble + JSON header + 64-byte-aligned raw tensor segments.

Tensors are decoded as zero-copy views over the payload; nothing is ever unpickled.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .envelope import (
    DType,
    Envelope,
    ErrorInfo,
    FeatureSpace,
    Kind,
    Meta,
    TensorPart,
    TensorRole,
    TextPart,
)
from .errors import (
    BadMagicError,
    EncodeError,
    FrameTooLargeError,
    FrameTooShortError,
    HeaderDecodeError,
    HeaderTooLargeError,
    HeaderValidationError,
    ProtocolError,
    SegmentError,
    UnsupportedVersionError,
)
from .signing import (
    FLAG_SIGNED,
    KNOWN_FLAGS,
    TRAILER_SIZE,
    Keyring,
    SigningKeyLike,
    UnsignedFrameError,
    as_keyring,
)

MAGIC = b"AIFL"
WIRE_VERSION = 1
ALIGNMENT = 64
PREAMBLE = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, header length
PREAMBLE_SIZE = PREAMBLE.size  # 12
CONTENT_TYPE = "application/vnd.aiflow.v1"
MAX_MQTT_PAYLOAD = 268_435_455  # 256 MiB - 1, the MQTT maximum
_MAX_ELEMENTS = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits, enforced on both the encoding and the decoding side."""

    max_frame_bytes: int = MAX_MQTT_PAYLOAD
    max_header_bytes: int = 1 << 20
    max_parts: int = 4096
    max_ndim: int = 32


DEFAULT_LIMITS = Limits()


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# -- the header's schema (strict: unknown fields, kinds, roles and dtypes are rejected) -------
class _WireText(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str
    meta: Meta = Field(default_factory=dict)


class _WireTensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["tensor"]
    role: TensorRole
    dtype: DType
    shape: list[int]
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    space: FeatureSpace | None = None
    meta: Meta = Field(default_factory=dict)


class _WireHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    id: str = Field(min_length=1, max_length=128)
    kind: Kind
    sender: str = Field(min_length=1, max_length=256)
    recipient: str | None = Field(default=None, max_length=256)
    correlation_id: str | None = Field(default=None, max_length=128)
    reply_to: str | None = Field(default=None, max_length=1024)
    trace_id: str = Field(min_length=1, max_length=128)
    parent_id: str | None = Field(default=None, max_length=128)
    created_at: float
    deadline: float | None = None
    route: list[str] = Field(default_factory=list)
    parts: list[Annotated[_WireText | _WireTensor, Field(discriminator="type")]] = Field(default_factory=list)
    error: ErrorInfo | None = None
    meta: Meta = Field(default_factory=dict)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(literal: str) -> float:
    # A literal such as 1e400 overflows to infinity: as invalid on the wire as Infinity itself.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal} is out of range")
    return value


# -- encoding ----------------------------------------------------------------------------------
def encode(envelope: Envelope, limits: Limits = DEFAULT_LIMITS, *, signing_key: SigningKeyLike | None = None) -> bytes:
    """Encode an envelope into one frame. Costs one copy of each tensor's bytes.

    With ``signing_key`` the frame is signed (SPEC §13.1): flag bit 0 set, key id + HMAC appended.
    """
    keyring = as_keyring(signing_key)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host in sight
        raise EncodeError("encoding on big-endian hosts is not implemented")
    if len(envelope.parts) > limits.max_parts:
        raise EncodeError(f"{len(envelope.parts)} parts exceed the limit of {limits.max_parts}")
    tensors: list[torch.Tensor] = []
    wire_parts: list[dict[str, Any]] = []
    for part in envelope.parts:
        if isinstance(part, TextPart):
            wire_parts.append({"type": "text", "text": part.text, "meta": part.meta})
            continue
        t = part.tensor
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dim() > limits.max_ndim:
            raise EncodeError(f"tensor has {t.dim()} dimensions, limit is {limits.max_ndim}")
        t = t.contiguous()
        tensors.append(t)
        wire_parts.append(
            {
                "type": "tensor",
                "role": str(part.role),
                "dtype": str(DType.from_torch(t.dtype)),
                "shape": list(t.shape),
                "offset": 0,  # patched below, once the header length is known
                "nbytes": t.numel() * t.element_size(),
                "space": part.space.model_dump() if part.space is not None else None,
                "meta": part.meta,
            }
        )
    header: dict[str, Any] = {
        "id": envelope.id,
        "kind": str(envelope.kind),
        "sender": envelope.sender,
        "recipient": envelope.recipient,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
        "trace_id": envelope.trace_id,
        "parent_id": envelope.parent_id,
        "created_at": envelope.created_at,
        "deadline": envelope.deadline,
        "route": list(envelope.route),
        "parts": wire_parts,
        "error": envelope.error.model_dump() if envelope.error is not None else None,
        "meta": envelope.meta,
    }
    tensor_headers = [p for p in wire_parts if p["type"] == "tensor"]
    # Offsets depend on the header length, which depends on the offsets' digits: iterate until
    # stable (two passes in practice).
    header_bytes = b""
    for _ in range(8):
        header_bytes = _dump(header)
        cursor = _align(PREAMBLE_SIZE + len(header_bytes))
        changed = False
        for p in tensor_headers:
            if p["offset"] != cursor:
                p["offset"] = cursor
                changed = True
            cursor = _align(cursor + p["nbytes"])
        if not changed:
            break
    else:  # pragma: no cover - offsets grow monotonically, so this converges
        raise EncodeError("could not lay out tensor segments")
    if len(header_bytes) > limits.max_header_bytes:
        raise EncodeError(f"header is {len(header_bytes)} bytes, limit is {limits.max_header_bytes}")
    if tensor_headers:
        last = tensor_headers[-1]
        total = last["offset"] + last["nbytes"]
    else:
        total = PREAMBLE_SIZE + len(header_bytes)
    if total + (TRAILER_SIZE if keyring else 0) > limits.max_frame_bytes:
        raise EncodeError(
            f"frame would be {total + (TRAILER_SIZE if keyring else 0)} bytes, limit is {limits.max_frame_bytes}"
        )

    # One pass over the tensor bytes: join the pieces straight into the frame (no zero-fill
    # of a buffer that is then overwritten).
    flags = FLAG_SIGNED if keyring else 0
    pieces: list[Any] = [PREAMBLE.pack(MAGIC, WIRE_VERSION, flags, 0, len(header_bytes)), header_bytes]
    cursor = PREAMBLE_SIZE + len(header_bytes)
    for p, t in zip(tensor_headers, tensors, strict=True):
        n = p["nbytes"]
        if not n:
            continue
        if p["offset"] > cursor:
            pieces.append(bytes(p["offset"] - cursor))
        pieces.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        cursor = p["offset"] + n
    if cursor < total:  # trailing zero-size tensors may sit on a later aligned offset
        pieces.append(bytes(total - cursor))
    if keyring:  # MAC over the pieces as they are: no extra copy of the tensor bytes
        pieces += keyring.trailer(pieces)
    return b"".join(pieces)


def _dump(header: dict[str, Any]) -> bytes:
    try:
        return json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise EncodeError(f"header is not JSON-serialisable (check meta values): {e}") from e


# -- decoding ----------------------------------------------------------------------------------
def decode(
    payload: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    *,
    signing_key: SigningKeyLike | None = None,
) -> Envelope:
    """Decode and validate one frame. Raises only :class:`ProtocolError` subclasses.

    Tensor parts are views over ``payload`` (no copy); they stay valid while the payload lives.
    With ``signing_key`` the frame must be signed with it (or with a key of the keyring), checked
    before the header is parsed; without one, a signed frame's trailer is skipped unchecked.
    """
    keyring = as_keyring(signing_key)  # a bad key is the caller's error, not the frame's
    try:
        return _decode(payload, limits, keyring)
    except ProtocolError:
        raise
    except Exception as e:  # the contract is: nothing but ProtocolError escapes
        raise ProtocolError(f"malformed frame ({type(e).__name__}: {e})") from e


def peek_header(payload: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The raw JSON header of a frame, without validating parts (used to route an error reply).

    A signed frame's signature is not checked: what this returns is unauthenticated."""
    try:
        return _read_header(memoryview(payload).cast("B"), limits, None)[0]
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"malformed frame ({type(e).__name__}: {e})") from e


def _read_frame(view: memoryview, limits: Limits, keyring: Keyring | None) -> tuple[str, int, memoryview]:
    """Checks 1-8 of SPEC §6 (preamble, signature, header bounds, UTF-8); returns the header text,
    its length and the frame without trailer."""
    size = len(view)
    if size < PREAMBLE_SIZE:
        raise FrameTooShortError(f"frame is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
    if size > limits.max_frame_bytes:
        raise FrameTooLargeError(f"frame is {size} bytes, limit is {limits.max_frame_bytes}")
    magic, version, flags, reserved, header_len = PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != WIRE_VERSION:
        raise UnsupportedVersionError(f"wire version {version} is not supported (this decoder speaks {WIRE_VERSION})")
    if flags & ~KNOWN_FLAGS or reserved != 0:
        raise UnsupportedVersionError(
            f"unknown preamble flags {flags:#x}/reserved {reserved:#x} (v1 defines flag 0x1 only, reserved 0)"
        )
    if flags & FLAG_SIGNED:
        if size < PREAMBLE_SIZE + TRAILER_SIZE:
            raise FrameTooShortError(f"signed frame is {size} bytes, too short for its {TRAILER_SIZE}-byte trailer")
        if keyring is not None:
            keyring.verify(view)  # before the header is even parsed
        view = view[: size - TRAILER_SIZE]
        size = len(view)
    elif keyring is not None:
        raise UnsignedFrameError("frame is not signed, and this receiver accepts signed frames only")
    if header_len > limits.max_header_bytes:
        raise HeaderTooLargeError(f"header length {header_len} exceeds the limit of {limits.max_header_bytes}")
    if PREAMBLE_SIZE + header_len > size:
        raise FrameTooShortError(
            f"header declares {header_len} bytes but only {size - PREAMBLE_SIZE} follow the preamble"
        )
    raw = bytes(view[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderDecodeError(f"header is not valid UTF-8: {e}") from None
    return text, header_len, view


def _parse_header(text: str) -> dict[str, Any]:
    """The header as a JSON object, with the JSON rules of SPEC §6 (no NaN/Infinity, finite numbers)."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        raise HeaderDecodeError(f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderDecodeError(f"header must be a JSON object, got {type(obj).__name__}")
    return obj


def _read_header(view: memoryview, limits: Limits, keyring: Keyring | None) -> tuple[dict[str, Any], str, memoryview]:
    """Checks 1-10 of SPEC §6; returns the header object, its text and the frame without trailer."""
    text, _, view = _read_frame(view, limits, keyring)
    return _parse_header(text), text, view


def _decode(payload: bytes | bytearray | memoryview, limits: Limits, keyring: Keyring | None) -> Envelope:
    view = memoryview(payload).cast("B")
    text, header_len, view = _read_frame(view, limits, keyring)
    # The header is parsed once, by pydantic (strict JSON mode: no silent coercion, enums by
    # value). The stdlib parser runs only to classify a failure, to vet a header that may hold a
    # non-finite number (NaN, Infinity, 1e400: pydantic lets those through into meta), and to
    # give an error its header object.
    try:
        h = _WireHeader.model_validate_json(text, strict=True)
    except ValidationError as e:
        obj = _parse_header(text)  # invalid JSON is a HeaderDecodeError, not a schema error
        _check_part_count(obj, limits)
        raise HeaderValidationError(f"header does not match the v1 schema: {_summarise(e)}", header=obj) from None
    if not _all_finite(h):
        _parse_header(text)  # raises HeaderDecodeError naming the literal, as the stdlib parser sees it
    if len(h.parts) > limits.max_parts:
        _check_part_count(_parse_header(text), limits)
    return _assemble(h, view, header_len, limits, text)


def _all_finite(h: _WireHeader) -> bool:
    """Whether the free-form values (meta, error detail) hold no NaN or infinity. The typed float
    fields reject those in validation (``allow_inf_nan=False``); these are the only other places a
    number can sit, and are usually empty, so this costs next to nothing."""
    stack: list[Any] = [h.meta, *(p.meta for p in h.parts)]
    if h.error is not None:
        stack.append(h.error.detail)
    while stack:
        v = stack.pop()
        if type(v) is float:
            if not math.isfinite(v):
                return False
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _check_part_count(obj: dict[str, Any], limits: Limits) -> None:
    parts_raw = obj.get("parts")
    if isinstance(parts_raw, list) and len(parts_raw) > limits.max_parts:
        raise HeaderValidationError(f"{len(parts_raw)} parts exceed the limit of {limits.max_parts}", header=obj)


def _new(cls: type[_M], values: dict[str, Any]) -> _M:
    """``cls.model_construct(**values)`` for values that name every field, minus its bookkeeping
    (it was a third of the cost of decoding a frame)."""
    m = cls.__new__(cls)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", set(values))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


_set = object.__setattr__
_M = TypeVar("_M", bound=BaseModel)


def _assemble(h: _WireHeader, view: memoryview, header_len: int, limits: Limits, text: str) -> Envelope:
    size = len(view)
    data_start = _align(PREAMBLE_SIZE + header_len)
    segments: list[tuple[int, int, int]] = []  # (offset, end, part index)
    for i, p in enumerate(h.parts):
        if not isinstance(p, _WireTensor):
            continue
        if len(p.shape) > limits.max_ndim:
            raise SegmentError(
                f"part {i}: {len(p.shape)} dimensions exceed the limit of {limits.max_ndim}", header=_parse_header(text)
            )
        if any(d < 0 for d in p.shape):
            raise SegmentError(f"part {i}: negative dimension in shape {p.shape}", header=_parse_header(text))
        if math.prod(max(d, 1) for d in p.shape) > _MAX_ELEMENTS:
            # No real tensor is this large, and torch cannot even build an empty one of this shape.
            raise SegmentError(
                f"part {i}: shape {p.shape} overflows a 64-bit element count", header=_parse_header(text)
            )
        # Checked against the payload before anything is allocated: a huge declared shape
        # can only fail here.
        expected = math.prod(p.shape) * p.dtype.itemsize
        if expected != p.nbytes:
            raise SegmentError(
                f"part {i}: nbytes {p.nbytes} != shape {p.shape} x {p.dtype.itemsize} bytes ({expected})",
                header=_parse_header(text),
            )
        if p.offset % ALIGNMENT:
            raise SegmentError(
                f"part {i}: offset {p.offset} is not {ALIGNMENT}-byte aligned", header=_parse_header(text)
            )
        if p.offset < data_start:
            raise SegmentError(
                f"part {i}: offset {p.offset} lies inside the header (data starts at {data_start})",
                header=_parse_header(text),
            )
        if p.offset + p.nbytes > size:
            raise SegmentError(
                f"part {i}: segment [{p.offset}, {p.offset + p.nbytes}) runs past the end of the {size}-byte frame",
                header=_parse_header(text),
            )
        if p.nbytes:
            segments.append((p.offset, p.offset + p.nbytes, i))
    segments.sort()
    for (_, end_a, ia), (start_b, _, ib) in itertools.pairwise(segments):
        if start_b < end_a:
            raise SegmentError(f"parts {ia} and {ib}: segments overlap", header=_parse_header(text))
    # The frame ends where the furthest tensor part ends; a zero-size part "ends" at its offset,
    # so a trailing empty tensor keeps the padding the encoder wrote before it.
    expected_size = max(
        (p.offset + p.nbytes for p in h.parts if isinstance(p, _WireTensor)), default=PREAMBLE_SIZE + header_len
    )
    if size != expected_size:
        raise SegmentError(
            f"frame is {size} bytes but its header accounts for {expected_size}", header=_parse_header(text)
        )

    parts: list[TextPart | TensorPart] = []
    with warnings.catch_warnings():
        # torch warns that a bytes payload is not writable; the view is documented read-only.
        warnings.simplefilter("ignore", UserWarning)
        for p in h.parts:
            if isinstance(p, _WireText):
                parts.append(_new(TextPart, {"type": "text", "text": p.text, "meta": p.meta}))
                continue
            dt = p.dtype.torch_dtype
            if p.nbytes:
                t = torch.frombuffer(view, dtype=dt, count=p.nbytes // p.dtype.itemsize, offset=p.offset).view(p.shape)
            else:
                t = torch.empty(p.shape, dtype=dt)
            parts.append(
                _new(TensorPart, {"type": "tensor", "tensor": t, "role": p.role, "space": p.space, "meta": p.meta})
            )
    return _new(
        Envelope,
        {
            "id": h.id,
            "kind": h.kind,
            "sender": h.sender,
            "recipient": h.recipient,
            "correlation_id": h.correlation_id,
            "reply_to": h.reply_to,
            "trace_id": h.trace_id,
            "parent_id": h.parent_id,
            "created_at": h.created_at,
            "deadline": h.deadline,
            "route": h.route,
            "parts": parts,
            "error": h.error,
            "meta": h.meta,
        },
    )


def _summarise(e: ValidationError) -> str:
    errs = e.errors(include_url=False)
    shown = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in errs[:3])
    return shown + (f" (+{len(errs) - 3} more)" if len(errs) > 3 else "")
