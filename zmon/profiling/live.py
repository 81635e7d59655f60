"""Live diagnosis in the daemon: the profile flowchart over a rolling window of generations and samples."""

from __future__ import annotations

import logging
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from zmon.instrumentation.records import GenerationRecord
from zmon.profiling.config import Thresholds
from zmon.profiling.diagnosis import RULES, Diagnosis, Verdict, diagnose
from zmon.profiling.facts import (
    CpuSample,
    EnvironmentFacts,
    GpuSample,
    IoFacts,
    MemoryFacts,
    ProfileFacts,
    build_facts,
    cpu_samples_from_counters,
)

log = logging.getLogger(__name__)

SOURCE_NAME = "diagnosis"  # the sampled source whose snapshot is the latest LiveSnapshot
DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_INTERVAL_SECONDS = 10.0
DEFAULT_MIN_GENERATIONS = 3
KINDS: tuple[str, ...] = tuple(r.kind for r in RULES)
VERDICTS: tuple[str, ...] = typing.get_args(Verdict)

# One fixed remedy per finding kind for the `fix` label: the diagnosis' own fix text quotes live figures
# (41% of the generation…) and would mint a new series at every evaluation. The tailored text is in
# GET /diagnosis.
LIVE_FIXES: Mapping[str, str] = {
    "cpu_bound": "enable the prompt-embedding cache (workload.prompt_cache.enabled), batch prompt encoding, "
    "move PNG encoding off the critical path",
    "memory_fragmentation": "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, empty_cache only at safe "
    "points, pre-warm the largest shape",
    "gpu_underutilization": "raise the batch size, torch.compile the transformer, find the gaps in a trace",
    "io_throttling": "keep the model resident on fast storage (NVMe, safetensors) and warm up before serving",
    "kernel_optimization": "capture a trace (POST /trace) and look for synchronisations, throttled clocks or "
    "recompiles",
    "multi_gpu_network": "use NVLink-connected GPUs, larger per-GPU batches, fewer synchronisation points",
    "cfg_on_distilled": "set guidance_scale 0 on the guidance-distilled model",
    "excess_steps": "use the step count of the model card",
    "compile_off": "torch.compile the transformer (model.compile: true)",
}


@dataclass(frozen=True)
class LiveSnapshot:
    """One evaluation of the rolling window; `diagnosis` is None until enough generations were seen."""

    evaluated_at: float  # unix seconds
    window_seconds: float
    generations: int  # successful generations in the window
    min_generations: int
    diagnosis: Diagnosis | None
    facts: ProfileFacts | None

    def to_dict(self) -> dict[str, Any]:
        facts = None
        if self.facts is not None:
            facts = self.facts.to_dict()
            # The raw samples are many and add nothing a dashboard lacks; the per-stage figures stay.
            facts["utilization"].pop("gpu_samples", None)
            facts["utilization"].pop("cpu_samples", None)
        return {
            "evaluated_at": self.evaluated_at,
            "window_seconds": self.window_seconds,
            "generations": self.generations,
            "min_generations": self.min_generations,
            "verdict": None if self.diagnosis is None else self.diagnosis.verdict,
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
            "facts": facts,
        }


class LiveDiagnosis:
    """Holds the last `window_seconds` of generation records and resource samples; `evaluate()` diagnoses.

    Fed by `observe(record)` (every GenerationRecord) and `on_sample(store)(name, ok)` (a sampler listener
    that copies each fresh nvml / host / process / allocator snapshot). `evaluate()` is cheap (a few ms for
    hundreds of generations) and is scheduled as the "diagnosis" source.
    """

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        thresholds: Thresholds | None = None,
        *,
        min_generations: int = DEFAULT_MIN_GENERATIONS,
        environment: Callable[[], EnvironmentFacts | None] | None = None,
        io: IoFacts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        self.window_seconds = window_seconds
        self.thresholds = thresholds or Thresholds()
        self.min_generations = min_generations
        self._environment = environment
        self._env: EnvironmentFacts | None = None
        self._io = io
        self._clock = clock
        self._lock = threading.Lock()
        self._records: deque[GenerationRecord] = deque()
        self._first_record_at: float | None = None  # the process's first generation: first-gen slowdown
        self._nvml: deque[tuple[float, Any]] = deque()  # (unix s, providers.nvml.NvmlSample)
        self._cpu: deque[tuple[float, float | None, float | None]] = deque()  # (unix s, cpu s, host ratio)
        self._host_ratio: float | None = None
        self._allocator: Any = None  # latest providers.allocator.AllocatorSample
        self._nvml_index: dict[int, int | None] = {}  # torch CUDA index → NVML index
        self.latest: LiveSnapshot | None = None

    # -- feeding ---------------------------------------------------------------------------------------

    def observe(self, record: GenerationRecord) -> None:
        with self._lock:
            if self._first_record_at is None:
                self._first_record_at = record.started_at
            self._records.append(record)
            self._prune(self._clock())

    def add_nvml(self, timestamp: float, sample: Any) -> None:
        with self._lock:
            self._nvml.append((timestamp, sample))

    def add_cpu(self, timestamp: float, process_cpu_seconds: float | None, host_ratio: float | None) -> None:
        with self._lock:
            self._cpu.append((timestamp, process_cpu_seconds, host_ratio))

    def set_allocator(self, sample: Any) -> None:
        with self._lock:
            self._allocator = sample

    def on_sample(self, store: Any) -> Callable[[str, bool], None]:
        """A Sampler listener copying fresh snapshots out of the SnapshotStore into the window."""

        def listener(name: str, ok: bool) -> None:
            if not ok or name not in ("nvml", "host", "process", "allocator"):
                return
            status = store.get(name)
            if status is None or status.data is None:
                return
            t = status.taken_at_wall or self._clock()
            data = status.data
            if name == "nvml":
                self.add_nvml(t, data)
            elif name == "allocator":
                self.set_allocator(data)
            elif name == "host":
                self._host_ratio = data.cpu_utilization_ratio
                process = store.get("process")
                if process is None or not process.available:  # no process source: host figures alone
                    self.add_cpu(t, None, data.cpu_utilization_ratio)
            elif data.exists and data.cpu_user_seconds is not None and data.cpu_system_seconds is not None:
                self.add_cpu(t, data.cpu_user_seconds + data.cpu_system_seconds, self._host_ratio)

        return listener

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_seconds
        while self._records and self._records[0].started_at < cutoff:
            self._records.popleft()
        # Samples a little older than the window still cover the interval before the first generation.
        sample_cutoff = cutoff - 60.0
        while self._nvml and self._nvml[0][0] < sample_cutoff:
            self._nvml.popleft()
        while self._cpu and self._cpu[0][0] < sample_cutoff:
            self._cpu.popleft()

    # -- evaluation ------------------------------------------------------------------------------------

    def evaluate(self) -> LiveSnapshot:
        """Diagnose the window now; never raises for lack of data (diagnosis None below min_generations)."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            records = list(self._records)
            nvml = list(self._nvml)
            cpu = list(self._cpu)
            allocator = self._allocator
            first_in_window = bool(records) and records[0].started_at == self._first_record_at
        ok = [r for r in records if r.status == "ok"]
        if len(ok) < self.min_generations:
            snap = LiveSnapshot(now, self.window_seconds, len(ok), self.min_generations, None, None)
            self.latest = snap
            return snap
        device = _mode([r.device for r in ok]) or "cpu"
        gpu_samples, gpu = self._gpu_samples(device, nvml)
        facts = build_facts(
            records,
            gpu_samples=gpu_samples,
            cpu_samples=_cpu_samples(cpu),
            memory=self._memory(device, allocator, gpu),
            io=self._io,
            env=self._env_facts(device, gpu, nvml),
            warmup=0,
            created_at=now,
        )
        if not first_in_window:
            # The window's oldest generation is not the process's first: no first-generation slowdown.
            facts = replace(
                facts, io=replace(facts.io, first_generation_seconds=None, first_generation_slowdown=None)
            )
        snap = LiveSnapshot(
            now, self.window_seconds, len(ok), self.min_generations, diagnose(facts, self.thresholds), facts
        )
        self.latest = snap
        return snap

    def _nvml_index_for(self, device: str, gpus: Any) -> int | None:
        from zmon.profiling.runner import nvml_index_for, torch_device_index

        index = torch_device_index(device)
        if index is None:
            return None
        if index not in self._nvml_index:
            self._nvml_index[index] = nvml_index_for(index, gpus)
        return self._nvml_index[index]

    def _gpu_samples(self, device: str, nvml: list[tuple[float, Any]]) -> tuple[list[GpuSample], Any]:
        """The profiled card's util/memory samples, and its latest NVML reading (None off GPU)."""
        if not nvml or not device.startswith("cuda"):
            return [], None
        index = self._nvml_index_for(device, nvml[-1][1].gpus)
        if index is None:
            return [], None
        out, latest = [], None
        for t, sample in nvml:
            gpu = next((g for g in sample.gpus if g.index == index), None)
            if gpu is not None and gpu.up:
                out.append(GpuSample(t, gpu.utilization_gpu_ratio, gpu.memory_used_bytes))
                latest = gpu
        return out, latest

    def _memory(self, device: str, allocator: Any, gpu: Any) -> MemoryFacts:
        total = None if gpu is None else gpu.memory_total_bytes
        from zmon.profiling.runner import torch_device_index

        index = torch_device_index(device) if device.startswith("cuda") else None
        dev = None if allocator is None or index is None else allocator.device(index)
        if dev is None:
            return MemoryFacts(card_total_bytes=total)
        return MemoryFacts(
            card_total_bytes=total if total is not None else dev.total_bytes,
            reserved_unallocated_ratio=dev.reserved_unallocated_ratio,
            fragmentation_ratio=dev.fragmentation_ratio,
            headroom_bytes=dev.headroom_bytes,
            alloc_retries=dev.alloc_retries,
            ooms=dev.ooms,
        )

    def _env_facts(self, device: str, gpu: Any, nvml: list[tuple[float, Any]]) -> EnvironmentFacts:
        if self._env is None and self._environment is not None:
            try:
                self._env = self._environment()
            except Exception:
                log.debug("environment facts unavailable", exc_info=True)
        env = self._env or EnvironmentFacts(device=device)
        if gpu is not None and env.card_name is None:
            env = replace(env, card_name=gpu.name)
        if nvml and env.driver_version is None:
            env = replace(env, driver_version=nvml[-1][1].driver_version)
        return env


def _cpu_samples(points: list[tuple[float, float | None, float | None]]) -> tuple[CpuSample, ...]:
    return cpu_samples_from_counters(sorted(points, key=lambda p: p[0]))


def _mode(values: list[str]) -> str | None:
    return max(set(values), key=values.count) if values else None


class _RecordTap:
    """Boundary listener feeding each generation's record to the live diagnosis.

    Boundaries sit outside stage timing, so when generation_finished runs the record of that generation has
    already been emitted; a call that produced no record (interrupted) leaves records_total unchanged.
    """

    def __init__(self, stage_timing: Any, live: LiveDiagnosis) -> None:
        self._timing = stage_timing
        self._live = live
        self._seen = int(getattr(stage_timing, "records_total", 0))

    def generation_started(self) -> None:
        pass

    def generation_finished(self) -> None:
        total = int(self._timing.records_total)
        record = self._timing.last_record
        if total != self._seen and record is not None:
            self._seen = total
            self._live.observe(record)


def diagnosis_handler(live: LiveDiagnosis) -> Callable[[Any], Any]:
    """GET /diagnosis: the latest LiveSnapshot as JSON (read-only, no auth)."""
    from zmon.server import Response

    def handle(_: Any) -> Any:
        snap = live.latest or live.evaluate()
        return Response(200, snap.to_dict())

    return handle


def install_live_diagnosis(
    monitor: Any,
    thresholds: Thresholds | None = None,
    *,
    instrumentation: Any | None = None,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
    min_generations: int = DEFAULT_MIN_GENERATIONS,
    io: IoFacts | None = None,
) -> LiveDiagnosis:
    """Wire live diagnosis into a zmon.app.Monitor: the "diagnosis" source (every `interval_seconds`), the
    zmon_bottleneck* collector, a sampler listener for NVML/host/process/allocator snapshots, and
    GET /diagnosis. With `instrumentation` (zmon.attach.Instrumentation) its generation records are fed in
    and its pipeline describes the environment; without it, call `observe(record)` yourself.
    """
    from zmon.collectors.bottleneck import BottleneckCollector

    environment = None
    if instrumentation is not None:
        pipe, model_id = instrumentation.pipe, instrumentation.model_id

        def environment() -> EnvironmentFacts:
            from zmon.profiling.runner import environment_facts

            return environment_facts(pipe, model_id=model_id)

    live = LiveDiagnosis(
        window_seconds, thresholds, min_generations=min_generations, environment=environment, io=io
    )
    if instrumentation is not None:
        instrumentation.boundaries.add(_RecordTap(instrumentation.stage_timing, live))
    monitor.sampler.add_listener(live.on_sample(monitor.store))
    monitor.add_source(SOURCE_NAME, live.evaluate, interval_seconds)
    monitor.add_collector("bottleneck", BottleneckCollector(monitor.store), sources=(SOURCE_NAME,))
    monitor.http.add_route("/diagnosis", diagnosis_handler(live), methods=("GET", "HEAD"))
    return live


# ------------------------------------------------------------------------------------------------ client


class DiagnosisUnavailable(Exception):
    """The daemon could not be reached or did not answer with a diagnosis."""


def diagnosis_url(base: str) -> str:
    """'http://host:port' (or '.../diagnosis') → the /diagnosis URL; ValueError for anything else."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8739, got {base!r}")
    _ = parts.port  # raises ValueError for a malformed port
    path = parts.path.rstrip("/")
    if not path.endswith("/diagnosis"):
        path += "/diagnosis"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def fetch_diagnosis(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET the daemon's /diagnosis document; raises DiagnosisUnavailable with the reason."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        hint = " (is live diagnosis installed in that zmon?)" if e.code == 404 else ""
        raise DiagnosisUnavailable(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DiagnosisUnavailable(f"cannot reach {url}: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise DiagnosisUnavailable(f"{url} did not answer with JSON") from None
    if not isinstance(doc, dict) or "verdict" not in doc:
        raise DiagnosisUnavailable(f"{url} did not answer with a zmon diagnosis")
    return doc


def render_live(doc: Mapping[str, Any]) -> str:
    """The verdict and active findings of a /diagnosis document, as plain text."""
    import datetime as dt

    window = doc.get("window_seconds")
    n = doc.get("generations", 0)
    when = doc.get("evaluated_at")
    stamp = (
        dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(when, (int, float))
        else "unknown"
    )
    span = f"{n} generation(s) in the last {window:g} s (evaluated {stamp})" if window else f"{n} generation(s)"
    d = doc.get("diagnosis")
    if not d:
        return (
            f"no diagnosis yet: {span}; it needs at least {doc.get('min_generations', '?')} successful "
            "generation(s) in the window\n"
        )
    out = [f"verdict: {d['verdict']} — {d['action']}", f"  {d['summary']}", f"window: {span}", ""]
    active = [f for f in d.get("findings", []) if f.get("active")]
    if not active:
        out.append("no active findings")
    else:
        out.append("active findings (by priority):")
        for i, f in enumerate(active, 1):
            out.append(
                f"  {i}. {f['title']} [priority {f['priority']}: impact {f['impact']}, effort {f['effort']}]"
            )
            if f.get("fix"):
                out.append(f"     fix: {f['fix']}")
    return "\n".join(out) + "\n"
