"""Latent wire encodings (SPEC §17): byte savings, error bounds, the receiver rule, round trip
through the codec, and that the protocol layer does not load torch for them."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from protocols import CompressionError, Envelope, FeatureSpace, TensorPart, TensorRole, decode
from protocols import compression as C
from protocols import encode as encode_frame


def _latent(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_int8_rowwise_quarter_bytes_within_bound(dtype: torch.dtype) -> None:
    t = _latent(1, 64, 512, dtype=dtype)
    space = FeatureSpace(family="x", layer=3)
    parts = C.pack(t, C.INT8_ROWWISE, role=TensorRole.HIDDEN_STATE, space=space, meta={"layer": 3})
    assert [p.meta["encoding"] for p in parts] == ["int8-rowwise", "int8-rowwise-scales"]
    # the quantised head can never be mistaken for a hidden state by a receiver that skips meta
    assert [p.role for p in parts] == [TensorRole.OTHER, TensorRole.OTHER]
    assert parts[1].shape == (1, 64, 1) and parts[1].dtype.value == "float32"
    assert C.wire_bytes(parts) == 64 * 512 + 64 * 4
    back = C.decompress(parts)
    assert back.tensor.dtype == dtype and back.tensor.shape == t.shape
    assert back.role == TensorRole.HIDDEN_STATE and back.space == space and back.meta == {"layer": 3}
    rows = t.float().reshape(-1, 512)
    bound = rows.abs().amax(1, keepdim=True) / 254 * (1 + 1e-6)
    err = (back.tensor.float().reshape(-1, 512) - rows).abs()
    # the quantisation bound, plus the rounding of the result back to the original dtype
    slack = rows.abs().amax(1, keepdim=True) * (2**-8 if dtype == torch.bfloat16 else 2**-10)
    assert bool((err <= bound + slack).all())


def test_int8_rowwise_numpy_arithmetic() -> None:
    x = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -254.0]], dtype=np.float32)
    q, scale = C.quantize_int8_rowwise(x)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [64, 32, -127]]  # 63.5 -> 64 (half to even), 31.75 -> 32
    assert scale[:, 0].tolist() == pytest.approx([2 / 127, 0.0, 2.0])
    assert C.dequantize_int8_rowwise(q, scale)[1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(CompressionError, match="finite"):
        C.quantize_int8_rowwise(np.array([1.0, np.inf], dtype=np.float32))


def test_topk_logits_keep_greedy_choice_and_mass() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 4, 1000, generator=g) * 4).to(torch.float16)
    parts = C.pack(logits, C.TOPK, role=TensorRole.TOKEN_DISTRIBUTION, k=50)
    assert parts[0].tensor.dtype == torch.float16 and parts[1].tensor.dtype == torch.int32
    assert parts[0].meta["fill"] == "-inf" and parts[0].meta["size"] == 1000 and parts[0].shape == (1, 4, 50)
    assert C.wire_bytes(parts) * 2 <= logits.numel() * 2
    back = C.decompress(parts)
    assert back.role == TensorRole.TOKEN_DISTRIBUTION and back.tensor.shape == logits.shape
    assert torch.equal(back.tensor.argmax(-1), logits.argmax(-1))  # greedy decoding is unchanged
    p, q = torch.softmax(logits.float(), -1), torch.softmax(back.tensor.float(), -1)
    tv = 0.5 * (p - q).abs().sum(-1)
    lost = 1 - torch.topk(p, 50, -1).values.sum(-1)
    # total variation to the renormalised top k is the mass outside it (plus float16 rounding)
    assert bool((tv <= lost + 2e-3).all())
    assert math.isclose(C.topk_mass_lost(logits, 50), float(lost.mean()), rel_tol=1e-4)


def test_topk_probabilities_fill_zero_and_ties() -> None:
    probs = torch.softmax(torch.randn(3, 100), -1)
    parts = C.pack(probs, C.TOPK, k=10)
    assert parts[0].meta["fill"] == 0.0
    back = C.decompress(parts).tensor
    assert (back >= 0).all()
    assert math.isclose(float(back.sum(-1).mean()), 1 - C.topk_mass_lost(probs, 10, logits=False), rel_tol=1e-2)
    values, idx = C.topk_rows(np.array([[0.25, 0.5, 0.25, 0.0]], dtype=np.float32), 3)
    assert idx.tolist() == [[1, 0, 2]] and values.tolist() == [[0.5, 0.25, 0.25]]  # ties: lower index first


def test_plain_encodings_are_one_part_of_that_dtype() -> None:
    t = _latent(2, 3, dtype=torch.float32)
    for enc in C.PLAIN:
        (part,) = C.pack(t, enc, role=TensorRole.HIDDEN_STATE)
        assert part.dtype.value == enc and part.role == TensorRole.HIDDEN_STATE and part.meta == {"encoding": enc}
        assert C.decompress([part]) is part
    untagged = TensorPart(tensor=torch.arange(4))
    assert C.expand([untagged]) == [untagged]  # a v1 part without meta.encoding is plain in its dtype


def test_round_trip_through_the_codec_and_expand() -> None:
    t = _latent(1, 16, 256)
    env = Envelope.request("hi", *C.pack(t, C.INT8_ROWWISE, role=TensorRole.HIDDEN_STATE))
    parts = C.expand(decode(encode_frame(env)).parts)
    assert len(parts) == 2 and isinstance(parts[1], TensorPart) and parts[1].role == TensorRole.HIDDEN_STATE
    assert (parts[1].tensor.float() - t.float()).abs().max() <= t.float().abs().max() / 254 + 0.01


def test_receiver_rule_unknown_and_malformed() -> None:
    t = _latent(4, 4)
    with pytest.raises(CompressionError) as info:
        C.expand([TensorPart(tensor=t, meta={"encoding": "zstd"})])
    assert info.value.code == "unsupported_encoding"
    with pytest.raises(CompressionError) as info:
        C.pack(t, "zstd")
    assert info.value.code == "unsupported_encoding"
    with pytest.raises(CompressionError):
        C.pack(torch.arange(4), C.INT8_ROWWISE)
    with pytest.raises(CompressionError):
        C.pack(t, C.TOPK, k=5)
    with pytest.raises(CompressionError, match="reserved"):
        C.pack(t, C.INT8_ROWWISE, meta={"role": "x"})
    a, b = C.pack(t, C.INT8_ROWWISE)
    for broken in ([a], [b, a], [b], [a, a]):
        with pytest.raises(CompressionError) as info:
            C.expand(broken)
        assert info.value.code == "bad_encoding"
    v, i = C.pack(t, C.TOPK, k=2)
    for bad in (torch.full_like(i.tensor, 99), torch.zeros_like(i.tensor)):  # out of range; repeated
        with pytest.raises(CompressionError):
            C.decompress([v, TensorPart(tensor=bad, meta=i.meta)])


def test_compress_module_imports_no_torch_at_import_time() -> None:
    """The arithmetic is NumPy; torch is imported only inside functions that build tensors."""
    tree = ast.parse(Path(C.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert "numpy" in names and "torch" not in names
