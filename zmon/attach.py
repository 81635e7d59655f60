"""In-process entry for host services: attach(pipe, config) instruments a pipeline and serves /metrics."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from zmon.app import (
    Monitor,
    WorkloadFigures,
    add_allocator_source,
    add_host_sources,
    add_nvml_sources,
    add_policy,
)
from zmon.collectors.generation import GenerationMetrics, PipelineFacts
from zmon.config import Config
from zmon.instrumentation.jsonl import JsonlLog
from zmon.instrumentation.records import GenerationRecord

log = logging.getLogger(__name__)

_ATTACH_LOCK = threading.Lock()
_HANDLE_ATTR = "_zmon_attach_handle"  # class attribute of the boundary subclass: marks an attached pipeline


class BoundaryListener(Protocol):
    """Told around every pipeline call: the place for safe-point work (empty_cache) between generations.

    generation_started() runs in the calling thread before the generation and may block (a gate);
    generation_finished() runs after it, whatever its outcome.
    """

    def generation_started(self) -> None: ...

    def generation_finished(self) -> None: ...


class Boundaries:
    """An ordered set of boundary listeners; a listener that raises is logged and never breaks the call."""

    def __init__(self) -> None:
        self._listeners: list[BoundaryListener] = []
        self._lock = threading.Lock()

    def add(self, listener: BoundaryListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def remove(self, listener: BoundaryListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def started(self) -> None:
        for listener in self._snapshot():
            try:
                listener.generation_started()
            except Exception:
                log.exception("boundary listener %r failed in generation_started", listener)

    def finished(self) -> None:
        for listener in reversed(self._snapshot()):
            try:
                listener.generation_finished()
            except Exception:
                log.exception("boundary listener %r failed in generation_finished", listener)

    def _snapshot(self) -> list[BoundaryListener]:
        with self._lock:
            return list(self._listeners)


def pipeline_facts(pipe: Any, model_id: str, *, distilled: bool = False) -> PipelineFacts:
    """Model, class, device, dtype and whether the denoiser is torch.compile'd, read from the pipeline."""
    dtype = str(getattr(pipe, "dtype", "unknown")).removeprefix("torch.")
    device = str(getattr(pipe, "device", "unknown"))
    compiled = any(
        type(getattr(pipe, name, None)).__name__ == "OptimizedModule"
        for name in ("transformer", "transformer_2", "unet")
    )
    return PipelineFacts(
        model=model_id, pipeline_class=type(pipe).__name__, device=device, dtype=dtype,
        compiled=compiled, distilled=distilled,
    )


def default_model_id(pipe: Any) -> str:
    """The pipeline's name_or_path (hub id or directory), else its class name."""
    name = getattr(pipe, "name_or_path", None)
    if not name:
        config = getattr(pipe, "config", None)
        name = config.get("_name_or_path") if isinstance(config, dict) else None
    return str(name) if name else type(pipe).__name__


class Instrumentation:
    """Prompt cache, stage timing and the boundary wrapper on one pipeline; records go to metrics and JSONL.

    Layers, innermost first: prompt cache (pipe.encode_prompt), stage timing (class swap + method patches),
    boundaries (a second class swap, outermost, so a safe-point gate's wait is not timed as generation).
    `remove()` undoes them in reverse order and leaves the pipeline exactly as it was.
    """

    def __init__(self, pipe: Any, cfg: Config, metrics: GenerationMetrics, *, model_id: str) -> None:
        from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing

        self.pipe = pipe
        self.model_id = model_id
        self.metrics = metrics
        self.boundaries = Boundaries()
        self.boundaries.add(metrics)  # the in-progress gauge
        self.jsonl: JsonlLog | None = None
        self.prompt_cache: Any = None
        self.stage_timing: Any = None
        self.owner: Any = None  # the Handle or run session that applied it (named in errors)
        # Other consumers of each GenerationRecord (policy figures, live diagnosis), called after metrics.
        self.record_listeners: list[Callable[[GenerationRecord], None]] = []
        self._undo: list[Callable[[], None]] = []
        self._removed = False
        w = cfg.workload
        try:
            if w.jsonl.path is not None:
                self.jsonl = JsonlLog(w.jsonl.path, w.jsonl.max_bytes, w.jsonl.backups)
                jsonl = self.jsonl
                metrics.set_jsonl_failures(lambda: jsonl.failures)
                self._undo.append(jsonl.close)
            if w.prompt_cache.enabled:
                from zmon.instrumentation.prompt_cache import apply_prompt_cache

                self.prompt_cache = apply_prompt_cache(pipe, w.prompt_cache)
                metrics.set_prompt_cache(self.prompt_cache)
                self._undo.append(self.prompt_cache.remove)
            self.stage_timing = apply_stage_timing(pipe, StageTimingConfig(on_record=self._on_record))
            self._undo.append(self.stage_timing.remove)
            self._undo.append(self._wrap_calls())
        except BaseException:
            self.remove()
            raise

    def _on_record(self, record: GenerationRecord) -> None:
        try:
            self.metrics.observe(record)
        except Exception:
            log.exception("generation metrics failed to account a record")
        if self.jsonl is not None:
            self.jsonl.write(record, model=self.model_id)
        for listener in list(self.record_listeners):
            try:
                listener(record)
            except Exception:
                log.exception("record listener %r failed", listener)

    def _wrap_calls(self) -> Callable[[], None]:
        """Swap the pipeline's class for a subclass whose __call__ tells the boundary listeners."""
        pipe, boundaries = self.pipe, self.boundaries
        base: type = type(pipe)
        if getattr(base, _HANDLE_ATTR, None) is not None:
            raise RuntimeError("pipeline already wrapped by zmon")

        @functools.wraps(base.__call__)
        def __call__(self_: Any, *args: Any, **kwargs: Any) -> Any:
            boundaries.started()
            try:
                return base.__call__(self_, *args, **kwargs)
            finally:
                boundaries.finished()

        sub = type(
            base.__name__,
            (base,),
            {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__,
             _HANDLE_ATTR: self},
        )
        object.__setattr__(pipe, "__class__", sub)

        def unwrap() -> None:
            if type(pipe) is sub:
                object.__setattr__(pipe, "__class__", base)
            else:
                log.warning("pipeline class was changed after zmon attached; not restoring it")

        return unwrap

    def remove(self) -> None:
        """Undo every layer, newest first; idempotent."""
        if self._removed:
            return
        self._removed = True
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception:
                log.exception("removing zmon instrumentation failed")


def attached_handle(pipe: Any) -> Any:
    """The Handle (or run session) that instruments `pipe`, or None."""
    inst = getattr(type(pipe), _HANDLE_ATTR, None)
    return None if inst is None else (inst.owner or inst)


class Handle:
    """What attach() returns: the monitor, the metrics, boundary listeners, and detach()."""

    def __init__(
        self,
        pipe: Any,
        monitor: Monitor,
        metrics: GenerationMetrics,
        instrumentation: Instrumentation,
        *,
        host_registry: CollectorRegistry | None,
    ) -> None:
        self.pipe = pipe
        self.monitor = monitor
        self.metrics = metrics
        self.instrumentation = instrumentation
        self.attached_at = time.time()
        self._host_registry = host_registry
        self._detached = False
        self._lock = threading.Lock()
        instrumentation.owner = self

    @property
    def url(self) -> str | None:
        """Base URL of zmon's HTTP server, or None when not serving."""
        srv = self.monitor.server
        return None if srv is None else f"http://{srv.host}:{srv.port}"

    @property
    def attached(self) -> bool:
        return not self._detached

    def add_boundary_listener(self, listener: BoundaryListener) -> None:
        """Call listener.generation_started()/generation_finished() around every pipeline call."""
        self.instrumentation.boundaries.add(listener)

    def remove_boundary_listener(self, listener: BoundaryListener) -> None:
        self.instrumentation.boundaries.remove(listener)

    def detach(self) -> None:
        """Restore the pipeline exactly, stop sampling and the server, unregister collectors; idempotent."""
        with self._lock:
            if self._detached:
                return
            self._detached = True
        self.instrumentation.remove()
        self.monitor.stop()
        if self._host_registry is not None:
            self.monitor.unregister_collectors()
        log.info("zmon detached from %s", self.instrumentation.model_id)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        where = f", url={self.url!r}" if self.url else ""
        return (
            f"<zmon.Handle {state} model={self.instrumentation.model_id!r}{where} "
            f"since={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.attached_at))} id=0x{id(self):x}>"
        )


def attach(
    pipe: Any,
    config: Config | None = None,
    *,
    registry: CollectorRegistry | None = None,
    serve_http: bool = True,
    model_id: str | None = None,
) -> Handle:
    """Instrument `pipe` in place and start monitoring it from this process.

    Stage timing (and, per config, the prompt cache and the JSONL log) go on the pipeline; host, process
    (this pid) and NVML sampling start on a background scheduler; with `serve_http` zmon's /metrics is
    served on `config.server.listen`. With `registry=` and `serve_http=False` zmon's collectors go into the
    host's own registry instead. The host may call the pipeline from several threads, one call at a time.
    Raises RuntimeError if the pipeline is already attached.
    """
    cfg = config or Config()
    with _ATTACH_LOCK:
        existing = attached_handle(pipe)
        if existing is not None:
            raise RuntimeError(f"pipeline already attached: {existing!r}; call .detach() on it first")
        model = model_id or default_model_id(pipe)
        distilled = _distilled(pipe, model)
        metrics = GenerationMetrics(model=model)
        metrics.set_pipeline(pipeline_facts(pipe, model, distilled=distilled))
        inst = Instrumentation(pipe, cfg, metrics, model_id=model)
        try:
            mon = Monitor(cfg, mode="attach", registry=registry, serve_http=serve_http)
        except BaseException:
            inst.remove()
            raise
        handle = Handle(pipe, mon, metrics, inst, host_registry=registry)
    try:
        mon.add_collector("generation", metrics)
        connect_in_process(inst, add_in_process_sources(mon))
        mon.start()
    except BaseException:
        handle.detach()  # restores the pipeline and unregisters whatever reached the host's registry
        raise
    log.info("zmon attached to %s (%s)%s", model, type(pipe).__name__,
             f"; /metrics on {handle.url}/metrics" if handle.url else "")
    return handle


def add_in_process_sources(mon: Monitor) -> InProcess:
    """Host, NVML and allocator sources watching this process (the one that owns the pipeline), and the
    policy over them. Connect the result to the pipeline's instrumentation with `connect_in_process`."""
    pid = os.getpid()
    add_host_sources(mon, watched_pid=pid)
    add_nvml_sources(mon, watched_pid=pid)
    add_allocator_source(mon)
    wiring = add_policy(mon)
    return InProcess(mon, policy=wiring[0] if wiring else None, figures=wiring[1] if wiring else None)


@dataclass(frozen=True)
class InProcess:
    """What runs beside the instrumented pipeline: the policy (a boundary listener: safe points are the gaps
    between generations) and the figures it reads (fed every GenerationRecord)."""

    monitor: Monitor
    policy: Any = None  # zmon.policy.PolicyRunner
    figures: WorkloadFigures | None = None


def connect_in_process(inst: Instrumentation, parts: InProcess) -> None:
    """Feed the pipeline's generations to the policy, live diagnosis (GET /diagnosis, zmon_bottleneck*) and,
    when enabled, the on-demand trace endpoint (POST /trace)."""
    from zmon.profiling.live import install_live_diagnosis
    from zmon.profiling.trace import install_trace_endpoint

    if parts.policy is not None:
        inst.boundaries.add(parts.policy)
    if parts.figures is not None:
        inst.record_listeners.append(parts.figures.observe)
    cfg = parts.monitor.cfg
    install_live_diagnosis(parts.monitor, cfg.profiling.thresholds, instrumentation=inst)
    install_trace_endpoint(parts.monitor, cfg.profiling.trace, instrumentation=inst)


def _distilled(pipe: Any, model_id: str) -> bool:
    try:
        from zmon.workload.loading import model_defaults

        return bool(model_defaults(pipe, model_id).get("distilled", False))
    except Exception:
        log.debug("model defaults unknown for %s", model_id, exc_info=True)
        return False
