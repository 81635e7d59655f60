"""`zmon probe interconnect` as a command: 2 CPU ranks over gloo end to end, and bad input refused (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def zmon(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zmon", "probe", "interconnect", *args], capture_output=True, text=True, timeout=timeout
    )


def test_gloo_probe_on_two_cpu_ranks(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    run = zmon(
        "--devices",
        "cpu:2",
        "--min-bytes",
        "1K",
        "--max-bytes",
        "64K",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert "all_reduce" in run.stdout and "all_gather" in run.stdout and "busbw" in run.stdout
    doc = json.loads(out.read_text())
    assert doc["backend"] == "gloo" and doc["ranks"] == 2 and doc["devices"] == ["cpu:0", "cpu:1"]
    assert doc["nominal"] is None
    for op, factor in (("all_reduce", 1.0), ("all_gather", 0.5)):  # 2(n-1)/n and (n-1)/n at n = 2
        sizes = doc["ops"][op]["sizes"]
        assert [s["bytes"] for s in sizes] == [1024, 4096, 16384, 65536]
        for s in sizes:
            assert s["seconds"] > 0
            assert s["algbw_bytes_per_second"] == pytest.approx(s["bytes"] / s["seconds"])
            assert s["busbw_bytes_per_second"] == pytest.approx(s["algbw_bytes_per_second"] * factor)
        assert doc["ops"][op]["latency_seconds"] == sizes[0]["seconds"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "cpu:1"], "at least 2 devices"),
        (["--devices", "cpu:2", "--backend", "mpi"], "unknown backend"),
        (["--devices", "cpu:2", "--backend", "nccl"], "needs CUDA devices"),
        (["--devices", "two"], "--devices"),
        (["--devices", "cpu:2", "--max-bytes", "1Q"], "expected a size"),
    ],
)
def test_bad_input_exits_2(args: list[str], message: str) -> None:
    run = zmon(*args, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr
