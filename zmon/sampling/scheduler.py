"""APScheduler jobs, one per source: call the provider, store the snapshot, back off on failure."""

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

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from zmon.providers.base import SourceUnavailable
from zmon.sampling.store import SnapshotStore

log = logging.getLogger(__name__)


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

    def add(self, spec: SourceSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"source {spec.name!r} added twice")
        self._specs[spec.name] = spec
        self.store.register(spec.name)
        if self._scheduler is not None:
            self._schedule(spec)

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

    def add_listener(self, fn: Callable[[str, bool], None]) -> None:
        """fn(source_name, success) after every attempt; exceptions are logged, never propagated."""
        self._listeners.append(fn)

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
        try:
            data = spec.sample()
            if self._specs.get(name) is not spec:
                return False  # removed (or rebuilt) by a reload while sampling: its result belongs to no one
        except SourceUnavailable as e:  # cannot exist here (e.g. no CUDA): stop sampling it, say so once
            if self._specs.get(name) is not spec:
                return False
            log.warning("%s unavailable: %s — continuing without it", name, e)
            self.store.mark_unavailable(name, str(e))
            self._unschedule(name)
            return False
        except Exception as e:  # a failing source is reported, never fatal
            if self._specs.get(name) is not spec:
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
        else:
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

    def _unschedule(self, name: str) -> None:
        with self._lock:
            self._retry_at[name] = float("inf")  # from now on the job is a no-op even if it fires again
        sched = self._scheduler
        if sched is not None:
            # Not on this (worker) thread: APScheduler's shutdown() holds its job-store lock while it waits for
            # the workers, so a worker calling remove_job() during shutdown would deadlock.
            threading.Thread(target=_remove_job, args=(sched, name), name="zmon-unschedule", daemon=True).start()

    def _schedule(self, spec: SourceSpec) -> None:
        assert self._scheduler is not None
        self._scheduler.add_job(
            self.run_once,
            IntervalTrigger(seconds=spec.interval_seconds),
            args=[spec.name],
            id=spec.name,
            name=f"sample:{spec.name}",
            next_run_time=dt.datetime.now(dt.timezone.utc),
            misfire_grace_time=self._grace(spec),
            replace_existing=True,
        )

    def start(self) -> None:
        if self._scheduler is not None:
            return
        # Room for the sources a reload may add (each job runs on its own worker, max_instances=1).
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max(8, len(self._specs)))},
            job_defaults={"max_instances": 1, "coalesce": True},
            timezone=dt.timezone.utc,
        )
        for spec in self._specs.values():
            self._schedule(spec)
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


def _remove_job(scheduler: BackgroundScheduler, name: str) -> None:
    with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
        scheduler.remove_job(name)
