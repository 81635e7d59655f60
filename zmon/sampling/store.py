"""Thread-safe store of the latest immutable snapshot and the health of every sampled source."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


@dataclass(frozen=True)
class SourceKey(Generic[T]):
    """A source's name and the type of its samples (the concrete keys: zmon.sampling.keys)."""

    name: str
    type: type[T]

    def __str__(self) -> str:
        return self.name


Key = str | SourceKey[Any]  # a source by name or by its typed key


def key_name(key: Key) -> str:
    return key if isinstance(key, str) else key.name


@dataclass(frozen=True)
class SourceStatus:
    """What the store knows about one source: its latest good sample and its last attempt."""

    name: str
    data: Any = None  # the provider's immutable sample (None until the first success)
    taken_at: float | None = None  # monotonic seconds of the last successful sample
    taken_at_wall: float | None = None  # unix seconds of the same
    last_success: bool | None = None  # outcome of the last attempt (None before any)
    last_duration_seconds: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    failures_total: int = 0
    attempts_total: int = 0
    available: bool = True  # False when the source cannot exist here (no NVML library, no GPU)
    unavailable_reason: str | None = None


class SnapshotStore:
    """Latest snapshot per source. Writers are sampling jobs; readers are collectors at scrape time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._status: dict[str, SourceStatus] = {}
        self._changed = threading.Condition(self._lock)

    def now(self) -> float:
        return self._clock()

    def register(self, name: str, *, available: bool = True, reason: str | None = None) -> None:
        with self._lock:
            self._status.setdefault(name, SourceStatus(name, available=available, unavailable_reason=reason))

    def unregister(self, name: str) -> None:
        """Forget a source (no longer sampled after a reload): it leaves readiness and the self-metrics."""
        with self._lock:
            self._status.pop(name, None)
            self._changed.notify_all()

    def mark_unavailable(self, name: str, reason: str) -> None:
        """The source turned out not to exist here: it no longer counts for readiness or success."""
        with self._lock:
            old = self._status.get(name, SourceStatus(name))
            self._status[name] = replace(old, available=False, unavailable_reason=reason)
            self._changed.notify_all()

    def put(self, name: str, data: Any, duration_seconds: float) -> None:
        with self._lock:
            old = self._status.get(name, SourceStatus(name))
            self._status[name] = replace(
                old,
                data=data,
                taken_at=self._clock(),
                taken_at_wall=self._wall(),
                last_success=True,
                last_duration_seconds=duration_seconds,
                last_error=None,
                consecutive_failures=0,
                attempts_total=old.attempts_total + 1,
            )
            self._changed.notify_all()

    def fail(self, name: str, error: str, duration_seconds: float) -> None:
        with self._lock:
            old = self._status.get(name, SourceStatus(name))
            self._status[name] = replace(
                old,
                last_success=False,
                last_duration_seconds=duration_seconds,
                last_error=error,
                consecutive_failures=old.consecutive_failures + 1,
                failures_total=old.failures_total + 1,
                attempts_total=old.attempts_total + 1,
            )
            self._changed.notify_all()

    def get(self, key: Key) -> SourceStatus | None:
        with self._lock:
            return self._status.get(key_name(key))

    @overload
    def latest(self, key: SourceKey[T]) -> T | None: ...

    @overload
    def latest(self, key: str) -> Any: ...

    def latest(self, key: Key) -> Any:
        """The latest good sample of a source, or None (also when it is not of the key's type)."""
        st = self.get(key)
        data = None if st is None else st.data
        if isinstance(key, SourceKey) and not isinstance(data, key.type):
            return None
        return data

    def all(self) -> list[SourceStatus]:
        with self._lock:
            return sorted(self._status.values(), key=lambda s: s.name)

    def age_seconds(self, key: Key) -> float | None:
        st = self.get(key)
        if st is None or st.taken_at is None:
            return None
        return max(0.0, self._clock() - st.taken_at)

    def ready(self) -> bool:
        """True once every available source has produced at least one good sample."""
        with self._lock:
            return all(s.taken_at is not None for s in self._status.values() if s.available)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if all(s.taken_at is not None for s in self._status.values() if s.available):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
