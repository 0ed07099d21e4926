"""Relay across node processes: device -> edge -> cloud over the embedded broker and Mosquitto.

Each exit runs in its own ``aiflow node`` process; the device ships its layer-k hidden states (all
positions), the edge continues from layer k and ships its own depth's, the cloud continues from
there. The relayed answer must equal the deep exit run on one machine.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from aiflow_agents import BrokerURL, Client
from aiflow_agents.models import tasks as T
from aiflow_agents.models.familial import load_shipped
from protocols import Envelope, TensorRole
from protocols import ops as O

pytestmark = pytest.mark.timeout(120)

N = 24


async def _ask(c: Client, agent: str, prompt: str, **meta: object) -> Envelope:
    return await c.request(agent, Envelope.request(prompt, meta=dict(meta)), timeout=30)


async def test_relay_across_nodes_equals_the_deep_exit(broker: BrokerURL, namespace: str, spawn) -> None:
    spawn(["familial-cloud:cloud"], broker, namespace, tier="cloud")
    spawn(["familial-edge:edge?next=cloud"], broker, namespace, tier="edge")
    spawn(
        ["familial-device:device?next=edge", "familial-device:device8?next=edge&encoding=int8-rowwise"],
        broker,
        namespace,
        tier="device",
    )
    model = load_shipped("familial")
    items = T.generate_tasks(N, seed=4242)
    prompts = [t.prompt for t in items]
    ids = model.encode_prompts(prompts)
    deep = model.generate(prompts, "cloud")
    with torch.no_grad():
        deep_hidden = model.hidden_at(ids, model.depth("cloud"))
    d, seq = model.cfg.d_model, model.cfg.seq_len
    layers = [0, *model.cfg.exits]
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["cloud", "edge", "device", "device8"], timeout=60)

        # Never confident: every item crosses both hops; the answer is the deep exit's.
        forced = await asyncio.gather(*(_ask(c, "device", p, threshold=2.0, **{O.RETURN: ["hidden"]}) for p in prompts))
        for i, r in enumerate(forced):
            assert r.meta[O.ANSWER] == deep.answers[i] == r.text.splitlines()[0]
            assert r.meta["answered_by"] == "cloud" and r.meta["exit"] == "cloud"
            assert [(h["from_layer"], h["to_layer"]) for h in r.meta["hops"]] == list(itertools.pairwise(layers))
            assert r.meta["bytes_per_hop"] == [seq * d * 2, seq * d * 2]  # float16, all positions
            assert all(h["frame_bytes"] > h["latent_bytes"] for h in r.meta["hops"][:2])
            assert r.meta[O.COST]["depth"] == layers[-1] and r.meta[O.COST]["model_calls"] == 3
            hidden = r.tensor(TensorRole.HIDDEN_STATE)
            assert hidden is not None and hidden.space is not None and hidden.space.layer == layers[-1]
            torch.testing.assert_close(hidden.tensor, deep_hidden[i : i + 1], rtol=2e-2, atol=2e-2)

        # Always confident: the device answers alone, nothing is shipped.
        local = await asyncio.gather(*(_ask(c, "device", p, threshold=0.0) for p in prompts))
        shallow = model.generate(prompts, "device")
        for i, r in enumerate(local):
            assert r.meta["answered_by"] == "device" and r.meta["bytes_per_hop"] == []
            assert r.meta[O.ANSWER] == shallow.answers[i]
            assert r.meta[O.CONFIDENCE] == pytest.approx(float(shallow.confidence[i]), abs=1e-6)

        # The confidence policy: answered where confidence first passes the threshold.
        th = 0.9
        mixed = await asyncio.gather(*(_ask(c, "device", p, threshold=th) for p in prompts))
        conf = {n: model.generate(prompts, n).confidence for n in ("device", "edge")}
        for i, r in enumerate(mixed):
            want = "device" if conf["device"][i] >= th else "edge" if conf["edge"][i] >= th else "cloud"
            assert r.meta["answered_by"] == want, (i, r.meta["hops"])

        # int8 row-wise latents: answers equal to the deep exit except a small, reported fraction.
        q = await asyncio.gather(*(_ask(c, "device8", p, threshold=2.0) for p in prompts))
        assert all(r.meta["bytes_per_hop"] == [seq * (d + 4)] * 2 for r in q)
        differ = sum(r.meta[O.ANSWER] != deep.answers[i] for i, r in enumerate(q)) / N
        hops = q[0].meta["bytes_per_hop"]
        print(f"\nint8 relay: {differ:.1%} of {N} answers differ from the deep exit; bytes/hop {hops}")
        assert differ <= 0.1

        # Ops over the bus: score and next at the cloud.
        t = items[0]
        sc = await c.request(
            "cloud", Envelope.request(t.prompt, meta={O.OP: "score", O.CANDIDATES: [deep.answers[0], "1"]}), timeout=30
        )
        assert len(sc.meta[O.SCORES]) == 2 and sc.meta[O.SCORES][0] >= sc.meta[O.SCORES][1]
        nx = await c.request("edge", Envelope.request(t.prompt, meta={O.OP: "next", O.PREFIX: ""}), timeout=30)
        part = nx.tensor(TensorRole.TOKEN_DISTRIBUTION)
        assert part is not None and part.space is not None and part.space.family == model.cfg.family
