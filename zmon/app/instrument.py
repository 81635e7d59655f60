"""A pipeline instrumented for monitoring: the hooks, and where each generation's record goes.

One `Instrumentation` per monitored pipeline (`zmon run`, `zmon.attach`): safe-point boundaries, stage
timing, collective timing (multi-GPU pipelines) and (per config) the prompt cache on the pipeline's
HookRegistry; every GenerationRecord goes to the
generation metrics, the JSONL log and the record listeners (policy figures, live diagnosis).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from zmon.collectors.generation import GenerationMetrics, PipelineFacts
from zmon.config import WorkloadConfig
from zmon.instrumentation import anatomy
from zmon.instrumentation.boundaries import Boundaries, apply_boundaries
from zmon.instrumentation.collectives import CollectiveTimingHandle, apply_collective_timing
from zmon.instrumentation.hooks import HookRegistry
from zmon.instrumentation.jsonl import JsonlLog
from zmon.instrumentation.prompt_cache import PromptCacheHandle, apply_prompt_cache
from zmon.instrumentation.records import GenerationRecord
from zmon.instrumentation.stages import StageTimingConfig, StageTimingHandle, apply_stage_timing
from zmon.workload.loading import LoadedPipeline

log = logging.getLogger(__name__)

RecordListener = Callable[[GenerationRecord], None]


def pipeline_facts(pipe: Any, model_id: str, *, distilled: bool = False) -> PipelineFacts:
    """Model, class, device, dtype and whether the denoiser is torch.compile'd, read from the pipeline."""
    return PipelineFacts(
        model=model_id,
        pipeline_class=type(pipe).__name__,
        device=str(getattr(pipe, "device", "unknown")),
        dtype=str(getattr(pipe, "dtype", "unknown")).removeprefix("torch."),
        compiled=anatomy.is_compiled(pipe),
        distilled=distilled,
    )


def loaded_pipeline_facts(loaded: LoadedPipeline, *, distilled: bool) -> PipelineFacts:
    """pipeline_facts, with what loading measured: the device, dtype and compile state it chose, and the
    checkpoint read (seconds, bytes, throughput)."""
    facts = pipeline_facts(loaded.pipe, loaded.model_id, distilled=distilled)
    facts.device, facts.dtype, facts.compiled = loaded.device, loaded.dtype, loaded.compiled
    facts.load_seconds = loaded.load_seconds
    facts.checkpoint_bytes = loaded.checkpoint_bytes
    facts.read_bytes_per_second = loaded.read_bytes_per_second
    return facts


class Instrumentation:
    """Boundaries, stage timing and the prompt cache on one pipeline; records fan out to their consumers.

    `remove()` takes every hook off in reverse order and leaves the pipeline exactly as it was.
    """

    def __init__(self, pipe: Any, workload: WorkloadConfig, metrics: GenerationMetrics, *, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.metrics = metrics
        self.jsonl: JsonlLog | None = None
        self.prompt_cache: PromptCacheHandle | None = None
        self.stage_timing: StageTimingHandle | None = None
        self.collectives: CollectiveTimingHandle | None = None
        self.owner: Any = None  # the Handle or run session that applied it (named in errors)
        # Other consumers of each GenerationRecord (policy figures, live diagnosis), called after metrics.
        self.record_listeners: list[RecordListener] = []
        self._undo: list[Callable[[], None]] = []
        self._removed = False
        try:
            if workload.jsonl.path is not None:
                jsonl = JsonlLog(workload.jsonl.path, workload.jsonl.max_bytes, workload.jsonl.backups)
                jsonl.open()  # now: a line torn by the last run (kill -9) is cut before this one writes
                self.jsonl = jsonl
                metrics.set_jsonl_failures(lambda: jsonl.failures)
                self._undo.append(jsonl.close)
            self.boundaries: Boundaries = apply_boundaries(pipe)
            self.boundaries.owner = self
            self._undo.append(self.boundaries.remove)
            self.boundaries.add(metrics)  # the in-progress gauge
            if workload.prompt_cache.enabled:
                cache = apply_prompt_cache(pipe, workload.prompt_cache)
                self.prompt_cache = cache
                metrics.set_prompt_cache(cache)
                self._undo.append(cache.remove)
            # Time in torch.distributed collectives, when the pipeline spans several GPUs (context parallel).
            collectives = apply_collective_timing(pipe)
            self.collectives = collectives
            self._undo.append(collectives.remove)
            timing = apply_stage_timing(pipe, StageTimingConfig(on_record=self._on_record))
            self.stage_timing = timing
            self._undo.append(timing.remove)
        except BaseException:
            self.remove()
            raise

    def _on_record(self, record: GenerationRecord) -> None:
        try:
            self.metrics.observe(record)
        except Exception:
            log.exception("generation metrics failed to account a record")
        if self.jsonl is not None:
            self.jsonl.write(record, model=self.model_id)
        for listener in list(self.record_listeners):
            try:
                listener(record)
            except Exception:
                log.exception("record listener %r failed", listener)

    @staticmethod
    def of(pipe: Any) -> Instrumentation | None:
        """The Instrumentation on `pipe`, or None."""
        registry = HookRegistry.get(pipe)
        hook = None if registry is None else registry.hook(Boundaries.name)
        owner = getattr(hook, "owner", None)
        return owner if isinstance(owner, Instrumentation) else None

    def remove(self) -> None:
        """Undo every layer, newest first; idempotent."""
        if self._removed:
            return
        self._removed = True
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception:
                log.exception("removing zmon instrumentation failed")
