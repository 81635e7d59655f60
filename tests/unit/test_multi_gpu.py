"""Multi-GPU facts from the records' collective timings, the network_bound verdict, the communication
families, and the runner's round-robin share and heartbeat."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.fakes.profiles import healthy_facts, make_records
from zmon.analysis.diagnosis import diagnose
from zmon.analysis.facts import MultiGpuFacts
from zmon.collectors.generation import GenerationMetrics
from zmon.instrumentation.records import CommunicationTiming, GenerationRecord
from zmon.workload.runner import Runner, Workload
from zmon.workload.spec import WorkloadSpec


def with_communication(records: list[GenerationRecord], per_step: float, world: int = 2) -> list[GenerationRecord]:
    out = []
    for r in records:
        comm = tuple(
            CommunicationTiming("denoise_step", per_step, 9, s.index) for s in r.stages if s.stage == "denoise_step"
        )
        out.append(
            dataclasses.replace(r, communication=(*comm, CommunicationTiming("vae_decode", 0.001, 1)), world_size=world)
        )
    return out


def test_single_gpu_profiles_are_unchanged() -> None:
    d = diagnose(healthy_facts())
    assert d.verdict == "optimized" and len(d.steps) == 4  # the network question is not asked
    assert healthy_facts(with_communication(make_records(), 0.05, world=1)).multi_gpu is None


def test_communication_share_comes_from_the_records() -> None:
    records = with_communication(make_records(), 0.03)  # 8 steps of 150 ms, 30 ms of it in collectives
    facts = healthy_facts(records)
    mg = facts.multi_gpu
    assert mg is not None and mg.gpu_count == 2
    assert mg.step_communication_share == pytest.approx(0.2)
    total = records[1].total_seconds
    assert mg.nccl_time_share == pytest.approx((8 * 0.03 + 0.001) / total)
    assert mg.communication_mean_seconds == pytest.approx(8 * 0.03 + 0.001)
    assert records[1].step_communication_seconds() == [0.03] * 8


def test_slow_collectives_turn_the_verdict_to_network_bound() -> None:
    slow = healthy_facts(with_communication(make_records(), 0.09))  # 60% of every step
    d = diagnose(slow)
    assert d.verdict == "network_bound" and d.steps[0].answer == "yes" and len(d.steps) == 1
    assert "collectives" in d.summary
    finding = next(f for f in d.findings if f.kind == "multi_gpu_network")
    assert finding.active and "NCCL takes" in (finding.fix or "")
    fast = diagnose(healthy_facts(with_communication(make_records(), 0.005)))
    assert fast.verdict == "optimized" and fast.steps[0].answer == "no"


def test_data_parallel_facts_keep_their_gpu_count_and_gain_the_share() -> None:
    given = MultiGpuFacts(gpu_count=4, speedup_vs_single=3.9)
    facts = healthy_facts(with_communication(make_records(), 0.03), multi_gpu=given)
    assert facts.multi_gpu is not None and facts.multi_gpu.gpu_count == 4
    assert facts.multi_gpu.speedup_vs_single == 3.9 and facts.multi_gpu.nccl_time_share is not None
    no_comm = diagnose(healthy_facts(multi_gpu=MultiGpuFacts(gpu_count=2, speedup_vs_single=1.9)))
    assert no_comm.steps[0].answer == "not_measured" and no_comm.verdict == "optimized"


def test_communication_families_only_for_distributed_pipelines() -> None:
    metrics = GenerationMetrics(model="m")
    registry = CollectorRegistry()
    registry.register(metrics)
    metrics.observe(make_records(1)[0])
    assert (
        registry.get_sample_value(
            "zmon_stage_communication_seconds_count",
            {"stage": "denoise", "model": "m", "resolution": "1024x1024", "device": "cuda"},
        )
        is None
    )
    for r in with_communication(make_records(2), 0.03):
        metrics.observe(r)
    labels = {"model": "m", "resolution": "1024x1024", "device": "cuda"}
    assert registry.get_sample_value("zmon_stage_communication_seconds_count", {"stage": "denoise", **labels}) == 2
    assert registry.get_sample_value("zmon_stage_communication_seconds_sum", {"stage": "denoise", **labels}) == (
        pytest.approx(2 * 8 * 0.03)
    )
    # every stage the call ran is observed (0 where it issued no collective): a share per stage is rate / rate
    assert registry.get_sample_value("zmon_stage_communication_seconds_sum", {"stage": "text_encode", **labels}) == 0
    assert registry.get_sample_value("zmon_denoise_step_communication_seconds_count", labels) == 16


class _Pipe:
    def __init__(self) -> None:
        self.seeds: list[int] = []

    def __call__(self, **kw: Any) -> Any:
        self.seeds.append(int(kw["generator"].initial_seed()))
        return object()


def test_runner_generates_its_share_and_beats() -> None:
    spec = WorkloadSpec(prompts=("a",), resolutions=((64, 64),), steps=1, guidance_scale=0.0, batch_size=1, seed=100)
    pipe = _Pipe()
    beats: list[int] = []
    done: list[tuple[int, str]] = []
    result = Runner(Workload(pipe, spec)).run(
        None,
        threading.Event(),
        items=iter((1, 3, 5)),
        on_item=lambda i, s: done.append((i, s)),
        heartbeat=lambda: beats.append(1),
    )
    assert result.ok == 3 and done == [(1, "ok"), (3, "ok"), (5, "ok")]
    assert pipe.seeds == [101, 103, 105]  # item i keeps its seed whichever worker runs it
    assert len(beats) >= 6  # before and after each item


def test_rate_limited_runner_keeps_beating_while_it_waits() -> None:
    spec = WorkloadSpec(
        prompts=("a",), resolutions=((64, 64),), steps=1, guidance_scale=0.0, batch_size=1, seed=0, rate_per_second=0.8
    )
    beats: list[int] = []
    runner = Runner(Workload(_Pipe(), spec))
    result = runner.run(None, threading.Event(), items=iter((0, 2)), heartbeat=lambda: beats.append(1))
    # item 2 is due 2 / 0.8 = 2.5 s after the start: beats at least every second while waiting
    assert result.ok == 2 and len(beats) >= 2 + 2 + 2
