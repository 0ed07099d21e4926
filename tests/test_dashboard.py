"""``aiflow dashboard``: the run form's patterns, the HTTP/SSE API over real node processes, and the page
itself in a real browser (Debian's chromium driven headless by Playwright)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiflow_agents import BrokerURL
from topologies import GraphError
from topologies.dashboard import DEMO_NODES, Dashboard, RunSpec, Served, graph_json, serve

# -- the form's patterns ------------------------------------------------------------------------


def test_run_spec_builds_each_pattern_and_refuses_what_cannot_run() -> None:
    assert RunSpec(pattern="ensemble", members=["a", "b"], task="t").build().kind == "ensemble"
    assert RunSpec(pattern="debate", members=["a", "b"], task="t", rounds=3).build().rounds == 3  # type: ignore[attr-defined]
    cascade = RunSpec(pattern="cascade", members=["a", "b"], task="t", accept="confidence>=0.6").build()
    assert cascade.agent_ids() == ["a", "b"]
    moa = RunSpec(pattern="moa", members=["a", "b"], task="t", aggregator="c").build()
    assert sorted(moa.agent_ids()) == ["a", "b", "c"]
    moa.validate()  # one proposer layer: an agent in two layers would be a cycle
    assert RunSpec(pattern="single", members=["a"], task="t").build().agent_ids() == ["a"]
    with pytest.raises(GraphError, match="aggregator"):
        RunSpec(pattern="moa", members=["a"], task="t").build()
    with pytest.raises(GraphError, match="exactly one"):
        RunSpec(pattern="single", members=["a", "b"], task="t").build()
    with pytest.raises(ValueError):
        RunSpec(pattern="cascade", members=["a"], task="t", accept="confidence>>2").build()
    with pytest.raises(ValueError, match="distinct"):
        RunSpec(pattern="ensemble", members=["a", "a"], task="t")
    with pytest.raises(ValueError, match="extra"):
        RunSpec.model_validate({"pattern": "ensemble", "members": ["a"], "task": "t", "agregate": "vote"})


def test_graph_layout_places_every_node_once_also_for_a_cyclic_debate() -> None:
    debate = RunSpec(pattern="debate", members=["a", "b", "c"], task="t").build()
    g = graph_json(debate.graph())
    ids = [n["id"] for n in g["nodes"]]
    assert len(ids) == len(set(ids)) and {"a", "b", "c"} <= set(ids)
    cells = {(n["x"], n["y"]) for n in g["nodes"]}
    assert len(cells) == len(ids)  # no two nodes drawn on one spot
    assert all(0 <= n["x"] < g["columns"] and 0 <= n["y"] < n["rows"] for n in g["nodes"])
    cascade = graph_json(RunSpec(pattern="cascade", members=["d", "e", "c"], task="t").build().graph())
    x = {n["id"]: n["x"] for n in cascade["nodes"]}
    assert x["d"] < x["e"] < x["c"]  # stages left to right, in order
    assert {(e["source"], e["target"]) for e in cascade["edges"]} >= {("d", "e"), ("e", "c")}


async def test_a_page_that_cannot_keep_up_is_dropped_not_waited_for() -> None:
    dash = Dashboard("memory://dash-unit", queue_size=2)
    slow = dash.subscribe()
    assert (await anext(slow))[0] == "state"
    assert (await anext(slow))[0] == "runs"
    # the generator subscribes on first use; park it on its queue, then flood it
    waiting = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0)
    for i in range(5):
        dash._emit("trace", {"i": i})
    # dropped: what it had not read is gone and its stream ends (its browser reconnects with a fresh snapshot)
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert not dash._subscribers
    fast = dash.subscribe()  # a page that reads keeps up, and gets every event in order
    assert [(await anext(fast))[0] for _ in range(2)] == ["state", "runs"]
    waiting = asyncio.ensure_future(anext(fast))
    await asyncio.sleep(0)
    dash._emit("trace", {"i": 0})
    assert await waiting == ("trace", {"i": 0})
    dash._emit("trace", {"i": 1})
    assert await anext(fast) == ("trace", {"i": 1})
    dash.close_pages()
    with pytest.raises(StopAsyncIteration):
        await anext(fast)


# -- HTTP and live events over real node processes -----------------------------------------------


def _http(
    method: str, url: str, body: Any = None, content_type: str = "application/json", host: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": content_type, **({"Host": host} if host else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text.startswith(b"{") else text.decode()


async def _sse(url: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m
    reader, writer = await asyncio.open_connection(m[1], int(m[2]))
    # HTTP/1.0: the body is the raw event stream (no chunked encoding to take apart)
    writer.write(f"GET {m[3]} HTTP/1.0\r\nHost: {m[1]}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"200" in head.split(b"\r\n")[0] and b"text/event-stream" in head
        while True:
            frame = (await reader.readuntil(b"\n\n")).decode()
            fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line and line[0] != ":")
            if "event" in fields:
                yield fields["event"], json.loads(fields["data"])
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _served(broker: BrokerURL, namespace: str) -> AsyncIterator[str]:
    ready: asyncio.Future[Served] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(str(broker.url()), port=0, namespace=namespace, probe_interval=0.5, on_ready=[ready.set_result])
    )
    try:
        served = await asyncio.wait_for(asyncio.shield(ready), 30)
        yield served.url
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.timeout(180)
async def test_api_and_live_events_over_node_processes(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    spawn(["scripted:d1?answer=7&confidence=0.3"], mosquitto, namespace, tier="device")
    spawn(
        ["scripted:e1?answer=42&confidence=0.9", "scripted:e2?answer=42", "scripted:e3?answer=41"],
        mosquitto,
        namespace,
        tier="edge",
    )
    spawn(["scripted:bad?fail=true"], mosquitto, namespace, tier="cloud")
    async with _served(mosquitto, namespace) as url:

        async def all_online() -> Any:
            status, state = await asyncio.to_thread(_http, "GET", url + "api/state")
            return state if status == 200 and {"d1", "e1", "e2", "e3", "bad"} <= set(state["agents"]) else None

        state = await _until(all_online)
        by_id = {n["id"]: n for n in state["nodes"]}
        tiers = {n["tier"] for n in by_id.values() if n["online"]}
        assert tiers == {"device", "edge", "cloud"}
        edge = next(n for n in state["nodes"] if {"e1", "e2", "e3"} <= {a["id"] for a in n["agents"]})
        assert edge["tier"] == "edge" and all(a["type"] == "scripted" for a in edge["agents"])
        assert [t["tier"] for t in state["tiers"]] == ["device", "edge", "cloud"]

        # refusals are typed and say why
        spec = {"pattern": "single", "members": ["e1"], "task": "q"}
        status, err = await asyncio.to_thread(_http, "POST", url + "api/runs", spec, host="evil.example:80")
        assert status == 400 and "host" in err.lower()  # a rebound name: nothing served, nothing started
        status, err = await asyncio.to_thread(_http, "POST", url + "api/runs", b"pattern=ensemble", "text/plain")
        assert status == 415 and err["error"]["code"] == "unsupported_media_type"
        status, err = await asyncio.to_thread(_http, "POST", url + "api/runs", b"{not json")
        assert status == 400 and err["error"]["code"] == "bad_json"
        bad = {"pattern": "ensemble", "members": ["e1"], "task": "q", "agregate": "vote"}
        status, err = await asyncio.to_thread(_http, "POST", url + "api/runs", bad)
        assert status == 422 and "agregate" in err["error"]["message"]
        offline = {"pattern": "ensemble", "members": ["e1", "ghost"], "task": "q"}
        status, err = await asyncio.to_thread(_http, "POST", url + "api/runs", offline)
        assert status == 409 and err["error"]["code"] == "agent_unavailable" and "ghost" in err["error"]["message"]
        status, err = await asyncio.to_thread(_http, "GET", url + "api/runs/nope")
        assert status == 404

        events = _sse(url + "api/events")
        assert (await anext(events))[0] == "state"
        assert (await anext(events))[0] == "runs"
        spec = {"pattern": "ensemble", "members": ["e1", "e2", "e3", "bad"], "task": "What is 6*7?", "timeout": 20}
        status, started = await asyncio.to_thread(_http, "POST", url + "api/runs", spec)
        assert status == 202
        run_id = started["id"]
        seen: list[tuple[str, dict[str, Any]]] = []
        async with asyncio.timeout(60):
            async for kind, data in events:
                this = data.get("run") if kind == "trace" else data.get("run", {}).get("id")
                if kind in ("run", "trace", "done") and this == run_id:
                    seen.append((kind, data))
                    if kind == "done":
                        break
        await events.aclose()
        kinds = [k for k, _ in seen]
        assert kinds[0] == "run" and kinds[-1] == "done" and kinds.count("trace") >= 5
        assert {n["id"] for n in seen[0][1]["graph"]["nodes"]} >= {"e1", "e2", "e3", "bad"}
        traced = [d["event"] for k, d in seen if k == "trace"]
        assert any(e["via"] == "group" and e["kind"] == "request" for e in traced)  # one publish, broker copies
        # each member's answer is shown as it arrives, not only when the run ends
        answers = {e["sender"]: e["answer"] for e in traced if e["kind"] == "reply"}
        assert answers == {"e1": "42", "e2": "42", "e3": "41"}
        group = next(e for e in traced if e["via"] == "group" and e["kind"] == "request")
        assert sorted(group["members"]) == ["bad", "e1", "e2", "e3"]
        assert any(e["sender"] == "bad" and e["kind"] == "error" for e in traced)
        done = seen[-1][1]
        assert done["run"]["status"] == "done" and done["run"]["answer"] == "42"
        contributions = {c["agent"]: c for c in done["result"]["contributions"]}
        assert contributions["e3"]["answer"] == "41" and "scripted_failure" in contributions["bad"]["error"]

        status, record = await asyncio.to_thread(_http, "GET", url + f"api/runs/{run_id}")
        assert status == 200 and record["answer"] == "42" and record["graph"]["nodes"]
        assert len(record["trace"]) == len(traced)

        # a cascade names the stage whose answer stood
        casc = {"pattern": "cascade", "members": ["d1", "e1"], "task": "q", "accept": "confidence>=0.8"}
        status, started = await asyncio.to_thread(_http, "POST", url + "api/runs", casc)
        assert status == 202

        async def finished() -> Any:
            _, record = await asyncio.to_thread(_http, "GET", url + f"api/runs/{started['id']}")
            return record if record["status"] != "running" else None

        record = await _until(finished)
        assert record["answer"] == "42" and record["answered_by"] == "e1"


# -- the page in a real browser ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip() -> Any:
    """Playwright with Debian's chromium; CI sets AIFLOW_REQUIRE_BROWSER=1 so a missing one fails there."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("AIFLOW_REQUIRE_BROWSER"):
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists():
        if os.environ.get("AIFLOW_REQUIRE_BROWSER"):
            raise AssertionError(f"no chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed")
    return sync_playwright


@pytest.fixture
def dashboard_demo(tmp_path: Path) -> Iterator[str]:
    """``aiflow dashboard --demo``: its own embedded broker and scripted nodes, as a user starts it."""
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aiflow_agents", "dashboard", "--demo", "--port", "0", "--probe-interval", "0.5"],
            stdout=subprocess.PIPE,
            stderr=out,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        m = re.search(r"(http://\S+/)", line)
        assert m, f"no URL in {line!r}; log: {log.read_text()}"
        yield m[1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, log.read_text()


@pytest.mark.timeout(240)
def test_dashboard_in_a_browser(dashboard_demo: str, tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    shots = Path(os.environ.get("AIFLOW_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(dashboard_demo)
            # every demo agent appears under its tier, live
            for tier, specs in DEMO_NODES.items():
                for spec in specs:
                    agent_id = spec.split(":", 1)[1].split("?", 1)[0]
                    page.wait_for_selector(f'.tier[data-tier="{tier}"] [data-agent="{agent_id}"]', timeout=60_000)
            page.wait_for_selector(".conn.live")

            # an ensemble started from the form: its answer, each member's, the broker's copies on the timeline
            _pick(page, "ensemble", ("edge-a", "edge-b", "edge-c"))
            _start_and_finish(page, "ensemble")
            assert page.text_content("#run-answer") == "391"
            rows = page.locator("#contributions tbody tr")
            assert rows.count() == 3
            assert page.text_content('#contributions tr[data-agent="edge-c"] td.ans') == "393"
            assert page.locator("#timeline .ev-copy").count() == 3  # one group publish, copied to 3 members
            assert page.locator("#timeline .ev-reply").count() == 3
            assert page.locator('#graph .gnode[data-node="edge-a"].answered').count() == 1
            page.screenshot(path=str(shots / "dashboard-ensemble.png"), full_page=True)

            # a cascade over three tiers: who answered, and the answer that stood
            page.reload()
            _pick(page, "cascade", ("phone", "edge-a", "cloud"))
            assert page.text_content('[data-member="cloud"] .order') == "3"
            _start_and_finish(page, "cascade")
            assert page.text_content("#run-answered-by") == "cloud"
            assert page.text_content("#run-answer") == "391"
            assert page.locator("#run-list li").count() == 2  # the earlier run is listed after a reload
            assert page.locator('#graph .gnode[data-node="cloud"].stood').count() == 1
            page.screenshot(path=str(shots / "dashboard-cascade.png"), full_page=True)

            # a debate: every member's answer in every round; peers drawn as one frame, not n² arrows
            page.reload()
            _pick(page, "debate", ("edge-a", "edge-b", "edge-c"))
            page.fill("#f-rounds", "2")
            _start_and_finish(page, "debate")
            assert page.locator("#contributions tbody tr").count() == 6
            assert page.locator("#graph .peers").count() == 1
            assert page.locator("#timeline .ev-copy").count() == 6  # one group publish per round

            # a refused run says why on the form (three members ticked for a single-agent run)
            page.select_option("#f-pattern", "single")
            page.click("#f-submit")
            page.wait_for_function("document.getElementById('form-error').textContent.length > 0")
            assert "member" in page.text_content("#form-error")

            # a run file opened from disk (what `aiflow run --trace-out` writes)
            run_file = tmp_path / "run.json"
            run_file.write_text(json.dumps(_run_file()))
            page.set_input_files("#open-file", str(run_file))
            page.wait_for_function("document.getElementById('run-title').textContent.includes('from a file')")
            assert page.text_content("#run-answer") == "7"
            assert page.locator("#timeline .ev-reply").count() == 1
        finally:
            browser.close()
    # the browser logs the refused run's 422 as a failed resource: expected, everything else is not
    assert [e for e in errors if "status of 422" not in e] == [], errors


def _pick(page: Any, pattern: str, members: tuple[str, ...]) -> None:
    """Choose a pattern on the form and tick its members (in order: a cascade asks them so)."""
    page.wait_for_selector(f'[data-member="{members[-1]}"] input')
    page.select_option("#f-pattern", pattern)
    for a in members:
        page.check(f'[data-member="{a}"] input')


def _start_and_finish(page: Any, pattern: str) -> None:
    """Start the run on the form and wait until the page shows it finished."""
    page.click("#f-submit")
    page.wait_for_function(
        "document.getElementById('run-status').textContent === 'done' && "
        f"document.getElementById('run-title').textContent.startsWith('{pattern}')",
        timeout=60_000,
    )


def _run_file() -> dict[str, Any]:
    t = 1_700_000_000.0
    return {
        "pattern": "solo",
        "task": "a task from a file",
        "answer": "7",
        "answered_by": None,
        "elapsed_ms": 12.0,
        "bytes_on_wire": 300,
        "contributions": [
            {"agent": "x", "label": "", "answer": "7", "confidence": 1.0, "error": None, "latency_ms": 11}
        ],
        "trace": [
            {
                "seq": 0,
                "sender": "manager",
                "recipient": "x",
                "kind": "request",
                "bytes": 150,
                "start": t,
                "end": t,
                "label": "",
                "via": "direct",
                "error": None,
                "correlation_id": "c",
                "latency_ms": 0,
            },
            {
                "seq": 1,
                "sender": "x",
                "recipient": "manager",
                "kind": "reply",
                "bytes": 150,
                "start": t,
                "end": t + 0.011,
                "label": "",
                "via": "direct",
                "error": None,
                "correlation_id": "c",
                "latency_ms": 11,
            },
        ],
    }
