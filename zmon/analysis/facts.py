"""What a profile measured: frozen, versioned facts built from generation records and samples."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import types
import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, Union

from zmon.analysis.stats import Summary, Window, cv, mean, median, rate, stdev, summarize, windowed_mean
from zmon.instrumentation.records import STAGES, GenerationRecord, StageTiming

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # version 2 only added fields (their defaults read version 1 files)
# Key of `attribute_utilization` results covering each whole generation (all stages and the gaps between).
WHOLE_GENERATION = "generation"
# Key of the utilization facts covering the time between one pipeline call's return and the next call.
BETWEEN_GENERATIONS = "between generations"
# Time between calls under this share of the wall time is back-to-back calling: not reported or judged.
BETWEEN_MIN_SHARE = 0.01
DENOISE: str = "denoise_step"
CacheState = Literal["cold", "warm", "unknown"]

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class GpuPoint:
    """One NVML read of the profiled card. Utilization is NVML's average over the period before the read."""

    timestamp: float  # unix seconds
    util_ratio: float | None = None  # 0..1 (nvidia-smi utilization.gpu / 100): "a kernel was running"
    memory_used_bytes: int | None = None  # whole card, all processes (nvidia-smi memory.used)
    # GPM (Hopper and later), over the period before the read: how busy the SMs, tensor cores and DRAM were.
    sm_active_ratio: float | None = None
    tensor_active_ratio: float | None = None
    dram_bandwidth_ratio: float | None = None


@dataclass(frozen=True)
class IoPoint:
    """Storage reads over the period before the read (rates, bytes per second)."""

    timestamp: float  # unix seconds
    disk_read_bytes_per_second: float | None = None  # every disk, every process
    process_read_bytes_per_second: float | None = None  # the profiled process, from storage (page-cache misses)


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
    # Weights kept on the CPU between uses: "model" (enable_model_cpu_offload), "sequential", "group"; None = not.
    offload: str | None = None
    weights_bytes: int | None = None  # every component's parameters and buffers

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
    # Generations left out of every steady-state figure (warm-up, compiles, cold start, outliers), and why.
    excluded: tuple[ExcludedRun, ...] = ()
    compiles: int = 0  # graphs torch.compile produced during all the generations seen


@dataclass(frozen=True)
class ExcludedRun:
    """A generation the steady state leaves out: reported on its own, never the base of a verdict."""

    index: int  # position among the generations seen (0 = the first)
    started_at: float  # unix seconds
    seconds: float
    ratio_to_median: float | None  # its time / the steady-state median
    kind: Literal["warmup", "compile", "cold", "outlier"]
    reason: str


@dataclass(frozen=True)
class StageStat:
    """One pipeline stage, averaged over the baseline generations (0 s where a generation skipped it)."""

    stage: str
    mean_seconds: float
    share: float  # of the mean generation time, 0..1
    spans_per_generation: float  # e.g. number of denoise steps


@dataclass(frozen=True)
class GapStat:
    """Time between two timed stages (or before the first / after the last), averaged over the baseline."""

    name: str  # e.g. "text_encode → denoise", "start → text_encode", "postprocess → end"
    mean_seconds: float
    share: float  # of the mean generation time


@dataclass(frozen=True)
class StageSplit:
    """Where a generation's time goes, down to the denoise steps, and the time outside every stage."""

    stages: tuple[StageStat, ...] = ()
    unattributed_mean_seconds: float | None = None  # generation time outside every timed stage (untimed)
    unattributed_share: float | None = None
    gaps: tuple[GapStat, ...] = ()  # where the untimed time sits, largest first
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
    """GPU, CPU and storage use attributed to windows: keys are stage names, "generation" (whole
    generations), "gap:<name>" (the untimed time between stages, see GapStat) and "between generations"
    (from one call's return to the next call, see BetweenFacts)."""

    gpu_by_stage: dict[str, float] = field(default_factory=dict)  # NVML util ratio 0..1
    process_cpu_by_stage: dict[str, float] = field(default_factory=dict)  # cores busy
    host_cpu_by_stage: dict[str, float] = field(default_factory=dict)  # ratio of all cores 0..1
    gpu_samples: tuple[GpuPoint, ...] = ()
    cpu_samples: tuple[CpuPoint, ...] = ()
    sm_active_by_stage: dict[str, float] = field(default_factory=dict)  # GPM, 0..1
    tensor_active_by_stage: dict[str, float] = field(default_factory=dict)  # GPM, 0..1
    dram_bandwidth_by_stage: dict[str, float] = field(default_factory=dict)  # GPM, 0..1
    disk_read_by_stage: dict[str, float] = field(default_factory=dict)  # bytes/s, all disks
    process_read_by_stage: dict[str, float] = field(default_factory=dict)  # bytes/s, this process
    # Mean seconds per generation the GPU sat idle in each window: (1 − utilization) × its mean duration.
    gpu_idle_seconds: dict[str, float] = field(default_factory=dict)
    io_samples: tuple[IoPoint, ...] = ()
    # Other processes holding memory on the computing GPU (NVML's list; the most seen at once, and their memory
    # then); None when not known (no process list, or this process not found in it).
    other_gpu_processes: int | None = None
    other_gpu_processes_memory_bytes: int | None = None

    @property
    def gpu_measured(self) -> bool:
        return any(s.util_ratio is not None for s in self.gpu_samples)

    @property
    def gpm_measured(self) -> bool:
        return any(s.sm_active_ratio is not None for s in self.gpu_samples)


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
class BetweenFacts:
    """The time between one pipeline call's return and the next call on the same device: the caller's own work
    (reading inputs, pre- and post-processing, saving outputs) or waiting for the next request. What the GPU,
    the CPU and storage did meanwhile is in the utilization facts under BETWEEN_GENERATIONS."""

    gaps: int = 0  # pairs of consecutive calls
    share: float | None = None  # of the wall time from the first call's entry to the last call's return
    mean_seconds: float | None = None
    # CPU the process used during the gaps (cores busy), from its CPU time at each call's return and the next
    # call's entry: exact, whatever the sampling interval. None when the records do not carry it.
    process_cores: float | None = None


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
    between: BetweenFacts = field(default_factory=BetweenFacts)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileFacts:
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"profile facts schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        return from_jsonable(cls, data)


# ------------------------------------------------------------------------------------------------ building


GAP_PREFIX = "gap:"
_GAP_MIN_SECONDS = 1e-4  # shorter gaps are rounding between adjacent marks


def _block(stage: str) -> str:
    return "denoise" if stage == DENOISE else stage


def gaps(record: GenerationRecord) -> list[tuple[str, float, float]]:
    """(name, start offset, seconds) of the time in a generation outside every timed stage.

    Named after the stages around it ("text_encode → denoise"; "start →" and "→ end" at the edges); the
    denoise steps count as one block, since each step starts where the previous one ended.
    """
    out: list[tuple[str, float, float]] = []
    cursor, previous = 0.0, "start"
    for s in sorted(record.stages, key=lambda t: t.start_offset_seconds):
        if s.start_offset_seconds - cursor > _GAP_MIN_SECONDS:
            out.append((f"{previous} → {_block(s.stage)}", cursor, s.start_offset_seconds - cursor))
        end = s.start_offset_seconds + s.seconds
        if end >= cursor:
            cursor, previous = end, _block(s.stage)
    if record.total_seconds - cursor > _GAP_MIN_SECONDS:
        out.append((f"{previous} → end", cursor, record.total_seconds - cursor))
    return out


def stage_windows(records: Iterable[GenerationRecord]) -> dict[str, list[Window]]:
    """Unix-time windows of each stage, of each whole generation (WHOLE_GENERATION) and of each gap between
    stages ("gap:<name>")."""
    out: dict[str, list[Window]] = {}
    for r in records:
        out.setdefault(WHOLE_GENERATION, []).append((r.started_at, r.started_at + r.total_seconds))
        for s in r.stages:
            start = r.started_at + s.start_offset_seconds
            out.setdefault(s.stage, []).append((start, start + s.seconds))
        for name, offset, seconds in gaps(r):
            start = r.started_at + offset
            out.setdefault(GAP_PREFIX + name, []).append((start, start + seconds))
    return out


def between_windows(records: Iterable[GenerationRecord]) -> list[tuple[GenerationRecord, GenerationRecord]]:
    """Consecutive calls on the same device (by start time) with time between them: (earlier, later)."""
    by_device: dict[str, list[GenerationRecord]] = {}
    for r in records:
        by_device.setdefault(r.device, []).append(r)
    out = []
    for calls in by_device.values():
        calls.sort(key=lambda r: r.started_at)
        for a, b in itertools.pairwise(calls):
            if b.started_at - (a.started_at + a.total_seconds) > _GAP_MIN_SECONDS:
                out.append((a, b))
    return out


def _between(
    records: Sequence[GenerationRecord], pairs: Sequence[tuple[GenerationRecord, GenerationRecord]]
) -> BetweenFacts:
    """BetweenFacts of `records` whose consecutive calls with time between them are `pairs` (between_windows)."""
    if not pairs:
        return BetweenFacts()
    gap = [b.started_at - (a.started_at + a.total_seconds) for a, b in pairs]
    spans: dict[str, tuple[float, float]] = {}
    for r in records:
        lo, hi = spans.get(r.device, (r.started_at, r.started_at + r.total_seconds))
        spans[r.device] = (min(lo, r.started_at), max(hi, r.started_at + r.total_seconds))
    wall = sum(hi - lo for lo, hi in spans.values())
    cpu = [
        (b.process_cpu_seconds[0] - a.process_cpu_seconds[1], g)
        for (a, b), g in zip(pairs, gap, strict=True)
        if a.process_cpu_seconds is not None and b.process_cpu_seconds is not None
    ]
    return BetweenFacts(
        gaps=len(pairs),
        share=_ratio(sum(gap), wall),
        mean_seconds=mean(gap),
        process_cores=_ratio(sum(max(0.0, c) for c, _ in cpu), sum(g for _, g in cpu)) if cpu else None,
    )


def attribute_utilization(
    records: Sequence[GenerationRecord],
    samples: Iterable[tuple[float, float | None]],
    extra: Mapping[str, Sequence[Window]] | None = None,
) -> dict[str, float]:
    """Mean of a sampled utilization inside each stage's windows, time-weighted; stages without data left out.

    `samples` are (unix seconds, value) pairs, e.g. NVML GPU util ratios or process CPU cores, each value
    covering the interval since the previous sample. Keys are stage names plus WHOLE_GENERATION, and the keys
    of `extra` (more windows by name, e.g. BETWEEN_GENERATIONS).
    """
    ordered = sorted(samples, key=lambda s: s[0])
    out: dict[str, float] = {}
    for stage, windows in {**stage_windows(records), **(extra or {})}.items():
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
    records: Sequence[GenerationRecord],
    all_records: Sequence[GenerationRecord],
    warmup: int,
    excluded: Sequence[ExcludedRun] = (),
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
        excluded=tuple(excluded),
        compiles=sum(r.compiles or 0 for r in all_records),
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
    gap_totals: dict[str, float] = {}
    for r in records:
        for name, _offset, seconds in gaps(r):
            gap_totals[name] = gap_totals.get(name, 0.0) + seconds
    gap_stats = tuple(
        sorted(
            (GapStat(name, total / n, _ratio(total / n, mean_total) or 0.0) for name, total in gap_totals.items()),
            key=lambda g: -g.mean_seconds,
        )
    )

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
        gaps=gap_stats,
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
        peak_alloc = max((r.peak_allocated_bytes for r in records if r.peak_allocated_bytes is not None), default=None)
    peak_res = memory.peak_reserved_bytes
    if peak_res is None:
        peak_res = max((r.peak_reserved_bytes for r in records if r.peak_reserved_bytes is not None), default=None)
    nvml_peak = max((s.memory_used_bytes for s in gpu_samples if s.memory_used_bytes is not None), default=None)
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


def _trigger(record: GenerationRecord, previous: GenerationRecord | None) -> str:
    """Why a compiled denoiser compiled during this generation, as far as the records tell."""
    if previous is None:
        return "first compile"
    changes = []
    if record.text_tokens != previous.text_tokens and None not in (record.text_tokens, previous.text_tokens):
        changes.append(f"prompt length changed {previous.text_tokens} → {record.text_tokens} tokens")
    if (record.width, record.height) != (previous.width, previous.height):
        changes.append(f"resolution changed {previous.width}x{previous.height} → {record.width}x{record.height}")
    if record.batch_size != previous.batch_size:
        changes.append(f"batch changed {previous.batch_size} → {record.batch_size}")
    if record.steps != previous.steps:
        changes.append(f"steps changed {previous.steps} → {record.steps}")
    return "; ".join(changes) or "no input change seen (TORCH_LOGS=recompiles tells which guard failed)"


def split_runs(
    records: Sequence[GenerationRecord],
    warmup: int,
    *,
    outlier_ratio: float = 3.0,
    first_is_cold: bool = True,
    max_outlier_share: float = 0.25,
) -> tuple[list[GenerationRecord], list[ExcludedRun]]:
    """The steady-state generations, and those left out with the reason.

    Left out: the first `warmup`; every generation during which torch.compile produced a graph (a compile
    or a recompile: its time is mostly compilation); the first generation when it is the process's first
    (`first_is_cold`) and over 1.5× the median of the rest (a cold start: lazy initialisation, autotuning,
    page cache); and slow outliers over `outlier_ratio` × the median — but never more than
    `max_outlier_share` of the runs, since a workload that is often slow is slow, not an outlier.
    """
    ok = [(i, r) for i, r in enumerate(records) if r.status == "ok"]
    excluded: dict[int, tuple[str, str]] = {}
    previous: GenerationRecord | None = None
    compiled_before = False
    for i, r in ok:
        if r.compiles:
            what = "recompile" if compiled_before else "compile"
            graphs = f"{r.compiles} graph{'s' if r.compiles > 1 else ''}"
            reason = f"{what} ({graphs}): {_trigger(r, previous)}"
            excluded[i] = ("warmup", f"warm-up generation, {reason}") if i < warmup else ("compile", reason)
            compiled_before = True
        elif i < warmup:
            excluded[i] = ("warmup", "warm-up generation")
        previous = r
    rest = [(i, r) for i, r in ok if i not in excluded]
    if len(rest) >= 3:
        if first_is_cold and rest[0][0] == 0:
            others = median([r.total_seconds for _, r in rest[1:]]) or 0.0
            if others > 0 and rest[0][1].total_seconds > 1.5 * others:
                excluded[0] = ("cold", f"cold start: {rest[0][1].total_seconds / others:.1f}× the steady state")
                rest = rest[1:]
        med = median([r.total_seconds for _, r in rest]) or 0.0
        slow = sorted(
            ((r.total_seconds, i) for i, r in rest if med > 0 and r.total_seconds > outlier_ratio * med), reverse=True
        )
        for seconds, i in slow[: int(max_outlier_share * len(rest))]:
            excluded[i] = ("outlier", f"slow outlier: {seconds / med:.1f}× the median")
    steady = [r for i, r in ok if i not in excluded]
    steady_median = median([r.total_seconds for r in steady]) if steady else None
    runs = [
        ExcludedRun(
            index=i,
            started_at=records[i].started_at,
            seconds=records[i].total_seconds,
            ratio_to_median=_ratio(records[i].total_seconds, steady_median),
            kind=kind,  # type: ignore[arg-type]
            reason=reason,
        )
        for i, (kind, reason) in sorted(excluded.items())
    ]
    return steady, runs


def _mean_windows(records: Sequence[GenerationRecord]) -> dict[str, float]:
    """Mean seconds per generation of each window key of `stage_windows` (0 where a generation lacks it)."""
    n = max(1, len(records))
    out: dict[str, float] = {}
    for key, windows in stage_windows(records).items():
        out[key] = sum(b - a for a, b in windows) / n
    return out


def build_facts(
    records: Sequence[GenerationRecord],
    *,
    gpu_samples: Iterable[GpuPoint] = (),
    cpu_samples: Iterable[CpuPoint] = (),
    io_samples: Iterable[IoPoint] = (),
    memory: MemoryFacts | None = None,
    io: IoFacts | None = None,
    env: EnvironmentFacts | None = None,
    multi_gpu: MultiGpuFacts | None = None,
    warmup: int = 0,
    created_at: float | None = None,
    outlier_ratio: float = 3.0,
    first_is_cold: bool = True,
) -> ProfileFacts:
    """Facts from the records of consecutive generations (oldest first) and what was sampled meanwhile.

    The steady state leaves out the first `warmup` records, failed ones, compiles and recompiles, a cold first
    generation and slow outliers (`split_runs`); those are reported as excluded runs. The very first record
    is still compared with the steady state (first-generation slowdown). Pure apart from the default
    `created_at` (now), so a live daemon can call it on a rolling window.
    """
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    gpu = tuple(sorted(gpu_samples, key=lambda s: s.timestamp))
    cpu = tuple(sorted(cpu_samples, key=lambda s: s.timestamp))
    ios = tuple(sorted(io_samples, key=lambda s: s.timestamp))
    base, excluded = split_runs(records, warmup, outlier_ratio=outlier_ratio, first_is_cold=first_is_cold)
    environment = env or EnvironmentFacts(device=records[0].device if records else "cpu")

    pairs = between_windows(records)  # any outcome: a failed call held the pipeline too
    extra = {BETWEEN_GENERATIONS: [(a.started_at + a.total_seconds, b.started_at) for a, b in pairs]} if pairs else {}

    def by(points: Sequence[Any], attr: str) -> dict[str, float]:
        return attribute_utilization(base, [(p.timestamp, getattr(p, attr)) for p in points], extra)

    gpu_util = by(gpu, "util_ratio")
    durations = _mean_windows(base)
    between = _between(records, pairs)
    if between.mean_seconds is not None:
        durations[BETWEEN_GENERATIONS] = between.mean_seconds
    process_cpu = by(cpu, "process_cores")
    if between.process_cores is not None:  # exact, from the records, rather than sampled
        process_cpu[BETWEEN_GENERATIONS] = between.process_cores
    utilization = UtilizationFacts(
        gpu_by_stage=gpu_util,
        process_cpu_by_stage=process_cpu,
        host_cpu_by_stage=by(cpu, "host_ratio"),
        gpu_samples=gpu,
        cpu_samples=cpu,
        sm_active_by_stage=by(gpu, "sm_active_ratio"),
        tensor_active_by_stage=by(gpu, "tensor_active_ratio"),
        dram_bandwidth_by_stage=by(gpu, "dram_bandwidth_ratio"),
        disk_read_by_stage=by(ios, "disk_read_bytes_per_second"),
        process_read_by_stage=by(ios, "process_read_bytes_per_second"),
        gpu_idle_seconds={
            key: durations[key] * max(0.0, 1.0 - util) for key, util in gpu_util.items() if key in durations
        },
        io_samples=ios,
    )

    baseline = _baseline(base, records, warmup, excluded)
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
        between=between,
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
            f.name: from_jsonable(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value
        }
        return tp(**kwargs)
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    return value
