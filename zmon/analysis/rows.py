"""Report rows shared by the Markdown and HTML renderers: each section of a profile as (label, value) text."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from zmon.analysis.diagnosis import Evidence, format_value
from zmon.analysis.facts import BETWEEN_GENERATIONS, BETWEEN_MIN_SHARE, GAP_PREFIX, WHOLE_GENERATION, ProfileFacts


def fmt(value: float | None, unit: str) -> str:
    return format_value(value, unit)


def headline(facts: ProfileFacts) -> str:
    env = facts.environment
    model = env.model_id or "pipeline"
    where = env.card_name or env.device
    return f"{model} on {where}"


def created(facts: ProfileFacts) -> str:
    return dt.datetime.fromtimestamp(facts.created_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def baseline_rows(facts: ProfileFacts) -> list[tuple[str, str]]:
    b = facts.baseline
    lat = b.latency
    rows = [("generations", f"{b.generations} (warm-up {b.warmup}, failed {b.failed_generations})")]
    if lat is not None:
        rows += [
            ("mean", fmt(lat.mean, "s")),
            ("p50", fmt(lat.p50, "s")),
            ("p95", fmt(lat.p95, "s")),
            ("p99", fmt(lat.p99, "s")),
            ("min", fmt(lat.min, "s")),
            ("max", fmt(lat.max, "s")),
            ("std", fmt(lat.std, "s")),
            ("coefficient of variation", fmt(lat.cv, "cv")),
        ]
    rows += [
        ("run-to-run CV (same shape)", fmt(b.run_cv, "cv")),
        ("images per second", fmt(b.images_per_second, "")),
        ("late / early median", fmt(b.trend_ratio, "x")),
    ]
    return rows


def _window_cells(facts: ProfileFacts, key: str) -> tuple[str, ...]:
    """GPU busy and idle, GPM activity, CPU and storage reads in one window (a stage, a gap, or "generation")."""
    u = facts.utilization
    gpm = ""
    if u.gpm_measured:
        gpm = " / ".join(
            fmt(by.get(key), "ratio")
            for by in (u.sm_active_by_stage, u.tensor_active_by_stage, u.dram_bandwidth_by_stage)
        )
    reads = u.process_read_by_stage.get(key, u.disk_read_by_stage.get(key))
    return (
        fmt(u.gpu_by_stage.get(key), "ratio"),
        fmt(u.gpu_idle_seconds.get(key), "s"),
        gpm or "-",
        fmt(u.process_cpu_by_stage.get(key), "cores"),
        fmt(u.host_cpu_by_stage.get(key), "ratio"),
        fmt(reads, "B/s"),
    )


def stage_rows(facts: ProfileFacts) -> list[tuple[str, ...]]:
    """Per stage, per untimed gap, the whole generation, then the time between calls: time, share, and what
    the GPU, the CPU and storage did meanwhile (the whole-generation timeline)."""
    rows: list[tuple[str, ...]] = []
    for s in facts.stages.stages:
        rows.append(
            (
                s.stage,
                fmt(s.mean_seconds, "s"),
                fmt(s.share, "ratio"),
                f"{s.spans_per_generation:g}",
                *_window_cells(facts, s.stage),
            )
        )
    for g in facts.stages.gaps:
        rows.append(
            (
                f"(untimed) {g.name}",
                fmt(g.mean_seconds, "s"),
                fmt(g.share, "ratio"),
                "",
                *_window_cells(facts, GAP_PREFIX + g.name),
            )
        )
    if facts.baseline.latency is not None:
        rows.append(
            (
                "whole generation",
                fmt(facts.baseline.latency.mean, "s"),
                "100%",
                "",
                *_window_cells(facts, WHOLE_GENERATION),
            )
        )
    between = facts.between
    if between.gaps and between.share is not None and between.share >= BETWEEN_MIN_SHARE:  # of the wall time
        rows.append(
            (
                "between calls (share of wall time)",
                fmt(between.mean_seconds, "s"),
                fmt(between.share, "ratio"),
                "",
                *_window_cells(facts, BETWEEN_GENERATIONS),
            )
        )
    return rows


STAGE_HEADER = (
    "stage",
    "mean",
    "share",
    "spans / gen",
    "GPU util",
    "GPU idle",
    "SM / tensor / DRAM (GPM)",
    "process CPU",
    "host CPU",
    "storage reads",
)
EXCLUDED_HEADER = ("generation", "time", "× median", "why")


def excluded_rows(facts: ProfileFacts) -> list[tuple[str, ...]]:
    """Generations left out of the steady state, with the reason (never the base of a verdict)."""
    return [
        (f"#{x.index}", fmt(x.seconds, "s"), fmt(x.ratio_to_median, "x"), x.reason) for x in facts.baseline.excluded
    ]


def step_rows(facts: ProfileFacts) -> list[tuple[str, str]]:
    st = facts.stages
    return [
        ("mean step", fmt(st.step_mean_seconds, "s")),
        ("std of steps", fmt(st.step_std_seconds, "s")),
        ("step-time CV within a generation", fmt(st.step_cv, "cv")),
        ("slowest / fastest step", fmt(st.step_max_min_ratio, "x")),
    ]


def memory_rows(facts: ProfileFacts) -> list[tuple[str, str]]:
    m = facts.memory
    return [
        ("card memory", fmt(_f(m.card_total_bytes), "B")),
        ("peak allocated", fmt(_f(m.peak_allocated_bytes), "B")),
        ("peak reserved", fmt(_f(m.peak_reserved_bytes), "B")),
        (f"peak VRAM in use ({m.vram_used_source or '-'})", fmt(_f(m.vram_peak_used_bytes), "B")),
        ("VRAM in use / card", fmt(m.vram_used_fraction, "ratio")),
        ("reserved-unallocated ratio (cache)", fmt(m.reserved_unallocated_ratio, "cv")),
        ("fragmentation ratio (inactive split)", fmt(m.fragmentation_ratio, "cv")),
        ("headroom", fmt(_f(m.headroom_bytes), "B")),
        ("allocator retries", fmt(_f(m.alloc_retries), "count")),
        ("allocator OOMs", fmt(_f(m.ooms), "count")),
    ]


def io_rows(facts: ProfileFacts) -> list[tuple[str, str]]:
    io = facts.io
    return [
        ("model directory", io.model_dir or "-"),
        ("checkpoint load", fmt(io.checkpoint_load_seconds, "s")),
        ("checkpoint size", fmt(_f(io.checkpoint_bytes), "B")),
        (
            f"checkpoint read throughput ({io.cache_state} cache)",
            fmt(io.checkpoint_read_bytes_per_second, "B/s"),
        ),
        ("sequential disk read", fmt(io.disk_read_bytes_per_second, "B/s")),
        ("sequential disk write", fmt(io.disk_write_bytes_per_second, "B/s")),
        ("first generation", fmt(io.first_generation_seconds, "s")),
        ("steady-state median", fmt(io.steady_state_median_seconds, "s")),
        ("first / steady state", fmt(io.first_generation_slowdown, "x")),
    ]


def multi_gpu_rows(facts: ProfileFacts) -> list[tuple[str, str]]:
    mg = facts.multi_gpu
    if mg is None:
        return []
    return [
        ("GPUs", str(mg.gpu_count)),
        ("time in collectives (NCCL/gloo)", fmt(mg.nccl_time_share, "ratio")),
        ("collectives per generation", fmt(mg.communication_mean_seconds, "s")),
        ("collectives share of denoise steps", fmt(mg.step_communication_share, "ratio")),
        ("speedup vs one GPU", fmt(mg.speedup_vs_single, "x")),
        ("scaling efficiency", fmt(mg.scaling_efficiency, "ratio")),
    ]


def environment_rows(facts: ProfileFacts) -> list[tuple[str, str]]:
    env = facts.environment
    w = facts.workload
    shape = "-" if w.width is None else f"{w.width}×{w.height}, batch {w.batch_size}"
    cache = "off" if w.prompt_cache_hit_ratio is None else f"hit ratio {w.prompt_cache_hit_ratio:.0%}"
    pairs: list[tuple[str, Any]] = [
        ("model", env.model_id),
        ("pipeline", env.pipeline_class),
        ("card", env.card_name),
        ("driver", env.driver_version),
        ("CUDA", env.cuda_version),
        ("torch", env.torch_version),
        ("diffusers", env.diffusers_version),
        ("transformers", env.transformers_version),
        ("python", env.python_version),
        ("device", env.device),
        ("text encoder device", env.text_encoder_device or env.device),
        ("dtype", env.dtype),
        ("attention backend", env.attention_backend),
        ("torch.compile", None if env.compiled is None else ("on" if env.compiled else "off")),
        (
            "PYTORCH_CUDA_ALLOC_CONF",
            env.alloc_conf if env.alloc_conf else ("(default)" if env.on_gpu else None),
        ),
        ("host cores", env.cpu_count),
        ("shape", shape),
        ("steps", w.steps),
        ("guidance scale", w.guidance_scale),
        ("prompt cache", cache),
        ("timing", w.timing_method),
    ]
    return [(k, "-" if v is None else str(v)) for k, v in pairs]


def _f(v: int | None) -> float | None:
    return None if v is None else float(v)


def evidence_text(evidence: Iterable[Evidence]) -> list[str]:
    return [e.describe() for e in evidence]
