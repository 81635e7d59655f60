"""`zmon run`: load a pipeline, instrument it, and generate the configured workload while serving /metrics."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.app import Monitor
from zmon.attach import (
    BoundaryListener,
    Instrumentation,
    add_in_process_sources,
    connect_in_process,
    pipeline_facts,
)
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config
from zmon.workload.oom import OomHandler
from zmon.workload.spec import (
    WorkloadError,
    WorkloadSpec,
    build_spec,
    recheck_resolutions,
    static_pipeline_class,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
BROKEN_SETUP_GENERATIONS = 3  # if each of the first N generations errors, the setup is broken: stop


@dataclass
class RunResult:
    """What a run did; `exit_code` is what `zmon run` exits with."""

    generations: int = 0
    ok: int = 0
    oom: int = 0  # generations that ended out of GPU memory (after their retry, if any)
    errors: int = 0
    oom_retries: int = 0  # generations run again after an out-of-memory error (workload.oom.retry)
    oom_recovered: int = 0  # of those, the ones whose retry succeeded
    images: int = 0
    seconds: float = 0.0
    stopped_early: bool = False  # by a signal / stop event
    broken_setup: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURE if self.broken_setup else EXIT_OK


class RunSession:
    """A loaded, instrumented pipeline and the monitor around it; `run()` generates the workload.

    `policy` is the PolicyRunner watching this process (None when policy is off); `oom` decides what an
    out-of-memory generation leads to (build_run passes one built from `workload.oom`; None: it is only
    counted and the run goes on).
    """

    def __init__(
        self,
        monitor: Monitor,
        metrics: GenerationMetrics,
        spec: WorkloadSpec,
        loaded: Any,
        instrumentation: Instrumentation,
        *,
        policy: Any = None,
        oom: OomHandler | None = None,
    ) -> None:
        self.monitor = monitor
        self.metrics = metrics
        self.spec = spec
        self.loaded = loaded  # zmon.workload.loading.LoadedPipeline
        self.pipe = loaded.pipe
        self.instrumentation = instrumentation
        self.policy = policy  # zmon.policy.PolicyRunner
        self.oom = oom
        instrumentation.owner = self
        self._closed = False
        self._init_images: list[Any] = []

    def add_boundary_listener(self, listener: BoundaryListener) -> None:
        """Call listener.generation_started()/generation_finished() around every pipeline call."""
        self.instrumentation.boundaries.add(listener)

    def remove_boundary_listener(self, listener: BoundaryListener) -> None:
        self.instrumentation.boundaries.remove(listener)

    def run(self, max_generations: int | None = None, stop_event: threading.Event | None = None) -> RunResult:
        """Generate until max_generations (default: the spec's; None = forever) or stop_event is set.

        The stop event is checked between generations only: the current one always finishes.
        """
        spec = self.spec
        limit = max_generations if max_generations is not None else spec.max_generations
        stop = stop_event or threading.Event()
        if spec.img2img and not self._init_images:
            self._init_images = [_load_image(p) for p in spec.init_images]
        if spec.output_dir is not None:
            spec.output_dir.mkdir(parents=True, exist_ok=True)
        if self.oom is not None:
            self.oom.start()  # the pipeline is loaded: CUDA, if used, is initialised
        result = RunResult()
        started = time.monotonic()
        log.info(
            "generating %s: %d prompt(s) × %s, %d steps, guidance %g, batch %d%s",
            "forever" if limit is None else f"{limit} generation(s)",
            len(spec.prompts), ", ".join(f"{w}x{h}" for w, h in spec.resolutions), spec.steps,
            spec.guidance_scale, spec.batch_size, ", img2img" if spec.img2img else "",
        )
        i = 0
        while (limit is None or i < limit) and not stop.is_set():
            if spec.rate_per_second and i > 0:
                delay = started + i / spec.rate_per_second - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            status, retried = self._generate_one(i)
            result.generations += 1
            if retried:
                result.oom_retries += 1
                result.oom_recovered += int(status == "ok")
            if status == "ok":
                result.ok += 1
                result.images += spec.batch_size
            elif status == "oom":
                result.oom += 1
            else:
                result.errors += 1
            i += 1
            first = min(BROKEN_SETUP_GENERATIONS, limit or BROKEN_SETUP_GENERATIONS)
            if result.generations == first and result.errors == first:
                log.error("each of the first %d generation(s) failed: the setup is broken, stopping", first)
                result.broken_setup = True
                break
        result.stopped_early = stop.is_set()
        result.seconds = time.monotonic() - started
        log.info(
            "%d generation(s) in %.1fs: %d ok, %d oom, %d error(s), %d image(s)%s",
            result.generations, result.seconds, result.ok, result.oom, result.errors, result.images,
            f"; {result.oom_recovered} of {result.oom_retries} OOM retries succeeded" if result.oom_retries else "",
        )
        return result

    def _generate_one(self, i: int) -> tuple[str, bool]:
        """One generation: a pipeline call, and after an out-of-memory error the OomHandler's recovery and at
        most one retry. Returns (final status, whether it was retried); never raises."""
        attempt = 0
        while True:
            status = self._call(i, attempt)
            # Out of the except block: the failed call's traceback, and the tensors its frames held, are gone.
            if status != "oom" or self.oom is None or not self.oom.recover(i, attempt):
                return status, attempt > 0
            attempt += 1

    def _kwargs(self, i: int) -> dict[str, Any]:
        return self.spec.pipeline_kwargs(i, self._init_images)

    def _call(self, i: int, attempt: int) -> str:
        """One pipeline call; returns its status. OOM and errors are logged, never raised."""
        import torch

        kwargs = self._kwargs(i)
        try:
            out = self.pipe(**kwargs)
        except torch.OutOfMemoryError:
            log.warning("generation %d%s: out of GPU memory at %dx%d (batch %d)", i, " (retry)" if attempt else "",
                        kwargs["width"], kwargs["height"], self.spec.batch_size)
            if self.oom is not None:
                self.oom.snapshot(i, attempt)  # while the failed call's tensors are still referenced
            return "oom"
        except Exception as e:
            if i < BROKEN_SETUP_GENERATIONS:
                log.exception("generation %d failed", i)
            else:
                log.warning("generation %d failed: %s: %s", i, type(e).__name__, e)
            return "error"
        if self.spec.output_dir is not None:
            self._save(i, out)
        return "ok"

    def _save(self, i: int, out: Any) -> None:
        assert self.spec.output_dir is not None
        for k, image in enumerate(getattr(out, "images", None) or []):
            path = self.spec.output_dir / f"gen-{i:06d}-{k}.png"
            try:
                image.save(path)
            except (OSError, AttributeError) as e:
                log.warning("cannot save %s: %s", path, e)

    def close(self) -> None:
        """Remove the instrumentation, stop sampling and the server; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.oom is not None:
            self.oom.stop()
        self.instrumentation.remove()
        self.monitor.stop()


def _load_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


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
    from zmon.workload.loading import load_pipeline, model_defaults, vae_scale_factor

    img2img = bool(cfg.workload.init_images)
    class_name = static_pipeline_class(cfg)
    # Known class: its defaults now; unknown (a hub id not cached locally): provisional, redone after load.
    spec = build_spec(cfg, model_defaults(class_name, cfg.model.id) if class_name else {})

    metrics = GenerationMetrics(model=cfg.model.id)
    mon = Monitor(cfg, mode="run", registry=registry, serve_http=serve_http)
    mon.add_collector("generation", metrics)
    in_process = add_in_process_sources(mon)
    try:
        if start:
            mon.start()
        log.info("loading %s%s", cfg.model.id, " (img2img)" if img2img else "")
        loaded = load_pipeline(cfg.model, img2img=img2img)
        log.info(
            "loaded %s as %s on %s (%s) in %.2fs%s", loaded.model_id, loaded.class_name, loaded.device,
            loaded.dtype, loaded.load_seconds,
            f", {loaded.read_bytes_per_second / 1e6:.0f} MB/s" if loaded.read_bytes_per_second else "",
        )
        problems = recheck_resolutions(spec, vae_scale_factor(loaded.pipe))
        if problems:
            raise WorkloadError(problems)
        if class_name is None:
            spec = build_spec(cfg, model_defaults(loaded.pipe, cfg.model.id))
        facts = pipeline_facts(loaded.pipe, loaded.model_id, distilled=spec.distilled)
        facts.device, facts.dtype, facts.compiled = loaded.device, loaded.dtype, loaded.compiled
        facts.load_seconds = loaded.load_seconds
        facts.checkpoint_bytes = loaded.checkpoint_bytes
        facts.read_bytes_per_second = loaded.read_bytes_per_second
        metrics.set_pipeline(facts)
        inst = Instrumentation(loaded.pipe, cfg, metrics, model_id=loaded.model_id)
        connect_in_process(inst, in_process)
    except BaseException:
        mon.stop()
        raise
    policy = in_process.policy
    oom = OomHandler(
        cfg.workload.oom,
        remediator=policy.remediator if policy is not None else None,
        state=policy.state if policy is not None else None,
    )
    return RunSession(mon, metrics, spec, loaded, inst, policy=policy, oom=oom)


def run_main(cfg: Config, *, linger_seconds: float = 0.0) -> int:
    """The body of `zmon run` (after validation): returns the exit code. Installs SIGTERM/SIGINT handlers:
    the first signal stops after the current generation, a second one interrupts."""
    stop = threading.Event()
    previous = _install_stop_handlers(stop)
    session: RunSession | None = None
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
        result = session.run(stop_event=stop)
        if linger_seconds > 0 and not stop.is_set():
            log.info("done; serving /metrics for %.0fs more (SIGTERM to stop now)", linger_seconds)
            stop.wait(linger_seconds)
        return result.exit_code
    except KeyboardInterrupt:
        log.info("interrupted")
        return EXIT_OK
    finally:
        if session is not None:
            session.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        log.info("%s: stopping after the current generation (again to interrupt)", name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous
