"""Generation records and profile facts built by hand, for the analysis tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from zmon.analysis.facts import EnvironmentFacts, GpuPoint, MemoryFacts, ProfileFacts, build_facts
from zmon.instrumentation.records import GenerationRecord, StageTiming

GB = 1_000_000_000
CARD = 80 * GB
T0 = 1_700_000_000.0

# ------------------------------------------------------------------------------------------------ builders


def make_record(
    started_at: float,
    *,
    text: float = 0.05,
    steps: Sequence[float] = (0.15,) * 8,
    vae: float = 0.09,
    post: float = 0.02,
    overhead: float = 0.01,
    device: str = "cuda",
    guidance: float = 0.0,
    cfg: bool = False,
    status: str = "ok",
    width: int = 1024,
) -> GenerationRecord:
    """One generation laid out stage after stage: text encode, denoise steps, VAE decode, postprocess."""
    spans = [StageTiming("text_encode", text, 0.0)]
    t = text
    for i, s in enumerate(steps):
        spans.append(StageTiming("denoise_step", s, t, i))
        t += s
    spans.append(StageTiming("vae_decode", vae, t))
    t += vae
    spans.append(StageTiming("postprocess", post, t))
    t += post
    return GenerationRecord(
        started_at=started_at,
        total_seconds=t + overhead,
        stages=tuple(spans),
        status=status,  # type: ignore[arg-type]
        steps=len(steps),
        width=width,
        height=width,
        guidance_scale=guidance,
        cfg_active=cfg,
        device=device,
        timing_method="cuda_event" if device.startswith("cuda") else "monotonic",
    )


def make_records(
    n: int = 13,
    *,
    scale: Callable[[int], float] = lambda i: 1.0,
    steps: Callable[[int], Sequence[float]] = lambda i: (0.15,) * 8,
    text: float = 0.05,
    vae: float = 0.09,
    post: float = 0.02,
    gap: float = 0.2,
    **kwargs: object,
) -> list[GenerationRecord]:
    """n back-to-back generations; `scale(i)` stretches generation i (run-to-run spread)."""
    out = []
    t = T0
    for i in range(n):
        k = scale(i)
        rec = make_record(
            t,
            text=text * k,
            steps=[s * k for s in steps(i)],
            vae=vae * k,
            post=post * k,
            **kwargs,  # type: ignore[arg-type]
        )
        out.append(rec)
        t += rec.total_seconds + gap
    return out


def gpu_trace(
    records: Sequence[GenerationRecord],
    util: dict[str, float],
    *,
    idle: float = 0.0,
    memory: int = 40 * GB,
    dt: float = 0.01,
) -> list[GpuPoint]:
    """NVML-like samples every dt seconds: the utilization of whichever stage was running."""
    spans = [
        (r.started_at + s.start_offset_seconds, r.started_at + s.start_offset_seconds + s.seconds, s.stage)
        for r in records
        for s in r.stages
    ]
    end = records[-1].started_at + records[-1].total_seconds + 0.5
    out = []
    t = records[0].started_at - 0.5
    while t < end:
        value = next((util[stage] for a, b, stage in spans if a < t <= b), idle)
        out.append(GpuPoint(t, value, memory))
        t += dt
    return out


def gpu_env(**kw: object) -> EnvironmentFacts:
    base = EnvironmentFacts(
        card_name="NVIDIA H100 80GB HBM3",
        device="cuda",
        compiled=True,
        alloc_conf="expandable_segments:True",
        model_id="Tongyi-MAI/Z-Image-Turbo",
        pipeline_class="ZImagePipeline",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


HEALTHY_UTIL = {"text_encode": 0.9, "denoise_step": 0.97, "vae_decode": 0.95, "postprocess": 0.9}


def healthy_facts(records: Sequence[GenerationRecord] | None = None, **overrides: object) -> ProfileFacts:
    """A GPU profile with nothing wrong (busy GPU, half the card, even steps, steady runs) by default."""
    records = records or make_records()
    kwargs: dict[str, object] = {
        "gpu_samples": gpu_trace(records, HEALTHY_UTIL, idle=0.9),
        "memory": MemoryFacts(card_total_bytes=CARD, reserved_unallocated_ratio=0.1, fragmentation_ratio=0.0),
        "env": gpu_env(),
        "warmup": 1,
        "created_at": T0,
    }
    kwargs.update(overrides)
    return build_facts(records, **kwargs)  # type: ignore[arg-type]
