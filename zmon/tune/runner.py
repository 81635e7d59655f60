"""`zmon tune`: try each speed variant on the loaded pipeline, time it fairly, check its outputs, combine the winners.

Phases, on one loaded pipeline (the configured baseline):
  1. applicability: every requested variant's check; those that cannot apply here are listed with the reason.
  2. baseline warm-up (detected, see measure.py) and reference outputs: the check items' decoded images.
  3. each in-process variant alone: apply → warm up (compile and autotuning happen here, timed) → outputs
     compared with the reference (exact variants within the dtype's tolerance) → undo. A variant that raises,
     runs out of memory or cannot compile is rejected with the reason; the others go on. Afterwards the
     baseline's outputs are checked again: every undo must have restored the pipeline exactly.
  4. timing rounds: baseline and every accepted variant, in a fresh random order each round; per round and
     configuration one discarded generation after the switch, then `per_round` measured ones. Every timed
     generation is the same one: the workload's first item (prompt, resolution) with its seed, so all
     configurations do identical work and a compiled denoiser sees one shape (Z-Image pads the caption to a
     multiple of 32 tokens: another prompt length would recompile, ~90 s on the full-size model). The check
     generations are that item with seeds seed, seed+1, … . Medians, quartiles, extremes and the per-round
     medians (the noise floor) come from the rounds.
  5. greedy combination of the exact winners, largest gain first: each is kept only if it is measurably
     faster on top of the current best, both re-measured in interleaved rounds; one variant per group.
  6. fresh-process variants (allocator settings): a control process with the configured allocator, then one
     per variant, each warming up and measuring the same items; compared with the control.
  7. FLOPs of one baseline generation and the device's matmul rate → the compute floor.
Switching is reversible (compiled wrappers and quantized copies are cached and swapped, attention backends
set and restored, zmon's hooks registered around each block of generations), so variants are
interleaved without reloading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import torch

from zmon.analysis.stats import median, windowed_mean
from zmon.capture.environment import library_version
from zmon.capture.inputs import GpuResolver, gpu_points
from zmon.capture.profile import READY_TIMEOUT_SECONDS, Sampling, workload_spec
from zmon.capture.progress import Progress
from zmon.config import Config, deep_merge
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK
from zmon.instrumentation import anatomy
from zmon.instrumentation.prompt_cache import apply_prompt_cache
from zmon.instrumentation.records import GenerationRecord, StageTiming
from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing
from zmon.providers import cuda
from zmon.sampling import SampleHistory
from zmon.tune.flops import FlopCount, MatmulRate, count_flops, estimate_flops, measure_matmul_rate
from zmon.tune.measure import (
    OutputDiff,
    Spread,
    Verdict,
    WarmupResult,
    WarmupRule,
    compare_outputs,
    compile_counter,
    judge,
    noise_floor,
    output_tolerance_db,
    output_verdict,
    spread,
    warm_up,
)
from zmon.tune.variants import TuneContext, Variant, build_variant
from zmon.workload import options as opt
from zmon.workload.alloc_conf import ALLOC_CONF_ENV, NEW_ALLOC_CONF_ENV
from zmon.workload.runner import Workload

log = logging.getLogger(__name__)

STAGE_KEYS: Final = ("text_encode", "denoise", "vae_decode", "postprocess")
WORKER_STARTUP_SECONDS: Final = 30.0  # a fresh process: imports, building or loading the pipeline, CUDA init
DYNAMO_RECOMPILE_LIMIT: Final = 64  # variants share the denoiser's code object: 8 (torch's default) is too few
Status = Literal["baseline", "pending", "measured", "skipped", "rejected"]  # pending: applicable, not timed yet


@dataclass(frozen=True)
class TuneOptions:
    """How the tune measures. `runs` measured generations per configuration, split over `rounds`."""

    runs: int = 6
    rounds: int = 3
    warmup: WarmupRule = field(default_factory=WarmupRule)
    check_items: int = 2  # generations whose decoded images are compared with the baseline's
    min_psnr_db: float | None = None  # None: by the pipeline's dtype (measure.EXACT_PSNR_DB)
    allow_lossy: bool = False  # let lossy winners (fp8, fewer_steps) into the combination and the snippet
    combine: bool = True
    max_seconds: float | None = None  # wall budget for the whole tune; later phases are skipped when it runs out
    # Expected seconds of a compile warm-up before one was measured (budgeting only; 93 s for the full-size
    # Z-Image transformer on an H200). None: unknown until the first compiling variant has run.
    compile_seconds_hint: float | None = None
    compile_backend: str | None = None  # None: options.DEFAULT_COMPILE_BACKEND (inductor)
    factory: str | None = None  # "module:function" that builds the pipeline in fresh processes (default: load)
    seed: int = 0  # of the per-round shuffles
    flops: bool = True

    @property
    def per_round(self) -> int:
        return max(1, math.ceil(self.runs / max(1, self.rounds)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "rounds": self.rounds,
            "per_round": self.per_round,
            "warmup": {
                "window": self.warmup.window,
                "settle_rel": self.warmup.settle_rel,
                "max_runs": self.warmup.max_runs,
            },
            "check_items": self.check_items,
            "allow_lossy": self.allow_lossy,
            "combine": self.combine,
            "max_seconds": self.max_seconds,
            "compile_backend": self.compile_backend or opt.DEFAULT_COMPILE_BACKEND,
            "seed": self.seed,
        }


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Measurement:
    """Measured generations of one configuration: wall seconds, per-round medians, stage records."""

    walls: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    records: list[GenerationRecord] = field(default_factory=list)

    def add_round(self, walls: Sequence[float], records: Sequence[GenerationRecord]) -> None:
        self.walls.extend(walls)
        self.round_medians.append(median(walls) or 0.0)
        self.records.extend(records)

    @property
    def spread(self) -> Spread | None:
        return spread(self.walls)

    def stages(self) -> dict[str, float]:
        """Median seconds per stage over the measured records (denoise = all steps of a generation)."""
        ok = [r for r in self.records if r.status == "ok"]
        if not ok:
            return {}
        per = {
            "text_encode": [r.stage_seconds("text_encode") for r in ok],
            "denoise": [r.stage_seconds("denoise_step") for r in ok],
            "vae_decode": [r.stage_seconds("vae_decode") for r in ok],
            "postprocess": [r.stage_seconds("postprocess") for r in ok],
            "total": [r.total_seconds for r in ok],
        }
        return {k: median(v) or 0.0 for k, v in per.items()}

    def peaks(self) -> tuple[int | None, int | None]:
        alloc = [r.peak_allocated_bytes for r in self.records if r.peak_allocated_bytes is not None]
        reserved = [r.peak_reserved_bytes for r in self.records if r.peak_reserved_bytes is not None]
        return (max(alloc) if alloc else None, max(reserved) if reserved else None)

    def windows(self) -> list[tuple[float, float]]:
        return [(r.started_at, r.started_at + r.total_seconds) for r in self.records]

    def forwards(self) -> int | None:
        for r in self.records:
            if r.status == "ok" and r.extra.get("denoiser_forwards", "").isdigit():
                return int(r.extra["denoiser_forwards"])
        return None


@dataclass
class VariantResult:
    """One variant (or the baseline) as the report shows it."""

    name: str
    description: str
    status: Status
    lossy: bool = False
    fresh_process: bool = False
    group: str | None = None
    reason: str | None = None  # why skipped / rejected
    note: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    warmup: WarmupResult | None = None
    output: OutputDiff | None = None
    measurement: Measurement | None = None
    verdict: Verdict | None = None
    gain: float | None = None  # (baseline p50 − p50) / baseline p50
    compared_to: str = "baseline"
    gpu_util: float | None = None

    @property
    def stats(self) -> Spread | None:
        return None if self.measurement is None else self.measurement.spread


@dataclass
class CombinationStep:
    """One greedy step: `added` tried on top of `current`."""

    current: list[str]
    added: str
    kept: bool
    reason: str = ""
    verdict: Verdict | None = None
    gain: float | None = None
    current_stats: Spread | None = None
    candidate_stats: Spread | None = None


@dataclass
class TuneResult:
    """Everything `zmon tune` found; rendered by zmon.tune.report."""

    model_id: str
    pipeline_class: str
    device: str
    device_name: str | None
    dtype: str
    workload: dict[str, Any]
    options: TuneOptions
    baseline: VariantResult
    variants: list[VariantResult] = field(default_factory=list)
    noise_floor: float | None = None
    tolerance_db: float = 30.0
    combination: list[CombinationStep] = field(default_factory=list)
    best: list[str] = field(default_factory=list)  # variant names of the fastest proven configuration
    best_stats: Spread | None = None
    best_stages: dict[str, float] = field(default_factory=dict)
    best_settings: dict[str, Any] = field(default_factory=dict)  # config overrides it stands for
    flops: FlopCount | None = None
    rate: MatmulRate | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    elapsed_seconds: float = 0.0
    base_config: dict[str, Any] = field(default_factory=dict)  # the configuration as given (non-defaults)

    @property
    def measured(self) -> list[VariantResult]:
        return [v for v in self.variants if v.status == "measured"]

    @property
    def exit_code(self) -> int:
        """0 when the baseline and at least one variant were measured, else 1 (zmon.exitcodes)."""
        return EXIT_OK if self.baseline.status == "baseline" and self.measured else EXIT_FAILURE

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    def floor_seconds(self) -> tuple[float | None, float | None]:
        """(denoiser floor, whole-generation floor) in seconds at the measured matmul rate."""
        if self.rate is None or self.flops is None or self.rate.flops_per_second <= 0:
            return None, None
        f = self.flops
        den = None
        if f.denoiser_flops_per_forward and f.denoiser_forwards:
            den = f.denoiser_flops_per_forward * f.denoiser_forwards / self.rate.flops_per_second
        gen = f.generation_flops / self.rate.flops_per_second if f.generation_flops else None
        return den, gen


# ------------------------------------------------------------------------------------------------ bench


def failure_reason(e: BaseException) -> str:
    """One line saying why a variant failed: out of memory, cannot compile, or the exception."""
    text = str(e).strip().splitlines()
    first = (text[0] if text else "")[:300]
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of GPU memory: {first}"
    module = type(e).__module__ or ""
    if module.startswith(("torch._dynamo", "torch._inductor")):
        # BackendCompilerFailed's own message is "backend='inductor' raised:"; the cause says what failed
        cause = getattr(e, "inner_exception", None) or e.__cause__
        why = ""
        if cause is not None and cause is not e:
            lines = str(cause).strip().splitlines()
            why = f" {type(cause).__name__}: {(lines[0] if lines else '')[:300]}"
        return f"cannot compile: {type(e).__name__}: {first}{why}"
    return f"{type(e).__name__}: {first}"


class Bench:
    """Generations of the pipeline in its current state: the workload's first item (its arguments built by
    zmon.workload.runner.Workload, as `zmon run` and `zmon profile` build them) with the variants' call
    overrides. zmon's hooks (stage timing, the prompt cache in force) are registered around each block of
    generations, after the variants swapped their modules in, and removed before they are undone: the hook
    registry hooks the denoiser modules present when a hook registers.

    The pipeline is called here rather than through Workload.call, which turns every failure into a logged
    status for the run loop: the tune needs the exception itself to say why a variant was rejected.
    """

    def __init__(self, ctx: TuneContext, progress: Progress | None = None) -> None:
        self.ctx = ctx
        self.progress = progress or Progress(enabled=False)
        self.workload = Workload(ctx.pipe, ctx.spec)

    def kwargs(self, seed_offset: int = 0, output_type: str | None = None) -> dict[str, Any]:
        """The workload's first item with seed + seed_offset (seed 0 when the workload's is random)."""
        kw = self.workload.kwargs(0)
        base = self.ctx.spec.seed if self.ctx.spec.seed is not None else 0
        kw["generator"] = torch.Generator("cpu").manual_seed(base + seed_offset)
        kw.update(self.ctx.overrides)
        if output_type is not None:
            kw["output_type"] = output_type
        return kw

    def call(self) -> float:
        kw = self.kwargs()
        t0 = time.perf_counter()
        self.ctx.pipe(**kw)
        return time.perf_counter() - t0

    def item(self) -> dict[str, Any]:
        """What every timed generation is: prompt, resolution, steps, seed."""
        kw = self.kwargs()
        return {
            "prompt": kw["prompt"],
            "resolution": f"{kw['width']}x{kw['height']}",
            "steps": kw["num_inference_steps"],
            "seed": self.ctx.spec.seed if self.ctx.spec.seed is not None else 0,
        }

    @contextlib.contextmanager
    def instrumented(self, sink: list[GenerationRecord] | None = None) -> Iterator[None]:
        """The prompt cache in force and (with a sink) stage timing on the pipeline for the block."""
        cache = apply_prompt_cache(self.ctx.pipe, self.ctx.prompt_cache) if self.ctx.prompt_cache else None
        try:
            timing = (
                None if sink is None else apply_stage_timing(self.ctx.pipe, StageTimingConfig(on_record=sink.append))
            )
            try:
                yield
            finally:
                if timing is not None:
                    timing.remove()
        finally:
            if cache is not None:
                cache.remove()

    def warm(self, rule: WarmupRule, label: str) -> WarmupResult:
        self.progress.start(f"warm-up {label} (at most)", rule.max_runs)

        def once() -> float:
            wall = self.call()
            self.progress.advance(wall)
            return wall

        sink: list[GenerationRecord] = []
        with self.instrumented(sink):
            result = warm_up(once, compile_counter, rule)
        if self.progress.in_progress:
            self.progress.finish()
        return result

    def outputs(self, count: int) -> list[Any]:
        """Decoded images (tensors in [0, 1], on the CPU) of the timed item with seeds seed … seed+count−1."""
        out = []
        with self.instrumented():
            for k in range(count):
                images = self.ctx.pipe(**self.kwargs(k, output_type="pt")).images
                if not isinstance(images, torch.Tensor):
                    images = torch.stack([torch.as_tensor(x) for x in images])
                out.append(images.detach().float().cpu().clone())
        return out

    def block(self, per_round: int) -> tuple[list[float], list[GenerationRecord]]:
        """One discarded generation after the switch, then `per_round` measured ones."""
        sink: list[GenerationRecord] = []
        with self.instrumented(sink):
            self.progress.advance(self.call())
            first = len(sink)
            walls = []
            for _ in range(per_round):
                wall = self.call()
                walls.append(wall)
                self.progress.advance(wall)
        return walls, sink[first:]


def apply_all(ctx: TuneContext, variants: Sequence[Variant]) -> Callable[[], None]:
    """Apply variants in order; returns one undo (reverse order). A failed apply undoes the earlier ones."""
    undos: list[Callable[[], None]] = []

    def undo_all() -> None:
        while undos:
            undos.pop()()

    try:
        for v in variants:
            assert v.apply is not None, f"{v.name} needs a fresh process"
            undos.append(v.apply(ctx))
    except BaseException:
        undo_all()
        raise
    return undo_all


def _release_memory(ctx: TuneContext) -> None:
    """After a failure (out of the except block, so the failed call's frames are gone): free cached blocks."""
    if ctx.cuda:
        with contextlib.suppress(Exception):
            cuda.empty_cache(cuda.load_torch_cuda())


class Budget:
    """The wall-clock budget (--max-seconds); None = unlimited."""

    def __init__(self, max_seconds: float | None) -> None:
        self.start = time.monotonic()
        self.max_seconds = max_seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return math.inf if self.max_seconds is None else self.max_seconds - self.elapsed()

    def allows(self, seconds: float) -> bool:
        return seconds <= self.left()


# ------------------------------------------------------------------------------------------------ the tune


class FatalPipelineState(Exception):
    """An undo failed: the pipeline is no longer the baseline, so nothing further can be measured fairly."""


class Tuner:
    """Runs the phases of the module docstring; `run()` returns the TuneResult."""

    def __init__(
        self,
        pipe: Any,
        cfg: Config,
        variants: Sequence[str | Variant],
        options: TuneOptions,
        *,
        model_id: str | None = None,
        progress: Progress | None = None,
        sampling: Sampling | None = None,
        history: SampleHistory | None = None,
    ) -> None:
        """`sampling` (a Monitor without HTTP, built by the composition root) feeds `history` while the tune
        runs: each configuration's GPU utilization comes from the samples taken during its generations."""
        self.cfg = cfg
        self.options = options
        self.progress = progress or Progress(enabled=False)
        self.model_id = model_id or cfg.model.id
        spec = workload_spec(cfg, pipe, self.model_id)
        device = anatomy.pipeline_device(pipe)
        dtype = str(opt.pipe_dtype(pipe)).removeprefix("torch.")
        self.ctx = TuneContext(
            pipe=pipe,
            cfg=cfg,
            spec=spec,
            model_id=self.model_id,
            device=device,
            dtype=dtype,
            compile_backend=options.compile_backend or opt.DEFAULT_COMPILE_BACKEND,
        )
        self.bench = Bench(self.ctx, self.progress)
        self.variants = [build_variant(v) if isinstance(v, str) else v for v in variants]
        self.budget = Budget(options.max_seconds)
        self.tolerance_db = options.min_psnr_db or output_tolerance_db(dtype)
        self.gen_seconds: dict[str, float] = {}  # warm generation time per configuration key (budgeting)
        self.compile_seconds: float | None = None  # the longest compile warm-up seen (budgeting)
        self.rounds_run = options.rounds  # timing rounds actually run (fewer when the budget is short)
        self.applied_any = False  # some variant was applied in process (the baseline is re-checked after)
        self.fatal = False  # an undo failed: the in-process pipeline is no longer the baseline
        self.reference: list[Any] = []
        self.sampling = sampling
        self.history = history
        if cfg.workload.prompt_cache.enabled:
            # The configured prompt cache is part of the baseline, as in `zmon run` (where the instrumentation
            # applies it, not loading).
            self.ctx.prompt_cache = cfg.workload.prompt_cache

    # -- helpers ---------------------------------------------------------------------------------------

    def note(self, result: TuneResult, message: str) -> None:
        result.notes.append(message)
        self.progress.note(f"note: {message}")

    def _result_for(self, v: Variant) -> VariantResult:
        return VariantResult(
            name=v.name,
            description=v.description,
            status="pending",
            lossy=v.lossy,
            fresh_process=v.fresh_process,
            group=v.group,
            note=v.note,
            settings=v.settings(self.ctx),
            compared_to="baseline (fresh process)" if v.fresh_process else "baseline",
        )

    def _gpu_util(self, m: Measurement | None) -> float | None:
        """NVML utilization of the computing GPU over the measured generations (None off CUDA / unsampled)."""
        if m is None or self.history is None or not m.records:
            return None
        points, _ = gpu_points(self.history, self.ctx.device, GpuResolver())
        return windowed_mean([(p.timestamp, p.util_ratio) for p in points], m.windows())

    # -- phases ----------------------------------------------------------------------------------------

    def run(self) -> TuneResult:
        ctx = self.ctx
        result = TuneResult(
            model_id=self.model_id,
            pipeline_class=type(ctx.pipe).__name__,
            device=ctx.device,
            device_name=_device_name(ctx.device),
            dtype=ctx.dtype,
            workload={**_workload_dict(ctx.spec), "timed_generation": self.bench.item()},
            options=self.options,
            tolerance_db=self.tolerance_db,
            baseline=VariantResult(
                name="baseline", description="the configured pipeline, as loaded", status="baseline"
            ),
            versions=_versions(),
            base_config=self.cfg.model_dump(mode="json", exclude_defaults=True),
        )
        dynamo_config: Any = None
        limit_key = None
        with contextlib.suppress(Exception):
            import torch._dynamo.config as dynamo_config

            limit_key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        saved_limit = getattr(dynamo_config, limit_key) if limit_key else None
        if limit_key:
            setattr(dynamo_config, limit_key, max(int(saved_limit or 0), DYNAMO_RECOMPILE_LIMIT))
        sampling = self.sampling
        if sampling is not None:
            sampling.start()
        try:
            if sampling is not None and not sampling.wait_ready(READY_TIMEOUT_SECONDS):
                self.note(result, "not every sampled source had a sample before the first generation")
            self._run(result)
        finally:
            if sampling is not None:
                sampling.stop()
                if failures := sampling.sample_failures():
                    self.note(result, f"{failures} resource sample(s) failed")
            if limit_key:
                setattr(dynamo_config, limit_key, saved_limit)
            result.elapsed_seconds = self.budget.elapsed()
        for v in [result.baseline, *result.variants]:
            v.gpu_util = self._gpu_util(v.measurement)
        return result

    def _run(self, result: TuneResult) -> None:
        inproc, fresh = self._applicability(result)
        if not self._baseline(result):
            return
        accepted: list[Variant] = []
        try:
            for v in inproc:
                if self._try_alone(v, result, accepted, len(fresh)):
                    accepted.append(v)
            self._recheck_baseline(result)
            measured = self._rounds(result, accepted, len(fresh))
            self._judge(result, measured)
            if self.options.combine:
                self._combine(result, measured, len(fresh))
            else:
                self._set_best(result, [], result.baseline.measurement)
        except FatalPipelineState as e:
            self.fatal = True
            self.note(result, str(e))
            self._set_best(result, [], result.baseline.measurement)
        self._fresh(result, fresh)
        if self.options.flops and not self.fatal:
            self._compute_floor(result)
        for vr in result.variants:
            if vr.status == "pending":
                vr.status, vr.reason = "skipped", "not timed: the tune stopped early (see the notes)"

    def _applicability(self, result: TuneResult) -> tuple[list[Variant], list[Variant]]:
        inproc: list[Variant] = []
        fresh: list[Variant] = []
        for v in self.variants:
            vr = self._result_for(v)
            try:
                reason = v.check(self.ctx)
            except Exception as e:
                reason = f"its applicability check failed: {failure_reason(e)}"
            if reason:
                vr.status, vr.reason = "skipped", reason
            else:
                (fresh if v.fresh_process else inproc).append(v)
            result.variants.append(vr)
        for vr in result.variants:
            if vr.status == "skipped":
                self.progress.note(f"skip {vr.name}: {vr.reason}")
        return inproc, fresh

    def _baseline(self, result: TuneResult) -> bool:
        b = result.baseline
        try:
            b.warmup = self.bench.warm(self.options.warmup, "baseline")
            self.reference = self.bench.outputs(self.options.check_items)
        except Exception as e:
            b.status, b.reason = "rejected", f"the baseline itself fails: {failure_reason(e)}"
            self.note(result, b.reason)
            for v in result.variants:
                if v.status != "skipped":
                    v.status, v.reason = "skipped", "not run: the baseline fails"
            return False
        self.gen_seconds["baseline"] = median(b.warmup.walls[-self.options.warmup.window :]) or 0.0
        self._note_warmup("baseline", b.warmup)
        return True

    def _note_warmup(self, name: str, w: WarmupResult) -> None:
        state = "warm" if w.settled else "NOT settled"
        events = f", {w.compile_events} compile events" if w.compile_events else ""
        self.progress.note(f"{name}: {state} after {w.runs} generation(s), {w.seconds:.1f} s{events}")

    # Budgeting (--max-seconds): each phase starts only when it fits next to what the later phases need, so
    # early variants cannot starve the timing rounds. Estimates use the measured warm generation times.

    def _gen(self, key: str = "baseline") -> float:
        return self.gen_seconds.get(key, self.gen_seconds.get("baseline", 0.0))

    def _compile_estimate(self) -> float:
        return self.compile_seconds if self.compile_seconds is not None else (self.options.compile_seconds_hint or 0.0)

    def _estimate_warm(self, variants: Sequence[Variant], *, combined: bool = False) -> float:
        """Warm-up and output checks of a configuration, plus a compile: alone, when the variant compiles;
        in a combination (its compiled wrappers are cached), only when another part makes them retrace."""
        o = self.options
        guess = self._gen() * (o.warmup.window + 1 + o.check_items)
        compiles = any(v.compiles for v in variants)
        if compiles and (not combined or any(v.retraces for v in variants)):
            guess += self._compile_estimate()
        return guess

    def _rounds_cost(self, keys: Sequence[str], rounds: int) -> float:
        return sum(self._gen(k) for k in keys) * rounds * (1 + self.options.per_round)

    def _worker_estimate(self) -> float:
        o = self.options
        gens = o.warmup.window + 1 + o.check_items + o.rounds * (1 + o.per_round)
        return WORKER_STARTUP_SECONDS + self._gen() * gens

    def _later_reserve(self, n_fresh: int) -> float:
        """What the phases after the combination need: fresh processes (control + each) and the FLOP count."""
        fresh = (n_fresh + 1) * self._worker_estimate() if n_fresh else 0.0
        return fresh + (self._gen() * 2 + 1.0 if self.options.flops else 0.0)

    def _reserve(self, keys: Sequence[str], n_fresh: int) -> float:
        """Timing rounds over `keys`, one combination step, and the later phases."""
        o = self.options
        combine = self._gen() * (o.warmup.window + 1 + o.check_items) + self._rounds_cost(["baseline"] * 2, o.rounds)
        return self._rounds_cost(keys, o.rounds) + (combine if o.combine else 0.0) + self._later_reserve(n_fresh)

    def _try_alone(self, v: Variant, result: TuneResult, accepted: Sequence[Variant], n_fresh: int) -> bool:
        """Apply, warm up, compare outputs, undo. True when it may be timed."""
        vr = result.variant(v.name)
        assert vr is not None
        keys = ["baseline", *(a.name for a in accepted), v.name]
        if not self.budget.allows(self._estimate_warm([v]) + self._reserve(keys, n_fresh)):
            vr.status, vr.reason = "skipped", f"time budget: {self.budget.left():.0f} s left (--max-seconds)"
            self.progress.note(f"skip {v.name}: {vr.reason}")
            return False
        failure: str | None = None
        outputs: list[Any] = []
        undo: Callable[[], None] | None = None
        try:
            self.applied_any = True
            undo = apply_all(self.ctx, [v])
            vr.warmup = self.bench.warm(self.options.warmup, v.name)
            outputs = self.bench.outputs(self.options.check_items)
        except Exception as e:
            failure = failure_reason(e)
        finally:
            if undo is not None:
                try:
                    undo()
                except Exception as e:
                    vr.status, vr.reason = "rejected", f"its undo failed: {failure_reason(e)}"
                    raise FatalPipelineState(
                        f"undoing {v.name} failed ({failure_reason(e)}): the remaining phases were not run"
                    ) from e
        if failure is not None:
            vr.status, vr.reason = "rejected", failure
            self.progress.note(f"reject {v.name}: {failure}")
            _release_memory(self.ctx)
            return False
        assert vr.warmup is not None
        self._note_warmup(v.name, vr.warmup)
        if v.compiles:
            self.compile_seconds = max(self.compile_seconds or 0.0, vr.warmup.seconds)
        self.gen_seconds[v.name] = median(vr.warmup.walls[-self.options.warmup.window :]) or 0.0
        vr.output = compare_outputs(self.reference, outputs)
        bad = output_verdict(vr.output, lossy=v.lossy, min_psnr_db=self.tolerance_db)
        if bad:
            vr.status, vr.reason = "rejected", bad
            self.progress.note(f"reject {v.name}: {bad}")
            return False
        return True

    def _recheck_baseline(self, result: TuneResult) -> None:
        """Every variant was undone: the baseline must reproduce its reference images."""
        if not self.reference or not self.applied_any:
            return
        try:
            again = compare_outputs(self.reference, self.bench.outputs(self.options.check_items))
        except Exception as e:
            raise FatalPipelineState(f"the baseline fails after the variants were undone: {failure_reason(e)}") from e
        if not again.identical:
            psnr = "n/a" if again.psnr_db is None else f"{again.psnr_db:.1f} dB"
            self.note(
                result,
                f"after undoing the variants the baseline's images differ from its first run "
                f"(max |Δ| {again.max_abs:.3g}, PSNR {psnr}): the device is not bit-deterministic "
                "or an undo is incomplete",
            )

    def _run_rounds(
        self, configs: Sequence[tuple[str, Sequence[Variant]]], rounds: int, label: str
    ) -> tuple[dict[str, Measurement], dict[str, str]]:
        """Interleaved rounds over configurations (key, variants); returns measurements and failures."""
        rng = random.Random(self.options.seed)
        measured = {key: Measurement() for key, _ in configs}
        failed: dict[str, str] = {}
        per = self.options.per_round
        for r in range(rounds):
            if r > 0 and not self.budget.allows(self._rounds_cost([k for k, _ in configs], 1)):
                self.progress.note(f"{label}: stopped after {r} round(s): time budget (--max-seconds)")
                break
            order = [c for c in configs if c[0] not in failed]
            rng.shuffle(order)
            self.progress.start(f"{label} {r + 1}/{rounds}", len(order) * (1 + per))
            for key, variants in order:
                undo: Callable[[], None] | None = None
                try:
                    undo = apply_all(self.ctx, variants)
                    walls, records = self.bench.block(per)
                    measured[key].add_round(walls, records)
                except Exception as e:
                    failed[key] = f"failed in round {r + 1}: {failure_reason(e)}"
                    self.progress.advance(None)
                finally:
                    if undo is not None:
                        try:
                            undo()
                        except Exception as e:
                            raise FatalPipelineState(f"undoing {key} failed: {failure_reason(e)}") from e
                if key in failed:
                    _release_memory(self.ctx)
            _finish(self.progress)
        return measured, failed

    def _rounds(self, result: TuneResult, accepted: Sequence[Variant], n_fresh: int) -> dict[str, Measurement]:
        configs: list[tuple[str, Sequence[Variant]]] = [("baseline", ())] + [(v.name, [v]) for v in accepted]
        keys = [k for k, _ in configs]
        rounds = self.options.rounds
        while rounds > 1 and not self.budget.allows(self._rounds_cost(keys, rounds) + self._later_reserve(n_fresh)):
            rounds -= 1
        if rounds < self.options.rounds:
            self.note(result, f"time budget: {rounds} timing round(s) instead of {self.options.rounds}")
        self.rounds_run = rounds
        measured, failed = self._run_rounds(configs, rounds, "round")
        result.baseline.measurement = measured["baseline"]
        if "baseline" in failed:
            raise FatalPipelineState(f"the baseline {failed['baseline']}")
        for v in accepted:
            vr = result.variant(v.name)
            assert vr is not None
            vr.measurement = measured[v.name]
            if v.name in failed:
                vr.status, vr.reason = "rejected", failed[v.name]
            elif measured[v.name].walls:
                vr.status = "measured"
        return measured

    def _judge(self, result: TuneResult, measured: dict[str, Measurement]) -> None:
        base = measured["baseline"]
        b = base.spread
        if b is None:
            raise FatalPipelineState("the baseline produced no measurement")
        result.noise_floor = noise_floor(base.round_medians, b.p50)
        for vr in result.variants:
            if vr.status != "measured" or vr.fresh_process:
                continue
            s = vr.stats
            if s is None:
                vr.status, vr.reason = "rejected", "no measured generation"
                continue
            # Either configuration's drift between rounds bounds what can be told apart.
            m = measured[vr.name]
            vr.verdict, vr.gain = judge(b, s, max(result.noise_floor, noise_floor(m.round_medians, s.p50)))

    def _set_best(self, result: TuneResult, names: list[str], m: Measurement | None) -> None:
        result.best = names
        result.best_stats = None if m is None else m.spread
        result.best_stages = {} if m is None else m.stages()
        settings: dict[str, Any] = {}
        for n in names:
            vr = result.variant(n)
            if vr is not None:
                settings = deep_merge(settings, vr.settings)
        result.best_settings = settings

    def _combine(self, result: TuneResult, measured: dict[str, Measurement], n_fresh: int) -> None:
        by_name = {v.name: v for v in self.variants}
        winners = sorted(
            (
                vr
                for vr in result.variants
                if vr.status == "measured"
                and not vr.fresh_process
                and vr.verdict == "faster"
                and (self.options.allow_lossy or not vr.lossy)
            ),
            key=lambda vr: -(vr.gain or 0.0),
        )
        if not winners:
            self._set_best(result, [], measured["baseline"])
            return
        current = [winners[0].name]
        current_m = measured[winners[0].name]
        floor = result.noise_floor or 0.0
        for vr in winners[1:]:
            v = by_name[vr.name]
            step = CombinationStep(current=list(current), added=v.name, kept=False)
            result.combination.append(step)
            clash = next((c for c in current if v.group and by_name[c].group == v.group), None)
            if clash:
                step.reason = f"same group as {clash} ({v.group}): one of them at a time"
                continue
            cand = [*current, v.name]
            cand_key = "+".join(cand)
            cur_key = "+".join(current)
            self.gen_seconds.setdefault(cur_key, self.gen_seconds.get(current[-1], 0.0))
            self.gen_seconds.setdefault(cand_key, self.gen_seconds.get(cur_key, 0.0))
            variants = [by_name[n] for n in cand]
            cost = (
                self._estimate_warm(variants, combined=True)
                + self._rounds_cost([cur_key, cand_key], self.rounds_run)
                + self._later_reserve(n_fresh)
            )
            if not self.budget.allows(cost):
                step.reason = f"time budget: {self.budget.left():.0f} s left"
                continue
            undo: Callable[[], None] | None = None
            outputs: list[Any] = []
            failure: str | None = None
            try:
                undo = apply_all(self.ctx, variants)
                warm = self.bench.warm(self.options.warmup, cand_key)
                outputs = self.bench.outputs(self.options.check_items)
            except Exception as e:
                failure = failure_reason(e)
            finally:
                if undo is not None:
                    try:
                        undo()
                    except Exception as e:
                        raise FatalPipelineState(f"undoing {cand_key} failed: {failure_reason(e)}") from e
            if failure:
                step.reason = f"the combination fails: {failure}"
                _release_memory(self.ctx)
                continue
            self.gen_seconds[cand_key] = median(warm.walls[-self.options.warmup.window :]) or 0.0
            diff = compare_outputs(self.reference, outputs)
            lossy = any(by_name[n].lossy for n in cand)
            bad = output_verdict(diff, lossy=lossy, min_psnr_db=self.tolerance_db)
            if bad:
                step.reason = f"the combination's {bad}"
                continue
            configs = [(cur_key, [by_name[n] for n in current]), (cand_key, variants)]
            ms, failed = self._run_rounds(configs, self.rounds_run, "combine")
            if failed:
                step.reason = "; ".join(f"{k} {r}" for k, r in failed.items())
                continue
            cs, ns = ms[cur_key].spread, ms[cand_key].spread
            if cs is None or ns is None:
                step.reason = "not measured"
                continue
            f = max(
                floor,
                noise_floor(ms[cur_key].round_medians, cs.p50),
                noise_floor(ms[cand_key].round_medians, ns.p50),
            )
            step.verdict, step.gain = judge(cs, ns, f)
            step.current_stats, step.candidate_stats = cs, ns
            if step.verdict == "faster":
                step.kept = True
                current, current_m = cand, ms[cand_key]
            else:
                step.reason = f"{step.verdict} on top of {cur_key}"
                current_m = ms[cur_key]  # the fresher measurement of the current best
        self._set_best(result, current, current_m)

    # -- fresh processes ---------------------------------------------------------------------------------

    def _fresh(self, result: TuneResult, fresh: Sequence[Variant]) -> None:
        if not fresh:
            return
        control: WorkerResult | None = None
        per_worker = self._worker_estimate()
        for v in fresh:
            vr = result.variant(v.name)
            assert vr is not None
            needed = per_worker * (2 if control is None else 1)
            if not self.budget.allows(needed):
                vr.status, vr.reason = "skipped", f"time budget: {self.budget.left():.0f} s left (--max-seconds)"
                continue
            if control is None:
                self.progress.note("fresh process: control (configured allocator)")
                control = run_worker(
                    self.cfg, {}, self.options, self.model_id, label="control", timeout=self.budget.left()
                )
                if control.error:
                    self.note(result, f"fresh-process control failed: {control.error}")
            if control.error or control.measurement.spread is None:
                vr.status, vr.reason = "skipped", "the fresh-process control failed"
                continue
            self.progress.note(f"fresh process: {v.name}")
            env = v.env(self.ctx) if v.env else {}
            cfg = self.cfg.model_copy(
                update={
                    "model": self.cfg.model.model_copy(
                        update={"alloc_conf": env.get(ALLOC_CONF_ENV, self.cfg.model.alloc_conf)}
                    )
                }
            )
            w = run_worker(cfg, env, self.options, self.model_id, label=v.name, timeout=self.budget.left())
            if w.error:
                vr.status, vr.reason = ("skipped" if w.timed_out else "rejected"), w.error
                continue
            vr.warmup, vr.measurement, vr.status = w.warmup, w.measurement, "measured"
            vr.output = compare_outputs(self.reference, w.outputs) if w.outputs else None
            bad = output_verdict(vr.output, lossy=v.lossy, min_psnr_db=self.tolerance_db) if vr.output else None
            if bad:
                vr.status, vr.reason = "rejected", bad
                continue
            cs, vs = control.measurement.spread, w.measurement.spread
            if vs is None:
                vr.status, vr.reason = "rejected", "no measured generation"
                continue
            floor = max(
                result.noise_floor or 0.0,
                noise_floor(control.measurement.round_medians, cs.p50),
                noise_floor(w.measurement.round_medians, vs.p50),
            )
            vr.verdict, vr.gain = judge(cs, vs, floor)
            vr.note = (vr.note + " " if vr.note else "") + (
                f"ran in a fresh process with {ALLOC_CONF_ENV}={w.alloc_conf or '(unset)'}, compared with a "
                f"fresh-process control ({ALLOC_CONF_ENV}={control.alloc_conf or '(unset)'}, p50 "
                f"{cs.p50:.4f} s, n={cs.n}); measured alone, not in combination with the in-process winners"
            )
            if vr.verdict == "faster" and (self.options.allow_lossy or not v.lossy):
                result.best.append(v.name)
                result.best_settings = deep_merge(result.best_settings, vr.settings)

    # -- compute floor ---------------------------------------------------------------------------------

    def _compute_floor(self, result: TuneResult) -> None:
        ctx = self.ctx
        if not self.budget.allows(self._gen() * 2 + 1.0):
            self.note(result, "compute floor not measured: time budget")
            return
        base = result.baseline.measurement
        forwards = base.forwards() if base else None
        try:
            with torch.no_grad():
                result.flops = count_flops(ctx.pipe, self.bench.call, forwards)
            if result.flops.method == "failed" or not result.flops.denoiser_flops_per_forward:
                w, h = ctx.spec.resolutions[0]
                result.flops = estimate_flops(ctx.pipe, w, h, text_tokens=0, forwards=forwards)
            result.rate = measure_matmul_rate(ctx.device, opt.pipe_dtype(ctx.pipe))
        except Exception as e:
            self.note(result, f"compute floor not measured: {failure_reason(e)}")


# ------------------------------------------------------------------------------------------------ workers


@dataclass
class WorkerResult:
    measurement: Measurement = field(default_factory=Measurement)
    warmup: WarmupResult | None = None
    outputs: list[Any] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    alloc_conf: str = ""  # the allocator setting the process actually ran with
    timed_out: bool = False  # killed at the end of the time budget


def run_worker(
    cfg: Config,
    env_extra: dict[str, str],
    options: TuneOptions,
    model_id: str,
    *,
    label: str,
    timeout: float = math.inf,
) -> WorkerResult:
    """Run zmon.tune.worker in a fresh Python process with `env_extra` set before torch starts; it builds the
    pipeline (options.factory, else load from cfg), applies cfg's model options, warms up, measures
    options.rounds × per_round generations of the same timed item as the tune and returns the check outputs."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zmon-tune-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "result.json"
        outputs_path = Path(tmp) / "outputs.pt"
        spec_path.write_text(
            json.dumps(
                {
                    "config": cfg.model_dump(mode="json"),
                    "model_id": model_id,
                    "factory": options.factory,
                    "options": options.to_dict(),
                    "threads": torch.get_num_threads(),
                    "result": str(result_path),
                    "outputs": str(outputs_path),
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in (ALLOC_CONF_ENV, NEW_ALLOC_CONF_ENV)}
        if cfg.model.alloc_conf:
            env[ALLOC_CONF_ENV] = cfg.model.alloc_conf
        env.update(env_extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).exists())
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "zmon.tune.worker", str(spec_path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=None if math.isinf(timeout) else max(timeout, 1.0),
            )
        except subprocess.TimeoutExpired:
            return WorkerResult(
                error=f"time budget: the fresh process ({label}) was stopped after {timeout:.0f} s",
                seconds=time.monotonic() - t0,
                timed_out=True,
            )
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return WorkerResult(
                error=f"fresh process ({label}) exited {proc.returncode}: {' | '.join(tail)[:400]}",
                seconds=time.monotonic() - t0,
            )
        data = json.loads(result_path.read_text())
        if data.get("error"):
            return WorkerResult(error=str(data["error"]), seconds=time.monotonic() - t0)
        m = Measurement(walls=list(data["walls"]), round_medians=list(data["round_medians"]))
        for r in data.get("records", []):
            stages = tuple(StageTiming(**s) for s in r.pop("stages"))
            m.records.append(GenerationRecord(stages=stages, **r))
        outputs = list(torch.load(outputs_path)) if outputs_path.exists() else []
        w = data.get("warmup")
        warm = None
        if w:
            warm = WarmupResult(w["runs"], w["seconds"], w["settled"], w["compile_events"], tuple(w["walls"]))
        return WorkerResult(m, warm, outputs, None, time.monotonic() - t0, str(data.get("alloc_conf") or ""))


# ------------------------------------------------------------------------------------------------ helpers


def _finish(progress: Progress) -> None:
    """End a bar whose phase stopped short (a failed configuration skips its remaining generations)."""
    if progress.in_progress:
        progress.finish()


def _device_name(device: str) -> str | None:
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):
            return cuda.device_name(torch.device(device))
    return platform.processor() or platform.machine() or None


def _versions() -> dict[str, str | None]:
    out = {pkg: library_version(pkg) for pkg in ("torch", "diffusers", "transformers", "torchao")}
    out["python"] = platform.python_version()
    return out


def _workload_dict(spec: Any) -> dict[str, Any]:
    return {
        "resolutions": [f"{w}x{h}" for w, h in spec.resolutions],
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "prompts": len(spec.prompts),
        "distilled": spec.distilled,
    }


def tune_pipeline(
    pipe: Any,
    cfg: Config,
    variants: Sequence[str | Variant],
    options: TuneOptions | None = None,
    *,
    model_id: str | None = None,
    progress: Progress | None = None,
    sampling: Sampling | None = None,
    history: SampleHistory | None = None,
) -> TuneResult:
    """Tune an already loaded (configured) pipeline; see the module docstring. The pipeline is left as it was
    given (every variant is undone), except for compiled code caches. `sampling` feeds `history` meanwhile
    (GPU utilization per configuration); without them nothing is sampled."""
    tuner = Tuner(
        pipe,
        cfg,
        variants,
        options or TuneOptions(),
        model_id=model_id,
        progress=progress,
        sampling=sampling,
        history=history,
    )
    return tuner.run()
