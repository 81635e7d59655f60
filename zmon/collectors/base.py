"""Shared collector plumbing: a guard so one broken collector never breaks the scrape."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol

from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class ExpositionErrors:
    """Counts collectors whose collect() raised during a scrape (exported by the self collector)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class Guarded:
    """Wraps a collector: an exception drops its families from this scrape and is counted, not raised.

    `cache_key`, when given, returns a value that changes whenever the collector's output may change (the
    timestamps of the snapshots it reads): the HTTP layer then re-renders its text only when the key moves.
    """

    def __init__(
        self,
        name: str,
        inner: Collector,
        errors: ExpositionErrors,
        cache_key: Callable[[], Hashable] | None = None,
        sources: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.inner = inner
        self.errors = errors
        self.cache_key = cache_key
        self.sources = tuple(sources)  # the store sources the output depends on (empty: render every scrape)
        self.failed_last = False

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self.inner.collect())
        except Exception:
            log.exception("collector %s failed during scrape", self.name)
            self.errors.add(self.name)
            self.failed_last = True
            return []
        self.failed_last = False
        return families

    def describe(self) -> Iterable[Metric]:
        # Unchecked registration: families are dynamic (GPUs appear and disappear).
        return []
