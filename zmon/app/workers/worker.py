"""One data-parallel worker process: its own pipeline on its own device, generating its share of the workload.

Started by the supervisor (zmon.app.workers.supervisor) with multiprocessing's spawn method; `worker_main` is the
process body. What acts on the process's own CUDA context runs here, because it acts nowhere else: the
caching-allocator sampling, the policy (empty_cache and gc at the safe points between this worker's
generations), the out-of-memory retry, stage and collective timing. What the parent exports is sent to it:
every GenerationRecord, allocator samples, the policy's and the prompt cache's counters (zmon.app.
worker_protocol). The parent owns /metrics, NVML and host sampling, the JSONL log and the live diagnosis.

Liveness: the generating thread writes the monotonic time into a shared double (`beat`) at every denoise
step, generation boundary and item, and every second while it waits for the workload's rate; the parent
kills and restarts a worker whose beat is older than `model.workers.heartbeat_timeout_seconds`. A worker
stops after its current generation when the parent sends Stop, on SIGTERM/SIGINT (a second one interrupts),
or when the parent goes away (the pipe closes; on Linux the parent's death also sends it SIGTERM).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, ClassVar

from zmon.app.instrument import Instrumentation, loaded_pipeline_facts
from zmon.app.monitor import Monitor
from zmon.app.parts import add_policy
from zmon.app.signals import install_stop_handlers
from zmon.app.sources import add_allocator_source
from zmon.app.workers.protocol import (
    MULTICAST_OFF,
    Allocator,
    Busy,
    Command,
    Done,
    Fatal,
    Item,
    Ready,
    Record,
    Stats,
    Stop,
    WorkerSpec,
)
from zmon.capture.environment import environment_facts
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config, LoggingConfig
from zmon.instrumentation.hooks import CallContext, HookRegistry, PipelineHook
from zmon.instrumentation.records import GenerationRecord
from zmon.providers import cuda
from zmon.sampling.keys import ALLOCATOR
from zmon.workload.loading import load_pipeline, model_defaults, vae_scale_factor
from zmon.workload.oom import OomHandler
from zmon.workload.runner import CallStatus, Runner, Workload
from zmon.workload.spec import WorkloadError, build_spec, recheck_resolutions, static_pipeline_class

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class Channel:
    """The worker's end of the pipe: sends from any thread, one message at a time; never raises."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, message: object) -> None:
        if self.broken:
            return
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError, ValueError):  # the parent is gone: nothing left to tell
                self.broken = True


class Heartbeat(PipelineHook):
    """Writes the monotonic time into the shared `beat`: at each denoise step and generation boundary (this
    hook), and between items and during rate waits (the runner's heartbeat callback). Every beat comes from
    the generating thread, so a stuck generation, runner or safe-point action stops them."""

    name: ClassVar[str] = "heartbeat"
    priority: ClassVar[int] = 2000  # outermost: beats before the safe-point gate may wait

    def __init__(self, beat: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._beat = beat
        self._clock = clock
        self.beat()

    def beat(self) -> None:
        self._beat.value = self._clock()

    def call_started(self, ctx: CallContext) -> None:
        self.beat()

    def call_finished(self, ctx: CallContext) -> None:
        self.beat()

    def step_module_called(self, ctx: CallContext, name: str) -> None:
        self.beat()


# ------------------------------------------------------------------------------------------------ the process


def worker_main(spec: WorkerSpec, conn: Connection, beat: Any) -> None:
    """The worker process: load, report Ready, generate the share, report Done (or Fatal)."""
    os.environ.update(MULTICAST_OFF)
    _die_with_parent()
    label = spec.placement.label
    _setup_logging(spec.config.logging, label)
    channel = Channel(conn)
    stop = threading.Event()
    install_stop_handlers(stop, f"worker {label}: stopping after the current generation")
    session: list[WorkerSession] = []  # filled once loaded: commands before that have nothing to act on
    threading.Thread(
        target=_read_commands, args=(conn, session, stop), name="zmon-worker-commands", daemon=True
    ).start()
    worker: WorkerSession | None = None
    try:
        try:
            worker = WorkerSession(spec, channel, beat)
        except WorkloadError as e:
            channel.send(Fatal(tuple(e.problems), usage=True))
            return
        except Exception as e:
            log.exception("cannot load %s on %s", spec.config.model.id, label)
            channel.send(
                Fatal((f"cannot load {spec.config.model.id} on {label}: {type(e).__name__}: {e}",), usage=False)
            )
            return
        session.append(worker)
        result = worker.run(stop)
        channel.send(Done(result.generations, result.ok, result.stopped_early, result.broken_setup))
    except KeyboardInterrupt:
        log.info("worker %s interrupted", label)
    finally:
        if worker is not None:
            worker.close()


class WorkerSession:
    """A worker's monitor (allocator sampling and the policy, no HTTP), pipeline, instrumentation and runner."""

    def __init__(self, spec: WorkerSpec, channel: Channel, beat: Any) -> None:
        self.spec = spec
        self.channel = channel
        placement = spec.placement
        cfg = worker_config(spec.config, placement.device, cuda_worker=placement.cuda_index is not None)
        self.cfg = cfg
        if placement.cuda_index is not None:
            cuda.set_device(placement.cuda_index)
        class_name = static_pipeline_class(cfg)
        workload = build_spec(cfg, model_defaults(class_name, cfg.model.id) if class_name else {})
        self.monitor = Monitor(cfg.sampling, cfg.server, mode="worker", serve_http=False)
        if placement.cuda_index is not None:
            add_allocator_source(self.monitor, cfg.sampling.allocator)
        self.policy = add_policy(self.monitor, cfg.policy, cfg.alerting, listen=cfg.server.listen)
        self.monitor.sampler.add_listener(self._on_sample)
        self._item = spec.start
        self.heartbeat: Heartbeat | None = None
        self.instrumentation: Instrumentation | None = None
        try:
            self.monitor.start()
            loaded = load_pipeline(cfg.model, img2img=bool(cfg.workload.init_images))
            problems = recheck_resolutions(workload, vae_scale_factor(loaded.pipe))
            if problems:
                raise WorkloadError(problems)
            if class_name is None:
                workload = build_spec(cfg, model_defaults(loaded.pipe, cfg.model.id))
            facts = loaded_pipeline_facts(loaded, distilled=workload.distilled)
            # Records go to the parent; the local metrics only keep the in-progress gauge's bookkeeping.
            inst = Instrumentation(
                loaded.pipe, cfg.workload, GenerationMetrics(model=loaded.model_id), model_id=loaded.model_id
            )
            self.instrumentation = inst
            inst.record_listeners.append(self._on_record)
            inst.boundaries.add(self)  # Busy messages: the parent's in-progress gauge
            if self.policy is not None:
                inst.boundaries.add(self.policy.runner)
                inst.record_listeners.append(self.policy.figures.observe)
            self.heartbeat = Heartbeat(beat)
            HookRegistry.of(loaded.pipe).register(self.heartbeat)
            try:
                environment = environment_facts(loaded.pipe, model_id=loaded.model_id, distilled=workload.distilled)
            except Exception:
                log.debug("environment facts unavailable", exc_info=True)
                environment = None
        except BaseException:
            self.close()
            raise
        self.loaded = loaded
        self.runner = Runner(
            Workload(loaded.pipe, workload),
            oom=OomHandler(
                cfg.workload.oom,
                remediator=self.policy.runner.remediator if self.policy is not None else None,
                state=self.policy.runner.state if self.policy is not None else None,
            ),
        )
        channel.send(
            Ready(
                pid=os.getpid(),
                pipeline=facts,
                environment=environment,
                load_seconds=loaded.load_seconds,
                checkpoint_bytes=loaded.checkpoint_bytes,
                distilled=workload.distilled,
            )
        )
        log.info(
            "worker %s ready: %s on %s in %.2fs", placement.label, loaded.class_name, loaded.device, loaded.load_seconds
        )

    def run(self, stop: threading.Event) -> Any:
        beat = self.heartbeat.beat if self.heartbeat is not None else None
        return self.runner.run(None, stop, items=self.spec.items(), on_item=self._on_item, heartbeat=beat)

    def queue_action(self, command: Command) -> None:
        if self.policy is None:
            log.warning("policy is disabled: %s not queued", command.action)
            return
        self.policy.runner.gate.submit(command.action, command.reason)
        self.policy.runner.idle_tick()  # now when idle, else at the end of the current generation

    def generation_started(self) -> None:
        self.channel.send(Busy(True))

    def generation_finished(self) -> None:
        self.channel.send(Busy(False))

    def _on_record(self, record: GenerationRecord) -> None:
        self.channel.send(Record(self._item, record))

    def _on_item(self, i: int, status: CallStatus) -> None:
        self.channel.send(Item(i, status))
        self.channel.send(self._stats())
        nxt = i + self.spec.workers
        self._item = nxt

    def _on_sample(self, name: str, ok: bool) -> None:
        if not ok:
            return
        if name == ALLOCATOR.name:
            sample = self.monitor.store.latest(ALLOCATOR)
            if sample is not None:
                self.channel.send(Allocator(sample))
            self.channel.send(self._stats())

    def _stats(self) -> Stats:
        policy = alerts = None
        if self.policy is not None:
            policy = self.policy.runner.state.snapshot()
            alerts = self.policy.alerts.stats() if self.policy.alerts is not None else None
        cache = None
        inst = self.instrumentation
        if inst is not None and inst.prompt_cache is not None:
            pc = inst.prompt_cache
            cache = (pc.hits, pc.misses, pc.evictions, pc.size)
        return Stats(policy, alerts, cache)

    def close(self) -> None:
        if self.heartbeat is not None:
            registry = HookRegistry.get(self.loaded.pipe) if hasattr(self, "loaded") else None
            if registry is not None:
                registry.remove(Heartbeat.name)
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.stop()
        if self.instrumentation is not None:
            self.instrumentation.remove()
        self.monitor.stop()


def worker_config(cfg: Config, device: str, *, cuda_worker: bool) -> Config:
    """The configuration a worker runs with: its own device, no HTTP server, no NVML/host sampling (the
    parent samples those), no JSONL (the parent writes it), the allocator only on CUDA."""
    s = cfg.sampling
    off = {"enabled": False}
    sampling = s.model_copy(
        update={
            "nvml": s.nvml.model_copy(update=off),
            "host": s.host.model_copy(update=off),
            "disk": s.disk.model_copy(update=off),
            "network": s.network.model_copy(update=off),
            "process": s.process.model_copy(update=off),
            "allocator": s.allocator.model_copy(update={"enabled": s.allocator.enabled and cuda_worker}),
        }
    )
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"device": device, "devices": None}),
            "sampling": sampling,
            "workload": cfg.workload.model_copy(update={"jsonl": cfg.workload.jsonl.model_copy(update={"path": None})}),
        }
    )


# ------------------------------------------------------------------------------------------------ plumbing


def _read_commands(conn: Connection, session: list[WorkerSession], stop: threading.Event) -> None:
    """Messages from the parent: Stop (drain), Command (a remedial action); EOF (the parent is gone) stops
    the worker after its current generation too."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            if not stop.is_set():
                log.warning("the supervisor is gone: stopping after the current generation")
            stop.set()
            return
        if isinstance(message, Stop):
            stop.set()
        elif isinstance(message, Command):
            if session:
                session[0].queue_action(message)
            else:
                log.warning("%s requested before the pipeline was loaded: ignored", message.action)


def _die_with_parent() -> None:
    """On Linux, SIGTERM this worker when the supervisor dies (even by SIGKILL): it then drains and exits."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl: stop now
            os.kill(os.getpid(), signal.SIGTERM)


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "worker": self.worker,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(cfg: LoggingConfig, label: str) -> None:
    """The parent's log format, with the worker's device in every line (spawned processes start bare)."""
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(_JsonFormatter(label))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [worker {label}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
