"""Profiling statistics, utilization attribution, facts and the diagnosis flowchart on synthetic data."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from tests.fakes.profiles import (
    CARD,
    GB,
    HEALTHY_UTIL,
    T0,
    gpu_env,
    gpu_trace,
    healthy_facts,
    make_record,
    make_records,
)
from zmon.analysis.diagnosis import PRIORITY, Diagnosis, Finding, diagnose, format_value
from zmon.analysis.facts import (
    CpuPoint,
    EnvironmentFacts,
    GpuPoint,
    IoFacts,
    IoPoint,
    MemoryFacts,
    MultiGpuFacts,
    ProfileFacts,
    attribute_utilization,
    build_facts,
    cpu_points_from_counters,
    gaps,
    split_runs,
)
from zmon.analysis.report import render_markdown
from zmon.analysis.stats import backward_intervals, cv, percentile, stdev, summarize, windowed_mean
from zmon.config import ProfilingConfig, Thresholds
from zmon.instrumentation.records import GenerationRecord, StageTiming


def finding(d: Diagnosis, kind: str) -> Finding:
    return next(f for f in d.findings if f.kind == kind)


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("n", [1, 2, 5, 20, 101])
def test_percentiles_and_spread_match_numpy_and_statistics(n: int) -> None:
    rng = random.Random(n)
    values = [rng.uniform(0.5, 3.0) for _ in range(n)]
    for q in (0, 1, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    if n >= 2:
        assert stdev(values) == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert cv(values) == pytest.approx(statistics.stdev(values) / statistics.fmean(values), rel=1e-12)
    s = summarize(values)
    assert s is not None
    assert (s.n, s.min, s.max) == (n, min(values), max(values))
    assert s.mean == pytest.approx(statistics.fmean(values))
    assert s.p50 == pytest.approx(statistics.median(values))
    assert s.p99 == pytest.approx(float(np.percentile(values, 99)))


def test_statistics_of_nothing_are_none() -> None:
    assert percentile([], 50) is None
    assert summarize([]) is None
    assert stdev([]) is None
    assert stdev([2.0]) == 0.0
    assert cv([0.0, 0.0]) is None  # mean 0: undefined, not 0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_backward_intervals_cover_the_period_before_each_read() -> None:
    assert backward_intervals([10.0, 11.0, 13.0]) == [(8.5, 10.0), (10.0, 11.0), (11.0, 13.0)]
    assert backward_intervals([]) == []


def test_windowed_mean_weights_by_overlap_and_skips_unknown() -> None:
    samples = [(0.0, 0.0), (2.0, 0.4), (4.0, 0.8), (6.0, None)]
    assert windowed_mean(samples, [(0.0, 1.0)]) == pytest.approx(0.4)
    assert windowed_mean(samples, [(1.0, 3.0)]) == pytest.approx(0.6)  # half in each interval
    assert windowed_mean(samples, [(0.0, 1.0), (3.0, 4.0)]) == pytest.approx(0.6)
    assert windowed_mean(samples, [(4.5, 5.5)]) is None  # only the unknown sample covers it
    assert windowed_mean([], [(0.0, 1.0)]) is None


# ------------------------------------------------------------------------------------------------ attribution


def test_attribute_utilization_with_hand_made_windows() -> None:
    # Generation at t=100: text encode [100, 101), two steps [101, 103), VAE decode [103, 104).
    record = GenerationRecord(
        started_at=100.0,
        total_seconds=4.0,
        stages=(
            StageTiming("text_encode", 1.0, 0.0),
            StageTiming("denoise_step", 1.0, 1.0, 0),
            StageTiming("denoise_step", 1.0, 2.0, 1),
            StageTiming("vae_decode", 1.0, 3.0),
        ),
        steps=2,
    )
    # Each sample reports the second before it; the first (t=100) covers 99..100, outside the generation.
    samples = [(100.0, 0.0), (101.0, 0.1), (102.0, 0.9), (103.0, 0.7), (104.0, 0.3), (105.0, 1.0)]
    got = attribute_utilization([record], samples)
    assert got["text_encode"] == pytest.approx(0.1)
    assert got["denoise_step"] == pytest.approx(0.8)
    assert got["vae_decode"] == pytest.approx(0.3)
    assert got["generation"] == pytest.approx(0.5)
    assert "postprocess" not in got

    # Sparse, unsorted samples: one read covering 100..102 and one covering 102..104.
    sparse = [(104.0, 0.8), (102.0, 0.4), (100.0, 0.0)]
    got = attribute_utilization([record], sparse)
    assert got["text_encode"] == pytest.approx(0.4)
    assert got["denoise_step"] == pytest.approx(0.6)
    assert got["vae_decode"] == pytest.approx(0.8)


def test_cpu_points_from_counters() -> None:
    samples = cpu_points_from_counters([(10.0, 5.0, None), (11.0, 6.5, 0.4), (13.0, 7.5, 0.2)])
    assert samples == (
        CpuPoint(10.0, None, None),
        CpuPoint(11.0, 1.5, 0.4),
        CpuPoint(13.0, 0.5, 0.2),
    )


# ------------------------------------------------------------------------------------------------ facts


def test_build_facts_baseline_skips_warmup_but_keeps_first_generation() -> None:
    records = make_records(11, scale=lambda i: 4.0 if i == 0 else 1.0)
    failed = make_record(records[-1].started_at + 5, status="oom")
    facts = build_facts([*records, failed], warmup=1, created_at=T0)
    b = facts.baseline
    assert (b.generations, b.warmup, b.failed_generations, b.oom_generations) == (10, 1, 1, 1)
    assert b.totals_seconds == tuple(r.total_seconds for r in records[1:])
    assert b.latency is not None and b.latency.p50 == pytest.approx(records[1].total_seconds)
    assert facts.io.first_generation_seconds == pytest.approx(records[0].total_seconds)
    assert facts.io.first_generation_slowdown == pytest.approx(records[0].total_seconds / records[1].total_seconds)
    assert facts.environment.device == "cuda"
    assert facts.multi_gpu is None


def test_stage_split_shares_and_step_spread() -> None:
    records = make_records(5, steps=lambda i: (0.1, 0.2, 0.1, 0.2))
    facts = build_facts(records, created_at=T0)
    st = facts.stages
    total = records[0].total_seconds
    assert [s.stage for s in st.stages] == ["text_encode", "denoise_step", "vae_decode", "postprocess"]
    denoise = st.get("denoise_step")
    assert denoise is not None and denoise.mean_seconds == pytest.approx(0.6)
    assert denoise.share == pytest.approx(0.6 / total)
    assert denoise.spans_per_generation == 4
    assert st.unattributed_mean_seconds == pytest.approx(0.01)
    assert sum(s.share for s in st.stages) + (st.unattributed_share or 0) == pytest.approx(1.0)
    assert st.step_mean_seconds == pytest.approx(0.15)
    assert st.step_cv == pytest.approx(statistics.stdev([0.1, 0.2, 0.1, 0.2]) / 0.15)
    assert st.step_max_min_ratio == pytest.approx(2.0)
    assert len(st.timeline) == 7 and st.timeline_total_seconds == pytest.approx(total)


def test_run_cv_is_pooled_within_shapes() -> None:
    # Two resolutions, each perfectly steady: mixing them must not read as run-to-run inconsistency.
    small = make_records(6, width=512)
    large = make_records(6, scale=lambda i: 3.0, width=1024)
    large = [replace(r, started_at=r.started_at + 100) for r in large]
    facts = build_facts(small + large, created_at=T0)
    assert facts.baseline.latency is not None and facts.baseline.latency.cv is not None
    assert facts.baseline.latency.cv > 0.4
    assert facts.baseline.run_cv == pytest.approx(0.0, abs=1e-9)
    assert facts.workload.distinct_shapes == 2


def test_vram_fraction_prefers_nvml_then_allocator() -> None:
    records = make_records(4)
    samples = gpu_trace(records, HEALTHY_UTIL, memory=72 * GB)
    nvml = build_facts(records, gpu_samples=samples, memory=MemoryFacts(card_total_bytes=CARD), created_at=T0)
    assert (nvml.memory.vram_used_fraction, nvml.memory.vram_used_source) == (pytest.approx(0.9), "nvml")
    records = [replace(r, peak_reserved_bytes=40 * GB) for r in records]
    alloc = build_facts(records, memory=MemoryFacts(card_total_bytes=CARD), created_at=T0)
    assert (alloc.memory.vram_used_fraction, alloc.memory.vram_used_source) == (
        pytest.approx(0.5),
        "allocator",
    )
    cpu = build_facts(make_records(3, device="cpu"), created_at=T0)
    assert cpu.memory.vram_used_fraction is None and cpu.memory.vram_used_source is None


def test_facts_json_round_trip() -> None:
    facts = healthy_facts(
        cpu_samples=cpu_points_from_counters([(T0 + i * 0.1, i * 0.09, 0.3) for i in range(50)]),
        io=IoFacts(model_dir="/m", checkpoint_load_seconds=3.0, checkpoint_bytes=20 * GB, cache_state="warm"),
        multi_gpu=MultiGpuFacts(2, nccl_time_share=0.1, speedup_vs_single=1.8),
    )
    text = json.dumps(facts.to_dict(), allow_nan=False)
    again = ProfileFacts.from_dict(json.loads(text))
    assert again == facts
    d = diagnose(facts)
    assert Diagnosis.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(ValueError, match="schema_version"):
        ProfileFacts.from_dict({**facts.to_dict(), "schema_version": 99})


# ------------------------------------------------------------------------------------------------ flowchart


def test_flowchart_cpu_bound_on_low_gpu_utilization() -> None:
    records = make_records()
    util = {**HEALTHY_UTIL, "denoise_step": 0.55}
    d = diagnose(healthy_facts(records, gpu_samples=gpu_trace(records, util)))
    assert d.verdict == "cpu_bound"
    assert [s.answer for s in d.steps] == ["yes"]
    ev = d.steps[0].evidence[0]
    assert (ev.figure, ev.threshold, ev.comparison, ev.holds, ev.name) == (
        "GPU utilization over whole generations",
        0.8,
        "<",
        True,
        "gpu_utilization_ratio",
    )
    assert ev.value == pytest.approx(0.6, abs=0.03)  # the whole generation, not only diffusion
    assert d.steps[0].evidence[1].value == pytest.approx(0.55, abs=0.02)  # during diffusion, as context
    assert "GPU utilization over whole generations" in d.summary and "< 80%" in d.summary
    assert "denoise steps" in d.steps[0].basis  # where the idle time sits
    assert finding(d, "gpu_underutilization").active
    cpu = finding(d, "cpu_bound")
    assert cpu.active and "most of it in the denoise steps" in (cpu.fix or "")


def test_flowchart_memory_bound_on_a_full_card_under_pressure() -> None:
    records = make_records()
    pressure = MemoryFacts(
        card_total_bytes=CARD,
        reserved_unallocated_ratio=0.05,
        headroom_bytes=3 * GB,
        alloc_retries=4,
        ooms=0,
        fragmentation_ratio=0.02,
    )
    d = diagnose(
        healthy_facts(records, gpu_samples=gpu_trace(records, HEALTHY_UTIL, idle=0.9, memory=76 * GB), memory=pressure)
    )
    assert d.verdict == "memory_bound"
    assert [s.answer for s in d.steps] == ["no", "yes"]
    ev = d.steps[1].evidence[0]
    assert ev.value == pytest.approx(0.95) and ev.threshold == 0.9 and ev.holds
    assert {e.figure for e in d.steps[1].evidence if e.holds} >= {"allocator retries", "headroom (free + cache) / card"}
    assert finding(d, "memory_fragmentation").active


def test_a_full_card_of_cache_is_not_memory_bound() -> None:
    """137 GB free and a 0.46 cache ratio, 1.5 % real fragmentation, no retries: cache, not pressure."""
    records = make_records()
    cache = MemoryFacts(
        card_total_bytes=CARD,
        reserved_unallocated_ratio=0.46,
        fragmentation_ratio=0.015,
        headroom_bytes=40 * GB,
        alloc_retries=0,
        ooms=0,
    )
    d = diagnose(
        healthy_facts(records, gpu_samples=gpu_trace(records, HEALTHY_UTIL, idle=0.9, memory=76 * GB), memory=cache)
    )
    assert d.verdict == "optimized"
    assert d.steps[1].answer == "no" and "without pressure" in d.steps[1].basis
    mem = finding(d, "memory_fragmentation")
    assert not mem.active and "cache" in mem.summary
    shown = next(e for e in mem.evidence if e.name == "torch_reserved_unallocated_ratio")
    assert shown.comparison == "info" and shown.threshold == 0.30 and shown.value == 0.46


def test_flowchart_kernel_issue_on_uneven_steps() -> None:
    d = diagnose(healthy_facts(make_records(steps=lambda i: (0.1, 0.25) * 4)))
    assert d.verdict == "kernel_issue"
    assert [s.answer for s in d.steps] == ["no", "no", "yes"]
    assert finding(d, "kernel_optimization").active
    assert "trace" in (finding(d, "kernel_optimization").fix or "")


def test_inconsistent_runs_without_io_are_variance_not_io() -> None:
    d = diagnose(healthy_facts(make_records(scale=lambda i: (1.0, 1.4, 0.8, 1.2)[i % 4])))
    assert d.verdict == "optimized"  # no storage evidence: the I/O question is not answered yes
    assert not finding(d, "io_throttling").active
    var = finding(d, "latency_variance")
    assert var.active and "other tenants" in (var.fix or "") and var.priority == 3


def test_flowchart_io_on_slow_checkpoint_reads() -> None:
    io = IoFacts(model_dir="/slow", checkpoint_load_seconds=40.0, checkpoint_bytes=8 * GB, cache_state="cold")
    d = diagnose(healthy_facts(make_records(), io=io))
    assert d.verdict == "io_or_caching"
    assert [s.answer for s in d.steps] == ["no", "no", "no", "yes"]


def test_flowchart_optimized() -> None:
    d = diagnose(healthy_facts())
    assert d.verdict == "optimized"
    assert [s.answer for s in d.steps] == ["no", "no", "no", "not_measured"]  # no load or storage measured
    assert d.active_findings == ()
    assert "hardware" in d.action
    assert d.confidence == "high" and d.caveats == (
        "1 generation(s) left out of the steady state (1 warmup); see the excluded runs",
    )


def test_thresholds_are_configurable() -> None:
    records = make_records()
    facts = healthy_facts(records, gpu_samples=gpu_trace(records, {**HEALTHY_UTIL, "denoise_step": 0.55}))
    assert diagnose(facts).verdict == "cpu_bound"
    assert diagnose(facts, Thresholds(gpu_util_low=0.5)).verdict == "optimized"
    assert diagnose(facts, Thresholds(gpu_util_low=0.5)).thresholds["gpu_util_low"] == 0.5


# ------------------------------------------------------------------------------------------------ CPU-only


def test_cpu_only_text_encoding_dominates_is_cpu_bound_with_prompt_cache_fix() -> None:
    records = make_records(text=0.45, steps=lambda i: (0.07,) * 8, vae=0.05, device="cpu")
    cpu = cpu_points_from_counters([(T0 - 1 + i * 0.05, i * 0.05 * 0.98, 0.5) for i in range(400)])
    facts = build_facts(
        records,
        cpu_samples=cpu,
        env=EnvironmentFacts(device="cpu", model_id="builtin:tiny-z-image"),
        warmup=1,
        created_at=T0,
    )
    assert not facts.utilization.gpu_measured
    assert facts.utilization.process_cpu_by_stage["text_encode"] == pytest.approx(0.98)
    d = diagnose(facts)
    assert d.verdict == "cpu_bound"
    step = d.steps[0]
    assert step.answer == "yes" and "not measured" in step.basis
    assert step.evidence[0].value is None and step.evidence[0].describe().endswith("not measured")
    cpu_finding = d.active_findings[0]
    assert cpu_finding.kind == "cpu_bound" and cpu_finding.priority == 1
    share = facts.stages.share("text_encode")
    assert share is not None
    assert cpu_finding.fix == (
        f"text encoding is {share:.0%} of the generation on cpu: enable the prompt-embedding cache "
        "(workload.prompt_cache.enabled: true) or move the text encoder from cpu to the GPU"
    )
    assert d.confidence == "low" and "CPU-only run" in d.caveats[0]
    # Nothing GPU-specific fires on a CPU run.
    for kind in ("gpu_underutilization", "memory_fragmentation", "compile_off", "multi_gpu_network"):
        assert not finding(d, kind).active


def test_cpu_only_without_dominant_cpu_stage_reports_not_measured() -> None:
    facts = build_facts(make_records(device="cpu"), env=EnvironmentFacts(device="cpu"), warmup=1, created_at=T0)
    d = diagnose(facts)
    assert [s.answer for s in d.steps] == ["not_measured", "not_measured", "no", "not_measured"]
    assert d.verdict == "optimized"
    assert finding(d, "gpu_underutilization").summary == "GPU utilization not measured"


# ------------------------------------------------------------------------------------------------ findings


def test_cpu_bound_finding_on_gpu_with_prompt_cache_already_on() -> None:
    records = make_records(text=0.6)
    records = [replace(r, prompt_cache_hit=(i % 10 == 0)) for i, r in enumerate(records)]
    cpu_text = {**HEALTHY_UTIL, "text_encode": 0.05}  # the encoder's work is on the CPU: the GPU waits
    d = diagnose(healthy_facts(records, gpu_samples=gpu_trace(records, cpu_text, idle=0.9)))
    assert d.verdict == "cpu_bound" and "text_encode" in d.steps[0].basis
    f = finding(d, "cpu_bound")
    assert f.active and (f.impact, f.effort, f.priority) == ("high", "low", 1)
    assert "most of it in the text_encode" in (f.fix or "") and "batches" in (f.fix or "")
    assert "move the text encoder" not in (f.fix or "")  # it is on the GPU already


def test_text_encoding_that_keeps_the_gpu_busy_is_not_cpu_bound() -> None:
    """A long text encoding on the GPU is GPU work: the whole generation counts, not a stage's share."""
    records = make_records(text=0.6)
    d = diagnose(healthy_facts(records))
    assert d.verdict == "optimized" and not finding(d, "cpu_bound").active


def test_cpu_heavy_output_processing_is_cpu_bound_at_postprocess() -> None:
    records = make_records(post=0.9)
    util = {**HEALTHY_UTIL, "postprocess": 0.0}
    d = diagnose(healthy_facts(records, gpu_samples=gpu_trace(records, util, idle=0.9)))
    assert d.verdict == "cpu_bound"
    f = finding(d, "cpu_bound")
    assert "most of it in the postprocess" in (f.fix or "") and "PNG encoding off the critical path" in (f.fix or "")


def test_work_between_stages_is_untimed_and_named() -> None:
    """Work a host runs between two timed stages (here 0.4 s before the text encoder) leaves the GPU idle."""
    records = []
    t = T0
    for r in make_records():
        shifted = tuple(replace(s, start_offset_seconds=s.start_offset_seconds + 0.4) for s in r.stages)
        records.append(replace(r, started_at=t, total_seconds=r.total_seconds + 0.4, stages=shifted))
        t += r.total_seconds + 0.4 + 0.2
    d = diagnose(healthy_facts(records, gpu_samples=gpu_trace(records, HEALTHY_UTIL, idle=0.0)))
    f = finding(d, "untimed_work")
    assert f.active and "start → text_encode" in f.summary and f.priority == 2
    assert d.verdict == "cpu_bound" and "untimed time start → text_encode" in d.steps[0].basis


def test_gpu_waiting_on_storage_is_io_not_cpu() -> None:
    """Each request reads weights from disk before encoding: the GPU idles, the process waits on reads."""
    records = make_records(text=0.6)
    util = {**HEALTHY_UTIL, "text_encode": 0.0}
    ios = [
        IoPoint(
            t.timestamp,
            disk_read_bytes_per_second=1.5e9 if t.util_ratio == 0.0 else 1e6,
            process_read_bytes_per_second=1.5e9 if t.util_ratio == 0.0 else 0.0,
        )
        for t in gpu_trace(records, util, idle=0.5)
    ]
    cpu = [
        CpuPoint(t.timestamp, process_cores=0.1 if t.util_ratio == 0.0 else 1.0, host_ratio=0.1)
        for t in gpu_trace(records, util, idle=0.5)
    ]
    d = diagnose(
        healthy_facts(records, gpu_samples=gpu_trace(records, util, idle=0.5), io_samples=ios, cpu_samples=cpu)
    )
    assert [s.answer for s in d.steps] == ["no", "no", "no", "yes"]
    assert "waiting on storage" in d.steps[0].basis
    assert d.verdict == "io_or_caching"
    io = finding(d, "io_throttling")
    assert io.active and "while the GPU idles in the text_encode" in (io.fix or "")
    assert not finding(d, "cpu_bound").active


def test_memory_fragmentation_finding_needs_pressure() -> None:
    # allocated 20 GB of 30 GB reserved, 1 GB inactive split, 40 GB free on the card: cache, no pressure
    mem = MemoryFacts(
        card_total_bytes=CARD,
        reserved_unallocated_ratio=1 / 3,
        fragmentation_ratio=1 / 30,
        headroom_bytes=50 * GB,
        alloc_retries=0,
        ooms=0,
    )
    assert not finding(diagnose(healthy_facts(memory=mem, env=gpu_env(alloc_conf=""))), "memory_fragmentation").active
    # Real fragmentation (inactive split 35 % of reserved) is pressure.
    frag = replace(mem, fragmentation_ratio=0.35)
    d = diagnose(healthy_facts(memory=frag, env=gpu_env(alloc_conf="")))
    f = d.active_findings[0]
    assert f.kind == "memory_fragmentation" and (f.impact, f.effort, f.priority) == ("high", "low", 1)
    assert f.fix is not None and f.fix.startswith(
        "fragmentation ratio 0.35 (inactive split / reserved) with 50.0 GB of headroom with the default allocator: "
        "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    # Under expandable_segments the advice changes; retries alone are enough to fire.
    mem2 = replace(mem, reserved_unallocated_ratio=0.1, alloc_retries=3)
    f2 = finding(diagnose(healthy_facts(memory=mem2)), "memory_fragmentation")
    assert f2.active and "expandable_segments:True:" not in (f2.fix or "") and "safe points" in (f2.fix or "")


def test_io_throttling_finding() -> None:
    io = IoFacts(model_dir="/slow", checkpoint_load_seconds=40.0, checkpoint_bytes=8 * GB, cache_state="cold")
    records = make_records(scale=lambda i: 4.0 if i == 0 else 1.0)
    facts = healthy_facts(records, io=io, env=gpu_env(compiled=False))
    assert facts.io.checkpoint_read_bytes_per_second == pytest.approx(200e6)
    f = finding(diagnose(facts), "io_throttling")
    assert f.active and (f.impact, f.effort, f.priority) == ("medium", "low", 2)
    held = {e.figure.split(" (")[0] for e in f.evidence if e.holds}
    assert held == {"checkpoint read throughput", "checkpoint load time"}
    assert "200.0 MB/s" in (f.fix or "") and "/slow" in (f.fix or "") and "40.0 s from a cold cache" in (f.fix or "")


def test_a_slow_first_generation_alone_is_warm_up_not_io() -> None:
    """Just over 3× the steady state on a fresh machine, no reads: a cold start, left out, not I/O."""
    facts = healthy_facts(make_records(scale=lambda i: 3.2 if i == 0 else 1.0), warmup=0)
    d = diagnose(facts)
    assert d.verdict == "optimized" and not finding(d, "io_throttling").active
    (cold,) = facts.baseline.excluded
    assert cold.kind == "cold" and cold.index == 0 and "cold start" in cold.reason


def test_small_checkpoint_throughput_is_shown_not_judged() -> None:
    """3 MB in 0.2 s is 15 MB/s of fixed overhead, not a slow disk (the embedded model measured this)."""
    io = IoFacts(model_dir="/m", checkpoint_load_seconds=0.2, checkpoint_bytes=3_000_000, cache_state="warm")
    facts = healthy_facts(make_records(), io=io, env=gpu_env(compiled=True))
    f = finding(diagnose(facts), "io_throttling")
    assert not f.active
    shown = [e for e in f.evidence if e.figure.startswith("checkpoint read throughput")]
    assert shown and shown[0].holds is None and "not judged" in shown[0].figure
    big = IoFacts(model_dir="/m", checkpoint_load_seconds=40.0, checkpoint_bytes=2 * GB, cache_state="warm")
    assert finding(diagnose(healthy_facts(make_records(), io=big, env=gpu_env(compiled=True))), "io_throttling").active


def test_first_generation_slowdown_under_compile_is_not_io() -> None:
    facts = healthy_facts(make_records(scale=lambda i: 30.0 if i == 0 else 1.0), env=gpu_env(compiled=True))
    f = finding(diagnose(facts), "io_throttling")
    assert not f.active and any("warm-up, not I/O" in e.figure for e in f.evidence)


def test_multi_gpu_network_finding() -> None:
    d = diagnose(healthy_facts(multi_gpu=MultiGpuFacts(2, nccl_time_share=0.3, speedup_vs_single=1.3)))
    f = finding(d, "multi_gpu_network")
    assert f.active and (f.impact, f.effort, f.priority) == ("low", "high", 4)
    assert "NCCL takes 30%" in (f.fix or "") and "1.30× instead of 2×" in (f.fix or "")
    assert not finding(diagnose(healthy_facts()), "multi_gpu_network").active
    assert healthy_facts(multi_gpu=MultiGpuFacts(1)).multi_gpu is None


def test_misconfigurations_on_z_image_turbo() -> None:
    records = make_records(steps=lambda i: (0.15,) * 50, guidance=5.0, cfg=True)
    facts = healthy_facts(records, env=gpu_env(compiled=False))
    d = diagnose(facts)
    kinds = [f.kind for f in d.active_findings]
    assert kinds == ["cfg_on_distilled", "excess_steps", "compile_off"]
    assert "set workload.guidance_scale: 0.0" in (finding(d, "cfg_on_distilled").fix or "")
    steps_fix = finding(d, "excess_steps").fix or ""
    assert "50 steps on Tongyi-MAI/Z-Image-Turbo" in steps_fix and "workload.steps: 9" in steps_fix
    assert "7.50 s to about 1.35 s" in steps_fix
    assert "model.compile: true" in (finding(d, "compile_off").fix or "")
    # A non-distilled model may use guidance and many steps.
    d2 = diagnose(replace(facts, environment=gpu_env(model_id="stabilityai/stable-diffusion-3.5-large")))
    assert not finding(d2, "cfg_on_distilled").active and not finding(d2, "excess_steps").active


def test_findings_are_sorted_active_first_by_priority() -> None:
    d = diagnose(healthy_facts(multi_gpu=MultiGpuFacts(4, nccl_time_share=0.5), env=gpu_env(compiled=False)))
    active = d.active_findings
    assert [f.kind for f in active] == ["compile_off", "multi_gpu_network"]
    assert list(d.findings[: len(active)]) == list(active)
    assert [f.priority for f in active] == sorted(f.priority for f in active)
    assert all(f.fix is None for f in d.findings if not f.active)


def test_priority_matrix_matches_the_article() -> None:
    assert PRIORITY[("high", "low")] == 1
    assert PRIORITY[("high", "medium")] == 2
    assert PRIORITY[("medium", "low")] == 2
    assert PRIORITY[("medium", "high")] == 3
    assert PRIORITY[("low", "high")] == 4


def test_format_value() -> None:
    assert format_value(0.413, "ratio") == "41%"
    assert format_value(180e6, "B/s") == "180.0 MB/s"
    assert format_value(None, "s") == "not measured"
    assert format_value(3.2, "x") == "3.20×"


# ------------------------------------------------------------------------------------------------ config


def test_profiling_config_defaults_and_validation() -> None:
    cfg = ProfilingConfig()
    t = cfg.thresholds
    assert (t.gpu_util_low, t.vram_high, t.step_cv_high, t.run_cv_high) == (0.8, 0.9, 0.15, 0.1)
    assert (t.read_throughput_low, t.first_gen_slowdown_high, t.text_encode_share_high) == (500e6, 3.0, 0.25)
    assert (t.cpu_busy_high, t.cache_ratio_high, t.fragmentation_high, t.nccl_share_high) == (0.9, 0.3, 0.3, 0.2)
    assert ProfilingConfig.model_validate({"thresholds": {"gpu_util_low": 0.7}}).thresholds.gpu_util_low == 0.7
    with pytest.raises(ValidationError):
        ProfilingConfig.model_validate({"thresholds": {"gpu_util_lo": 0.7}})
    with pytest.raises(ValidationError):
        ProfilingConfig.model_validate({"thresholds": {"vram_high": 1.5}})


# ------------------------------------------------------------------------------------------------ live use


def test_rolling_window_is_fast() -> None:
    records = make_records(300)
    samples = gpu_trace(records, HEALTHY_UTIL, dt=0.1)
    start = time.perf_counter()
    facts = build_facts(records[-100:], gpu_samples=samples, env=gpu_env())
    diagnose(facts)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------------ outliers, warm-up


def test_a_recompile_outlier_never_makes_the_verdict() -> None:
    """A compiled, healthy pipeline recompiles on a new prompt length inside the measured runs (one run 70×
    the others): the run is left out and reported, the verdict stays optimized, no "compile it" advice."""
    records = make_records()
    tokens = [18] * 5 + [31] * (len(records) - 5)
    records = [replace(r, text_tokens=tokens[i], compiles=1 if i in (0, 5) else 0) for i, r in enumerate(records)]
    slow = records[5]
    records[5] = replace(slow, total_seconds=slow.total_seconds * 70)
    # the later generations start after the slow one ends
    shift = records[5].total_seconds - slow.total_seconds
    records = records[:6] + [replace(r, started_at=r.started_at + shift) for r in records[6:]]
    util = gpu_trace(records, HEALTHY_UTIL, idle=0.0)  # the GPU idles while dynamo compiles
    facts = healthy_facts(records, gpu_samples=util, env=gpu_env(compiled=True), warmup=1)
    kinds = {(x.index, x.kind) for x in facts.baseline.excluded}
    assert kinds == {(0, "warmup"), (5, "compile")}
    recompile = next(x for x in facts.baseline.excluded if x.index == 5)
    assert recompile.reason == "recompile (1 graph): prompt length changed 18 → 31 tokens"
    assert recompile.ratio_to_median == pytest.approx(70, rel=0.05)
    assert facts.baseline.generations == len(records) - 2 and facts.baseline.compiles == 2
    d = diagnose(facts)
    assert d.verdict == "optimized"
    assert not finding(d, "recompiles").active  # one automatic-dynamic recompile is expected
    assert all("torch.compile the transformer" not in (f.fix or "") for f in d.findings)
    assert "2 generation(s) left out of the steady state" in d.caveats[0]


def test_repeated_recompiles_are_a_finding() -> None:
    records = make_records(16)
    widths = [1024, 768, 1024, 512, 640]
    records = [replace(r, compiles=1 if i in (1, 4, 7, 10) else 0, width=widths[i % 5]) for i, r in enumerate(records)]
    d = diagnose(healthy_facts(records, env=gpu_env(compiled=True), warmup=0))
    f = finding(d, "recompiles")
    assert f.active and f.priority == 1
    assert "resolution changed" in (f.fix or "") and "mark the varying" in (f.fix or "")


def test_split_runs_caps_outliers() -> None:
    """A workload that is often slow is slow: at most a quarter of the runs are set aside as outliers."""
    records = make_records(12, scale=lambda i: 10.0 if i in (1, 3, 5, 7, 9) else 1.0)
    steady, excluded = split_runs(records, 0, outlier_ratio=3.0, first_is_cold=False)
    assert len(excluded) == 3 and all(x.kind == "outlier" for x in excluded)
    assert len(steady) == 9 and sum(r.total_seconds > 5 for r in steady) == 2


def test_gaps_name_the_untimed_time() -> None:
    r = make_record(T0)
    r = replace(
        r,
        total_seconds=r.total_seconds + 0.3,
        stages=tuple(
            replace(s, start_offset_seconds=s.start_offset_seconds + (0.1 if s.stage != "text_encode" else 0.0))
            for s in r.stages
        ),
    )
    names = {name: round(sec, 3) for name, _, sec in gaps(r)}
    assert names == {"text_encode → denoise": 0.1, "postprocess → end": 0.21}


def test_loaded_host_lowers_confidence() -> None:
    records = make_records()
    busy = [CpuPoint(T0 - 1 + i * 0.05, process_cores=0.5, host_ratio=0.97) for i in range(800)]
    d = diagnose(healthy_facts(records, cpu_samples=busy, env=gpu_env(cpu_count=16)))
    assert d.confidence == "low" and any("other processes compete" in c for c in d.caveats)


def test_gpm_activity_is_attributed_per_stage() -> None:
    records = make_records()
    trace = gpu_trace(records, HEALTHY_UTIL, idle=0.9)
    gpm = [replace(p, sm_active_ratio=0.95, tensor_active_ratio=0.9, dram_bandwidth_ratio=0.2) for p in trace]
    facts = healthy_facts(records, gpu_samples=gpm)
    u = facts.utilization
    assert u.gpm_measured
    assert u.tensor_active_by_stage["denoise_step"] == pytest.approx(0.9)
    assert u.sm_active_by_stage["generation"] == pytest.approx(0.95)
    assert isinstance(trace[0], GpuPoint)


# ------------------------------------------------------------------------------------------------ between calls


def _calls_with_gaps(gap: float, cores: float, n: int = 13) -> list[GenerationRecord]:
    """Generations `gap` seconds apart; the process keeps one core busy inside each call and `cores` busy
    between calls (its CPU time at each call's entry and return, as stage timing records it)."""
    out, cpu = [], 100.0
    for r in make_records(n, gap=gap):
        entry = cpu
        cpu += r.total_seconds
        out.append(replace(r, process_cpu_seconds=(entry, cpu)))
        cpu += gap * cores
    return out


def test_between_facts_come_from_consecutive_calls_per_device() -> None:
    busy = make_record(T0).total_seconds  # each call lasts this long; cuda:0's calls follow without a gap
    a = [make_record(T0 + i * busy, device="cuda:0") for i in range(3)]
    b = [
        replace(make_record(T0 + i * (busy + 2.0), device="cuda:1"), process_cpu_seconds=(i * 10.0, i * 10.0 + 1.0))
        for i in range(3)
    ]
    facts = build_facts([a[0], b[0], a[1], b[1], a[2], b[2]], created_at=T0)  # interleaved, as workers report
    bt = facts.between
    assert bt.gaps == 2  # only cuda:1's calls have time between them
    assert bt.mean_seconds == pytest.approx(2.0)
    wall = 3 * busy + (3 * busy + 2 * 2.0)
    assert bt.share == pytest.approx(4.0 / wall)
    assert bt.process_cores == pytest.approx((10.0 - 1.0) / 2.0)  # CPU seconds between calls / seconds between
    assert build_facts(a, created_at=T0).between.gaps == 0  # back-to-back calls: nothing between them


def test_caller_work_between_calls_is_cpu_bound_with_its_fix() -> None:
    records = _calls_with_gaps(gap=1.0, cores=1.0)
    facts = healthy_facts(records, gpu_samples=gpu_trace(records, HEALTHY_UTIL, idle=0.0))
    assert facts.between.share == pytest.approx(12 * 1.0 / (13 * records[0].total_seconds + 12 * 1.0))
    assert facts.utilization.process_cpu_by_stage["between generations"] == pytest.approx(1.0)
    d = diagnose(facts)
    assert d.verdict == "cpu_bound"
    assert d.steps[0].answer == "yes" and "between pipeline calls" in d.steps[0].basis
    ev = {e.name: e for e in d.steps[0].evidence if e.name}
    assert ev["between_generations_idle_share_ratio"].holds and ev["between_generations_process_cpu_cores"].holds
    cpu = finding(d, "cpu_bound")
    assert cpu.active and "between pipeline calls" in (cpu.fix or "") and "producer thread" in (cpu.fix or "")
    assert "1.00 cores" in (cpu.fix or "")
    assert not finding(d, "gpu_underutilization").active  # inside the calls the GPU is busy
    md = render_markdown(facts, d)
    assert "between calls (share of wall time)" in md


def test_waiting_for_requests_between_calls_is_not_a_bottleneck() -> None:
    records = _calls_with_gaps(gap=1.0, cores=0.01)
    d = diagnose(healthy_facts(records, gpu_samples=gpu_trace(records, HEALTHY_UTIL, idle=0.0)))
    assert d.verdict == "optimized"
    cpu = finding(d, "cpu_bound")
    assert not cpu.active and "waits for requests" in cpu.summary
    assert d.confidence == "high" and any("waits for requests" in c for c in d.caveats)  # said, not doubted


def test_gpu_work_between_calls_is_not_idle_time() -> None:
    """The host runs other GPU work between calls (an upscaler, a safety checker): the GPU is not waiting."""
    records = _calls_with_gaps(gap=1.0, cores=1.0)
    d = diagnose(healthy_facts(records, gpu_samples=gpu_trace(records, HEALTHY_UTIL, idle=0.95)))
    assert d.verdict == "optimized"
    assert not finding(d, "cpu_bound").active


def test_between_calls_on_a_cpu_only_run() -> None:
    records = [replace(r, device="cpu", timing_method="monotonic") for r in _calls_with_gaps(gap=1.0, cores=1.0)]
    d = diagnose(build_facts(records, env=EnvironmentFacts(device="cpu"), warmup=1, created_at=T0))
    assert d.verdict == "cpu_bound" and "between pipeline calls" in d.steps[0].basis


# ------------------------------------------------------------------------------------------------ CPU offload


def test_cpu_offload_on_a_card_with_room_is_a_priority_1_misconfiguration() -> None:
    facts = healthy_facts(env=gpu_env(offload="model", weights_bytes=20 * GB))  # peak 40 GB of an 80 GB card
    off = finding(diagnose(facts), "cpu_offload")
    assert off.active and off.priority == 1 and off.category == "misconfiguration"
    assert "enable_model_cpu_offload()" in (off.fix or "") and "75%" in (off.fix or "")  # (20 + 40) / 80


def test_cpu_offload_that_makes_the_pipeline_fit_is_not_flagged() -> None:
    off = finding(diagnose(healthy_facts(env=gpu_env(offload="model", weights_bytes=50 * GB))), "cpu_offload")
    assert not off.active and "lets the pipeline fit" in off.summary
    assert not finding(diagnose(healthy_facts()), "cpu_offload").active  # no offload at all


def test_gpu_idle_on_an_offloading_pipeline_names_the_copies() -> None:
    records = make_records()
    facts = healthy_facts(
        records,
        gpu_samples=gpu_trace(records, {**HEALTHY_UTIL, "denoise_step": 0.5}),
        env=gpu_env(offload="sequential", weights_bytes=20 * GB),
    )
    d = diagnose(facts)
    assert d.verdict == "cpu_bound"
    assert "enable_sequential_cpu_offload()" in (finding(d, "cpu_bound").fix or "")


def test_float32_on_a_gpu_is_a_priority_1_misconfiguration() -> None:
    d = diagnose(healthy_facts(env=gpu_env(dtype="float32")))
    f32 = finding(d, "float32_on_gpu")
    assert f32.active and f32.priority == 1 and "torch_dtype=torch.bfloat16" in (f32.fix or "")
    assert d.verdict == "optimized"  # a misconfiguration is a finding, not the flowchart's verdict
    assert not finding(diagnose(healthy_facts(env=gpu_env(dtype="bfloat16"))), "float32_on_gpu").active
    cpu = build_facts(make_records(device="cpu"), env=EnvironmentFacts(device="cpu", dtype="float32"), created_at=T0)
    assert not finding(diagnose(cpu), "float32_on_gpu").active  # float32 is the CPU's dtype
