"""`zmon profile`: load the pipeline, sample through a Monitor without HTTP at the profile's rate, report.

The profile's sampler is the daemon's sampler (same sources, store and history), only faster and with the
sources a profile reads: NVML (no process list, no PCIe job), host and process CPU, the allocator.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from zmon.analysis.diagnosis import diagnose
from zmon.analysis.facts import EnvironmentFacts, IoFacts, MultiGpuFacts
from zmon.analysis.report import render_markdown, write_reports
from zmon.analysis.scaling import Finished, scaling
from zmon.app.monitor import Monitor
from zmon.app.sources import add_allocator_source, add_host_sources, add_nvml_sources
from zmon.app.workers.parent import MergedPolicy, MergedPromptCache, ScalingWindow, WorkerMerge
from zmon.app.workers.protocol import Record
from zmon.app.workers.supervisor import DevicePlanError, Supervisor, plan_devices
from zmon.capture.disk import disk_speed_test, local_model_dir
from zmon.capture.inputs import GpuResolver, window_facts
from zmon.capture.profile import ProfileResult, load_for_profile, profile_pipeline
from zmon.capture.progress import Progress
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.instrumentation.records import GenerationRecord
from zmon.sampling import SampleHistory
from zmon.sampling.keys import ALLOCATOR, DISK, HOST, NVML, PROCESS
from zmon.workload.spec import WorkloadError

log = logging.getLogger(__name__)


def profile_monitor(
    cfg: Config, *, nvml: Any | None = None, torch_cuda: Any | None = None, allocator: bool = True
) -> tuple[Monitor, SampleHistory]:
    """A Monitor without HTTP sampling this process at `profiling.sample_interval_seconds`, and its history.

    `allocator=False`: no allocator source here (data-parallel workers publish theirs into the store)."""
    every = cfg.profiling.sample_interval_seconds
    s = cfg.sampling
    sampling = s.model_copy(
        update={
            "nvml": s.nvml.model_copy(
                update={"interval_seconds": every, "slow_interval_seconds": 0, "processes": False}
            ),
            "host": s.host.model_copy(update={"interval_seconds": every, "per_cpu": False}),
            "process": s.process.model_copy(update={"interval_seconds": every}),
            "allocator": s.allocator.model_copy(update={"interval_seconds": every}),
            # storage reads during the generations (the I/O question), every tick
            "disk": s.disk.model_copy(update={"interval_seconds": every, "paths": []}),
            "network": s.network.model_copy(update={"enabled": False}),
        }
    )
    mon = Monitor(sampling, cfg.server, mode="profile", serve_http=False)
    add_nvml_sources(mon, sampling.nvml, watched_pid=None, nvml=nvml)
    add_host_sources(mon, sampling, watched_pid=os.getpid() if allocator else None)
    if allocator:
        add_allocator_source(mon, sampling.allocator, torch_cuda=torch_cuda)
    history = SampleHistory(mon.store, (NVML, HOST, PROCESS, ALLOCATOR, DISK))
    mon.sampler.add_listener(history.on_sample)
    return mon, history


def profile_main(
    cfg: Config,
    *,
    out_dir: Path | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    trace: bool = False,
    memory_snapshot: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The body of `zmon profile` after validation: load, profile, write reports, print the Markdown."""
    stdout = stdout or sys.stdout
    progress = Progress(stderr or sys.stderr)
    if cfg.model.devices is not None:
        if trace or memory_snapshot:
            progress.note("error: --trace and --memory-snapshot profile one process: leave model.devices unset")
            return EXIT_USAGE
        return profile_workers(cfg, out_dir=out_dir, runs=runs, warmup=warmup, stdout=stdout, progress=progress)
    try:
        loaded = load_for_profile(cfg, progress)
    except Exception as e:
        log.exception("cannot load %s", cfg.model.id)
        progress.note(f"error: cannot load {cfg.model.id}: {type(e).__name__}: {e}")
        return EXIT_FAILURE
    for n in loaded.notes:
        progress.note(f"note: {n}")
    mon, history = profile_monitor(cfg)
    try:
        result: ProfileResult = profile_pipeline(
            loaded.loaded.pipe,
            cfg,
            sampling=mon,
            history=history,
            out_dir=out_dir,
            runs=runs,
            warmup=warmup,
            io=loaded.io,
            model_id=loaded.loaded.model_id,
            trace=trace,
            memory_snapshot=memory_snapshot,
            progress=progress,
        )
    except WorkloadError as e:
        for p in e.problems:
            progress.note(f"error: {p}")
        return EXIT_USAGE
    finally:
        mon.stop()
    result.notes[:0] = loaded.notes
    stdout.write(render_markdown(result.facts, result.diagnosis))
    stdout.write("\n")
    stdout.flush()
    for fmt, path in result.paths.items():
        progress.note(f"wrote {fmt}: {path}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ workers


class _ProfileRecords:
    """The workers' records with their workload items (a WorkerMerge raw listener)."""

    def __init__(self, progress: Progress) -> None:
        self.records: list[tuple[int, GenerationRecord]] = []
        self._progress = progress

    def __call__(self, worker: str, message: Record, record: GenerationRecord) -> None:
        self.records.append((message.item, record))
        self._progress.advance(record.total_seconds)


def profile_workers(
    cfg: Config,
    *,
    out_dir: Path | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    stdout: TextIO,
    progress: Progress,
) -> int:
    """`zmon profile` over data-parallel workers (`model.devices`): every worker generates `warmup` items
    first, then the workers share `runs` measured items round-robin; the facts judge them together, with the
    workers' scaling efficiency in the multi-GPU section."""
    try:
        placements = plan_devices(cfg.model.devices)  # type: ignore[arg-type]
    except DevicePlanError as e:
        progress.note(f"error: {e}")
        return EXIT_USAGE
    prof = cfg.profiling
    runs = prof.runs if runs is None else runs
    warmup = prof.warmup if warmup is None else warmup
    n = len(placements)
    out = Path(out_dir if out_dir is not None else prof.output_dir)
    model_dir = local_model_dir(cfg.model)  # builds the embedded model once, before the workers read it
    mon, history = profile_monitor(cfg, allocator=False)
    if cfg.sampling.allocator.enabled and any(p.cuda_index is not None for p in placements):
        mon.store.register(ALLOCATOR.name)
    merge = WorkerMerge(
        mon,
        GenerationMetrics(model=cfg.model.id),
        placements,
        scaling_window=ScalingWindow(n),
        policy=MergedPolicy(cfg.policy.dry_run),
        prompt_cache=MergedPromptCache(),
        model_id=cfg.model.id,
    )
    collected = _ProfileRecords(progress)
    merge.raw_listeners.append(collected)
    total = warmup * n + runs
    progress.note(f"profiling {cfg.model.id} on {n} worker(s) ({', '.join(p.label for p in placements)})")
    progress.start("generations", total)
    mon.start()
    try:
        result = Supervisor(cfg, placements, merge, limit=total).run(threading.Event())
    finally:
        mon.sample_now()
        mon.stop()
    if result.usage_error:
        for problem in result.usage_error:
            progress.note(f"error: {problem}")
        return EXIT_USAGE
    first = min(merge.ready_messages) if merge.ready_messages else None
    if first is None or not collected.records:
        progress.note("error: no worker generated anything")
        return EXIT_FAILURE
    ready = merge.ready_messages[first]
    warm = sorted((r for i, r in collected.records if i < warmup * n), key=lambda r: r.started_at)
    measured = sorted((r for i, r in collected.records if i >= warmup * n), key=lambda r: r.started_at)
    sc = scaling(
        (Finished(r.device, r.started_at, r.total_seconds, r.batch_size) for r in measured if r.status == "ok"),
        n,
        overlap=True,
    )
    disk = None
    if prof.disk_test_bytes > 0 and model_dir is not None:
        try:
            disk = disk_speed_test(model_dir, prof.disk_test_bytes)
        except OSError as e:
            progress.note(f"note: disk test skipped: cannot write a test file in {model_dir}: {e.strerror or e}")
    io = IoFacts(
        model_dir=None if model_dir is None else str(model_dir),
        checkpoint_load_seconds=ready.load_seconds,
        checkpoint_bytes=ready.checkpoint_bytes,
        disk_read_bytes_per_second=None if disk is None else disk.read_bytes_per_second,
        disk_write_bytes_per_second=None if disk is None else disk.write_bytes_per_second,
    )
    env = ready.environment or EnvironmentFacts(device=placements[0].device)
    multi = MultiGpuFacts(gpu_count=n, speedup_vs_single=None if sc is None else sc.speedup) if n > 1 else None
    facts = window_facts(
        [*warm, *measured], history, env=env, resolver=GpuResolver(), io=io, warmup=len(warm), multi_gpu=multi
    )
    diagnosis = diagnose(facts, cfg.diagnosis_thresholds)
    paths = write_reports(facts, diagnosis, out, prof.formats)
    if sc is not None:
        progress.note(
            f"{n} worker(s): {sc.aggregate_images_per_second:.2f} images/s together, scaling efficiency "
            f"{sc.efficiency:.0%}"
        )
    stdout.write(render_markdown(facts, diagnosis))
    stdout.write("\n")
    stdout.flush()
    for fmt, path in paths.items():
        progress.note(f"wrote {fmt}: {path}")
    return result.exit_code
