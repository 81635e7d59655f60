"""Collective timing on CPU: torch.distributed over gloo, in process (one rank) and across 2 processes running
the embedded tiny Z-Image with diffusers' context parallelism (zmon.workload.parallel's plan)."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, generate_latest

from tests.services import require_binary
from zmon.analysis.diagnosis import diagnose
from zmon.analysis.facts import build_facts
from zmon.collectors.generation import GenerationMetrics
from zmon.instrumentation.collectives import C10D_OPS, apply_collective_timing
from zmon.instrumentation.jsonl import record_to_dict
from zmon.instrumentation.records import GenerationRecord
from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing

STEPS = 3
SLOW_COLLECTIVE_SECONDS = 0.02


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank in the test process (destroyed after: other tests see none)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _generate(pipe: Any, records: list[GenerationRecord], **kw: Any) -> GenerationRecord:
    pipe(prompt="a red cat", width=64, height=64, num_inference_steps=STEPS, guidance_scale=0.0, **kw)
    return records[-1]


def test_collectives_are_attributed_to_their_stage_and_step(
    tiny_pipe: Any, torch_single_thread: None, one_rank: None
) -> None:
    original_all_reduce = dist.all_reduce
    calls: list[str] = []

    def reduce(*_: Any) -> None:
        dist.all_reduce(torch.ones(4))
        calls.append("sync")

    def reduce_async(*_: Any) -> None:
        work = dist.all_reduce(torch.ones(4), async_op=True)
        time.sleep(0.005)  # between issue and wait: not communication
        work.wait()

    handles = [
        tiny_pipe.transformer.register_forward_pre_hook(lambda m, a: reduce_async()),
        tiny_pipe.text_encoder.register_forward_pre_hook(lambda m, a: reduce()),
        tiny_pipe.vae.decoder.register_forward_pre_hook(lambda m, a: reduce()),
    ]
    records: list[GenerationRecord] = []
    timing = apply_stage_timing(tiny_pipe, StageTimingConfig(on_record=records.append))
    collectives = apply_collective_timing(tiny_pipe)
    try:
        assert dist.all_reduce is not original_all_reduce  # wrapped while applied
        r = _generate(tiny_pipe, records)
        dist.all_reduce(torch.ones(2))  # outside a generation: passes through, not counted anywhere
    finally:
        collectives.remove()
        timing.remove()
        for h in handles:
            h.remove()
    assert dist.all_reduce is original_all_reduce  # restored exactly

    assert r.world_size == 1 and r.communication is not None
    by = {(c.stage, c.index): c for c in r.communication}
    assert by[("text_encode", 0)].calls == 1 and by[("vae_decode", 0)].calls == 1
    steps = [by[("denoise_step", k)] for k in range(STEPS)]
    assert all(s.calls == 1 for s in steps)  # the async call counts once; its wait() adds time, not a call
    assert all(0 < s.seconds < 0.005 for s in steps), [s.seconds for s in steps]  # the sleep is not in it
    assert r.step_communication_seconds() == [s.seconds for s in steps]
    assert r.communication_seconds() == pytest.approx(sum(c.seconds for c in r.communication))
    line = record_to_dict(r, model="m")
    assert line["world_size"] == 1 and set(line["communication_seconds"]) == {"text_encode", "denoise", "vae_decode"}
    assert len(line["step_communication_seconds"]) == STEPS


def test_no_process_group_means_not_measured(tiny_pipe: Any, torch_single_thread: None) -> None:
    assert not dist.is_initialized()
    records: list[GenerationRecord] = []
    timing = apply_stage_timing(tiny_pipe, StageTimingConfig(on_record=records.append))
    collectives = apply_collective_timing(tiny_pipe)
    try:
        r = _generate(tiny_pipe, records)
    finally:
        collectives.remove()
        timing.remove()
    assert r.communication is None and r.world_size is None
    assert "communication_seconds" not in record_to_dict(r, model="m")  # single-GPU lines keep their shape
    assert all(not hasattr(getattr(dist, op, None), "__zmon_collective__") for op in C10D_OPS)


# ------------------------------------------------------------------------------------------------ 2 ranks


def _slowed(fn: Any) -> Any:
    def slow(*a: Any, **k: Any) -> Any:
        time.sleep(SLOW_COLLECTIVE_SECONDS)
        return fn(*a, **k)

    return slow


def _rank(rank: int, store: str, model_dir: str, out: Any) -> None:
    """One rank: the tiny Z-Image, context-parallel over 2 gloo ranks; records sent back on `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        import torch.distributed._functional_collectives as funcol
        from diffusers import ZImagePipeline

        from zmon.workload.parallel import apply_context_parallel

        pipe = ZImagePipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(
            prompt="a red cat", width=64, height=64, num_inference_steps=STEPS, guidance_scale=0.0, output_type="pt"
        )
        reference = pipe(**kw, generator=torch.Generator().manual_seed(7)).images
        apply_context_parallel(pipe, 2)
        records: list[GenerationRecord] = []
        phases: dict[str, list[GenerationRecord]] = {}
        for phase in ("plain", "slow"):
            if phase == "slow":  # a slow link: every all-to-all takes 20 ms longer (inside zmon's wrapper)
                funcol.all_to_all_single = _slowed(funcol.all_to_all_single)
            timing = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
            collectives = apply_collective_timing(pipe)
            try:
                for _ in range(2):
                    image = pipe(**kw, generator=torch.Generator().manual_seed(7)).images
            finally:
                collectives.remove()
                timing.remove()
            phases[phase] = records[-2:]
        out.put((rank, float((image - reference).abs().max()), phases))
    except BaseException as e:
        out.put((rank, None, repr(e)))
        raise
    finally:
        dist.destroy_process_group()


def test_context_parallel_tiny_z_image_over_gloo(tiny_model_dir: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), str(tiny_model_dir), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, diff, phases = out.get(timeout=180)
            assert diff is not None, phases
            results[rank] = (diff, phases)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)

    for rank, (diff, phases) in results.items():
        assert diff == pytest.approx(0.0, abs=1e-5), f"rank {rank}: context parallel changed the image by {diff}"
        for r in phases["plain"] + phases["slow"]:
            assert r.world_size == 2 and r.status == "ok"
            steps = {c.index: c for c in r.communication or () if c.stage == "denoise_step"}
            assert sorted(steps) == list(range(STEPS))
            # per step and layer: q, k, v and output all-to-alls (Ulysses), then the output all-gather
            assert all(c.calls == 2 * 4 + 1 for c in steps.values()), [c.calls for c in steps.values()]
            assert all(c.seconds > 0 for c in steps.values())
            assert not any(c.stage == "text_encode" for c in r.communication or ())  # replicated: no traffic

    plain = build_facts(results[0][1]["plain"])
    slow = build_facts(results[0][1]["slow"])
    assert plain.multi_gpu is not None and slow.multi_gpu is not None and slow.multi_gpu.gpu_count == 2
    assert slow.multi_gpu.nccl_time_share is not None and plain.multi_gpu.nccl_time_share is not None
    # 9 slowed calls × 20 ms per step dominate the tiny model's step
    assert slow.multi_gpu.nccl_time_share > max(0.5, plain.multi_gpu.nccl_time_share)
    assert slow.multi_gpu.step_communication_share is not None and slow.multi_gpu.step_communication_share > 0.8
    d = diagnose(slow)
    assert d.verdict == "network_bound" and d.steps[0].answer == "yes"
    assert next(f for f in d.findings if f.kind == "multi_gpu_network").active

    metrics = GenerationMetrics(model="tiny")
    for r in results[0][1]["plain"] + results[0][1]["slow"]:
        metrics.observe(r)
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    assert re.search(r'^zmon_stage_communication_seconds_count\{.*stage="denoise".*\} 4\.0$', text, re.M)
    assert re.search(r"^zmon_denoise_step_communication_seconds_count\{.*\} 12\.0$", text, re.M)
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
