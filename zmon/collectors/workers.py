"""Data-parallel worker families (zmon_worker_*, zmon_scaling_efficiency_ratio) from the supervisor's state.

One series per configured worker, labelled by its `device` ("cuda:1", "cpu:0"): the label set is fixed by
`model.devices`, so a restart never mints a new series (no pid label) and a given-up worker keeps reporting
up 0. Unknown is absent: the heartbeat age only while a worker runs, the rates and the efficiency once
enough generations were seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric


@dataclass(frozen=True)
class ScalingState:
    """The latest scaling figures (zmon.analysis.scaling): efficiency and each worker's steady-state rate."""

    efficiency: float
    worker_images_per_second: Mapping[str, float]


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the supervisor sees it now."""

    device: str  # the device label
    up: bool  # running and ready
    state: str  # starting, ready, backoff, done, given_up, fatal, stopped
    restarts: Mapping[str, int]  # reason (exit, hang, start_timeout) → restarts
    heartbeat_age_seconds: float | None  # since its last sign of progress; None unless ready


STATES = ("starting", "ready", "backoff", "done", "given_up", "fatal", "stopped")


class WorkerCollector:
    """zmon_worker_up{device}, zmon_worker_state{device,state}, zmon_worker_restarts_total{device,reason},
    zmon_worker_heartbeat_age_seconds{device}, zmon_worker_images_per_second{device} and
    zmon_scaling_efficiency_ratio."""

    def __init__(
        self,
        statuses: Callable[[], list[WorkerStatus]],
        scaling: Callable[[], ScalingState | None],
    ) -> None:
        self._statuses = statuses
        self._scaling = scaling

    def collect(self) -> Iterable[Metric]:
        statuses = sorted(self._statuses(), key=lambda s: s.device)
        up = GaugeMetricFamily(
            "zmon_worker_up",
            "1 while the device's worker process runs and has its pipeline loaded, else 0.",
            labels=["device"],
        )
        state = GaugeMetricFamily(
            "zmon_worker_state",
            "The worker's state: 1 for the current one, 0 for the others.",
            labels=["device", "state"],
        )
        restarts = CounterMetricFamily(
            "zmon_worker_restarts",
            "Worker processes restarted, by reason: exit (crashed), hang (no heartbeat), start_timeout.",
            labels=["device", "reason"],
        )
        age = GaugeMetricFamily(
            "zmon_worker_heartbeat_age_seconds",
            "Time since the worker last showed progress (a denoise step, a generation boundary, an idle tick).",
            labels=["device"],
        )
        for s in statuses:
            up.add_metric([s.device], 1.0 if s.up else 0.0)
            for st in STATES:
                state.add_metric([s.device, st], 1.0 if st == s.state else 0.0)
            for reason, n in sorted(s.restarts.items()):
                restarts.add_metric([s.device, reason], float(n))
            if s.heartbeat_age_seconds is not None:
                age.add_metric([s.device], s.heartbeat_age_seconds)
        yield from (up, state, restarts, age)

        sc = self._scaling()
        if sc is None:
            return
        rate = GaugeMetricFamily(
            "zmon_worker_images_per_second",
            "The worker's steady-state throughput while generating: its images / the time it spent generating "
            "them, over the scaling window.",
            labels=["device"],
        )
        for device, r in sorted(sc.worker_images_per_second.items()):
            rate.add_metric([device], r)
        yield rate
        yield GaugeMetricFamily(
            "zmon_scaling_efficiency_ratio",
            "Aggregate images/s of the workers / (configured workers × a worker's steady-state images/s), "
            "over the scaling window; 1 = every worker busy all the time.",
            value=sc.efficiency,
        )
