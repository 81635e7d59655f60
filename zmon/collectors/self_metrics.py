"""zmon's own health: build info, per-source success, duration, sample age, availability, failures."""

from __future__ import annotations

import platform
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.collectors.base import ExpositionErrors
from zmon.sampling.store import SnapshotStore
from zmon.version import __version__


class SelfCollector:
    def __init__(self, store: SnapshotStore, errors: ExpositionErrors, mode: str) -> None:
        self.store = store
        self.errors = errors
        self.mode = mode

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily("zmon_build", "zmon version and runtime; constant 1.")
        info.add_metric([], {"version": __version__, "python": platform.python_version(), "mode": self.mode})
        yield info

        success = GaugeMetricFamily(
            "zmon_collector_success", "1 if the last sample of the source succeeded, else 0.", labels=["collector"]
        )
        duration = GaugeMetricFamily(
            "zmon_collector_duration_seconds", "Duration of the last sample of the source.", labels=["collector"]
        )
        age = GaugeMetricFamily(
            "zmon_sample_age_seconds", "Age of the latest good sample of the source.", labels=["collector"]
        )
        available = GaugeMetricFamily(
            "zmon_collector_available",
            "1 if the source can exist on this host, 0 if not (e.g. no NVML library or no GPU).",
            labels=["collector"],
        )
        failures = CounterMetricFamily("zmon_collector_failures", "Failed samples of the source.", labels=["collector"])
        for st in self.store.all():
            available.add_metric([st.name], 1.0 if st.available else 0.0)
            if not st.available:
                continue
            failures.add_metric([st.name], float(st.failures_total))
            if st.last_success is not None:
                success.add_metric([st.name], 1.0 if st.last_success else 0.0)
            if st.last_duration_seconds is not None:
                duration.add_metric([st.name], st.last_duration_seconds)
            a = self.store.age_seconds(st.name)
            if a is not None:
                age.add_metric([st.name], a)
        yield from (success, duration, age, available, failures)

        errs = CounterMetricFamily(
            "zmon_exposition_errors",
            "Scrapes in which the collector raised and its families were left out.",
            labels=["collector"],
        )
        for name, n in sorted(self.errors.snapshot().items()):
            errs.add_metric([name], float(n))
        yield errs
