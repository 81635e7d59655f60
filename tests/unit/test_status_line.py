"""`zmon run`'s status line reads the generation metrics /metrics shows and the records of the interval."""

from __future__ import annotations

import logging
import time

import pytest

from tests.fakes.profiles import make_record
from zmon.app.run import StatusLog
from zmon.collectors.generation import GenerationMetrics


def test_status_line_counts_rates_and_median_of_the_interval() -> None:
    t = {"now": 100.0}
    metrics = GenerationMetrics(model="m")
    status = StatusLog(metrics, 30.0, clock=lambda: t["now"])
    totals = []
    for i, step in enumerate((0.2, 0.4, 0.3)):
        rec = make_record(float(i), steps=(step,), device="cpu")
        totals.append(rec.total_seconds)
        metrics.observe(rec)
        status.observe(rec)
    bad = make_record(3.0, status="error", device="cpu")
    metrics.observe(bad)
    status.observe(bad)
    t["now"] += 10.0
    line = status.line()
    assert line.startswith("status: 4 generations (1 failed: 0 oom, 1 error), 0.30 images/s")
    assert f"p50 {sorted(totals)[1]:.3f}s over the last 10s" in line  # the failed one left out
    assert line.endswith("policy off")
    t["now"] += 30.0
    assert "0.00 images/s and p50 - over the last 30s" in status.line()


def test_status_lines_are_logged_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    status = StatusLog(GenerationMetrics(model="m"), 0.05)
    with caplog.at_level(logging.INFO, logger="zmon.app.run"):
        status.start()
        time.sleep(0.3)
        status.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("status: ")]
    assert len(lines) >= 2
    off = StatusLog(GenerationMetrics(model="m"), 0.0)
    off.start()
    assert off._thread is None  # 0 = no status line
