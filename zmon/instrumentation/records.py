"""The record of one generation, shared by the stage timer (producer) and metrics/JSONL/profiling (consumers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["text_encode", "vae_encode", "denoise_step", "vae_decode", "postprocess"]
STAGES: tuple[Stage, ...] = ("text_encode", "vae_encode", "denoise_step", "vae_decode", "postprocess")
Status = Literal["ok", "oom", "error"]
# Where a collective ran: a stage, or "other" (inside the pipeline call, outside every timed stage).
CommStage = Literal["text_encode", "vae_encode", "denoise_step", "vae_decode", "postprocess", "other"]


@dataclass(frozen=True)
class StageTiming:
    """One timed span inside a generation. Offsets are seconds from the generation's start."""

    stage: Stage
    seconds: float
    start_offset_seconds: float
    index: int = 0  # step number for denoise_step, call number otherwise


@dataclass(frozen=True)
class CommunicationTiming:
    """Time the generating stream spent in torch.distributed collectives during one stage span.

    `seconds` is exposed communication: how long the computing stream (CUDA events on it) or the calling
    thread (monotonic clock, gloo/CPU) waited for collectives, from each call's issue to its completion or
    wait. `index` is the step number for denoise_step, the call number otherwise.
    """

    stage: CommStage
    seconds: float
    calls: int
    index: int = 0


@dataclass(frozen=True)
class GenerationRecord:
    """Everything measured about one pipeline call; timings resolved after the call (no sync inside it)."""

    started_at: float  # unix seconds
    total_seconds: float
    stages: tuple[StageTiming, ...]
    status: Status = "ok"
    steps: int = 0  # denoise steps actually run
    width: int | None = None
    height: int | None = None
    batch_size: int = 1  # images produced by the call
    prompt_chars: int | None = None
    guidance_scale: float | None = None
    cfg_active: bool | None = None
    device: str = "cpu"
    timing_method: Literal["cuda_event", "monotonic"] = "monotonic"
    peak_allocated_bytes: int | None = None  # CUDA only
    peak_reserved_bytes: int | None = None  # CUDA only
    prompt_cache_hit: bool | None = None
    text_tokens: int | None = None  # longest text-embedding sequence the encoder returned (None: not seen)
    compiles: int | None = None  # graphs torch.compile produced during the call (a recompile if > 0 when warm)
    error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # Collectives during the call, per stage span; None: not measured (no torch.distributed process group).
    communication: tuple[CommunicationTiming, ...] | None = None
    world_size: int | None = None  # ranks of the default process group when communication was measured
    # The process's CPU time (all threads, time.process_time) at the call's entry and at its return: what the
    # process did between two calls (the caller's data loading, pre/post-processing) needs no sampling.
    process_cpu_seconds: tuple[float, float] | None = None

    def stage_seconds(self, stage: Stage) -> float:
        """Total seconds spent in a stage (sum over its spans, e.g. all denoise steps)."""
        return sum(s.seconds for s in self.stages if s.stage == stage)

    def step_seconds(self) -> list[float]:
        return [s.seconds for s in sorted(self.stages, key=lambda s: s.index) if s.stage == "denoise_step"]

    def communication_seconds(self, stage: CommStage | None = None) -> float | None:
        """Seconds in collectives (in one stage, or over the whole call); None when not measured."""
        if self.communication is None:
            return None
        return sum(c.seconds for c in self.communication if stage is None or c.stage == stage)

    def step_communication_seconds(self) -> list[float] | None:
        """Seconds in collectives per denoise step, parallel to step_seconds(); None when not measured."""
        if self.communication is None:
            return None
        by_step: dict[int, float] = {}
        for c in self.communication:
            if c.stage == "denoise_step":
                by_step[c.index] = by_step.get(c.index, 0.0) + c.seconds
        steps = sorted(s.index for s in self.stages if s.stage == "denoise_step")
        return [by_step.get(i, 0.0) for i in steps]
