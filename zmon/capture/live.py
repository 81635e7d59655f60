"""Live diagnosis in the daemon: the profile's facts and rules over a rolling window of generations.

The window holds the last `window_seconds` of generation records (fed as they are emitted) and reads the
sampler's history (NVML, host, process, allocator) through the same `window_facts` the profile uses.
`evaluate()` is cheap (a few ms for hundreds of generations); the composition root schedules it as the
"diagnosis" source and stores what the zmon_bottleneck* collector exports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from zmon.analysis.diagnosis import diagnose
from zmon.analysis.facts import EnvironmentFacts, IoFacts, MultiGpuFacts
from zmon.analysis.live import LIVE_FIXES, VERDICTS, LiveSnapshot
from zmon.capture.inputs import GpuResolver, window_facts
from zmon.collectors.bottleneck import BottleneckState, FindingState
from zmon.config import Thresholds
from zmon.instrumentation.records import GenerationRecord
from zmon.sampling import SampleHistory

log = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_INTERVAL_SECONDS = 10.0
DEFAULT_MIN_GENERATIONS = 3
# The window is also bounded in count: at 37 generations/s (the embedded model) 300 s held 11,000 records,
# ~3 KB each, and every evaluation walked them all (the soak in docs/BENCHMARKS.md found RSS +6 % this way).
# The latest 1,000 generations are plenty for medians, CVs and shares.
DEFAULT_MAX_RECORDS = 1000
HISTORY_MARGIN_SECONDS = 60.0  # samples a little older than the window cover the time before its first generation


class LiveDiagnosis:
    """A rolling window of generation records over a SampleHistory; `evaluate()` diagnoses it.

    `observe(record)` takes every GenerationRecord (a record listener). `environment` describes the
    pipeline (asked once, lazily: it reads the pipeline's parameters). `multi_gpu`, asked at each
    evaluation, describes data-parallel workers (their count and scaling).
    """

    def __init__(
        self,
        history: SampleHistory,
        thresholds: Thresholds | None = None,
        *,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        min_generations: int = DEFAULT_MIN_GENERATIONS,
        max_records: int = DEFAULT_MAX_RECORDS,
        environment: Callable[[], EnvironmentFacts | None] | None = None,
        io: IoFacts | None = None,
        multi_gpu: Callable[[], MultiGpuFacts | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        self.history = history
        self.window_seconds = window_seconds
        self.thresholds = thresholds or Thresholds()
        self.min_generations = min_generations
        self._environment = environment
        self._env: EnvironmentFacts | None = None
        self._io = io
        self._multi_gpu = multi_gpu
        self._clock = clock
        self._lock = threading.Lock()
        self._records: deque[GenerationRecord] = deque(maxlen=max_records)  # the oldest drop out first
        self._first_record_at: float | None = None  # the process's first generation: first-gen slowdown
        self._resolver = GpuResolver()
        self.latest: LiveSnapshot | None = None
        self._logged: tuple[str, str] | None = None  # (verdict, confidence) last logged

    def observe(self, record: GenerationRecord) -> None:
        with self._lock:
            if self._first_record_at is None:
                self._first_record_at = record.started_at
            self._records.append(record)
            self._prune(self._clock())

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_seconds
        while self._records and self._records[0].started_at < cutoff:
            self._records.popleft()

    def evaluate(self) -> LiveSnapshot:
        """Diagnose the window now; never raises for lack of data (diagnosis None below min_generations)."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            records = list(self._records)
            first_in_window = bool(records) and records[0].started_at == self._first_record_at
        ok = [r for r in records if r.status == "ok"]
        if len(ok) < self.min_generations:
            snap = LiveSnapshot(now, self.window_seconds, len(ok), self.min_generations, None, None)
            self.latest = snap
            return snap
        device = Counter(r.device for r in ok).most_common(1)[0][0]
        facts = window_facts(
            records,
            self.history,
            env=self._env_facts(device),
            resolver=self._resolver,
            io=self._io,
            since=now - self.window_seconds - HISTORY_MARGIN_SECONDS,
            created_at=now,
            first_generation_in_window=first_in_window,
            outlier_ratio=self.thresholds.outlier_ratio_high,
            multi_gpu=self._multi_gpu() if self._multi_gpu is not None else None,
        )
        snap = LiveSnapshot(
            now, self.window_seconds, len(ok), self.min_generations, diagnose(facts, self.thresholds), facts
        )
        self._log_change(snap)
        self.latest = snap
        return snap

    def _log_change(self, snap: LiveSnapshot) -> None:
        """One INFO line when the verdict or its confidence changes, with what limits the confidence (a CPU-only
        run, a loaded host): the operator reads in the log whether the verdict describes the model or the host."""
        d = snap.diagnosis
        if d is None:
            return
        key = (d.verdict, d.confidence)
        if key == self._logged:
            return
        self._logged = key
        why = "; ".join(c for c in d.caveats if "left out" not in c)
        log.info(
            "live verdict: %s (confidence %s over %d generation(s))%s",
            d.verdict,
            d.confidence,
            snap.generations,
            f" — {why}" if why else "",
        )

    def evaluate_state(self) -> BottleneckState:
        """`evaluate()` as the "diagnosis" source: what the zmon_bottleneck* families export."""
        return bottleneck_state(self.evaluate())

    def _env_facts(self, device: str) -> EnvironmentFacts:
        if self._env is None and self._environment is not None:
            try:
                self._env = self._environment()
            except Exception:
                log.debug("environment facts unavailable", exc_info=True)
        return self._env or EnvironmentFacts(device=device)


def bottleneck_state(snap: LiveSnapshot) -> BottleneckState:
    """What the zmon_bottleneck* families export of one evaluation."""
    d = snap.diagnosis
    if d is None:
        return BottleneckState(snap.generations, None, VERDICTS, ())
    findings = tuple(FindingState(f.kind, f.active, f.priority, LIVE_FIXES.get(f.kind, f.title)) for f in d.findings)
    return BottleneckState(snap.generations, d.verdict, VERDICTS, findings)
