"""What `zmon run` does when a generation runs out of GPU memory: snapshot, release the cache, retry once.

A `torch.OutOfMemoryError` is always counted (the stage timer's record: zmon_generations_total{status="oom"}).
With `workload.oom` the runner then, in this order:

1. `snapshot(i)` — still inside the `except` block, so the failed call's tensors are alive — dumps the
   allocator's recorded history (`torch.cuda.memory._dump_snapshot`) to
   `memory_snapshot_dir/oom-<unix>-<generation>[-retry].pickle`, viewable at https://pytorch.org/memory_viz, at most
   `max_snapshots` such files in the directory. Recording is started by `start()` when the run begins
   (`_record_memory_history(max_entries=N, stacks="python")`), only when a directory is configured and CUDA is
   in use: it costs CPU time on every allocation.
2. `recover(i, attempt)` — after the `except` block, once the traceback (and the activations its frames hold)
   is gone — runs `empty_cache` through the policy's `Remediator` (measured: duration, bytes freed) and records
   the result in the policy's `PolicyState` (zmon_remediation_actions_total{action="empty_cache"}), then says
   whether to run the generation again: once, when `retry` is on. This is a safe point: the pipeline call has
   returned, so its boundary listeners have already run.

Usage (what RunSession does)::

    oom = OomHandler(cfg.workload.oom, remediator=policy.remediator, state=policy.state)
    oom.start()
    ...
    try:
        out = pipe(**kwargs)
    except torch.OutOfMemoryError:
        oom.snapshot(i, attempt)
        failed = True
    if failed and oom.recover(i, attempt):
        ...  # call the pipeline again with fresh kwargs (a new generator with the same seed)
    oom.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmon.config import OomConfig
from zmon.policy.actions import ActionResult, PolicyState, Remediator
from zmon.providers.base import SourceUnavailable
from zmon.providers.cuda import MemoryHistory, cuda_ready, load_torch_cuda

log = logging.getLogger(__name__)

SNAPSHOT_GLOB = "oom-*.pickle"
OOM_REASON = "oom"
MAX_EVENTS = 100


@dataclass(frozen=True)
class OomEvent:
    """What handling one out-of-memory error did (the latest are in `OomHandler.events`)."""

    generation: int
    attempt: int  # 0: the first call, 1: the retry
    empty_cache: ActionResult
    retry: bool  # the generation is run again


class OomHandler:
    """Snapshot, empty_cache and the retry decision for out-of-memory generations. See the module docstring.

    `remediator` and `state` are the policy's when a PolicyRunner is wired (so the action is measured and
    counted like any other remediation, and `policy.dry_run` applies); otherwise a Remediator of its own runs
    it, uncounted. `torch_cuda` (default: `torch.cuda`, imported lazily) is injected in tests; its `memory`
    attribute is the `torch.cuda.memory` module.
    """

    def __init__(
        self,
        config: OomConfig,
        *,
        remediator: Remediator | None = None,
        state: PolicyState | None = None,
        torch_cuda: Any | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.remediator = remediator if remediator is not None else Remediator(torch_cuda)
        self.state = state
        self._torch_cuda = torch_cuda
        self._history = MemoryHistory(torch_cuda)
        self._wall = wall
        self._lock = threading.Lock()
        self.snapshots: list[Path] = []  # written by this handler, oldest first
        self.events: deque[OomEvent] = deque(maxlen=MAX_EVENTS)  # the latest, for logs and tests
        self._cap_logged = False

    # ------------------------------------------------------------------------------------ memory history

    @property
    def recording(self) -> bool:
        """The allocator history is being recorded (snapshots possible)."""
        return self._history.recording

    def start(self) -> bool:
        """Start recording the allocator history if a snapshot directory is configured and CUDA is in use.

        Idempotent; returns whether it is recording. Call once the pipeline is loaded (CUDA initialised).
        """
        d = self.config.memory_snapshot_dir
        with self._lock:
            if self.recording or d is None:
                return self.recording
            try:
                if not cuda_ready(load_torch_cuda(self._torch_cuda)):
                    log.info("workload.oom.memory_snapshot_dir is set but CUDA is not in use: no OOM snapshots")
                    return False
                d.expanduser().mkdir(parents=True, exist_ok=True)
                self._history.start(self.config.max_entries)
            except (SourceUnavailable, OSError, RuntimeError, AttributeError) as e:
                log.warning("cannot record the CUDA allocator history for OOM snapshots: %s", e)
                return False
        log.info(
            "recording the CUDA allocator history (%d entries) for OOM snapshots in %s", self.config.max_entries, d
        )
        return True

    def stop(self) -> None:
        """Stop recording (frees the history); idempotent."""
        with self._lock:
            try:
                self._history.stop()
            except Exception as e:
                log.warning("cannot stop recording the CUDA allocator history: %s", e)

    def snapshot(self, generation: int, attempt: int = 0) -> Path | None:
        """Dump the recorded history to `oom-<unix>-<generation>.pickle` (`…-retry.pickle` for the retry);
        None when off, capped or failing.

        Call it inside the `except` block, while the failed call's tensors are still referenced.
        """
        d = self.config.memory_snapshot_dir
        with self._lock:
            if not self.recording or d is None:
                return None
            d = d.expanduser()
            existing = len(list(d.glob(SNAPSHOT_GLOB)))
            if existing >= self.config.max_snapshots:
                if not self._cap_logged:
                    log.warning(
                        "OOM snapshot not written: %s holds %d %s file(s) (workload.oom.max_snapshots); "
                        "delete them to get new ones",
                        d,
                        existing,
                        SNAPSHOT_GLOB,
                    )
                    self._cap_logged = True
                return None
            path = d / f"oom-{int(self._wall())}-{generation}{'-retry' if attempt else ''}.pickle"
            try:
                self._history.dump(path)
            except Exception as e:
                log.warning("cannot write the OOM memory snapshot %s: %s", path, e)
                return None
            self.snapshots.append(path)
        log.warning("OOM memory snapshot written to %s (open it at https://pytorch.org/memory_viz)", path)
        return path

    # ------------------------------------------------------------------------------------ recovery

    def recover(self, generation: int, attempt: int) -> bool:
        """Release the allocator's cache (measured, counted) and say whether to run the generation again.

        Call it after the `except` block. Only the first attempt is retried, and only with `retry` on.
        """
        result = self.remediator.run("empty_cache", reason=OOM_REASON)
        if self.state is not None:
            self.state.record_action(result)
        retry = self.config.retry and attempt == 0
        event = OomEvent(generation, attempt, result, retry)
        with self._lock:
            self.events.append(event)
        if result.result == "ok":
            done = f"empty_cache freed {(result.freed_bytes or 0) / 2**20:.0f} MiB in {result.seconds * 1e3:.1f} ms"
        else:
            done = f"empty_cache {result.result}" + (f" ({result.detail})" if result.detail else "")
        then = "retrying it once" if retry else "going on with the next generation"
        log.warning("generation %d%s after OOM: %s; %s", generation, " (retry)" if attempt else "", done, then)
        return retry
