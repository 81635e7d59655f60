"""Live bottleneck families (zmon_bottleneck*) from the latest "diagnosis" snapshot in the store.

The live diagnosis (zmon.capture.live, scheduled as the "diagnosis" source) stores a `BottleneckState`: plain
values, so this collector knows nothing of the analysis that produced them. Reads the store only: the
diagnosis runs on the sampler's schedule, never at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.sampling.store import SnapshotStore, SourceKey

FIX_MAX_CHARS = 160  # label values stay short; the tailored remedy is in GET /diagnosis


@dataclass(frozen=True)
class FindingState:
    kind: str
    active: bool
    priority: int
    fix: str  # a fixed remedy per kind: live figures in a label would mint a new series at every evaluation


@dataclass(frozen=True)
class BottleneckState:
    """One evaluation of the live window. `verdict` None: not enough generations yet (only the count)."""

    generations: int  # successful generations in the window
    verdict: str | None
    verdicts: tuple[str, ...]  # every verdict the flowchart can give (each exported, 1 for the current)
    findings: tuple[FindingState, ...]  # every kind, active or not


DIAGNOSIS: SourceKey[BottleneckState] = SourceKey("diagnosis", BottleneckState)


class BottleneckCollector:
    """zmon_bottleneck{kind}, zmon_bottleneck_verdict{verdict}, zmon_bottleneck_info{kind,priority,fix} and
    zmon_bottleneck_window_generations. Until the window holds enough generations only the last is exported
    (unknown is absent, never 0)."""

    def __init__(self, store: SnapshotStore, key: SourceKey[BottleneckState] = DIAGNOSIS) -> None:
        self.store = store
        self.key = key

    def collect(self) -> Iterable[Metric]:
        snap = self.store.latest(self.key)
        if snap is None:
            return
        window = GaugeMetricFamily(
            "zmon_bottleneck_window_generations",
            "Successful generations in the live diagnosis window (a diagnosis needs at least a few).",
        )
        window.add_metric([], float(snap.generations))
        yield window
        if snap.verdict is None:
            return

        kinds = GaugeMetricFamily(
            "zmon_bottleneck",
            "1 if the live diagnosis finds this bottleneck or misconfiguration over the window, else 0.",
            labels=["kind"],
        )
        for f in sorted(snap.findings, key=lambda f: f.kind):
            kinds.add_metric([f.kind], 1.0 if f.active else 0.0)
        yield kinds

        verdict = GaugeMetricFamily(
            "zmon_bottleneck_verdict",
            "The diagnosis flowchart's verdict over the window: 1 for the current one, 0 for the others.",
            labels=["verdict"],
        )
        for v in snap.verdicts:
            verdict.add_metric([v], 1.0 if v == snap.verdict else 0.0)
        yield verdict

        info = GaugeMetricFamily(
            "zmon_bottleneck_info",
            "Active findings with their priority (1 = do first) and a fixed remedy per kind; constant 1.",
            labels=["kind", "priority", "fix"],
        )
        for f in sorted(snap.findings, key=lambda f: f.kind):
            if f.active:
                info.add_metric([f.kind, str(f.priority), f.fix[:FIX_MAX_CHARS]], 1.0)
        yield info
