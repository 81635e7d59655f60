"""`zmon tune`: load the configured pipeline, tune it while a Monitor without HTTP samples, write the reports.

The sampler is the profile's (zmon.app.profile.profile_monitor: NVML, host and process CPU, the allocator at
`profiling.sample_interval_seconds`), so each configuration's GPU utilization is read from the same samples
the same way as in a profile.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from zmon.app.profile import profile_monitor
from zmon.capture.progress import Progress
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_USAGE
from zmon.tune.report import render_markdown, write_reports
from zmon.tune.runner import TuneOptions, tune_pipeline
from zmon.workload.loading import load_pipeline
from zmon.workload.spec import WorkloadError

log = logging.getLogger(__name__)


def tune_main(
    cfg: Config,
    variant_names: Sequence[str],
    options: TuneOptions,
    *,
    out_dir: Path,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The body of `zmon tune` after validation: load, tune, write the reports, print the Markdown.

    Exit codes: 0 when the baseline and at least one variant were measured, 1 when nothing could be (or the
    model cannot load), 2 when a configured option or the workload cannot apply to this pipeline.
    """
    stdout = stdout or sys.stdout
    progress = Progress(stderr or sys.stderr)
    try:
        progress.note(f"loading {cfg.model.id}")
        loaded = load_pipeline(cfg.model, img2img=bool(cfg.workload.init_images))
    except WorkloadError as e:  # includes ModelOptionsError: a configured option cannot apply here
        for p in e.problems:
            progress.note(f"error: {p}")
        return EXIT_USAGE
    except Exception as e:
        log.debug("load failed", exc_info=True)
        progress.note(f"error: cannot load {cfg.model.id}: {type(e).__name__}: {e}")
        return EXIT_FAILURE
    progress.note(f"loaded {loaded.class_name} on {loaded.device} ({loaded.dtype}) in {loaded.load_seconds:.2f} s")
    mon, history = profile_monitor(cfg)
    try:
        result = tune_pipeline(
            loaded.pipe,
            cfg,
            variant_names,
            options,
            model_id=loaded.model_id,
            progress=progress,
            sampling=mon,
            history=history,
        )
    except WorkloadError as e:
        for p in e.problems:
            progress.note(f"error: {p}")
        return EXIT_USAGE
    finally:
        mon.stop()
    paths = write_reports(result, out_dir)
    stdout.write(render_markdown(result))
    stdout.write("\n")
    stdout.flush()
    for fmt, path in paths.items():
        progress.note(f"wrote {fmt}: {path}")
    return result.exit_code
