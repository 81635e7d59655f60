"""APScheduler jobs, one per source: call the provider, store the snapshot, back off on failure.

A source's first sample runs on its own thread before its periodic job is scheduled: a first sample may be
slow (importing torch, starting NVML) and would otherwise overlap the next ticks, which APScheduler skips with
a warning. APScheduler logs through zmon's own loggers (`zmon.sampling.apscheduler*`), quiet below ERROR: its
per-job INFO lines never reach a host's log (`zmon.attach`), and the conditions it would warn about (a tick
skipped because a sample still runs, a tick run late) are zmon's to judge — a sample stuck for long is a
WARNING, a busy machine's late tick is DEBUG.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from zmon.providers.base import SourceUnavailable
from zmon.sampling.store import SnapshotStore

log = logging.getLogger(__name__)

# APScheduler's own chatter ("Added job", "Running job", "executed successfully": several lines a second) goes to
# these loggers, which zmon owns: the host's `apscheduler` logger and root configuration are never touched.
SCHEDULER_LOGGER = "zmon.sampling.apscheduler"
_aps_log = logging.getLogger(SCHEDULER_LOGGER)
_aps_log.setLevel(logging.ERROR)

# A sample running this long (and at least STUCK_INTERVALS of its interval) is reported as stuck, once.
STUCK_AFTER_SECONDS = 30.0
STUCK_INTERVALS = 10
FIRST_SAMPLE_JOIN_SECONDS = 30.0


class _Executor(ThreadPoolExecutor):
    """APScheduler's thread pool, logging job runs to zmon's logger instead of `apscheduler.executors.*`."""

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._logger = logging.getLogger(f"{SCHEDULER_LOGGER}.jobs")


@dataclass(frozen=True)
class SourceSpec:
    """One scheduled source: `sample()` returns an immutable value or raises."""

    name: str
    sample: Callable[[], Any]
    interval_seconds: float


class Sampler:
    """Runs every source on its own interval (max_instances=1, coalesce, misfire grace) into a store.

    A source that raises is recorded as failed and skipped for an exponentially growing backoff
    (interval × 2^(n-1), capped at `max_backoff_seconds`); it recovers by itself on the next good sample.
    Listeners (policy evaluation, the systemd watchdog) are called after each attempt, outside the lock.
    """

    def __init__(
        self,
        store: SnapshotStore,
        *,
        misfire_grace_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._clock = clock
        self._max_backoff = max_backoff_seconds
        self._misfire_grace = misfire_grace_seconds
        self._specs: dict[str, SourceSpec] = {}
        self._retry_at: dict[str, float] = {}
        self._listeners: list[Callable[[str, bool], None]] = []
        self._scheduler: BackgroundScheduler | None = None
        self._lock = threading.Lock()
        # Guards _stopping and _first_samples; held while adding a job, never taken by APScheduler's callbacks.
        self._sched_lock = threading.Lock()
        self._stopping = False
        self._first_samples: list[threading.Thread] = []
        self._running_since: dict[str, float] = {}  # source → monotonic start of the sample in progress
        self._stuck_reported: set[str] = set()

    def add(self, spec: SourceSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"source {spec.name!r} added twice")
        self._specs[spec.name] = spec
        self.store.register(spec.name)
        if self._scheduler is not None:
            self._schedule(spec)

    def add_listener(self, fn: Callable[[str, bool], None]) -> None:
        """fn(source_name, success) after every attempt; exceptions are logged, never propagated."""
        self._listeners.append(fn)

    def remove(self, name: str) -> None:
        """Stop sampling a source and forget it (a reload that disables or rebuilds it); the store keeps its
        entry until the caller unregisters it. An attempt already running finishes."""
        if self._specs.pop(name, None) is None:
            return
        with self._lock:
            self._retry_at.pop(name, None)
        sched = self._scheduler
        if sched is not None:
            _remove_job(sched, name)

    def configure(self, *, misfire_grace_seconds: float, max_backoff_seconds: float) -> None:
        """New misfire grace and backoff cap (a reload): jobs are rescheduled with the new grace."""
        changed = misfire_grace_seconds != self._misfire_grace
        self._misfire_grace = misfire_grace_seconds
        self._max_backoff = max_backoff_seconds
        if changed and self._scheduler is not None:
            for spec in list(self._specs.values()):
                with contextlib.suppress(JobLookupError):
                    self._scheduler.modify_job(spec.name, misfire_grace_time=self._grace(spec))

    def _grace(self, spec: SourceSpec) -> int:
        """APScheduler's misfire grace of one job, whole seconds: the configured grace, but never more than the
        job's interval (a run that late is the next one anyway, coalesced), and at least 1 s."""
        return max(1, math.ceil(min(self._misfire_grace, spec.interval_seconds)))

    @property
    def sources(self) -> list[str]:
        return list(self._specs)

    def run_once(self, name: str) -> bool:
        """Sample one source now (the job body); returns success. Honours the failure backoff."""
        spec = self._specs[name]
        now = self._clock()
        with self._lock:
            if now < self._retry_at.get(name, 0.0):
                return False
        t0 = time.perf_counter()
        with self._lock:
            self._running_since[name] = time.monotonic()
        try:
            data = spec.sample()
            if self._specs.get(name) is not spec:
                self._sample_done(name, t0)
                return False  # removed (or rebuilt) by a reload while sampling: its result belongs to no one
        except SourceUnavailable as e:  # cannot exist here (e.g. no CUDA): stop sampling it, say so once
            if self._specs.get(name) is not spec:
                self._sample_done(name, t0)
                return False
            level = logging.INFO if e.expected else logging.WARNING
            log.log(level, "%s unavailable: %s — continuing without it", name, e)
            self.store.mark_unavailable(name, str(e))
            self._unschedule(name)
            self._sample_done(name, t0)
            return False
        except Exception as e:  # a failing source is reported, never fatal
            if self._specs.get(name) is not spec:
                self._sample_done(name, t0)
                return False
            dur = time.perf_counter() - t0
            self.store.fail(name, f"{type(e).__name__}: {e}", dur)
            st = self.store.get(name)
            n = st.consecutive_failures if st else 1
            backoff = min(spec.interval_seconds * 2 ** (n - 1), self._max_backoff)
            with self._lock:
                self._retry_at[name] = self._clock() + backoff
            level = logging.WARNING if n == 1 else logging.DEBUG
            log.log(level, "source %s failed (%s); retry in %.1fs", name, e, backoff)
            ok = False
            self._sample_done(name, t0)
        else:
            self._sample_done(name, t0)
            self.store.put(name, data, time.perf_counter() - t0)
            with self._lock:
                if self._retry_at.pop(name, None) is not None:
                    log.info("source %s recovered", name)
            ok = True
        for fn in self._listeners:
            try:
                fn(name, ok)
            except Exception:
                log.exception("sample listener failed")
        return ok

    def _sample_done(self, name: str, t0: float) -> None:
        with self._lock:
            self._running_since.pop(name, None)
            stuck = name in self._stuck_reported
            self._stuck_reported.discard(name)
        if stuck:
            log.info("source %s: the stuck sample returned after %.1fs", name, time.perf_counter() - t0)

    def _on_skipped_tick(self, event: JobEvent) -> None:
        """A tick not run: the source's previous sample still runs, or the tick came too late (busy host)."""
        name = event.job_id
        spec = self._specs.get(name)
        with self._lock:
            started = self._running_since.get(name)
            running = None if started is None else time.monotonic() - started
            report = (
                spec is not None
                and running is not None
                and running >= max(STUCK_AFTER_SECONDS, STUCK_INTERVALS * spec.interval_seconds)
                and name not in self._stuck_reported
            )
            if report:
                self._stuck_reported.add(name)
        if report:
            log.warning(
                "source %s: a sample has been running for %.0fs (stuck?); its ticks are skipped until it returns",
                name,
                running,
            )
        else:
            log.debug(
                "source %s: tick skipped (%s)",
                name,
                "late" if event.code == EVENT_JOB_MISSED else "previous sample still running",
            )

    def publish(self, name: str, data: Any) -> None:
        """A sample taken elsewhere (a worker process): stored and announced to the listeners like one this
        sampler took, so histories, the policy and the render cache see it the same way."""
        self.store.put(name, data, 0.0)
        for fn in self._listeners:
            try:
                fn(name, True)
            except Exception:
                log.exception("sample listener failed")

    def _unschedule(self, name: str) -> None:
        with self._lock:
            self._retry_at[name] = float("inf")  # from now on the job is a no-op even if it fires again
        sched = self._scheduler
        if sched is not None:
            # Not on this (worker) thread: APScheduler's shutdown() holds its job-store lock while it waits for
            # the workers, so a worker calling remove_job() during shutdown would deadlock.
            threading.Thread(target=_remove_job, args=(sched, name), name="zmon-unschedule", daemon=True).start()

    def _schedule(self, spec: SourceSpec) -> None:
        """First sample now on its own thread; the periodic job once it returned (so they never overlap)."""
        sched = self._scheduler
        assert sched is not None
        t = threading.Thread(
            target=self._first_sample, args=(sched, spec), name=f"zmon-first-sample-{spec.name}", daemon=True
        )
        with self._sched_lock:
            self._first_samples.append(t)
        t.start()

    def _first_sample(self, sched: BackgroundScheduler, spec: SourceSpec) -> None:
        try:
            self.run_once(spec.name)
        finally:
            with self._lock:
                unavailable = self._retry_at.get(spec.name) == float("inf")
            with self._sched_lock:
                if not self._stopping and not unavailable and self._specs.get(spec.name) is spec:
                    with contextlib.suppress(SchedulerNotRunningError):
                        sched.add_job(
                            self.run_once,
                            IntervalTrigger(seconds=spec.interval_seconds),
                            args=[spec.name],
                            id=spec.name,
                            name=f"sample:{spec.name}",
                            misfire_grace_time=self._grace(spec),
                            replace_existing=True,
                        )

    def start(self) -> None:
        if self._scheduler is not None:
            return
        self._stopping = False
        self._scheduler = BackgroundScheduler(
            logger=_aps_log,
            # Room for the sources a reload may add (each job runs on its own worker, max_instances=1).
            executors={"default": _Executor(max_workers=max(8, len(self._specs)))},
            job_defaults={"max_instances": 1, "coalesce": True},
            timezone=dt.timezone.utc,
        )
        self._scheduler.add_listener(self._on_skipped_tick, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self._scheduler.start()
        for spec in self._specs.values():
            self._schedule(spec)

    def shutdown(self) -> None:
        """Stop scheduling; wait for samples in progress (first samples: up to FIRST_SAMPLE_JOIN_SECONDS)."""
        with self._sched_lock:
            self._stopping = True
            first, self._first_samples = self._first_samples, []
        for t in first:
            if t is threading.current_thread():  # stopped from a listener of its own first sample
                continue
            t.join(FIRST_SAMPLE_JOIN_SECONDS)
            if t.is_alive():
                log.warning(
                    "the first sample of %s has not returned: not waiting for it",
                    t.name.removeprefix("zmon-first-sample-"),
                )
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


def _remove_job(scheduler: BackgroundScheduler, name: str) -> None:
    with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
        scheduler.remove_job(name)
