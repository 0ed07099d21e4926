"""``aiflow eval --bench``: the runner's tuning and statistics, and a whole run over node processes
with tiny offline models (the real LMs run in ``tests/test_real_models.py``, marked slow)."""

from __future__ import annotations

import math

import pytest
import torch
from test_hf_agent import QA, _save, make_tokenizer, random_gpt2, train_llama

from aiflow_agents import BrokerURL
from aiflow_agents.models.benchmarks import MCItem
from demos.bench_eval import (
    BenchConfig,
    debate_changes,
    mix,
    permutations_for,
    run_bench,
    tune_threshold,
    tune_weights,
)
from protocols import Envelope, ops
from topologies import Aggregate
from topologies.aggregate import average, token_mix
from topologies.graph import GraphError
from topologies.pattern import Outcome

pytestmark = pytest.mark.timeout(300)
#: the multiple-choice prompt, so the trained model (the "big" one) knows the answers
MC_TEXTS = [f"Question: {q}\nAnswer: {a}" for q, a in QA]


def _choice(probs: list[float], source: str) -> Outcome:
    task = Envelope.request("q", meta={ops.OP: "choose", ops.CANDIDATES: ["a", "b", "c"]})
    reply = task.reply("x", sender=source, meta={ops.PROBS: probs})
    best = max(range(3), key=probs.__getitem__)
    return Outcome(source=source, kind="agent", answer="abc"[best], confidence=probs[best], reply=reply)


def test_average_mixes_distributions_not_votes() -> None:
    task = Envelope.request("q", meta={ops.OP: "choose", ops.CANDIDATES: ["a", "b", "c"]})
    # two members vote "a" narrowly, one is sure of "b": a vote says "a", the distributions say "b"
    outs = [_choice([0.40, 0.35, 0.25], "m1"), _choice([0.40, 0.35, 0.25], "m2"), _choice([0.05, 0.90, 0.05], "m3")]
    answer, conf, details = average(task, outs)
    assert answer == "b" and conf == pytest.approx((0.35 + 0.35 + 0.90) / 3)
    assert details["probs"] == pytest.approx([0.85 / 3, 1.6 / 3, 0.55 / 3])
    # weights move it back
    answer, _, details = average(task, outs, {"m1": 1.0, "m2": 1.0, "m3": 0.1})
    assert answer == "a" and details["weights"]["m3"] == 0.1
    # a member without a distribution is left out and named; none at all falls back to a vote
    bare = Outcome(source="m4", kind="agent", answer="c", confidence=1.0, reply=task.reply("c", sender="m4"))
    answer, _, details = average(task, [*outs, bare])
    assert answer == "b" and details["without_distribution"] == ["m4"]
    answer, conf, details = average(task, [bare])
    assert answer == "c" and conf is None and "fallback" in details
    with pytest.raises(GraphError, match="multiple-choice"):
        average(Envelope.request("q"), outs)
    assert Aggregate.parse("average") is Aggregate.AVERAGE


def _tokens(lps: list[list[float]], source: str, tokenizer: str = "tok-1") -> Outcome:
    task = Envelope.request("q", meta={ops.OP: "choose", ops.CANDIDATES: ["a", "b"]})
    reply = task.reply("x", sender=source, meta={ops.TOKEN_LOGPROBS: lps, ops.TOKENIZER: tokenizer})
    return Outcome(source=source, kind="agent", answer="a", confidence=0.5, reply=reply)


def test_token_mix_mixes_each_position_of_a_shared_tokenizer() -> None:
    task = Envelope.request("q", meta={ops.OP: "choose", ops.CANDIDATES: ["a", "b"]})
    # m1 is sure of "a", m2 is not; both find "b" middling
    m1 = _tokens([[-0.01], [-1.2, -1.2]], "m1")
    m2 = _tokens([[-6.0], [-1.2, -1.2]], "m2")
    answer, conf, details = token_mix(task, [m1, m2])

    def mixed(*lps: float) -> float:
        return math.log(sum(math.exp(x) for x in lps) / len(lps))

    want = [mixed(-0.01, -6.0), (mixed(-1.2, -1.2) + mixed(-1.2, -1.2)) / 2]
    assert details["scores"] == pytest.approx(want)
    assert answer == ("a" if want[0] > want[1] else "b") and conf == pytest.approx(max(details["probs"]))
    # per-token mixing is not averaging the members' option scores: here it changes the winner
    per_member = [(-0.01 - 6.0) / 2, -1.2]
    assert (want[0] > want[1]) != (per_member[0] > per_member[1])
    with pytest.raises(GraphError, match="one tokenizer"):
        token_mix(task, [m1, _tokens([[-0.1], [-2.0, -0.1]], "m3", tokenizer="tok-2")])
    with pytest.raises(GraphError, match="other tokens"):
        token_mix(task, [m1, _tokens([[-0.1], [-2.0]], "m4")])
    assert Aggregate.parse("token_mix") is Aggregate.TOKEN_MIX


def test_threshold_is_the_fewest_escalations_that_keep_95_percent() -> None:
    small = [True, True, False, False]
    conf = [0.9, 0.8, 0.3, 0.2]
    large = [True, True, True, False]
    t = tune_threshold(small, conf, large)
    assert t["threshold"] == 0.8 and t["tune_escalated"] == 0.5 and t["tune_accuracy"] == 0.75
    # a small model that is never right sends everything up
    t = tune_threshold([False] * 4, conf, large)
    assert t["tune_escalated"] == 1.0
    # one that is as good as the large one sends nothing
    assert tune_threshold(large, conf, large)["tune_escalated"] == 0.0


def test_weights_are_tuned_on_the_tuning_items() -> None:
    items = [MCItem(id=str(i), question="q", options=("a", "b"), answer=i % 2) for i in range(6)]
    good = [[0.4, 0.6] if i % 2 else [0.6, 0.4] for i in range(6)]  # always right, narrowly
    bad = [[0.1, 0.9] if i % 2 == 0 else [0.9, 0.1] for i in range(6)]  # always wrong, loudly
    w = tune_weights(items, {"good": good, "bad": bad}, ["good", "bad"])  # type: ignore[dict-item]
    assert w["good"] > w["bad"]
    assert mix([[1.0, 0.0], None, [0.0, 1.0]], [1.0, 5.0, 1.0]) == [0.5, 0.5]


def test_option_orders_are_distinct_and_reproducible() -> None:
    four = MCItem(id="q1", question="q", options=("a", "b", "c", "d"), answer=0)
    orders = permutations_for(four, 6)
    assert orders[0] == [0, 1, 2, 3] and len(orders) == 6 and len({tuple(o) for o in orders}) == 6
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and permutations_for(four, 6) == orders
    assert permutations_for(MCItem(id="q2", question="q", options=("a", "b", "c", "d"), answer=0), 6) != orders
    two = MCItem(id="q3", question="q", options=("no", "yes"), answer=1)
    assert permutations_for(two, 6) == [[0, 1], [1, 0]]  # only 2! orders exist


def test_debate_changes_count_directions() -> None:
    from types import SimpleNamespace

    items = [MCItem(id="1", question="q", options=("a", "b", "c"), answer=0)]
    rounds = [{"answers": {"x": "b", "y": "a", "z": "c"}}, {"answers": {"x": "a", "y": "b", "z": "b"}}]
    run = SimpleNamespace(outcome=SimpleNamespace(details={"rounds": rounds}))
    c = debate_changes(items, [run])  # type: ignore[list-item]
    assert c["answers_compared"] == 3 and c["changed"] == 3
    assert (c["wrong_to_right"], c["right_to_wrong"], c["wrong_to_other_wrong"]) == (1, 1, 1)
    assert c["per_agent"]["x"] == {"changed": 1, "wrong_to_right": 1}


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench-models")
    tok = make_tokenizer(MC_TEXTS * 4, vocab_size=400)
    pool = {
        f"s{i}": (f"path={_save(random_gpt2(tok, seed=i), tok, root / f's{i}')}&chat=false", "device")
        for i in (1, 2, 3)
    }
    pool["big"] = (f"path={_save(train_llama(tok, 150, MC_TEXTS), tok, root / 'big')}&chat=false", "cloud")
    return pool


def _items(name: str) -> list[MCItem]:
    assert name == "toy"
    answers = [a for _, a in QA]
    return [
        MCItem(
            id=str(i),
            question=q,
            options=tuple(answers[:4]) if i < 4 else tuple(answers[2:]),
            answer=(answers[:4] if i < 4 else answers[2:]).index(a),
        )
        for i, (q, a) in enumerate(QA)
    ]


async def test_a_whole_bench_run_over_node_processes(embedded: BrokerURL, tiny_pool) -> None:
    cfg = BenchConfig(
        benches=("toy",),
        models=("s1", "s2", "s3", "big"),
        tune=2,
        quiet=True,
        pool=tiny_pool,
        large="big",
        loader=_items,
    )
    report = await run_bench(cfg, broker=str(embedded))
    b = report["benchmarks"]["toy"]
    assert b["items"] == 4 and b["tuning_items"] == 2
    assert set(b["members"]) == {"s1", "s2", "s3", "big"}
    expected = {
        "vote",
        "cross-score",
        "average",
        "weighted",
        "debate",
        "moa",
        "cascade",
        "cascade-single",
        "average-all",
    }
    assert set(b["patterns"]) == expected
    for name, p in b["patterns"].items():
        assert p["n"] == 4 and p["errors"] == 0, name
    # calls are counted truly: a debate is 2 rounds of 3, a mixture 3 proposers and the aggregator
    assert b["patterns"]["debate"]["calls_per_item"] == 6
    assert b["patterns"]["moa"]["calls_per_item"] == 4 and b["patterns"]["moa"]["large_calls_per_item"] == 1
    assert b["patterns"]["vote"]["calls_per_item"] == 3 and b["patterns"]["average-all"]["calls_per_item"] == 4
    assert b["patterns"]["cross-score"]["calls_per_item"] >= 3
    for name in ("cascade", "cascade-single"):
        share = b["patterns"][name]["large_calls_per_item"]
        assert 0.0 <= share <= 1.0 and b["patterns"][name]["escalated_share"] == share
    # the averaged ensemble answers the argmax of the mean of its members' distributions
    per = b["per_item"]
    for j in range(4):
        probs = [per["member_probs"][m][j] for m in ("s1", "s2", "s3")]
        mean = [sum(p[i] for p in probs) / 3 for i in range(len(probs[0]))]
        assert per["patterns"]["average"][j] == mean.index(max(mean))
    # the debate compared every agent's answer across the rounds
    assert b["patterns"]["debate"]["changes"]["answers_compared"] == 12
    # baselines at the ensemble's calls, and McNemar against the right reference
    # ... and at the debate's 6: each small pattern is compared with the baselines at its own call count
    assert b["baselines"]["self_consistency_x3"]["calls_per_item"] == 3
    assert b["baselines"]["permutation_x6"]["calls_per_item"] == 6  # 4 options: 24 orders, 6 distinct used
    assert b["patterns"]["debate"]["vs_self_consistency"]["vs"].endswith("x6 (T=0.7)")
    assert b["patterns"]["vote"]["vs_permutation"]["vs"].endswith("x3")
    assert b["tuning"]["best_small"] in ("s1", "s2", "s3")
    assert b["patterns"]["vote"]["vs_reference"]["vs"] == b["best_small"]
    assert b["patterns"]["moa"]["vs_reference"]["vs"] == "big"
    assert b["members"]["big"]["accuracy"] == 1.0  # the trained model knows the capitals
    assert "verdict" in b["patterns"]["cascade"] and "goal_95pct_with_half_calls" in b["patterns"]["cascade"]
