"""The diagnosis as code: the article's flowchart and a table of bottleneck rules over ProfileFacts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from zmon.analysis.facts import (
    BETWEEN_GENERATIONS,
    BETWEEN_MIN_SHARE,
    DENOISE,
    GAP_PREFIX,
    WHOLE_GENERATION,
    ProfileFacts,
    from_jsonable,
    to_jsonable,
)
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

# A process keeping less than this many cores busy in a window spends part of it waiting (on storage when it
# reads meanwhile): a single Python thread computing shows ~1.0; one reading files at 1 GB/s shows ~0.6.
WAITING_CORES = 0.8

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


Confidence = Literal["high", "medium", "low"]


@dataclass(frozen=True)
class Diagnosis:
    """The flowchart verdict with its steps, and every finding (active first, by priority).

    `confidence` and `caveats` say how far the verdict describes the model rather than the host it ran on:
    low on a CPU-only run or a host whose CPUs other processes kept busy.
    """

    verdict: Verdict
    summary: str  # the verdict with the figure that decided it
    action: str  # the flowchart's remedy for the verdict
    steps: tuple[FlowStep, ...]  # the questions asked, up to the one that gave the verdict
    findings: tuple[Finding, ...]
    thresholds: dict[str, float]
    confidence: Confidence = "high"
    caveats: tuple[str, ...] = ()

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


def _window_label(key: str) -> str:
    """A window key of the utilization facts in words: a stage, or the untimed time between two."""
    if key.startswith(GAP_PREFIX):
        return f"untimed time {key.removeprefix(GAP_PREFIX)}"
    return "denoise steps" if key == DENOISE else key


@dataclass(frozen=True)
class IdleSpot:
    """Where the GPU sits idle longest in a generation, and what the process was doing meanwhile."""

    key: str  # a stage name or "gap:<name>"
    idle_seconds: float  # per generation
    idle_share: float  # of the whole generation
    process_cores: float | None
    read_bytes_per_second: float | None  # storage reads in that window (process, else all disks)

    @property
    def label(self) -> str:
        return _window_label(self.key)


def _idle_spot(f: ProfileFacts) -> IdleSpot | None:
    u = f.utilization
    total = f.baseline.latency.mean if f.baseline.latency else None
    windows = {k: v for k, v in u.gpu_idle_seconds.items() if k not in (WHOLE_GENERATION, BETWEEN_GENERATIONS)}
    if not windows or not total:
        return None
    key = max(windows, key=lambda k: windows[k])
    reads = u.process_read_by_stage.get(key, u.disk_read_by_stage.get(key))
    return IdleSpot(key, windows[key], windows[key] / total, u.process_cpu_by_stage.get(key), reads)


def _waits_on_storage(spot: IdleSpot | None, t: Thresholds) -> bool:
    """The GPU's idle time sits where the process reads from storage and its CPU is mostly waiting."""
    if spot is None or spot.read_bytes_per_second is None:
        return False
    cpu_waiting = spot.process_cores is None or spot.process_cores < WAITING_CORES
    return bool(t.check("io_read_rate_high", spot.read_bytes_per_second)) and cpu_waiting


def _stage_waits_on_storage(f: ProfileFacts, t: Thresholds, key: str) -> bool:
    """A stage (on a CPU-only run) whose time goes to reading storage rather than computing."""
    u = f.utilization
    reads = u.process_read_by_stage.get(key, u.disk_read_by_stage.get(key))
    spot = IdleSpot(key, 0.0, 0.0, u.process_cpu_by_stage.get(key), reads)
    return _waits_on_storage(spot, t)


def _generation_reads(f: ProfileFacts) -> float | None:
    """Storage reads during generations, bytes/s: the process's own where known, else every disk's."""
    u = f.utilization
    return u.process_read_by_stage.get(WHOLE_GENERATION, u.disk_read_by_stage.get(WHOLE_GENERATION))


@dataclass(frozen=True)
class Between:
    """The time between pipeline calls as the diagnosis reads it (see BetweenFacts)."""

    subject: str  # "the GPU", or off GPU "the pipeline"
    idle_share: float | None  # share of the wall time the GPU waited between calls (all of it off GPU)
    mean_seconds: float | None
    cores: float | None  # process CPU between calls
    reads: float | None  # storage reads between calls, bytes/s
    reads_high: bool  # at or above io_read_rate_high: the caller reads its inputs from storage
    evidence: tuple[Evidence, ...]
    busy: bool  # long waits while the process works or reads: the caller's own work holds the GPU back
    waiting: bool  # long waits while the process is idle: it waits for requests (or on I/O zmon does not see)

    def fix(self) -> str:
        reads = f", reading {format_value(self.reads, 'B/s')} from storage" if self.reads_high else ""
        return (
            f"{self.subject} waits {self.idle_share or 0:.0%} of the wall time between pipeline calls (mean "
            f"{format_value(self.mean_seconds, 's')}) while the process works ({format_value(self.cores, 'cores')}"
            f"{reads}): the caller's own work between generations (reading and decoding inputs, pre- and "
            "post-processing, saving outputs) runs on the generating thread. Prepare the next request's inputs in "
            "a producer thread or process feeding a queue, and hand outputs to a writer thread, so each call starts "
            "as soon as the previous one returns"
        )

    def waiting_summary(self) -> str:
        return (
            f"{self.subject} waits {self.idle_share or 0:.0%} of the wall time between pipeline calls while the "
            "process is idle: it waits for requests (spare capacity) or on I/O outside the process — not a "
            "bottleneck of the pipeline"
        )


def _between(f: ProfileFacts, t: Thresholds) -> Between | None:
    """The time between pipeline calls, when there was any (None for a single call or back-to-back calls)."""
    b = f.between
    if not b.gaps or b.share is None or b.share < BETWEEN_MIN_SHARE:
        return None
    u = f.utilization
    gpu = u.gpu_by_stage.get(BETWEEN_GENERATIONS)
    idle_share = b.share * (1.0 - gpu) if gpu is not None else b.share
    cores = u.process_cpu_by_stage.get(BETWEEN_GENERATIONS)
    reads = u.process_read_by_stage.get(BETWEEN_GENERATIONS, u.disk_read_by_stage.get(BETWEEN_GENERATIONS))
    label = "GPU waiting between pipeline calls" if gpu is not None else "time between pipeline calls"
    share_ev = measure(t, "between_idle_share_high", f"{label} (share of the wall time)", idle_share, "ratio")
    cores_ev = measure(t, "between_busy_cores", "process CPU between pipeline calls", cores, "cores")
    reads_ev = measure(t, "io_read_rate_high", "storage reads between pipeline calls", reads, "B/s")
    evidence = (share_ev, info("mean time between pipeline calls", b.mean_seconds, "s"), cores_ev, reads_ev)
    long = bool(share_ev.holds)
    works = bool(cores_ev.holds or reads_ev.holds)
    return Between(
        "the GPU" if f.environment.on_gpu else "the pipeline",
        idle_share,
        b.mean_seconds,
        cores,
        reads,
        bool(reads_ev.holds),
        evidence,
        busy=long and works,
        waiting=long and not works and cores_ev.holds is False,
    )


def _pressure(f: ProfileFacts, t: Thresholds) -> tuple[bool | None, tuple[Evidence, ...]]:
    """Evidence that GPU memory is really under pressure: retries, OOMs, real fragmentation, low headroom.

    The reserved-unallocated (cache) ratio is not pressure: it is memory the allocator keeps for reuse.
    """
    m = f.memory
    headroom = _ratio(m.headroom_bytes, m.card_total_bytes)
    evidence = (
        check("allocator retries", _float(m.alloc_retries), ">", 0, "count"),
        check("allocator OOMs", _float(m.ooms), ">", 0, "count"),
        check("generations that ran out of memory", float(f.baseline.oom_generations), ">", 0, "count"),
        measure(t, "fragmentation_high", "fragmentation (inactive split / reserved)", m.fragmentation_ratio, "ratio"),
        measure(t, "headroom_low", "headroom (free + cache) / card", headroom, "ratio"),
    )
    if any(e.holds for e in evidence):
        return True, evidence
    if all(e.holds is None for e in evidence[:2] + evidence[3:]):
        return None, evidence
    return False, evidence


def _cache_info(f: ProfileFacts, t: Thresholds) -> Evidence:
    """The article's 30% ratio, shown against the policy rule's threshold: cache, not pressure by itself."""
    return check(
        f"reserved-unallocated (cache) ratio vs policy.rules.{CACHE_RULE}",
        f.memory.reserved_unallocated_ratio,
        "info",
        t.cache_ratio_high,
        "ratio",
        name="torch_reserved_unallocated_ratio",
    )


def _io_evidence(f: ProfileFacts, t: Thresholds) -> tuple[bool, tuple[Evidence, ...]]:
    """Slow checkpoint reads (of a checkpoint large enough to judge), a slow load, or storage reads during
    generations. A slow first generation alone is warm-up, not I/O."""
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
    reads = measure(t, "io_read_rate_high", "storage reads during generations", _generation_reads(f), "B/s")
    first = info(
        "first generation / steady-state median (warm-up, not I/O by itself)", io.first_generation_slowdown, "x"
    )
    evidence = (ckpt, disk, load, reads, first)
    return bool(ckpt.holds or load.holds or reads.holds or (disk.holds and (ckpt.holds or load.holds))), evidence


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
    """The whole generation counts: idle time in text encoding, output processing or between stages leaves
    the GPU as idle as a slow denoise loop. Idle time spent waiting on storage is I/O's (question 4)."""
    u = f.utilization
    whole = u.gpu_by_stage.get(WHOLE_GENERATION)
    ev = measure(t, "gpu_util_low", "GPU utilization over whole generations", whole, "ratio")
    between = _between(f, t)
    answer, basis, evidence = _q_gpu_util_within(f, t, ev)
    if between is None:
        return answer, basis, evidence
    if answer != "yes" and between.busy:
        basis = (
            f"the caller's own work between pipeline calls keeps {between.subject} waiting "
            f"{between.idle_share or 0:.0%} of the wall time ({format_value(between.cores, 'cores')} busy meanwhile)"
        )
        return "yes", basis, (*evidence, *between.evidence)
    return answer, basis, (*evidence, *between.evidence)


def _q_gpu_util_within(f: ProfileFacts, t: Thresholds, ev: Evidence) -> tuple[Answer, str, tuple[Evidence, ...]]:
    """The CPU-bound question inside the pipeline calls: GPU idle time and where it sits, or (off GPU) the
    CPU-side stages' shares."""
    u = f.utilization
    if ev.holds is not None:
        diffusion, name = _gpu_util_diffusion(f)
        spot = _idle_spot(f)
        evidence: list[Evidence] = [ev, info(name, diffusion, "ratio")]
        if spot is not None:
            evidence += [
                info(f"GPU idle in the {spot.label}, per generation", spot.idle_seconds, "s"),
                info(f"process CPU in the {spot.label}", spot.process_cores, "cores"),
            ]
        if ev.holds and _waits_on_storage(spot, t):
            assert spot is not None
            evidence.append(info(f"storage reads in the {spot.label}", spot.read_bytes_per_second, "B/s"))
            return "no", f"the GPU idles waiting on storage reads in the {spot.label} (see I/O)", tuple(evidence)
        if ev.holds and spot is not None:
            basis = f"NVML GPU utilization; the GPU idles {spot.idle_share:.0%} of each generation in the {spot.label}"
            return "yes", basis, tuple(evidence)
        return _yes_no(ev), "NVML GPU utilization over whole generations", tuple(evidence)
    # No GPU utilization (CPU-only run, or no NVML): the CPU-side stages' shares decide instead.
    text, post = _cpu_side_evidence(f, t)
    cpu = info("process CPU during text encoding", u.process_cpu_by_stage.get("text_encode"), "cores")
    evidence_cpu = (ev, text, post, cpu)
    basis = f"stage shares on {_text_encoder_device(f)} (GPU utilization not measured)"
    heavy = [k for k, e in (("text_encode", text), ("postprocess", post)) if e.holds]
    if heavy and all(_stage_waits_on_storage(f, t, k) for k in heavy):
        return "no", f"the {' and '.join(heavy)} time goes to storage reads (see I/O)", evidence_cpu
    if heavy:
        return "yes", basis, evidence_cpu
    return "not_measured", basis, evidence_cpu


def _q_vram(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    src = f.memory.vram_used_source or "unknown source"
    ev = measure(t, "vram_high", "peak VRAM in use / card", f.memory.vram_used_fraction, "ratio")
    pressure, evidence = _pressure(f, t)
    all_evidence = (ev, *evidence, _cache_info(f, t))
    if ev.holds is None:
        return "not_measured", f"peak memory in use ({src})", all_evidence
    if ev.holds and pressure is None:
        return "not_measured", f"the card is full ({src}); allocator pressure not measured", all_evidence
    if ev.holds and not pressure:
        return "no", f"the card is full ({src}) but without pressure: it is cache the allocator reuses", all_evidence
    return ("yes" if ev.holds else "no"), f"peak memory in use ({src}) and allocator pressure", all_evidence


def _step_evidence(f: ProfileFacts, t: Thresholds) -> tuple[Evidence, Evidence, Evidence]:
    """Step-time spread, judged only when steps are long enough for it to mean anything."""
    long_enough = measure(t, "min_step_seconds", "mean step time", f.stages.step_mean_seconds, "s")
    judged = long_enough.holds is not False
    cv = measure(
        t,
        "step_cv_high",
        "step-time CV within a generation"
        + ("" if judged else f" (steps under {format_value(t.min_step_seconds, 's')}: not judged)"),
        f.stages.step_cv,
        "cv",
        judge=judged,
    )
    return cv, info("slowest / fastest step", f.stages.step_max_min_ratio, "x"), long_enough


def _q_steps(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    ev, ratio, mean = _step_evidence(f, t)
    if ev.comparison == "info":
        return "not_measured", "denoise steps too short to judge their spread", (ev, ratio, mean)
    return _yes_no(ev), "denoise step durations", (ev, ratio, mean)


def _q_io(f: ProfileFacts, t: Thresholds) -> tuple[Answer, str, tuple[Evidence, ...]]:
    found, evidence = _io_evidence(f, t)
    runs = measure(t, "run_cv_high", "run-to-run CV (same shape)", f.baseline.run_cv, "cv")
    evidence = (*evidence, runs)
    if found:
        return "yes", "model loading and storage reads", evidence
    if all(e.holds is None for e in evidence[:4]):
        return "not_measured", "model loading not measured, no storage reads seen", evidence
    return "no", "model loading and storage reads", evidence


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
        "Is the GPU idle for more than the threshold over whole generations or between them, with the CPU side "
        "behind it?",
        "CPU bottleneck: optimize data loading, prompt encoding and output processing",
        _q_gpu_util,
    ),
    FlowRule(
        "memory_bound",
        "Is VRAM use above the threshold of the card, under allocator pressure?",
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
        "Does storage hold generations back (slow checkpoint reads, or reads while generating)?",
        "I/O or caching issue: optimize model loading and caching",
        _q_io,
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


def _stage_fix(stage_key: str, f: ProfileFacts) -> str:
    """What to do about GPU idle time in one window."""
    fix = _stage_fix_on_device(stage_key, f)
    if f.environment.offload is not None and f.environment.on_gpu:
        call = OFFLOAD_CALLS.get(f.environment.offload, "offloading")
        return (
            f"the pipeline moves its weights between CPU and GPU during the generation ({call}): the GPU waits "
            "for the copies — keep the pipeline on the GPU if it fits (the cpu_offload finding), else prefer "
            f"enable_model_cpu_offload() to sequential offload; beyond the copies: {fix}"
        )
    return fix


def _stage_fix_on_device(stage_key: str, f: ProfileFacts) -> str:
    device = _text_encoder_device(f)
    if stage_key == "text_encode":
        hit = f.workload.prompt_cache_hit_ratio
        if hit is None:
            remedy = "enable the prompt-embedding cache (workload.prompt_cache.enabled: true)"
        else:
            remedy = f"the prompt cache hits only {hit:.0%} of prompts: encode prompts in batches"
        return remedy + ("" if device.startswith("cuda") else f" or move the text encoder from {device} to the GPU")
    if stage_key == "postprocess":
        return (
            "move PNG encoding off the critical path (a worker thread or process) or return tensors (output_type='pt')"
        )
    if stage_key == "vae_encode":
        return "preprocess and encode init images ahead of time, or batch them"
    if stage_key == "vae_decode":
        return "decode on the GPU in the pipeline's dtype; consider compiling the VAE decoder (model.compile_vae)"
    if stage_key == DENOISE:
        if f.environment.compiled:
            return (
                "work runs on the CPU inside the denoise loop (host hooks, callbacks, synchronisations): move it "
                "out of the loop, or capture CUDA graphs (a compile mode with graphs)"
            )
        return (
            "work runs on the CPU inside the denoise loop (host hooks, callbacks, kernel launches): move it "
            "out of the loop, or torch.compile the transformer (model.compile: true)"
        )
    if stage_key.startswith(GAP_PREFIX):
        return (
            "the GPU waits on untimed work between stages (host code, hooks, data preparation): find it in a "
            "trace (POST /trace, or zmon profile --trace)"
        )
    return "move the CPU work of this stage off the critical path"


def _cpu_bound(f: ProfileFacts, t: Thresholds) -> Outcome:
    """Inside the calls (idle GPU time and where it sits, or the CPU-side stages off GPU) and between them (the
    caller's own work while the GPU waits)."""
    inside = _cpu_bound_within(f, t)
    between = _between(f, t)
    if between is None:
        return inside
    evidence = (*inside.evidence, *between.evidence)
    if between.busy:
        fix = between.fix() if not inside.active else f"{inside.fix}; {between.fix()}"
        outside = f"the caller's work between pipeline calls keeps {between.subject} waiting"
        summary = inside.summary if inside.active else outside
        return Outcome(True, summary, evidence, fix)
    summary = inside.summary
    if between.waiting and not inside.active:
        summary = f"{summary}; {between.waiting_summary()}"
    return replace(inside, summary=summary, evidence=evidence)


def _cpu_bound_within(f: ProfileFacts, t: Thresholds) -> Outcome:
    u = f.utilization
    whole = measure(
        t, "gpu_util_low", "GPU utilization over whole generations", u.gpu_by_stage.get(WHOLE_GENERATION), "ratio"
    )
    text, post = _cpu_side_evidence(f, t)
    spot = _idle_spot(f)
    host = info("host CPU during generation", u.host_cpu_by_stage.get(WHOLE_GENERATION), "ratio")
    if whole.holds is not None:
        # On a GPU: idle time, and where it sits.
        evidence: tuple[Evidence, ...] = (whole, text, post, host)
        if spot is not None:
            evidence = (
                *evidence,
                info(f"GPU idle in the {spot.label}, per generation", spot.idle_seconds, "s"),
                info(f"process CPU in the {spot.label}", spot.process_cores, "cores"),
            )
        if not whole.holds:
            return Outcome(False, "the GPU is busy over whole generations", evidence)
        if _waits_on_storage(spot, t):
            return Outcome(False, "the GPU waits on storage, not on the CPU (see I/O throttling)", evidence)
        assert spot is not None
        fix = (
            f"the GPU is idle {1 - (whole.value or 0):.0%} of each generation, most of it in the {spot.label} "
            f"({spot.idle_seconds:.3f} s per generation, {spot.idle_share:.0%}): {_stage_fix(spot.key, f)}"
        )
        return Outcome(True, f"the CPU side leaves the GPU idle in the {spot.label}", evidence, fix)
    # CPU-only, or no NVML: the CPU-side stages' shares.
    evidence = (text, post, whole, host)
    if not (text.holds or post.holds):
        return Outcome(False, "no CPU-side stage dominates the generation", evidence)
    heavy = [k for k, e in (("text_encode", text), ("postprocess", post)) if e.holds]
    if all(_stage_waits_on_storage(f, t, k) for k in heavy):
        return Outcome(False, "the heavy stages wait on storage, not on the CPU (see I/O throttling)", evidence)
    fixes = []
    if text.holds and text.value is not None:
        fixes.append(
            f"text encoding is {text.value:.0%} of the generation on {_text_encoder_device(f)}: "
            + _stage_fix("text_encode", f)
        )
    if post.holds and post.value is not None:
        fixes.append(f"output processing is {post.value:.0%} of the generation: {_stage_fix('postprocess', f)}")
    return Outcome(True, "the CPU side holds the generation back", evidence, "; ".join(fixes))


def _gpu_underutilization(f: ProfileFacts, t: Thresholds) -> Outcome:
    util, name = _gpu_util_diffusion(f)
    u = f.utilization
    low = measure(t, "gpu_util_low", name, util, "ratio")
    cores = u.process_cpu_by_stage.get(DENOISE)
    evidence = (
        low,
        measure(t, "cpu_busy_high", "process CPU during diffusion", cores, "cores"),
        info("SM active during diffusion (GPM)", u.sm_active_by_stage.get(DENOISE), "ratio"),
        info("tensor cores active during diffusion (GPM)", u.tensor_active_by_stage.get(DENOISE), "ratio"),
        info("batch size", None if f.workload.batch_size is None else float(f.workload.batch_size), "count"),
    )
    if low.holds is None:
        return Outcome(False, "GPU utilization not measured", evidence)
    if not low.holds:
        return Outcome(False, f"the GPU is {util:.0%} busy during diffusion", evidence)
    fixes = []
    if (f.workload.batch_size or 1) == 1:
        fixes.append("raise workload.batch_size to give each kernel more work")
    if f.environment.compiled is False:
        fixes.append("torch.compile the transformer (model.compile: true) to cut launch gaps")
    elif f.environment.compiled:
        fixes.append("capture CUDA graphs (a compile mode with graphs) to cut the remaining launch gaps")
    fixes.append("find the gaps in a trace (torch.profiler, or nsys profile --trace=cuda,nvtx,osrt)")
    return Outcome(
        True,
        f"the GPU idles {1 - (util or 0):.0%} of the diffusion time",
        evidence,
        f"GPU utilization {util:.0%} during diffusion: " + "; ".join(fixes),
    )


def _memory_fragmentation(f: ProfileFacts, t: Thresholds) -> Outcome:
    m = f.memory
    pressure, evidence = _pressure(f, t)
    trend = measure(t, "latency_trend_high", "late / early median latency", f.baseline.trend_ratio, "x")
    evidence = (*evidence, _cache_info(f, t), trend)
    if pressure is None:
        return Outcome(False, "allocator statistics not measured", evidence)
    if not pressure:
        cache = m.reserved_unallocated_ratio
        note = "" if cache is None else f" (the {cache:.0%} reserved-unallocated is cache the allocator reuses)"
        return Outcome(False, "the allocator shows no memory pressure" + note, evidence)
    retries, ooms, oom_runs, frag, headroom = evidence[:5]
    if frag.holds:
        lead = f"fragmentation ratio {m.fragmentation_ratio:.2f} (inactive split / reserved)"
    elif retries.holds or ooms.holds:
        lead = f"{m.alloc_retries or 0} allocator retries and {m.ooms or 0} OOMs"
    elif oom_runs.holds:
        lead = f"{f.baseline.oom_generations} generations ran out of memory"
    else:
        lead = f"headroom down to {format_value(headroom.value, 'ratio')} of the card"
    if m.headroom_bytes is not None:
        lead += f" with {format_value(m.headroom_bytes, 'B')} of headroom"
    conf = f.environment.alloc_conf or ""
    fixes = []
    if "max_split_size_mb" in conf:
        fixes.append("drop max_split_size_mb from PYTORCH_CUDA_ALLOC_CONF (never combine it with expandable_segments)")
    if not _expandable(f):
        allocator = "the default allocator" if not conf else f"PYTORCH_CUDA_ALLOC_CONF={conf}"
        fixes.insert(0, f"{lead} with {allocator}: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    else:
        fixes.insert(0, f"{lead} under expandable_segments")
    fixes.append("empty_cache only at safe points between generations (zmon policy), and pre-warm the largest shape")
    if trend.holds:
        fixes.append(f"latency grew {f.baseline.trend_ratio:.2f}× over the run: compare before/after a cleared cache")
    return Outcome(True, "the caching allocator is under pressure", evidence, "; ".join(fixes))


def _io_throttling(f: ProfileFacts, t: Thresholds) -> Outcome:
    found, evidence = _io_evidence(f, t)
    if not found:
        if all(e.holds is None for e in evidence[:4]):
            return Outcome(False, "model loading not measured; no storage reads during generations", evidence)
        return Outcome(False, "model loading and storage look healthy", evidence)
    ckpt, disk, load, reads, _first = evidence
    io = f.io
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
            f"loading takes {io.checkpoint_load_seconds:.1f} s from a {io.cache_state} cache: warm the page cache "
            "before start (vmtouch -t, or read the files once) and keep the process resident"
        )
    if reads.holds and reads.value is not None:
        spot = _idle_spot(f)
        where = f", while the GPU idles in the {spot.label}" if spot is not None and _waits_on_storage(spot, t) else ""
        fixes.append(
            f"generations read {format_value(reads.value, 'B/s')} from storage{where}: keep what each request "
            "loads (weights, LoRAs, inputs) in memory or on faster storage, or prefetch it"
        )
    return Outcome(True, "storage holds loading or generations back", evidence, "; ".join(fixes))


def _latency_variance(f: ProfileFacts, t: Thresholds) -> Outcome:
    runs = measure(t, "run_cv_high", "run-to-run CV (same shape)", f.baseline.run_cv, "cv")
    found, _ = _io_evidence(f, t)
    evidence = (runs, info("steady-state generations", float(f.baseline.generations), "count"))
    if not runs.holds:
        return Outcome(False, "generation times are steady", evidence)
    if found:
        return Outcome(False, "run-to-run variance explained by storage (see I/O throttling)", evidence)
    return Outcome(
        True,
        "generation times vary from run to run with no I/O behind it",
        evidence,
        f"run-to-run CV {f.baseline.run_cv:.2f}: look for other tenants on the GPU or CPU, throttled clocks "
        "(zmon_gpu_clock_event_active), swapping, or a varying workload (prompt lengths, resolutions)",
    )


def _kernel_optimization(f: ProfileFacts, t: Thresholds) -> Outcome:
    s = f.stages
    cv, ratio, step = _step_evidence(f, t)
    evidence = (cv, ratio, step)
    if not cv.holds:
        return Outcome(False, "step times are even" if cv.holds is False else "fewer than 2 steps timed", evidence)
    fix = (
        f"step times vary within a generation (CV {s.step_cv:.2f}"
        + (f", slowest/fastest {s.step_max_min_ratio:.1f}×" if s.step_max_min_ratio else "")
        + "): capture a trace (torch.profiler, or nsys profile --trace=cuda,nvtx,osrt) and look for "
        "synchronisations, throttled clocks or memory pressure"
    )
    if f.environment.compiled:
        fix += "; check for recompiles (TORCH_LOGS=recompiles)"
    return Outcome(True, "some denoise steps take much longer than others", evidence, fix)


def _untimed_work(f: ProfileFacts, t: Thresholds) -> Outcome:
    s = f.stages
    share = measure(t, "untimed_share_high", "time outside every timed stage", s.unattributed_share, "ratio")
    gap = s.gaps[0] if s.gaps else None
    evidence: tuple[Evidence, ...] = (share,)
    if gap is not None:
        idle = f.utilization.gpu_idle_seconds.get(GAP_PREFIX + gap.name)
        evidence = (
            *evidence,
            info(f"largest untimed gap: {gap.name}", gap.mean_seconds, "s"),
            info(f"GPU idle during {gap.name}", idle, "s"),
        )
    if not share.holds or gap is None:
        return Outcome(False, "the timed stages cover the generation", evidence)
    return Outcome(
        True,
        f"{s.unattributed_share:.0%} of each generation runs outside every timed stage, most of it {gap.name}",
        evidence,
        f"{gap.mean_seconds:.3f} s per generation ({gap.share:.0%}) runs {gap.name}, outside the stages zmon can "
        "time: host code, hooks or data preparation between pipeline stages; find it in a trace (POST /trace, "
        "or zmon profile --trace) and move it off the critical path",
    )


def _recompiles(f: ProfileFacts, t: Thresholds) -> Outcome:
    re = [x for x in f.baseline.excluded if x.kind == "compile" and x.reason.startswith("recompile")]
    evidence = (
        info("graphs compiled during the generations", float(f.baseline.compiles), "count"),
        info("generations that recompiled", float(len(re)), "count"),
    )
    # One recompile after the first compile is torch.compile's automatic dynamic shapes at work: expected.
    if len(re) < 2:
        return Outcome(False, "no repeated recompiles", evidence)
    worst = max(re, key=lambda x: x.seconds)
    causes = "; ".join(dict.fromkeys(x.reason.split(": ", 1)[-1] for x in re))
    return Outcome(
        True,
        f"{len(re)} recompiles during serving, the slowest {worst.seconds:.1f} s",
        evidence,
        f"{len(re)} recompiles ({causes}): pad prompts to a fixed length (max_sequence_length), serve a few fixed "
        "resolution buckets, or mark the varying dimensions dynamic (torch._dynamo.mark_dynamic / dynamic=True)",
    )


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
    fix = ", ".join(parts) + ": use NVLink-connected GPUs, larger per-GPU batches, fewer synchronisation points"
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
        return Outcome(False, "step count matches the model card" if rec else "no recommended step count known", (ev,))
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
        "torch.compile is off on the GPU: set model.compile: true (H200, full-size Z-Image, 1024², 9 steps: "
        "1.43 s → 0.98 s per image, after ~90 s of compile and warm-up; zmon tune measures it on yours)",
    )


def _float32_on_gpu(f: ProfileFacts, t: Thresholds) -> Outcome:
    """A diffusion model computing in float32 on a GPU: from_pretrained loads float32 unless told otherwise,
    which doubles the weights' memory and leaves the tensor cores' half-precision rate unused."""
    env = f.environment
    ev = (info("denoiser dtype is float32", None if env.dtype is None else float(env.dtype == "float32"), "flag"),)
    if not env.on_gpu or env.dtype != "float32":
        return Outcome(False, "not on a GPU" if not env.on_gpu else f"the denoiser computes in {env.dtype}", ev)
    return Outcome(
        True,
        f"the denoiser computes in float32 on {env.device}",
        ev,
        "the pipeline runs in float32 on the GPU (diffusers' from_pretrained loads float32 unless torch_dtype is "
        "given): load it with torch_dtype=torch.bfloat16 (zmon run: model.dtype: bfloat16; float16 on GPUs before "
        "Ampere) — half the weights' memory and the tensor cores' half-precision rate; `zmon tune` measures the "
        "outputs against the float32 ones",
    )


OFFLOAD_CALLS = {
    "model": "enable_model_cpu_offload()",
    "sequential": "enable_sequential_cpu_offload()",
    "group": "enable_group_offload()",
}


def _cpu_offload(f: ProfileFacts, t: Thresholds) -> Outcome:
    """Weights offloaded to the CPU although they fit on the card next to the generation's peak: every
    generation moves them over PCIe (offloading trades VRAM for PCIe traffic; it saves nothing else)."""
    env, m = f.environment, f.memory
    mode = env.offload
    need = None
    if env.weights_bytes is not None and m.vram_peak_used_bytes is not None:
        need = _ratio(float(env.weights_bytes + m.vram_peak_used_bytes), _float(m.card_total_bytes))
    fits = check(
        "(weights + peak VRAM in use) / card, the most keeping the weights resident would need",
        need,
        "<=",
        1.0 - t.headroom_low,
        "ratio",
    )
    evidence = (
        info("weights offloaded to the CPU between uses", None if mode is None else 1.0, "flag"),
        info("weights (every component)", _float(env.weights_bytes), "B"),
        info("peak VRAM in use", _float(m.vram_peak_used_bytes), "B"),
        fits,
    )
    if mode is None or not env.on_gpu:
        return Outcome(False, "the weights stay on the device" if mode is None else "not on a GPU", evidence)
    call = OFFLOAD_CALLS.get(mode, f"{mode} offload")
    if fits.holds is None:
        return Outcome(False, f"{call} is on; whether the weights fit the card was not measured", evidence)
    if not fits.holds:
        return Outcome(False, f"{call} is what lets the pipeline fit the card", evidence)
    return Outcome(
        True,
        f"{call} on a card with room for the weights",
        evidence,
        f"the pipeline keeps its weights on the CPU ({call}) and moves up to "
        f"{format_value(env.weights_bytes, 'B')} over PCIe every generation, though weights and peak together "
        f"need {need:.0%} of the card: drop the offload call and move the pipeline to the GPU "
        "(pipe.to('cuda')); offloading saves VRAM only, at the price of PCIe traffic and idle GPU time",
    )


def _float(v: int | None) -> float | None:
    return None if v is None else float(v)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


RULES: tuple[FindingRule, ...] = (
    FindingRule("cpu_bound", "CPU-bound: data loading and prompt encoding", "bottleneck", "high", "low", _cpu_bound),
    FindingRule("memory_fragmentation", "Memory fragmentation", "bottleneck", "high", "low", _memory_fragmentation),
    FindingRule("gpu_underutilization", "GPU underutilization", "bottleneck", "high", "medium", _gpu_underutilization),
    FindingRule("io_throttling", "I/O throttling", "bottleneck", "medium", "low", _io_throttling),
    FindingRule("untimed_work", "Work outside every timed stage", "bottleneck", "medium", "low", _untimed_work),
    FindingRule(
        "latency_variance", "Run-to-run variance without I/O", "bottleneck", "medium", "medium", _latency_variance
    ),
    FindingRule(
        "kernel_optimization",
        "Kernel / operator efficiency",
        "bottleneck",
        "medium",
        "high",
        _kernel_optimization,
    ),
    FindingRule("multi_gpu_network", "Multi-GPU communication", "bottleneck", "low", "high", _multi_gpu_network),
    FindingRule("cfg_on_distilled", "CFG on a distilled model", "misconfiguration", "high", "low", _cfg_on_distilled),
    FindingRule("excess_steps", "More steps than the model needs", "misconfiguration", "high", "low", _excess_steps),
    FindingRule("compile_off", "torch.compile off on GPU", "misconfiguration", "high", "low", _compile_off),
    FindingRule("cpu_offload", "CPU offload on a card with room", "misconfiguration", "high", "low", _cpu_offload),
    FindingRule("float32_on_gpu", "float32 on a GPU", "misconfiguration", "high", "low", _float32_on_gpu),
    FindingRule("recompiles", "Repeated recompiles while serving", "misconfiguration", "high", "low", _recompiles),
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
    confidence, caveats = _confidence(facts, t)
    return Diagnosis(
        verdict=verdict,
        summary=summary,
        action=action,
        steps=tuple(steps),
        findings=tuple(findings),
        thresholds={**t.model_dump(), CACHE_RULE: t.cache_ratio_high},
        confidence=confidence,
        caveats=caveats,
    )


MIN_STEADY_GENERATIONS = 5  # fewer: the statistics are thin


def _confidence(f: ProfileFacts, t: Thresholds) -> tuple[Confidence, tuple[str, ...]]:
    """How much the verdict says about the model, and why not more."""
    env, u, b = f.environment, f.utilization, f.baseline
    caveats: list[str] = []
    level = 2  # 2 high, 1 medium, 0 low
    if not env.on_gpu:
        level = 0
        caveats.append(
            "CPU-only run: GPU utilization, GPU memory and kernels are not measured, and the timings describe "
            "this host running the model on its CPU, not the model on a GPU"
        )
    host = u.host_cpu_by_stage.get(WHOLE_GENERATION)
    cores = u.process_cpu_by_stage.get(WHOLE_GENERATION)
    if host is not None and env.cpu_count and bool(t.check("cpu_busy_high", host)):
        busy = host * env.cpu_count
        own = cores or 0.0
        if own < 0.6 * busy:
            level = 0
            caveats.append(
                f"the host's CPUs were {host:.0%} busy and this process used {own:.1f} of {busy:.1f} busy cores: "
                "other processes compete for the CPU, so times and step variance describe the host's load, "
                "not the model"
            )
    if env.on_gpu and not u.gpu_measured:
        level = min(level, 1)
        caveats.append("GPU utilization not measured (no NVML, or the GPU could not be identified)")
    if u.other_gpu_processes:
        level = min(level, 1)
        caveats.append(
            f"{u.other_gpu_processes} other process(es) held "
            f"{format_value(_float(u.other_gpu_processes_memory_bytes), 'B')} on this GPU: if they compute, its "
            "utilization and the timings include their work (a shared GPU)"
        )
    if b.generations < MIN_STEADY_GENERATIONS:
        level = min(level, 1)
        caveats.append(f"only {b.generations} steady-state generation(s): the statistics are thin")
    if b.excluded:
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(x.kind for x in b.excluded).items())
        caveats.append(f"{len(b.excluded)} generation(s) left out of the steady state ({kinds}); see the excluded runs")
    between = _between(f, t)
    if between is not None and between.waiting:  # context, not a doubt: the confidence stays
        caveats.append(between.waiting_summary())
    return ("low", "medium", "high")[level], tuple(caveats)
