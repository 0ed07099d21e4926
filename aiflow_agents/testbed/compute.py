"""A tier's compute budget: a kernel CPU quota (cgroup) over the processes a tier runs.

A device tier has a fraction of a core, a cloud tier several: :class:`CpuQuota` makes that real with the
CFS bandwidth controller (cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, or v2 ``cpu.max``), so a
tier's processes are throttled by the kernel however many threads they run. The groups live under
``<cpu hierarchy>/aiflow-testbed/<name>``. :class:`DutyCycleLimiter` limits one process tree where no cgroup
is writable (no root): it pauses and resumes it with SIGSTOP/SIGCONT, the way ``cpulimit`` does, which holds
the average but not the shape (a process runs at full speed in the slices it is let run, and a paused one
answers nothing). The testbed does not use it: without cgroups it runs without quotas and says so.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

__all__ = ["CpuQuota", "CpuQuotaError", "DutyCycleLimiter", "QuotaUsage", "cpu_quota_unavailable"]

GROUP_PARENT = "aiflow-testbed"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MIN_QUOTA_US = 1000  # the kernel refuses a smaller CFS quota or period
_MAX_PERIOD_US = 1_000_000
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuQuotaError(RuntimeError):
    """A CPU quota could not be set up (the message says why: no root, no cpu controller, a name in use)."""


@dataclass(frozen=True)
class QuotaUsage:
    """What a group's processes have used so far: CPU seconds and how often the kernel throttled them."""

    cpu_s: float
    nr_periods: int
    nr_throttled: int
    throttled_s: float


@dataclass(frozen=True)
class _Hierarchy:
    """Where the cpu controller is mounted (and, on v1, where a separate cpuacct one is, for usage)."""

    version: Literal[1, 2]
    cpu: Path
    cpuacct: Path | None = None


def _find_hierarchy(mountinfo: str) -> _Hierarchy | None:
    """The mounted hierarchy that carries the ``cpu`` controller, from /proc/self/mountinfo text."""
    v1_cpu: Path | None = None
    v1_cpuacct: Path | None = None
    v2: Path | None = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep:
            continue
        fields, tail_fields = head.split(), tail.split()
        if len(fields) < 5 or len(tail_fields) < 3:
            continue
        mountpoint = Path(fields[4].replace("\\040", " "))
        fstype, super_opts = tail_fields[0], set(tail_fields[2].split(","))
        if fstype == "cgroup":
            if "cpu" in super_opts and v1_cpu is None:
                v1_cpu = mountpoint
                if "cpuacct" in super_opts:
                    v1_cpuacct = None  # co-mounted: cpuacct.usage sits beside cpu.cfs_quota_us
                    continue
            if "cpuacct" in super_opts and "cpu" not in super_opts and v1_cpuacct is None:
                v1_cpuacct = mountpoint
        elif fstype == "cgroup2" and v2 is None:
            v2 = mountpoint
    if v1_cpu is not None:
        return _Hierarchy(1, v1_cpu, v1_cpuacct)
    if v2 is not None and "cpu" in _read(v2 / "cgroup.controllers", "").split():
        return _Hierarchy(2, v2)
    return None


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text()
    except OSError:
        if default is None:
            raise
        return default


def _write(path: Path, value: str) -> None:
    """One write(2) per value: cgroup files take exactly one value (one pid) per write."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _hierarchy() -> _Hierarchy | str:
    if not sys.platform.startswith("linux"):
        return "CPU quotas need Linux cgroups"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as e:
        return f"cannot read /proc/self/mountinfo ({e})"
    found = _find_hierarchy(mountinfo)
    if found is None:
        return "no cgroup hierarchy with the cpu controller is mounted (v1 'cpu' or v2 with 'cpu' available)"
    return found


def cpu_quota_unavailable() -> str | None:
    """None when :class:`CpuQuota` can work here, else the reason (for a test's skip or a clear error)."""
    found = _hierarchy()
    if isinstance(found, str):
        return found
    if os.geteuid() != 0:
        return f"creating cgroups under {found.cpu} needs root (running as uid {os.geteuid()})"
    if not os.access(found.cpu, os.W_OK):
        return f"the cgroup hierarchy at {found.cpu} is not writable (read-only mount?)"
    if found.version == 1 and not (found.cpu / "cpu.cfs_quota_us").exists():
        return f"the kernel has no CFS bandwidth control ({found.cpu}/cpu.cfs_quota_us is missing)"
    return None


def _pids(procs_file: Path) -> list[int]:
    return [int(p) for p in _read(procs_file, "").split()]


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of one live process, from /proc/<pid>/stat."""
    stat = _read(Path(f"/proc/{pid}/stat"), "")
    if not stat:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class CpuQuota:
    """A named cgroup limiting its processes together to ``cores`` CPUs (0.25 = a quarter of one core).

    Use as a context manager (``with CpuQuota("run1-device", 0.25) as q: q.add(pid)``); :meth:`remove`
    moves any processes left back to the root group and deletes the group. Names must be unique among the
    groups alive at once (pass e.g. ``f"{run_id}-{tier}"``)."""

    def __init__(self, name: str, cores: float, *, period_us: int = 100_000) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"cgroup name {name!r} must be 1-64 letters, digits, '-' or '_'")
        if not (isinstance(cores, int | float) and math.isfinite(cores) and cores > 0):
            raise ValueError(f"cores must be a positive number, got {cores!r}")
        if not _MIN_QUOTA_US <= period_us <= _MAX_PERIOD_US:
            raise ValueError(f"period_us must be within {_MIN_QUOTA_US}..{_MAX_PERIOD_US}, got {period_us}")
        quota_us = round(cores * period_us)
        if quota_us < _MIN_QUOTA_US:
            raise ValueError(
                f"{cores} cores of a {period_us} us period is a {quota_us} us quota; the kernel needs >= "
                f"{_MIN_QUOTA_US} us (use a longer period)"
            )
        self.name = name
        self.cores = float(cores)
        self.period_us = period_us
        self.quota_us = quota_us
        self._hier: _Hierarchy | None = None

    def __repr__(self) -> str:
        return f"CpuQuota({self.name!r}, cores={self.cores}, period_us={self.period_us})"

    @property
    def path(self) -> Path | None:
        """The group's directory once created (None before)."""
        return None if self._hier is None else self._hier.cpu / GROUP_PARENT / self.name

    @property
    def _acct_path(self) -> Path | None:
        if self._hier is None or self._hier.cpuacct is None:
            return None
        return self._hier.cpuacct / GROUP_PARENT / self.name

    def create(self) -> CpuQuota:
        """Make the group and set its quota; raises :class:`CpuQuotaError` saying why it cannot."""
        if self._hier is not None:
            return self
        reason = cpu_quota_unavailable()
        if reason is not None:
            raise CpuQuotaError(reason)
        found = _hierarchy()
        assert not isinstance(found, str)
        self._hier = found
        made: list[tuple[Path, Path]] = []  # (hierarchy root, group) of each directory this call created
        try:
            if found.version == 1:
                self._create_v1(found, made)
            else:
                self._create_v2(found, made)
        except OSError as e:
            self._hier = None
            for root, group in reversed(made):  # only ours: an existing group of that name is someone else's
                try:
                    _dissolve(root, group)
                except CpuQuotaError as cleanup:
                    e.add_note(str(cleanup))
            if e.errno == errno.EEXIST:
                raise CpuQuotaError(
                    f"cgroup {GROUP_PARENT}/{self.name} already exists: names must be unique per testbed "
                    "(or a crashed run left it: rmdir it)"
                ) from e
            hint = ""
            if found.version == 2 and e.errno == errno.EBUSY:
                hint = " (cgroup v2 enables 'cpu' only for groups without processes of their own: a container?)"
            raise CpuQuotaError(f"cannot create cgroup {GROUP_PARENT}/{self.name}: {e}{hint}") from e
        return self

    def _create_v1(self, found: _Hierarchy, made: list[tuple[Path, Path]]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(exist_ok=True)
        self.path.mkdir()
        made.append((found.cpu, self.path))
        _write(self.path / "cpu.cfs_period_us", str(self.period_us))
        _write(self.path / "cpu.cfs_quota_us", str(self.quota_us))
        acct = self._acct_path
        if acct is not None and found.cpuacct is not None:
            acct.parent.mkdir(exist_ok=True)
            acct.mkdir()
            made.append((found.cpuacct, acct))

    def _create_v2(self, found: _Hierarchy, made: list[tuple[Path, Path]]) -> None:
        assert self.path is not None
        root_control = found.cpu / "cgroup.subtree_control"
        if "cpu" not in _read(root_control, "").split():
            _write(root_control, "+cpu")
        self.path.parent.mkdir(exist_ok=True)
        if "cpu" not in _read(self.path.parent / "cgroup.subtree_control", "").split():
            _write(self.path.parent / "cgroup.subtree_control", "+cpu")
        self.path.mkdir()
        made.append((found.cpu, self.path))
        _write(self.path / "cpu.max", f"{self.quota_us} {self.period_us}")

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group; children it starts later are in it too.

        Never the calling process itself: that would throttle the testbed that measures the tiers."""
        if self.path is None:
            raise CpuQuotaError(f"{self!r} is not created: call create() or use it as a context manager")
        if pid == os.getpid():
            raise ValueError("refusing to throttle the calling process: add the pid of a tier's child process")
        _write(self.path / "cgroup.procs", str(pid))  # ProcessLookupError when pid is gone
        acct = self._acct_path
        if acct is not None:
            try:
                _write(acct / "cgroup.procs", str(pid))
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        """The processes now in the group."""
        return [] if self.path is None else _pids(self.path / "cgroup.procs")

    def usage(self) -> QuotaUsage:
        """CPU used by the group's processes since :meth:`create`, and its throttling counters."""
        if self.path is None or self._hier is None:
            raise CpuQuotaError(f"{self!r} is not created")
        stat = dict(_stat_pairs(_read(self.path / "cpu.stat", "")))
        if self._hier.version == 2:
            return QuotaUsage(
                cpu_s=stat.get("usage_usec", 0) / 1e6,
                nr_periods=stat.get("nr_periods", 0),
                nr_throttled=stat.get("nr_throttled", 0),
                throttled_s=stat.get("throttled_usec", 0) / 1e6,
            )
        acct_dir = self._acct_path or self.path
        usage_ns = _read(acct_dir / "cpuacct.usage", "").strip()
        if usage_ns:
            cpu_s = int(usage_ns) / 1e9
        else:  # no cpuacct controller: the live members' own counters (misses processes that exited)
            cpu_s = sum(_proc_cpu_s(p) for p in self.pids())
        return QuotaUsage(
            cpu_s=cpu_s,
            nr_periods=stat.get("nr_periods", 0),
            nr_throttled=stat.get("nr_throttled", 0),
            throttled_s=stat.get("throttled_time", 0) / 1e9,
        )

    def remove(self) -> None:
        """Move the processes left back to the root group and delete the group. Idempotent; never raises
        because the group or a process is already gone."""
        if self._hier is None:
            return
        dirs = [(self._hier.cpu, self.path)]
        if self._hier.cpuacct is not None:
            dirs.append((self._hier.cpuacct, self._acct_path))
        for root, group in dirs:
            assert group is not None
            _dissolve(root, group)
        self._hier = None

    def __enter__(self) -> CpuQuota:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def _stat_pairs(text: str) -> list[tuple[str, int]]:
    pairs = []
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            pairs.append((key, int(value)))
    return pairs


def _dissolve(root: Path, group: Path, *, timeout: float = 2.0) -> None:
    """Empty ``group`` into the hierarchy's root and rmdir it (retrying while exiting tasks linger)."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in _pids(group / "cgroup.procs"):
            try:
                _write(root / "cgroup.procs", str(pid))
            except (ProcessLookupError, FileNotFoundError):
                pass
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: an exiting task the kernel no longer moves
                    raise
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                raise CpuQuotaError(f"cannot remove cgroup {group}: {e}") from e
        time.sleep(0.02)


class DutyCycleLimiter:
    """Hold a process tree to ``cores`` CPUs on average without cgroups, by SIGSTOP/SIGCONT in time slices.

    Each slice (``slice_s``) it lets the tree run if the CPU it has used is within ``cores`` x elapsed time
    (a token bucket whose credit is capped so an idle spell does not bank a burst), and stops it otherwise.
    CPU time comes from /proc (10 ms ticks); the bucket is cumulative, so tick rounding does not drift.
    Needs only permission to signal the processes. A process it stopped is always continued by
    :meth:`stop` (and the context manager); if the limiting process is killed outright, send SIGCONT."""

    def __init__(self, pid: int, cores: float, *, slice_s: float = 0.05, include_children: bool = True) -> None:
        if not (math.isfinite(cores) and cores > 0):
            raise ValueError(f"cores must be a positive number, got {cores!r}")
        if pid == os.getpid():
            raise ValueError("refusing to stop the calling process: limit a child process")
        if not 0.005 <= slice_s <= 1.0:
            raise ValueError(f"slice_s must be within 0.005..1.0, got {slice_s}")
        self.pid = pid
        self.cores = float(cores)
        self.slice_s = slice_s
        self.include_children = include_children
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped_pids: set[int] = set()
        self.stopped_slices = 0
        self.slices = 0

    def start(self) -> DutyCycleLimiter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"duty-cycle-{self.pid}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop limiting and continue every process it paused. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._signal(self._stopped_pids, signal.SIGCONT)
        self._stopped_pids.clear()

    def __enter__(self) -> DutyCycleLimiter:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _tree(self) -> dict[int, tuple[int, float]]:
        """pid -> (start time, cpu seconds) of the target and, optionally, its descendants."""
        stats: dict[int, tuple[int, int, float]] = {}  # pid -> (ppid, start, cpu_s)
        candidates = [self.pid]
        if self.include_children:
            candidates = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        for pid in candidates:
            text = _read(Path(f"/proc/{pid}/stat"), "")
            if not text:
                continue
            fields = text.rpartition(")")[2].split()
            if fields[0] in ("Z", "X"):
                continue
            stats[pid] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
        tree: dict[int, tuple[int, float]] = {}
        if self.pid not in stats:
            return tree
        frontier = [self.pid]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            pid = frontier.pop()
            tree[pid] = (stats[pid][1], stats[pid][2])
            if self.include_children:
                frontier.extend(children.get(pid, []))
        return tree

    def _signal(self, pids: set[int] | list[int], sig: signal.Signals) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _run(self) -> None:
        seen = self._tree()  # CPU used before limiting started is not charged
        credit = 0.0
        cap = max(self.cores, 1.0) * self.slice_s * 2
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                tree = self._tree()
                if not tree:
                    return  # the target exited
                now = time.monotonic()
                used = 0.0
                for pid, (start, cpu_s) in tree.items():
                    before = seen.get(pid)
                    used += cpu_s - before[1] if before is not None and before[0] == start else cpu_s
                seen = tree
                credit = min(credit + self.cores * (now - last), cap) - used
                last = now
                self.slices += 1
                if credit > 0:
                    self._signal(self._stopped_pids, signal.SIGCONT)
                    self._stopped_pids.clear()
                else:
                    self.stopped_slices += 1
                    self._signal(list(tree), signal.SIGSTOP)
                    self._stopped_pids.update(tree)
                self._stop.wait(self.slice_s)
        finally:
            self._signal(self._stopped_pids, signal.SIGCONT)
            self._stopped_pids.clear()
