"""`zmon run` with `model.devices`: one worker process per device, their metrics merged into one /metrics.

The parent is the one Monitor: the HTTP server, NVML and host sampling, the generation metrics, the JSONL
log, the live diagnosis. Each worker (zmon.app.workers.worker) ships what only it can measure — GenerationRecords,
allocator samples, the policy's and prompt cache's counters — over a pipe, and the parent's collectors render
it with the worker's `device` label (`WorkerMerge`). Why snapshots shipped to one parent rather than
prometheus_client's multiprocess mode: zmon's collectors build their families at scrape time from snapshots
(multiprocess mode only aggregates Counter/Gauge/Histogram objects written to mmap files, and needs
PROMETHEUS_MULTIPROC_DIR before import); the label set stays the configured devices (no pid label, no new
series at a restart); counters live in the parent and survive a worker's restart (a dead worker's last
counts are carried, so they never go backwards); a dead worker's gauges (allocator, rule states) disappear
with it instead of lingering in a file; and one registry means no duplicate series to keep promtool clean.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.alerting.alertmanager import DeliveryStats
from zmon.analysis.facts import EnvironmentFacts, MultiGpuFacts
from zmon.analysis.scaling import Finished, Scaling, scaling
from zmon.app.monitor import Monitor
from zmon.app.parts import add_live_diagnosis
from zmon.app.reload import ConfigSource, Plan, Reloader, hold_sighup, monitor_reloader
from zmon.app.signals import install_stop_handlers, linger, restore_handlers
from zmon.app.sources import install_sources
from zmon.app.workers.protocol import Allocator, Busy, Command, Placement, Ready, Record, Stats
from zmon.app.workers.supervisor import DevicePlanError, Supervisor, SupervisorResult, plan_devices
from zmon.capture.live import DEFAULT_WINDOW_SECONDS, LiveDiagnosis
from zmon.collectors.allocator import AllocatorCollector
from zmon.collectors.generation import GenerationMetrics
from zmon.collectors.policy import PolicyCollector
from zmon.collectors.workers import ScalingState, WorkerCollector
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.instrumentation.jsonl import JsonlLog
from zmon.instrumentation.records import GenerationRecord
from zmon.policy.actions import PolicySnapshot
from zmon.providers.allocator import AllocatorSample, AllocatorSettings
from zmon.sampling.keys import ALLOCATOR
from zmon.server import HTTPError, Request, Response

log = logging.getLogger(__name__)

SCALING_WINDOW_SECONDS = DEFAULT_WINDOW_SECONDS  # the live diagnosis' window: both judge the same generations


# ------------------------------------------------------------------------------------------------ merged state


class MergedPolicy:
    """The workers' policy states as one (PolicyCollector reads `snapshot()`, the alerts part `stats()`).

    Counters are the sum over the live workers plus what workers that went away had counted (carried, so a
    restart never makes a counter go back); gauges (pending actions, rule states) come from live workers only.
    A rule state without a device (a worker without CUDA) takes the worker's label.
    """

    def __init__(self, dry_run: bool) -> None:
        self._lock = threading.Lock()
        self.dry_run = dry_run
        self._live: dict[str, PolicySnapshot] = {}
        self._alerts: dict[str, DeliveryStats] = {}
        self._actions: dict[tuple[str, str], int] = {}
        self._decisions: dict[tuple[str, str], int] = {}
        self._firings: dict[tuple[str, str], int] = {}  # (device, rule) → carried firings
        self._freed = 0
        self._last: dict[str, tuple[float, float, int | None]] = {}  # action → (at, seconds, freed)
        self._alerts_carried = [0, 0, 0]  # ok, error, dropped
        self.any_alerts = False

    def update(self, worker: str, policy: PolicySnapshot | None, alerts: DeliveryStats | None) -> None:
        with self._lock:
            if policy is not None:
                self._live[worker] = policy
            if alerts is not None:
                self._alerts[worker] = alerts
                self.any_alerts = True

    def carry(self, worker: str) -> None:
        """The worker went away: keep its counters, drop its gauges."""
        with self._lock:
            snap = self._live.pop(worker, None)
            if snap is not None:
                for a, r, n in snap.actions:
                    self._actions[(a, r)] = self._actions.get((a, r), 0) + n
                for rule, ev, n in snap.decisions:
                    self._decisions[(rule, ev)] = self._decisions.get((rule, ev), 0) + n
                for device, st in snap.rules:
                    key = (device or worker, st.rule)
                    self._firings[key] = self._firings.get(key, 0) + st.firings_total
                self._freed += snap.freed_bytes_total
                self._last = _latest_runs(self._last, snap)
            stats = self._alerts.pop(worker, None)
            if stats is not None:
                for i, v in enumerate((stats.ok, stats.error, stats.dropped)):
                    self._alerts_carried[i] += v

    def snapshot(self) -> PolicySnapshot:
        with self._lock:
            actions = dict(self._actions)
            decisions = dict(self._decisions)
            freed = self._freed
            last = dict(self._last)
            pending = 0
            rules = []
            for worker, snap in sorted(self._live.items()):
                for a, r, n in snap.actions:
                    actions[(a, r)] = actions.get((a, r), 0) + n
                for rule, ev, n in snap.decisions:
                    decisions[(rule, ev)] = decisions.get((rule, ev), 0) + n
                freed += snap.freed_bytes_total
                pending += snap.pending_actions
                for device, st in snap.rules:
                    key = (device or worker, st.rule)
                    carried = self._firings.get(key, 0)
                    rules.append((key[0], dataclasses.replace(st, firings_total=st.firings_total + carried)))
                last = _latest_runs(last, snap)
        return PolicySnapshot(
            dry_run=self.dry_run,
            actions=tuple((a, r, n) for (a, r), n in sorted(actions.items())),
            freed_bytes_total=freed,
            last_at=tuple(sorted((a, v[0]) for a, v in last.items())),
            last_seconds=tuple(sorted((a, v[1]) for a, v in last.items())),
            last_freed=tuple(sorted((a, v[2]) for a, v in last.items() if v[2] is not None)),
            pending_actions=pending,
            rules=tuple(sorted(rules, key=lambda x: (x[0], x[1].rule))),
            decisions=tuple((rule, ev, n) for (rule, ev), n in sorted(decisions.items())),
        )

    def stats(self) -> DeliveryStats:
        with self._lock:
            ok, error, dropped = self._alerts_carried
            active = queued = 0
            for s in self._alerts.values():
                ok, error, dropped = ok + s.ok, error + s.error, dropped + s.dropped
                active += s.active
                queued += s.queued
            return DeliveryStats(ok=ok, error=error, dropped=dropped, active=active, queued=queued)


def _latest_runs(
    last: dict[str, tuple[float, float, int | None]], snap: PolicySnapshot
) -> dict[str, tuple[float, float, int | None]]:
    """action → (unix time, seconds, bytes freed) of its latest run, over `last` and one worker's snapshot."""
    out = dict(last)
    seconds = dict(snap.last_seconds)
    freed = dict(snap.last_freed)
    for action, at in snap.last_at:
        if action not in out or at > out[action][0]:
            out[action] = (at, seconds.get(action, 0.0), freed.get(action))
    return out


class MergedPromptCache:
    """The workers' prompt caches as one: hits, misses and evictions summed (carried past restarts), entries
    over the live workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, tuple[int, int, int, int]] = {}
        self._carried = [0, 0, 0]

    def update(self, worker: str, stats: tuple[int, int, int, int]) -> None:
        with self._lock:
            self._live[worker] = stats

    def carry(self, worker: str) -> None:
        with self._lock:
            s = self._live.pop(worker, None)
            if s is not None:
                for i in range(3):
                    self._carried[i] += s[i]

    def _sum(self, i: int) -> int:
        with self._lock:
            return (self._carried[i] if i < 3 else 0) + sum(s[i] for s in self._live.values())

    @property
    def hits(self) -> int:
        return self._sum(0)

    @property
    def misses(self) -> int:
        return self._sum(1)

    @property
    def evictions(self) -> int:
        return self._sum(2)

    @property
    def size(self) -> int:
        return self._sum(3)


class ScalingWindow:
    """Each worker's successful generations over the last `window_seconds`, less the first one after each
    (re)start (warm-up, compilation): what zmon.analysis.scaling measures."""

    def __init__(
        self,
        workers: int,
        window_seconds: float = SCALING_WINDOW_SECONDS,
        *,
        rate_limited: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.workers = workers
        self.window_seconds = window_seconds
        self.rate_limited = rate_limited
        self._clock = clock
        self._lock = threading.Lock()
        self._gens: deque[Finished] = deque()
        self._warming: set[str] = set()

    def started(self, worker: str) -> None:
        with self._lock:
            self._warming.add(worker)

    def add(self, worker: str, record: GenerationRecord) -> None:
        if record.status != "ok":
            return
        with self._lock:
            if worker in self._warming:
                self._warming.discard(worker)
                return
            self._gens.append(Finished(worker, record.started_at, record.total_seconds, record.batch_size))

    def current(self) -> Scaling | None:
        """None for a rate-limited workload (workers wait on purpose) or too few generations."""
        if self.rate_limited:
            return None
        cutoff = self._clock() - self.window_seconds
        with self._lock:
            while self._gens and self._gens[0].started_at < cutoff:
                self._gens.popleft()
            gens = list(self._gens)
        return scaling(gens, self.workers, min_generations=max(2, self.workers))

    def state(self) -> ScalingState | None:
        sc = self.current()
        return None if sc is None else ScalingState(sc.efficiency, sc.worker_images_per_second)

    def multi_gpu(self) -> MultiGpuFacts | None:
        """For the diagnosis: the workers' count and speedup (None with one worker)."""
        if self.workers < 2:
            return None
        sc = self.current()
        return MultiGpuFacts(gpu_count=self.workers, speedup_vs_single=None if sc is None else sc.speedup)


class WorkerMerge:
    """The parent's WorkerSink: every worker's messages into the generation metrics, JSONL log, live diagnosis,
    merged allocator sample, policy and prompt-cache state, and the scaling window."""

    def __init__(
        self,
        mon: Monitor,
        metrics: GenerationMetrics,
        placements: list[Placement],
        *,
        jsonl: JsonlLog | None = None,
        scaling_window: ScalingWindow,
        policy: MergedPolicy,
        prompt_cache: MergedPromptCache,
        model_id: str,
    ) -> None:
        self.mon = mon
        self.metrics = metrics
        self.placements = placements
        self.jsonl = jsonl
        self.scaling = scaling_window
        self.policy = policy
        self.prompt_cache = prompt_cache
        self.model_id = model_id
        self.record_listeners: list[Callable[[GenerationRecord], None]] = []
        # (worker, message, relabelled record): for consumers that need the workload item (the profile)
        self.raw_listeners: list[Callable[[str, Record, GenerationRecord], None]] = []
        self.environment: EnvironmentFacts | None = None
        self.ready_messages: dict[str, Ready] = {}
        self._allocator: dict[str, AllocatorSample] = {}
        self._busy: set[str] = set()
        self._pipeline_set = False
        self._lock = threading.Lock()

    def ready(self, worker: str, message: Ready) -> None:
        self.ready_messages[worker] = message
        self.scaling.started(worker)
        if self.environment is None and message.environment is not None:
            self.environment = message.environment
        if not self._pipeline_set:
            self._pipeline_set = True
            devices = ",".join(p.label for p in self.placements)
            self.metrics.set_pipeline(dataclasses.replace(message.pipeline, device=devices))
            self.metrics.facts.distilled = message.distilled

    def record(self, worker: str, message: Record) -> None:
        record = dataclasses.replace(message.record, device=worker)  # "cpu" twice would merge two workers
        try:
            self.metrics.observe(record)
        except Exception:
            log.exception("generation metrics failed to account a record")
        if self.jsonl is not None:
            self.jsonl.write(record, model=self.model_id)
        self.scaling.add(worker, record)
        for listener in list(self.record_listeners):
            try:
                listener(record)
            except Exception:
                log.exception("record listener %r failed", listener)
        for raw in list(self.raw_listeners):
            try:
                raw(worker, message, record)
            except Exception:
                log.exception("record listener %r failed", raw)

    def message(self, worker: str, message: object) -> None:
        if isinstance(message, Busy):
            with self._lock:
                was = worker in self._busy
                if message.busy:
                    self._busy.add(worker)
                else:
                    self._busy.discard(worker)
            if message.busy and not was:
                self.metrics.generation_started()
            elif not message.busy and was:
                self.metrics.generation_finished()
        elif isinstance(message, Allocator):
            with self._lock:
                self._allocator[worker] = message.sample
            self._put_allocator()
        elif isinstance(message, Stats):
            self.policy.update(worker, message.policy, message.alerts)
            if message.prompt_cache is not None:
                self.prompt_cache.update(worker, message.prompt_cache)

    def down(self, worker: str) -> None:
        self.policy.carry(worker)
        self.prompt_cache.carry(worker)
        with self._lock:
            gone = self._allocator.pop(worker, None) is not None
            busy = worker in self._busy
            self._busy.discard(worker)
        if busy:  # it died in a generation
            self.metrics.generation_finished()
        if gone:
            self._put_allocator()

    def _put_allocator(self) -> None:
        with self._lock:
            samples = list(self._allocator.values())
        devices = tuple(sorted((d for s in samples for d in s.devices), key=lambda d: d.device))
        settings = samples[0].settings if samples else AllocatorSettings()
        merged = AllocatorSample(
            devices,
            settings,
            cuda_initialized=any(s.cuda_initialized for s in samples),
            taken_at=max((s.taken_at for s in samples), default=time.monotonic()),
        )
        self.mon.sampler.publish(ALLOCATOR.name, merged)


# ------------------------------------------------------------------------------------------------ the parent


class WorkerParent:
    """The parent's Monitor, collectors and merge for `zmon run` with workers."""

    def __init__(
        self,
        cfg: Config,
        placements: list[Placement],
        *,
        registry: CollectorRegistry | None = None,
        serve_http: bool = True,
        nvml: Any | None = None,
    ) -> None:
        self.cfg = cfg
        self.placements = placements
        mon = Monitor(cfg.sampling, cfg.server, mode="run", registry=registry, serve_http=serve_http)
        self.monitor = mon
        self.metrics = GenerationMetrics(model=cfg.model.id)
        mon.add_collector("generation", self.metrics)
        # Worker processes come and go: the process source (one pid) is left out; NVML lists them all.
        self._nvml = nvml
        install_sources(mon, cfg.sampling, watched_pid=None, nvml=nvml)
        if cfg.sampling.allocator.enabled and any(p.cuda_index is not None for p in placements):
            mon.store.register(ALLOCATOR.name)
            mon.add_collector("allocator", AllocatorCollector(mon.store), sources=(ALLOCATOR,))
        self.policy = MergedPolicy(cfg.policy.dry_run)
        self.prompt_cache = MergedPromptCache()
        if cfg.workload.prompt_cache.enabled:
            self.metrics.set_prompt_cache(self.prompt_cache)
        jsonl = None
        if cfg.workload.jsonl.path is not None:
            jsonl = JsonlLog(cfg.workload.jsonl.path, cfg.workload.jsonl.max_bytes, cfg.workload.jsonl.backups)
            self.metrics.set_jsonl_failures(lambda: jsonl.failures)
            mon.add_closer(jsonl.close)
        self.scaling = ScalingWindow(len(placements), rate_limited=cfg.workload.rate_per_second is not None)
        self.merge = WorkerMerge(
            mon,
            self.metrics,
            placements,
            jsonl=jsonl,
            scaling_window=self.scaling,
            policy=self.policy,
            prompt_cache=self.prompt_cache,
            model_id=cfg.model.id,
        )
        self.live: LiveDiagnosis = add_live_diagnosis(
            mon,
            cfg.diagnosis_thresholds,
            model_id=cfg.model.id,
            environment=lambda: self.merge.environment,
            multi_gpu=self.scaling.multi_gpu,
        )
        self.merge.record_listeners.append(self.live.observe)
        self.supervisor: Supervisor | None = None
        if cfg.policy.enabled:
            mon.add_collector("policy", PolicyCollector(self.policy, self.policy if cfg.alerting.enabled else None))
            mon.http.add_route("/actions", self._actions, methods=("POST",), auth=True)

    def reloader(self, source: ConfigSource) -> Reloader:
        """SIGHUP in worker mode: what the parent runs applies live (serving, its sources, logging, the live
        diagnosis' thresholds); what the workers run (model, workload, policy, alerting, their allocator
        sampling) waits for a restart, logged as such (zmon_config_restart_required 1)."""
        mon = self.monitor

        def thresholds(new: Config) -> None:
            self.live.thresholds = new.diagnosis_thresholds

        return monitor_reloader(
            mon,
            self.cfg,
            source,
            mode="run",
            plan=WORKERS_PLAN,
            rebuild_sources=lambda sampling: install_sources(mon, sampling, watched_pid=None, nvml=self._nvml),
            apply_more=thresholds,
        )

    def supervise(self, limit: int | None, *, entry: Callable[..., None] | None = None) -> Supervisor:
        """The supervisor of this parent's workers (`entry`: the worker process target, for tests)."""
        sup = Supervisor(self.cfg, self.placements, self.merge, limit=limit, entry=entry)
        self.supervisor = sup
        self.monitor.add_collector("workers", WorkerCollector(sup.statuses, self.scaling.state))
        return sup

    def _actions(self, req: Request) -> Response:
        """POST /actions {"action": ...}: queued in every ready worker for its next safe point."""
        body = req.json()
        action = body.get("action") if isinstance(body, dict) else None
        if action not in ("empty_cache", "gc_collect"):
            raise HTTPError(400, 'expected JSON {"action": "empty_cache" | "gc_collect"}')
        sup = self.supervisor
        reached = 0 if sup is None else sup.send(Command(action))
        if reached == 0:
            raise HTTPError(503, "no worker is ready to take the action")
        return Response(202, {"queued": action, "workers": reached})


# SIGHUP in worker mode (WorkerParent.reloader): the workers got their configuration when they started.
WORKERS_PLAN = Plan(
    restart=("model", "workload", "profiling.trace", "policy", "alerting", "sampling.allocator"),
    live=("server", "sampling", "logging", "profiling.thresholds"),
    unused=("sampling.process",),  # the parent watches no single process
)


def run_workers_main(cfg: Config, *, linger_seconds: float = 0.0, source: ConfigSource | None = None) -> int:
    """`zmon run` with `model.devices`: supervise one worker per device; returns the exit code.

    The first SIGTERM/SIGINT drains (each worker finishes its current generation) and exits 0; a second one
    in the parent stops waiting for them. SIGHUP reloads what the parent runs (`WorkerParent.reloader`)."""
    assert cfg.model.devices is not None
    try:
        placements = plan_devices(cfg.model.devices)
    except DevicePlanError as e:
        log.error("%s", e)
        return EXIT_USAGE
    stop = threading.Event()
    previous = install_stop_handlers(stop, "draining the workers (again to stop waiting)")
    hold_sighup()  # the CLI installed it already: a SIGHUP before the reloader starts is queued for it
    parent: WorkerParent | None = None
    reloader: Reloader | None = None
    try:
        try:
            parent = WorkerParent(cfg, placements)
            sup = parent.supervise(cfg.workload.max_generations)
            reloader = parent.reloader(source or ConfigSource(lambda: cfg))
            parent.monitor.start()
        except OSError as e:
            log.error("cannot start: %s", e)
            return EXIT_FAILURE
        reloader.start()
        log.info("starting %d worker(s) on %s", len(placements), ", ".join(p.label for p in placements))
        result: SupervisorResult = sup.run(stop)
        for label, state in result.outcomes.items():
            restarts = sum(result.restarts.get(label, {}).values())
            log.info("worker %s: %s%s", label, state, f" after {restarts} restart(s)" if restarts else "")
        linger(stop, linger_seconds)
        return result.exit_code
    except KeyboardInterrupt:
        log.info("interrupted")
        return EXIT_OK
    finally:
        if reloader is not None:
            reloader.stop()
        if parent is not None:
            parent.monitor.stop()
        restore_handlers(previous)
