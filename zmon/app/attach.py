"""`zmon.attach(pipe)`: instrument a host service's pipeline in process and monitor it from there.

The same parts as `zmon run` (zmon.app.run), minus the workload: the host calls its pipeline as before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.app.checks import require
from zmon.app.instrument import Instrumentation, pipeline_facts
from zmon.app.monitor import Monitor
from zmon.app.parts import PolicyParts, add_live_diagnosis, add_policy, add_trace_endpoint
from zmon.app.sources import install_sources
from zmon.capture.live import LiveDiagnosis
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config, SamplingConfig, load_config
from zmon.instrumentation import anatomy
from zmon.instrumentation.boundaries import BoundaryListener
from zmon.workload.loading import model_defaults

log = logging.getLogger(__name__)

_ATTACH_LOCK = threading.Lock()


class AttachError(RuntimeError):
    """zmon could not attach: the pipeline is already attached, or zmon's HTTP server cannot listen where the
    config says. The pipeline is left exactly as it was."""


def install_in_process_sources(mon: Monitor, sampling: SamplingConfig) -> list[str]:
    """Host, NVML and allocator sources watching this process (the one that owns the pipeline), built (or,
    on a reload, rebuilt where their sub-config changed) as source groups."""
    return install_sources(mon, sampling, watched_pid=os.getpid(), allocator=True)


def add_in_process_sources(mon: Monitor, cfg: Config) -> PolicyParts | None:
    """The in-process sources and the policy over them. Connect the instrumented pipeline with
    `connect_in_process` once it exists."""
    install_in_process_sources(mon, cfg.sampling)
    return add_policy(mon, cfg.policy, cfg.alerting, listen=cfg.server.listen if mon.serves_http else None)


def connect_in_process(mon: Monitor, cfg: Config, inst: Instrumentation, policy: PolicyParts | None) -> LiveDiagnosis:
    """Feed the pipeline's generations to the policy (its safe points are the gaps between generations), the
    live diagnosis (GET /diagnosis, zmon_bottleneck*; returned) and, when enabled, the trace endpoint."""
    if policy is not None:
        inst.boundaries.add(policy.runner)
        inst.record_listeners.append(policy.figures.observe)
    live = add_live_diagnosis(mon, cfg.diagnosis_thresholds, pipe=inst.pipe, model_id=inst.model_id)
    inst.record_listeners.append(live.observe)
    add_trace_endpoint(mon, cfg.profiling.trace, boundaries=inst.boundaries, stage_timing=inst.stage_timing)
    return live


def attached_handle(pipe: Any) -> Any:
    """The Handle (or run session) that instruments `pipe`, or None."""
    inst = Instrumentation.of(pipe)
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
        self.live: LiveDiagnosis | None = None  # the live diagnosis (GET /diagnosis), set once connected
        self.attached_at = time.time()
        self._host_registry = host_registry
        self._detached = False
        self._lock = threading.Lock()
        instrumentation.owner = self

    @property
    def url(self) -> str | None:
        """Base URL of zmon's HTTP server, or None when not serving."""
        srv = self.monitor.server
        return None if srv is None else srv.url

    @property
    def attached(self) -> bool:
        return not self._detached

    def add_boundary_listener(self, listener: BoundaryListener) -> None:
        """Call listener.generation_started()/generation_finished() around every pipeline call."""
        self.instrumentation.boundaries.add(listener)

    def remove_boundary_listener(self, listener: BoundaryListener) -> None:
        self.instrumentation.boundaries.discard(listener)

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

    Without `config`: the defaults with the `ZMON_<SECTION>__<KEY>` environment overrides applied, as
    `zmon run` reads them (e.g. ZMON_SERVER__LISTEN=127.0.0.1:9000); a bad override raises ConfigError, and so
    does a configuration naming files or directories zmon cannot use (the checks of zmon.app.checks, as `zmon
    run` makes them). Raises AttachError when the pipeline is already attached or the listen address cannot be
    bound; the pipeline is then left exactly as it was.
    """
    cfg = config if config is not None else load_config(None)
    for warning in require(cfg, "attach"):
        log.warning("config: %s", warning)
    with _ATTACH_LOCK:
        existing = attached_handle(pipe)
        if existing is not None:
            raise AttachError(f"pipeline already attached: {existing!r}; call .detach() on it first")
        model = model_id or anatomy.model_id(pipe)
        metrics = GenerationMetrics(model=model)
        metrics.set_pipeline(pipeline_facts(pipe, model, distilled=_distilled(pipe, model)))
        inst = Instrumentation(pipe, cfg.workload, metrics, model_id=model)
        try:
            mon = Monitor(cfg.sampling, cfg.server, mode="attach", registry=registry, serve_http=serve_http)
        except BaseException:
            inst.remove()
            raise
        handle = Handle(pipe, mon, metrics, inst, host_registry=registry)
    try:
        mon.add_collector("generation", metrics)
        handle.live = connect_in_process(mon, cfg, inst, add_in_process_sources(mon, cfg))
        mon.start()
    except OSError as e:
        handle.detach()  # restores the pipeline and unregisters whatever reached the host's registry
        raise AttachError(
            f"zmon cannot serve /metrics on {cfg.server.listen}: {e.strerror or e}. Choose another "
            f"address (config server.listen, or ZMON_SERVER__LISTEN=127.0.0.1:0 for any free port), or pass "
            f"serve_http=False with registry=<the host's CollectorRegistry> to export through the host's own "
            f"/metrics. The pipeline is unchanged."
        ) from e
    except BaseException:
        handle.detach()  # restores the pipeline and unregisters whatever reached the host's registry
        raise
    log.info(
        "zmon attached to %s (%s)%s",
        model,
        type(pipe).__name__,
        f"; /metrics on {handle.url}/metrics" if handle.url else "",
    )
    if not serve_http and cfg.policy.enabled and cfg.alerting.alertmanager_urls and not cfg.alerting.instance:
        log.info(
            "zmon's alerts carry instance=%r (this host's name): set alerting.instance to the target Prometheus "
            "scrapes this service under, so Alertmanager can group and inhibit them with the rule-based ones",
            socket.gethostname(),
        )
    return handle


def _distilled(pipe: Any, model_id: str) -> bool:
    try:
        return bool(model_defaults(pipe, model_id).get("distilled", False))
    except Exception:
        log.debug("model defaults unknown for %s", model_id, exc_info=True)
        return False
