"""Per-tier CPU quotas: a busy child under a quarter core really gets about a quarter of a core."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aiflow_agents.testbed import compute
from aiflow_agents.testbed.compute import (
    CpuQuota,
    CpuQuotaError,
    DutyCycleLimiter,
    _find_hierarchy,
    _Hierarchy,
    cpu_quota_unavailable,
)

WINDOW_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _cpu_ratios(pids: list[int], window_s: float = WINDOW_S) -> list[float]:
    """CPU seconds per wall second of each process over the same window.

    The processes get a high priority where allowed, so that other work on a shared machine does not
    starve the unlimited one (the comparison is about the limit, not about contention)."""
    for pid in pids:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, -10)
        except PermissionError:
            pass
    before = [_cpu_s(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(window_s)
    after = [_cpu_s(p) for p in pids]
    wall = time.monotonic() - t0
    return [(a - b) / wall for a, b in zip(after, before, strict=True)]


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start child processes (a busy loop by default) and kill them whatever the test's outcome."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv) or [sys.executable, "-c", "while True: pass"], **kwargs)  # type: ignore[call-overload]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, 18)  # SIGCONT, in case a limiter left it stopped
            proc.kill()
        proc.wait()


def _quota_or_skip() -> None:
    reason = cpu_quota_unavailable()
    if reason is not None:
        pytest.skip(f"no kernel CPU quota here: {reason}")


def _name(tag: str) -> str:
    return f"test-{os.getpid()}-{tag}"


def test_quarter_core_quota_throttles_a_busy_child_and_remove_cleans_up(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    _quota_or_skip()
    quota = CpuQuota(_name("quarter"), 0.25)
    try:
        quota.create()
        assert quota.path is not None and quota.path.is_dir()
        limited, free = spawn(), spawn()
        quota.add(limited.pid)
        assert quota.pids() == [limited.pid]
        start = quota.usage()
        limited_ratio, free_ratio = _cpu_ratios([limited.pid, free.pid])
        used = quota.usage()
        print(f"cpu/wall over {WINDOW_S}s: limited {limited_ratio:.3f}, free {free_ratio:.3f}; {used}")
        assert limited_ratio <= 0.35
        assert free_ratio >= 2 * limited_ratio
        # the group's own accounting agrees with the process's, and the kernel says it throttled
        assert used.cpu_s - start.cpu_s == pytest.approx(limited_ratio * WINDOW_S, abs=0.15)
        assert used.nr_throttled > start.nr_throttled
        assert used.throttled_s > start.throttled_s
        path = quota.path
    finally:
        quota.remove()
    assert not path.exists()
    assert limited.poll() is None  # moved back to the root group, not killed
    assert "aiflow-testbed" not in Path(f"/proc/{limited.pid}/cgroup").read_text()
    quota.remove()  # idempotent


def test_children_started_later_inherit_the_group(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    _quota_or_skip()
    parent = spawn("sh", "-c", "read go; sleep 30 & echo $!; wait", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    with CpuQuota(_name("inherit"), 1.5) as quota:
        quota.add(parent.pid)
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.write(b"go\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        assert sorted(quota.pids()) == sorted([parent.pid, child])
        path = quota.path
        assert path is not None
        if (path / "cpu.cfs_quota_us").exists():  # cgroup v1
            assert (path / "cpu.cfs_quota_us").read_text().split() == ["150000"]
        else:
            assert (path / "cpu.max").read_text().split() == ["150000", "100000"]
    assert not path.exists()
    assert parent.poll() is None


def test_names_must_be_unique_and_plain() -> None:
    for bad in ["", "a/b", "../x", "tier one", "x" * 65]:
        with pytest.raises(ValueError, match="cgroup name"):
            CpuQuota(bad, 1.0)
    with pytest.raises(ValueError, match="kernel needs"):
        CpuQuota("tiny", 0.005)  # 500 us of a 100 ms period
    with pytest.raises(ValueError, match="positive"):
        CpuQuota("zero", 0)


def test_a_name_in_use_is_refused_and_the_existing_group_left_alone(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    _quota_or_skip()
    with CpuQuota(_name("dup"), 0.5) as first:
        member = spawn()
        first.add(member.pid)
        with pytest.raises(CpuQuotaError, match="already exists"):
            CpuQuota(_name("dup"), 0.5).create()
        assert first.path is not None and first.path.is_dir()
        assert first.pids() == [member.pid]


def test_a_create_that_fails_halfway_removes_only_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    _quota_or_skip()

    def refuse_quota(path: Path, value: str) -> None:
        if path.name in ("cpu.cfs_quota_us", "cpu.max"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write(path, value)

    real_write = compute._write
    monkeypatch.setattr(compute, "_write", refuse_quota)
    quota = CpuQuota(_name("half"), 0.5)
    with pytest.raises(CpuQuotaError, match="Invalid argument"):
        quota.create()
    monkeypatch.undo()
    assert quota.path is None
    with CpuQuota(_name("half"), 0.5) as again:  # the half-made group is gone, so its name is free
        assert again.path is not None and again.path.is_dir()


def test_add_refuses_the_calling_process_and_needs_create() -> None:
    quota = CpuQuota(_name("self"), 0.5)
    with pytest.raises(CpuQuotaError, match="not created"):
        quota.add(1)
    _quota_or_skip()
    with quota, pytest.raises(ValueError, match="calling process"):
        quota.add(os.getpid())


def test_finds_the_cpu_hierarchy_in_mountinfo(tmp_path: Path) -> None:
    separate = (
        "30 25 0:26 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "32 25 0:28 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
    )
    assert _find_hierarchy(separate) == _Hierarchy(1, Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuacct"))
    comounted = "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    assert _find_hierarchy(comounted) == _Hierarchy(1, Path("/sys/fs/cgroup/cpu,cpuacct"))
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    unified = f"25 20 0:24 / {tmp_path} rw - cgroup2 cgroup2 rw,nsdelegate\n"
    assert _find_hierarchy(unified) == _Hierarchy(2, tmp_path)
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")  # hybrid: cpu bound to v1, none mounted
    assert _find_hierarchy(unified) is None


def test_reads_cgroup_v2_usage(tmp_path: Path) -> None:
    quota = CpuQuota("v2", 0.25)
    quota._hier = _Hierarchy(2, tmp_path)
    assert quota.path is not None
    quota.path.mkdir(parents=True)
    (quota.path / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1400000\nsystem_usec 100000\n"
        "nr_periods 40\nnr_throttled 30\nthrottled_usec 2250000\n"
    )
    usage = quota.usage()
    assert (usage.cpu_s, usage.nr_periods, usage.nr_throttled, usage.throttled_s) == (1.5, 40, 30, 2.25)


def test_duty_cycle_limiter_holds_a_busy_child_near_its_share(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    limited, free = spawn(), spawn()
    limiter = DutyCycleLimiter(limited.pid, 0.25)
    with limiter:
        limited_ratio, free_ratio = _cpu_ratios([limited.pid, free.pid])
    print(
        f"duty cycle cpu/wall: limited {limited_ratio:.3f}, free {free_ratio:.3f}, "
        f"stopped {limiter.stopped_slices}/{limiter.slices} slices"
    )
    assert limited_ratio <= 0.35
    assert free_ratio >= 2 * limited_ratio
    assert limiter.stopped_slices > 0
    time.sleep(0.05)
    assert _state(limited.pid) in "RS"  # left running, not stopped


def test_duty_cycle_limiter_refuses_the_calling_process() -> None:
    with pytest.raises(ValueError, match="calling process"):
        DutyCycleLimiter(os.getpid(), 0.5)
