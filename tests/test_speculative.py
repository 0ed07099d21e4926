"""Split execution and cross-tier speculative decoding with small offline models.

The relay is exact: layers ``[0, k)`` on one side and ``[k, L)`` on the other give the logits a
local run gives, bit for bit, with KV caches and crops. Speculative decoding over node processes
and a real broker gives the verifier's own greedy tokens, whether drafts are all accepted, mostly
rejected, or continued from shipped hidden states.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_hf_agent import _corpus, _save, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from aiflow_agents import BrokerURL
from aiflow_agents.errors import AgentError
from aiflow_agents.models.exits import ExitSet, FamilialLM, LayerStack, SplitError, crop_cache
from aiflow_agents.models.hf import TransformersAgent
from protocols import Envelope, TensorPart, TensorRole, ops
from topologies import TopologyManager, speculative

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]

LAYERS = 4


def _model(kind: str, vocab: int, seed: int, quiet_top: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.eval()
    if quiet_top:  # the last layer barely changes the residual stream: an exit below it drafts well
        with torch.no_grad():
            for p in (model.model.layers[-1].self_attn.o_proj.weight, model.model.layers[-1].mlp.down_proj.weight):
                p.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(_corpus(), 96)


@pytest.fixture(scope="module")
def folders(tok, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for name, seed, quiet in (("verifier", 1, True), ("other", 2, False)):
        model = _model("llama", len(tok), seed, quiet)
        out[name] = str(_save(model, tok, root / name))
        if name == "verifier":
            out["exits"] = str(ExitSet.fresh(model, "verifier", [LAYERS - 1]).save(root / "exits.safetensors"))
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_split_stacks_equal_the_whole_model_with_caches_and_crops(kind: str) -> None:
    model = _model(kind, 97, 0)
    fam = FamilialLM(model, None)
    ids = torch.randint(3, 97, (1, 9))
    whole = model(input_ids=ids, use_cache=True)
    h, lower_cache = fam.lower(2)(ids)
    f, upper_cache = fam.upper(2)(h)
    assert torch.equal(whole.logits, fam.final_logits(f))
    cache = whole.past_key_values
    for step in ([5, 6, 7], [8], [9, 10]):  # a draft of three, one rejected position, two more
        x = torch.tensor([step])
        ref = model(input_ids=x, cache=cache, use_cache=True)
        cache = ref.past_key_values
        h, lower_cache = fam.lower(2)(x, lower_cache)
        f, upper_cache = fam.upper(2)(h, upper_cache)
        assert torch.equal(ref.logits, fam.final_logits(f))
        if len(step) == 3:  # reject the last two positions everywhere
            for c in (cache, lower_cache, upper_cache):
                crop_cache(c, 10)
            assert cache.get_seq_length() == lower_cache.get_seq_length() == upper_cache.get_seq_length() == 10


def test_an_untrained_exit_is_the_final_norm_and_round_trips(tmp_path: Path) -> None:
    model = _model("llama", 50, 0)
    exits = ExitSet.fresh(model, "m", [1, 3])
    h = torch.randn(5, 64)
    assert torch.allclose(exits.head(3)(h), model.model.norm(h), atol=1e-6)
    with torch.no_grad():
        exits.head(1).adapter.weight.normal_()
    again = ExitSet.load(exits.save(tmp_path / "e.safetensors"))
    assert again.layers == (1, 3) and again.model == "m"
    assert torch.allclose(again.head(1)(h), exits.head(1)(h).half().float(), atol=2e-2)
    with pytest.raises(SplitError):
        again.head(2)
    with pytest.raises(SplitError):
        LayerStack(model, 3, 9)


def _local_greedy(folder: str, prompt: str, n: int) -> list[int]:
    agent = TransformersAgent("local", path=folder, max_new_tokens=n)
    return agent.decode(prompt, max_new_tokens=n).token_ids


PROMPTS = ["what is the capital of france?", "what colour is grass?"]


@pytest.mark.parametrize(
    ("drafter", "ship_hidden", "encoding"),
    [
        ("other", False, "float16"),  # a different model: drafts mostly rejected
        ("verifier", False, "float16"),  # the same model: every draft accepted
        ("exit", True, "float32"),  # familial: exit below the last layer, hidden states shipped
    ],
)
async def test_speculative_output_equals_the_verifier_alone(
    drafter: str,
    ship_hidden: bool,
    encoding: str,
    folders: dict[str, str],
    mosquitto: BrokerURL,
    namespace: str,
    spawn,
) -> None:
    if drafter == "exit":
        dspec = f"hf:d?path={folders['verifier']}&exit_layer={LAYERS - 1}&exits={folders['exits']}"
    else:
        dspec = f"hf:d?path={folders[drafter]}"
    spawn([dspec], mosquitto, namespace)
    spawn([f"hf:v?path={folders['verifier']}"], mosquitto, namespace)
    n = 12
    async with TopologyManager(mosquitto, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["d", "v"], timeout=60)
        for prompt in PROMPTS:
            seen: list[int] = []
            pattern = speculative(
                "d",
                "v",
                gamma=3,
                max_new_tokens=n,
                ship_hidden=ship_hidden,
                encoding=encoding,
                on_tokens=lambda _text, ids, seen=seen: seen.extend(ids),
            )
            res = await mgr.run(pattern, prompt, timeout=120)
            out = res.outcome
            assert out.error is None, out.error
            want = _local_greedy(folders["verifier"], prompt, n)
            assert out.details["token_ids"] == want
            assert seen == want  # streamed as accepted, nothing lost or repeated
            if drafter == "verifier":
                assert out.details["acceptance"] == 1.0 and out.details["tokens_per_round"] > 1
            if ship_hidden:
                per = out.details["per_round"]
                # the verifier ran only the layer above the exit on every position
                assert all(r["verifier_cost"]["layers"] == r["verifier_cost"]["tokens"] for r in per)
                assert any(r["accepted"] > 0 for r in per)


async def test_int8_hidden_states_travel_and_report(
    folders: dict[str, str], mosquitto: BrokerURL, namespace: str, spawn
) -> None:
    spawn([f"hf:d?path={folders['verifier']}&exit_layer={LAYERS - 1}&exits={folders['exits']}"], mosquitto, namespace)
    spawn([f"hf:v?path={folders['verifier']}"], mosquitto, namespace)
    async with TopologyManager(mosquitto, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["d", "v"], timeout=60)
        pattern = speculative("d", "v", gamma=2, max_new_tokens=6, ship_hidden=True, encoding="int8-rowwise")
        res = await mgr.run(pattern, PROMPTS[0], timeout=120)
        assert res.outcome.error is None and res.outcome.details["tokens"] >= 1
        # a verifier never mistakes a foreign latent for its own: wrong width is a typed error
        bad = TensorPart(tensor=torch.zeros(2, 32), role=TensorRole.HIDDEN_STATE, space=None)
        env = Envelope.request(
            "", bad, meta={ops.OP: "verify_tokens", ops.SESSION: "s", ops.TOKENS: [1, 2], ops.DRAFT_TOKENS: 1}
        )
        ex = await mgr.client.exchange("v", env, timeout=30)
        assert ex.error is not None and ex.error.code in ("bad_request", "unsupported_input", "incompatible_latent")
        assert (await mgr.client.request("v", "still there?", timeout=30)).text is not None


def test_sessions_are_bounded_and_resumed_only_from_what_they_hold(folders: dict[str, str]) -> None:
    agent = TransformersAgent("v", path=folders["verifier"], sessions=1)
    spec = agent.speculator()

    def verify(session: str, start: int, tokens: list[int], draft: int) -> Envelope:
        meta = {
            ops.OP: "verify_tokens",
            ops.SESSION: session,
            ops.START: start,
            ops.TOKENS: tokens,
            ops.DRAFT_TOKENS: draft,
        }
        return spec.verify(Envelope.request("", meta=meta), "v")

    first = verify("a", 0, [5, 6, 7], 0)
    assert first.meta[ops.PROCESSED] == 3 and first.meta[ops.NEXT_TOKEN] is not None
    nxt = int(first.meta[ops.NEXT_TOKEN])
    again = verify("a", 3, [nxt], 0)
    assert again.meta[ops.PROCESSED] == 4
    with pytest.raises(AgentError) as e:
        verify("a", 9, [1], 0)  # relies on positions it never held
    assert e.value.code == "unknown_session"
    verify("b", 0, [5], 0)  # evicts "a" (one session kept)
    with pytest.raises(AgentError) as e:
        verify("a", 4, [1], 0)
    assert e.value.code == "unknown_session"


@pytest.mark.parametrize(("encoding", "exact"), [("float32", True), ("int8-rowwise", False)])
async def test_the_relay_answers_from_the_exit_or_continues_in_the_cloud(
    encoding: str, exact: bool, folders: dict[str, str], mosquitto: BrokerURL, namespace: str, spawn
) -> None:
    """A cascade on a multiple-choice item: the device scores the options from its exit; below the
    threshold its node forwards the layer-3 states of every option, and the cloud runs only layer 4."""
    from topologies import cascade

    dev = f"hf:dev?path={folders['verifier']}&exit_layer={LAYERS - 1}&exits={folders['exits']}"
    spawn([dev], mosquitto, namespace)
    spawn([f"hf:cloud?path={folders['verifier']}"], mosquitto, namespace)
    item = {ops.OP: "choose", ops.CANDIDATES: ["paris", "rome", "blue"], "encoding": encoding}
    async with TopologyManager(mosquitto, namespace=namespace) as mgr:
        await mgr.client.wait_for_agents(["dev", "cloud"], timeout=60)
        direct = await mgr.client.request("cloud", Envelope.request(PROMPTS[0], meta=item), timeout=60)
        kept = await mgr.run(
            cascade(["dev", "cloud"], accept="confidence>=0.0"), Envelope.request(PROMPTS[0], meta=item)
        )
        assert kept.answered_by == "dev" and kept.outcome.error is None
        relayed = await mgr.run(
            cascade(["dev", "cloud"], accept="confidence>=1.0"), Envelope.request(PROMPTS[0], meta=item)
        )
        assert relayed.answered_by == "cloud", relayed.outcome.error
        reply = relayed.outcome.reply
        assert reply is not None and reply.meta["relayed_from_layer"] == LAYERS - 1
        assert reply.meta[ops.COST]["layers"] == reply.meta[ops.COST]["tokens"]  # one layer per position
        got, want = reply.meta[ops.SCORES], direct.meta[ops.SCORES]
        tol = 1e-4 if exact else 5e-2
        assert got == pytest.approx(want, abs=tol)
