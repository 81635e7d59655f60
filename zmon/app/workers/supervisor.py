"""The supervisor: one worker process per device, started, watched, restarted, drained.

Each worker (zmon.app.workers.worker) is a spawned process with its own pipeline on its own device and a round-robin
share of the workload (zmon.app.workers.protocol.WorkerSpec). The supervisor runs on the parent's main thread:

- start: every worker is spawned at once; each must report `Ready` within `start_timeout_seconds`.
- crash: a worker that exits without `Done` is restarted from the first item it had not finished, after a
  backoff that doubles from `restart_backoff_seconds` up to `max_restart_backoff_seconds`; after
  `max_restarts` restarts in a row without a successful generation it is given up (the others go on).
- hang: a ready worker whose heartbeat (a shared double it refreshes at every denoise step, every
  generation boundary and every second between generations) is older than `heartbeat_timeout_seconds` is
  killed and restarted the same way. Every restart is counted by device and reason (exit, hang,
  start_timeout).
- drain: when `stop` is set (SIGTERM), a Stop message tells every worker to finish its current generation and
  exit; one still running after `drain_timeout_seconds` is killed. No restarts while draining.

Messages from the workers go to a `WorkerSink` (the run's or the profile's merger), on this thread.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, Protocol

from zmon.app.workers.protocol import (
    MULTICAST_OFF,
    Command,
    Done,
    Fatal,
    Item,
    Placement,
    Ready,
    Record,
    Stop,
    WorkerSpec,
)
from zmon.collectors.workers import WorkerStatus
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.providers import cuda

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
KILL_JOIN_SECONDS = 10.0
RestartReason = Literal["exit", "hang", "start_timeout"]
RESTART_REASONS: tuple[RestartReason, ...] = ("exit", "hang", "start_timeout")
State = Literal["starting", "ready", "backoff", "done", "given_up", "fatal", "stopped"]
TERMINAL: frozenset[str] = frozenset({"done", "given_up", "fatal", "stopped"})


class DevicePlanError(ValueError):
    """`model.devices` cannot be satisfied here (no CUDA device, an index that does not exist)."""


def plan_devices(
    devices: tuple[int, ...] | str, *, cuda_count: Callable[[], int] = cuda.device_count
) -> list[Placement]:
    """The workers `model.devices` asks for: "cpu:N", "auto" (every visible CUDA device) or CUDA indices."""
    if isinstance(devices, str) and devices.startswith("cpu:"):
        n = int(devices.split(":", 1)[1])
        return [Placement(f"cpu:{k}", "cpu") for k in range(n)]
    count = cuda_count()
    if devices == "auto":
        if count == 0:
            raise DevicePlanError('model.devices: "auto" found no CUDA device (use "cpu:N" for CPU workers)')
        indices: tuple[int, ...] = tuple(range(count))
    else:
        assert isinstance(devices, tuple)
        indices = devices
        missing = [i for i in indices if i >= count]
        if missing:
            raise DevicePlanError(
                f"model.devices: no CUDA device {', '.join(map(str, missing))} here "
                f"({count} visible{'' if count else ': no CUDA'})"
            )
    return [Placement(f"cuda:{i}", f"cuda:{i}", i) for i in indices]


class WorkerSink(Protocol):
    """What the supervisor does with the workers' messages (on its own thread)."""

    def ready(self, worker: str, message: Ready) -> None: ...

    def record(self, worker: str, message: Record) -> None: ...

    def message(self, worker: str, message: object) -> None: ...  # Allocator, Stats, Item

    def down(self, worker: str) -> None: ...  # the worker process ended (any reason)


@dataclass
class _Worker:
    index: int
    placement: Placement
    next_item: int
    state: State = "starting"
    process: Any = None
    conn: Connection | None = None
    beat: Any = None
    incarnation: int = 0
    started_at: float = 0.0  # monotonic, of the current process
    restart_at: float = 0.0
    consecutive: int = 0  # restarts since the last successful generation
    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_REASONS, 0))
    pending_reason: RestartReason | None = None
    outcome: Done | Fatal | None = None
    items_done: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)  # the HTTP thread and the loop both send

    @property
    def label(self) -> str:
        return self.placement.label

    @property
    def running(self) -> bool:
        return self.process is not None


@dataclass(frozen=True)
class SupervisorResult:
    """How the workers ended. `exit_code`: 0 when stopped by a signal or every worker finished its share."""

    outcomes: dict[str, str]  # label → final state
    restarts: dict[str, dict[str, int]]
    stopped: bool
    usage_error: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        if self.usage_error:
            return EXIT_USAGE
        if self.stopped:
            return EXIT_OK
        return EXIT_OK if all(v == "done" for v in self.outcomes.values()) else EXIT_FAILURE


class Supervisor:
    """Starts one worker per placement and supervises them until each is done, given up, or drained."""

    def __init__(
        self,
        cfg: Config,
        placements: Sequence[Placement],
        sink: WorkerSink,
        *,
        limit: int | None,
        clock: Callable[[], float] = time.monotonic,
        entry: Callable[[WorkerSpec, Connection, Any], None] | None = None,
    ) -> None:
        """`entry`: the worker process's target, a module-level function (spawn pickles it by name);
        default: zmon.app.workers.worker.worker_main."""
        if not placements:
            raise ValueError("no worker to supervise")
        self.cfg = cfg
        self.config = cfg.model.workers
        self.sink = sink
        self.limit = limit
        self._clock = clock
        self._ctx = multiprocessing.get_context("spawn")
        self._entry = entry or _worker_entry
        self._lock = threading.Lock()
        self.workers = [_Worker(k, p, next_item=k) for k, p in enumerate(placements)]
        self._usage_error: tuple[str, ...] = ()
        self._draining_since: float | None = None

    # -- what the parent reads (any thread) -----------------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        now = self._clock()
        with self._lock:
            out = []
            for w in self.workers:
                age = None
                if w.state == "ready" and w.beat is not None:
                    age = max(0.0, now - float(w.beat.value))
                out.append(WorkerStatus(w.label, w.state == "ready", w.state, dict(w.restarts), age))
            return out

    def send(self, command: Command) -> int:
        """Send a command to every ready worker; returns how many it reached."""
        reached = 0
        with self._lock:
            ready = [(w.conn, w.send_lock) for w in self.workers if w.state == "ready" and w.conn is not None]
        for conn, lock in ready:
            with lock, contextlib.suppress(OSError, EOFError, ValueError):
                conn.send(command)
                reached += 1
        return reached

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> SupervisorResult:
        """Supervise until every worker is done, given up or drained; `stop` starts the drain."""
        os.environ.update(MULTICAST_OFF)  # inherited by the spawned workers (they set it again themselves)
        for w in self.workers:
            self._spawn(w)
        try:
            while True:
                if stop.is_set() and self._draining_since is None:
                    self._drain()
                self._poll()
                now = self._clock()
                for w in self.workers:
                    self._check(w, now)
                if all(w.state in TERMINAL for w in self.workers):
                    break
        finally:
            for w in self.workers:
                if w.running:
                    self._kill(w)
        with self._lock:
            return SupervisorResult(
                outcomes={w.label: w.state for w in self.workers},
                restarts={w.label: dict(w.restarts) for w in self.workers},
                stopped=self._draining_since is not None,
                usage_error=self._usage_error,
            )

    def _drain(self) -> None:
        self._draining_since = self._clock()
        log.info("draining %d worker(s): each finishes its current generation", sum(w.running for w in self.workers))
        for w in self.workers:
            if w.running and w.state == "starting":  # still loading: no generation to finish, nothing to wait for
                log.info("worker %s is still loading: stopping it", w.label)
                self._kill(w)
                continue
            if w.conn is not None:
                with w.send_lock, contextlib.suppress(OSError, EOFError, ValueError):  # gone: its exit is seen next
                    w.conn.send(Stop())
        with self._lock:
            for w in self.workers:
                if not w.running and w.state not in TERMINAL:
                    w.state = "stopped"  # waiting for a restart: not restarted

    def _poll(self) -> None:
        waitables: list[Any] = []
        for w in self.workers:
            if w.running:
                waitables.append(w.conn)
                waitables.append(w.process.sentinel)
        if not waitables:
            time.sleep(POLL_SECONDS)
            return
        for obj in wait(waitables, timeout=POLL_SECONDS):
            owner = next((w for w in self.workers if w.conn is obj), None)
            if owner is not None:
                self._receive(owner)  # a sentinel needs nothing here: _check sees the exit

    def _receive(self, w: _Worker) -> None:
        conn = w.conn
        assert conn is not None
        while True:
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except (EOFError, OSError):
                return
            self._handle(w, message)

    def _handle(self, w: _Worker, message: object) -> None:
        label = w.label
        if isinstance(message, Ready):
            with self._lock:
                w.state = "ready"
            log.info("worker %s ready (pid %d, incarnation %d)", label, message.pid, w.incarnation)
            self.sink.ready(label, message)
        elif isinstance(message, Record):
            if message.record.status == "ok":
                with self._lock:
                    w.consecutive = 0
            self.sink.record(label, message)
        elif isinstance(message, Item):
            with self._lock:
                w.next_item = max(w.next_item, message.item + len(self.workers))
                w.items_done += 1
            self.sink.message(label, message)
        elif isinstance(message, (Done, Fatal)):
            w.outcome = message
            if isinstance(message, Fatal):
                for p in message.problems:
                    log.error("worker %s: %s", label, p)
                if message.usage:
                    self._usage_error = message.problems
        else:
            self.sink.message(label, message)

    def _check(self, w: _Worker, now: float) -> None:
        if w.running:
            proc = w.process
            if not proc.is_alive():
                self._ended(w, now)
            elif self._draining_since is not None and now - self._draining_since > self.config.drain_timeout_seconds:
                log.error(
                    "worker %s did not finish its generation within %.0fs of the stop: killing it",
                    w.label,
                    self.config.drain_timeout_seconds,
                )
                self._kill(w)
                self._ended(w, now)
            elif w.state == "starting" and now - w.started_at > self.config.start_timeout_seconds:
                log.error("worker %s not ready after %.0fs: killing it", w.label, self.config.start_timeout_seconds)
                w.pending_reason = "start_timeout"
                self._kill(w)
                self._ended(w, now)
            elif w.state == "ready" and now - float(w.beat.value) > self.config.heartbeat_timeout_seconds:
                log.error("worker %s shows no progress for %.0fs: hung, killing it", w.label, now - float(w.beat.value))
                w.pending_reason = "hang"
                self._kill(w)
                self._ended(w, now)
        elif w.state == "backoff" and now >= w.restart_at and self._draining_since is None:
            w.restarts[w.pending_reason or "exit"] += 1
            w.pending_reason = None
            self._spawn(w)

    def _ended(self, w: _Worker, now: float) -> None:
        """The worker's process is gone: read what it said last, then decide (done, fatal, restart)."""
        if w.conn is not None:
            self._receive(w)
        code = w.process.exitcode
        self._close(w)
        self.sink.down(w.label)
        outcome = w.outcome
        with self._lock:
            if isinstance(outcome, Fatal):
                w.state = "fatal"
            elif isinstance(outcome, Done):
                w.state = "fatal" if outcome.broken_setup else "done"
            elif self._draining_since is not None:
                w.state = "stopped"
            elif self.limit is not None and w.next_item >= self.limit:
                w.state = "done"  # its share was finished before it went
            else:
                reason = w.pending_reason or "exit"
                w.pending_reason = reason
                if w.consecutive >= self.config.max_restarts:
                    log.error(
                        "worker %s gave up after %d restart(s) in a row (last: %s, exit code %s)",
                        w.label,
                        w.consecutive,
                        reason,
                        code,
                    )
                    w.state = "given_up"
                    return
                delay = min(
                    self.config.max_restart_backoff_seconds,
                    self.config.restart_backoff_seconds * 2**w.consecutive,
                )
                w.consecutive += 1
                w.state = "backoff"
                w.restart_at = now + delay
                log.warning(
                    "worker %s ended (%s, exit code %s): restarting in %.1fs from item %d",
                    w.label,
                    reason,
                    code,
                    delay,
                    w.next_item,
                )

    # -- processes ---------------------------------------------------------------------------------------

    def _spawn(self, w: _Worker) -> None:
        with sighup_blocked():  # the worker and multiprocessing's resource tracker start immune to SIGHUP
            self._start(w)

    def _start(self, w: _Worker) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        beat = self._ctx.Value("d", self._clock(), lock=False)
        spec = WorkerSpec(
            index=w.index,
            workers=len(self.workers),
            placement=w.placement,
            config=self.cfg,
            start=w.next_item,
            limit=self.limit,
            incarnation=w.incarnation,
        )
        proc = self._ctx.Process(
            target=self._entry, args=(spec, child, beat), name=f"zmon-worker-{w.label}", daemon=True
        )
        proc.start()
        child.close()  # the worker holds its end: EOF here once it is gone
        with self._lock:
            w.process, w.conn, w.beat = proc, parent, beat
            w.state = "starting"
            w.started_at = self._clock()
            w.outcome = None
            w.incarnation += 1
        log.info("worker %s started (pid %s) from item %d", w.label, proc.pid, w.next_item)

    def _kill(self, w: _Worker) -> None:
        proc = w.process
        if proc is None:
            return
        if proc.is_alive():
            proc.kill()
        proc.join(KILL_JOIN_SECONDS)

    def _close(self, w: _Worker) -> None:
        if w.process is not None:
            w.process.join(KILL_JOIN_SECONDS)
            if w.process.exitcode is not None:  # close() refuses a process that still runs
                w.process.close()
        if w.conn is not None:
            w.conn.close()
        w.process = None
        w.conn = None


def _worker_entry(spec: WorkerSpec, conn: Connection, beat: Any) -> None:
    """The spawned process's target: imports the worker (torch, diffusers) only in the child."""
    from zmon.app.workers.worker import worker_main

    worker_main(spec, conn, beat)


@contextlib.contextmanager
def sighup_blocked() -> Iterator[None]:
    """SIGHUP blocked on this thread while processes are started: a spawned process inherits the mask through
    exec, so a worker (and the resource tracker multiprocessing starts beside the first one, which unblocks only
    SIGINT and SIGTERM) never dies of a SIGHUP sent to the whole process group — a closed terminal, `kill -HUP
    -PGID`. A SIGHUP meant for this process meanwhile stays pending and is delivered (a reload) right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
