"""`zmon profile`: measure a loaded pipeline — I/O, generations, resource samples — and diagnose it.

The samples come from zmon's own sampler (a Monitor without HTTP, at the profile's rate, assembled by the
composition root) through a SampleHistory, and the facts from `window_facts`, exactly as the live
diagnosis builds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from zmon.analysis.diagnosis import Diagnosis, diagnose
from zmon.analysis.facts import IoFacts, ProfileFacts
from zmon.analysis.report import write_reports
from zmon.capture.disk import disk_speed_test, drop_page_cache, local_model_dir, weight_files
from zmon.capture.environment import environment_facts
from zmon.capture.inputs import GpuResolver, window_facts
from zmon.capture.progress import Progress
from zmon.capture.trace import MemorySnapshotUnavailable, TraceOutputs, capture_memory_snapshot, capture_trace
from zmon.config import Config
from zmon.instrumentation.collectives import apply_collective_timing
from zmon.instrumentation.prompt_cache import apply_prompt_cache
from zmon.instrumentation.records import GenerationRecord
from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing
from zmon.sampling import SampleHistory
from zmon.workload.loading import LoadedPipeline, load_pipeline, model_defaults, vae_scale_factor
from zmon.workload.runner import Workload
from zmon.workload.spec import WorkloadError, WorkloadSpec, build_spec, recheck_resolutions

log = logging.getLogger(__name__)

TRACE_GENERATIONS = 2  # generations covered by --trace and by --memory-snapshot (each its own phase)
MEMORY_HISTORY_MAX_ENTRIES = 100_000  # allocation events kept in the recorded allocator history
READY_TIMEOUT_SECONDS = 10.0  # for the first sample of every source before the first generation


class Sampling(Protocol):
    """What the profile needs of the sampler (zmon.app.Monitor without HTTP)."""

    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool: ...

    def sample_now(self) -> None: ...

    def stop(self) -> None: ...

    def sample_failures(self) -> int: ...


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class LoadResult:
    """A pipeline loaded for profiling and what the load and the disk measured."""

    loaded: LoadedPipeline
    io: IoFacts
    notes: list[str] = field(default_factory=list)


def load_for_profile(cfg: Config, progress: Progress | None = None) -> LoadResult:
    """Evict the weights from the page cache (when possible), load the pipeline, then test the disk."""
    notes: list[str] = []
    model_dir = local_model_dir(cfg.model)
    cache_state = "unknown"
    if model_dir is not None:
        cache_state = drop_page_cache(weight_files(model_dir))
        if cache_state == "warm":
            notes.append("page cache could not be dropped: the checkpoint load is measured warm")
    if progress:
        progress.note(f"loading {cfg.model.id} ({cache_state} page cache)")
    loaded = load_pipeline(cfg.model, img2img=bool(cfg.workload.init_images))
    model_dir = model_dir or loaded.path
    disk = None
    nbytes = cfg.profiling.disk_test_bytes
    if nbytes > 0 and model_dir is not None:
        try:
            disk = disk_speed_test(model_dir, nbytes)
        except OSError as e:
            notes.append(f"disk test skipped: cannot write a test file in {model_dir}: {e.strerror or e}")
    io = IoFacts(
        model_dir=None if model_dir is None else str(model_dir),
        checkpoint_load_seconds=loaded.load_seconds,
        checkpoint_bytes=loaded.checkpoint_bytes,
        checkpoint_read_bytes_per_second=loaded.read_bytes_per_second,
        cache_state=cache_state,  # type: ignore[arg-type]
        disk_read_bytes_per_second=None if disk is None else disk.read_bytes_per_second,
        disk_write_bytes_per_second=None if disk is None else disk.write_bytes_per_second,
    )
    if progress:
        rate = "" if not loaded.read_bytes_per_second else f", {loaded.read_bytes_per_second / 1e6:.0f} MB/s"
        progress.note(
            f"loaded {loaded.class_name} on {loaded.device} ({loaded.dtype}) in {loaded.load_seconds:.2f} s{rate}"
        )
    return LoadResult(loaded, io, notes)


# ------------------------------------------------------------------------------------------------ generations


@dataclass
class ProfileResult:
    """What one profile measured, where the reports went, and notes worth telling the user."""

    facts: ProfileFacts
    diagnosis: Diagnosis
    records: list[GenerationRecord]  # warm-up and measured generations, in order
    wall_seconds: list[float]  # wall time of each pipeline call, parallel to the calls made
    paths: dict[str, Path] = field(default_factory=dict)  # report format → file
    trace: TraceOutputs | None = None  # when --trace
    memory_snapshot: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def measured_wall_seconds(self) -> list[float]:
        return self.wall_seconds[self.facts.baseline.warmup :]


def workload_spec(cfg: Config, pipe: Any, model_id: str) -> WorkloadSpec:
    """The resolved workload for this pipeline (model defaults filled in); raises WorkloadError."""
    spec = build_spec(cfg, model_defaults(pipe, model_id))
    problems = recheck_resolutions(spec, vae_scale_factor(pipe))
    if problems:
        raise WorkloadError(problems)
    return spec


def profile_pipeline(
    pipe: Any,
    cfg: Config,
    *,
    sampling: Sampling,
    history: SampleHistory,
    out_dir: Path | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    io: IoFacts | None = None,
    model_id: str | None = None,
    trace: bool = False,
    memory_snapshot: bool = False,
    progress: Progress | None = None,
    write: bool = True,
) -> ProfileResult:
    """Profile an already-built pipeline: warm-up + measured generations with stage timing while `sampling`
    feeds `history`, then (optionally) a torch.profiler trace and a CUDA memory snapshot of TRACE_GENERATIONS
    more each.

    The pipeline must not carry zmon stage timing already (attach/run); it is left as it was. `io` carries
    what loading measured (`load_for_profile`); `model_id` defaults to cfg.model.id. Reports are written to
    `out_dir` (default profiling.output_dir) unless `write` is False.
    """
    prof = cfg.profiling
    runs = prof.runs if runs is None else runs
    warmup = prof.warmup if warmup is None else warmup
    out = Path(out_dir if out_dir is not None else prof.output_dir)
    model = model_id or cfg.model.id
    spec = workload_spec(cfg, pipe, model)
    progress = progress or Progress(enabled=False)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        progress.note(f"note: {message}")

    env = environment_facts(pipe, model_id=model, distilled=spec.distilled)
    cache = apply_prompt_cache(pipe, cfg.workload.prompt_cache) if cfg.workload.prompt_cache.enabled else None
    records: list[GenerationRecord] = []
    wall: list[float] = []
    workload = Workload(pipe, spec)
    result_trace: TraceOutputs | None = None
    snapshot: Path | None = None
    try:
        timing = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
        collectives = apply_collective_timing(pipe)
        sampling.start()
        try:
            if not sampling.wait_ready(READY_TIMEOUT_SECONDS):
                note("not every source had a sample before the first generation")
            i = 0
            for label, count in (("warm-up", warmup), ("measure", runs)):
                if count == 0:
                    continue
                progress.start(label, count)
                for _ in range(count):
                    wall.append(workload.call(i).seconds)
                    i += 1
                    progress.advance(records[-1].total_seconds if records else None)
            sampling.sample_now()  # closes the last interval at the end of the last generation
        finally:
            sampling.stop()
            collectives.remove()
            timing.remove()
        failures = sampling.sample_failures()

        if trace:
            progress.start("trace", TRACE_GENERATIONS)
            # Stage ranges ("zmon/<stage>") only for the trace: record_function has a cost of its own.
            traced = apply_stage_timing(pipe, StageTimingConfig(nvtx=True))
            try:
                result_trace = capture_trace(
                    lambda k: progress.advance(workload.call(i + k).seconds),
                    TRACE_GENERATIONS,
                    out,
                    cuda=env.on_gpu,
                )
            finally:
                traced.remove()
            i += TRACE_GENERATIONS
            progress.note(f"trace: {result_trace.chrome_trace} and {result_trace.tensorboard_dir}/")
        if memory_snapshot:
            try:
                snapshot = capture_memory_snapshot(
                    lambda k: workload.call(i + k),
                    TRACE_GENERATIONS,
                    out / "memory_snapshot.pickle",
                    max_entries=MEMORY_HISTORY_MAX_ENTRIES,
                    device=env.device,
                )
                progress.note(f"memory snapshot: {snapshot} (open it at https://pytorch.org/memory_viz)")
            except MemorySnapshotUnavailable as e:
                note(str(e))
    finally:
        if cache is not None:
            cache.remove()

    if failures:
        note(f"{failures} resource sample(s) failed")
    facts = window_facts(
        records[: warmup + runs],
        history,
        env=env,
        resolver=GpuResolver(),
        io=io,
        warmup=warmup,
        outlier_ratio=prof.thresholds.outlier_ratio_high,
    )
    if env.on_gpu and not facts.utilization.gpu_measured:
        note(f"GPU utilization not sampled: NVML is unavailable or cannot tell which GPU is {env.device}")
    diagnosis = diagnose(facts, cfg.diagnosis_thresholds)
    paths = write_reports(facts, diagnosis, out, prof.formats) if write else {}
    return ProfileResult(facts, diagnosis, records, wall, paths, result_trace, snapshot, notes)
