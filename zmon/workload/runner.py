"""Generating a workload: the one pipeline caller (`Workload`) and the loop of `zmon run` (`Runner`).

Both `zmon run` and `zmon profile` call the pipeline through `Workload.call`, so a generation is the same
call with the same arguments, errors and out-of-memory handling in both. The pipeline they call is
already instrumented by the composition root (zmon.app); nothing here knows about monitoring.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from zmon.exitcodes import EXIT_FAILURE, EXIT_OK
from zmon.workload.oom import OomHandler
from zmon.workload.spec import WorkloadSpec

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0  # the longest wait between two heartbeat() calls while waiting for the rate
BROKEN_SETUP_GENERATIONS = 3  # if each of the first N generations errors, the setup is broken: stop
CallStatus = Literal["ok", "oom", "error"]


@dataclass(frozen=True)
class Call:
    """One pipeline call: how it ended, its wall time, and the output when it succeeded."""

    status: CallStatus
    seconds: float
    output: Any = None


class Workload:
    """Calls a pipeline with the i-th item of a WorkloadSpec (prompt × resolution cycle, seed, init image)."""

    def __init__(self, pipe: Any, spec: WorkloadSpec) -> None:
        self.pipe = pipe
        self.spec = spec
        self._images: list[Any] = []

    def kwargs(self, i: int) -> dict[str, Any]:
        """The pipeline arguments of generation i; a fresh generator each call, so a retry repeats the image."""
        if self.spec.img2img and not self._images:
            self._images = [_load_image(p) for p in self.spec.init_images]
        return self.spec.pipeline_kwargs(i, self._images)

    def call(self, i: int, attempt: int = 0, *, oom: OomHandler | None = None) -> Call:
        """One pipeline call; never raises: out-of-memory and errors are logged and returned as a status.

        `oom` takes its memory snapshot while the failed call's tensors are still referenced.
        """
        kwargs = self.kwargs(i)
        t0 = time.perf_counter()
        try:
            out = self.pipe(**kwargs)
        except torch.OutOfMemoryError:
            log.warning(
                "generation %d%s: out of GPU memory at %dx%d (batch %d)",
                i,
                " (retry)" if attempt else "",
                kwargs["width"],
                kwargs["height"],
                self.spec.batch_size,
            )
            if oom is not None:
                oom.snapshot(i, attempt)
            return Call("oom", time.perf_counter() - t0)
        except Exception as e:
            if i < BROKEN_SETUP_GENERATIONS:
                log.exception("generation %d failed", i)
            else:
                log.warning("generation %d failed: %s: %s", i, type(e).__name__, e)
            return Call("error", time.perf_counter() - t0)
        return Call("ok", time.perf_counter() - t0, out)


@dataclass
class RunResult:
    """What a run did; `broken_setup` means every one of the first generations failed."""

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
        """What `zmon run` exits with after this run."""
        return EXIT_FAILURE if self.broken_setup else EXIT_OK


class Runner:
    """The `zmon run` loop: generate until max_generations or a stop event, at a rate or back to back.

    `oom` decides what an out-of-memory generation leads to (snapshot, empty_cache, one retry); None: it is
    only counted and the run goes on. Images are written to the spec's output_dir when it is set, each whole
    or not at all (written under a temporary name, then renamed); a failed write is counted in
    `output_failures`, logged once per streak, and never stops the run.
    """

    def __init__(self, workload: Workload, *, oom: OomHandler | None = None) -> None:
        self.workload = workload
        self.spec = workload.spec
        self.oom = oom
        self.output_failures = 0  # images not written (zmon_output_write_failures_total)
        self.images_written = 0
        self._output_failing = False

    def run(
        self,
        max_generations: int | None = None,
        stop_event: threading.Event | None = None,
        *,
        items: Iterable[int] | None = None,
        on_item: Callable[[int, CallStatus], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> RunResult:
        """Generate until max_generations (default: the spec's; None = forever) or stop_event is set.

        The stop event is checked between generations only: the current one always finishes. `items`: the
        workload items to generate instead of 0, 1, 2, … (a worker's round-robin share); with a rate, item i
        is due at (i − first item) / rate after the start, so N workers sharing items keep the total rate.
        `on_item(i, status)` is called after each item (its retry included). `heartbeat()` is called from this
        thread between items and at least every HEARTBEAT_SECONDS while waiting for the rate: a supervisor
        that sees no beat for long knows this loop is stuck (inside a generation the pipeline hooks beat).
        """
        spec = self.spec
        limit = max_generations if max_generations is not None else spec.max_generations
        if items is None:
            items = range(limit) if limit is not None else itertools.count()
        stop = stop_event or threading.Event()
        if spec.output_dir is not None:
            try:  # created (and checked writable) at start-up already; this covers a directory removed since
                spec.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.error("cannot create workload.output_dir %s: %s", spec.output_dir, e.strerror or e)
        if self.oom is not None:
            self.oom.start()  # the pipeline is loaded: CUDA, if used, is initialised
        result = RunResult()
        started = time.monotonic()
        log.info(
            "generating %s: %d prompt(s) × %s, %d steps, guidance %g, batch %d%s",
            "forever" if limit is None else f"{limit} generation(s)",
            len(spec.prompts),
            ", ".join(f"{w}x{h}" for w, h in spec.resolutions),
            spec.steps,
            spec.guidance_scale,
            spec.batch_size,
            ", img2img" if spec.img2img else "",
        )
        first: int | None = None
        for i in items:
            if (limit is not None and result.generations >= limit) or stop.is_set():
                break
            first = i if first is None else first
            if heartbeat is not None:
                heartbeat()
            if spec.rate_per_second and i > first:
                due = started + (i - first) / spec.rate_per_second
                if self._wait_until(due, stop, heartbeat):
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
            if on_item is not None:
                on_item(i, status)
            if heartbeat is not None:
                heartbeat()
            judged = min(BROKEN_SETUP_GENERATIONS, limit or BROKEN_SETUP_GENERATIONS)
            if result.generations == judged and result.errors == judged:
                log.error("each of the first %d generation(s) failed: the setup is broken, stopping", judged)
                result.broken_setup = True
                break
        result.stopped_early = stop.is_set()
        result.seconds = time.monotonic() - started
        log.info(
            "%d generation(s) in %.1fs: %d ok, %d oom, %d error(s), %d image(s)%s",
            result.generations,
            result.seconds,
            result.ok,
            result.oom,
            result.errors,
            result.images,
            f"; {result.oom_recovered} of {result.oom_retries} OOM retries succeeded" if result.oom_retries else "",
        )
        return result

    @staticmethod
    def _wait_until(due: float, stop: threading.Event, heartbeat: Callable[[], None] | None) -> bool:
        """Wait until monotonic time `due`; True when stopped meanwhile."""
        while True:
            delay = due - time.monotonic()
            if delay <= 0:
                return False
            if stop.wait(min(delay, HEARTBEAT_SECONDS) if heartbeat is not None else delay):
                return True
            if heartbeat is not None:
                heartbeat()

    def _generate_one(self, i: int) -> tuple[CallStatus, bool]:
        """One generation: a pipeline call, and after an out-of-memory error the OomHandler's recovery and at
        most one retry. Returns (final status, whether it was retried); never raises."""
        attempt = 0
        while True:
            call = self.workload.call(i, attempt, oom=self.oom)
            if call.status == "ok" and self.spec.output_dir is not None:
                self._save(i, call.output)
            # Out of the except block: the failed call's traceback, and the tensors its frames held, are gone.
            if call.status != "oom" or self.oom is None or not self.oom.recover(i, attempt):
                return call.status, attempt > 0
            attempt += 1

    def _save(self, i: int, out: Any) -> None:
        assert self.spec.output_dir is not None
        for k, image in enumerate(getattr(out, "images", None) or []):
            path = self.spec.output_dir / f"gen-{i:06d}-{k}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                image.save(tmp, format="PNG")
                os.replace(tmp, path)  # all or nothing: a full disk never leaves a truncated PNG behind
            except (OSError, AttributeError, ValueError) as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                self.output_failures += 1
                if not self._output_failing:
                    self._output_failing = True
                    log.warning("cannot save %s: %s (counting failures until a save works again)", path, e)
                continue
            self.images_written += 1
            if self._output_failing:
                self._output_failing = False
                log.info(
                    "saving images to %s works again after %d failure(s)", self.spec.output_dir, self.output_failures
                )

    def stop(self) -> None:
        """Stop what the run started (the OOM handler's allocator history); idempotent."""
        if self.oom is not None:
            self.oom.stop()


def _load_image(path: Path) -> Any:
    from PIL import Image  # lazy: only img2img workloads need it

    with Image.open(path) as im:
        return im.convert("RGB")
