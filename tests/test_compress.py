"""Wire encodings for big latents: byte savings, error bounds, round trip through the codec."""

from __future__ import annotations

import math

import pytest
import torch

from protocols import (
    CompressionError,
    Envelope,
    FeatureSpace,
    TensorPart,
    TensorRole,
    compress,
    decode,
    decompress,
    expand,
)
from protocols import encode as encode_frame
from protocols.compress import topk_mass_lost, wire_bytes


def _latent(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_int8_halves_bytes_within_bound(dtype: torch.dtype) -> None:
    t = _latent(1, 64, 512, dtype=dtype)
    part = TensorPart(tensor=t, role=TensorRole.HIDDEN_STATE, space=FeatureSpace(family="x"), meta={"layer": 3})
    parts = compress(part, "int8")
    assert [p.meta.get("encoding") for p in parts] == ["int8", "int8.scale"]
    assert wire_bytes(parts) * 2 <= part.nbytes + 64 * 4 * 2  # int8 + one float32 scale per row
    back = decompress(parts)
    assert back.tensor.dtype == dtype and back.tensor.shape == t.shape
    assert back.role == TensorRole.HIDDEN_STATE and back.space == part.space and back.meta == {"layer": 3}
    rows = t.float().reshape(-1, 512)
    bound = rows.abs().amax(1, keepdim=True) / 254 + 1e-6
    err = (back.tensor.float().reshape(-1, 512) - rows).abs()
    # the quantisation bound, plus the rounding of the result back to the original dtype
    slack = rows.abs().amax(1, keepdim=True) * (2**-8 if dtype == torch.bfloat16 else 2**-10)
    assert bool((err <= bound + slack).all())


def test_int8_zero_rows_and_empty() -> None:
    t = torch.zeros(2, 8, dtype=torch.float16)
    assert torch.equal(decompress(compress(TensorPart(tensor=t), "int8")).tensor, t)
    e = torch.zeros(0, 8, dtype=torch.float16)
    assert decompress(compress(TensorPart(tensor=e), "int8")).tensor.shape == (0, 8)


def test_topk_logits_keeps_top_entries_and_mass() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 4, 1000, generator=g) * 4).to(torch.float16)
    part = TensorPart(tensor=logits, role=TensorRole.TOKEN_DISTRIBUTION)
    parts = compress(part, "topk", k=50)
    assert parts[0].tensor.dtype == torch.int32 and parts[1].tensor.dtype == torch.float16
    assert wire_bytes(parts) * 2 <= part.nbytes
    back = decompress(parts).tensor
    assert back.shape == logits.shape
    assert torch.equal(back.argmax(-1), logits.argmax(-1))  # greedy decoding is unchanged
    p, q = torch.softmax(logits.float(), -1), torch.softmax(back.float(), -1)
    tv = 0.5 * (p - q).abs().sum(-1)
    lost = 1 - torch.topk(p, 50, -1).values.sum(-1)
    # total variation to the renormalised top k is the mass outside it (plus float16 rounding)
    assert bool((tv <= lost + 2e-3).all())
    assert math.isclose(topk_mass_lost(logits, 50), float(lost.mean()), rel_tol=1e-4)


def test_topk_probabilities_fill_zero() -> None:
    probs = torch.softmax(torch.randn(3, 100), -1)
    parts = compress(TensorPart(tensor=probs), "topk", k=10)
    assert parts[0].meta["fill"] == 0.0
    back = decompress(parts).tensor
    assert (back >= 0).all() and math.isclose(
        float(back.sum(-1).mean()), 1 - topk_mass_lost(probs, 10, logits=False), rel_tol=1e-2
    )


def test_round_trip_through_the_codec_and_expand() -> None:
    t = _latent(1, 16, 256)
    env = Envelope.request("hi", *compress(TensorPart(tensor=t, role=TensorRole.HIDDEN_STATE), "int8"))
    got = decode(encode_frame(env))
    parts = expand(got.parts)
    assert len(parts) == 2 and isinstance(parts[1], TensorPart)
    assert (parts[1].tensor.float() - t.float()).abs().max() <= t.float().abs().max() / 254 + 0.01


def test_none_and_errors() -> None:
    part = TensorPart(tensor=_latent(4, 4))
    assert compress(part, "none") == [part]
    assert decompress([part]) is part
    with pytest.raises(CompressionError):
        compress(TensorPart(tensor=torch.arange(4)), "int8")
    with pytest.raises(CompressionError):
        compress(part, "zstd")
    with pytest.raises(CompressionError):
        compress(part, "topk", k=5)
    a, b = compress(part, "int8")
    with pytest.raises(CompressionError):
        decompress([a])
    with pytest.raises(CompressionError):
        decompress([b, a])
    i, v = compress(part, "topk", k=2)
    bad = TensorPart(tensor=torch.full_like(i.tensor, 99), role=i.role, meta=i.meta)
    with pytest.raises(CompressionError):
        decompress([bad, v])
