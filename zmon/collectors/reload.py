"""Configuration reload status (zmon_config_*), as Prometheus and Alertmanager export theirs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric


class ReloadState:
    """Whether the last reload worked, when the configuration in force was last loaded, and what of the file
    waits for a restart. Thread-safe; written by the reloader, read at scrape time."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._lock = threading.Lock()
        self.success = True
        self.success_at = wall()  # the start counts as a successful load (as in Prometheus)
        self.restart_required: tuple[str, ...] = ()

    def succeeded(self, restart_required: Sequence[str] = ()) -> None:
        with self._lock:
            self.success = True
            self.success_at = self._wall()
            self.restart_required = tuple(restart_required)

    def failed(self) -> None:
        with self._lock:
            self.success = False

    def snapshot(self) -> tuple[bool, float, tuple[str, ...]]:
        with self._lock:
            return self.success, self.success_at, self.restart_required


class ReloadCollector:
    def __init__(self, state: ReloadState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        ok, at, restart = self.state.snapshot()
        success = GaugeMetricFamily(
            "zmon_config_last_reload_successful",
            "1 if the last configuration reload (SIGHUP) succeeded, 0 if the file was rejected and the previous "
            "configuration is still in force.",
        )
        success.add_metric([], 1.0 if ok else 0.0)
        yield success
        when = GaugeMetricFamily(
            "zmon_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start-up or reload).",
        )
        when.add_metric([], at)
        yield when
        pending = GaugeMetricFamily(
            "zmon_config_restart_required",
            "1 while the configuration file has changes that apply only after a restart (e.g. model.id).",
        )
        pending.add_metric([], 1.0 if restart else 0.0)
        yield pending
