"""Side effects of the policy, in one place: remediation at safe points, alert hand-off, and their counters.

How a runner uses it (``zmon run`` and ``attach`` both)::

    state = PolicyState()
    alerts = AlertmanagerClient(config.alerting, ...) if config.alerting.enabled else None   # optional
    policy = PolicyRunner(config.policy, remediator=Remediator(), alerts=alerts, state=state)
    sampler.add_listener(policy.listener(store, source="allocator"))   # evaluate after each allocator sample
    registry.register(Guarded("policy", PolicyCollector(state, alerts), errors))

    # around every pipeline call, on the thread that runs it:
    policy.generation_started()      # blocks only while a remediation action is running (a few ms)
    try:
        pipe(...)
    finally:
        policy.generation_finished() # safe point: queued actions (and the periodic empty_cache) run here

Remedial actions (empty_cache, gc_collect) are never run in the middle of a generation: the SafePointGate
queues them and runs them at `generation_finished()` or, when no generation is in progress, at
`idle_tick()` (which `observe()` calls after each evaluation). empty_cache synchronises with pending GPU
work and blocks allocations while it runs, so it is measured (duration, bytes freed) and counted.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from zmon.config import PolicyConfig
from zmon.policy.engine import Alert, Decision, PolicyEngine, RuleStatus
from zmon.policy.figures import build_figures
from zmon.providers.allocator import AllocatorSample
from zmon.providers.base import SourceUnavailable
from zmon.providers.cuda import cuda_ready, empty_cache, load_torch_cuda, reserved_bytes
from zmon.rules import REMEDIAL_ACTIONS

if TYPE_CHECKING:
    from zmon.sampling.store import SnapshotStore

log = logging.getLogger(__name__)

Result = Literal["ok", "error", "dry_run", "skipped"]
# gc first: it frees tensors held only by reference cycles, which empty_cache can then release.
_ORDER = {"gc_collect": 0, "empty_cache": 1}


@dataclass(frozen=True)
class ActionResult:
    """The outcome of one remedial action. Bytes are summed over the watched devices."""

    action: str
    result: Result
    freed_bytes: int | None = None  # reserved_before − reserved_after (empty_cache only)
    seconds: float = 0.0  # duration of the call itself
    reserved_before: int | None = None
    reserved_after: int | None = None
    reason: str = ""
    detail: str = ""  # error message or why it was skipped
    at: float = 0.0  # unix seconds when it ran


class Remediator:
    """Runs remedial actions now (callers go through SafePointGate). Never raises: errors are results."""

    def __init__(
        self,
        torch_cuda: Any | None = None,
        clock: Callable[[], float] = time.perf_counter,
        *,
        dry_run: bool = False,
        devices: Sequence[int] | None = None,
        wall: Callable[[], float] = time.time,
        collect_garbage: Callable[[], int] = gc.collect,
    ) -> None:
        self._torch_cuda = torch_cuda
        self._clock = clock
        self._wall = wall
        self.dry_run = dry_run
        self._devices = None if devices is None else tuple(devices)
        self._gc = collect_garbage

    def run(self, action: str, *, reason: str = "") -> ActionResult:
        if action not in REMEDIAL_ACTIONS:
            return ActionResult(action, "skipped", reason=reason, detail="not a remedial action", at=self._wall())
        if self.dry_run:
            return ActionResult(action, "dry_run", reason=reason, detail="policy.dry_run", at=self._wall())
        if action == "gc_collect":
            return self._gc_collect(reason)
        return self._empty_cache(reason)

    def _gc_collect(self, reason: str) -> ActionResult:
        at = self._wall()
        t0 = self._clock()
        try:
            n = self._gc()
        except Exception as e:
            return ActionResult(
                "gc_collect",
                "error",
                seconds=self._clock() - t0,
                reason=reason,
                detail=f"{type(e).__name__}: {e}",
                at=at,
            )
        return ActionResult(
            "gc_collect",
            "ok",
            seconds=self._clock() - t0,
            reason=reason,
            detail=f"{n} unreachable objects",
            at=at,
        )

    def _empty_cache(self, reason: str) -> ActionResult:
        at = self._wall()
        try:
            cuda = load_torch_cuda(self._torch_cuda)
            if not cuda_ready(cuda):
                return ActionResult(
                    "empty_cache",
                    "skipped",
                    reason=reason,
                    detail="CUDA not initialised in this process",
                    at=at,
                )
        except SourceUnavailable as e:
            return ActionResult("empty_cache", "skipped", reason=reason, detail=str(e), at=at)
        devices = self._devices if self._devices is not None else tuple(range(int(cuda.device_count())))
        t0 = self._clock()
        try:
            before = reserved_bytes(cuda, devices)
            t0 = self._clock()
            empty_cache(cuda)
            seconds = self._clock() - t0
            after = reserved_bytes(cuda, devices)
        except Exception as e:
            return ActionResult(
                "empty_cache",
                "error",
                seconds=self._clock() - t0,
                reason=reason,
                detail=f"{type(e).__name__}: {e}",
                at=at,
            )
        return ActionResult("empty_cache", "ok", max(0, before - after), seconds, before, after, reason, at=at)


class SafePointGate:
    """Queues remedial actions and runs them only when no generation is in progress.

    `generation_started()` / `generation_finished()` bracket every pipeline call (nesting and several
    threads are counted); `idle_tick()` is the sampler's chance to run queued work while idle. An action
    queued twice before it runs runs once. While an action runs, `generation_started()` waits for it.
    """

    def __init__(
        self,
        execute: Callable[[str, str], ActionResult],
        *,
        on_result: Callable[[ActionResult], None] | None = None,
    ) -> None:
        self._execute = execute
        self._on_result = on_result
        self._cond = threading.Condition()
        self._in_flight = 0
        self._executing = False
        self._queue: dict[str, list[str]] = {}  # action → reasons

    @property
    def in_generation(self) -> bool:
        with self._cond:
            return self._in_flight > 0

    def pending(self) -> tuple[str, ...]:
        """Actions waiting for a safe point."""
        with self._cond:
            return tuple(self._queue)

    def submit(self, action: str, reason: str = "") -> None:
        """Queue an action for the next safe point (does not run it, even when idle: see idle_tick)."""
        with self._cond:
            reasons = self._queue.setdefault(action, [])
            if reason and reason not in reasons:
                reasons.append(reason)

    def generation_started(self) -> None:
        with self._cond:
            while self._executing:
                self._cond.wait()
            self._in_flight += 1

    def generation_finished(self) -> list[ActionResult]:
        """Mark the end of a pipeline call; at the last one in flight, run what is queued (on this thread)."""
        with self._cond:
            if self._in_flight == 0:
                log.warning("generation_finished() without generation_started(); ignored")
            self._in_flight = max(0, self._in_flight - 1)
        return self._run_if_safe()

    def idle_tick(self) -> list[ActionResult]:
        """Run queued actions now if no generation is in progress (call from the sampler thread)."""
        return self._run_if_safe()

    def _run_if_safe(self) -> list[ActionResult]:
        with self._cond:
            if self._in_flight > 0 or self._executing or not self._queue:
                return []
            batch = sorted(self._queue.items(), key=lambda kv: _ORDER.get(kv[0], 99))
            self._queue = {}
            self._executing = True
        results = []
        try:
            for action, reasons in batch:
                try:
                    r = self._execute(action, "; ".join(reasons))
                except Exception as e:  # an executor bug must not leave the gate closed
                    log.exception("remedial action %s failed", action)
                    r = ActionResult(action, "error", detail=f"{type(e).__name__}: {e}", at=time.time())
                results.append(r)
                if self._on_result is not None:
                    self._on_result(r)
        finally:
            with self._cond:
                self._executing = False
                self._cond.notify_all()
        return results


class AlertSink(Protocol):
    """Where alerts go (zmon.alerting.alertmanager.AlertmanagerClient); must not block."""

    def fire(self, alert: Alert) -> None: ...

    def resolve(self, alert: Alert) -> None: ...


@dataclass(frozen=True)
class PolicySnapshot:
    """Everything the policy collector exports, copied under the lock."""

    dry_run: bool
    actions: tuple[tuple[str, str, int], ...]  # (action, result, count)
    freed_bytes_total: int
    last_at: tuple[tuple[str, float], ...]  # action → unix seconds of its last run
    last_seconds: tuple[tuple[str, float], ...]  # action → duration of its last run
    last_freed: tuple[tuple[str, int], ...]  # action → bytes freed by its last run
    pending_actions: int
    rules: tuple[tuple[str, RuleStatus], ...]  # (device label, status)
    decisions: tuple[tuple[str, str, int], ...]  # (rule, event, count)


class PolicyState:
    """Thread-safe counters and gauges of the policy, written by the runner, read by PolicyCollector."""

    def __init__(self, *, dry_run: bool = False) -> None:
        self._lock = threading.Lock()
        self.dry_run = dry_run
        self._actions: dict[tuple[str, str], int] = {}
        self._freed_total = 0
        self._last_at: dict[str, float] = {}
        self._last_seconds: dict[str, float] = {}
        self._last_freed: dict[str, int] = {}
        self._pending = 0
        self._rules: dict[tuple[str, str], RuleStatus] = {}
        self._decisions: dict[tuple[str, str], int] = {}

    def record_action(self, r: ActionResult) -> None:
        with self._lock:
            key = (r.action, r.result)
            self._actions[key] = self._actions.get(key, 0) + 1
            if r.result == "ok":
                self._last_at[r.action] = r.at
                self._last_seconds[r.action] = r.seconds
                if r.freed_bytes is not None:
                    self._freed_total += r.freed_bytes
                    self._last_freed[r.action] = r.freed_bytes

    def record_decision(self, d: Decision) -> None:
        with self._lock:
            key = (d.rule, d.event)
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def set_rules(self, device: str, statuses: Sequence[RuleStatus]) -> None:
        with self._lock:
            for s in statuses:
                self._rules[(device, s.rule)] = s

    def replace_rules(self, device: str, statuses: Sequence[RuleStatus]) -> None:
        """The rules of one device after a reload: rules no longer configured leave the metrics."""
        with self._lock:
            for key in [k for k in self._rules if k[0] == device]:
                del self._rules[key]
            for s in statuses:
                self._rules[(device, s.rule)] = s

    def set_pending(self, n: int) -> None:
        with self._lock:
            self._pending = n

    def snapshot(self) -> PolicySnapshot:
        with self._lock:
            return PolicySnapshot(
                dry_run=self.dry_run,
                actions=tuple((a, r, n) for (a, r), n in sorted(self._actions.items())),
                freed_bytes_total=self._freed_total,
                last_at=tuple(sorted(self._last_at.items())),
                last_seconds=tuple(sorted(self._last_seconds.items())),
                last_freed=tuple(sorted(self._last_freed.items())),
                pending_actions=self._pending,
                rules=tuple((dev, s) for (dev, _), s in sorted(self._rules.items())),
                decisions=tuple((rule, ev, n) for (rule, ev), n in sorted(self._decisions.items())),
            )


class PolicyRunner:
    """Composes the policy: figures → one PolicyEngine per device → SafePointGate/Remediator and alerts.

    Thread model: `observe()` runs on the sampler thread, `generation_started/finished()` on the thread that
    calls the pipeline; both may run remedial actions, never during a generation.
    """

    def __init__(
        self,
        config: PolicyConfig,
        *,
        remediator: Remediator | None = None,
        alerts: AlertSink | None = None,
        state: PolicyState | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.remediator = remediator if remediator is not None else Remediator(dry_run=config.dry_run)
        if config.dry_run:
            self.remediator.dry_run = True
        self.alerts = alerts
        self.state = state if state is not None else PolicyState(dry_run=config.dry_run)
        self.state.dry_run = config.dry_run
        self._clock = clock
        self._wall = wall
        self._engines: dict[str, PolicyEngine] = {}
        self._previous: AllocatorSample | None = None
        self._lock = threading.Lock()  # observe() is serialised
        self._generations = 0
        self.gate = SafePointGate(self._execute, on_result=self._record)

    # ---------------------------------------------------------------------------- sampler side

    def observe(
        self,
        sample: AllocatorSample | None,
        *,
        extra: Mapping[str, float | None] | None = None,
        now: float | None = None,
    ) -> list[Decision]:
        """Evaluate the rules on a new allocator sample (and `extra` figures), act on the decisions, then
        give the gate an idle tick. Returns the decisions (for logs and tests).

        One engine per CUDA device (alerts and rule states carry `device`). With `sample=None` (no allocator
        source, e.g. a CPU-only service) the rules see only `extra`, in one engine without a device label.
        A sample taken before the process initialised CUDA has no devices and is not evaluated.
        """
        if not self.config.enabled:
            return []
        with self._lock:
            t = self._clock() if now is None else now
            scopes = [""] if sample is None else [str(d.device) for d in sample.devices]
            decisions: list[Decision] = []
            for scope in scopes:
                figures = build_figures(sample, self._previous, device=int(scope) if scope else None, extra=extra)
                engine = self._engine(scope)
                for d in engine.evaluate(figures, t):
                    self._dispatch(d)
                    decisions.append(d)
                self.state.set_rules(scope, engine.status())
            if sample is not None:
                self._previous = sample
        self.gate.idle_tick()
        self.state.set_pending(len(self.gate.pending()))
        return decisions

    def reconfigure(self, config: PolicyConfig) -> list[Alert]:
        """Adopt new policy settings (a configuration reload) between two evaluations: unchanged rules keep
        their state, changed or removed ones start over and their firing alerts are resolved (returned, and
        sent to the alert sink). `enabled` is read at each evaluation. A generation in progress is not
        touched: actions already queued still run at its end."""
        with self._lock:
            self.config = config
            self.remediator.dry_run = config.dry_run
            self.state.dry_run = config.dry_run
            ended: list[Alert] = []
            for scope, engine in self._engines.items():
                ended.extend(engine.reconfigure(config.active_rules, dry_run=config.dry_run))
                self.state.replace_rules(scope, engine.status())
        for alert in ended:
            log.info("policy rule %s changed by a reload: resolving its alert %s", alert.rule, alert.alertname)
            if self.alerts is not None:
                try:
                    self.alerts.resolve(alert)
                except Exception:
                    log.exception("alert hand-off failed for rule %s", alert.rule)
        return ended

    def listener(
        self,
        store: SnapshotStore,
        source: str = "allocator",
        extra: Callable[[], Mapping[str, float | None]] | None = None,
    ) -> Callable[[str, bool], None]:
        """A Sampler listener: after each good sample of `source`, observe the store's latest sample."""

        def on_sample(name: str, ok: bool) -> None:
            if name == source and ok:
                latest = store.latest(source)
                self.observe(
                    latest if isinstance(latest, AllocatorSample) else None,
                    extra=extra() if extra is not None else None,
                )

        return on_sample

    def idle_tick(self) -> list[ActionResult]:
        results = self.gate.idle_tick()
        self.state.set_pending(len(self.gate.pending()))
        return results

    # ---------------------------------------------------------------------------- generation side

    def generation_started(self) -> None:
        self.gate.generation_started()

    def generation_finished(self) -> list[ActionResult]:
        """End of a pipeline call: queue the periodic empty_cache if due, then run the queue (safe point)."""
        every = self.config.periodic_empty_cache_generations
        if self.config.enabled and every:
            with self._lock:
                self._generations += 1
                due = self._generations % every == 0
            if due:
                self.gate.submit("empty_cache", f"periodic: every {every} generations")
        results = self.gate.generation_finished()
        self.state.set_pending(len(self.gate.pending()))
        return results

    def active_alerts(self) -> list[Alert]:
        with self._lock:
            return [a for e in self._engines.values() for a in e.active_alerts()]

    # ---------------------------------------------------------------------------- internals

    def _engine(self, scope: str) -> PolicyEngine:
        engine = self._engines.get(scope)
        if engine is None:
            engine = PolicyEngine(
                self.config.active_rules,
                self._clock,
                wall=self._wall,
                labels={"device": scope} if scope else None,
                dry_run=self.config.dry_run,
            )
            self._engines[scope] = engine
        return engine

    def _dispatch(self, d: Decision) -> None:
        self.state.record_decision(d)
        level = logging.WARNING if d.log or d.event == "persisted" else logging.INFO
        suffix = " (dry run)" if d.dry_run and d.actions else ""
        actions = f" → {', '.join(d.actions)}{suffix}" if d.actions else ""
        log.log(level, "policy rule %s %s: %s%s", d.rule, d.event, d.reason, actions)
        for action in d.actions:
            self.gate.submit(action, f"rule {d.rule}: {d.reason}")
        if d.alert is not None and self.alerts is not None:
            try:
                if d.alert.ends_at is None:
                    self.alerts.fire(d.alert)
                else:
                    self.alerts.resolve(d.alert)
            except Exception:
                log.exception("alert hand-off failed for rule %s", d.rule)

    def _execute(self, action: str, reason: str) -> ActionResult:
        return self.remediator.run(action, reason=reason)

    def _record(self, r: ActionResult) -> None:
        self.state.record_action(r)
        if r.result == "ok" and r.action == "empty_cache":
            log.info("empty_cache freed %d bytes in %.1f ms (%s)", r.freed_bytes or 0, r.seconds * 1e3, r.reason)
        elif r.result == "error":
            log.warning("%s failed: %s (%s)", r.action, r.detail, r.reason)
        else:
            log.info("%s: %s %s (%s)", r.action, r.result, r.detail, r.reason)
