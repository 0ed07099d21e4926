"""The dashboard's HTTP side: a small Starlette app over a :class:`Dashboard`.

Live updates are Server-Sent Events (one long GET the browser reconnects by itself; no client
library). Every asset is a file in this package, so the page works with no network beyond the
machine. Starting a run needs a JSON body: a browser on another site cannot send one without a
CORS preflight, which this app never grants, so other pages cannot start runs through a user's
browser; and served on loopback it answers only requests addressed to a loopback name, so a site
that rebinds its own name to 127.0.0.1 (DNS rebinding) gets nothing either."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from aiflow_agents import AgentUnavailableError

from ..graph import GraphError
from .hub import Dashboard
from .runs import RunSpec

STATIC = Path(__file__).parent / "static"
#: seconds between SSE comments that keep idle proxies and the browser from closing the stream
KEEPALIVE = 15.0


#: the Host names a loopback-only dashboard answers to
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(dashboard: Dashboard, *, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS) -> Starlette:
    """The ASGI app; the caller starts and stops ``dashboard`` (the app does not own it).
    ``allowed_hosts``: Host header values it answers (``"*"``: any, for a deliberately exposed one)."""

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def state(request: Request) -> Response:
        return JSONResponse(dashboard.snapshot())

    async def events(request: Request) -> Response:
        return StreamingResponse(
            _sse(dashboard.subscribe()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def list_runs(request: Request) -> Response:
        return JSONResponse({"runs": [r.summary() for r in dashboard.runs.values()]})

    async def get_run(request: Request) -> Response:
        record = dashboard.runs.get(request.path_params["run_id"])
        if record is None:
            missing = request.path_params["run_id"]
            return _error(404, "unknown_run", f"no run {missing!r} (finished runs are kept a while)")
        return Response(json.dumps(record.to_dict(), default=str), media_type="application/json")

    async def start_run(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "unsupported_media_type", "send the run as application/json")
        try:
            body: Any = await request.json()
        except ValueError:
            return _error(400, "bad_json", "the body is not valid JSON")
        try:
            spec = RunSpec.model_validate(body)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors())
            return _error(422, "invalid_run", problems)
        try:
            record = await dashboard.start_run(spec)
        except AgentUnavailableError as e:
            return _error(409, e.code, str(e))
        except (GraphError, ValueError) as e:
            return _error(422, "invalid_run", str(e))
        return JSONResponse({"id": record.id, "run": record.summary()}, status_code=202)

    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/events", events),
        Route("/api/runs", list_runs, methods=["GET"]),
        Route("/api/runs", start_run, methods=["POST"]),
        Route("/api/runs/{run_id}", get_run),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))])


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _sse(source: AsyncIterator[tuple[str, dict[str, Any]]]) -> AsyncIterator[str]:
    """Events as SSE frames, with a comment line whenever the stream has been quiet a while."""
    it = aiter(source)
    pending: asyncio.Task[tuple[str, dict[str, Any]]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
            if not done:
                yield ": keepalive\n\n"
                continue
            try:
                kind, data = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        closer = getattr(it, "aclose", None)
        if closer is not None:
            with contextlib.suppress(RuntimeError):
                await closer()
