"""Latent wire encodings (SPEC §17): the one module every agent and the relay use to put a dense
tensor on the wire in fewer bytes, and to restore it.

An encoded tensor travels as ordinary v1 tensor parts, so any v1 decoder reads the frame; each part
names its encoding in ``meta.encoding``. Plain encodings (``float32``, ``float16``, ``bfloat16``)
are one part in that dtype, with the tensor's own role. A lossy encoding is a *group* of two
adjacent parts whose head has role ``other`` (so a receiver that does not know the encoding can
never mistake quantised integers or top-k values for a hidden state or a distribution) and says in
its meta the role and dtype the restored tensor has:

- ``int8-rowwise``: head int8 values (the tensor's shape), then one float32 scale per row
  (``int8-rowwise-scales``, shape ``[..., 1]``); value = int8 * scale. Error per element at most
  ``scale / 2 = absmax(row) / 254``.
- ``topk``: head the ``k`` largest values per row (descending, ties to the lower index), then
  their indices (``topk-indices``, int32, same shape); the other ``size - k`` entries are ``fill``
  (``0`` for probabilities, ``"-inf"`` for logits).

The arithmetic is NumPy; torch is imported only inside the functions that build or read
``TensorPart`` tensors, so importing this module (and ``protocols``) does not load it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .envelope import FeatureSpace, TensorPart, TensorRole, TextPart

if TYPE_CHECKING:
    import torch

ENCODING = "encoding"  # part-meta key naming a part's encoding
PLAIN = ("float32", "float16", "bfloat16")
INT8_ROWWISE = "int8-rowwise"
INT8_ROWWISE_SCALES = "int8-rowwise-scales"
TOPK = "topk"
TOPK_INDICES = "topk-indices"
#: Encodings a sender may choose for a tensor.
ENCODINGS = (*PLAIN, INT8_ROWWISE, TOPK)
#: The second part of each two-part encoding.
COMPANION = {INT8_ROWWISE: INT8_ROWWISE_SCALES, TOPK: TOPK_INDICES}
#: Every value ``meta.encoding`` may take in this version.
KNOWN = (*ENCODINGS, *COMPANION.values())
#: Head-meta keys the encodings own (a dense part's meta must not use them).
RESERVED = (ENCODING, "role", "dtype", "parts", "size", "fill")


class CompressionError(ValueError):
    """Parts that do not form one encoded tensor, an encoding the receiver does not know, or a
    tensor the encoding cannot carry. ``code`` is what a receiver answers (SPEC §17.4)."""

    def __init__(self, message: str, code: str = "bad_encoding") -> None:
        super().__init__(message)
        self.code = code


# -- NumPy arithmetic (what SPEC §17 specifies) -------------------------------------------------
def quantize_int8_rowwise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 values (shape of ``x``) and float32 scales (``[..., 1]``): ``x ≈ q * scale``."""
    xf = np.asarray(x, dtype=np.float32)
    if xf.ndim == 0:
        raise CompressionError(f"{INT8_ROWWISE} needs at least one dimension")
    if not np.isfinite(xf).all():
        raise CompressionError(f"{INT8_ROWWISE} applies to finite values only")
    absmax = np.abs(xf).max(axis=-1, keepdims=True, initial=np.float32(0))
    scale = (absmax / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.where(scale > 0, np.clip(np.rint(xf / safe), -127, 127), 0).astype(np.int8)
    return q, scale


def dequantize_int8_rowwise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``q * scale`` (scale broadcast over the last dimension)."""
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)


def topk_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of each row (last dimension), descending, ties to the lower
    index, and their int32 indices."""
    xa = np.asarray(x)
    if xa.ndim == 0:
        raise CompressionError(f"{TOPK} needs at least one dimension")
    if not 1 <= k <= xa.shape[-1]:
        raise CompressionError(f"k must be within 1..{xa.shape[-1]}, got {k}")
    order = np.argsort(-xa.astype(np.float64), axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(xa, order, axis=-1), order.astype(np.int32)


def scatter_topk(values: np.ndarray, indices: np.ndarray, size: int, fill: float) -> np.ndarray:
    """The dense float32 ``[..., size]`` tensor: ``fill`` everywhere but at ``indices``."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise CompressionError(f"{TOPK_INDICES} out of range 0..{size - 1}")
    dense = np.full((*idx.shape[:-1], size), fill, dtype=np.float32)
    np.put_along_axis(dense, idx, np.asarray(values, dtype=np.float32), axis=-1)
    return dense


def topk_mass_lost(original: Any, k: int, *, logits: bool = True) -> float:
    """Mean probability mass outside the top ``k`` per row (what ``topk`` throws away)."""
    x = _numpy(original).astype(np.float64)
    if logits:
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        x /= x.sum(axis=-1, keepdims=True)
    kept = np.sort(x, axis=-1)[..., -k:].sum(axis=-1)
    return float(np.clip(1 - kept, 0, None).mean())


# -- parts ----------------------------------------------------------------------------------------
def encoding_of(part: TensorPart) -> str:
    """The part's encoding: ``meta.encoding``, or its dtype for a part without one (v1)."""
    enc = part.meta.get(ENCODING, part.dtype.value)
    if not isinstance(enc, str):
        raise CompressionError(f"meta.encoding must be a string, got {enc!r}", code="unsupported_encoding")
    return enc


def pack(
    tensor: torch.Tensor | np.ndarray,
    encoding: str = "float32",
    *,
    role: TensorRole | str = TensorRole.OTHER,
    space: FeatureSpace | None = None,
    meta: dict[str, Any] | None = None,
    k: int = 64,
    fill: float | None = None,
) -> list[TensorPart]:
    """The parts that carry ``tensor`` in ``encoding`` (one part, or a head and its companion)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(tensor)) if isinstance(tensor, np.ndarray) else tensor.detach()
    base = dict(meta or {})
    if clash := [key for key in RESERVED if key in base]:
        raise CompressionError(f"part meta uses keys reserved for encodings: {clash}")
    role = TensorRole(role)
    if encoding in PLAIN:
        dense = t.to(getattr(torch, encoding)).contiguous()
        return [TensorPart(tensor=dense, role=role, space=space, meta={**base, ENCODING: encoding})]
    if encoding not in COMPANION:
        raise CompressionError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}", "unsupported_encoding")
    if not t.is_floating_point():
        raise CompressionError(f"{encoding} applies to floating-point tensors, not {t.dtype}")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in PLAIN:
        dtype = "float32"
    x = _numpy(t)
    head = {ENCODING: encoding, "role": role.value, "dtype": dtype, "parts": 2}
    if encoding == INT8_ROWWISE:
        q, scale = quantize_int8_rowwise(x)
        first, second = torch.from_numpy(q), torch.from_numpy(scale)
    else:
        if fill is None:
            probs = bool((x >= 0).all()) and math.isclose(float(x.sum(-1).mean()) if x.size else 1.0, 1.0, rel_tol=1e-2)
            fill = 0.0 if probs else -math.inf
        values, indices = topk_rows(x, k)
        head.update(size=int(x.shape[-1]), fill="-inf" if fill == -math.inf else float(fill))
        first = torch.from_numpy(values).to(getattr(torch, dtype))
        second = torch.from_numpy(indices)
    return [
        TensorPart(tensor=first, role=TensorRole.OTHER, space=space, meta={**head, **base}),
        TensorPart(tensor=second, role=TensorRole.OTHER, space=space, meta={ENCODING: COMPANION[encoding]}),
    ]


def compress(part: TensorPart, encoding: str, *, k: int = 64, fill: float | None = None) -> list[TensorPart]:
    """:func:`pack` for an existing dense part (its role, space and meta are kept)."""
    meta = {key: v for key, v in part.meta.items() if key != ENCODING}
    return pack(part.tensor, encoding, role=part.role, space=part.space, meta=meta, k=k, fill=fill)


def decompress(parts: Sequence[TensorPart]) -> TensorPart:
    """The dense part one encoded group restores (a plain part: returned as it is)."""
    if not parts:
        raise CompressionError("no parts")
    head = parts[0]
    enc = encoding_of(head)
    if ENCODING in head.meta and enc not in KNOWN:
        raise CompressionError(f"unknown encoding {enc!r}", code="unsupported_encoding")
    if enc in COMPANION.values():
        raise CompressionError(f"{enc} part without the head of its group")
    if enc not in COMPANION:
        if len(parts) != 1 or enc != head.dtype.value:
            raise CompressionError(f"one {enc} part expected, got {len(parts)} parts of dtype {head.dtype.value}")
        return head
    if len(parts) != 2 or parts[1].meta.get(ENCODING) != COMPANION[enc]:
        raise CompressionError(f"{enc} part not followed by its {COMPANION[enc]} part")
    import torch

    m = head.meta
    try:
        role, dtype = TensorRole(m["role"]), getattr(torch, m["dtype"]) if m["dtype"] in PLAIN else None
        if dtype is None or m.get("parts") != 2:
            raise ValueError(f"dtype {m['dtype']!r}, parts {m.get('parts')!r}")
        first, second = _numpy(head.tensor), _numpy(parts[1].tensor)
        if enc == INT8_ROWWISE:
            if head.dtype.value != "int8" or parts[1].dtype.value != "float32" or first.ndim == 0:
                raise ValueError("int8 values and float32 scales expected")
            if second.shape != (*first.shape[:-1], 1):
                raise ValueError(f"scales shape {list(second.shape)} for values {list(first.shape)}")
            dense = dequantize_int8_rowwise(first, second)
        else:
            if head.dtype.value != m["dtype"]:
                raise ValueError(f"values of dtype {head.dtype.value}, meta.dtype {m['dtype']}")
            if parts[1].dtype.value not in ("int32", "int64") or second.shape != first.shape or first.ndim == 0:
                raise ValueError(f"indices {list(second.shape)} do not match values {list(first.shape)}")
            fill = -math.inf if m["fill"] == "-inf" else float(m["fill"])
            size = int(m["size"])
            if size < first.shape[-1] or any(
                len(set(r)) != len(r) for r in second.reshape(-1, first.shape[-1]).tolist()
            ):
                raise ValueError("indices repeat within a row, or size below k")
            dense = scatter_topk(first, second, size, fill)
    except CompressionError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CompressionError(f"malformed {enc} group: {e}") from None
    meta = {key: v for key, v in m.items() if key not in RESERVED}
    return TensorPart(tensor=torch.from_numpy(dense).to(dtype), role=role, space=head.space, meta=meta)


def expand(parts: Sequence[TextPart | TensorPart]) -> list[TextPart | TensorPart]:
    """Every encoded group in ``parts`` restored to its dense part; other parts unchanged.
    Raises :class:`CompressionError` (``unsupported_encoding``) for an encoding it does not know."""
    out: list[TextPart | TensorPart] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if isinstance(p, TensorPart) and encoding_of(p) in COMPANION:
            out.append(decompress(parts[i : i + 2]))  # type: ignore[arg-type]
            i += 2
            continue
        out.append(decompress([p]) if isinstance(p, TensorPart) else p)
        i += 1
    return out


def wire_bytes(parts: Sequence[TextPart | TensorPart]) -> int:
    """Tensor bytes the parts put on the wire (without frame overhead)."""
    return sum(p.nbytes for p in parts if isinstance(p, TensorPart))


def _numpy(t: Any) -> np.ndarray:
    """A NumPy view or copy of a tensor or array (bfloat16 and float16 widened to float32)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    return t.numpy()
