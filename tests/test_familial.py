"""The familial model family: task generator, early-exit model, relay equivalence, wire encodings,
persistence, the agents' ops in-process, and the shipped weights' per-exit accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aiflow_agents.errors import AgentError
from aiflow_agents.models import tasks as T
from aiflow_agents.models.familial import (
    FamilialConfig,
    FamilialModel,
    latent_nbytes,
    load_model,
    load_shipped,
    relay,
    save_model,
)
from aiflow_agents.models.familial_agents import FamilialAgent, pack_latent, unpack_latent
from aiflow_agents.models.training import evaluate
from protocols import Envelope, FeatureSpace, Kind, TensorRole, decode, encode
from protocols import ops as O

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy machine


@pytest.fixture(scope="module")
def tiny() -> FamilialModel:
    torch.manual_seed(0)
    return FamilialModel(FamilialConfig(name="tiny", d_model=32, n_heads=2, n_layers=3, exits=(1, 2, 3))).eval()


# -- tasks ---------------------------------------------------------------------------------
def test_generator_is_deterministic_and_answers_are_right() -> None:
    a = T.generate_tasks(200, seed=5)
    assert a == T.generate_tasks(200, seed=5)
    assert a != T.generate_tasks(200, seed=6)
    for t in a:
        py = eval(_plain(t.prompt))  # python's own precedence rules as the reference
        assert int(t.answer) == py >= 0 and T.evaluate(t.prompt) == py
        assert len(T.model_input(t.prompt)) == T.PROMPT_WIDTH + 1
        assert T.answer_from_target(T.model_target(t.answer)) == t.answer
        assert T.check_answer(t, t.answer) and T.check_answer(t, " 000" + t.answer)
        assert not T.check_answer(t, str(int(t.answer) + 1))


def _plain(prompt: str) -> str:
    """The expression without zero padding (python rejects literals like 007)."""
    return "".join(str(int(n)) if n.isdigit() else n for n in _split(prompt))


def _split(expr: str) -> list[str]:
    out, cur = [], ""
    for c in expr:
        if c.isdigit():
            cur += c
        else:
            out += [cur, c]
            cur = ""
    return [*out, cur]


def test_difficulty_levels_and_bands() -> None:
    levels = sorted(T.BANDS)
    assert len(levels) >= 3
    mixed = T.generate_tasks(10 * len(levels), seed=1)
    assert {t.difficulty for t in mixed} == set(levels)
    for lv in levels:
        band = T.BANDS[lv]
        items = T.generate_tasks(50, seed=2, difficulty=lv)
        assert {t.difficulty for t in items} == {lv} and {t.band for t in items} == {band.name}
        for t in items:
            nums = [n for n in _split(t.prompt) if n.isdigit()]
            assert [len(n) for n in nums] == list(band.digits)  # zero-padded to the band's widths
            assert T.band_of(t.prompt) == band
    with pytest.raises(ValueError, match="unknown difficulty"):
        T.generate_tasks(3, seed=0, difficulty=99)


def test_heldout_split_never_overlaps_training() -> None:
    train = {t.prompt for t in T.generate_tasks(3000, seed=0, split="train")}
    held = {t.prompt for t in T.generate_tasks(500, seed=0, split="heldout")}
    assert not train & held
    assert all(T.in_split(p, "heldout") for p in held)


def test_prompt_forms_are_canonicalised() -> None:
    t = T.generate_tasks(1, seed=3, difficulty=max(T.BANDS))[0]
    plain = _plain(t.prompt)
    assert T.canonical_prompt(plain) == t.prompt
    assert T.canonical_prompt(f" {plain} =") == t.prompt
    assert T.make_task(plain) == t
    assert T.canonical_prompt(T.extract_expression(f"What is {plain}? Answer with a number.")) == t.prompt
    with pytest.raises(ValueError):
        T.extract_expression("no maths here")
    assert T.normalize_answer("no number") == "no number"
    with pytest.raises(ValueError):
        T.evaluate("2+x")


# -- model ---------------------------------------------------------------------------------
def test_continue_from_equals_the_deep_exit_on_one_machine(tiny: FamilialModel) -> None:
    prompts = [t.prompt for t in T.generate_tasks(40, seed=9)]
    ids = tiny.encode_prompts(prompts)
    full = tiny(ids)
    with torch.no_grad():
        for k_exit in range(tiny.n_exits):
            for target in range(k_exit, tiny.n_exits):
                k = tiny.depth(k_exit)
                h_k = tiny.hidden_at(ids, k)
                logits, h_t = tiny.continue_from(h_k, k, target)
                torch.testing.assert_close(logits, full[target], rtol=0, atol=1e-5)
                torch.testing.assert_close(h_t, tiny.hidden_at(ids, tiny.depth(target)), rtol=0, atol=1e-5)
        deep = tiny.generate(prompts, -1)
        out = relay(tiny, prompts, [2.0, 2.0], "float32")  # never confident: every item goes to the cloud
        assert out.answers == deep.answers and set(out.answered_by) == {2}
        with pytest.raises(ValueError, match="deeper"):
            tiny.continue_from(tiny.hidden_at(ids, 3), 3, 0)


def test_confidence_policy_decides_which_exit_answers(tiny: FamilialModel) -> None:
    prompts = [t.prompt for t in T.generate_tasks(30, seed=4)]
    assert set(relay(tiny, prompts, [0.0, 0.0]).answered_by) == {0}
    out = relay(tiny, prompts, [0.0, 0.0])
    assert out.latent_bytes == [[]] * 30 and out.answers == tiny.generate(prompts, 0).answers
    conf0 = tiny.generate(prompts, 0).confidence
    mid = float(conf0.median())
    out = relay(tiny, prompts, [mid, 2.0])
    for i, c in enumerate(conf0.tolist()):
        assert out.answered_by[i] == (0 if c >= mid else 2)
        assert len(out.latent_bytes[i]) == (0 if c >= mid else 2)


def test_latent_bytes_per_encoding() -> None:
    x = torch.randn(2, 23, 64)
    assert latent_nbytes(x[:1], "int8-rowwise") == 23 * 64 + 23 * 4
    assert latent_nbytes(x[:1], "float16") == 23 * 64 * 2
    with pytest.raises(ValueError, match="unknown encoding"):
        latent_nbytes(x, "int4")


def test_save_load_roundtrip(tiny: FamilialModel, tmp_path: Path) -> None:
    path = save_model(tiny, tmp_path / "tiny.safetensors")
    back = load_model(path)
    assert back.cfg == tiny.cfg
    ref = FamilialModel(tiny.cfg)
    ref.load_state_dict({k: v.half().float() for k, v in tiny.state_dict().items()})  # the weights ship as fp16
    prompts = [t.prompt for t in T.generate_tasks(20, seed=2)]
    ids = tiny.encode_prompts(prompts)
    with torch.no_grad():
        for a, b in zip(back(ids), ref.eval()(ids), strict=True):
            assert torch.equal(a, b)


def test_score_and_next_distribution(tiny: FamilialModel) -> None:
    p = T.generate_tasks(1, seed=8)[0].prompt
    dec = tiny.generate([p], 1)
    scores = tiny.score(p, [dec.answers[0], "123", "-5", "x"], 1)
    assert scores[0] == max(scores[:2]) and scores[2] == scores[3] == float("-inf")
    dist = tiny.next_distribution(p, "", 1)
    assert dist.shape == (tiny.tok.vocab_size,) and abs(float(dist.sum()) - 1) < 1e-5
    assert tiny.tok.alphabet[int(dist.argmax())] == dec.targets[0][0]
    with pytest.raises(ValueError):
        tiny.next_distribution(p, "1234567", 1)


# -- shipped weights -----------------------------------------------------------------------
def test_shipped_exits_get_more_accurate_with_depth() -> None:
    """Fresh seed (neither train, tune nor held-out): deeper exits must be measurably better."""
    model = load_shipped("familial")
    assert model.cfg.exit_names == ("device", "edge", "cloud")
    items = T.generate_tasks(1000, seed=31337)  # one batched pass per 500 items: well under a second
    res = evaluate(model, items)
    acc = [res["exits"][n]["accuracy"] for n in model.cfg.exit_names]
    assert acc[0] + 0.10 < acc[1] < acc[2], acc
    # paired: items only the cloud gets right outnumber items only the edge gets right
    edge, cloud = res["correct"][1], res["correct"][2]
    gained = sum(c and not e for e, c in zip(edge, cloud, strict=True))
    lost = sum(e and not c for e, c in zip(edge, cloud, strict=True))
    assert gained > 1.5 * lost, (gained, lost)
    assert 0.2 < acc[0] and acc[2] < 0.95, acc  # neither trivial nor hopeless
    for lv in (1, 2, 4):  # the multi-digit additions are where depth pays
        by = [res["exits"][n]["by_level"][lv] for n in model.cfg.exit_names]
        assert by[0] < by[1] <= by[2] + 0.02, (lv, by)
    for name in ("peer-a", "peer-b"):
        peer = load_shipped(name)
        assert peer.cfg.family != model.cfg.family and peer.cfg.tokenizer == model.cfg.tokenizer
        p_acc = evaluate(peer, items)["exits"][peer.cfg.exit_names[-1]]["accuracy"]
        assert p_acc > acc[0], (name, p_acc)


def test_shipped_weights_fit_the_size_budget() -> None:
    from aiflow_agents.models.familial import WEIGHTS_DIR

    files = list(WEIGHTS_DIR.glob("*.safetensors"))
    assert len(files) >= 3 and sum(f.stat().st_size for f in files) <= 20 * 2**20
    assert (WEIGHTS_DIR / "MODEL_CARD.md").exists() and (WEIGHTS_DIR / "metrics.json").exists()


# -- agents, in-process (the bus versions are in test_familial_relay.py) -------------------
class _Bus:
    """A stand-in for AgentContext: routes ctx.request to in-process agents through the codec."""

    def __init__(self, agents: dict[str, FamilialAgent]) -> None:
        self.agents = agents
        self.agent_id, self.node_id, self.deadline = "test", "test-node", None

    async def request(self, agent_id: str, message: Envelope | str, timeout: float | None = None) -> Envelope:
        env = decode(encode(message if isinstance(message, Envelope) else Envelope.request(message)))
        out = await self.agents[agent_id].handle(env, self)  # type: ignore[arg-type]
        assert isinstance(out, Envelope)
        return decode(encode(out))


def _chain(**kw: Any) -> tuple[dict[str, FamilialAgent], _Bus]:
    agents = {
        "dev": FamilialAgent("dev", exit="device", next="edg", **kw),
        "edg": FamilialAgent("edg", exit="edge", next="cld", **kw),
        "cld": FamilialAgent("cld", exit="cloud"),
    }
    return agents, _Bus(agents)


async def test_agents_relay_in_process_and_implement_ops() -> None:
    agents, bus = _chain()
    model = agents["dev"].model
    items = T.generate_tasks(12, seed=77)
    deep = model.generate([t.prompt for t in items], "cloud")
    for t, ans in zip(items, deep.answers, strict=True):
        r = await agents["dev"].handle(Envelope.request(t.prompt, meta={"threshold": 2.0}), bus)  # type: ignore[arg-type]
        assert r.meta[O.ANSWER] == ans == r.text and r.meta["answered_by"] == "cld"
        assert r.meta["bytes_per_hop"] == [model.cfg.seq_len * model.cfg.d_model * 2] * 2
        assert r.meta[O.COST]["depth"] == model.depth("cloud")  # the trunk ran once, never recomputed
        assert [h["from_layer"] for h in r.meta["hops"]] == [0, *model.cfg.exits[:-1]]
        r0 = await agents["dev"].handle(Envelope.request(t.prompt, meta={"threshold": 0.0}), bus)  # type: ignore[arg-type]
        assert r0.meta["answered_by"] == "dev" and 0 <= r0.meta[O.CONFIDENCE] <= 1 and r0.meta["bytes_per_hop"] == []
    t = items[0]
    sc = await agents["cld"].handle(
        Envelope.request(t.prompt, meta={O.OP: "score", O.CANDIDATES: [t.answer, "0", "abc"]}),
        bus,  # type: ignore[arg-type]
    )
    assert len(sc.meta[O.SCORES]) == 3 and sc.meta[O.SCORES][2] <= -1e29
    nx = await agents["edg"].handle(Envelope.request(t.prompt, meta={O.OP: "next", O.PREFIX: ""}), bus)  # type: ignore[arg-type]
    part = nx.tensor(TensorRole.TOKEN_DISTRIBUTION)
    assert part is not None and part.space is not None and part.space.tokenizer == model.cfg.tokenizer
    assert abs(float(part.tensor.sum()) - 1) < 1e-5
    with pytest.raises(AgentError):
        await agents["dev"].handle(Envelope.request(t.prompt, meta={O.OP: "score"}), bus)  # type: ignore[arg-type]


async def test_int8_latent_parts_and_foreign_latents() -> None:
    agents, bus = _chain(encoding="int8-rowwise")
    model = agents["dev"].model
    t = T.generate_tasks(1, seed=5)[0]
    r = await agents["dev"].handle(Envelope.request(t.prompt, meta={"threshold": 2.0}), bus)  # type: ignore[arg-type]
    assert r.meta["bytes_per_hop"] == [model.cfg.seq_len * (model.cfg.d_model + 4)] * 2
    h = model.hidden_at(model.encode_prompts([t.prompt]), model.depth("device"))
    parts = pack_latent(h, agents["dev"].space, "int8-rowwise")
    # quantised values are never mistakable for a hidden state: the head is role other
    assert [p.role for p in parts] == [TensorRole.OTHER, TensorRole.OTHER]
    assert parts[0].meta["encoding"] == "int8-rowwise" and parts[1].meta["encoding"] == "int8-rowwise-scales"
    assert parts[0].meta["role"] == "hidden_state"
    env = decode(encode(Envelope.request(t.prompt, *parts)))
    got = unpack_latent(env, model)
    assert got is not None and got[1] == model.depth("device")
    assert (got[0] - h).abs().max() <= h.abs().amax(-1).max() / 254 + 1e-6
    # a latent of another model of the family's shape is refused, not misused
    alien = FeatureSpace(
        family=model.cfg.family, model="other", layer=2, hidden_size=model.cfg.d_model, tokenizer=model.cfg.tokenizer
    )
    env = Envelope.request(t.prompt, *pack_latent(h, alien))
    with pytest.raises(AgentError, match="different trunk"):
        await agents["edg"].handle(env, bus)  # type: ignore[arg-type]
    # ... while the same hidden state under the device's own feature space is taken up and answered
    own = await agents["edg"].handle(Envelope.request(t.prompt, *pack_latent(h, agents["dev"].space)), bus)  # type: ignore[arg-type]
    assert own.kind == Kind.REPLY and own.error is None and own.text


async def test_temperature_samples_seeded_and_zero_stays_greedy() -> None:
    """A self-ensemble of one member is a baseline only if asking again can answer differently."""
    agent = FamilialAgent("cld", exit="cloud")
    bus = _Bus({"cld": agent})
    items = T.generate_tasks(8, seed=78)
    greedy = agent.model.generate([t.prompt for t in items], "cloud")

    async def ask(prompt: str, **meta: Any) -> tuple[str, float]:
        r = await agent.handle(Envelope.request(prompt, meta=meta), bus)  # type: ignore[arg-type]
        return r.meta[O.ANSWER], r.meta[O.CONFIDENCE]

    varied = 0
    for t, ans, conf in zip(items, greedy.answers, greedy.confidence.tolist(), strict=True):
        assert await ask(t.prompt) == await ask(t.prompt, temperature=0.0, seed=3) == (ans, pytest.approx(conf))
        drawn = [await ask(t.prompt, temperature=1.5, seed=s) for s in range(6)]
        assert drawn == [await ask(t.prompt, temperature=1.5, seed=s) for s in range(6)]  # a seed reproduces
        varied += len({a for a, _ in drawn}) > 1
        for a, c in drawn:
            assert a.isdigit() and 0 < c <= conf + 1e-6  # a drawn digit is never likelier than the top one
            if a == ans:
                assert c == pytest.approx(conf)
    assert varied > 0
    hot = FamilialAgent("hot", exit="cloud", temperature=1.5, seed=1)
    r = await hot.handle(Envelope.request(items[0].prompt), _Bus({"hot": hot}))  # type: ignore[arg-type]
    assert r.meta[O.ANSWER] == (await ask(items[0].prompt, temperature=1.5, seed=1))[0]  # config = meta
    with pytest.raises(AgentError, match="temperature"):
        await agent.handle(Envelope.request(items[0].prompt, meta={"temperature": "warm"}), bus)  # type: ignore[arg-type]
