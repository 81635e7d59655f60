"""How `zmon tune` decides: warm-up detection, spread statistics, the noise rule and output comparison.

Pure functions over numbers (and, for outputs, tensors), so every rule is testable without a pipeline.

Warm-up (`WarmupRule`): a configuration is warm when, over its last `window` generations, (a) torch's
compile counters did not move (no dynamo frame compiled, no recompilation, no inductor or CUDA-graph
activity) and (b) their wall times lie within `settle_rel` of each other ((max − min) / min). At least
`window` generations run; at most `max_runs`, after which it is measured anyway and flagged "not settled".

Noise rule (`judge`): a variant is faster only when both hold —
  1. its median gain over the baseline exceeds the noise floor: the larger relative range of the two
     configurations' per-round medians (how far the same configuration drifts from round to round), at least
     MIN_NOISE_FLOOR;
  2. the interquartile ranges do not overlap (variant q3 < baseline q1).
Slower symmetrically; anything else is "no measurable gain".

Outputs: images in [0, 1] (output_type="pt") compared on the same prompts and seeds: max |Δ| and PSNR.
An exact variant passes when PSNR ≥ the dtype's tolerance (EXACT_PSNR_DB), see `output_tolerance_db`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from zmon.analysis.stats import percentile

Verdict = Literal["faster", "slower", "no measurable gain"]

MIN_NOISE_FLOOR: Final = 0.005  # 0.5 %: below this no timing difference is claimed, however quiet the host
# PSNR (dB) an exact variant's decoded images must reach against the baseline's, by the pipeline's dtype.
# float32: 60 dB = RMS difference 0.1 % of full scale (measured on CPU: compile and channels_last differ by
# ~1e-6 max |Δ|, > 130 dB). bf16/fp16: 30 dB = RMS 3 % of full scale, set between the rounding differences of
# other kernel orders and fusions (expected far above it) and a wrong result such as an ignored attention
# mask or a broken kernel (expected near 10–20 dB); the full-size bf16 figures come from gpu_tune.py.
EXACT_PSNR_DB: Final[dict[str, float]] = {"float32": 60.0, "float64": 80.0, "bfloat16": 30.0, "float16": 30.0}


def output_tolerance_db(dtype: str) -> float:
    """The PSNR an exact variant must reach for pipelines of this dtype ('bfloat16', 'float32', ...)."""
    return EXACT_PSNR_DB.get(dtype.removeprefix("torch."), 30.0)


# ------------------------------------------------------------------------------------------------ spread


@dataclass(frozen=True)
class Spread:
    """A latency sample: median, quartiles, extremes, n; seconds."""

    n: int
    p50: float
    q1: float
    q3: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "p50": self.p50, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max}


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    return Spread(
        n=len(values),
        p50=percentile(values, 50) or 0.0,
        q1=percentile(values, 25) or 0.0,
        q3=percentile(values, 75) or 0.0,
        min=min(values),
        max=max(values),
    )


def noise_floor(round_medians: Sequence[float], p50: float) -> float:
    """Relative range of a configuration's per-round medians (its drift between rounds), ≥ MIN_NOISE_FLOOR."""
    if len(round_medians) < 2 or p50 <= 0:
        return MIN_NOISE_FLOOR
    return max(MIN_NOISE_FLOOR, (max(round_medians) - min(round_medians)) / p50)


def judge(baseline: Spread, variant: Spread, floor: float) -> tuple[Verdict, float]:
    """(verdict, gain) with gain = (baseline p50 − variant p50) / baseline p50 (positive = faster)."""
    gain = (baseline.p50 - variant.p50) / baseline.p50 if baseline.p50 > 0 else 0.0
    if gain > floor and variant.q3 < baseline.q1:
        return "faster", gain
    if -gain > floor and variant.q1 > baseline.q3:
        return "slower", gain
    return "no measurable gain", gain


# ------------------------------------------------------------------------------------------------ warm-up


@dataclass(frozen=True)
class WarmupRule:
    window: int = 3  # k: generations that must be quiet and steady
    settle_rel: float = 0.05  # (max − min) / min of their wall times
    max_runs: int = 12  # stop warming up after this many generations (then flagged not settled)


@dataclass(frozen=True)
class WarmupResult:
    runs: int
    seconds: float  # wall time of all warm-up generations (compile and autotuning included)
    settled: bool
    compile_events: int  # how far the compile counters moved during warm-up
    walls: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "seconds": self.seconds,
            "settled": self.settled,
            "compile_events": self.compile_events,
            "walls": list(self.walls),
        }


def warm_up(run_once: Callable[[], float], counter: Callable[[], int], rule: WarmupRule) -> WarmupResult:
    """Run generations until the configuration is warm (see the module docstring); returns what it took.

    `run_once` runs one generation and returns its wall seconds (exceptions propagate to the caller);
    `counter` returns a number that grows with compile activity (`compile_counter`).
    """
    walls: list[float] = []
    counts = [counter()]
    window = max(1, rule.window)
    while len(walls) < max(rule.max_runs, window):
        walls.append(run_once())
        counts.append(counter())
        if len(walls) >= window:
            quiet = counts[-1] == counts[-1 - window]
            last = walls[-window:]
            steady = min(last) > 0 and (max(last) - min(last)) / min(last) <= rule.settle_rel
            if quiet and steady:
                return WarmupResult(len(walls), sum(walls), True, counts[-1] - counts[0], tuple(walls))
    return WarmupResult(len(walls), sum(walls), False, counts[-1] - counts[0], tuple(walls))


def compile_counter() -> int:
    """Sum of torch._dynamo's counters (frames compiled, recompiles, graph breaks, inductor and CUDA-graph
    events): it moves whenever something compiles or recaptures, and stands still in steady state."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0
    total = 0
    for group in list(counters.values()):
        for value in list(group.values()):
            if isinstance(value, (int, float)):
                total += int(value)
    return total


# ------------------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class OutputDiff:
    """How a variant's decoded images differ from the baseline's on the same prompts and seeds (range 0..1)."""

    max_abs: float
    psnr_db: float | None  # None when identical (infinite PSNR)
    finite: bool
    shape_match: bool = True

    @property
    def identical(self) -> bool:
        return self.shape_match and self.finite and self.max_abs == 0.0

    def to_dict(self) -> dict[str, Any]:
        max_abs = self.max_abs if math.isfinite(self.max_abs) else None  # JSON has no NaN
        return {
            "max_abs": max_abs,
            "psnr_db": self.psnr_db,
            "identical": self.identical,
            "finite": self.finite,
            "shape_match": self.shape_match,
        }


def compare_outputs(reference: Sequence[Any], candidate: Sequence[Any]) -> OutputDiff:
    """Max |Δ| and PSNR over all images (tensors in [0, 1]) of the check generations, in float64."""
    import torch

    if len(reference) != len(candidate) or any(
        tuple(r.shape) != tuple(c.shape) for r, c in zip(reference, candidate, strict=True)
    ):
        return OutputDiff(max_abs=float("nan"), psnr_db=None, finite=False, shape_match=False)
    ref = torch.cat([r.detach().double().cpu().flatten() for r in reference])
    out = torch.cat([c.detach().double().cpu().flatten() for c in candidate])
    finite = bool(torch.isfinite(out).all())
    if not finite:
        return OutputDiff(max_abs=float("nan"), psnr_db=None, finite=False)
    diff = (out - ref).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    mse = float((diff * diff).mean()) if diff.numel() else 0.0
    psnr = None if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    return OutputDiff(max_abs=max_abs, psnr_db=psnr, finite=True)


def output_verdict(diff: OutputDiff, *, lossy: bool, min_psnr_db: float) -> str | None:
    """Why a variant's outputs are unacceptable, or None. Lossy variants are only held to finite output."""
    if not diff.shape_match:
        return "output shape differs from the baseline's"
    if not diff.finite:
        return "output has non-finite values (NaN/inf)"
    if lossy or diff.psnr_db is None:
        return None
    if diff.psnr_db < min_psnr_db:
        return (
            f"output differs from the baseline beyond the tolerance: PSNR {diff.psnr_db:.1f} dB < "
            f"{min_psnr_db:.0f} dB (max |Δ| {diff.max_abs:.3g})"
        )
    return None
