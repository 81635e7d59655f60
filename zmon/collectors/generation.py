"""Per-generation metrics from GenerationRecords: stage/step histograms, counters, load and pipeline facts."""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric

from zmon.instrumentation.records import GenerationRecord

log = logging.getLogger(__name__)

# 1 ms (a tiny CPU stage) to 60 s (a large image on a slow card); seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Stage label values: the denoise steps are summed into "denoise" (each step also has its own histogram).
STAGE_LABELS: tuple[tuple[str, str], ...] = (
    ("text_encode", "text_encode"),
    ("vae_encode", "vae_encode"),
    ("denoise", "denoise_step"),
    ("vae_decode", "vae_decode"),
    ("postprocess", "postprocess"),
)
# Where collectives are attributed: the stages, and "other" (in the call, outside every timed stage).
COMMUNICATION_LABELS: tuple[tuple[str, str], ...] = (*STAGE_LABELS, ("other", "other"))
STATUSES = ("ok", "oom", "error")
MAX_RESOLUTION_LABELS = 16
OTHER_RESOLUTION = "other"
UNKNOWN_RESOLUTION = "unknown"
MISCONFIGURATIONS: dict[str, str] = {
    "cfg_on_distilled": "classifier-free guidance (guidance_scale > 1) on a guidance-distilled model doubles "
    "the denoiser batch for no benefit; use guidance_scale 0",
    "default_50_steps": "50 denoising steps (the pipeline default) on a step-distilled model; "
    "its model card asks for ~9",
}
DEFAULT_STEPS = 50


class PromptCacheStats(Protocol):
    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    @property
    def size(self) -> int: ...


class _Histogram:
    """Cumulative-bucket accumulator for one label set (not thread-safe; the owner holds the lock)."""

    __slots__ = ("counts", "sum")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)  # last slot: above the largest bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float, bounds: Sequence[float]) -> None:
        self.counts[bisect_left(bounds, value)] += 1
        self.sum += value

    def buckets(self, bounds: Sequence[float]) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip(bounds, self.counts, strict=False):
            acc += n
            out.append((_fmt(bound), float(acc)))
        out.append(("+Inf", float(acc + self.counts[-1])))
        return out


def _fmt(v: float) -> str:
    return repr(float(v))


@dataclass
class PipelineFacts:
    """What is known about the instrumented pipeline once it is loaded."""

    model: str
    pipeline_class: str
    device: str
    dtype: str
    compiled: bool = False
    distilled: bool = False
    load_seconds: float | None = None
    checkpoint_bytes: int | None = None
    read_bytes_per_second: float | None = None


@dataclass
class _Acc:
    stage: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)
    generation: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)
    step: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)
    generations: dict[tuple[str, ...], int] = field(default_factory=dict)
    images: dict[tuple[str, ...], int] = field(default_factory=dict)
    steps: dict[tuple[str, ...], int] = field(default_factory=dict)
    communication: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)
    step_communication: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)


class GenerationMetrics:
    """A collector holding its own accumulators, fed by `observe(record)` from the stage hook's thread.

    Families are built fresh at scrape time. The `resolution` label is bounded: the first
    MAX_RESOLUTION_LABELS distinct sizes keep their "WxH" value, later ones are reported as "other".
    It doubles as a boundary listener (`generation_started` / `generation_finished`) for the in-progress
    gauge.
    """

    def __init__(
        self,
        *,
        model: str = "unknown",
        buckets: Sequence[float] = DURATION_BUCKETS,
        max_resolutions: int = MAX_RESOLUTION_LABELS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bounds = tuple(sorted(buckets))
        self._max_res = max_resolutions
        self._clock = clock
        self._lock = threading.Lock()
        self._acc = _Acc()
        self._resolutions: set[str] = set()
        self._in_progress = 0
        self._last_ts: float | None = None
        self._misconfig = dict.fromkeys(MISCONFIGURATIONS, 0)
        self.facts = PipelineFacts(model=model, pipeline_class="unknown", device="unknown", dtype="unknown")
        self._facts_set = False
        self._prompt_cache: PromptCacheStats | None = None
        self._jsonl_failures: Callable[[], int] | None = None
        self._output_failures: Callable[[], int] | None = None

    # -- inputs -------------------------------------------------------------------------------------------

    def set_pipeline(self, facts: PipelineFacts) -> None:
        with self._lock:
            self.facts = facts
            self._facts_set = True

    def set_prompt_cache(self, stats: PromptCacheStats | None) -> None:
        """Read hits/misses/evictions/size from the prompt cache handle at scrape time."""
        self._prompt_cache = stats

    def set_jsonl_failures(self, read: Callable[[], int] | None) -> None:
        self._jsonl_failures = read

    def set_output_failures(self, read: Callable[[], int] | None) -> None:
        """Images that could not be written to workload.output_dir (`zmon run`), read at scrape time."""
        self._output_failures = read

    def generation_started(self) -> None:
        with self._lock:
            self._in_progress += 1

    def generation_finished(self) -> None:
        with self._lock:
            self._in_progress = max(0, self._in_progress - 1)

    def resolution_label(self, width: int | None, height: int | None) -> str:
        if not width or not height:
            return UNKNOWN_RESOLUTION
        key = f"{width}x{height}"
        with self._lock:
            return self._bucket(key)

    def _bucket(self, key: str) -> str:
        if key in self._resolutions:
            return key
        if len(self._resolutions) < self._max_res:
            self._resolutions.add(key)
            return key
        return OTHER_RESOLUTION

    def observe(self, record: GenerationRecord) -> None:
        """Account one generation (thread-safe; called from the pipeline's thread)."""
        with self._lock:
            model, device = self.facts.model, record.device or self.facts.device
            res = (
                self._bucket(f"{record.width}x{record.height}")
                if record.width and record.height
                else UNKNOWN_RESOLUTION
            )
            base = (model, res, device)
            acc = self._acc
            for status in STATUSES:  # every status present from the first generation, so rate() works
                acc.generations.setdefault((status, *base), 0)
            acc.generations[(record.status, *base)] += 1
            self._last_ts = record.started_at + record.total_seconds
            if record.status != "ok":
                return
            acc.generation.setdefault(base, _Histogram(len(self._bounds))).observe(record.total_seconds, self._bounds)
            present = {s.stage for s in record.stages}
            for label, stage in STAGE_LABELS:
                if stage in present:
                    h = acc.stage.setdefault((label, *base), _Histogram(len(self._bounds)))
                    h.observe(record.stage_seconds(stage), self._bounds)
            step_h = acc.step.setdefault(base, _Histogram(len(self._bounds)))
            for s in record.step_seconds():
                step_h.observe(s, self._bounds)
            acc.images[base] = acc.images.get(base, 0) + record.batch_size
            acc.steps[base] = acc.steps.get(base, 0) + record.steps
            if record.communication is not None:
                self._observe_communication(record, base)
            self._check_misconfiguration(record)

    def _observe_communication(self, record: GenerationRecord, base: tuple[str, ...]) -> None:
        """Time in collectives per stage (every stage the call ran, 0 where it issued none) and per step."""
        acc = self._acc
        ran = {s.stage for s in record.stages} | {c.stage for c in record.communication or ()}
        for label, stage in COMMUNICATION_LABELS:
            if stage in ran:
                h = acc.communication.setdefault((label, *base), _Histogram(len(self._bounds)))
                h.observe(record.communication_seconds(stage) or 0.0, self._bounds)
        step_h = acc.step_communication.setdefault(base, _Histogram(len(self._bounds)))
        for s in record.step_communication_seconds() or ():
            step_h.observe(s, self._bounds)

    def _check_misconfiguration(self, record: GenerationRecord) -> None:
        if not self.facts.distilled:
            return
        cfg = record.cfg_active
        if cfg is None and record.guidance_scale is not None:
            cfg = record.guidance_scale > 1.0
        if cfg:
            self._flag("cfg_on_distilled", record)
        if record.steps in (DEFAULT_STEPS - 1, DEFAULT_STEPS):  # 50 requested runs 49 or 50 by scheduler
            self._flag("default_50_steps", record)

    def _flag(self, kind: str, record: GenerationRecord) -> None:
        if self._misconfig[kind]:
            return
        self._misconfig[kind] = 1
        log.warning(
            "workload misconfiguration on %s: %s (guidance_scale=%s, steps=%d)",
            self.facts.model,
            MISCONFIGURATIONS[kind],
            record.guidance_scale,
            record.steps,
        )

    # -- exposition ---------------------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            acc = self._acc
            stage = {k: (h.buckets(self._bounds), h.sum) for k, h in acc.stage.items()}
            gen = {k: (h.buckets(self._bounds), h.sum) for k, h in acc.generation.items()}
            step = {k: (h.buckets(self._bounds), h.sum) for k, h in acc.step.items()}
            comm = {k: (h.buckets(self._bounds), h.sum) for k, h in acc.communication.items()}
            step_comm = {k: (h.buckets(self._bounds), h.sum) for k, h in acc.step_communication.items()}
            generations, images, steps = dict(acc.generations), dict(acc.images), dict(acc.steps)
            in_progress, last_ts = self._in_progress, self._last_ts
            misconfig = dict(self._misconfig)
            facts, facts_set = self.facts, self._facts_set
        base = ["model", "resolution", "device"]

        yield _histogram(
            "zmon_stage_duration_seconds",
            "Time spent in one pipeline stage per successful generation (denoise: all steps).",
            ["stage", *base],
            stage,
        )
        yield _histogram(
            "zmon_generation_duration_seconds",
            "Wall time of one successful pipeline call, from entry to return.",
            base,
            gen,
        )
        yield _histogram("zmon_denoise_step_duration_seconds", "Time of one denoising step.", base, step)
        if comm:  # only pipelines that span several GPUs (torch.distributed) have these
            yield _histogram(
                "zmon_stage_communication_seconds",
                "Time the generating stream waited in torch.distributed collectives per stage of one "
                "successful generation (denoise: all steps; other: outside every stage).",
                ["stage", *base],
                comm,
            )
            yield _histogram(
                "zmon_denoise_step_communication_seconds",
                "Time the generating stream waited in torch.distributed collectives during one denoising step.",
                base,
                step_comm,
            )

        c = CounterMetricFamily(
            "zmon_generations", "Pipeline calls by outcome (ok, oom, error).", labels=["status", *base]
        )
        for k, n in sorted(generations.items()):
            c.add_metric(list(k), float(n))
        yield c
        c = CounterMetricFamily("zmon_images", "Images produced by successful generations.", labels=base)
        for k, n in sorted(images.items()):
            c.add_metric(list(k), float(n))
        yield c
        c = CounterMetricFamily("zmon_denoise_steps", "Denoising steps run by successful generations.", labels=base)
        for k, n in sorted(steps.items()):
            c.add_metric(list(k), float(n))
        yield c

        yield GaugeMetricFamily("zmon_generation_in_progress", "Pipeline calls running now.", value=float(in_progress))
        if last_ts is not None:
            yield GaugeMetricFamily(
                "zmon_generation_last_timestamp_seconds",
                "Unix time at which the latest generation finished (any outcome).",
                value=last_ts,
            )
        g = GaugeMetricFamily(
            "zmon_workload_misconfiguration",
            "1 once a generation ran with a known misconfiguration of this kind, else 0.",
            labels=["kind"],
        )
        for kind, v in sorted(misconfig.items()):
            g.add_metric([kind], float(v))
        yield g

        if facts_set:
            yield from self._pipeline_families(facts)
        yield from self._cache_families()
        if self._jsonl_failures is not None:
            yield CounterMetricFamily(
                "zmon_jsonl_write_failures",
                "Generation records that could not be written to the JSONL log.",
                value=float(self._jsonl_failures()),
            )
        if self._output_failures is not None:
            yield CounterMetricFamily(
                "zmon_output_write_failures",
                "Generated images that could not be written to workload.output_dir (disk full, permissions).",
                value=float(self._output_failures()),
            )

    def _pipeline_families(self, f: PipelineFacts) -> Iterable[Metric]:
        info = InfoMetricFamily("zmon_pipeline", "The instrumented pipeline; constant 1.")
        info.add_metric(
            [],
            {
                "model": f.model,
                "pipeline_class": f.pipeline_class,
                "device": f.device,
                "dtype": f.dtype,
                "compiled": "true" if f.compiled else "false",
            },
        )
        yield info
        for name, help_text, value in (
            ("zmon_checkpoint_load_seconds", "Time to load the pipeline's checkpoint.", f.load_seconds),
            ("zmon_checkpoint_bytes", "Size of the checkpoint files read at load.", f.checkpoint_bytes),
            (
                "zmon_checkpoint_read_bytes_per_second",
                "Checkpoint bytes divided by load time; under 500 MB/s points at an I/O bottleneck.",
                f.read_bytes_per_second,
            ),
        ):
            if value is not None:
                g = GaugeMetricFamily(name, help_text, labels=["model"])
                g.add_metric([f.model], float(value))
                yield g

    def _cache_families(self) -> Iterable[Metric]:
        pc = self._prompt_cache
        if pc is None:
            return
        yield CounterMetricFamily(
            "zmon_prompt_cache_hits",
            "Pipeline calls whose prompt embeddings came from the cache.",
            value=float(pc.hits),
        )
        yield CounterMetricFamily(
            "zmon_prompt_cache_misses",
            "Pipeline calls that had to encode their prompt.",
            value=float(pc.misses),
        )
        yield CounterMetricFamily(
            "zmon_prompt_cache_evictions",
            "Prompt embeddings dropped to stay within max_entries.",
            value=float(pc.evictions),
        )
        yield GaugeMetricFamily(
            "zmon_prompt_cache_entries", "Prompt embeddings held in the cache.", value=float(pc.size)
        )


_Buckets = tuple[list[tuple[str, float]], float]  # (cumulative buckets, sum) of one label set


def _histogram(
    name: str, documentation: str, labels: list[str], data: Mapping[tuple[str, ...], _Buckets]
) -> HistogramMetricFamily:
    """One histogram family from {label values: (buckets, sum)}, in label order."""
    h = HistogramMetricFamily(name, documentation, labels=labels)
    for k, (b, total) in sorted(data.items()):
        h.add_metric(list(k), b, total)
    return h
