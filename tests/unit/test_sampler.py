"""Sampler and store: snapshots, failure isolation, backoff and recovery, readiness, self-metrics."""

from __future__ import annotations

import itertools
import time

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
