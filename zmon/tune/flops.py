"""How far a latency is from the compute floor: FLOPs of one generation and the device's measured matmul rate.

FLOPs are counted, not estimated, when possible: one generation runs under torch.utils.flop_counter's
FlopCounterMode (matmuls, convolutions, attention), which attributes them to the top-level modules; the
denoiser's share divided by its forward count is the per-forward figure. When counting fails, the
estimate is 2 × denoiser parameters × tokens per forward (method "params×tokens"). The rate is measured
too: back-to-back square matmuls in the pipeline's dtype on its device (what dense tensor-core work
reaches here), so the floor = FLOPs / rate is a floor this machine could approach, not a datasheet one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from zmon.providers import cuda
from zmon.workload.options import denoiser_modules, unwrap

log = logging.getLogger(__name__)

GEMM_SIDE_CUDA = 8192
GEMM_SIDE_CPU = 512
RATE_SECONDS = 0.5  # how long the matmul loop runs once warm


@dataclass(frozen=True)
class FlopCount:
    generation_flops: float | None  # everything in one generation (text encoder, denoiser, VAE)
    denoiser_flops_per_forward: float | None
    denoiser_forwards: int | None
    method: str  # "FlopCounterMode" or "params×tokens"

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation_flops": self.generation_flops,
            "denoiser_flops_per_forward": self.denoiser_flops_per_forward,
            "denoiser_forwards": self.denoiser_forwards,
            "method": self.method,
        }


def count_flops(pipe: Any, run_generation: Callable[[], Any], forwards: int | None) -> FlopCount:
    """Run one generation under FlopCounterMode; `forwards` = denoiser forwards per generation (records)."""
    found = denoiser_modules(pipe)
    cls = type(unwrap(found[0][1])).__name__ if found else None
    try:
        with FlopCounterMode(display=False) as counter:
            run_generation()
        total = float(counter.get_total_flops())
        per_module = counter.get_flop_counts()
        denoiser = float(sum(per_module.get(cls, {}).values())) if cls else 0.0
        per_forward = denoiser / forwards if denoiser and forwards else None
        return FlopCount(total or None, per_forward, forwards, "FlopCounterMode")
    except Exception as e:  # an op the counter cannot trace: fall back to the estimate
        log.info("FlopCounterMode failed (%s); estimating from parameters × tokens", e)
        return FlopCount(None, None, forwards, "failed")


def estimate_flops(pipe: Any, width: int, height: int, text_tokens: int, forwards: int | None) -> FlopCount:
    """2 × parameters × tokens per denoiser forward (tokens: latent patches + text); attention not included."""
    found = denoiser_modules(pipe)
    if not found:
        return FlopCount(None, None, forwards, "params×tokens")
    module = unwrap(found[0][1])
    params = sum(p.numel() for p in module.parameters())
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    patch = 2  # Z-Image / Flux / SD3 patchify 2×2 latent pixels per token
    tokens = (width // scale // patch) * (height // scale // patch) + text_tokens
    per_forward = 2.0 * params * tokens
    total = per_forward * forwards if forwards else None
    return FlopCount(total, per_forward, forwards, "params×tokens")


@dataclass(frozen=True)
class MatmulRate:
    flops_per_second: float
    dtype: str
    side: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops_per_second": self.flops_per_second,
            "dtype": self.dtype,
            "side": self.side,
            "seconds": self.seconds,
        }


def measure_matmul_rate(device: str, dtype: Any, seconds: float = RATE_SECONDS) -> MatmulRate:
    """Dense matmul throughput on the device in `dtype` (FLOP/s), timed after a warm-up."""
    on_cuda = device.startswith("cuda")
    side = GEMM_SIDE_CUDA if on_cuda else GEMM_SIDE_CPU
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    flops_each = 2.0 * side**3

    def sync() -> None:
        if on_cuda:
            cuda.synchronize(torch.device(device))

    for _ in range(3):
        torch.mm(a, b)
    sync()
    iters = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(10):
            torch.mm(a, b)
        iters += 10
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return MatmulRate(flops_each * iters / elapsed, str(dtype).removeprefix("torch."), side, elapsed)
