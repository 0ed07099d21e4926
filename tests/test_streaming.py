"""Streaming partial results: an agent's progress events reach its requester in order, all before
the final reply, over a real broker (the embedded one and Mosquitto).

The model agent runs in a node process on the tiny Llama that ``test_hf_agent`` trains offline; a
request with ``meta.stream`` gets one event per generated token, whose pieces add up to the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_hf_agent import _corpus, _save, make_tokenizer, random_gpt2, train_llama

from aiflow_agents import BrokerURL, Client, Node, RemoteAgentError
from aiflow_agents.agent import Agent, AgentContext
from aiflow_agents.errors import RequestTimeoutError
from aiflow_agents.models.hf import TransformersAgent
from protocols import Envelope, Kind, TextPart
from protocols import ops as O

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]

FRANCE = "what is the capital of france?"
ODD = "zzqx vvk grass?"  # a random model rambles on it until max_new_tokens
PARTIAL = "what colour is"  # the trained model answers it with a few tokens
NOISY = "max_new_tokens=16&temperature=1.0&seed=4"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-models")
    tok = make_tokenizer(_corpus(), vocab_size=400)
    llama, gpt2 = train_llama(tok), random_gpt2(tok, seed=3)
    return {"llama": _save(llama, tok, root / "llama"), "gpt2": _save(gpt2, tok, root / "gpt2")}


def pieces_of(agent: TransformersAgent, prompt: str, **kw: object) -> tuple[list[tuple[int, str]], str, list[int]]:
    calls: list[tuple[int, str]] = []
    d = agent.decode(prompt, on_token=lambda t, p: calls.append((t, p)), **kw)  # type: ignore[arg-type]
    return calls, d.text, d.token_ids


# -- the decoding loop's callback ------------------------------------------------------------------
def test_on_token_pieces_add_up_to_the_answer(folders: dict[str, Path]) -> None:
    llama = TransformersAgent("l", path=str(folders["llama"]), max_new_tokens=12).load()
    calls, text, ids = pieces_of(llama, FRANCE)
    assert text == "paris" and [t for t, _ in calls] == ids  # one call per token, the end token too
    assert "".join(p for _, p in calls) == text
    calls, text, ids = pieces_of(llama, PARTIAL)
    assert [t for t, _ in calls] == ids and "".join(p for _, p in calls) == text
    assert sum(1 for _, p in calls if p) > 1  # really incremental, not everything at the end
    # a random model on a byte-level vocabulary: broken UTF-8, stray whitespace, special tokens
    noisy = TransformersAgent("n", path=str(folders["gpt2"]), max_new_tokens=24, temperature=1.0).load()
    for seed in range(6):
        calls, text, ids = pieces_of(noisy, ODD, seed=seed)
        assert [t for t, _ in calls] == ids and "".join(p for _, p in calls) == text, seed
        assert "\ufffd" not in "".join(p for _, p in calls[:-1]) or "\ufffd" in text
    # stop strings: never streamed, even partly, and the answer is cut before them
    assert len(text) > 6
    for stop in (text[2:5], text[-3:-1], " "):
        cut = TransformersAgent("s", path=str(folders["gpt2"]), max_new_tokens=24, temperature=1.0, stop=[stop])
        calls, cut_text, _ = pieces_of(cut.load(), ODD, seed=5)
        streamed = "".join(p for _, p in calls)
        assert streamed == cut_text and stop not in streamed, stop


async def test_context_without_a_node_sends_nothing() -> None:
    ctx = AgentContext(agent_id="t", node_id="test", client=None)  # type: ignore[arg-type]
    assert await ctx.progress({"stream": {"seq": 0}}) is False
    assert ctx.progress_threadsafe({"stream": {"seq": 0}}) is False
    await ctx.flush()
    built_outside = await asyncio.to_thread(AgentContext, agent_id="t", node_id="x", client=None)  # type: ignore[arg-type]
    assert built_outside.loop is None and built_outside.progress_threadsafe({}) is False


# -- over the bus: a node process serving the model ------------------------------------------------
async def collect(c: Client, agent: str, message: Envelope, timeout: float = 60) -> list[Envelope]:
    return [env async for env in c.stream(agent, message, timeout=timeout)]


async def test_model_streams_tokens_before_its_reply(
    broker: BrokerURL, namespace: str, spawn, folders: dict[str, Path]
) -> None:
    tiny, noisy = f"hf:tiny?path={folders['llama']}&threads=1", f"hf:noisy?path={folders['gpt2']}&{NOISY}&threads=1"
    spawn([tiny, noisy, "echo"], broker, namespace)
    local = {
        "tiny": TransformersAgent("l", path=str(folders["llama"])).load(),
        "noisy": TransformersAgent("n", path=str(folders["gpt2"]), max_new_tokens=16, temperature=1.0, seed=4).load(),
    }
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["tiny", "noisy", "echo"], timeout=90)
        for agent, prompt in (("noisy", ODD), ("tiny", PARTIAL), ("tiny", FRANCE)):
            got = await collect(c, agent, Envelope.request(prompt, meta={"stream": True}))
            *events, reply = got
            assert reply.kind == Kind.REPLY and all(e.kind == Kind.EVENT for e in events)
            expected = local[agent].decode(prompt)
            assert reply.text == expected.text
            # one event per generated token, in order, all before the reply (a late one is dropped)
            assert len(events) == reply.meta[O.COST]["new_tokens"] == len(expected.token_ids)
            stream = [e.meta["stream"] for e in events]
            assert [s["seq"] for s in stream] == list(range(len(events)))
            assert [s["token"] for s in stream] == expected.token_ids
            assert "".join(s["text"] for s in stream) == reply.text
            cid = events[0].correlation_id
            assert cid and all(e.correlation_id == cid == reply.correlation_id for e in events)
            assert all(e.sender == agent and e.parent_id == reply.parent_id for e in events)
            assert len(events) >= 2 and (prompt == FRANCE or sum(1 for s in stream if s["text"]) >= 2)
        # without meta.stream nothing but the reply; ``request`` is unchanged either way
        plain = await collect(c, "tiny", Envelope.request(FRANCE))
        assert [e.kind for e in plain] == [Kind.REPLY] and plain[0].text == "paris"
        assert (await c.request("tiny", Envelope.request(FRANCE, meta={"stream": True}), timeout=60)).text == "paris"
        # an agent that never streams: stream() yields just its reply
        echoed = await collect(c, "echo", Envelope.request("hello"))
        assert len(echoed) == 1 and echoed[0].kind == Kind.REPLY and echoed[0].text == "hello"
        # an error reply raises, as request() does
        with pytest.raises(RemoteAgentError) as info:
            await collect(c, "tiny", Envelope.request(FRANCE, meta={O.OP: "dance", "stream": True}))
        assert info.value.code == "unsupported_op"


# -- the node's side: ordering and flushing, with handlers of the test's own ------------------------
class Ticker(Agent):
    """Streams ``meta.n`` events from a worker thread (and one from the loop), then answers."""

    type_name = "ticker"

    def __init__(self, agent_id: str = "ticker") -> None:
        super().__init__(agent_id)
        self.sent: list[bool] = []
        self.refused: list[bool] = []

    async def handle(self, request: Envelope, ctx: AgentContext) -> str:
        n = int(request.meta.get("n", 0))
        if request.meta.get("bad"):  # what cannot (or may not) be an event is refused; the reply still goes
            self.refused = [await ctx.progress({"claimed": "node-x"}), await ctx.progress({"x": object()})]
        first = await ctx.progress({"stream": {"seq": 0, "text": "<"}}, TextPart(text="part"))

        def work() -> list[bool]:
            return [ctx.progress_threadsafe({"stream": {"seq": i, "text": f"{i},"}}) for i in range(1, n + 1)]

        self.sent = [first, *await asyncio.to_thread(work)]
        if request.meta.get("hang"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:  # the deadline: answer late, so the requester times out first
                await asyncio.sleep(3)
        return "<" + "".join(f"{i}," for i in range(1, n + 1))


@pytest.fixture
async def ticker_node(broker: BrokerURL, namespace: str) -> AsyncIterator[tuple[Node, Ticker]]:
    agent = Ticker()
    node = Node([agent], broker, namespace=namespace)
    await node.start()
    try:
        yield node, agent
    finally:
        await node.stop(grace=1.0)


async def test_thread_events_are_ordered_and_flushed_before_the_reply(
    broker: BrokerURL, namespace: str, ticker_node: tuple[Node, Ticker]
) -> None:
    _, agent = ticker_node
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["ticker"], timeout=30)
        n = 300  # more than a broker's in-flight window: some wait for a slot, none may overtake
        *events, reply = await collect(c, "ticker", Envelope.request("go", meta={"n": n}), timeout=30)
        assert [e.meta["stream"]["seq"] for e in events] == list(range(n + 1))
        assert events[0].text == "part"  # parts travel with the event
        assert "".join(e.meta["stream"]["text"] for e in events) == reply.text
        assert agent.sent == [True] * (n + 1)
        *events, reply = await collect(c, "ticker", Envelope.request("go", meta={"n": 1, "bad": True}), timeout=30)
        assert agent.refused == [False, False] and reply.text == "<1," and len(events) == 2
        # fire and forget: no reply_to, so nothing to stream to; the handler is told so
        await c.publish(c.topics.inbox("ticker"), Envelope.request("go", recipient="ticker", meta={"n": 2}))
        for _ in range(200):
            if len(agent.sent) == 3:
                break
            await asyncio.sleep(0.05)
        assert agent.sent == [False, False, False]
        # a timeout ends the stream with the usual error, after the events that came
        seen: list[Envelope] = []
        with pytest.raises(RequestTimeoutError):
            async with contextlib.aclosing(
                c.stream("ticker", Envelope.request("go", meta={"n": 3, "hang": True}), timeout=2)
            ) as it:
                async for env in it:
                    seen.append(env)
        assert [e.meta["stream"]["seq"] for e in seen] == [0, 1, 2, 3]
