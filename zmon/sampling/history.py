"""The recent samples of chosen sources, timestamped: what a window of generations is measured against.

Both `zmon profile` (the whole run) and the live diagnosis (a rolling window) read their GPU, CPU and
allocator figures from a SampleHistory fed by the sampler, so they see the same samples the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from zmon.sampling.store import SnapshotStore, SourceKey

T = TypeVar("T")


class SampleHistory:
    """Keeps every good sample of `keys` for `max_age_seconds` (None: forever), as (unix seconds, sample).

    `on_sample` is a sampler listener: it copies each fresh snapshot out of the store. Thread-safe.
    """

    def __init__(
        self,
        store: SnapshotStore,
        keys: Iterable[SourceKey[Any]],
        *,
        max_age_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keys = {k.name: k for k in keys}
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, deque[tuple[float, Any]]] = {name: deque() for name in self._keys}

    def on_sample(self, name: str, ok: bool) -> None:
        """Sampler listener: record the source's new sample (taken at the store's wall time)."""
        if not ok or name not in self._keys:
            return
        status = self._store.get(name)
        if status is None or status.data is None:
            return
        self.add(self._keys[name], status.taken_at_wall or self._clock(), status.data)

    def add(self, key: SourceKey[T], timestamp: float, sample: T) -> None:
        with self._lock:
            series = self._series.setdefault(key.name, deque())
            series.append((timestamp, sample))
            if self.max_age_seconds is not None:
                cutoff = timestamp - self.max_age_seconds  # relative to the newest sample, not to now
                while series and series[0][0] < cutoff:
                    series.popleft()

    def samples(self, key: SourceKey[T], since: float | None = None) -> list[tuple[float, T]]:
        """The samples of one source, oldest first, optionally only those taken at or after `since`."""
        with self._lock:
            series = list(self._series.get(key.name, ()))
        return [(t, s) for t, s in series if (since is None or t >= since) and isinstance(s, key.type)]

    def latest(self, key: SourceKey[T]) -> T | None:
        with self._lock:
            series = self._series.get(key.name)
            return series[-1][1] if series else None
