"""A testbed's links in a process of their own, following the scenario's outage and congestion schedule.

The link proxies emulate the network, so they must not share an event loop with the requester: a busy
client (an evaluation with many requests in flight) would delay their timers and add latency that no link
has. :class:`LinkHost` starts ``python -m aiflow_agents.testbed.links`` (at a higher scheduling priority
where allowed) and drives it with JSON lines over its stdin/stdout — never pickle — to read counters, cut
or restore a link, change a profile, and start the schedule's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .link import LinkProfile, LinkProxy, LinkStats
from .scenario import Scenario

#: Niceness of the link process where the OS allows it (root): the links are the network, not a workload.
LINK_NICENESS = -10


@dataclass(frozen=True)
class LinkEvent:
    """Something the schedule did to a link, ``t`` seconds after the clock started."""

    t: float
    link: str
    what: str


@dataclass(frozen=True)
class LinkPlan:
    """One link of the testbed: the uplink of tier ``name``, listening at ``listen``, reaching ``target``.
    ``kernel_bandwidth``: the kernel shapes its bandwidth (netns + tbf), so the proxy only delays."""

    name: str
    listen: tuple[str, int]
    target: tuple[str, int]
    kernel_bandwidth: bool = False


def proxy_profile(profile: LinkProfile, kernel_bandwidth: bool) -> LinkProfile:
    if kernel_bandwidth:
        return LinkProfile(rtt_ms=profile.rtt_ms, jitter_ms=profile.jitter_ms, loss=profile.loss)
    return profile


class Schedule:
    """Applies the scenario's outages and profile changes to the proxies, from ``start()`` on."""

    def __init__(self, scenario: Scenario, proxies: dict[str, LinkProxy], plans: dict[str, LinkPlan]) -> None:
        self.scenario, self.proxies, self.plans = scenario, proxies, plans
        self.events: list[LinkEvent] = []
        self.t0: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self.t0 = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for p in self.proxies.values():
            if not p.is_up:
                p.restore()

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0

    def _profile(self, name: str, profile: LinkProfile | None) -> LinkProfile:
        spec = self.scenario.tiers[name].link
        assert spec is not None
        return proxy_profile(profile or spec.profile(), self.plans[name].kernel_bandwidth)

    async def _run(self) -> None:
        sc = self.scenario
        down: dict[str, bool] = {}
        current: dict[str, int | None] = {}
        while True:
            t = self.elapsed()
            for name in {o.link for o in sc.outages}:
                active = [o for o in sc.outages if o.link == name and o.down_at(t)]
                if bool(active) != down.get(name, False):
                    if active:
                        self.proxies[name].cut(active[-1].mode)
                    else:
                        self.proxies[name].restore()
                    down[name] = bool(active)
                    self.events.append(LinkEvent(round(t, 3), name, "down" if active else "up"))
            for name in {c.link for c in sc.changes}:
                idx = [i for i, c in enumerate(sc.changes) if c.link == name and c.active_at(t)]
                now = idx[-1] if idx else None
                if now != current.get(name):
                    prof = sc.changes[now].profile.profile() if now is not None else None
                    self.proxies[name].set_profile(self._profile(name, prof))
                    current[name] = now
                    self.events.append(LinkEvent(round(t, 3), name, f"profile {'base' if now is None else now}"))
            await asyncio.sleep(0.01)


# -- the child process ------------------------------------------------------------------------------
async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    config = json.loads(await reader.readline())
    scenario = Scenario.model_validate(config["scenario"])
    plans = {
        p["name"]: LinkPlan(p["name"], tuple(p["listen"]), tuple(p["target"]), p["kernel_bandwidth"])  # type: ignore[arg-type]
        for p in config["links"]
    }
    proxies: dict[str, LinkProxy] = {}
    for name, plan in plans.items():
        spec = scenario.tiers[name].link
        assert spec is not None
        proxies[name] = LinkProxy(
            plan.target, proxy_profile(spec.profile(), plan.kernel_bandwidth), listen=plan.listen, name=name
        )
        await proxies[name].start()
    schedule = Schedule(scenario, proxies, plans)
    say({"ok": True, "pid": os.getpid()})
    while line := await reader.readline():
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "stats":
                say({"ok": True, "stats": {n: asdict(p.stats()) for n, p in proxies.items()}})
            elif op == "clock":
                schedule.start()
                say({"ok": True})
            elif op == "stop_clock":
                await schedule.stop()
                say({"ok": True})
            elif op == "events":
                say({"ok": True, "events": [asdict(e) for e in schedule.events], "elapsed": schedule.elapsed()})
            elif op == "cut":
                proxies[cmd["link"]].cut(cmd.get("mode", "blackhole"))
                say({"ok": True})
            elif op == "restore":
                proxies[cmd["link"]].restore()
                say({"ok": True})
            elif op == "profile":
                prof = LinkProfile.from_dict(cmd["profile"])
                proxies[cmd["link"]].set_profile(proxy_profile(prof, plans[cmd["link"]].kernel_bandwidth))
                say({"ok": True})
            elif op == "stop":
                break
            else:
                say({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # a bad command is answered, never fatal
            say({"ok": False, "error": f"{type(e).__name__}: {e}"})
    await schedule.stop()
    for p in proxies.values():
        await p.stop()
    say({"ok": True, "stopped": True})


def main() -> None:
    with contextlib.suppress(OSError):
        os.nice(LINK_NICENESS)
    asyncio.run(_serve())


# -- the parent's handle ----------------------------------------------------------------------------
class LinkHostError(RuntimeError):
    """The link process failed or answered with an error."""


class LinkHost:
    """The testbed's links in their own process (see the module docstring)."""

    def __init__(self, scenario: Scenario, plans: list[LinkPlan], *, log_path: str | None = None) -> None:
        self.scenario, self.plans = scenario, plans
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.pid: int | None = None

    async def start(self, timeout: float = 30.0) -> LinkHost:
        err = Path(self.log_path).open("ab") if self.log_path else asyncio.subprocess.DEVNULL  # noqa: ASYNC230
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aiflow_agents.testbed.links",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        finally:
            if not isinstance(err, int):
                err.close()
        config = {
            "scenario": self.scenario.model_dump(mode="json"),
            "links": [
                {
                    "name": p.name,
                    "listen": list(p.listen),
                    "target": list(p.target),
                    "kernel_bandwidth": p.kernel_bandwidth,
                }
                for p in self.plans
            ],
        }
        first = await self._send(config, timeout)
        self.pid = int(first.get("pid", 0)) or None
        return self

    async def _send(self, obj: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        async with self._lock:
            if self.proc is None or self.proc.stdin is None or self.proc.stdout is None:
                raise LinkHostError("the link process is not running")
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise LinkHostError(f"the link process exited (code {self.proc.returncode}); see {self.log_path}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise LinkHostError(str(answer.get("error")))
        return dict(answer)

    async def stats(self) -> dict[str, LinkStats]:
        raw = (await self._send({"op": "stats"}))["stats"]
        return {n: LinkStats(**s) for n, s in raw.items()}

    async def start_clock(self) -> None:
        await self._send({"op": "clock"})

    async def stop_clock(self) -> None:
        await self._send({"op": "stop_clock"})

    async def events(self) -> list[LinkEvent]:
        return [LinkEvent(**e) for e in (await self._send({"op": "events"}))["events"]]

    async def cut(self, link: str, mode: str = "blackhole") -> None:
        await self._send({"op": "cut", "link": link, "mode": mode})

    async def restore(self, link: str) -> None:
        await self._send({"op": "restore", "link": link})

    async def set_profile(self, link: str, profile: LinkProfile) -> None:
        await self._send({"op": "profile", "link": link, "profile": profile.to_dict()})

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "stop"}\n')
                await proc.stdin.drain()
                await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


if __name__ == "__main__":
    main()
