"""Golden frames of protocol v1: the bytes other implementations are checked against.

If one of these fails after a codec change, the wire format changed: either revert, or bump the
wire version and regenerate with ``protocols/vectors/generate.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from protocols import (
    DType,
    Envelope,
    ErrorInfo,
    FeatureSpace,
    ProtocolError,
    TensorPart,
    TensorRole,
    TextPart,
    compression,
    decode,
    encode,
    peek_header,
)

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "protocols" / "vectors"
VALID = sorted(p.stem for p in VECTORS.glob("*.bin") if not p.stem.startswith("bad_"))
INVALID = sorted(p.stem for p in VECTORS.glob("bad_*.bin"))
HEADER_FIELDS = (
    "id",
    "kind",
    "sender",
    "recipient",
    "correlation_id",
    "reply_to",
    "trace_id",
    "parent_id",
    "created_at",
    "deadline",
    "route",
    "meta",
)
_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _load(name: str) -> tuple[bytes, dict[str, Any]]:
    return (VECTORS / f"{name}.bin").read_bytes(), json.loads((VECTORS / f"{name}.json").read_text("utf-8"))


def _tensor(spec: dict[str, Any]) -> torch.Tensor:
    values = [_SPECIAL.get(v, v) if isinstance(v, str) else v for v in spec["values"]]
    return torch.tensor(values, dtype=DType(spec["dtype"]).torch_dtype).reshape(spec["shape"])


def envelope_from(expected: dict[str, Any]) -> Envelope:
    """Build the envelope a vector describes, from its JSON alone."""
    header = expected["header"]
    tensors = {t["part"]: _tensor(t) for t in expected["tensors"]}
    parts: list[TextPart | TensorPart] = []
    for i, p in enumerate(header["parts"]):
        if p["type"] == "text":
            parts.append(TextPart(text=p["text"], meta=p["meta"]))
        else:
            space = FeatureSpace(**p["space"]) if p["space"] is not None else None
            parts.append(TensorPart(tensor=tensors[i], role=p["role"], space=space, meta=p["meta"]))
    error = ErrorInfo(**header["error"]) if header["error"] is not None else None
    return Envelope(parts=parts, error=error, **{k: header[k] for k in HEADER_FIELDS})


def _bits(t: torch.Tensor) -> bytes:
    """Bitwise identity, so NaN payloads and -0.0 count."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_vector_set_covers_the_brief() -> None:
    required = (
        {
            "text_only",
            "hidden_state_f16",
            "zero_size",
            "zero_size_mixed",
            "scalar",
            "multi_tensor",
            "error",
            "unicode_text",
            "meta_nested",
            "route",
            "meta_depth_limit",
            "layout_least_fixed_point",
            "encoding_int8_rowwise",
            "encoding_topk",
            "encoding_topk_logits",
            "encoding_unknown",
        }
        | {f"dtype_{d.value}" for d in DType}
        | {f"encoding_{e}" for e in compression.PLAIN}
    )
    assert required <= set(VALID)
    assert len(INVALID) >= 10
    for name in VALID + INVALID:
        assert (VECTORS / f"{name}.json").is_file(), name
    codes = {_load(n)[1]["error"] for n in INVALID}
    assert codes >= {
        "frame_too_short",
        "bad_magic",
        "unsupported_version",
        "header_too_large",
        "header_decode",
        "header_invalid",
        "bad_segment",
    }


@pytest.mark.parametrize("name", VALID)
def test_encode_reproduces_the_frame_exactly(name: str) -> None:
    frame, expected = _load(name)
    assert bytes(encode(envelope_from(expected))) == frame


@pytest.mark.parametrize("name", VALID)
def test_decode_gives_the_expected_envelope(name: str) -> None:
    frame, expected = _load(name)
    assert len(frame) == expected["frame_size"]
    assert struct.unpack_from("<4sBBHI", frame) == (b"AIFL", 1, 0, 0, expected["header_length"])
    payload = bytearray(frame)
    env = decode(payload)
    header = expected["header"]
    for field in HEADER_FIELDS:
        assert getattr(env, field) == header[field], field
    assert (env.error.model_dump() if env.error else None) == header["error"]
    assert len(env.parts) == len(header["parts"])
    base = torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
    tensors = {t["part"]: t for t in expected["tensors"]}
    for i, (part, wire) in enumerate(zip(env.parts, header["parts"], strict=True)):
        assert part.type == wire["type"]
        assert part.meta == wire["meta"]
        if isinstance(part, TextPart):
            assert part.text == wire["text"]
            continue
        spec = tensors[i]
        assert part.role == wire["role"]
        assert (part.space.model_dump() if part.space else None) == wire["space"]
        assert part.dtype.value == wire["dtype"] == spec["dtype"]
        assert list(part.shape) == wire["shape"] == spec["shape"]
        assert part.nbytes == wire["nbytes"]
        assert _bits(part.tensor) == _bits(_tensor(spec))
        got = [v if not (isinstance(v, float) and math.isnan(v)) else "NaN" for v in part.tensor.reshape(-1).tolist()]
        want = [v if v != "Infinity" and v != "-Infinity" else _SPECIAL[v] for v in spec["values"]]
        assert got == want
        if part.nbytes:  # a zero-copy view sitting exactly at the declared offset
            assert part.tensor.data_ptr() - base == wire["offset"]


@pytest.mark.parametrize("name", VALID)
def test_padding_bytes_are_zero(name: str) -> None:
    frame, expected = _load(name)
    used = bytearray(len(frame))
    used[: 12 + expected["header_length"]] = b"\x01" * (12 + expected["header_length"])
    for p in expected["header"]["parts"]:
        if p["type"] == "tensor":
            used[p["offset"] : p["offset"] + p["nbytes"]] = b"\x01" * p["nbytes"]
    assert all(b == 0 for b, u in zip(frame, used, strict=True) if not u)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_vector_raises_its_code(name: str) -> None:
    frame, expected = _load(name)
    for payload in (frame, bytearray(frame), memoryview(frame)):
        with pytest.raises(ProtocolError) as info:
            decode(payload)
        assert info.value.code == expected["error"], info.value
        assert type(info.value).__name__ == expected["exception"]


ENCODED = [n for n in VALID if n.startswith("encoding_")]


@pytest.mark.parametrize("name", ENCODED)
def test_encoding_vector_restores_its_dense_tensor(name: str) -> None:
    """SPEC §17: each encoding restores to the values in ``restored``; an unknown one is refused."""
    frame, expected = _load(name)
    parts = decode(frame).parts
    if "restored_error" in expected:
        with pytest.raises(compression.CompressionError) as info:
            compression.expand(parts)
        assert info.value.code == expected["restored_error"] == "unsupported_encoding"
        return
    restored = compression.expand(parts)
    tensors = [(i, p) for i, p in enumerate(restored) if isinstance(p, TensorPart)]
    assert len(tensors) == len(expected["restored"])
    for (i, part), spec in zip(tensors, expected["restored"], strict=True):
        assert (i, part.role.value, part.dtype.value, list(part.shape)) == (
            spec["part"],
            spec["role"],
            spec["dtype"],
            spec["shape"],
        )
        assert part.meta == spec["meta"] and _bits(part.tensor) == _bits(_tensor(spec))
    # every part of an encoded group names its encoding, and no head passes for the dense role
    for p in parts:
        if isinstance(p, TensorPart):
            assert p.meta["encoding"] in compression.KNOWN
            if p.meta["encoding"] in (compression.INT8_ROWWISE, compression.TOPK):
                assert p.role == TensorRole.OTHER


def test_layout_vector_is_the_least_fixed_point() -> None:
    """SPEC §5: the other self-consistent layout (4-digit offsets 1024/1024) decodes to the same
    envelope, but the canonical one is the least, which the encoder reaches."""
    frame, expected = _load("layout_least_fixed_point")
    offsets = [p["offset"] for p in expected["header"]["parts"] if p["type"] == "tensor"]
    assert 12 + expected["header_length"] == 959 and offsets == [960, 960]
    header = frame[12 : 12 + expected["header_length"]].replace(b'"offset":960', b'"offset":1024')
    assert _align64(12 + len(header)) == 1024  # consistent: data_start is the offsets written
    other = struct.pack("<4sBBHI", b"AIFL", 1, 0, 0, len(header)) + header
    other += bytes(1024 - len(other)) + frame[960:]
    a, b = decode(frame), decode(other)
    assert [_bits(p.tensor) for p in a.tensors()] == [_bits(p.tensor) for p in b.tensors()]
    assert bytes(encode(b)) == frame


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_vector_generate", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_on_disk_match_a_fresh_generation() -> None:
    """Catches both a non-deterministic generator and vectors left stale after a codec change."""
    gen = _generator()
    built = gen.build()
    assert sorted(built) == sorted(VALID + INVALID)
    for name, (frame, expected) in built.items():
        assert (VECTORS / f"{name}.bin").read_bytes() == frame, name
        assert (VECTORS / f"{name}.json").read_text("utf-8") == gen._json_text(expected), name
    ops_dir = VECTORS / gen.OPS_DIR  # the op exchanges of protocols/OPS.md
    built_ops = gen.build_ops()
    assert sorted(built_ops) == sorted(p.stem for p in ops_dir.glob("*.bin"))
    for name, (frame, expected) in built_ops.items():
        assert (ops_dir / f"{name}.bin").read_bytes() == frame, name
        assert (ops_dir / f"{name}.json").read_text("utf-8") == gen._json_text(expected), name


def test_spec_hex_dump_is_the_example_vector() -> None:
    spec = (ROOT / "protocols" / "SPEC.md").read_text("utf-8")
    block = re.search(r"<!-- hexdump:example_small -->\n```text\n(.*?)```", spec, re.S)
    assert block is not None
    data = bytearray()
    for line in block.group(1).splitlines():
        offset, rest = line.split("  ", 1)
        assert int(offset, 16) == len(data)
        data += bytes.fromhex(rest.split("|", 1)[0])
    frame, expected = _load("example_small")
    assert bytes(data) == frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert peek_header(frame) == expected["header"]
