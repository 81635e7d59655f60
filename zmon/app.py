"""Composition root: wires providers → sampler → snapshot store → collectors → HTTP server."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.collectors.base import Collector, ExpositionErrors, Guarded
from zmon.collectors.self_metrics import SelfCollector
from zmon.config import Config, parse_listen
from zmon.providers.base import SourceUnavailable
from zmon.sampling import Sampler, SnapshotStore, SourceSpec
from zmon.server import App, HTTPError, Limits, RenderCache, Request, Response, Server

log = logging.getLogger(__name__)


class Monitor:
    """One zmon instance: a store, a sampler, a registry of zmon's own and (optionally) an HTTP server.

    Everything that acts on data (workload, policy, attach) plugs in through `add_source`,
    `add_collector`, `http.add_route` and `sampler.add_listener`. Scrapes only read the store.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        mode: str,
        registry: CollectorRegistry | None = None,
        store: SnapshotStore | None = None,
        serve_http: bool = True,
    ) -> None:
        self.cfg = cfg
        self.mode = mode
        self.store = store or SnapshotStore()
        self.sampler = Sampler(
            self.store,
            misfire_grace_seconds=cfg.sampling.misfire_grace_seconds,
            max_backoff_seconds=cfg.sampling.max_backoff_seconds,
        )
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.errors = ExpositionErrors()
        self._closers: list[Callable[[], None]] = []
        self._collectors: list[Guarded] = []
        self.add_collector("self", SelfCollector(self.store, self.errors, mode))
        self.render_cache = RenderCache(lambda: self._collectors)
        self.sampler.add_listener(lambda source, ok: self.render_cache.warm(source) if ok else None)
        self.http = App(self.registry, self.store.ready, cfg.server.auth.token, cache=self.render_cache)
        self.server: Server | None = None
        self._serve_http = serve_http
        self._stopped = threading.Event()

    def add_collector(self, name: str, collector: Collector, sources: Sequence[str] = ()) -> None:
        """Register a collector. `sources`: the store sources it reads, when its output depends on nothing
        else — its rendered text is then reused until one of them has a new sample."""
        key = None
        if sources:
            store = self.store

            def key() -> Hashable:
                return tuple(getattr(store.get(s), "taken_at", None) for s in sources)

        guarded = Guarded(name, collector, self.errors, cache_key=key, sources=sources)
        self._collectors.append(guarded)
        self.registry.register(guarded)

    def unregister_collectors(self) -> None:
        """Take zmon's collectors out of the registry (a host's own registry, after attach)."""
        for guarded in self._collectors:
            with contextlib.suppress(KeyError):  # never registered, or already gone
                self.registry.unregister(guarded)

    def add_source(
        self,
        name: str,
        sample: Callable[[], Any],
        interval_seconds: float,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.sampler.add(SourceSpec(name, sample, interval_seconds))
        if close is not None:
            self.add_closer(close)

    def add_closer(self, close: Callable[[], None]) -> None:
        """Called (in reverse order of registration) when the monitor stops."""
        self._closers.append(close)

    @property
    def serving(self) -> bool:
        """True once /metrics is bound (always True for a monitor that serves no HTTP)."""
        return self.server is not None or not self._serve_http

    def mark_unavailable(self, name: str, reason: str) -> None:
        """A source that cannot exist here: logged once, exported as zmon_collector_available 0."""
        log.warning("%s unavailable: %s — continuing without it", name, reason)
        self.store.mark_unavailable(name, reason)

    def start(self) -> None:
        self.sampler.start()
        if self._serve_http:
            host, port = parse_listen(self.cfg.server.listen)
            s = self.cfg.server
            self.server = Server(self.http, host, port, limits=Limits.from_config(s), web_config_file=s.web_config_file)
            self.server.start()
            log.info("serving /metrics on %s/metrics", self.server.url)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.server is not None:
            self.server.shutdown()
        self.sampler.shutdown()
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                log.exception("closing a source failed")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def install_signal_handlers(self, on_stop: Callable[[], None] | None = None) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            if on_stop is not None:
                on_stop()
            threading.Thread(target=self.stop, name="zmon-stop", daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def add_host_sources(
    mon: Monitor, *, watched_pid: int | None, psutil_module: Any | None = None
) -> None:
    """CPU/memory, disk, network and the watched process (psutil)."""
    from zmon.collectors.host import DiskCollector, HostCollector, NetworkCollector, ProcessCollector
    from zmon.providers.host import DiskProvider, HostProvider, NetworkProvider, ProcessProvider

    s = mon.cfg.sampling
    if s.host.enabled:
        host = HostProvider(psutil_module, per_cpu=s.host.per_cpu)
        mon.add_source("host", host.sample, s.host.interval_seconds)
        mon.add_collector("host", HostCollector(mon.store), sources=("host",))
    if s.disk.enabled:
        disk = DiskProvider(psutil_module, exclude_devices=s.disk.exclude_devices, paths=s.disk.paths)
        mon.add_source("disk", disk.sample, s.disk.interval_seconds)
        mon.add_collector("disk", DiskCollector(mon.store), sources=("disk",))
    if s.network.enabled:
        net = NetworkProvider(psutil_module, exclude_interfaces=s.network.exclude_interfaces)
        mon.add_source("network", net.sample, s.network.interval_seconds)
        mon.add_collector("network", NetworkCollector(mon.store), sources=("network",))
    if s.process.enabled and watched_pid is not None:
        proc = ProcessProvider(watched_pid, psutil_module)
        mon.add_source("process", proc.sample, s.process.interval_seconds)
        mon.add_collector("process", ProcessCollector(mon.store), sources=("process",))


def add_nvml_sources(mon: Monitor, *, watched_pid: int | None, nvml: Any | None = None) -> None:
    """Per-GPU NVML fields on the fast job, PCIe throughput on its own slow job (each call blocks ~20 ms)."""
    from zmon.collectors.nvml import NvmlCollector
    from zmon.providers.nvml import NvmlProvider

    s = mon.cfg.sampling.nvml
    if not s.enabled:
        return
    try:
        prov = NvmlProvider(nvml, processes=s.processes, watched_pid=watched_pid)
    except SourceUnavailable as e:
        mon.mark_unavailable("nvml", str(e))
        return
    mon.add_source("nvml", prov.sample, s.interval_seconds, close=prov.close)
    if s.slow_interval_seconds > 0:
        mon.add_source("nvml_slow", prov.sample_slow, s.slow_interval_seconds)
    mon.add_collector("nvml", NvmlCollector(mon.store), sources=("nvml", "nvml_slow"))


def build_watch(
    cfg: Config,
    *,
    nvml: Any | None = None,
    psutil_module: Any | None = None,
    registry: CollectorRegistry | None = None,
    serve_http: bool = True,
) -> Monitor:
    """`zmon watch`: NVML + host counters from outside the workload. Never imports torch."""
    mon = Monitor(cfg, mode="watch", registry=registry, serve_http=serve_http)
    pid = cfg.sampling.process.pid
    add_nvml_sources(mon, watched_pid=pid, nvml=nvml)
    add_host_sources(mon, watched_pid=pid, psutil_module=psutil_module)
    return mon


def own_pid() -> int:
    return os.getpid()


def iter_problems(cfg: Config) -> Iterable[str]:
    """Checks that need the filesystem (kept out of validation so check-config works anywhere)."""
    for p in cfg.sampling.disk.paths:
        if not p.expanduser().exists():
            yield f"sampling.disk.paths: {p} does not exist (its free space will be reported as down)"


class WorkloadFigures:
    """Figures for policy rules that come from outside the allocator: NVML, host, the watched process and the
    generations seen (fed as GenerationRecords). Read from the store at evaluation time, on the sampler thread."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._last_seconds: float | None = None
        self._finished = 0
        self._seen = 0
        self._proc_prev: tuple[float, float] | None = None  # (monotonic, cpu seconds)

    def observe(self, record: Any) -> None:
        with self._lock:
            self._finished += 1
            if record.status == "ok":
                self._last_seconds = record.total_seconds

    def __call__(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        nvml = self.store.latest("nvml")
        gpus = [g for g in getattr(nvml, "gpus", ()) if g.up]
        if gpus:
            g = gpus[0]  # rules see the first GPU; per-GPU alerting belongs in Prometheus rules
            out["gpu_utilization_ratio"] = g.utilization_gpu_ratio
            if g.memory_used_bytes is not None and g.memory_total_bytes:
                out["gpu_memory_used_ratio"] = g.memory_used_bytes / g.memory_total_bytes
            out["gpu_temperature_celsius"] = g.temperature_celsius
            out["gpu_power_watts"] = g.power_watts
        host = self.store.latest("host")
        if host is not None:
            out["host_cpu_utilization_ratio"] = host.cpu_utilization_ratio
            if host.memory_total_bytes:
                out["host_memory_available_ratio"] = host.memory_available_bytes / host.memory_total_bytes
        proc = self.store.latest("process")
        if proc is not None and proc.exists and proc.cpu_user_seconds is not None and host and host.cpu_count:
            now, cpu = time.monotonic(), proc.cpu_user_seconds + (proc.cpu_system_seconds or 0.0)
            if self._proc_prev is not None and now > self._proc_prev[0]:
                share = (cpu - self._proc_prev[1]) / (now - self._proc_prev[0]) / host.cpu_count
                out["process_cpu_utilization_ratio"] = max(0.0, share)
            self._proc_prev = (now, cpu)
        with self._lock:
            out["generation_seconds"] = self._last_seconds
            out["generations_delta"] = float(self._finished - self._seen)
            self._seen = self._finished
        return {k: v for k, v in out.items() if v is not None}


def add_allocator_source(mon: Monitor) -> None:
    """The torch caching allocator of this process (CUDA only; without CUDA the first sample says so and the
    source is dropped)."""
    from zmon.collectors.allocator import AllocatorCollector
    from zmon.providers.allocator import AllocatorProvider

    s = mon.cfg.sampling.allocator
    if not s.enabled:
        return
    try:
        prov = AllocatorProvider()
    except SourceUnavailable as e:
        mon.mark_unavailable("allocator", str(e))
        return
    mon.add_source("allocator", prov.sample, s.interval_seconds)
    mon.add_collector("allocator", AllocatorCollector(mon.store), sources=("allocator",))


def add_policy(mon: Monitor) -> tuple[Any, WorkloadFigures] | None:
    """Policy rules evaluated after every allocator sample (after every host sample where there is no CUDA
    allocator), with actions at safe points and alerts to Alertmanager. Returns (PolicyRunner,
    WorkloadFigures); the caller registers the runner as a generation-boundary listener and feeds
    GenerationRecords to the figures."""
    from zmon.alerting import AlertmanagerClient
    from zmon.collectors.policy import PolicyCollector
    from zmon.policy import PolicyRunner
    from zmon.providers.allocator import AllocatorSample

    cfg = mon.cfg
    if not cfg.policy.enabled:
        return None
    alerts = None
    if cfg.alerting.alertmanager_urls:
        host, port = parse_listen(cfg.server.listen)
        alerts = AlertmanagerClient(cfg.alerting, generator_url=f"http://{host}:{port}/metrics")
        mon.add_closer(lambda: alerts.close(timeout=5.0))
    policy = PolicyRunner(cfg.policy, alerts=alerts)
    figures = WorkloadFigures(mon.store)

    def on_sample(name: str, ok: bool) -> None:
        alloc = mon.store.get("allocator")
        trigger = "allocator" if alloc is not None and alloc.available else "host"
        if name == trigger and ok:
            latest = mon.store.latest("allocator")
            policy.observe(latest if isinstance(latest, AllocatorSample) else None, extra=figures())

    mon.sampler.add_listener(on_sample)
    mon.add_collector("policy", PolicyCollector(policy.state, alerts))

    def request_action(req: Request) -> Response:
        body = req.json()
        action = body.get("action") if isinstance(body, dict) else None
        if action not in ("empty_cache", "gc_collect"):
            raise HTTPError(400, 'expected JSON {"action": "empty_cache" | "gc_collect"}')
        policy.gate.submit(action, "requested over HTTP")
        policy.idle_tick()  # runs now if no generation is in progress, else at the end of the current one
        return Response(202, {"queued": action, "pending": list(policy.gate.pending())})

    mon.http.add_route("/actions", request_action, methods=("POST",), auth=True)
    return policy, figures
