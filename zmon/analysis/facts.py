"""What a profile measured: frozen, versioned facts built from generation records and samples."""

from __future__ import annotations

import dataclasses
import functools
import time
import types
import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, Union

from zmon.analysis.stats import Summary, Window, cv, mean, median, rate, stdev, summarize, windowed_mean
from zmon.instrumentation.records import STAGES, GenerationRecord, StageTiming

SCHEMA_VERSION = 1
# Key of `attribute_utilization` results covering each whole generation (all stages and the gaps between).
WHOLE_GENERATION = "generation"
DENOISE: str = "denoise_step"
CacheState = Literal["cold", "warm", "unknown"]

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class GpuPoint:
    """One NVML read of the profiled card. Utilization is NVML's average over the period before the read."""

    timestamp: float  # unix seconds
    util_ratio: float | None = None  # 0..1 (nvidia-smi utilization.gpu / 100)
    memory_used_bytes: int | None = None  # whole card, all processes (nvidia-smi memory.used)


@dataclass(frozen=True)
class CpuPoint:
    """CPU use since the previous read, of the profiled process and of the whole host."""

    timestamp: float  # unix seconds
    process_cores: float | None = None  # CPU seconds per second of the process: 1.0 = one core busy
    host_ratio: float | None = None  # busy share of all host cores, 0..1


def cpu_points_from_counters(
    points: Iterable[tuple[float, float | None, float | None]],
) -> tuple[CpuPoint, ...]:
    """Turn (unix seconds, cumulative process CPU seconds, host busy ratio) reads into `CpuPoint`s.

    The process figure is the delta of user+system CPU seconds over the delta of wall time (psutil's
    `cpu_times()`; zmon's `ProcessSample.cpu_user_seconds + cpu_system_seconds`); the host ratio is taken
    as is (`HostSample.cpu_utilization_ratio`). The first read has no predecessor: no process figure.
    """
    out: list[CpuPoint] = []
    previous: tuple[float, float] | None = None
    for t, cpu_seconds, host in points:
        cores = None if cpu_seconds is None else rate(previous, (t, cpu_seconds))
        out.append(CpuPoint(timestamp=t, process_cores=cores, host_ratio=host))
        previous = None if cpu_seconds is None else (t, cpu_seconds)
    return tuple(out)


# ------------------------------------------------------------------------------------------------ facts


@dataclass(frozen=True)
class EnvironmentFacts:
    """Where and how the pipeline ran; every field optional (None = not known)."""

    card_name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    diffusers_version: str | None = None
    transformers_version: str | None = None
    python_version: str | None = None
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    text_encoder_device: str | None = None  # where the text encoder runs; None = same as `device`
    dtype: str | None = None  # "bfloat16", "float32"
    attention_backend: str | None = None  # e.g. "sdpa", "flash", "native"
    compiled: bool | None = None  # torch.compile on the denoiser
    alloc_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF as the process saw it ("" = default allocator)
    model_id: str | None = None  # hub id or path, e.g. "Tongyi-MAI/Z-Image-Turbo"
    pipeline_class: str | None = None  # e.g. "ZImagePipeline"
    distilled: bool | None = None  # few-step / guidance-free model; None = guess from model_id
    cpu_count: int | None = None  # logical cores of the host

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class WorkloadFacts:
    """What the profiled generations asked for (the most common value where they differ)."""

    steps: int | None = None
    guidance_scale: float | None = None
    cfg_active: bool | None = None  # classifier-free guidance doubled the denoise batch
    width: int | None = None
    height: int | None = None
    batch_size: int | None = None
    distinct_shapes: int = 0  # (width, height, batch, steps) combinations seen
    prompt_chars_mean: float | None = None
    prompt_cache_hit_ratio: float | None = None  # None when no prompt cache was in use
    timing_method: str | None = None  # "cuda_event" or "monotonic"


@dataclass(frozen=True)
class BaselineFacts:
    """Latency over the measured (post-warm-up, successful) generations."""

    warmup: int  # leading generations left out of the baseline
    generations: int  # successful generations in the baseline
    failed_generations: int  # all records whose status was not "ok" (warm-up included)
    oom_generations: int
    latency: Summary | None  # seconds per call
    totals_seconds: tuple[float, ...]  # per baseline generation, in order
    started_at: tuple[float, ...]  # unix seconds, parallel to totals_seconds
    # Run-to-run coefficient of variation within groups of identical shape (pooled), so mixed resolutions
    # in a rolling window do not read as inconsistency; equals latency.cv when all runs share one shape.
    run_cv: float | None
    images_per_second: float | None
    # Median latency of the last third of the baseline / that of the first third (≥ 6 runs): > 1 = slowing.
    trend_ratio: float | None


@dataclass(frozen=True)
class StageStat:
    """One pipeline stage, averaged over the baseline generations (0 s where a generation skipped it)."""

    stage: str
    mean_seconds: float
    share: float  # of the mean generation time, 0..1
    spans_per_generation: float  # e.g. number of denoise steps


@dataclass(frozen=True)
class StageSplit:
    """Where a generation's time goes, down to the denoise steps."""

    stages: tuple[StageStat, ...] = ()
    unattributed_mean_seconds: float | None = None  # generation time outside every timed stage
    unattributed_share: float | None = None
    step_mean_seconds: float | None = None  # pooled over every denoise step
    step_std_seconds: float | None = None
    # Spread of step durations *within* a generation: CV per generation, averaged over generations.
    step_cv: float | None = None
    step_max_min_ratio: float | None = None  # slowest / fastest step in a generation, averaged
    # Spans of the generation closest to the median, for a timeline.
    timeline: tuple[StageTiming, ...] = ()
    timeline_total_seconds: float | None = None

    def get(self, stage: str) -> StageStat | None:
        return next((s for s in self.stages if s.stage == stage), None)

    def share(self, stage: str) -> float | None:
        s = self.get(stage)
        return None if s is None else s.share


@dataclass(frozen=True)
class UtilizationFacts:
    """GPU and CPU use attributed to stage windows (keys: stage names and "generation")."""

    gpu_by_stage: dict[str, float] = field(default_factory=dict)  # NVML util ratio 0..1
    process_cpu_by_stage: dict[str, float] = field(default_factory=dict)  # cores busy
    host_cpu_by_stage: dict[str, float] = field(default_factory=dict)  # ratio of all cores 0..1
    gpu_samples: tuple[GpuPoint, ...] = ()
    cpu_samples: tuple[CpuPoint, ...] = ()

    @property
    def gpu_measured(self) -> bool:
        return any(s.util_ratio is not None for s in self.gpu_samples)


@dataclass(frozen=True)
class MemoryFacts:
    """GPU memory as the caching allocator and NVML saw it; all None on CPU.

    `reserved_unallocated_ratio` is the article's "fragmentation" ((reserved − allocated) / reserved): mostly
    reusable cache. `fragmentation_ratio` is the real one (inactive_split / reserved): free pieces of partly
    used segments; it reads 0 under expandable_segments.
    """

    card_total_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    reserved_unallocated_ratio: float | None = None
    fragmentation_ratio: float | None = None
    headroom_bytes: int | None = None  # mem_get_info free + (reserved − allocated)
    alloc_retries: int | None = None  # num_alloc_retries (cache flushes to satisfy a request)
    ooms: int | None = None  # num_ooms
    vram_peak_used_bytes: int | None = None  # NVML peak (all processes), else the allocator's peak reserved
    vram_used_fraction: float | None = None  # vram_peak_used_bytes / card_total_bytes
    vram_used_source: Literal["nvml", "allocator"] | None = None


@dataclass(frozen=True)
class IoFacts:
    """Model loading and disk speed; the first-generation figures are filled in by `build_facts`."""

    model_dir: str | None = None
    checkpoint_load_seconds: float | None = None  # from_pretrained → pipeline on its device
    checkpoint_bytes: int | None = None  # size of the weight files read
    checkpoint_read_bytes_per_second: float | None = None  # bytes / load seconds when not given
    cache_state: CacheState = "unknown"  # page cache before the load: cold reads hit the disk
    disk_read_bytes_per_second: float | None = None  # sequential read test in the model directory
    disk_write_bytes_per_second: float | None = None  # sequential write test in the model directory
    first_generation_seconds: float | None = None
    steady_state_median_seconds: float | None = None  # median of the baseline
    first_generation_slowdown: float | None = None  # first / steady-state median


@dataclass(frozen=True)
class MultiGpuFacts:
    """Only present when the work spans several GPUs: one pipeline across ranks (context parallel), or
    data-parallel workers (one pipeline per GPU)."""

    gpu_count: int
    # Share of generation time the generating stream waited in collectives (NCCL, or gloo on CPU), from the
    # generation records' communication timings (or a trace).
    nccl_time_share: float | None = None
    # Data parallel: aggregate images/s / one worker's steady-state images/s; context parallel: single-GPU
    # latency / multi-GPU latency at equal work, when measured.
    speedup_vs_single: float | None = None
    communication_mean_seconds: float | None = None  # per generation, in collectives
    step_communication_share: float | None = None  # of the denoise steps' time, in collectives

    @property
    def scaling_efficiency(self) -> float | None:
        return None if self.speedup_vs_single is None else self.speedup_vs_single / self.gpu_count


@dataclass(frozen=True)
class ProfileFacts:
    """Everything one profile (or one rolling window of a live service) measured. Serialises losslessly."""

    created_at: float  # unix seconds
    environment: EnvironmentFacts
    workload: WorkloadFacts
    baseline: BaselineFacts
    stages: StageSplit
    utilization: UtilizationFacts
    memory: MemoryFacts
    io: IoFacts
    multi_gpu: MultiGpuFacts | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileFacts:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"profile facts schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        return from_jsonable(cls, data)


# ------------------------------------------------------------------------------------------------ building


def stage_windows(records: Iterable[GenerationRecord]) -> dict[str, list[Window]]:
    """Unix-time windows of each stage (and of each whole generation, under WHOLE_GENERATION)."""
    out: dict[str, list[Window]] = {}
    for r in records:
        out.setdefault(WHOLE_GENERATION, []).append((r.started_at, r.started_at + r.total_seconds))
        for s in r.stages:
            start = r.started_at + s.start_offset_seconds
            out.setdefault(s.stage, []).append((start, start + s.seconds))
    return out


def attribute_utilization(
    records: Sequence[GenerationRecord],
    samples: Iterable[tuple[float, float | None]],
) -> dict[str, float]:
    """Mean of a sampled utilization inside each stage's windows, time-weighted; stages without data left out.

    `samples` are (unix seconds, value) pairs, e.g. NVML GPU util ratios or process CPU cores, each value
    covering the interval since the previous sample. Keys are stage names plus WHOLE_GENERATION.
    """
    ordered = sorted(samples, key=lambda s: s[0])
    out: dict[str, float] = {}
    for stage, windows in stage_windows(records).items():
        value = windowed_mean(ordered, windows)
        if value is not None:
            out[stage] = value
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def _first(given: float | None, derived: float | None) -> float | None:
    """A figure the caller measured wins over one derived here."""
    return derived if given is None else given


def _mode(values: Iterable[T | None]) -> T | None:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _workload(records: Sequence[GenerationRecord]) -> WorkloadFacts:
    hits = [r.prompt_cache_hit for r in records if r.prompt_cache_hit is not None]
    chars = [float(r.prompt_chars) for r in records if r.prompt_chars is not None]
    cfg = [r.cfg_active for r in records if r.cfg_active is not None]
    return WorkloadFacts(
        steps=_mode(r.steps or None for r in records),
        guidance_scale=_mode(r.guidance_scale for r in records),
        cfg_active=any(cfg) if cfg else None,
        width=_mode(r.width for r in records),
        height=_mode(r.height for r in records),
        batch_size=_mode(r.batch_size for r in records),
        distinct_shapes=len({_shape(r) for r in records}),
        prompt_chars_mean=mean(chars),
        prompt_cache_hit_ratio=sum(hits) / len(hits) if hits else None,
        timing_method=_mode(r.timing_method for r in records),
    )


def _shape(r: GenerationRecord) -> tuple[int | None, int | None, int, int]:
    return (r.width, r.height, r.batch_size, r.steps)


def _run_cv(records: Sequence[GenerationRecord]) -> float | None:
    groups: dict[tuple[int | None, int | None, int, int], list[float]] = {}
    for r in records:
        groups.setdefault(_shape(r), []).append(r.total_seconds)
    weighted = [(len(v), c) for v in groups.values() if len(v) >= 2 and (c := cv(v)) is not None]
    if not weighted:
        return None
    return sum(n * c for n, c in weighted) / sum(n for n, _ in weighted)


def _baseline(
    records: Sequence[GenerationRecord], all_records: Sequence[GenerationRecord], warmup: int
) -> BaselineFacts:
    totals = [r.total_seconds for r in records]
    third = len(totals) // 3
    trend = None
    if third >= 2:
        first, last = median(totals[:third]), median(totals[-third:])
        trend = _ratio(last, first)
    images = sum(r.batch_size for r in records)
    return BaselineFacts(
        warmup=warmup,
        generations=len(records),
        failed_generations=sum(1 for r in all_records if r.status != "ok"),
        oom_generations=sum(1 for r in all_records if r.status == "oom"),
        latency=summarize(totals),
        totals_seconds=tuple(totals),
        started_at=tuple(r.started_at for r in records),
        run_cv=_run_cv(records),
        images_per_second=_ratio(images, sum(totals)),
        trend_ratio=trend,
    )


def _stage_split(records: Sequence[GenerationRecord]) -> StageSplit:
    if not records:
        return StageSplit()
    n = len(records)
    mean_total = sum(r.total_seconds for r in records) / n
    seen = {s.stage for r in records for s in r.stages}
    order = [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))
    stats = []
    for stage in order:
        stage_mean = sum(r.stage_seconds(stage) for r in records) / n
        spans = sum(1 for r in records for s in r.stages if s.stage == stage) / n
        stats.append(StageStat(stage, stage_mean, _ratio(stage_mean, mean_total) or 0.0, spans))
    unattributed = max(0.0, mean_total - sum(s.mean_seconds for s in stats))

    per_gen_steps = [r.step_seconds() for r in records]
    pooled = [x for steps in per_gen_steps for x in steps]
    step_cvs = [c for steps in per_gen_steps if len(steps) >= 2 and (c := cv(steps)) is not None]
    max_min = [max(steps) / min(steps) for steps in per_gen_steps if len(steps) >= 2 and min(steps) > 0]

    totals = sorted(r.total_seconds for r in records)
    mid = median(totals) or 0.0
    representative = min(records, key=lambda r: abs(r.total_seconds - mid))
    return StageSplit(
        stages=tuple(stats),
        unattributed_mean_seconds=unattributed,
        unattributed_share=_ratio(unattributed, mean_total),
        step_mean_seconds=mean(pooled),
        step_std_seconds=stdev(pooled),
        step_cv=mean(step_cvs),
        step_max_min_ratio=mean(max_min),
        timeline=tuple(sorted(representative.stages, key=lambda s: s.start_offset_seconds)),
        timeline_total_seconds=representative.total_seconds,
    )


def _communication(records: Sequence[GenerationRecord], given: MultiGpuFacts | None) -> MultiGpuFacts | None:
    """`given` completed with what the records' collective timings say (when they were measured)."""
    measured = [r for r in records if r.communication is not None and r.world_size]
    if not measured:
        return given
    comm = [r.communication_seconds() or 0.0 for r in measured]
    total = sum(r.total_seconds for r in measured)
    step_time = sum(sum(r.step_seconds()) for r in measured)
    step_comm = sum(sum(r.step_communication_seconds() or ()) for r in measured)
    world = _mode(r.world_size for r in measured) or 1
    derived = MultiGpuFacts(
        gpu_count=world,
        nccl_time_share=_ratio(sum(comm), total),
        communication_mean_seconds=mean(comm),
        step_communication_share=_ratio(step_comm, step_time),
    )
    if given is None:
        return derived
    return replace(
        given,
        nccl_time_share=_first(given.nccl_time_share, derived.nccl_time_share),
        communication_mean_seconds=_first(given.communication_mean_seconds, derived.communication_mean_seconds),
        step_communication_share=_first(given.step_communication_share, derived.step_communication_share),
    )


def _complete_memory(
    memory: MemoryFacts, records: Sequence[GenerationRecord], gpu_samples: Sequence[GpuPoint]
) -> MemoryFacts:
    """Fill what the records and NVML samples can tell: peaks and the share of the card in use."""
    peak_alloc = memory.peak_allocated_bytes
    if peak_alloc is None:
        peak_alloc = max(
            (r.peak_allocated_bytes for r in records if r.peak_allocated_bytes is not None), default=None
        )
    peak_res = memory.peak_reserved_bytes
    if peak_res is None:
        peak_res = max(
            (r.peak_reserved_bytes for r in records if r.peak_reserved_bytes is not None), default=None
        )
    nvml_peak = max(
        (s.memory_used_bytes for s in gpu_samples if s.memory_used_bytes is not None), default=None
    )
    used, source = memory.vram_peak_used_bytes, memory.vram_used_source
    if used is None:
        used, source = (nvml_peak, "nvml") if nvml_peak is not None else (peak_res, "allocator")
        if used is None:
            source = None
    return replace(
        memory,
        peak_allocated_bytes=peak_alloc,
        peak_reserved_bytes=peak_res,
        vram_peak_used_bytes=used,
        vram_used_source=source,
        vram_used_fraction=_first(memory.vram_used_fraction, _ratio(used, memory.card_total_bytes)),
    )


def build_facts(
    records: Sequence[GenerationRecord],
    *,
    gpu_samples: Iterable[GpuPoint] = (),
    cpu_samples: Iterable[CpuPoint] = (),
    memory: MemoryFacts | None = None,
    io: IoFacts | None = None,
    env: EnvironmentFacts | None = None,
    multi_gpu: MultiGpuFacts | None = None,
    warmup: int = 0,
    created_at: float | None = None,
) -> ProfileFacts:
    """Facts from the records of consecutive generations (oldest first) and what was sampled meanwhile.

    The first `warmup` records and every failed record are left out of the baseline; the very first record
    is still compared with the steady state (first-generation slowdown). Pure apart from the default
    `created_at` (now), so a live daemon can call it on a rolling window.
    """
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    gpu = tuple(sorted(gpu_samples, key=lambda s: s.timestamp))
    cpu = tuple(sorted(cpu_samples, key=lambda s: s.timestamp))
    base = [r for r in records[warmup:] if r.status == "ok"]
    environment = env or EnvironmentFacts(device=records[0].device if records else "cpu")

    utilization = UtilizationFacts(
        gpu_by_stage=attribute_utilization(base, [(s.timestamp, s.util_ratio) for s in gpu]),
        process_cpu_by_stage=attribute_utilization(base, [(s.timestamp, s.process_cores) for s in cpu]),
        host_cpu_by_stage=attribute_utilization(base, [(s.timestamp, s.host_ratio) for s in cpu]),
        gpu_samples=gpu,
        cpu_samples=cpu,
    )

    baseline = _baseline(base, records, warmup)
    steady = baseline.latency.p50 if baseline.latency else None
    first = records[0].total_seconds if records and records[0].status == "ok" else None
    io_in = io or IoFacts()
    io_facts = replace(
        io_in,
        checkpoint_read_bytes_per_second=_first(
            io_in.checkpoint_read_bytes_per_second,
            _ratio(io_in.checkpoint_bytes, io_in.checkpoint_load_seconds),
        ),
        first_generation_seconds=first,
        steady_state_median_seconds=steady,
        first_generation_slowdown=_ratio(first, steady) if len(records) >= 2 else None,
    )
    return ProfileFacts(
        created_at=time.time() if created_at is None else created_at,
        environment=environment,
        workload=_workload(base or [r for r in records if r.status == "ok"]),
        baseline=baseline,
        stages=_stage_split(base),
        utilization=utilization,
        memory=_complete_memory(memory or MemoryFacts(), records, gpu),  # warm-up peaks count too
        io=io_facts,
        multi_gpu=multi if (multi := _communication(base, multi_gpu)) is None or multi.gpu_count > 1 else None,
    )


# ------------------------------------------------------------------------------------------------ JSON codec


def to_jsonable(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, recursively (the JSON shape of facts and diagnoses)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_jsonable(tp: Any, value: Any) -> Any:
    """Inverse of `to_jsonable` guided by type hints; unknown keys are ignored, missing ones take defaults."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return from_jsonable(options[0], value)
    if origin is Literal:
        return value
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return tuple(from_jsonable(item, v) for v in value)
    if origin is list:
        item = typing.get_args(tp)[0]
        return [from_jsonable(item, v) for v in value]
    if origin is dict:
        item = typing.get_args(tp)[1]
        return {k: from_jsonable(item, v) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = _hints(tp)
        kwargs = {
            f.name: from_jsonable(hints[f.name], value[f.name])
            for f in dataclasses.fields(tp)
            if f.name in value
        }
        return tp(**kwargs)
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    return value
