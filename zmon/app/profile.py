"""`zmon profile`: load the pipeline, sample through a Monitor without HTTP at the profile's rate, report.

The profile's sampler is the daemon's sampler (same sources, store and history), only faster and with the
sources a profile reads: NVML (no process list, no PCIe job), host and process CPU, the allocator.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from zmon.analysis.report import render_markdown
from zmon.app.monitor import Monitor
from zmon.app.sources import add_allocator_source, add_host_sources, add_nvml_sources
from zmon.capture.profile import ProfileResult, load_for_profile, profile_pipeline
from zmon.capture.progress import Progress
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.sampling import SampleHistory
from zmon.sampling.keys import ALLOCATOR, HOST, NVML, PROCESS
from zmon.workload.spec import WorkloadError

log = logging.getLogger(__name__)


def profile_monitor(
    cfg: Config, *, nvml: Any | None = None, torch_cuda: Any | None = None
) -> tuple[Monitor, SampleHistory]:
    """A Monitor without HTTP sampling this process at `profiling.sample_interval_seconds`, and its history."""
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
            "disk": s.disk.model_copy(update={"enabled": False}),
            "network": s.network.model_copy(update={"enabled": False}),
        }
    )
    mon = Monitor(sampling, cfg.server, mode="profile", serve_http=False)
    add_nvml_sources(mon, sampling.nvml, watched_pid=None, nvml=nvml)
    add_host_sources(mon, sampling, watched_pid=os.getpid())
    add_allocator_source(mon, sampling.allocator, torch_cuda=torch_cuda)
    history = SampleHistory(mon.store, (NVML, HOST, PROCESS, ALLOCATOR))
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
            loaded.loaded.pipe, cfg, sampling=mon, history=history, out_dir=out_dir, runs=runs, warmup=warmup,
            io=loaded.io, model_id=loaded.loaded.model_id, trace=trace, memory_snapshot=memory_snapshot,
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
