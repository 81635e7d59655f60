"""Generation metrics: histogram buckets and labels, bounded resolution label, counters, misconfiguration."""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.services import require_binary
from zmon.collectors.generation import DURATION_BUCKETS, GenerationMetrics, PipelineFacts
from zmon.instrumentation.records import GenerationRecord, StageTiming

BASE = {"model": "m", "resolution": "64x64", "device": "cpu"}


def record(
    *, steps: tuple[float, ...] = (0.003, 0.004), width: int = 64, height: int = 64, **kw: Any
) -> GenerationRecord:
    stages = [StageTiming("text_encode", 0.02, 0.0)]
    stages += [StageTiming("denoise_step", s, 0.02 + 0.01 * i, index=i) for i, s in enumerate(steps)]
    stages += [StageTiming("vae_decode", 0.3, 0.1), StageTiming("postprocess", 0.0005, 0.4)]
    base: dict[str, Any] = dict(
        started_at=1000.0,
        total_seconds=0.4,
        stages=tuple(stages),
        steps=len(steps),
        width=width,
        height=height,
        batch_size=1,
        guidance_scale=0.0,
        cfg_active=False,
        device="cpu",
    )
    base.update(kw)
    return GenerationRecord(**base)


def setup(**facts: Any) -> tuple[GenerationMetrics, CollectorRegistry]:
    m = GenerationMetrics(model="m")
    if facts:
        m.set_pipeline(
            PipelineFacts(
                **{"model": "m", "pipeline_class": "ZImagePipeline", "device": "cpu", "dtype": "float32", **facts}
            )
        )
    reg = CollectorRegistry()
    reg.register(m)  # type: ignore[arg-type]
    return m, reg


def test_buckets_span_1ms_to_60s() -> None:
    assert DURATION_BUCKETS[0] == 0.001 and DURATION_BUCKETS[-1] == 60.0
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_stage_histograms_and_counters() -> None:
    m, reg = setup()
    m.observe(record())
    m.observe(record(steps=(0.001, 0.002, 0.06), batch_size=2, total_seconds=1.5))
    s = reg.get_sample_value
    for stage, count in (("text_encode", 2), ("denoise", 2), ("vae_decode", 2), ("postprocess", 2)):
        assert s("zmon_stage_duration_seconds_count", {"stage": stage, **BASE}) == count, stage
    assert s("zmon_stage_duration_seconds_count", {"stage": "vae_encode", **BASE}) is None  # text-to-image
    assert s("zmon_stage_duration_seconds_sum", {"stage": "denoise", **BASE}) == pytest.approx(0.07)
    # le is inclusive: 0.001 lands in the first bucket; 0.003 and 0.004 in le=0.005
    step = {**BASE}
    assert s("zmon_denoise_step_duration_seconds_bucket", {**step, "le": "0.001"}) == 1
    assert s("zmon_denoise_step_duration_seconds_bucket", {**step, "le": "0.0025"}) == 2
    assert s("zmon_denoise_step_duration_seconds_bucket", {**step, "le": "0.005"}) == 4
    assert s("zmon_denoise_step_duration_seconds_bucket", {**step, "le": "0.1"}) == 5
    assert s("zmon_denoise_step_duration_seconds_bucket", {**step, "le": "+Inf"}) == 5
    assert s("zmon_generation_duration_seconds_bucket", {**BASE, "le": "0.5"}) == 1
    assert s("zmon_generation_duration_seconds_bucket", {**BASE, "le": "2.5"}) == 2
    assert s("zmon_generation_duration_seconds_sum", BASE) == pytest.approx(1.9)
    assert s("zmon_generations_total", {"status": "ok", **BASE}) == 2
    assert s("zmon_generations_total", {"status": "oom", **BASE}) == 0  # present from the start
    assert s("zmon_images_total", BASE) == 3
    assert s("zmon_denoise_steps_total", BASE) == 5
    assert s("zmon_generation_last_timestamp_seconds") == 1001.5


def test_failed_generations_count_but_do_not_skew_latency() -> None:
    m, reg = setup()
    m.observe(record(status="oom", total_seconds=0.01))
    m.observe(record(status="error", total_seconds=0.01))
    s = reg.get_sample_value
    assert s("zmon_generations_total", {"status": "oom", **BASE}) == 1
    assert s("zmon_generations_total", {"status": "error", **BASE}) == 1
    assert s("zmon_generations_total", {"status": "ok", **BASE}) == 0
    assert s("zmon_generation_duration_seconds_count", BASE) is None
    assert s("zmon_images_total", BASE) is None


def test_resolution_label_is_bounded() -> None:
    m = GenerationMetrics(model="m", max_resolutions=2)
    reg = CollectorRegistry()
    reg.register(m)  # type: ignore[arg-type]
    for w in (64, 128, 256, 512, 64):
        m.observe(record(width=w, height=64))
    m.observe(record(width=None, height=None))  # type: ignore[arg-type]
    got = {
        s.labels["resolution"]: s.value
        for fam in text_string_to_metric_families(generate_latest(reg).decode())
        for s in fam.samples
        if s.name == "zmon_generations_total" and s.labels["status"] == "ok"
    }
    assert got == {"64x64": 2, "128x64": 1, "other": 2, "unknown": 1}
    assert m.resolution_label(64, 64) == "64x64" and m.resolution_label(1024, 1024) == "other"


def test_in_progress_gauge() -> None:
    m, reg = setup()
    assert reg.get_sample_value("zmon_generation_in_progress") == 0
    m.generation_started()
    m.generation_started()
    m.generation_finished()
    assert reg.get_sample_value("zmon_generation_in_progress") == 1
    m.generation_finished()
    m.generation_finished()  # never negative
    assert reg.get_sample_value("zmon_generation_in_progress") == 0


def test_pipeline_info_and_checkpoint_gauges() -> None:
    _, reg = setup(compiled=True, load_seconds=2.5, checkpoint_bytes=1000, read_bytes_per_second=400.0)
    s = reg.get_sample_value
    info = {"model": "m", "pipeline_class": "ZImagePipeline", "device": "cpu", "dtype": "float32", "compiled": "true"}
    assert s("zmon_pipeline_info", info) == 1
    assert s("zmon_checkpoint_load_seconds", {"model": "m"}) == 2.5
    assert s("zmon_checkpoint_bytes", {"model": "m"}) == 1000
    assert s("zmon_checkpoint_read_bytes_per_second", {"model": "m"}) == 400


def test_unknown_load_facts_are_absent() -> None:
    _, reg = setup()
    assert reg.get_sample_value("zmon_pipeline_info", {}) is None
    text = generate_latest(reg).decode()
    assert "zmon_checkpoint" not in text and "zmon_prompt_cache" not in text and "zmon_jsonl" not in text


@dataclass
class FakeCache:
    hits: int = 3
    misses: int = 2
    evictions: int = 1
    size: int = 5


def test_prompt_cache_and_jsonl_are_read_at_scrape_time() -> None:
    m, reg = setup()
    cache = FakeCache()
    failures = [0]
    m.set_prompt_cache(cache)
    m.set_jsonl_failures(lambda: failures[0])
    cache.hits, failures[0] = 7, 4
    s = reg.get_sample_value
    assert s("zmon_prompt_cache_hits_total") == 7
    assert s("zmon_prompt_cache_misses_total") == 2
    assert s("zmon_prompt_cache_evictions_total") == 1
    assert s("zmon_prompt_cache_entries") == 5
    assert s("zmon_jsonl_write_failures_total") == 4


def test_misconfiguration_flags_log_once(caplog: pytest.LogCaptureFixture) -> None:
    m, reg = setup(distilled=True)
    s = reg.get_sample_value
    assert s("zmon_workload_misconfiguration", {"kind": "cfg_on_distilled"}) == 0
    assert s("zmon_workload_misconfiguration", {"kind": "default_50_steps"}) == 0
    with caplog.at_level(logging.WARNING, logger="zmon.collectors.generation"):
        for _ in range(3):
            m.observe(record(guidance_scale=5.0, cfg_active=True, steps=(0.01,) * 50))
    assert s("zmon_workload_misconfiguration", {"kind": "cfg_on_distilled"}) == 1
    assert s("zmon_workload_misconfiguration", {"kind": "default_50_steps"}) == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and any("cfg" in x or "guidance" in x for x in msgs)


def test_no_misconfiguration_on_a_model_that_is_not_distilled() -> None:
    m, reg = setup(distilled=False)
    m.observe(record(guidance_scale=5.0, cfg_active=True, steps=(0.01,) * 50))
    assert reg.get_sample_value("zmon_workload_misconfiguration", {"kind": "cfg_on_distilled"}) == 0


def test_observe_is_thread_safe() -> None:
    m, reg = setup()

    def worker() -> None:
        for _ in range(200):
            m.observe(record())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        generate_latest(reg)  # scrapes interleaved with observations
    for t in threads:
        t.join()
    assert reg.get_sample_value("zmon_generations_total", {"status": "ok", **BASE}) == 800
    assert reg.get_sample_value("zmon_denoise_step_duration_seconds_count", BASE) == 1600


def test_exposition_is_promtool_clean() -> None:
    promtool = require_binary("promtool")
    m, reg = setup(distilled=True, load_seconds=1.0, checkpoint_bytes=10, read_bytes_per_second=10.0)
    m.set_prompt_cache(FakeCache())
    m.set_jsonl_failures(lambda: 0)
    m.observe(record())
    m.observe(record(status="oom"))
    body = generate_latest(reg)
    lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
        lint.stdout.decode() + lint.stderr.decode()
    )


def test_real_pipeline_stages_and_cfg_on_distilled(tiny_pipe: Any, torch_single_thread: None) -> None:
    from zmon.app.instrument import Instrumentation, pipeline_facts
    from zmon.config import Config

    m = GenerationMetrics(model="builtin:tiny-z-image")
    m.set_pipeline(pipeline_facts(tiny_pipe, "builtin:tiny-z-image", distilled=True))
    reg = CollectorRegistry()
    reg.register(m)  # type: ignore[arg-type]
    inst = Instrumentation(tiny_pipe, Config().workload, m, model_id="builtin:tiny-z-image")
    try:
        tiny_pipe("a lighthouse", width=64, height=64, num_inference_steps=3, guidance_scale=0.0)
        assert reg.get_sample_value("zmon_workload_misconfiguration", {"kind": "cfg_on_distilled"}) == 0
        tiny_pipe("a lighthouse", width=64, height=32, num_inference_steps=3, guidance_scale=4.0)
    finally:
        inst.remove()
    s = reg.get_sample_value
    base = {"model": "builtin:tiny-z-image", "resolution": "64x64", "device": "cpu"}
    for stage in ("text_encode", "denoise", "vae_decode", "postprocess"):
        assert s("zmon_stage_duration_seconds_count", {"stage": stage, **base}) == 1, stage
        assert s("zmon_stage_duration_seconds_sum", {"stage": stage, **base}) > 0, stage
    assert s("zmon_denoise_step_duration_seconds_count", base) == 3
    assert s("zmon_generations_total", {"status": "ok", **base, "resolution": "64x32"}) == 1
    assert s("zmon_workload_misconfiguration", {"kind": "cfg_on_distilled"}) == 1
    assert (
        s(
            "zmon_pipeline_info",
            {
                "model": "builtin:tiny-z-image",
                "pipeline_class": "ZImagePipeline",
                "device": "cpu",
                "dtype": "float32",
                "compiled": "false",
            },
        )
        == 1
    )
