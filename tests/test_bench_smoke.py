"""Benchmarks run here at a tiny size only to prove they work; their numbers are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout)


def test_codec_bench_runs(tmp_path: Path) -> None:
    out = run("bench_codec.py", "--repeat", "3", "--shape", "1", "64", "256", "--json", str(tmp_path / "c.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "c.json").read_text())


@pytest.mark.timeout(240)
def test_fanout_bench_runs(tmp_path: Path) -> None:
    out = run(
        "bench_fanout.py", "--sizes", "1,3", "--repeat", "1", "--delay", "0.05", "--json", str(tmp_path / "f.json")
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["members"] for r in rows] == [1, 3]


@pytest.mark.timeout(300)
def test_latents_bench_runs(tmp_path: Path) -> None:
    out = run(
        "bench_latents.py",
        "--sizes",
        "0.0625",
        "--repeat",
        "1",
        "--k",
        "8",
        "--json",
        str(tmp_path / "l.json"),
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["float16", "int8", "topk"]
    assert all(r["frame_bytes"] > 0 for r in rows)


@pytest.mark.timeout(300)
def test_transport_bench_runs(tmp_path: Path) -> None:
    out = run(
        "bench_transport.py",
        "--rtt-n",
        "5",
        "--tput-n",
        "50",
        "--agents",
        "3",
        "--blocks",
        "2",
        "--rounds",
        "1",
        "--json",
        str(tmp_path / "t.json"),
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert [r["payload"] for r in result["rtt"]] == [100, 1 << 20]
    assert result["throughput"]["aiflow_msgs_per_s"] > 0
    assert result["throughput"]["raw_threaded_msgs_per_s"] > 0 and result["throughput"]["raw_msgs_per_s"] > 0
    assert all(len(r["block_ratios"]) == 2 for r in result["rtt"])


@pytest.mark.timeout(240)
def test_cli_bench_runs(tmp_path: Path) -> None:
    out = run("bench_cli.py", "--repeat", "1", "--json", str(tmp_path / "s.json"), timeout=200)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "s.json").read_text())
    rows = {r["command"]: r for r in result["rows"]}
    assert {"baseline", "aiflow --help", "aiflow send"} <= set(rows)
    assert rows["baseline"]["ratio"] == 1.0 and all(r["median_ms"] > 0 for r in rows.values())
    assert not rows["aiflow --help"]["imports_torch"]
