"""torch.profiler traces and CUDA memory snapshots: for `zmon profile`, and on demand in the daemon (/trace).

The daemon's capture is a boundary listener (`TraceController`): armed from the HTTP thread (the route is
wired by the composition root), started and stopped at generation boundaries on the generating thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zmon.instrumentation.stages import StageTimingHandle
from zmon.providers import cuda

log = logging.getLogger(__name__)

CHROME_TRACE_NAME = "trace.json"
TENSORBOARD_DIR_NAME = "tb"


def profiler_activities(cuda: bool) -> list[Any]:
    """CPU ops always; CUDA kernels and memcpys too when the pipeline runs on CUDA."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]


# ------------------------------------------------------------------------------------------------ zmon profile


@dataclass(frozen=True)
class TraceOutputs:
    """Where a `zmon profile --trace` capture went."""

    chrome_trace: Path  # open in chrome://tracing or https://ui.perfetto.dev
    tensorboard_dir: Path  # `tensorboard --logdir` (torch-tb-profiler plugin) layout
    generations: int


def capture_trace(generate: Callable[[int], object], generations: int, out_dir: Path, *, cuda: bool) -> TraceOutputs:
    """Run `generate(k)` for k < generations under torch.profiler; write a Chrome trace and a TensorBoard log.

    Apply stage timing with nvtx=True around this call so stages show up as "zmon/<stage>" ranges.
    """
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tb_dir = out_dir / TENSORBOARD_DIR_NAME
    tb_dir.mkdir(exist_ok=True)
    chrome = out_dir / CHROME_TRACE_NAME
    with torch.profiler.profile(activities=profiler_activities(cuda)) as prof:
        for k in range(generations):
            generate(k)
    # Kineto saves a trace once: export it, then give TensorBoard the same file under the name
    # tensorboard_trace_handler would use (<worker>.<ns>.pt.trace.json), hard-linked when possible.
    prof.export_chrome_trace(str(chrome))
    tb_file = tb_dir / f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}.pt.trace.json"
    try:
        os.link(chrome, tb_file)
    except OSError:
        shutil.copyfile(chrome, tb_file)
    return TraceOutputs(chrome, tb_dir, generations)


class MemorySnapshotUnavailable(Exception):
    """A CUDA memory snapshot was asked for where there is no CUDA."""


def capture_memory_snapshot(
    generate: Callable[[int], object],
    generations: int,
    path: Path,
    *,
    max_entries: int,
    device: str,
) -> Path:
    """Record the CUDA allocator's history over `generations` calls and dump it (memory_viz pickle).

    Raises MemorySnapshotUnavailable off CUDA. History recording keeps a stack per allocation, which slows
    generations down: it runs after the measured ones, never during them.
    """
    if not device.startswith("cuda") or not cuda.is_available():
        raise MemorySnapshotUnavailable(
            f"--memory-snapshot needs CUDA (the allocator's recorded history); the pipeline runs on "
            f"{device}: no snapshot taken"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    history = cuda.MemoryHistory()
    history.start(max_entries)
    try:
        for k in range(generations):
            generate(k)
        history.dump(path)
    finally:
        history.stop()
    return path


# ------------------------------------------------------------------------------------------------ daemon

TraceState = Literal["idle", "armed", "capturing", "writing", "done", "failed"]


class TraceBusy(Exception):
    """A capture is already armed or running."""


class TraceController:
    """Captures a torch.profiler trace of the next N generations, started and stopped at their boundaries.

    A boundary listener (`generation_started` / `generation_finished`, called by the run session or the
    attach handle around every pipeline call); `request(n)` arms it from the HTTP thread. While capturing,
    the pipeline's stage timing (when given) opens "zmon/<stage>" ranges so the trace names the stages.
    The Chrome trace is exported in the generating thread after the N-th generation, between generations.
    """

    def __init__(
        self,
        directory: Path,
        max_generations: int = 20,
        *,
        stage_timing: StageTimingHandle | None = None,
        cuda: bool | None = None,  # None: CUDA activities when CUDA is available
        profiler_factory: Callable[[list[Any]], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.max_generations = max_generations
        self._stage_timing = stage_timing
        self._cuda = cuda
        self._factory = profiler_factory or _default_profiler
        self._clock = clock
        self._lock = threading.Lock()
        self.state: TraceState = "idle"
        self.requested = 0
        self.captured = 0
        self.path: Path | None = None  # of the capture armed or running
        self.last_path: Path | None = None  # of the last finished capture
        self.error: str | None = None
        self.requested_at: float | None = None
        self.finished_at: float | None = None
        self._profiler: Any = None
        self._seq = 0
        self._ranges_before: bool | None = None

    # -- control (HTTP thread) -----------------------------------------------------------------------------

    def request(self, generations: int) -> Path:
        """Arm a capture of the next `generations` calls; returns the path the trace will be written to.

        Raises ValueError for a count outside 1..max_generations, TraceBusy while a capture is pending,
        OSError when the directory cannot be created.
        """
        if isinstance(generations, bool) or not isinstance(generations, int):
            raise ValueError(f"generations must be an integer, got {generations!r}")
        if not 1 <= generations <= self.max_generations:
            raise ValueError(f"generations must be within 1..{self.max_generations}, got {generations}")
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.state in ("armed", "capturing", "writing"):
                raise TraceBusy(f"a capture is already {self.state} ({self.path})")
            self._seq += 1
            stamp = dt.datetime.fromtimestamp(self._clock(), dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self.path = self.directory / f"trace-{stamp}-{os.getpid()}-{self._seq}.json"
            self.state, self.requested, self.captured = "armed", generations, 0
            self.error, self.requested_at, self.finished_at = None, self._clock(), None
            return self.path

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state,
                "requested_generations": self.requested,
                "captured_generations": self.captured,
                "path": None if self.path is None else str(self.path),
                "last_path": None if self.last_path is None else str(self.last_path),
                "error": self.error,
                "requested_at": self.requested_at,
                "finished_at": self.finished_at,
                "directory": str(self.directory),
                "max_generations": self.max_generations,
            }

    # -- boundaries (generating thread) ---------------------------------------------------------------

    def generation_started(self) -> None:
        with self._lock:
            if self.state != "armed":
                return
            self.state = "capturing"
        try:
            on_cuda = self._cuda if self._cuda is not None else cuda.is_available()
            profiler = self._factory(profiler_activities(on_cuda))
            self._set_ranges(True)
            profiler.start()
        except Exception as e:
            self._set_ranges(False)
            self._fail(f"cannot start the profiler: {type(e).__name__}: {e}")
            return
        self._profiler = profiler

    def generation_finished(self) -> None:
        with self._lock:
            if self.state != "capturing" or self._profiler is None:
                return
            self.captured += 1
            if self.captured < self.requested:
                return
            self.state = "writing"
            profiler, path = self._profiler, self.path
            self._profiler = None
        self._set_ranges(False)
        try:
            profiler.stop()
            assert path is not None
            profiler.export_chrome_trace(str(path))
        except Exception as e:
            self._fail(f"cannot write the trace: {type(e).__name__}: {e}")
            return
        with self._lock:
            self.state, self.last_path, self.finished_at = "done", path, self._clock()
        log.info("trace of %d generation(s) written to %s", self.requested, path)

    def close(self) -> None:
        """Stop a capture in progress without writing it (the daemon is shutting down)."""
        with self._lock:
            profiler, self._profiler = self._profiler, None
            if self.state in ("armed", "capturing"):
                self.state, self.error = "failed", "stopped before the capture finished"
        if profiler is not None:
            self._set_ranges(False)
            try:
                profiler.stop()
            except Exception:
                log.debug("stopping the profiler failed", exc_info=True)

    def _fail(self, reason: str) -> None:
        log.warning("trace capture failed: %s", reason)
        with self._lock:
            self.state, self.error, self.finished_at = "failed", reason, self._clock()

    def _set_ranges(self, on: bool) -> None:
        """Turn stage timing's "zmon/<stage>" ranges on for the capture, and back to what they were after.

        StageTimingHandle reads its config at the start of each generation and has no public setter yet, so
        the frozen config is swapped for a copy with nvtx changed.
        """
        handle = self._stage_timing
        if handle is None:
            return
        if on:
            self._ranges_before = handle.nvtx
            handle.nvtx = True
        elif self._ranges_before is not None:
            handle.nvtx = self._ranges_before
            self._ranges_before = None


def _default_profiler(activities: list[Any]) -> Any:
    import torch

    return torch.profiler.profile(activities=activities)
