"""Profile reports: profile.json (versioned), profile.md (also printed by the CLI) and profile.html."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zmon.profiling.diagnosis import Diagnosis, Evidence, format_value
from zmon.profiling.facts import SCHEMA_VERSION, WHOLE_GENERATION, ProfileFacts

PROFILE_KIND = "zmon.profile"
FILENAMES = {"json": "profile.json", "md": "profile.md", "html": "profile.html"}


# ------------------------------------------------------------------------------------------------ JSON


def profile_to_dict(facts: ProfileFacts, diagnosis: Diagnosis) -> dict[str, Any]:
    """The document written as profile.json (see docs/PROFILE_SCHEMA.md)."""
    return {
        "kind": PROFILE_KIND,
        "schema_version": SCHEMA_VERSION,
        "facts": facts.to_dict(),
        "diagnosis": diagnosis.to_dict(),
    }


def profile_from_dict(data: Mapping[str, Any]) -> tuple[ProfileFacts, Diagnosis]:
    """Parse a profile.json document; ValueError for another kind or schema version."""
    if data.get("kind") != PROFILE_KIND:
        raise ValueError(f"not a zmon profile (kind {data.get('kind')!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"profile schema_version {data.get('schema_version')!r} is not supported "
            f"(expected {SCHEMA_VERSION})"
        )
    return ProfileFacts.from_dict(data["facts"]), Diagnosis.from_dict(data["diagnosis"])


def load_profile(path: str | Path) -> tuple[ProfileFacts, Diagnosis]:
    """Read a profile.json written by `write_reports`."""
    return profile_from_dict(json.loads(Path(path).read_text()))


def write_reports(
    facts: ProfileFacts,
    diagnosis: Diagnosis,
    out_dir: str | Path,
    formats: Iterable[str] = ("json", "md", "html"),
) -> dict[str, Path]:
    """Write the requested reports into out_dir (created if needed); returns {format: path}."""
    from zmon.profiling.html import render_html  # html imports this module's helpers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderers = {
        "json": lambda: json.dumps(profile_to_dict(facts, diagnosis), indent=2, allow_nan=False) + "\n",
        "md": lambda: render_markdown(facts, diagnosis),
        "html": lambda: render_html(facts, diagnosis),
    }
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt not in renderers:
            raise ValueError(f"unknown report format {fmt!r} (expected one of {sorted(renderers)})")
        path = out / FILENAMES[fmt]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(renderers[fmt](), encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a report
        written[fmt] = path
    return written


# ------------------------------------------------------------------------------------------------ shared rows


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


def stage_rows(facts: ProfileFacts) -> list[tuple[str, ...]]:
    """(stage, mean, share, spans/gen, GPU util, process CPU, host CPU) per stage, then the rest."""
    u = facts.utilization
    rows: list[tuple[str, ...]] = []
    for s in facts.stages.stages:
        rows.append(
            (
                s.stage,
                fmt(s.mean_seconds, "s"),
                fmt(s.share, "ratio"),
                f"{s.spans_per_generation:g}",
                fmt(u.gpu_by_stage.get(s.stage), "ratio"),
                fmt(u.process_cpu_by_stage.get(s.stage), "cores"),
                fmt(u.host_cpu_by_stage.get(s.stage), "ratio"),
            )
        )
    st = facts.stages
    if st.unattributed_mean_seconds is not None:
        unattributed = fmt(st.unattributed_mean_seconds, "s"), fmt(st.unattributed_share, "ratio")
        rows.append(("(outside stages)", *unattributed, "", "", "", ""))
    if facts.baseline.latency is not None:
        rows.append(
            (
                "whole generation",
                fmt(facts.baseline.latency.mean, "s"),
                "100%",
                "",
                fmt(u.gpu_by_stage.get(WHOLE_GENERATION), "ratio"),
                fmt(u.process_cpu_by_stage.get(WHOLE_GENERATION), "cores"),
                fmt(u.host_cpu_by_stage.get(WHOLE_GENERATION), "ratio"),
            )
        )
    return rows


STAGE_HEADER = ("stage", "mean", "share", "spans / gen", "GPU util", "process CPU", "host CPU")


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
        ("time in NCCL", fmt(mg.nccl_time_share, "ratio")),
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


# ------------------------------------------------------------------------------------------------ Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _section(title: str, header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    return [f"## {title}", "", *_table(header, rows), ""]


def render_markdown(facts: ProfileFacts, diagnosis: Diagnosis) -> str:
    """The whole profile as Markdown: verdict and evidence first, then findings, then the measurements."""
    d = diagnosis
    out = [
        f"# zmon profile: {headline(facts)}",
        "",
        f"{created(facts)}, {facts.baseline.generations} measured generations after {facts.baseline.warmup} "
        "warm-up.",
        "",
        f"## Verdict: `{d.verdict}`",
        "",
        f"**{d.action}**",
        "",
        d.summary,
        "",
    ]
    flow_rows = [
        (str(i), s.question, s.answer.replace("_", " "), s.basis, "; ".join(evidence_text(s.evidence)))
        for i, s in enumerate(d.steps, 1)
    ]
    out += _table(("#", "question", "answer", "decided by", "evidence"), flow_rows)
    out += ["", "## Findings", ""]
    active = d.active_findings
    if not active:
        out += ["No bottleneck or misconfiguration found.", ""]
    for i, f in enumerate(active, 1):
        out += [
            f"### {i}. {f.title} (priority {f.priority}: impact {f.impact}, effort {f.effort})",
            "",
            f"{f.summary[:1].upper()}{f.summary[1:]}.",
            "",
            f"**Fix:** {f.fix}",
            "",
        ]
        out += [f"- {line}" for line in evidence_text(f.evidence)]
        out.append("")
    inactive = [f for f in d.findings if not f.active]
    if inactive:
        out += ["Not found:", ""]
        out += _table(
            ("check", "priority", "state"), [(f.title, str(f.priority), f.summary) for f in inactive]
        )
        out.append("")
    out += _section("Baseline", ("figure", "value"), baseline_rows(facts))
    out += _section("Stages", STAGE_HEADER, stage_rows(facts))
    out += [*_table(("denoise steps", "value"), step_rows(facts)), ""]
    if not facts.utilization.gpu_measured:
        out += ["GPU utilization: not measured.", ""]
    out += _section("Memory", ("figure", "value"), memory_rows(facts))
    out += _section("I/O", ("figure", "value"), io_rows(facts))
    if facts.multi_gpu is not None:
        out += _section("Multi-GPU", ("figure", "value"), multi_gpu_rows(facts))
    out += _section("Environment", ("", "value"), environment_rows(facts))
    return "\n".join(out)
