"""Bad input against live nodes: mutated frames interleaved with real requests, and size limits on
both the sending and the receiving side, over the embedded broker and Mosquitto."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from aiflow_agents import AiflowError, BrokerURL, Client, Message, RemoteAgentError
from protocols import (
    EncodeError,
    Envelope,
    Kind,
    Limits,
    ProtocolError,
    TensorPart,
    Topics,
    decode,
    mqtt_string_problem,
    peek_header,
    portable_topic_problem,
)

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
FUZZ_SCRIPT = ROOT / "bench" / "fuzz_decoder.py"


def _fuzz_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_fuzz_decoder", FUZZ_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_script_2000_frames(tmp_path: Path) -> None:
    """What the decoder does with 2,000 fuzzed frames; how fast is the benchmark's business (``bench/``), so
    the per-frame time limit is off here (a real hang still fails at the subprocess timeout)."""
    out = tmp_path / "fuzz.json"
    argv = [sys.executable, str(FUZZ_SCRIPT), "--frames", "2000", "--seed", "7", "--slow-ms", "inf", "--json", str(out)]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert sum(summary["outcomes"].values()) == 2000
    assert not summary["escaped"]
    # the generator reaches every kind of rejection, and valid frames still decode
    assert {"bad_magic", "unsupported_version", "frame_too_short", "header_too_large", "header_decode"} <= set(
        summary["outcomes"]
    )
    assert {"header_invalid", "bad_segment", "bad_signature", "unsigned_frame", "decoded"} <= set(summary["outcomes"])


def _usable(value: Any, max_len: int, *, topic: bool = False) -> str | None:
    """A header string an error reply can carry: MQTT's rules (SPEC §6.1), portable topic names for ``topic``."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        return None
    return value if (portable_topic_problem if topic else mqtt_string_problem)(value) is None else None


def _expected_route(frame: bytes) -> tuple[str, str | None, str | None]:
    """What SPEC §12.6 says a node does with ``frame`` published without MQTT 5 properties:
    ("valid", None, None), or the ProtocolError code with the reply address it can answer at
    (None: it goes to the agent's errors topic)."""
    try:
        decode(frame)
    except ProtocolError as e:
        header = e.header or {}
        if not header and e.code in ("frame_too_large", "header_too_large"):
            try:
                header = peek_header(frame)
            except ProtocolError:
                header = {}
        # a reply_to that failed SPEC §6.1 is never used (check 12a names it)
        reply_to = None if e.field == "reply_to" else _usable(header.get("reply_to"), 1024, topic=True)
        corr = _usable(header.get("correlation_id"), 128) or _usable(header.get("id"), 128)
        return e.code, (reply_to if reply_to and corr else None), corr
    return "valid", None, None


async def test_live_node_answers_mutated_frames_and_keeps_serving(
    broker: BrokerURL, namespace: str, spawn, tmp_path: Path
) -> None:
    node = spawn(["echo:e1"], broker, namespace, env={"AIFLOW_LOG_JSON": "1"})
    topics = Topics(namespace)
    fuzz = _fuzz_module()
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=30)
        # Seeds: real requests addressed to us (so broken copies can be answered), plus the golden vectors.
        seeds = [
            c.encode(
                c.prepare("e1", Envelope.request(f"seed {k}", *([TensorPart(tensor=t)] if t is not None else [])), 60)
            )
            for k, t in enumerate(
                [None, torch.arange(6.0), torch.ones(2, 3, dtype=torch.int8), None, torch.zeros(0, 2)]
            )
        ]
        golden = seeds * 20 + fuzz.golden_frames()
        frames = [f for _, f in itertools.islice(fuzz.mutated_frames(1234, golden), 300)]
        expected = [_expected_route(f) for f in frames]
        want_replies = Counter((corr, code) for code, to, corr in expected if to == c.reply_topic)
        want_errors_topic = Counter(code for code, to, corr in expected if code != "valid" and to is None)
        assert sum(want_replies.values()) >= 25 and sum(want_errors_topic.values()) >= 100  # both paths exercised

        got_replies: Counter[tuple[str | None, str]] = Counter()
        got_errors_topic: Counter[str] = Counter()

        def code_of(env: Envelope) -> str:
            assert env.error is not None
            return env.error.message.split(":", 1)[0]

        async def on_reply(message: Message) -> None:
            env = decode(message.payload)  # type: ignore[arg-type]
            if env.kind == Kind.ERROR and env.error is not None and env.error.code == "bad_frame":
                got_replies[(env.correlation_id, code_of(env))] += 1

        async def on_error(message: Message) -> None:
            env = decode(message.payload)  # type: ignore[arg-type]
            if env.error is not None and env.error.code == "bad_frame":
                assert env.error.agent == "e1"
                got_errors_topic[code_of(env)] += 1

        c.connection.route(c.reply_topic, on_reply)
        c.connection.route(topics.errors("e1"), on_error)
        await c.connection.subscribe(topics.errors("e1"))

        for i, frame in enumerate(frames):
            await c.connection.publish(topics.inbox("e1"), frame, qos=1)
            if i % 20 == 19:  # a real request in between: still served, correctly
                reply = await c.request("e1", f"real {i}", timeout=20)
                assert reply.text == f"real {i}"
        async with asyncio.timeout(30):
            while got_replies != want_replies or got_errors_topic != want_errors_topic:
                await asyncio.sleep(0.1)
        assert (await c.request("e1", "after", timeout=20)).text == "after"
        assert node.alive()
    await node.astop()
    # every broken frame was logged with its reason (one JSON line each)
    logged = Counter()
    for line in node.log_path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == "bad frame":
                logged[rec["code"]] += 1
    assert logged == Counter(code for code, _, _ in expected if code != "valid")


async def test_size_limits_on_both_sides(broker: BrokerURL, namespace: str, spawn) -> None:
    big_answer, mid_answer = "x" * 6000, "y" * 1500  # scripted replies carry the answer twice (text, meta)
    spawn(
        ["echo:e1", f"scripted:big?answer={big_answer}", f"scripted:mid?answer={mid_answer}"],
        broker,
        namespace,
        extra_args=["--max-frame-bytes", "8192", "--max-header-bytes", "4096"],
    )
    topics = Topics(namespace)
    async with Client(broker, namespace=namespace) as c:
        await c.wait_for_agents(["e1", "big", "mid"], timeout=30)
        assert (await c.request("e1", "small is fine", timeout=20)).text == "small is fine"

        # Receiver (node) side: an oversized frame or header is refused, and the sender is told why.
        with pytest.raises(RemoteAgentError) as info:
            await c.request("e1", Envelope.request(TensorPart(tensor=torch.zeros(4096))), timeout=20)
        assert info.value.code == "bad_frame" and "frame_too_large" in str(info.value) and "8192" in str(info.value)
        with pytest.raises(RemoteAgentError) as info:
            await c.request("e1", "z" * 5000, timeout=20)
        assert info.value.code == "bad_frame" and "header_too_large" in str(info.value)

        # Sender (node) side: a reply over the node's limits is not sent; the requester gets bad_reply.
        with pytest.raises(RemoteAgentError) as info:
            await c.request("big", "hi", timeout=20)
        assert info.value.code == "bad_reply" and "limit is 4096" in str(info.value)

    async with Client(broker, namespace=namespace, limits=Limits(max_frame_bytes=1024)) as small:
        await small.wait_for_agents(["e1", "mid"], timeout=30)
        seen: list[int] = []

        async def spy(message: Message) -> None:
            seen.append(len(message.payload))  # type: ignore[arg-type]

        small.connection.route(topics.inbox("e1"), spy)
        await small.connection.subscribe(topics.inbox("e1"))
        # Sender (client) side: refused before anything is published.
        with pytest.raises(EncodeError, match="limit is 1024"):
            await small.request("e1", "w" * 2000, timeout=20)
        assert (await small.request("e1", "tiny", timeout=20)).text == "tiny"
        assert len(seen) == 1 and seen[0] <= 1024  # only the small request ever reached the broker
        # Receiver (client) side: a reply over the client's limit fails the request, clearly.
        ex = await small.exchange("mid", "hi", timeout=20)
        assert isinstance(ex.error, AiflowError) and "frame_too_large" in str(ex.error)
        assert small.stats["bad_replies"] == 1
