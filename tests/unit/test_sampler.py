"""Sampler and store: snapshots, failure isolation, backoff and recovery, readiness, self-metrics."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from zmon.collectors.base import ExpositionErrors, Guarded
from zmon.collectors.self_metrics import SelfCollector
from zmon.sampling import Sampler, SnapshotStore, SourceSpec


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_failure_is_recorded_backed_off_and_recovers() -> None:
    clock = FakeClock()
    store = SnapshotStore(clock=clock, wall=lambda: 1.7e9)
    sampler = Sampler(store, max_backoff_seconds=8, clock=clock)
    state = {"fail": True, "calls": 0}

    def flaky() -> int:
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("driver gone")
        return 42

    sampler.add(SourceSpec("flaky", flaky, 1.0))
    sampler.add(SourceSpec("good", lambda: "ok", 1.0))
    assert not sampler.run_once("flaky")
    assert sampler.run_once("good")
    st = store.get("flaky")
    assert st is not None and st.last_success is False and st.last_error == "RuntimeError: driver gone"
    assert store.latest("good") == "ok"
    # within the backoff (1 s after the first failure) the source is not called again
    clock.t += 0.5
    assert not sampler.run_once("flaky")
    assert state["calls"] == 1
    clock.t += 1.0
    sampler.run_once("flaky")
    assert state["calls"] == 2
    # second failure doubles the backoff to 2 s
    clock.t += 1.5
    sampler.run_once("flaky")
    assert state["calls"] == 2
    clock.t += 1.0
    state["fail"] = False
    assert sampler.run_once("flaky")
    st = store.get("flaky")
    assert st is not None and st.data == 42 and st.consecutive_failures == 0 and st.failures_total == 2


def test_backoff_is_capped() -> None:
    clock = FakeClock()
    store = SnapshotStore(clock=clock)
    sampler = Sampler(store, max_backoff_seconds=4, clock=clock)
    calls = []

    def bad() -> None:
        calls.append(clock.t)
        raise OSError("x")

    sampler.add(SourceSpec("bad", bad, 1.0))
    for _ in range(200):
        sampler.run_once("bad")
        clock.t += 0.25
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert max(gaps) <= 4.25 and len(calls) > 8


def test_ready_waits_for_every_available_source() -> None:
    store = SnapshotStore()
    sampler = Sampler(store)
    sampler.add(SourceSpec("a", lambda: 1, 1.0))
    sampler.add(SourceSpec("b", lambda: 2, 1.0))
    store.register("nvml", available=False, reason="no library")
    assert not store.ready()
    sampler.run_once("a")
    assert not store.ready()
    sampler.run_once("b")
    assert store.ready()


def test_scheduler_runs_jobs_on_their_interval() -> None:
    store = SnapshotStore()
    sampler = Sampler(store)
    n = {"fast": 0}

    def fast() -> int:
        n["fast"] += 1
        return n["fast"]

    sampler.add(SourceSpec("fast", fast, 0.1))
    sampler.start()
    try:
        assert store.wait_ready(5)
        time.sleep(0.6)
    finally:
        sampler.shutdown()
    assert 3 <= n["fast"] <= 10


def test_listener_errors_do_not_break_sampling() -> None:
    store = SnapshotStore()
    sampler = Sampler(store)
    seen: list[tuple[str, bool]] = []
    sampler.add_listener(lambda name, ok: (_ for _ in ()).throw(ValueError("boom")))
    sampler.add_listener(lambda name, ok: seen.append((name, ok)))
    sampler.add(SourceSpec("s", lambda: 1, 1.0))
    assert sampler.run_once("s")
    assert seen == [("s", True)]


def test_self_metrics_and_broken_collector_isolated() -> None:
    clock = FakeClock()
    store = SnapshotStore(clock=clock)
    sampler = Sampler(store, clock=clock)
    sampler.add(SourceSpec("good", lambda: 1, 1.0))
    sampler.add(SourceSpec("bad", lambda: 1 / 0, 1.0))
    store.register("nvml", available=False, reason="no GPU")
    sampler.run_once("good")
    sampler.run_once("bad")
    clock.t += 2.5
    errors = ExpositionErrors()
    reg = CollectorRegistry(auto_describe=False)

    class Broken:
        def collect(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("bug")

    reg.register(Guarded("self", SelfCollector(store, errors, "watch"), errors))  # type: ignore[arg-type]
    reg.register(Guarded("broken", Broken(), errors))  # type: ignore[arg-type]
    generate_latest(reg)
    text = generate_latest(reg).decode()
    assert reg.get_sample_value("zmon_collector_success", {"collector": "good"}) == 1.0
    assert reg.get_sample_value("zmon_collector_success", {"collector": "bad"}) == 0.0
    assert reg.get_sample_value("zmon_sample_age_seconds", {"collector": "good"}) == 2.5
    assert reg.get_sample_value("zmon_sample_age_seconds", {"collector": "bad"}) is None
    assert reg.get_sample_value("zmon_collector_available", {"collector": "nvml"}) == 0.0
    assert reg.get_sample_value("zmon_collector_failures_total", {"collector": "bad"}) == 1.0
    assert reg.get_sample_value("zmon_exposition_errors_total", {"collector": "broken"}) >= 2.0
    assert 'zmon_build_info{mode="watch"' in text


def test_source_found_unavailable_at_sample_time_stops_and_does_not_block_readiness() -> None:
    from zmon.providers.base import SourceUnavailable

    store = SnapshotStore()
    sampler = Sampler(store)
    calls = {"n": 0}

    def no_cuda() -> None:
        calls["n"] += 1
        raise SourceUnavailable("CUDA is not available")

    sampler.add(SourceSpec("allocator", no_cuda, 1.0))
    sampler.add(SourceSpec("host", lambda: 1, 1.0))
    assert not sampler.run_once("allocator")
    sampler.run_once("allocator")
    assert calls["n"] == 1
    sampler.run_once("host")
    assert store.ready()
    st = store.get("allocator")
    assert st is not None and not st.available and st.unavailable_reason == "CUDA is not available"


def test_source_unavailable_while_shutting_down_does_not_deadlock() -> None:
    """A worker that finds its source unavailable while the scheduler shuts down must not block shutdown."""
    import threading

    from zmon.providers.base import SourceUnavailable

    store = SnapshotStore()
    sampler = Sampler(store)
    entered, release = threading.Event(), threading.Event()

    def slow_unavailable() -> None:
        entered.set()
        release.wait(5)
        raise SourceUnavailable("no CUDA")

    sampler.add(SourceSpec("allocator", slow_unavailable, 0.1))
    sampler.start()
    assert entered.wait(5)
    done = threading.Event()
    t = threading.Thread(target=lambda: (sampler.shutdown(), done.set()), daemon=True)
    t.start()
    time.sleep(0.2)  # shutdown() now holds APScheduler's locks and waits for the worker
    release.set()
    assert done.wait(10), "shutdown deadlocked"
    st = store.get("allocator")
    assert st is not None and not st.available


def test_a_slow_first_sample_never_overlaps_its_ticks_and_apscheduler_stays_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A first sample slower than several intervals (importing torch, starting NVML) skips no tick with a
    warning; the periodic job starts once it returned. APScheduler's own lines never reach the root logger."""
    import logging
    import threading

    store = SnapshotStore()
    sampler = Sampler(store)
    calls: list[float] = []
    running = threading.Lock()
    overlaps = []

    def slow_first() -> int:
        if not running.acquire(blocking=False):
            overlaps.append(time.monotonic())
            return 0
        try:
            calls.append(time.monotonic())
            time.sleep(0.6 if len(calls) == 1 else 0.0)
            return len(calls)
        finally:
            running.release()

    sampler.add(SourceSpec("slow", slow_first, 0.1))
    with caplog.at_level(logging.DEBUG):
        sampler.start()
        try:
            assert store.wait_ready(5)
            time.sleep(0.5)
        finally:
            sampler.shutdown()
    assert not overlaps
    assert len(calls) >= 3  # the periodic job ran after the first sample
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.name.startswith("apscheduler")], caplog.text
    assert not [
        r for r in caplog.records if r.name.startswith("zmon.sampling.apscheduler") and r.levelno >= logging.INFO
    ], caplog.text


def test_a_stuck_sample_is_reported_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import threading

    from zmon.sampling import scheduler

    monkeypatch.setattr(scheduler, "STUCK_AFTER_SECONDS", 0.3)
    store = SnapshotStore()
    sampler = Sampler(store)
    release = threading.Event()
    n = {"calls": 0}

    def hangs_second_time() -> int:
        n["calls"] += 1
        if n["calls"] == 2:
            release.wait(5)
        return n["calls"]

    sampler.add(SourceSpec("stuck", hangs_second_time, 0.02))
    with caplog.at_level(logging.INFO, logger="zmon.sampling"):
        sampler.start()
        try:
            time.sleep(1.0)
            release.set()
            time.sleep(0.2)
        finally:
            sampler.shutdown()
    stuck = [r for r in caplog.records if "stuck?" in r.getMessage()]
    assert len(stuck) == 1 and stuck[0].levelno == logging.WARNING
    assert any("the stuck sample returned" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("expected", [True, False])
def test_an_absent_source_is_info_when_expected_else_a_warning(
    expected: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """No GPU on a CPU host is nothing wrong (INFO, with the reason); a GPU host whose CUDA cannot start is."""
    import logging

    from zmon.providers.base import SourceUnavailable

    def absent() -> None:
        raise SourceUnavailable("CUDA is not available (no NVIDIA GPU on this host)", expected=expected)

    sampler = Sampler(SnapshotStore())
    sampler.add(SourceSpec("allocator", absent, 1.0))
    with caplog.at_level(logging.INFO, logger="zmon.sampling"):
        sampler.run_once("allocator")
    (rec,) = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert rec.levelno == (logging.INFO if expected else logging.WARNING)
    assert "no NVIDIA GPU on this host" in rec.getMessage()


def test_nvidia_devices_present_reads_the_device_nodes(tmp_path: Path) -> None:
    from zmon.providers.base import nvidia_devices_present

    dev = tmp_path
    (dev / "nvidiactl").touch()  # the control node alone is no GPU
    assert not nvidia_devices_present(str(dev))
    (dev / "nvidia0").touch()
    assert nvidia_devices_present(str(dev))
