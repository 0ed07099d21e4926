"""The Transformers agent on tiny models built offline in the test (no hub, no downloads).

A two-layer Llama is trained for a few seconds on a handful of question/answer pairs so that it has
real preferences (it answers "paris" for France); a random-init GPT-2 shares its tokenizer (a
compatible latent sender of another family), and a GPT-2 on a different tokenizer is incompatible.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from aiflow_agents import BrokerURL, Client, RemoteAgentError
from aiflow_agents.agent import AgentContext
from aiflow_agents.errors import AgentError
from aiflow_agents.models import catalog
from aiflow_agents.models.hf import TransformersAgent, tokenizer_id, vocab_signature
from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, compression
from protocols import ops as O

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]

SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QA = [
    ("what is the capital of france?", "paris"),
    ("what is the capital of italy?", "rome"),
    ("what is the capital of spain?", "madrid"),
    ("what is the capital of japan?", "tokyo"),
    ("what colour is the sky?", "blue"),
    ("what colour is grass?", "green"),
]
FRANCE = QA[0][0]


def make_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _corpus() -> list[str]:
    return [f"<|user|>{q}<|end|><|assistant|>{a}<|end|>" for q, a in QA] * 4 + [q for q, _ in QA]


def _ids(tok: PreTrainedTokenizerFast, name: str) -> int:
    idx = tok.convert_tokens_to_ids(name)
    assert isinstance(idx, int)
    return idx


def _save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, folder: Path) -> Path:
    model.generation_config.eos_token_id = _ids(tok, "<|end|>")  # type: ignore[union-attr]
    model.generation_config.pad_token_id = _ids(tok, "<|pad|>")  # type: ignore[union-attr]
    model.save_pretrained(folder)  # type: ignore[operator]
    tok.save_pretrained(folder)
    return folder


def train_llama(tok: PreTrainedTokenizerFast, steps: int = 120, texts: list[str] | None = None) -> LlamaForCausalLM:
    """A few seconds of training so that the model prefers the right answers (``texts``: in this format,
    default the chat template's)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=_ids(tok, "<|bos|>"),
        eos_token_id=_ids(tok, "<|end|>"),
        pad_token_id=_ids(tok, "<|pad|>"),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    texts = texts or [f"<|user|>{q}<|end|><|assistant|>{a}<|end|>" for q, a in QA]
    batch = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def random_gpt2(tok: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=128,
        bos_token_id=_ids(tok, "<|bos|>"),
        eos_token_id=_ids(tok, "<|end|>"),
        initializer_range=0.5,  # peaky distributions, so a sender's choice is clear
    )
    return GPT2LMHeadModel(cfg)


def write_llama_gguf(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    """A float32 GGUF the way llama.cpp lays one out (its q/k rows permuted for its rotary kernel),
    so that the GGUF loading and conversion code runs offline on a tiny model."""
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [""] * len(spec["model"]["vocab"])
    for token, idx in spec["model"]["vocab"].items():
        tokens[idx] = token
    specials = {t["id"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(_ids(tok, "<|bos|>"))
    w.add_eos_token_id(_ids(tok, "<|end|>"))
    w.add_pad_token_id(_ids(tok, "<|pad|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    for key, value in model.state_dict().items():
        array = value.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            array = permute(array, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            array = permute(array, cfg.num_key_value_heads)
        w.add_tensor(names[key], array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    tok = make_tokenizer(_corpus(), vocab_size=400)
    other = make_tokenizer([*_corpus(), "completely different words for another vocabulary"], vocab_size=330)
    assert tokenizer_id(tok, "t") != tokenizer_id(other, "t")
    trained = train_llama(tok)
    return {
        "gguf": write_llama_gguf(trained, tok, root / "tiny-llama.gguf"),
        "llama": _save(trained, tok, root / "llama"),
        "gpt2": _save(random_gpt2(tok, seed=1), tok, root / "gpt2"),
        "alien": _save(random_gpt2(other, seed=2), other, root / "alien"),
    }


@pytest.fixture(scope="module")
def llama(folders: dict[str, Path]) -> TransformersAgent:
    return TransformersAgent("llama", path=str(folders["llama"]), max_new_tokens=8).load()


@pytest.fixture(scope="module")
def gpt2(folders: dict[str, Path]) -> TransformersAgent:
    return TransformersAgent("gpt2", path=str(folders["gpt2"]), max_new_tokens=8).load()


def ctx() -> AgentContext:
    return AgentContext(agent_id="t", node_id="test", client=None)  # type: ignore[arg-type]


async def ask(agent: TransformersAgent, text: str, *parts: TensorPart, **meta: object) -> Envelope:
    reply = await agent.handle(Envelope.request(text, *parts, meta=dict(meta)), ctx())
    assert isinstance(reply, Envelope)
    return reply


# -- loading, spaces, config ---------------------------------------------------------------------
def test_spaces_tokenizer_ids_and_config(llama: TransformersAgent, gpt2: TransformersAgent, folders) -> None:
    assert llama.space is not None and gpt2.space is not None
    assert llama.space.family == "llama" and gpt2.space.family == "gpt2"
    assert llama.space.hidden_size == 64 and llama.num_layers == 2
    # the same tokenizer files give the same id whatever the model; another vocabulary does not
    assert llama.space.tokenizer == gpt2.space.tokenizer
    alien = TransformersAgent("alien", path=str(folders["alien"])).load()
    assert alien.space is not None and alien.space.tokenizer != llama.space.tokenizer
    assert llama.chat  # the tokenizer has a chat template, so it is used by default
    assert llama.accepts.spaces == (llama.space,)
    with pytest.raises(ValueError, match="max_new_token"):
        TransformersAgent("x", path=str(folders["llama"]), max_new_token=3)
    with pytest.raises(ValueError, match="model=CATALOG_NAME or path"):
        TransformersAgent("x")
    with pytest.raises(ValueError, match="latent_policy"):
        TransformersAgent("x", path="p", latent_policy="maybe")
    with pytest.raises(ValueError, match="dtype"):
        TransformersAgent("x", path="p", dtype="int3")
    # an explicit dtype is honoured, and the answer survives bfloat16
    half = TransformersAgent("h", path=str(folders["llama"]), dtype="bfloat16", max_new_tokens=4).load()
    assert half.model is not None and half.model.dtype == torch.bfloat16 and half.device.type == "cpu"
    assert half.decode(FRANCE).text == "paris"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TransformersAgent("c", path=str(folders["llama"]), device="cuda").load()


def test_chat_template_prompt_ends_where_the_answer_starts(llama: TransformersAgent, folders) -> None:
    assert llama.tokenizer is not None
    before, after = llama.prompt_ids(FRANCE)
    assert after == [] and before[-1] == _ids(llama.tokenizer, "<|assistant|>")  # type: ignore[arg-type]
    assert before[0] == _ids(llama.tokenizer, "<|user|>")  # type: ignore[arg-type]
    plain = TransformersAgent("p", path=str(folders["llama"]), chat=False).load()
    assert plain.prompt_ids(FRANCE)[0] == llama.tokenizer(FRANCE).input_ids


# -- generate --------------------------------------------------------------------------------------
async def test_generate_is_deterministic_confident_and_costed(llama: TransformersAgent) -> None:
    first = await ask(llama, FRANCE)
    second = await ask(llama, FRANCE)
    assert first.text == "paris" and second.text == first.text
    assert first.meta[O.CONFIDENCE] == second.meta[O.CONFIDENCE]
    assert 0.0 < first.meta[O.CONFIDENCE] <= 1.0 and 0.0 < first.meta["min_token_prob"] <= 1.0
    assert first.meta[O.ANSWER] == "paris" and first.meta["stopped_by"] == "eos"
    cost = first.meta[O.COST]
    # every prompt token plus every generated token but the last went through both layers once
    assert cost["tokens"] == cost["prompt_tokens"] + cost["new_tokens"] - 1
    assert cost["layers"] == 2 * cost["tokens"] and cost["model_calls"] == 1
    # a question it was not trained on is answered with less confidence
    odd = await ask(llama, "zzqx vvk?")
    assert odd.meta[O.CONFIDENCE] < first.meta[O.CONFIDENCE]


async def test_sampling_is_seeded_and_answer_pattern_normalises(folders) -> None:
    agent = TransformersAgent(
        "s", path=str(folders["gpt2"]), temperature=1.0, seed=7, max_new_tokens=6, answer_pattern=r"^(\S+)"
    ).load()
    a, b = await ask(agent, FRANCE), await ask(agent, FRANCE)
    c = await ask(agent, FRANCE, seed=8)
    assert a.text == b.text and a.meta[O.CONFIDENCE] == b.meta[O.CONFIDENCE]
    assert (c.text, c.meta[O.CONFIDENCE]) != (a.text, a.meta[O.CONFIDENCE])
    assert a.meta[O.ANSWER] == a.text.split()[0]


async def test_latent_outputs_are_tagged(llama: TransformersAgent) -> None:
    reply = await ask(llama, FRANCE, **{O.RETURN: ["distribution", "hidden", "embedding"], "layers": [0, -1]})
    space = llama.space
    assert space is not None
    dist = reply.tensor(TensorRole.TOKEN_DISTRIBUTION)
    assert dist is not None and dist.space == space and dist.meta["encoding"] == "float32"
    steps = reply.meta[O.COST]["new_tokens"]
    assert dist.shape == (steps, llama.vocab_size)
    assert torch.allclose(dist.tensor.sum(-1), torch.ones(steps), atol=1e-4)
    hidden = reply.tensors(TensorRole.HIDDEN_STATE)
    assert [h.space.layer for h in hidden if h.space] == [0, 2]
    positions = reply.meta[O.COST]["tokens"]
    assert all(h.shape == (positions, 64) and h.space and h.space.hidden_size == 64 for h in hidden)
    emb = reply.tensor(TensorRole.EMBEDDING)
    assert emb is not None and emb.space is not None and emb.space.layer == 2 and emb.shape == (64,)
    assert torch.allclose(emb.tensor, hidden[1].tensor.mean(0), atol=1e-5)
    # top-k: a topk group (k values per step, their ids as an int32 part), restored by the receiver
    top_reply = await ask(llama, FRANCE, **{O.RETURN: "distribution", "top_k": 3})
    values, ids = top_reply.tensors()
    assert top_reply.tensor(TensorRole.TOKEN_DISTRIBUTION) is None  # the head is role other
    assert values.meta["encoding"] == "topk" and values.shape == (steps, 3) and ids.meta["encoding"] == "topk-indices"
    (top,) = compression.expand([values, ids])
    dense = llama.dense_distribution(top)  # type: ignore[arg-type]
    assert torch.allclose(dense.sum(-1), torch.ones(steps)) and int(dense[0].argmax()) == int(ids.tensor[0, 0])
    with pytest.raises(AgentError, match="cannot return"):
        await ask(llama, FRANCE, **{O.RETURN: ["kv"]})


# -- score and next --------------------------------------------------------------------------------
async def test_score_prefers_the_models_own_answer(llama: TransformersAgent) -> None:
    own = (await ask(llama, FRANCE)).text
    reply = await ask(llama, FRANCE, op="score", candidates=[own, "rome", "grass tokyo"])
    scores = reply.meta[O.SCORES]
    assert scores[0] > scores[1] and scores[0] > scores[2] and all(s < 0 for s in scores)
    assert reply.text == own and reply.meta[O.ANSWER] == own and 0.5 < reply.meta[O.CONFIDENCE] <= 1.0
    assert reply.meta[O.TOKEN_COUNTS][0] >= 1
    # consistency with generation: the score of the greedy answer is the sum of its chosen log-probs
    d = llama.decode(FRANCE)
    ids = llama.tokenizer(own, add_special_tokens=False).input_ids  # type: ignore[misc]
    assert d.token_ids[: len(ids)] == ids
    assert scores[0] == pytest.approx(sum(math.log(p) for p in d.chosen_probs[: len(ids)]), abs=1e-3)
    # another question changes the preference
    italy = await ask(llama, QA[1][0], op="score", candidates=["paris", "rome"])
    assert italy.meta[O.SCORES][1] > italy.meta[O.SCORES][0]
    with pytest.raises(AgentError, match="candidates"):
        await ask(llama, FRANCE, op="score")


async def test_next_is_a_tagged_distribution(llama: TransformersAgent) -> None:
    reply = await ask(llama, FRANCE, op="next")
    part = reply.tensor(TensorRole.TOKEN_DISTRIBUTION)
    assert part is not None and part.space == llama.space and part.shape == (llama.vocab_size,)
    assert float(part.tensor.sum()) == pytest.approx(1.0, abs=1e-4) and float(part.tensor.min()) >= 0
    assert reply.text == "paris"[: len(reply.text)] and reply.text  # the first piece of its answer
    assert reply.meta["top"][0][2] == pytest.approx(float(part.tensor.max()))
    # after the whole answer, the end of turn is next
    done = await ask(llama, FRANCE, op="next", prefix="paris")
    assert done.meta["top"][0][0] == "<|end|>"
    with pytest.raises(AgentError, match="unknown op"):
        await ask(llama, FRANCE, op="dance")


# -- latent inputs ---------------------------------------------------------------------------------
async def test_fusion_with_a_compatible_sender_changes_decoding(
    llama: TransformersAgent, gpt2: TransformersAgent
) -> None:
    solo = await ask(llama, FRANCE)
    sent = await ask(gpt2, FRANCE, **{O.RETURN: "distribution"})
    dist = sent.tensor(TensorRole.TOKEN_DISTRIBUTION)
    assert dist is not None and sent.text != solo.text
    # all weight on the sender: the receiver follows its tokens step by step
    follow = await ask(llama, FRANCE, dist, latent_weight=1.0)
    assert follow.text == sent.text and follow.meta["latent"]["status"] == "fused"
    assert follow.meta["latent"]["steps"] == dist.shape[0]
    # half weight: the distribution it decodes from is a different one than on its own
    mixed = await ask(llama, FRANCE, dist, latent_weight=0.5)
    assert mixed.meta["latent"] == {
        "used": 1,
        "space": str(llama.space),
        "status": "fused",
        "weight": 0.5,
        "steps": dist.shape[0],
        "senders": 1,
    }
    assert mixed.meta[O.CONFIDENCE] != solo.meta[O.CONFIDENCE]
    # top-k latents fuse too
    top_values, top_ids = (await ask(gpt2, FRANCE, **{O.RETURN: "distribution", "top_k": 4})).tensors()
    assert (await ask(llama, FRANCE, top_values, top_ids, latent_weight=1.0)).text == sent.text
    # compatibility is the vocabulary (size + hash), not the human-readable name in front of it
    assert dist.space is not None and dist.space.tokenizer is not None
    renamed = dist.model_copy(update={"space": dist.space.model_copy(update={"tokenizer": "x" + dist.space.tokenizer})})
    assert (await ask(llama, FRANCE, renamed, latent_weight=1.0)).text == sent.text
    # two senders are averaged step by step (two copies of one sender: the same as one)
    twice = await ask(llama, FRANCE, dist, dist, latent_weight=1.0)
    assert twice.text == sent.text and twice.meta["latent"]["senders"] == 2
    with pytest.raises(AgentError) as info:  # a topk head without its indices part
        await ask(llama, FRANCE, top_values)
    assert info.value.code == "bad_encoding"
    unknown = top_values.model_copy(update={"meta": {**top_values.meta, "encoding": "zstd"}})
    with pytest.raises(AgentError) as info:  # SPEC §17.4: never used, answered unsupported_encoding
        await ask(llama, FRANCE, unknown, top_ids)
    assert info.value.code == "unsupported_encoding"


async def test_soft_tokens_enter_the_prompt(llama: TransformersAgent, gpt2: TransformersAgent) -> None:
    solo = await ask(llama, FRANCE)
    dist = (await ask(gpt2, FRANCE, **{O.RETURN: "distribution"})).tensor(TensorRole.TOKEN_DISTRIBUTION)
    assert dist is not None
    soft = await ask(llama, FRANCE, dist, latent_mode="soft")
    assert soft.meta["latent"]["status"] == "soft"
    # the soft tokens (one per sender step) and the slot's newline went through the model
    extra = soft.meta[O.COST]["prompt_tokens"] - solo.meta[O.COST]["prompt_tokens"]
    assert extra >= dist.shape[0]
    emb = llama.soft_tokens(llama.dense_distribution(dist))
    assert emb.shape == (dist.shape[0], 64)
    one_hot = torch.zeros(1, llama.vocab_size)
    one_hot[0, 7] = 1.0
    assert llama.model is not None
    assert torch.allclose(llama.soft_tokens(one_hot)[0], llama.model.get_input_embeddings().weight[7])


async def test_incompatible_latent_falls_back_or_errors_by_policy(llama: TransformersAgent, folders) -> None:
    alien = TransformersAgent("alien", path=str(folders["alien"]), max_new_tokens=4).load()
    dist = (await ask(alien, FRANCE, **{O.RETURN: "distribution"})).tensor(TensorRole.TOKEN_DISTRIBUTION)
    assert dist is not None
    solo = await ask(llama, FRANCE)
    fallback = await ask(llama, FRANCE, dist, latent_weight=1.0)
    assert fallback.text == solo.text and fallback.meta[O.CONFIDENCE] == solo.meta[O.CONFIDENCE]
    note = fallback.meta["latent"]
    assert note["status"] == "fallback" and note["used"] == 0 and note["refused"] == 1
    assert str(dist.space) in note["refused_spaces"]
    # a distribution of our vocabulary size but another tokenizer id, or with no space, is refused too
    assert llama.space is not None
    same_size = torch.full((1, llama.vocab_size), 1.0 / llama.vocab_size)
    forged = FeatureSpace(family="llama", hidden_size=64, tokenizer="other-400-000000000000")
    for space in (forged, None):
        part = TensorPart(tensor=same_size, role=TensorRole.TOKEN_DISTRIBUTION, space=space)
        assert (await ask(llama, FRANCE, part, latent_weight=1.0)).meta["latent"]["status"] == "fallback"
    strict = TransformersAgent("strict", path=str(folders["llama"]), latent_policy="error").load()
    with pytest.raises(AgentError) as info:
        await ask(strict, FRANCE, dist)
    assert info.value.code == "incompatible_latent" and str(dist.space) in str(info.value)
    # with nothing to fall back to, even the lenient policy refuses
    with pytest.raises(AgentError) as info:
        await ask(llama, "", dist)
    assert info.value.code == "incompatible_latent"
    # a hidden state of our own space is not consumed, and that is said
    own_hidden = TensorPart(tensor=torch.zeros(3, 64), role=TensorRole.HIDDEN_STATE, space=llama.space)
    note = (await ask(llama, FRANCE, own_hidden)).meta["latent"]
    assert note["status"] == "ignored" and note["ignored"]


# -- over the bus ----------------------------------------------------------------------------------
async def test_agent_in_a_node_process(embedded: BrokerURL, namespace: str, spawn, folders, llama) -> None:
    spec = f"hf:tiny?path={folders['llama']}&max_new_tokens=8&latent_policy=error&threads=1"
    spawn([spec], embedded, namespace)
    async with Client(embedded, namespace=namespace) as c:
        await c.wait_for_agents(["tiny"], timeout=90)
        record = c.presence.record("tiny")
        assert record is not None and record.agent_type == "hf"
        assert record.accepts["spaces"] == [str(llama.space)]
        reply = await c.request(
            "tiny", Envelope.request(FRANCE, meta={O.RETURN: ["distribution", "embedding"]}), timeout=60
        )
        local = await ask(llama, FRANCE)
        assert reply.text == "paris" == local.text
        assert reply.meta[O.CONFIDENCE] == pytest.approx(local.meta[O.CONFIDENCE], rel=1e-5)
        dist = reply.tensor(TensorRole.TOKEN_DISTRIBUTION)
        assert dist is not None and dist.space == llama.space
        scored = await c.request(
            "tiny", Envelope.request(FRANCE, meta={O.OP: "score", O.CANDIDATES: ["rome", "paris"]}), timeout=60
        )
        assert scored.text == "paris" and scored.meta[O.SCORES][1] > scored.meta[O.SCORES][0]
        foreign = TensorPart(
            tensor=torch.ones(1, 5) / 5, role=TensorRole.TOKEN_DISTRIBUTION, space=FeatureSpace(family="x")
        )
        with pytest.raises(RemoteAgentError) as info:
            await c.request("tiny", Envelope.request(FRANCE, foreign), timeout=60)
        assert info.value.code == "incompatible_latent"


# -- GGUF files and the catalog (offline: a tiny GGUF written by the test stands in for a package) ---
async def test_gguf_file_and_its_conversion_answer_alike(folders, llama: TransformersAgent, tmp_path: Path) -> None:
    direct = TransformersAgent("g", path=str(folders["gguf"]), max_new_tokens=8).load()
    assert direct.chat and direct.space is not None and direct.space.model == "tiny-llama"
    out = catalog.convert_gguf(folders["gguf"], tmp_path / "converted", extra={"family": "tiny", "name": "t"})
    assert (out / "model.safetensors").is_file() and not (tmp_path / "converted.partial").exists()
    marker = catalog.read_marker(out)
    assert marker is not None and marker["family"] == "tiny" and marker["source"] == str(folders["gguf"])
    converted = TransformersAgent("c", path=str(out), max_new_tokens=8).load()
    # the folder's marker names the family, and the vocabulary is the GGUF's, id for id
    assert converted.space is not None and converted.space.family == "tiny" and converted.space.model == "t"
    assert direct.space.tokenizer and converted.space.tokenizer
    assert vocab_signature(direct.space.tokenizer) == vocab_signature(converted.space.tokenizer)
    a, b, ref = await ask(direct, FRANCE), await ask(converted, FRANCE), await ask(llama, FRANCE)
    assert a.text == b.text == ref.text == "paris"
    assert a.meta[O.CONFIDENCE] == pytest.approx(b.meta[O.CONFIDENCE], rel=1e-5)
    assert a.meta[O.CONFIDENCE] == pytest.approx(ref.meta[O.CONFIDENCE], rel=1e-4)


def test_catalog_fetch_converts_once_and_lists(folders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))
    assert catalog.cache_root() == tmp_path / "cache"
    assert catalog.get("smol").name == "smollm2-135m" and catalog.get("Gemma3").name == "gemma3-270m"
    with pytest.raises(
        catalog.CatalogError,
        match=re.escape("available: gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m"),
    ):
        catalog.get("gpt-5")
    entry = catalog.CatalogEntry(
        name="tiny-test",
        family="tiny",
        title="a GGUF written by the test",
        packages=(),
        locate=lambda root, work: folders["gguf"],
        chat=True,
    )
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    runner = CliRunner()
    listed = runner.invoke(catalog.models_app, ["list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and listed.output.count("not fetched") == len(catalog.CATALOG)
    assert runner.invoke(catalog.models_app, ["path", "tiny-test"]).exit_code == 1
    entry.pkg_dir.mkdir(parents=True)  # "installed": no pip run for a package-less entry

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(catalog.subprocess, "run", no_pip)
    fetched = runner.invoke(catalog.models_app, ["fetch", "tiny-test"])
    assert fetched.exit_code == 0, fetched.output
    assert "ready at" in fetched.output and entry.is_converted()
    assert runner.invoke(catalog.models_app, ["fetch", "tiny-test"]).output.count("already cached") == 1
    path = runner.invoke(catalog.models_app, ["path", "tiny-test"])
    assert path.exit_code == 0 and path.output.strip() == str(entry.model_dir)
    listed = runner.invoke(catalog.models_app, ["list"], env={"COLUMNS": "200"})
    assert "ready" in listed.output and listed.output.count("not fetched") == len(catalog.CATALOG) - 1
    agent = TransformersAgent("cat", model="tiny-test", max_new_tokens=8).load()
    assert agent.space is not None and agent.space.family == "tiny" and agent.space.model == "tiny-test"
    assert agent.space.tokenizer is not None and agent.space.tokenizer.startswith("tiny-")
    assert agent.decode(FRANCE).text == "paris"
    # a conversion from an older layout is stale: fetched again
    marker = entry.model_dir / catalog.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 0}))
    assert not entry.is_converted() and catalog.status(entry) == "downloaded (not converted)"
    assert catalog.fetch("tiny-test") == entry.model_dir and entry.is_converted()
    assert runner.invoke(catalog.models_app, ["remove", "tiny-test"]).exit_code == 0
    assert not entry.model_dir.exists()
    # the real entries would need pip; with it failing, the error says what failed
    monkeypatch.setattr(
        catalog.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution found"),
    )
    with pytest.raises(catalog.CatalogError, match="No matching distribution"):
        catalog.install_packages(catalog.get("smollm2-135m"))
    # and an agent told not to fetch says how to (the cache here is empty)
    with pytest.raises(AgentError, match="aiflow models fetch smollm2-135m"):
        TransformersAgent("nofetch", model="smollm2-135m", fetch=False).load()


# -- multiple choice: one batched pass per item, a prompt that shows peers, sampling honoured -----
async def test_batched_option_scores_equal_one_forward_per_option(llama: TransformersAgent, gpt2) -> None:
    for agent in (llama, gpt2):
        prefix, options = agent.mc_ids(FRANCE, ["paris", "rome", "grass tokyo", "the capital is paris"], {})
        agent._scores.clear()
        batched = agent.option_logprobs(prefix, options)
        assert agent._last_passes == 2  # the prefix once, then every option together
        naive = agent.option_logprobs(prefix, options)  # cached: no forward at all
        assert agent._last_passes == 0 and naive == batched
        agent._scores.clear()
        reference = agent.option_logprobs(prefix, options, batched=False)
        assert agent._last_passes == len(options)
        assert [len(x) for x in batched] == [len(o) for o in options]
        for b, r in zip(batched, reference, strict=True):
            assert b == pytest.approx(r, abs=2e-4)
    # options of one token need no second pass
    llama._scores.clear()
    prefix, options = llama.mc_ids(FRANCE, ["paris", "rome"], {})
    if all(len(o) == 1 for o in options):
        llama.option_logprobs(prefix, options)
        assert llama._last_passes == 1


async def test_choose_picks_an_option_and_reports_its_distribution(llama: TransformersAgent) -> None:
    opts = ["grass tokyo", "paris", "rome"]
    reply = await ask(llama, FRANCE, op="choose", candidates=opts)
    O.check_reply(O.Op.CHOOSE, reply.meta)
    probs, scores = reply.meta[O.PROBS], reply.meta[O.SCORES]
    assert len(probs) == len(scores) == 3 and sum(probs) == pytest.approx(1.0)
    best = max(range(3), key=lambda i: scores[i])
    assert reply.meta[O.CHOICE] == best and reply.text == opts[best] == reply.meta[O.ANSWER]
    assert reply.meta[O.CONFIDENCE] == pytest.approx(probs[best])
    # score with mc=true agrees with choose (same prompt, same length normalisation), and is cached
    s = await ask(llama, FRANCE, op="score", mc=True, candidates=[opts[2], opts[0]])
    assert s.meta[O.SCORES] == pytest.approx([scores[2], scores[0]])
    assert s.meta[O.COST]["cached"] is True
    # peers and a listed option order change the prompt, so the scores
    shown = await ask(llama, FRANCE, op="choose", candidates=opts, peers=[{"agent": "b", "answer": "rome"}])
    listed = await ask(llama, FRANCE, op="choose", candidates=opts, options_order=[2, 0, 1])
    assert shown.meta[O.SCORES] != scores and listed.meta[O.SCORES] != scores
    peers = [{"agent": "b", "answer": "rome", O.CONFIDENCE: 0.5}, {"agent": "llama", "answer": "paris"}]
    p_shown, _ = llama.mc_ids(FRANCE, opts, {O.PEERS: peers})
    shown_text = llama.tokenizer.decode(p_shown)  # type: ignore[union-attr]
    assert 'Other answers: "rome" (50% sure).' in shown_text  # the others, not the agent itself ...
    assert 'Your previous answer: "paris".' in shown_text  # ... whose own answer is shown as its own
    with pytest.raises(AgentError, match="options_order"):
        await ask(llama, FRANCE, op="choose", candidates=opts, options_order=[0, 0, 1])
    with pytest.raises(AgentError, match="at least two"):
        await ask(llama, FRANCE, op="choose", candidates=["paris"])


async def test_the_score_cache_can_be_off_and_never_drops_what_it_returns(folders) -> None:
    off = TransformersAgent("nocache", path=str(folders["llama"]), score_cache=0).load()
    opts = ["paris", "rome", "madrid"]
    first = await ask(off, FRANCE, op="choose", candidates=opts)
    again = await ask(off, FRANCE, op="choose", candidates=opts)
    assert first.meta[O.SCORES] == again.meta[O.SCORES] and again.meta[O.COST]["cached"] is False
    tiny = TransformersAgent("tiny-cache", path=str(folders["llama"]), score_cache=2).load()
    prefix, ids = tiny.mc_ids(FRANCE, opts, {})
    tiny.option_logprobs(prefix, ids[:2])  # fills the cache
    mixed = tiny.option_logprobs(prefix, ids)  # two hits and a miss that evicts the oldest entry
    assert len(tiny._scores) == 2 and len(mixed) == 3 and all(mixed)


async def test_choose_samples_with_temperature_reproducibly(llama: TransformersAgent) -> None:
    opts = ["paris", "rome", "grass tokyo", "blue"]
    greedy = await ask(llama, FRANCE, op="choose", candidates=opts)
    picks = [
        (await ask(llama, FRANCE, op="choose", candidates=opts, temperature=5.0, seed=s)).meta[O.CHOICE]
        for s in range(12)
    ]
    again = [
        (await ask(llama, FRANCE, op="choose", candidates=opts, temperature=5.0, seed=s)).meta[O.CHOICE]
        for s in range(12)
    ]
    assert picks == again  # seeded
    assert len(set(picks)) > 1  # a hot temperature really samples
    zero = [
        (await ask(llama, FRANCE, op="choose", candidates=opts, temperature=0, seed=s)).meta[O.CHOICE] for s in range(3)
    ]
    assert set(zero) == {greedy.meta[O.CHOICE]}
