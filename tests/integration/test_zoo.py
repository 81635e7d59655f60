"""The bottleneck zoo's CPU-side cases on the embedded model: each injected bottleneck is what the profile
names, healthy runs raise no priority ≤ 2 finding, and the live diagnosis agrees with the profile.

The GPU cases (GPU idle, memory pressure, uneven kernels, compiled pipelines) run on a real H200:
benchmarks/gpu_zoo.py, results in docs/BENCHMARKS.md. Their logic over GPU samples is unit-tested with
synthetic facts in tests/unit/test_diagnosis.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from benchmarks.gpu_zoo import CASES, Case, injected, judge
from zmon.app.profile import profile_monitor
from zmon.app.run import build_run
from zmon.capture.profile import ProfileResult, profile_pipeline
from zmon.config import Config, load_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")
BY_NAME = {c.name: c for c in CASES}


def config(cache: Path, **workload: Any) -> Config:
    return load_config(
        None,
        environ={},
        overrides={
            "model": {"cache_dir": str(cache)},
            "workload": {"resolutions": ["64x64"], **workload},
            "profiling": {
                "runs": 4,
                "warmup": 1,
                "disk_test_bytes": 0,
                "formats": ["json"],
                "sample_interval_seconds": 0.05,
            },
        },
    )


def run_case(case: Case, pipe: Any, cache: Path, tmp_path: Path, **workload: Any) -> ProfileResult:
    cfg = config(cache, **{**case.workload, **workload})
    mon, history = profile_monitor(cfg)
    try:
        with injected(case, pipe, True, tmp_path):
            return profile_pipeline(
                pipe, cfg, sampling=mon, history=history, out_dir=tmp_path / case.name, model_id="builtin:tiny-z-image"
            )
    finally:
        mon.stop()


@pytest.mark.parametrize(
    "name",
    [
        "cpu_text_encoding",
        "cpu_output_processing",
        "caller_between_calls",
        "storage_reads",
        "cfg_on_distilled",
        "excess_steps",
    ],
)
def test_injected_case_is_named(name: str, tiny_pipe: Any, tiny_cache_dir: Path, tmp_path: Path) -> None:
    case = BY_NAME[name]
    result = run_case(case, tiny_pipe, tiny_cache_dir, tmp_path)
    ok, note = judge(case, result)
    assert ok, f"{note}\n{result.diagnosis.summary}\n{[f.kind for f in result.diagnosis.active_findings]}"
    assert result.diagnosis.confidence == "low"  # a CPU-only run says so
    assert any("CPU-only run" in c for c in result.diagnosis.caveats)


def test_healthy_run_raises_no_priority_1_or_2_finding(tiny_pipe: Any, tiny_cache_dir: Path, tmp_path: Path) -> None:
    result = run_case(BY_NAME["healthy_eager"], tiny_pipe, tiny_cache_dir, tmp_path)
    false = [(f.kind, f.priority) for f in result.diagnosis.active_findings if f.priority <= 2]
    assert not false, false


def test_storage_reads_are_io_not_cpu(tiny_pipe: Any, tiny_cache_dir: Path, tmp_path: Path) -> None:
    result = run_case(BY_NAME["storage_reads"], tiny_pipe, tiny_cache_dir, tmp_path)
    d = result.diagnosis
    assert d.verdict == "io_or_caching" and not any(f.kind == "cpu_bound" for f in d.active_findings)
    reads = result.facts.utilization.process_read_by_stage.get("text_encode")
    assert reads is not None and reads > 100e6  # the process's own reads from storage, during text encoding


@pytest.fixture
def slow_session(tiny_cache_dir: Path) -> Iterator[Any]:
    cfg = Config.model_validate(
        {
            "model": {"cache_dir": str(tiny_cache_dir), "cpu_threads": 1},
            "workload": {"resolutions": ["64x64"], "prompts_file": None},
            "sampling": {
                "host": {"interval_seconds": 0.05},
                "process": {"interval_seconds": 0.05},
                "disk": {"interval_seconds": 0.05},
            },
        }
    )
    session = build_run(cfg, registry=CollectorRegistry(), serve_http=False)
    try:
        yield session
    finally:
        session.close()


def test_live_diagnosis_and_profile_agree(
    slow_session: Any, tiny_pipe: Any, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    """The same workload, judged by the daemon's rolling window and by `zmon profile`: same facts, same rules,
    same verdict."""
    case = BY_NAME["cpu_text_encoding"]
    with injected(case, slow_session.pipe, True, tmp_path):
        slow_session.run(max_generations=6)
    snap = slow_session.live.evaluate()  # the LiveDiagnosis fed every record
    assert snap.diagnosis is not None
    profiled = run_case(case, tiny_pipe, tiny_cache_dir, tmp_path)
    assert snap.diagnosis.verdict == profiled.diagnosis.verdict == "cpu_bound"
    live_share = snap.facts.stages.share("text_encode")
    assert live_share is not None and abs(live_share - (profiled.facts.stages.share("text_encode") or 0)) < 0.2
    assert {f.kind for f in snap.diagnosis.active_findings if f.priority == 1} == {
        f.kind for f in profiled.diagnosis.active_findings if f.priority == 1
    }
