"""A testbed's links in a process of their own, following the scenario's outage and congestion schedule.

The link proxies emulate the network, so they must not share an event loop with the requester: a busy
client (an evaluation with many requests in flight) would delay their timers and add latency that no link
has. :class:`LinkHost` starts ``python -m aiflow_agents.testbed.links`` (at a higher scheduling priority
where allowed) and drives it with JSON lines over its stdin/stdout — never pickle — to read counters, cut
or restore a link, change a profile, and start the schedule's clock. :class:`Schedule` is the one place
where outages and profile changes are applied over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .link import LinkProfile, LinkProxy, LinkStats, OutageMode
from .mosquitto import TestbedError
from .scenario import Scenario

#: Niceness of the link process where the OS allows it (root): the links are the network, not a workload.
LINK_NICENESS = -10
#: How often the schedule looks at the clock: outages and changes take effect within this many seconds.
SCHEDULE_TICK_S = 0.01


@dataclass(frozen=True)
class LinkEvent:
    """Something the schedule did to a link, ``t`` seconds after the clock started."""

    t: float
    link: str
    what: str


@dataclass(frozen=True)
class LinkPlan:
    """One link of the testbed: the uplink of tier ``name``, listening at ``listen``, reaching ``target``.

    ``reverse``: the proxy's clients sit on the parent's side of the uplink (a shared broker at a child tier,
    reached by its parent), so the proxy's client -> target direction is the uplink's *down* direction."""

    name: str
    listen: tuple[str, int]
    target: tuple[str, int]
    reverse: bool = False


def oriented(profile: LinkProfile, reverse: bool) -> LinkProfile:
    """``profile`` (in the uplink's terms) in the proxy's terms: up and down swapped for a reversed plan."""
    return replace(profile, up_mbps=profile.down_mbps, down_mbps=profile.up_mbps) if reverse else profile


class Schedule:
    """Applies the scenario's outages and profile changes to the proxies, from :meth:`start` on.

    Overlapping outages of one link keep it down until the last one ends; while several are in force, the
    mode of the one listed last in the scenario applies. Of overlapping changes, the one listed last applies.
    :meth:`stop` undoes what the schedule did: links it cut come back, links it changed get their base
    profile. A cut or profile made by hand (:class:`LinkHost`) is the schedule's to override at its next
    transition of that link, and is not undone by :meth:`stop`."""

    def __init__(self, scenario: Scenario, proxies: dict[str, LinkProxy], plans: dict[str, LinkPlan]) -> None:
        self.scenario, self.proxies, self.plans = scenario, proxies, plans
        self.events: list[LinkEvent] = []
        self.t0: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._down: dict[str, OutageMode] = {}  # links the schedule has cut, and how
        self._changed: dict[str, int] = {}  # links with a change in force: its index in scenario.changes

    def start(self) -> None:
        if self._task is None:
            self.t0 = time.monotonic()
            self.events = []
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name in self._down:
            self.proxies[name].restore()
        for name in self._changed:
            self.proxies[name].set_profile(self.profile(name, None))
        self._down.clear()
        self._changed.clear()

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0

    def profile(self, name: str, change: int | None) -> LinkProfile:
        """The proxy's profile for link ``name`` with change ``change`` in force (None: the base profile)."""
        if change is None:
            spec = self.scenario.tiers[name].link
            assert spec is not None
            base = spec.profile()
        else:
            base = self.scenario.changes[change].profile.profile()
        return oriented(base, self.plans[name].reverse)

    def apply(self, t: float) -> None:
        """Bring every scheduled link to its state at ``t`` seconds, recording what changed."""
        sc = self.scenario
        for name in {o.link for o in sc.outages}:
            active = [o for o in sc.outages if o.link == name and o.down_at(t)]
            want = active[-1].mode if active else None
            have = self._down.get(name)
            if want == have:
                continue
            if want is None:
                self.proxies[name].restore()
                del self._down[name]
                what = "up"
            else:
                self.proxies[name].cut(want)
                self._down[name] = want
                what = "down" if have is None else f"mode {want}"
            self.events.append(LinkEvent(round(t, 3), name, what))
        for name in {c.link for c in sc.changes}:
            idx = [i for i, c in enumerate(sc.changes) if c.link == name and c.active_at(t)]
            now = idx[-1] if idx else None
            if now == self._changed.get(name):
                continue
            self.proxies[name].set_profile(self.profile(name, now))
            if now is None:
                del self._changed[name]
            else:
                self._changed[name] = now
            self.events.append(LinkEvent(round(t, 3), name, f"profile {'base' if now is None else now}"))

    async def _run(self) -> None:
        while True:
            self.apply(self.elapsed())
            await asyncio.sleep(SCHEDULE_TICK_S)


# -- the child process ------------------------------------------------------------------------------
async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(rid: object, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({"id": rid, **obj}) + "\n")
        sys.stdout.flush()

    config = json.loads(await reader.readline())
    proxies: dict[str, LinkProxy] = {}
    try:
        scenario = Scenario.model_validate(config["scenario"])
        plans = {
            p["name"]: LinkPlan(
                p["name"], (p["listen"][0], p["listen"][1]), (p["target"][0], p["target"][1]), p["reverse"]
            )
            for p in config["links"]
        }
        schedule = Schedule(scenario, proxies, plans)
        for name, plan in plans.items():
            proxies[name] = LinkProxy(plan.target, schedule.profile(name, None), listen=plan.listen, name=name)
            await proxies[name].start()
    except Exception as e:  # answered, so the parent reports why instead of waiting for a line that never comes
        for p in proxies.values():
            await p.stop()
        say(config.get("id"), {"ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    say(config.get("id"), {"ok": True, "pid": os.getpid()})

    def stats(name: str) -> dict[str, Any]:
        s = proxies[name].stats()
        if plans[name].reverse:  # counted in the uplink's terms
            s = replace(s, bytes_up=s.bytes_down, bytes_down=s.bytes_up)
        return asdict(s)

    while line := await reader.readline():
        rid = None
        try:
            cmd = json.loads(line)
            rid, op = cmd.get("id"), cmd["op"]
            if op == "stats":
                say(rid, {"ok": True, "stats": {n: stats(n) for n in proxies}})
            elif op == "clock":
                schedule.start()
                say(rid, {"ok": True})
            elif op == "stop_clock":
                await schedule.stop()
                say(rid, {"ok": True})
            elif op == "events":
                events = [asdict(e) for e in schedule.events]
                say(rid, {"ok": True, "events": events, "elapsed": schedule.elapsed()})
            elif op == "cut":
                proxies[cmd["link"]].cut(cmd.get("mode", "blackhole"))
                say(rid, {"ok": True})
            elif op == "restore":
                proxies[cmd["link"]].restore()
                say(rid, {"ok": True})
            elif op == "profile":
                prof = LinkProfile.from_dict(cmd["profile"])
                proxies[cmd["link"]].set_profile(oriented(prof, plans[cmd["link"]].reverse))
                say(rid, {"ok": True})
            elif op == "stop":
                break
            else:
                say(rid, {"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # a bad command is answered, never fatal
            say(rid, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    await schedule.stop()
    for p in proxies.values():
        await p.stop()


def main() -> None:
    with contextlib.suppress(OSError):
        os.nice(LINK_NICENESS)
    asyncio.run(_serve())


# -- the parent's handle ----------------------------------------------------------------------------
class LinkHostError(TestbedError):
    """The link process failed, did not answer in time, or answered with an error."""


class LinkHost:
    """The testbed's links in their own process (see the module docstring).

    Every request carries an id and the child echoes it, so an answer that comes after its request timed
    out is recognised and dropped instead of being taken for the answer to the next request."""

    def __init__(
        self, scenario: Scenario, plans: list[LinkPlan], *, log_path: str | None = None, timeout: float = 10.0
    ) -> None:
        self.scenario, self.plans = scenario, plans
        self.log_path = log_path
        self.timeout = timeout  # how long a command waits for its answer
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self.pid: int | None = None

    async def start(self, timeout: float = 30.0) -> LinkHost:
        """Start the process and its proxies; on any failure the process is gone before this raises."""
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
        self.pid = self.proc.pid
        config = {
            "op": "start",
            "scenario": self.scenario.model_dump(mode="json"),
            "links": [
                {"name": p.name, "listen": list(p.listen), "target": list(p.target), "reverse": p.reverse}
                for p in self.plans
            ],
        }
        try:
            await self._send(config, timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _send(self, obj: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        timeout = self.timeout if timeout is None else timeout
        async with self._lock:
            proc = self.proc
            if proc is None or proc.stdin is None or proc.stdout is None:
                raise LinkHostError("the link process is not running")
            self._next_id += 1
            rid = self._next_id
            try:
                proc.stdin.write((json.dumps({**obj, "id": rid}) + "\n").encode())
                await proc.stdin.drain()
            except OSError as e:
                raise LinkHostError(f"the link process is gone ({e}); see {self.log_path}") from None
            deadline = loop.time() + timeout
            while True:
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise LinkHostError(
                        f"the link process did not answer {obj.get('op')!r} within {timeout:g} s; see {self.log_path}"
                    ) from None
                if not line:
                    await proc.wait()
                    raise LinkHostError(f"the link process exited (code {proc.returncode}); see {self.log_path}")
                answer = json.loads(line)
                if answer.get("id") == rid:
                    break  # anything else answers a request that timed out
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
        """Change ``link``'s profile, given in the uplink's terms (up: child -> parent)."""
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
