"""The diagnosis as code: the article's flowchart and a table of bottleneck rules over ProfileFacts."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from zmon.analysis.facts import DENOISE, WHOLE_GENERATION, ProfileFacts, from_jsonable, to_jsonable
from zmon.config import CACHE_RULE, Thresholds
from zmon.rules import compare

__all__ = [
    "FLOWCHART",
    "PRIORITY",
    "RULES",
    "Diagnosis",
    "Evidence",
    "Finding",
    "FlowStep",
    "Thresholds",
    "Verdict",
    "diagnose",
    "format_value",
]

Verdict = Literal["network_bound", "cpu_bound", "memory_bound", "kernel_issue", "io_or_caching", "optimized"]
Level = Literal["high", "medium", "low"]
Comparison = Literal["<", "<=", ">", ">=", "info"]
Answer = Literal["yes", "no", "not_measured"]
Unit = Literal["ratio", "cv", "s", "B", "B/s", "x", "cores", "count", "flag", "steps", "scale"]

# The article's priority matrix, completed for the combinations it leaves out: 1 = do first, 4 = do last.
PRIORITY: Mapping[tuple[Level, Level], int] = {
    ("high", "low"): 1,
    ("high", "medium"): 2,
    ("medium", "low"): 2,
    ("high", "high"): 3,
    ("medium", "medium"): 3,
    ("medium", "high"): 3,
    ("low", "low"): 3,
    ("low", "medium"): 4,
    ("low", "high"): 4,
}

# Substrings of model ids known to be distilled (few steps, no classifier-free guidance).
DISTILLED_MARKERS = ("turbo", "distill", "lightning", "schnell", "lcm", "builtin:tiny-z-image")
# Model-card step counts of known distilled models (substring of the lower-cased model id → steps).
RECOMMENDED_STEPS: tuple[tuple[str, int], ...] = (("z-image-turbo", 9), ("builtin:tiny-z-image", 9))

_SYMBOL = {"<": "<", "<=": "≤", ">": ">", ">=": "≥"}
_NEGATED = {"<": "≥", "<=": ">", ">": "≤", ">=": "<"}  # shown when the comparison does not hold


# ------------------------------------------------------------------------------------------------ formatting


def format_value(value: float | None, unit: str) -> str:
    """A figure as a person reads it: 41%, 1.23 s, 180 MB/s, 3.2×, 32.7 GB."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "not measured"
    if unit == "ratio":
        return f"{value:.0%}" if abs(value) >= 0.1 else f"{value:.1%}"
    if unit == "s":
        return f"{value:.3f} s" if abs(value) < 10 else f"{value:.1f} s"
    if unit == "B":
        return _si(value, "B")
    if unit == "B/s":
        return _si(value, "B/s")
    if unit == "x":
        return f"{value:.2f}×"
    if unit == "cores":
        return f"{value:.2f} cores"
    if unit in ("count", "steps"):
        return f"{value:.0f}"
    if unit == "flag":
        return "yes" if value else "no"
    return f"{value:.2f}"


def _si(value: float, suffix: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {prefix}{suffix}"
    return f"{value:.0f} {suffix}"


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Evidence:
    """One figure compared with its threshold; `holds` is None when the figure was not measured."""

    figure: str  # what was measured, in words
    value: float | None
    threshold: float | None
    comparison: Comparison  # how value is compared with threshold for the rule to fire; "info" = context
    unit: Unit
    holds: bool | None
    name: str | None = None  # the figure's name in zmon.rules.FIGURES, when it has one

    def describe(self) -> str:
        if self.value is None:
            return f"{self.figure}: not measured"
        value = format_value(self.value, self.unit)
        if self.comparison == "info" or self.threshold is None:
            return f"{self.figure}: {value}"
        op = _SYMBOL[self.comparison] if self.holds else _NEGATED[self.comparison]
        return f"{self.figure} {value} {op} {format_value(self.threshold, self.unit)}"


def check(
    figure: str,
    value: float | None,
    comparison: Comparison,
    threshold: float | None,
    unit: Unit,
    *,
    name: str | None = None,
) -> Evidence:
    """Evidence with `holds` computed by the shared comparator (None when the value is missing or the
    record is informational)."""
    holds = None if comparison == "info" else compare(value, comparison, threshold)
    return Evidence(figure, value, threshold, comparison, unit, holds, name)


def measure(t: Thresholds, key: str, label: str, value: float | None, unit: Unit, *, judge: bool = True) -> Evidence:
    """Evidence for threshold `key` of `profiling.thresholds` (its figure and operator come with it).

    `judge=False` shows the figure next to its threshold without judging it (not enough to go on)."""
    figure, op, threshold = t.condition(key)
    comparison: Comparison = op if judge and op in _SYMBOL else "info"  # type: ignore[assignment]
    return check(label, value, comparison, threshold, unit, name=figure)


def info(figure: str, value: float | None, unit: Unit) -> Evidence:
    return Evidence(figure, value, None, "info", unit, None)


@dataclass(frozen=True)
class FlowStep:
    """One question of the flowchart as it was answered."""

    verdict: Verdict  # the verdict a "yes" here gives
    question: str
    answer: Answer
    basis: str  # what decided the answer, in words
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class Finding:
    """One bottleneck or misconfiguration: whether it is present, why, what to do, and how urgently."""

    kind: str
    title: str
    category: Literal["bottleneck", "misconfiguration"]
    active: bool
    impact: Level
    effort: Level
    priority: int  # 1 = do first … 4 = do last (the priority matrix)
    summary: str
    fix: str | None  # tailored to the figures; None when inactive
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class Diagnosis:
    """The flowchart verdict with its steps, and every finding (active first, by priority)."""

    verdict: Verdict
    summary: str  # the verdict with the figure that decided it
    action: str  # the flowchart's remedy for the verdict
    steps: tuple[FlowStep, ...]  # the questions asked, up to the one that gave the verdict
    findings: tuple[Finding, ...]
    thresholds: dict[str, float]

    @property
    def active_findings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.active)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Diagnosis:
        return from_jsonable(cls, data)


# ---------------------------------------------------------------------------------------------- shared reads


def _gpu_util_diffusion(f: ProfileFacts) -> tuple[float | None, str]:
    """GPU utilization during the denoise steps, else over whole generations; with the figure's name."""
    by_stage = f.utilization.gpu_by_stage
    if DENOISE in by_stage:
        return by_stage[DENOISE], "GPU utilization during diffusion"
    return by_stage.get(WHOLE_GENERATION), "GPU utilization during generation"


def _text_encoder_device(f: ProfileFacts) -> str:
    return f.environment.text_encoder_device or f.environment.device


def _is_distilled(f: ProfileFacts) -> bool | None:
    env = f.environment
    if env.distilled is not None:
        return env.distilled
    if env.model_id is None:
        return None
    model = env.model_id.lower()
    return any(m in model for m in DISTILLED_MARKERS)


def _recommended_steps(f: ProfileFacts) -> int | None:
    model = (f.environment.model_id or "").lower()
    return next((steps for marker, steps in RECOMMENDED_STEPS if marker in model), None)


def _expandable(f: ProfileFacts) -> bool:
    return "expandable_segments:true" in (f.environment.alloc_conf or "").replace(" ", "").lower()


def _cpu_side_evidence(f: ProfileFacts, t: Thresholds) -> tuple[Evidence, Evidence]:
    return (
        measure(t, "text_encode_share_high", "text encoding share", f.stages.share("text_encode"), "ratio"),
        measure(t, "postprocess_share_high", "output processing share", f.stages.share("postprocess"), "ratio"),
    )


# ------------------------------------------------------------------------------------------------ flowchart


@dataclass(frozen=True)
class FlowRule:
    verdict: Verdict
    question: str
    action: str
    answer: Callable[[ProfileFacts, Thresholds], tuple[Answer, str, tuple[Evidence, ...]]]
    # Asked only where this holds (None: always); a question that does not apply leaves no step behind.
    applies: Callable[[ProfileFacts], bool] | None = None


def _yes_no(evidence: Evidence) -> Answer:
    if evidence.holds is None:
        return "not_measured"
    return "yes" if evidence.holds else "no"


def _q_network(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    mg = f.multi_gpu
    assert mg is not None
    ev = measure(t, "nccl_share_high", "time in collectives", mg.nccl_time_share, "ratio")
    steps = info("collectives share of denoise steps", mg.step_communication_share, "ratio")
    gpus = info("GPUs", float(mg.gpu_count), "count")
    return _yes_no(ev), "time the generating stream waited in collectives", (ev, steps, gpus)


def _q_gpu_util(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    util, name = _gpu_util_diffusion(f)
    ev = measure(t, "gpu_util_low", name, util, "ratio")
    if ev.holds is not None:
        return _yes_no(ev), "NVML GPU utilization", (ev,)
    # No GPU utilization (CPU-only run, or no NVML): the CPU-side stages' shares decide instead.
    text, post = _cpu_side_evidence(f, t)
    cpu = info(
        "process CPU during text encoding", f.utilization.process_cpu_by_stage.get("text_encode"), "cores"
    )
    evidence = (ev, text, post, cpu)
    basis = f"stage shares on {_text_encoder_device(f)} (GPU utilization not measured)"
    if text.holds or post.holds:
        return "yes", basis, evidence
    return "not_measured", basis, evidence


def _q_vram(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    src = f.memory.vram_used_source or "unknown source"
    ev = measure(t, "vram_high", "peak VRAM in use / card", f.memory.vram_used_fraction, "ratio")
    return _yes_no(ev), f"peak memory in use ({src})", (ev,)


def _q_steps(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    ev = measure(t, "step_cv_high", "step-time CV within a generation", f.stages.step_cv, "cv")
    ratio = info("slowest / fastest step", f.stages.step_max_min_ratio, "x")
    return _yes_no(ev), "denoise step durations", (ev, ratio)


def _q_runs(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    b = f.baseline
    ev = measure(t, "run_cv_high", "run-to-run CV (same shape)", b.run_cv, "cv")
    n = info("baseline generations", float(b.generations), "count")
    shapes = info("distinct shapes", float(f.workload.distinct_shapes), "count")
    return _yes_no(ev), "generation times across runs", (ev, n, shapes)


FLOWCHART: tuple[FlowRule, ...] = (
    # Asked first, and only when the work spans several GPUs: a rank waiting for its peers keeps its GPU
    # "busy" (NCCL kernels spin), so the utilization question below cannot see it; the time in collectives can.
    FlowRule(
        "network_bound",
        "Do inter-GPU collectives take more than the threshold of the generation time?",
        "multi-GPU network bottleneck: keep the ranks on NVLink-connected GPUs, shard less (a smaller context-"
        "parallel degree, or data-parallel workers), overlap communication with compute",
        _q_network,
        applies=lambda f: f.multi_gpu is not None,
    ),
    FlowRule(
        "cpu_bound",
        "Is GPU utilization below the threshold during diffusion?",
        "CPU bottleneck: optimize data loading and prompt encoding",
        _q_gpu_util,
    ),
    FlowRule(
        "memory_bound",
        "Is VRAM use above the threshold of the card?",
        "memory bottleneck: quantize or offload (offloading trades VRAM for PCIe traffic)",
        _q_vram,
    ),
    FlowRule(
        "kernel_issue",
        "Are step times uneven within a generation?",
        "kernel / operator issue: capture a trace and check operator efficiency",
        _q_steps,
    ),
    FlowRule(
        "io_or_caching",
        "Is generation time inconsistent across runs?",
        "I/O or caching issue: optimize model loading and caching",
        _q_runs,
    ),
)
OPTIMIZED_ACTION = "no bottleneck found: the system is optimized; consider faster hardware"


# ------------------------------------------------------------------------------------------------ findings


@dataclass(frozen=True)
class Outcome:
    active: bool
    summary: str
    evidence: tuple[Evidence, ...]
    fix: str | None = None


@dataclass(frozen=True)
class FindingRule:
    """One row of the findings table: a bottleneck or misconfiguration with its place in the matrix."""

    kind: str
    title: str
    category: Literal["bottleneck", "misconfiguration"]
    impact: Level
    effort: Level
    evaluate: Callable[[ProfileFacts, Thresholds], Outcome]


def _cpu_bound(f: ProfileFacts, t: Thresholds) -> Outcome:
    util, util_name = _gpu_util_diffusion(f)
    cores = f.utilization.process_cpu_by_stage.get(DENOISE)
    text, post = _cpu_side_evidence(f, t)
    gpu_low = measure(t, "gpu_util_low", util_name, util, "ratio")
    cpu_busy = measure(t, "cpu_busy_high", "process CPU during diffusion", cores, "cores")
    host = info("host CPU during generation", f.utilization.host_cpu_by_stage.get(WHOLE_GENERATION), "ratio")
    evidence = (text, post, gpu_low, cpu_busy, host)
    launch_bound = bool(gpu_low.holds and cpu_busy.holds)
    if not (text.holds or post.holds or launch_bound):
        return Outcome(False, "no CPU-side stage dominates the generation", evidence)

    fixes = []
    device = _text_encoder_device(f)
    if text.holds and text.value is not None:
        hit = f.workload.prompt_cache_hit_ratio
        if hit is None:
            remedy = "enable the prompt-embedding cache (workload.prompt_cache.enabled: true)"
        else:
            remedy = f"the prompt cache hits only {hit:.0%} of prompts: encode prompts in batches"
        if not device.startswith("cuda"):
            remedy += " or move the encoder to the GPU"
        fixes.append(f"text encoding is {text.value:.0%} of the generation on {device}: {remedy}")
    if post.holds and post.value is not None:
        fixes.append(
            f"output processing is {post.value:.0%} of the generation: move PNG encoding off the critical "
            "path (a worker thread or process) or return tensors (output_type='pt')"
        )
    if launch_bound and util is not None and cores is not None:
        fixes.append(
            f"the GPU is {util:.0%} busy during diffusion while the process keeps {cores:.2f} cores busy: "
            "kernel launches are the limit; torch.compile the transformer (model.compile: true) or raise "
            "workload.batch_size"
        )
    return Outcome(True, "the CPU side holds the generation back", evidence, "; ".join(fixes))


def _gpu_underutilization(f: ProfileFacts, t: Thresholds) -> Outcome:
    util, name = _gpu_util_diffusion(f)
    low = measure(t, "gpu_util_low", name, util, "ratio")
    whole = info(
        "GPU utilization over whole generations", f.utilization.gpu_by_stage.get(WHOLE_GENERATION), "ratio"
    )
    batch = info(
        "batch size", None if f.workload.batch_size is None else float(f.workload.batch_size), "count"
    )
    evidence = (low, whole, batch)
    if low.holds is None:
        return Outcome(False, "GPU utilization not measured", evidence)
    if not low.holds:
        return Outcome(False, f"the GPU is {util:.0%} busy during diffusion", evidence)
    fixes = []
    if (f.workload.batch_size or 1) == 1:
        fixes.append("raise workload.batch_size to give each kernel more work")
    if f.environment.compiled is False:
        fixes.append("torch.compile the transformer (model.compile: true) to cut launch gaps")
    fixes.append("find the gaps in a trace (torch.profiler, or nsys profile --trace=cuda,nvtx,osrt)")
    return Outcome(
        True,
        f"the GPU idles {1 - (util or 0):.0%} of the diffusion time",
        evidence,
        f"GPU utilization {util:.0%} during diffusion: " + "; ".join(fixes),
    )


def _memory_fragmentation(f: ProfileFacts, t: Thresholds) -> Outcome:
    m = f.memory
    cached = check(
        "reserved-unallocated ratio",
        m.reserved_unallocated_ratio,
        ">",
        t.cache_ratio_high,
        "ratio",
        name="torch_reserved_unallocated_ratio",
    )
    frag = measure(t, "fragmentation_high", "fragmentation (inactive split / reserved)", m.fragmentation_ratio, "ratio")
    retries = check("allocator retries", _float(m.alloc_retries), ">", 0, "count")
    ooms = check("allocator OOMs", _float(m.ooms), ">", 0, "count")
    oom_runs = check("generations that ran out of memory", float(f.baseline.oom_generations), ">", 0, "count")
    trend = measure(t, "latency_trend_high", "late / early median latency", f.baseline.trend_ratio, "x")
    headroom = info("headroom (free + cached)", _float(m.headroom_bytes), "B")
    evidence = (cached, frag, retries, ooms, oom_runs, trend, headroom)
    if not any(e.holds for e in (cached, frag, retries, ooms, oom_runs)):
        if all(e.holds is None for e in (cached, frag, retries, ooms)):
            return Outcome(False, "allocator statistics not measured", evidence)
        return Outcome(False, "the allocator shows no fragmentation pressure", evidence)

    conf = f.environment.alloc_conf or ""
    fixes = []
    if cached.holds:
        lead = f"reserved-unallocated ratio {m.reserved_unallocated_ratio:.2f}"
    elif frag.holds:
        lead = f"fragmentation ratio {m.fragmentation_ratio:.2f}"
    elif retries.holds or ooms.holds:
        lead = f"{m.alloc_retries or 0} allocator retries and {m.ooms or 0} OOMs"
    else:
        lead = f"{f.baseline.oom_generations} generations ran out of memory"
    if m.headroom_bytes is not None and (ooms.holds or oom_runs.holds):
        lead += f" with {format_value(m.headroom_bytes, 'B')} of headroom"
    if "max_split_size_mb" in conf:
        fixes.append(
            "drop max_split_size_mb from PYTORCH_CUDA_ALLOC_CONF (never combine it with expandable_segments)"
        )
    if not _expandable(f):
        allocator = "the default allocator" if not conf else f"PYTORCH_CUDA_ALLOC_CONF={conf}"
        fixes.insert(0, f"{lead} with {allocator}: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    else:
        fixes.insert(0, f"{lead} under expandable_segments")
    fixes.append(
        "empty_cache only at safe points between generations (zmon policy), and pre-warm the largest shape"
    )
    if trend.holds:
        fixes.append(
            f"latency grew {f.baseline.trend_ratio:.2f}× over the run: compare before/after a cleared cache"
        )
    return Outcome(True, "the caching allocator is under pressure", evidence, "; ".join(fixes))


def _io_throttling(f: ProfileFacts, t: Thresholds) -> Outcome:
    io = f.io
    state = io.cache_state
    # A small checkpoint "reads" slowly because fixed costs (file opens, object construction) dominate: its
    # throughput says nothing about the disk, so it is shown but not judged.
    judged = bool(t.check("min_checkpoint_bytes", float(io.checkpoint_bytes or 0)))
    ckpt = measure(
        t,
        "read_throughput_low",
        f"checkpoint read throughput ({state} cache)"
        + ("" if judged else f", checkpoint under {format_value(t.min_checkpoint_bytes, 'B')}: not judged"),
        io.checkpoint_read_bytes_per_second,
        "B/s",
        judge=judged,
    )
    disk = measure(
        t, "read_throughput_low", "sequential disk read of the model directory", io.disk_read_bytes_per_second, "B/s"
    )
    load = measure(t, "checkpoint_load_high", "checkpoint load time", io.checkpoint_load_seconds, "s")
    compiled = bool(f.environment.compiled)
    # Under torch.compile the first generation includes compilation (~40 s on H100): not an I/O symptom.
    first = measure(
        t,
        "first_gen_slowdown_high",
        "first generation / steady-state median" + (" (includes torch.compile)" if compiled else ""),
        io.first_generation_slowdown,
        "x",
        judge=not compiled,
    )
    runs = measure(t, "run_cv_high", "run-to-run CV (same shape)", f.baseline.run_cv, "cv")
    evidence = (ckpt, disk, load, first, runs)
    if not any(e.holds for e in evidence):
        if all(e.holds is None for e in (ckpt, disk, load)):
            return Outcome(False, "model loading not measured; generation times are steady", evidence)
        return Outcome(False, "model loading and generation times look healthy", evidence)

    fixes = []
    slow = min((e.value for e in (ckpt, disk) if e.holds and e.value is not None), default=None)
    if slow is not None:
        where = f" ({io.model_dir})" if io.model_dir else ""
        fixes.append(
            f"the model directory{where} reads at {format_value(slow, 'B/s')} "
            f"(< {format_value(t.read_throughput_low, 'B/s')}): move the weights to NVMe, keep the service "
            "resident, load safetensors (mmap)"
        )
    if load.holds and io.checkpoint_load_seconds is not None:
        fixes.append(
            f"loading takes {io.checkpoint_load_seconds:.1f} s from a {state} cache: warm the page cache "
            "before start (vmtouch -t, or read the files once) and keep the process resident"
        )
    if first.holds and io.first_generation_slowdown is not None:
        fixes.append(
            f"the first generation takes {io.first_generation_slowdown:.1f}× the steady state: run a warm-up "
            "generation at start-up before taking traffic"
        )
    if runs.holds and f.baseline.run_cv is not None:
        fixes.append(
            f"run-to-run CV {f.baseline.run_cv:.2f}: look for page-cache eviction, swapping, offloading or "
            "other tenants on the GPU"
        )
    return Outcome(True, "loading or caching slows generations down", evidence, "; ".join(fixes))


def _kernel_optimization(f: ProfileFacts, t: Thresholds) -> Outcome:
    s = f.stages
    cv = measure(t, "step_cv_high", "step-time CV within a generation", s.step_cv, "cv")
    ratio = info("slowest / fastest step", s.step_max_min_ratio, "x")
    step = info("mean step time", s.step_mean_seconds, "s")
    evidence = (cv, ratio, step)
    if not cv.holds:
        return Outcome(
            False, "step times are even" if cv.holds is False else "fewer than 2 steps timed", evidence
        )
    fix = (
        f"step times vary within a generation (CV {s.step_cv:.2f}"
        + (f", slowest/fastest {s.step_max_min_ratio:.1f}×" if s.step_max_min_ratio else "")
        + "): capture a trace (torch.profiler, or nsys profile --trace=cuda,nvtx,osrt) and look for "
        "synchronisations, throttled clocks or memory pressure"
    )
    if f.environment.compiled:
        fix += "; check for recompiles (TORCH_LOGS=recompiles)"
    return Outcome(True, "some denoise steps take much longer than others", evidence, fix)


def _multi_gpu_network(f: ProfileFacts, t: Thresholds) -> Outcome:
    mg = f.multi_gpu
    if mg is None:
        return Outcome(False, "single GPU", (info("GPUs", 1.0, "count"),))
    nccl = measure(t, "nccl_share_high", "time in collectives", mg.nccl_time_share, "ratio")
    eff = measure(t, "scaling_efficiency_low", "scaling efficiency (speedup / GPUs)", mg.scaling_efficiency, "ratio")
    evidence = (info("GPUs", float(mg.gpu_count), "count"), nccl, eff)
    if not (nccl.holds or eff.holds):
        return Outcome(False, f"{mg.gpu_count} GPUs scale as expected", evidence)
    parts = []
    if nccl.holds and mg.nccl_time_share is not None:
        parts.append(f"NCCL takes {mg.nccl_time_share:.0%} of the generation")
    if eff.holds and mg.speedup_vs_single is not None:
        parts.append(f"{mg.gpu_count} GPUs give {mg.speedup_vs_single:.2f}× instead of {mg.gpu_count}×")
    fix = (
        ", ".join(parts) + ": use NVLink-connected GPUs, larger per-GPU batches, fewer synchronisation points"
    )
    return Outcome(True, "inter-GPU communication limits scaling", evidence, fix)


def _cfg_on_distilled(f: ProfileFacts, t: Thresholds) -> Outcome:
    g = f.workload.guidance_scale
    distilled = _is_distilled(f)
    evidence = (
        info("model is distilled", None if distilled is None else float(distilled), "flag"),
        check("guidance scale", g, ">", 1.0, "scale"),
        info("CFG active", None if f.workload.cfg_active is None else float(f.workload.cfg_active), "flag"),
    )
    cfg_on = bool(f.workload.cfg_active) or (g is not None and g > 1.0)
    if not distilled or not cfg_on:
        return Outcome(False, "no classifier-free guidance on a distilled model", evidence)
    model = f.environment.model_id or "model"
    scale = "" if g is None else f"guidance_scale {g:g} "
    return Outcome(
        True,
        "classifier-free guidance runs on a guidance-distilled model",
        evidence,
        f"{scale}on the distilled {model} runs classifier-free guidance, doubling the denoise batch: "
        "set workload.guidance_scale: 0.0",
    )


def _excess_steps(f: ProfileFacts, t: Thresholds) -> Outcome:
    steps = f.workload.steps
    rec = _recommended_steps(f)
    ev = check("denoise steps", _float(steps), ">", _float(rec), "steps")
    if not ev.holds or steps is None or rec is None:
        return Outcome(
            False, "step count matches the model card" if rec else "no recommended step count known", (ev,)
        )
    denoise = f.stages.get(DENOISE)
    saving = ""
    if denoise is not None:
        saving = (
            f"; denoising would drop from {denoise.mean_seconds:.2f} s to about "
            f"{denoise.mean_seconds * rec / steps:.2f} s per generation"
        )
    return Outcome(
        True,
        f"{steps} steps where the model card uses {rec}",
        (ev,),
        f"{steps} steps on {f.environment.model_id} (the pipeline default; the model card uses {rec}): "
        f"set workload.steps: {rec}{saving}",
    )


def _compile_off(f: ProfileFacts, t: Thresholds) -> Outcome:
    env = f.environment
    compiled = None if env.compiled is None else float(env.compiled)
    ev = (info("torch.compile on the denoiser", compiled, "flag"), info("on GPU", float(env.on_gpu), "flag"))
    if not env.on_gpu or env.compiled is not False:
        return Outcome(False, "not applicable" if not env.on_gpu else "torch.compile is on or unknown", ev)
    return Outcome(
        True,
        f"torch.compile is off on {env.device}",
        ev,
        "torch.compile is off on the GPU: set model.compile: true (H100, 1024², 8 steps: 1.39 s → 0.90 s per "
        "image, after ~40 s of compile and warm-up)",
    )


def _float(v: int | None) -> float | None:
    return None if v is None else float(v)


RULES: tuple[FindingRule, ...] = (
    FindingRule("cpu_bound", "CPU-bound: data loading and prompt encoding", "bottleneck", "high", "low", _cpu_bound),
    FindingRule("memory_fragmentation", "Memory fragmentation", "bottleneck", "high", "low", _memory_fragmentation),
    FindingRule(
        "gpu_underutilization", "GPU underutilization", "bottleneck", "high", "medium", _gpu_underutilization
    ),
    FindingRule("io_throttling", "I/O throttling", "bottleneck", "medium", "low", _io_throttling),
    FindingRule(
        "kernel_optimization",
        "Kernel / operator efficiency",
        "bottleneck",
        "medium",
        "high",
        _kernel_optimization,
    ),
    FindingRule("multi_gpu_network", "Multi-GPU communication", "bottleneck", "low", "high", _multi_gpu_network),
    FindingRule(
        "cfg_on_distilled", "CFG on a distilled model", "misconfiguration", "high", "low", _cfg_on_distilled
    ),
    FindingRule("excess_steps", "More steps than the model needs", "misconfiguration", "high", "low", _excess_steps),
    FindingRule("compile_off", "torch.compile off on GPU", "misconfiguration", "medium", "low", _compile_off),
)


# ------------------------------------------------------------------------------------------------ entry point


def diagnose(facts: ProfileFacts, thresholds: Thresholds | None = None) -> Diagnosis:
    """Run the flowchart and every rule over the facts. Pure and cheap: safe on rolling windows."""
    t = thresholds or Thresholds()
    steps: list[FlowStep] = []
    verdict: Verdict = "optimized"
    action = OPTIMIZED_ACTION
    summary = "every flowchart question answered no or not measured"
    for rule in FLOWCHART:
        if rule.applies is not None and not rule.applies(facts):
            continue
        answer, basis, evidence = rule.answer(facts, t)
        steps.append(FlowStep(rule.verdict, rule.question, answer, basis, evidence))
        if answer == "yes":
            verdict, action = rule.verdict, rule.action
            deciding = [e.describe() for e in evidence if e.holds]
            summary = f"{verdict}: " + "; ".join(deciding)
            break

    findings = []
    for r in RULES:
        out = r.evaluate(facts, t)
        findings.append(
            Finding(
                kind=r.kind,
                title=r.title,
                category=r.category,
                active=out.active,
                impact=r.impact,
                effort=r.effort,
                priority=PRIORITY[(r.impact, r.effort)],
                summary=out.summary,
                fix=out.fix if out.active else None,
                evidence=out.evidence,
            )
        )
    findings.sort(key=lambda x: (not x.active, x.priority))
    return Diagnosis(
        verdict=verdict,
        summary=summary,
        action=action,
        steps=tuple(steps),
        findings=tuple(findings),
        thresholds={**t.model_dump(), CACHE_RULE: t.cache_ratio_high},
    )
