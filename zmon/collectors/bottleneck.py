"""Live bottleneck families (zmon_bottleneck*) from the latest "diagnosis" snapshot in the store.

Wiring: `zmon.profiling.live.install_live_diagnosis(monitor, thresholds, instrumentation=inst)` registers it.
Reads the store only: the diagnosis itself runs on the sampler's schedule, never at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.profiling.live import KINDS, LIVE_FIXES, SOURCE_NAME, VERDICTS, LiveSnapshot
from zmon.sampling.store import SnapshotStore

FIX_MAX_CHARS = 160  # label values stay short; the tailored remedy is in GET /diagnosis


class BottleneckCollector:
    """zmon_bottleneck{kind}, zmon_bottleneck_verdict{verdict}, zmon_bottleneck_info{kind,priority,fix} and
    zmon_bottleneck_window_generations. Until the window holds enough generations only the last is exported
    (unknown is absent, never 0)."""

    def __init__(self, store: SnapshotStore, source: str = SOURCE_NAME) -> None:
        self.store = store
        self.source = source

    def collect(self) -> Iterable[Metric]:
        snap = self.store.latest(self.source)
        if not isinstance(snap, LiveSnapshot):
            return
        window = GaugeMetricFamily(
            "zmon_bottleneck_window_generations",
            "Successful generations in the live diagnosis window (a diagnosis needs at least a few).",
        )
        window.add_metric([], float(snap.generations))
        yield window
        d = snap.diagnosis
        if d is None:
            return

        active = {f.kind: f for f in d.findings if f.active}
        kinds = GaugeMetricFamily(
            "zmon_bottleneck",
            "1 if the live diagnosis finds this bottleneck or misconfiguration over the window, else 0.",
            labels=["kind"],
        )
        for kind in sorted(set(KINDS) | {f.kind for f in d.findings}):
            kinds.add_metric([kind], 1.0 if kind in active else 0.0)
        yield kinds

        verdict = GaugeMetricFamily(
            "zmon_bottleneck_verdict",
            "The diagnosis flowchart's verdict over the window: 1 for the current one, 0 for the others.",
            labels=["verdict"],
        )
        for v in VERDICTS:
            verdict.add_metric([v], 1.0 if v == d.verdict else 0.0)
        yield verdict

        info = GaugeMetricFamily(
            "zmon_bottleneck_info",
            "Active findings with their priority (1 = do first) and a fixed remedy per kind; constant 1.",
            labels=["kind", "priority", "fix"],
        )
        for kind, f in sorted(active.items()):
            fix = LIVE_FIXES.get(kind, f.title)[:FIX_MAX_CHARS]
            info.add_metric([kind, str(f.priority), fix], 1.0)
        yield info
