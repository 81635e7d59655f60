"""The in-process parts around an instrumented pipeline: the policy, live diagnosis, the trace endpoint, and
their HTTP routes (`zmon run`, `zmon.attach`).

Each `add_*` builds its part from its own sub-config and registers it on a Monitor; nothing below the
composition root knows the Monitor.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zmon.alerting import AlertmanagerClient
from zmon.analysis.facts import EnvironmentFacts, IoFacts, MultiGpuFacts
from zmon.analysis.stats import rate
from zmon.app.monitor import Monitor
from zmon.capture.environment import environment_facts
from zmon.capture.live import DEFAULT_INTERVAL_SECONDS, DEFAULT_WINDOW_SECONDS, HISTORY_MARGIN_SECONDS, LiveDiagnosis
from zmon.capture.trace import TraceBusy, TraceController
from zmon.collectors.bottleneck import DIAGNOSIS, BottleneckCollector
from zmon.collectors.policy import PolicyCollector
from zmon.config import (
    AlertingConfig,
    ListenAddress,
    PolicyConfig,
    Thresholds,
    TraceConfig,
)
from zmon.instrumentation.boundaries import Boundaries
from zmon.instrumentation.records import GenerationRecord
from zmon.instrumentation.stages import StageTimingHandle
from zmon.policy import PolicyRunner
from zmon.sampling import SampleHistory, SnapshotStore
from zmon.sampling.keys import ALLOCATOR, DISK, HOST, NVML, PROCESS
from zmon.server import HTTPError, Request, Response

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ policy


class WorkloadFigures:
    """Figures for policy rules that come from outside the allocator: NVML, host, the watched process and the
    generations seen (fed as GenerationRecords). Read from the store at evaluation time, on the sampler thread."""

    def __init__(self, store: SnapshotStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._last_seconds: float | None = None
        self._finished = 0
        self._seen = 0
        self._proc_prev: tuple[float, float] | None = None  # (monotonic, cpu seconds)

    def observe(self, record: GenerationRecord) -> None:
        with self._lock:
            self._finished += 1
            if record.status == "ok":
                self._last_seconds = record.total_seconds

    def __call__(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        nvml = self.store.latest(NVML)
        gpus = [g for g in (nvml.gpus if nvml is not None else ()) if g.up]
        if gpus:
            g = gpus[0]  # rules see the first GPU; per-GPU alerting belongs in Prometheus rules
            out["gpu_utilization_ratio"] = g.utilization_gpu_ratio
            if g.memory_used_bytes is not None and g.memory_total_bytes:
                out["gpu_memory_used_ratio"] = g.memory_used_bytes / g.memory_total_bytes
            out["gpu_temperature_celsius"] = g.temperature_celsius
            out["gpu_power_watts"] = g.power_watts
        host = self.store.latest(HOST)
        if host is not None:
            out["host_cpu_utilization_ratio"] = host.cpu_utilization_ratio
            if host.memory_total_bytes:
                out["host_memory_available_ratio"] = host.memory_available_bytes / host.memory_total_bytes
        proc = self.store.latest(PROCESS)
        if proc is not None and proc.exists and proc.cpu_user_seconds is not None and host and host.cpu_count:
            point = (self._clock(), proc.cpu_user_seconds + (proc.cpu_system_seconds or 0.0))
            cores = rate(self._proc_prev, point)
            if cores is not None:
                out["process_cpu_utilization_ratio"] = cores / host.cpu_count
            self._proc_prev = point
        with self._lock:
            out["generation_seconds"] = self._last_seconds
            out["generations_delta"] = float(self._finished - self._seen)
            self._seen = self._finished
        return {k: v for k, v in out.items() if v is not None}


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


def target_instance(host: str, port: int) -> str:
    """The `instance` label Prometheus gives the target zmon serves on host:port: the address as written, or,
    for a wildcard address (0.0.0.0, ::), this host's name (what a Prometheus elsewhere scrapes); IPv6 in
    brackets. A loopback address stays as it is: only a Prometheus on this host can scrape it, by that name."""
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def monitor_instance(mon: Monitor) -> str:
    """target_instance of what `mon` serves: the configured listen host and the bound port (a listen port 0
    is known only once bound); the listen address when it serves no HTTP."""
    listen = mon.server_config.listen
    server = mon.server
    return target_instance(listen.host, server.port if server is not None else listen.port)


@dataclass(frozen=True)
class PolicyParts:
    """The policy watching this process: `runner` is a boundary listener (safe points are the gaps between
    generations), `figures` wants every GenerationRecord, `alerts` sends (or, with no Alertmanager URL,
    only tracks) the alerts the rules fire."""

    runner: PolicyRunner
    figures: WorkloadFigures
    alerts: AlertmanagerClient

    def reconfigure(self, mon: Monitor, policy: PolicyConfig, alerting: AlertingConfig) -> None:
        """New policy and alerting settings (a reload): rules keep their state where unchanged, alerts follow
        the Alertmanager URLs and labels."""
        self.runner.reconfigure(policy)
        if self.alerts.generator_url is not None:  # None: zmon serves no HTTP of its own (attach, host registry)
            self.alerts.generator_url = mon.server_config.listen.url("/metrics")
        self.alerts.reconfigure(alerting)


def add_policy(
    mon: Monitor, policy: PolicyConfig, alerting: AlertingConfig, *, listen: ListenAddress | None
) -> PolicyParts | None:
    """Policy rules evaluated after every allocator sample (after every host sample where there is no CUDA
    allocator), with actions at safe points, alerts to Alertmanager and POST /actions.

    `listen` is where zmon's /metrics is served (a worker passes its parent's), None when zmon serves none of
    its own (attach into the host's registry): then no zmon URL is invented for the alerts' generator and
    runbook links. Alerts carry `instance` = alerting.instance, else what Prometheus calls this target
    (monitor_instance), else (no listen address) this host's name; they are resolved when the monitor stops
    unless alerting.resolve_on_shutdown is false (read at that moment, so a reload can change it)."""
    if not policy.enabled:
        return None
    alerts = AlertmanagerClient(
        alerting,
        generator_url=None if listen is None else listen.url("/metrics"),
        instance=None if listen is None else (lambda: monitor_instance(mon)),
    )
    mon.add_closer(lambda: alerts.close(timeout=5.0, resolve_active=alerts.config.resolve_on_shutdown))
    runner = PolicyRunner(policy, alerts=alerts)
    figures = WorkloadFigures(mon.store)

    def on_sample(name: str, ok: bool) -> None:
        alloc = mon.store.get(ALLOCATOR)
        trigger = ALLOCATOR.name if alloc is not None and alloc.available else HOST.name
        if name == trigger and ok:
            runner.observe(mon.store.latest(ALLOCATOR), extra=figures())

    mon.sampler.add_listener(on_sample)
    mon.add_collector("policy", PolicyCollector(runner.state, alerts))
    mon.http.add_route("/actions", actions_handler(runner), methods=("POST",), auth=True)
    return PolicyParts(runner, figures, alerts)


def actions_handler(runner: PolicyRunner) -> Callable[[Request], Response]:
    """POST /actions {"action": "empty_cache" | "gc_collect"}: queued for the next safe point."""

    def handle(req: Request) -> Response:
        body = req.json()
        action = body.get("action") if isinstance(body, dict) else None
        if action not in ("empty_cache", "gc_collect"):
            raise HTTPError(400, 'expected JSON {"action": "empty_cache" | "gc_collect"}')
        runner.gate.submit(action, "requested over HTTP")
        runner.idle_tick()  # runs now if no generation is in progress, else at the end of the current one
        return Response(202, {"queued": action, "pending": list(runner.gate.pending())})

    return handle


# ------------------------------------------------------------------------------------------------ diagnosis


def add_live_diagnosis(
    mon: Monitor,
    thresholds: Thresholds,
    *,
    pipe: Any | None = None,
    model_id: str | None = None,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
    io: IoFacts | None = None,
    environment: Callable[[], EnvironmentFacts | None] | None = None,
    multi_gpu: Callable[[], MultiGpuFacts | None] | None = None,
) -> LiveDiagnosis:
    """The "diagnosis" source (every `interval_seconds`), the zmon_bottleneck* collector and GET /diagnosis.

    Feed it every GenerationRecord (`live.observe`); with `pipe` its environment is described from the
    pipeline (once, lazily), else by `environment` when given (data-parallel workers: what a worker said).
    """
    history = SampleHistory(
        mon.store, (NVML, HOST, PROCESS, ALLOCATOR, DISK), max_age_seconds=window_seconds + HISTORY_MARGIN_SECONDS
    )
    mon.sampler.add_listener(history.on_sample)
    if pipe is not None:

        def environment() -> EnvironmentFacts:
            return environment_facts(pipe, model_id=model_id or type(pipe).__name__)

    live = LiveDiagnosis(
        history, thresholds, window_seconds=window_seconds, environment=environment, io=io, multi_gpu=multi_gpu
    )
    mon.add_source(DIAGNOSIS, live.evaluate_state, interval_seconds)
    mon.add_collector("bottleneck", BottleneckCollector(mon.store), sources=(DIAGNOSIS,))
    mon.http.add_route("/diagnosis", diagnosis_handler(live), methods=("GET", "HEAD"))
    return live


def diagnosis_handler(live: LiveDiagnosis) -> Callable[[Request], Response]:
    """GET /diagnosis: the latest evaluation as JSON (read-only, no auth)."""

    def handle(_: Request) -> Response:
        snap = live.latest or live.evaluate()
        return Response(200, snap.to_dict())

    return handle


# ------------------------------------------------------------------------------------------------ traces


def add_trace_endpoint(
    mon: Monitor, config: TraceConfig, *, boundaries: Boundaries, stage_timing: StageTimingHandle | None
) -> TraceController | None:
    """POST/GET /trace (bearer token required) when `profiling.trace.enabled`; else nothing."""
    if not config.enabled:
        return None
    controller = TraceController(config.directory.expanduser(), config.max_generations, stage_timing=stage_timing)
    boundaries.add(controller)
    mon.http.add_route("/trace", trace_handler(controller), methods=("GET", "POST"), auth=True)
    mon.add_closer(controller.close)  # stop a capture still running when the monitor stops
    return controller


def trace_handler(controller: TraceController) -> Callable[[Request], Response]:
    """The /trace route: POST {"generations": N} arms a capture (202), GET reports the state (200)."""

    def handle(req: Request) -> Response:
        if req.method == "GET":
            return Response(200, controller.status())
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, f'body must be a JSON object like {{"generations": 2}}, got {body!r}')
        unknown = sorted(set(body) - {"generations"})
        if unknown:
            raise HTTPError(400, f'unknown key(s) {", ".join(unknown)}; expected {{"generations": N}}')
        try:
            path = controller.request(body.get("generations", 1))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        except TraceBusy as e:
            raise HTTPError(409, str(e)) from None
        except OSError as e:
            raise HTTPError(500, f"cannot create {controller.directory}: {e.strerror or e}") from None
        return Response(
            202,
            {"state": "armed", "generations": controller.requested, "path": str(path), "status_url": "/trace"},
        )

    return handle
