"""`zmon run`: start the monitor, load and instrument the pipeline, generate the workload, serve /metrics.

The monitor starts first, so the model load itself is observed (disk, memory, GPU). The same in-process
parts as `zmon.attach` watch the pipeline; zmon.workload's Runner generates.

Signals: the first SIGTERM/SIGINT stops after the current generation, a second one interrupts; SIGHUP
reloads the configuration (zmon.app.reload) without touching the generation in progress: sources, policy
rules, alerting, diagnosis thresholds, the server and logging apply live; the model and the workload need a
restart (said so in the log and in zmon_config_restart_required).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from zmon.app.attach import add_in_process_sources, connect_in_process, install_in_process_sources
from zmon.app.instrument import Instrumentation, loaded_pipeline_facts
from zmon.app.monitor import Monitor
from zmon.app.parts import PolicyParts
from zmon.app.reload import ConfigSource, Plan, Reloader, hold_sighup, monitor_reloader
from zmon.app.signals import install_stop_handlers, linger, restore_handlers
from zmon.capture.live import LiveDiagnosis
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.instrumentation.boundaries import BoundaryListener
from zmon.instrumentation.records import GenerationRecord
from zmon.server import Request, Response
from zmon.systemd import SystemdHandle
from zmon.workload.loading import LoadedPipeline, load_pipeline, model_defaults, vae_scale_factor
from zmon.workload.oom import OomHandler
from zmon.workload.runner import Runner, RunResult, Workload
from zmon.workload.spec import WorkloadError, WorkloadSpec, build_spec, recheck_resolutions, static_pipeline_class

log = logging.getLogger(__name__)


class StatusLog:
    """One INFO line every `interval_seconds` while `zmon run` generates, so a long run is never silent.

    It reads what /metrics reads — the generation counters of GenerationMetrics and the policy's action
    counts — plus the GenerationRecords of the interval for an exact median (the histogram's buckets would
    only bound it): no accounting of its own.
    """

    def __init__(
        self,
        metrics: GenerationMetrics,
        interval_seconds: float,
        *,
        policy: PolicyParts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.policy = policy
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._seconds: list[float] = []  # successful generations' durations since the last line
        self._last_t = clock()
        self._last_images = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, record: GenerationRecord) -> None:
        """A record listener (Instrumentation.record_listeners)."""
        if record.status == "ok":
            with self._lock:
                self._seconds.append(record.total_seconds)

    def _totals(self) -> tuple[dict[str, float], float]:
        """Generations by status and images, summed over labels, from the metrics' own families."""
        by_status: dict[str, float] = {}
        images = 0.0
        for family in self.metrics.collect():
            for sample in family.samples:
                if sample.name == "zmon_generations_total":
                    status = sample.labels.get("status", "")
                    by_status[status] = by_status.get(status, 0.0) + sample.value
                elif sample.name == "zmon_images_total":
                    images += sample.value
        return by_status, images

    def _actions(self) -> str:
        if self.policy is None:
            return "policy off"
        done = [(a, r, n) for a, r, n in self.policy.runner.state.snapshot().actions if n and r != "skipped"]
        if not done:
            return "policy actions 0"
        return "policy actions " + ", ".join(f"{a} {r} {n}" for a, r, n in sorted(done))

    def line(self) -> str:
        """The status line for the interval since the previous call (also what the thread logs)."""
        by_status, images = self._totals()
        now = self._clock()
        with self._lock:
            seconds, self._seconds = self._seconds, []
            elapsed, self._last_t = now - self._last_t, now
            new_images, self._last_images = images - self._last_images, images
        total = sum(by_status.values())
        failed = by_status.get("oom", 0.0) + by_status.get("error", 0.0)
        rate = new_images / elapsed if elapsed > 0 else 0.0
        p50 = f"p50 {statistics.median(seconds):.3f}s" if seconds else "p50 -"
        return (
            f"status: {total:.0f} generations ({failed:.0f} failed: {by_status.get('oom', 0):.0f} oom, "
            f"{by_status.get('error', 0):.0f} error), {rate:.2f} images/s and {p50} over the last {elapsed:.0f}s, "
            f"{self._actions()}"
        )

    def start(self) -> None:
        if self.interval_seconds <= 0 or self._thread is not None:
            return
        self._last_t = self._clock()
        self._thread = threading.Thread(target=self._loop, name="zmon-status", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                log.info("%s", self.line())
            except Exception:  # a status line is never worth stopping generation for
                log.debug("status line failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def loading_diagnosis(model_id: str) -> Callable[[Request], Response]:
    """GET /diagnosis while the model loads: 503 with the reason (the live diagnosis starts once loaded)."""

    def handle(_: Request) -> Response:
        return Response(
            503,
            {"error": f"zmon is loading {model_id}: the live diagnosis starts once it is loaded and generating"},
            headers={"Retry-After": "5"},
        )

    return handle


class RunSession:
    """A loaded, instrumented pipeline, the monitor around it, and the runner; `run()` generates."""

    def __init__(
        self,
        monitor: Monitor,
        metrics: GenerationMetrics,
        spec: WorkloadSpec,
        loaded: LoadedPipeline,
        instrumentation: Instrumentation,
        *,
        policy: PolicyParts | None = None,
        oom: OomHandler | None = None,
        live: LiveDiagnosis | None = None,
        status_interval_seconds: float = 0.0,
    ) -> None:
        self.monitor = monitor
        self.metrics = metrics
        self.spec = spec
        self.loaded = loaded
        self.pipe = loaded.pipe
        self.instrumentation = instrumentation
        self.policy = policy
        self.live = live  # the live diagnosis (GET /diagnosis, zmon_bottleneck*)
        self.runner = Runner(Workload(loaded.pipe, spec), oom=oom)
        runner = self.runner
        metrics.set_output_failures((lambda: runner.output_failures) if spec.output_dir is not None else None)
        self.status = StatusLog(metrics, status_interval_seconds, policy=policy)
        instrumentation.record_listeners.append(self.status.observe)
        instrumentation.owner = self
        self._closed = False

    @property
    def oom(self) -> OomHandler | None:
        """What an out-of-memory generation leads to (the runner's)."""
        return self.runner.oom

    @oom.setter
    def oom(self, handler: OomHandler | None) -> None:
        self.runner.oom = handler

    def add_boundary_listener(self, listener: BoundaryListener) -> None:
        """Call listener.generation_started()/generation_finished() around every pipeline call."""
        self.instrumentation.boundaries.add(listener)

    def remove_boundary_listener(self, listener: BoundaryListener) -> None:
        self.instrumentation.boundaries.discard(listener)

    def run(self, max_generations: int | None = None, stop_event: threading.Event | None = None) -> RunResult:
        """Generate (see Runner.run), logging a status line every `logging.status_interval_seconds`."""
        self.status.start()
        try:
            return self.runner.run(max_generations, stop_event)
        finally:
            self.status.stop()

    def close(self) -> None:
        """Remove the instrumentation, stop sampling and the server; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.runner.stop()
        self.status.stop()
        self.instrumentation.remove()
        self.monitor.stop()


def build_run(
    cfg: Config,
    *,
    registry: CollectorRegistry | None = None,
    serve_http: bool = True,
    start: bool = True,
) -> RunSession:
    """Validate the workload, start the monitor (so the load itself is observed), load and instrument.

    Raises WorkloadError listing every workload problem (before anything loads), and whatever loading
    raises; the monitor is stopped on failure.
    """
    img2img = bool(cfg.workload.init_images)
    class_name = static_pipeline_class(cfg)
    # Known class: its defaults now; unknown (a hub id not cached locally): provisional, redone after load.
    spec = build_spec(cfg, model_defaults(class_name, cfg.model.id) if class_name else {})

    if spec.output_dir is not None:  # before the model loads: a directory that cannot be made stops here
        try:
            spec.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkloadError([f"workload.output_dir: cannot create {spec.output_dir}: {e.strerror or e}"]) from None

    metrics = GenerationMetrics(model=cfg.model.id)
    mon = Monitor(cfg.sampling, cfg.server, mode="run", registry=registry, serve_http=serve_http)
    mon.add_collector("generation", metrics)
    policy = add_in_process_sources(mon, cfg)
    try:
        # Until the pipeline is loaded and connected, GET /diagnosis says so (503) rather than 404.
        mon.http.add_route("/diagnosis", loading_diagnosis(cfg.model.id), methods=("GET", "HEAD"), provisional=True)
        if start:
            mon.start()
        log.info("loading %s%s", cfg.model.id, " (img2img)" if img2img else "")
        started = time.perf_counter()
        loaded = load_pipeline(cfg.model, img2img=img2img)
        log.info(
            "loaded %s as %s on %s (%s) in %.2fs (reading the checkpoint and moving it to the device: %.2fs%s)",
            loaded.model_id,
            loaded.class_name,
            loaded.device,
            loaded.dtype,
            time.perf_counter() - started,
            loaded.load_seconds,
            f", {loaded.read_bytes_per_second / 1e6:.0f} MB/s" if loaded.read_bytes_per_second else "",
        )
        problems = recheck_resolutions(spec, vae_scale_factor(loaded.pipe))
        if problems:
            raise WorkloadError(problems)
        if class_name is None:
            spec = build_spec(cfg, model_defaults(loaded.pipe, cfg.model.id))
        facts = loaded_pipeline_facts(loaded, distilled=spec.distilled)
        metrics.set_pipeline(facts)
        inst = Instrumentation(loaded.pipe, cfg.workload, metrics, model_id=loaded.model_id)
        live = connect_in_process(mon, cfg, inst, policy)
    except BaseException:
        mon.stop()
        raise
    oom = OomHandler(
        cfg.workload.oom,
        remediator=policy.runner.remediator if policy is not None else None,
        state=policy.runner.state if policy is not None else None,
    )
    return RunSession(
        mon,
        metrics,
        spec,
        loaded,
        inst,
        policy=policy,
        oom=oom,
        live=live,
        status_interval_seconds=cfg.logging.status_interval_seconds,
    )


# What `zmon run` cannot change while it runs: the loaded model, the generation loop and the instrumentation
# built for it (prompts, resolutions, JSONL log, prompt cache, OOM handling), the trace endpoint's route, and
# whether the policy exists at all.
RUN_RESTART_ALWAYS = ("model", "workload", "profiling.trace", "policy.enabled")


def run_plan(session: RunSession) -> Plan:
    """What `zmon run` applies on SIGHUP. Without a running policy (policy.enabled false at start) policy and
    alerting changes wait for a restart too."""
    restart = list(RUN_RESTART_ALWAYS)
    if session.policy is None:
        restart += ["policy", "alerting"]
    return Plan(
        restart=tuple(restart),
        live=("server", "sampling", "logging", "policy", "alerting", "profiling.thresholds"),
        unused=("sampling.process.pid",),  # `zmon run` watches itself
    )


def run_reloader(
    session: RunSession, cfg: Config, source: ConfigSource, *, systemd: SystemdHandle | None = None
) -> Reloader:
    """The SIGHUP reloader of a run session (its state exported as zmon_config_*): the in-process sources, and
    the policy, alerting and live-diagnosis thresholds where they run."""
    mon = session.monitor

    def apply_more(new: Config) -> None:
        if session.policy is not None:
            session.policy.reconfigure(mon, new.policy, new.alerting)
        if session.live is not None:
            session.live.thresholds = new.diagnosis_thresholds

    return monitor_reloader(
        mon,
        cfg,
        source,
        mode="run",
        plan=run_plan(session),
        rebuild_sources=lambda sampling: install_in_process_sources(mon, sampling),
        apply_more=apply_more,
        systemd=systemd,
    )


def run_main(cfg: Config, *, linger_seconds: float = 0.0, source: ConfigSource | None = None) -> int:
    """The body of `zmon run` (after validation): returns the exit code. Installs SIGTERM/SIGINT handlers:
    the first signal stops after the current generation, a second one interrupts; SIGHUP reloads (queued
    while the model loads)."""
    stop = threading.Event()
    previous = install_stop_handlers(stop, "stopping after the current generation (again to interrupt)")
    hold_sighup()
    session: RunSession | None = None
    reloader: Reloader | None = None
    try:
        try:
            session = build_run(cfg)
        except WorkloadError as e:
            for p in e.problems:
                log.error("%s", p)
            return EXIT_USAGE
        except OSError as e:
            log.error("cannot start: %s", e)
            return EXIT_FAILURE
        except Exception:
            log.exception("cannot load %s", cfg.model.id)
            return EXIT_FAILURE
        reloader = run_reloader(session, cfg, source or ConfigSource(lambda: cfg))
        reloader.start()
        result = session.run(stop_event=stop)
        linger(stop, linger_seconds)
        return result.exit_code
    except KeyboardInterrupt:
        log.info("interrupted")
        return EXIT_OK
    finally:
        if reloader is not None:
            reloader.stop()
        if session is not None:
            session.close()
        restore_handlers(previous)
