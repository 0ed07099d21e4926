"""Binary codec: one MQTT payload = preamble + JSON header + 64-byte-aligned raw tensor segments.

Tensors are decoded as zero-copy views over the payload; nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import numpy
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError, to_json

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
    from_torch_dtypes,
    torch_dtypes,
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
from .mqtt_strings import mqtt_string_problem, portable_level_problem, portable_topic_problem
from .signing import (
    FLAG_SIGNED,
    KNOWN_FLAGS,
    TRAILER_SIZE,
    Keyring,
    SigningKeyLike,
    UnsignedFrameError,
    as_keyring,
)

if TYPE_CHECKING:  # torch loads with the first tensor encoded or decoded
    import torch

MAGIC = b"AIFL"
WIRE_VERSION = 1
ALIGNMENT = 64
PREAMBLE = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, header length
PREAMBLE_SIZE = PREAMBLE.size  # 12
CONTENT_TYPE = "application/vnd.aiflow.v1"
MAX_MQTT_PAYLOAD = 268_435_455  # 256 MiB - 1, the MQTT maximum
#: Deepest nesting of arrays and objects in a header (SPEC §3.1): the header object is level 1,
#: each array or object inside a container one level more. Deeper: ``header_decode`` (check 9).
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
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
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# Tensor offsets depend on the header's length, which depends on the offsets' digits. The header
# is dumped once with this marker where each offset goes, then the offsets are worked out by
# arithmetic and spliced in. Meta values may hold the same bytes by chance: the marker count then
# disagrees with the tensor count, and the header is laid out the slow way instead.
_OFFSET_MARK = 7_394_650_284_161_937_581
_OFFSET_MARK_BYTES = b'"offset":%d,' % _OFFSET_MARK
_MARK_DIGITS = len(str(_OFFSET_MARK))


@functools.cache
def _numpy_dtypes() -> dict[torch.dtype, Any]:
    """torch dtype -> NumPy dtype, for every wire dtype NumPy has (all but bfloat16). Built when the
    first tensor is encoded or decoded: torch is imported only where tensors are."""
    import torch

    return {dt: torch.empty(0, dtype=dt).numpy().dtype for dt in torch_dtypes().values() if dt is not torch.bfloat16}


def encode(envelope: Envelope, limits: Limits = DEFAULT_LIMITS, *, signing_key: SigningKeyLike | None = None) -> bytes:
    """Encode an envelope into one frame. Costs one copy of each tensor's bytes.

    With ``signing_key`` the frame is signed (SPEC §13.1): flag bit 0 set, key id + HMAC appended.
    """
    keyring = as_keyring(signing_key) if signing_key is not None else None
    problem = mqtt_field_problem(envelope)
    if problem is not None:
        raise EncodeError(f"{problem[0]}: {problem[1]}")
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host in sight
        raise EncodeError("encoding on big-endian hosts is not implemented")
    if len(envelope.parts) > limits.max_parts:
        raise EncodeError(f"{len(envelope.parts)} parts exceed the limit of {limits.max_parts}")
    tensors: list[torch.Tensor] = []
    sizes: list[int] = []
    wire_parts: list[dict[str, Any]] = []
    for part in envelope.parts:
        if isinstance(part, TextPart):
            wire_parts.append({"type": "text", "text": part.text, "meta": part.meta})
            continue
        t = part.tensor
        if not t.is_cpu:
            t = t.cpu()
        if t.requires_grad:
            t = t.detach()
        if t.dim() > limits.max_ndim:
            raise EncodeError(f"tensor has {t.dim()} dimensions, limit is {limits.max_ndim}")
        if not t.is_contiguous():
            t = t.contiguous()
        dtype = from_torch_dtypes().get(t.dtype) or DType.from_torch(t.dtype)  # the latter raises
        nbytes = t.nbytes
        tensors.append(t)
        sizes.append(nbytes)
        wire_parts.append(
            {
                "type": "tensor",
                "role": str(part.role),  # plain str: a serialiser reads an enum's value in Python
                "dtype": str(dtype),
                "shape": list(t.shape),
                "offset": _OFFSET_MARK,
                "nbytes": nbytes,
                "space": part.space.model_dump() if part.space is not None else None,
                "meta": part.meta,
            }
        )
    error = envelope.error
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
        "error": error.model_dump() if error is not None else None,
        "meta": envelope.meta,
    }
    free: list[Any] = [envelope.meta, *(p["meta"] for p in wire_parts)]
    if error is not None:
        free.append(error.detail)
    dumped = _dump(header, free)
    if (depth := _too_deep(dumped)) is not None:
        raise EncodeError(f"header nests {depth} levels deep, the limit is {MAX_JSON_DEPTH} (SPEC §3.1)")
    if tensors:
        header_pieces, offsets = _lay_out(dumped, sizes, header, wire_parts)
        header_len = sum(map(len, header_pieces))
        total = offsets[-1] + sizes[-1]
    else:
        header_pieces, offsets = [dumped], []
        header_len = len(dumped)
        total = PREAMBLE_SIZE + header_len
    if header_len > limits.max_header_bytes:
        raise EncodeError(f"header is {header_len} bytes, limit is {limits.max_header_bytes}")
    if total + (TRAILER_SIZE if keyring else 0) > limits.max_frame_bytes:
        raise EncodeError(
            f"frame would be {total + (TRAILER_SIZE if keyring else 0)} bytes, limit is {limits.max_frame_bytes}"
        )

    # One pass over the tensor bytes: join the pieces straight into the frame (no zero-fill
    # of a buffer that is then overwritten).
    pieces: list[Any] = [PREAMBLE.pack(MAGIC, WIRE_VERSION, FLAG_SIGNED if keyring else 0, 0, header_len)]
    pieces += header_pieces
    cursor = PREAMBLE_SIZE + header_len
    for t, offset, n in zip(tensors, offsets, sizes, strict=True):
        if not n:
            continue
        if offset > cursor:
            pieces.append(_ZEROS[: offset - cursor])
        pieces.append(_raw_bytes(t))
        cursor = offset + n
    if cursor < total:  # trailing zero-size tensors may sit on a later aligned offset
        pieces.append(_ZEROS[: total - cursor])
    if keyring:  # MAC over the pieces as they are: no extra copy of the tensor bytes
        pieces += keyring.trailer(pieces)
    return b"".join(pieces)


_ZEROS = bytes(ALIGNMENT)


def _raw_bytes(t: torch.Tensor) -> memoryview | Any:
    """A buffer over a contiguous CPU tensor's bytes, without copying them."""
    if t.dtype in _numpy_dtypes():
        return t.numpy()
    import torch  # loaded already: ``t`` is a tensor

    return t.reshape(-1).view(torch.uint8).numpy()  # bfloat16 has no numpy dtype


def _lay_out(
    dumped: bytes, sizes: list[int], header: dict[str, Any], wire_parts: list[dict[str, Any]]
) -> tuple[list[bytes], list[int]]:
    """Split the header at its offset markers and work out the offsets; returns the header's
    pieces (offsets spliced in) and the offsets."""
    split = dumped.split(_OFFSET_MARK_BYTES)
    if len(split) == len(sizes) + 1:
        # The header ends at `fixed` plus the offsets' digits. Counting up from one digit each
        # reaches the smallest consistent layout, the one SPEC §5 calls canonical.
        fixed = PREAMBLE_SIZE + len(dumped) - len(sizes) * _MARK_DIGITS
        digits = len(sizes)
        while True:
            offsets, total = _offsets(fixed + digits, sizes)
            if total == digits:
                break
            digits = total
        pieces = [split[0]]
        for offset, rest in zip(offsets, split[1:], strict=True):
            pieces.append(b'"offset":%d,' % offset)
            pieces.append(rest)
        return pieces, offsets
    # A meta value holds the marker: iterate on the real header (two dumps in practice).
    tensor_parts = [p for p in wire_parts if p["type"] == "tensor"]
    for p in tensor_parts:
        p["offset"] = 0
    for _ in range(8):
        dumped = _dump(header)
        offsets, _ = _offsets(PREAMBLE_SIZE + len(dumped), sizes)
        if all(p["offset"] == o for p, o in zip(tensor_parts, offsets, strict=True)):
            return [dumped], offsets
        for p, o in zip(tensor_parts, offsets, strict=True):
            p["offset"] = o
    raise EncodeError("could not lay out tensor segments")  # pragma: no cover


def _offsets(header_end: int, sizes: list[int]) -> tuple[list[int], int]:
    """Where each tensor segment starts (64-byte aligned, in part order, after the header), and
    how many decimal digits those offsets take in the header."""
    cursor = (header_end + ALIGNMENT - 1) & -ALIGNMENT
    offsets = []
    digits = 0
    for n in sizes:
        offsets.append(cursor)
        digits += len(str(cursor))
        cursor = (cursor + n + ALIGNMENT - 1) & -ALIGNMENT
    return offsets, digits


def _dump(header: dict[str, Any], free: list[Any] | None = None) -> bytes:
    """The header's JSON in the reference form (SPEC §8.2).

    pydantic-core's serialiser writes that form three times faster than the stdlib, for the
    values it writes identically; ``free`` lists the places a sender's values sit (meta, error
    detail), and when one of them holds anything else (a set, bytes, a non-finite or tiny float)
    the stdlib encoder runs instead, with its errors."""
    if free is not None and _plain(free, header["created_at"], header["deadline"]):
        try:
            return to_json(header)
        except PydanticSerializationError as e:  # a lone surrogate in a string
            raise EncodeError(f"header is not JSON-serialisable (check meta values): {e}") from e
    try:
        return _JSON.encode(header).encode()
    except (TypeError, ValueError) as e:
        raise EncodeError(f"header is not JSON-serialisable (check meta values): {e}") from e


def _plain(free: list[Any], created_at: Any, deadline: Any) -> bool:
    """Whether these values hold only what both JSON writers write alike: str-keyed dicts, lists,
    strings, ints, bools, None, and finite floats outside (0, 1e-4), where Python's repr writes a
    two-digit exponent (1e-05) and pydantic-core one digit."""
    stack = [created_at, deadline, *[v for v in free if v]]  # free values are dicts, usually empty
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str or t is int or t is bool or v is None:
            continue
        if t is float:
            if not (math.isfinite(v) and (v == 0.0 or abs(v) >= 1e-4)):
                return False
        elif t is dict:
            for k in v:
                if type(k) is not str:
                    return False
            stack.extend(v.values())
        elif t is list or t is tuple:
            stack.extend(v)
        else:
            return False
    return True


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
    try:
        text = str(view[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len], "utf-8")
    except UnicodeDecodeError as e:
        raise HeaderDecodeError(f"header is not valid UTF-8: {e}") from None
    return text, header_len, view


def json_depth(text: str | bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (``{}`` and ``[]`` are 1, a scalar 0),
    counted alike for both (SPEC §3.1)."""
    raw = text.encode() if isinstance(text, str) else text
    b = numpy.frombuffer(_JSON_STRING.sub(b"", raw), numpy.uint8)
    step = (b == 0x5B).astype(numpy.int64) + (b == 0x7B) - (b == 0x5D) - (b == 0x7D)
    return int(step.cumsum().max()) if b.size else 0


def _too_deep(text: str | bytes) -> int | None:
    """The nesting depth when it exceeds ``MAX_JSON_DEPTH``; a text with no more brackets than
    the limit cannot, and is not scanned (the common case costs two ``count`` calls)."""
    brackets = text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    if brackets <= MAX_JSON_DEPTH:
        return None
    depth = json_depth(text)
    return depth if depth > MAX_JSON_DEPTH else None


def _check_depth(text: str) -> None:
    """Check 9's nesting rule, before any recursive parser sees the text."""
    if (depth := _too_deep(text)) is not None:
        raise HeaderDecodeError(f"header is not valid JSON: nested {depth} levels deep, the limit is {MAX_JSON_DEPTH}")


def _parse_header(text: str) -> dict[str, Any]:
    """The header as a JSON object, with the JSON rules of SPEC §6 (no NaN/Infinity, finite numbers)."""
    _check_depth(text)
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
    _check_depth(text)
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
    problem = mqtt_field_problem(h)
    if problem is not None:
        field, why = problem
        raise HeaderValidationError(f"{field}: {why}", header=_h(text), field=field.split("[", 1)[0])
    return _assemble(h, view, header_len, limits, text)


# Header strings an MQTT node copies into PUBLISH packets: user properties and CorrelationData
# (id, sender, correlation_id), a reply's fields (recipient, trace_id, parent_id) and topics
# (reply_to; each route hop becomes an inbox topic level), which must be portable: SPEC §6.1.
_MQTT_STRING_FIELDS = ("id", "sender", "recipient", "correlation_id", "trace_id", "parent_id")


def mqtt_field_problem(h: Any) -> tuple[str, str] | None:
    """``(field, reason)`` for the first header string a broker would refuse (SPEC §6 check 12a),
    or None. ``h`` is an :class:`Envelope` or a validated header (same attribute names)."""
    for name in _MQTT_STRING_FIELDS:
        value = getattr(h, name)
        if value is not None and not (value.isascii() and value.isprintable()):  # fast path: plain ASCII
            why = mqtt_string_problem(value)
            if why is not None:
                return name, why
    reply_to = h.reply_to
    if reply_to is not None:
        why = portable_topic_problem(reply_to)
        if why is not None:
            return "reply_to", f"not a portable MQTT topic name: {why}"
    for i, hop in enumerate(h.route):
        why = portable_level_problem(hop)
        if why is not None:
            return f"route[{i}]", f"not a portable MQTT topic level: {why}"
    return None


def _all_finite(h: _WireHeader) -> bool:
    """Whether the free-form values (meta, error detail) hold no NaN or infinity. The typed float
    fields reject those in validation (``allow_inf_nan=False``); these are the only other places a
    number can sit, and are usually empty, so this costs next to nothing."""
    stack: list[Any] = [m for m in (h.meta, *(p.meta for p in h.parts)) if m]
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
    header_end = PREAMBLE_SIZE + header_len
    data_start = _align(header_end)
    expected_size = header_end  # where the furthest tensor part ends (a zero-size one at its offset)
    segments: list[tuple[int, int, int]] = []  # (offset, end, part index)
    parts: list[TextPart | TensorPart] = []
    for i, p in enumerate(h.parts):
        if type(p) is _WireText:
            parts.append(_new(TextPart, {"type": "text", "text": p.text, "meta": p.meta}))
            continue
        assert isinstance(p, _WireTensor)
        shape, offset, nbytes = p.shape, p.offset, p.nbytes
        dt = torch_dtypes()[p.dtype]  # imports torch with the first tensor part
        if len(shape) > limits.max_ndim:
            raise SegmentError(
                f"part {i}: {len(shape)} dimensions exceed the limit of {limits.max_ndim}", header=_h(text)
            )
        if min(shape, default=0) < 0:
            raise SegmentError(f"part {i}: negative dimension in shape {shape}", header=_h(text))
        count = math.prod(shape)
        if count > _MAX_ELEMENTS or (count == 0 and math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS):
            # No real tensor is this large, and torch cannot even build an empty one of this shape
            raise SegmentError(f"part {i}: shape {shape} overflows a 64-bit element count", header=_h(text))
        # Checked against the payload before anything is allocated: a huge declared shape
        # can only fail here.
        if count * dt.itemsize != nbytes:
            raise SegmentError(
                f"part {i}: nbytes {nbytes} != shape {shape} x {dt.itemsize} bytes ({count * dt.itemsize})",
                header=_h(text),
            )
        if offset % ALIGNMENT:
            raise SegmentError(f"part {i}: offset {offset} is not {ALIGNMENT}-byte aligned", header=_h(text))
        if offset < data_start:
            raise SegmentError(
                f"part {i}: offset {offset} lies inside the header (data starts at {data_start})", header=_h(text)
            )
        end = offset + nbytes
        if end > size:
            raise SegmentError(
                f"part {i}: segment [{offset}, {end}) runs past the end of the {size}-byte frame", header=_h(text)
            )
        if end > expected_size:
            expected_size = end
        if nbytes:
            segments.append((offset, end, i))
            t = _frombuffer(view, dt, count, offset, shape)
        else:
            import torch

            t = torch.empty(shape, dtype=dt)
        parts.append(
            _new(TensorPart, {"type": "tensor", "tensor": t, "role": p.role, "space": p.space, "meta": p.meta})
        )
    if len(segments) > 1:
        segments.sort()
        for (_, end_a, ia), (start_b, _, ib) in itertools.pairwise(segments):
            if start_b < end_a:
                raise SegmentError(f"parts {ia} and {ib}: segments overlap", header=_h(text))
    if size != expected_size:
        raise SegmentError(f"frame is {size} bytes but its header accounts for {expected_size}", header=_h(text))
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


_h = _parse_header  # the header object an error carries, parsed only when there is an error
_readonly_warnings_spent = False


def _frombuffer(view: memoryview, dt: torch.dtype, count: int, offset: int, shape: list[int]) -> torch.Tensor:
    """A tensor viewing ``count`` elements of ``view`` from ``offset``, in ``shape``, without a copy.

    NumPy builds the view in half of torch's time; bfloat16, which NumPy lacks, goes through torch."""
    import torch

    if not _readonly_warnings_spent:
        _spend_readonly_warnings()
    np_dt = _numpy_dtypes().get(dt)
    if np_dt is None:
        return torch.frombuffer(view, dtype=dt, count=count, offset=offset).view(shape)
    return torch.from_numpy(numpy.frombuffer(view, dtype=np_dt, count=count, offset=offset).reshape(shape))


def _spend_readonly_warnings() -> None:
    """torch warns, once per process and call site, that a tensor over a read-only buffer could
    write to it. Decoded tensors are documented read-only, so both warnings are spent here, once,
    and no decode pays for a warning filter."""
    global _readonly_warnings_spent
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(_ZEROS, dtype=torch.uint8)
        torch.from_numpy(numpy.frombuffer(_ZEROS, dtype=numpy.uint8))
    _readonly_warnings_spent = True


def _summarise(e: ValidationError) -> str:
    errs = e.errors(include_url=False)
    shown = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in errs[:3])
    return shown + (f" (+{len(errs) - 3} more)" if len(errs) > 3 else "")
