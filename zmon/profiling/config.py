"""The `profiling:` config section: how `zmon profile` measures, and the diagnosis thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ReportFormat = Literal["json", "md", "html"]


class Thresholds(BaseModel):
    """Where each diagnosis rule fires; ratios are 0..1, throughputs bytes/s, times seconds.

    Defaults follow the source article (80% GPU util, 90% VRAM, 30% "fragmentation", 500 MB/s, 3× first
    generation) and zmon's own calibration where the article gives no number (step and run CV).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_util_low: float = Field(0.80, ge=0, le=1)  # GPU util during diffusion below this → CPU-bound
    vram_high: float = Field(0.90, ge=0, le=1)  # peak VRAM in use / card above this → memory-bound
    step_cv_high: float = Field(0.15, ge=0)  # within-generation CV of step times above this → kernel issue
    run_cv_high: float = Field(0.10, ge=0)  # run-to-run CV above this → I/O or caching
    read_throughput_low: float = Field(500e6, gt=0)  # bytes/s; model reads slower than this → I/O-bound
    min_checkpoint_bytes: float = Field(1e9, ge=0)  # smaller checkpoints: read throughput shown, not judged
    checkpoint_load_high: float = Field(10.0, gt=0)  # seconds; loading longer than this → I/O-bound
    first_gen_slowdown_high: float = Field(3.0, gt=1)  # first generation / steady-state median
    text_encode_share_high: float = Field(0.25, ge=0, le=1)  # share of a generation (CPU-bound hint)
    postprocess_share_high: float = Field(0.15, ge=0, le=1)  # output processing share (CPU-bound hint)
    cpu_busy_high: float = Field(0.9, ge=0)  # process cores busy, or host ratio, at or above this = saturated
    reserved_unallocated_high: float = Field(0.30, ge=0, le=1)  # the article's "fragmentation" ratio
    fragmentation_high: float = Field(0.30, ge=0, le=1)  # inactive_split / reserved
    latency_trend_high: float = Field(1.2, gt=1)  # late-run median / early-run median (slowing down)
    nccl_share_high: float = Field(0.2, ge=0, le=1)  # share of time in NCCL collectives
    scaling_efficiency_low: float = Field(0.75, gt=0, le=1)  # multi-GPU speedup / GPU count


class TraceConfig(BaseModel):
    """The daemon's on-demand trace endpoint (POST /trace, authenticated); off unless enabled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    directory: Path = Path("zmon-traces")  # where trace-<time>.json files are written
    max_generations: int = Field(20, gt=0)  # the most generations one request may capture


class ProfilingConfig(BaseModel):
    """`zmon profile` defaults; mounted as `Config.profiling`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: int = Field(20, gt=0)  # baseline generations after warm-up (the article's 20)
    warmup: int = Field(1, ge=0)  # generations run first and left out of the baseline
    # NVML util+memory and psutil reads during the profile. NVML's own averaging period is 1/6 s to 1 s,
    # so faster sampling repeats values; 0.1 s resolves a 150 ms denoise step.
    sample_interval_seconds: float = Field(0.1, gt=0)
    # Sequential read/write test in the model directory (0 = skip the disk test).
    disk_test_bytes: int = Field(256 * 1024 * 1024, ge=0)
    output_dir: Path = Path("zmon-profile")
    formats: tuple[ReportFormat, ...] = ("json", "md", "html")
    thresholds: Thresholds = Thresholds()
    trace: TraceConfig = TraceConfig()
