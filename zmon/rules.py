"""The rule language shared by the policy and the diagnosis: figure names, one comparator, the policy Rule.

A *figure* is one named number zmon measures, e.g. `torch_reserved_unallocated_ratio` (sampled: every
allocator sample) or `denoise_step_cv` (a window of generations: the diagnosis). Policy rules
(`policy.rules`) and diagnosis thresholds (`profiling.thresholds`) both name their figure from `FIGURES` and
compare it with `compare()`, so the same signal has one name and one comparison everywhere.

This module is the bottom layer: it imports nothing from zmon.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Op = Literal[">", ">=", "<", "<=", "==", "!="]
ActionName = Literal["empty_cache", "gc_collect", "alert", "log"]
Severity = Literal["info", "warning", "critical"]
Scope = Literal["sample", "window"]

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


def compare(value: float | None, op: str, threshold: float | None) -> bool | None:
    """`value op threshold`; None when either side is unknown (an unknown figure never fires)."""
    if value is None or threshold is None:
        return None
    return OPS[op](value, threshold)


# Actions with side effects on the watched process: run only at safe points (between generations, idle).
REMEDIAL_ACTIONS: frozenset[str] = frozenset({"empty_cache", "gc_collect"})


@dataclass(frozen=True)
class Figure:
    """One named figure: what it means, its unit, and where it exists.

    scope "sample": known at every sample of its source, so policy rules may use it; "window": computed by
    the diagnosis over a window of generations (profile or live), used by `profiling.thresholds`.
    """

    help: str
    unit: str = ""
    scope: Scope = "sample"


FIGURES: dict[str, Figure] = {
    # allocator levels (bytes) and ratios (0..1), per device
    "torch_allocated_bytes": Figure("memory occupied by live tensors", "B"),
    "torch_reserved_bytes": Figure("memory held by the caching allocator, cache included", "B"),
    "torch_active_bytes": Figure("allocated plus blocks awaiting release by pending stream work", "B"),
    "torch_requested_bytes": Figure("memory requested before the allocator's rounding", "B"),
    "torch_inactive_split_bytes": Figure("free pieces of partly-used segments (real fragmentation)", "B"),
    "torch_peak_allocated_bytes": Figure("peak allocated since start or last reset", "B"),
    "torch_peak_reserved_bytes": Figure("peak reserved since start or last reset", "B"),
    "torch_segments": Figure("segments obtained from the driver", "count"),
    "torch_device_free_bytes": Figure("free memory on the whole device", "B"),
    "torch_device_total_bytes": Figure("total memory of the device", "B"),
    "torch_headroom_bytes": Figure("device free memory plus this process's unallocated cache", "B"),
    "torch_headroom_ratio": Figure("headroom / device total", "ratio"),
    "torch_reserved_ratio": Figure("reserved / device total", "ratio"),
    "torch_reserved_unallocated_ratio": Figure("(reserved − allocated) / reserved: mostly reusable cache", "ratio"),
    "torch_fragmentation_ratio": Figure(
        "inactive_split / reserved: real fragmentation (0 with expandable segments)", "ratio"
    ),
    # allocator counters: totals since start and increase since the previous sample
    "torch_alloc_retries_total": Figure("cudaMalloc retries after a cache flush, since start", "count"),
    "torch_ooms_total": Figure("allocator out-of-memory errors, since start", "count"),
    "torch_alloc_retries_delta": Figure("cudaMalloc retries since the previous sample", "count"),
    "torch_ooms_delta": Figure("out-of-memory errors since the previous sample", "count"),
    "torch_sync_all_streams_delta": Figure("allocator stream synchronisations since the previous sample", "count"),
    "torch_device_allocs_delta": Figure("cudaMalloc / cuMemMap calls since the previous sample", "count"),
    "torch_device_frees_delta": Figure("cudaFree / cuMemUnmap calls since the previous sample", "count"),
    # other sources (NVML, host, the watched process, generations)
    "gpu_utilization_ratio": Figure("NVML GPU utilization, 0..1 (diagnosis: mean during diffusion)", "ratio"),
    "gpu_memory_used_ratio": Figure("NVML used / total device memory, 0..1 (diagnosis: peak)", "ratio"),
    "gpu_temperature_celsius": Figure("NVML GPU temperature", "celsius"),
    "gpu_power_watts": Figure("NVML power draw", "W"),
    "host_cpu_utilization_ratio": Figure("host CPU busy share, 0..1", "ratio"),
    "host_memory_available_ratio": Figure("host available / total memory, 0..1", "ratio"),
    "process_cpu_utilization_ratio": Figure("watched process CPU use as a share of all cores, 0..1", "ratio"),
    "generation_seconds": Figure("duration of the last generation", "s"),
    "generations_delta": Figure("generations finished since the previous evaluation", "count"),
    # diagnosis figures, over a window of generations
    "denoise_step_seconds": Figure("mean time of a denoise step", "s", "window"),
    "denoise_step_cv": Figure("coefficient of variation of step times within a generation", "cv", "window"),
    "run_time_cv": Figure("run-to-run coefficient of variation of generations of one shape", "cv", "window"),
    "checkpoint_bytes": Figure("size of the checkpoint files read at load", "B", "window"),
    "checkpoint_read_bytes_per_second": Figure("checkpoint bytes / load time (or a disk read test)", "B/s", "window"),
    "checkpoint_load_seconds": Figure("time to load the checkpoint", "s", "window"),
    "first_generation_slowdown_ratio": Figure("first generation / steady-state median", "x", "window"),
    "text_encode_share_ratio": Figure("text encoding share of a generation", "ratio", "window"),
    "postprocess_share_ratio": Figure("output processing share of a generation", "ratio", "window"),
    "process_cpu_cores": Figure("CPU seconds per second of the process (1.0 = one core busy)", "cores", "window"),
    "latency_trend_ratio": Figure("median latency of the late runs / of the early runs", "x", "window"),
    "nccl_time_share_ratio": Figure("share of time in NCCL collectives", "ratio", "window"),
    "scaling_efficiency_ratio": Figure("multi-GPU speedup / GPU count", "ratio", "window"),
    "untimed_share_ratio": Figure("share of a generation outside every timed stage", "ratio", "window"),
    "generation_read_bytes_per_second": Figure("storage reads during generations", "B/s", "window"),
    "run_time_outlier_ratio": Figure("a generation's time / the steady-state median", "x", "window"),
    "gpu_idle_ratio": Figure("share of a generation the GPU sat idle", "ratio", "window"),
    "between_generations_idle_share_ratio": Figure(
        "share of the wall time the GPU waited between pipeline calls", "ratio", "window"
    ),
    "between_generations_process_cpu_cores": Figure(
        "CPU seconds per second of the process between pipeline calls", "cores", "window"
    ),
}
KNOWN_FIGURES: frozenset[str] = frozenset(FIGURES)
SAMPLE_FIGURES: frozenset[str] = frozenset(k for k, f in FIGURES.items() if f.scope == "sample")


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_RULE_SECONDS = 7 * 86400.0  # for_seconds, keep_firing_seconds, cooldown_seconds: a week at most


def default_alertname(rule_name: str) -> str:
    """reserved_unallocated_high → ZmonReservedUnallocatedHigh (Prometheus alert naming)."""
    return "Zmon" + "".join(p.capitalize() for p in rule_name.split("_") if p)


class Rule(BaseModel):
    """One policy rule (an item of `policy.rules`); unknown figures, operators and keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str  # snake_case, unique; label `rule` on metrics and alerts (in YAML: the key under policy.rules)
    enabled: bool = True  # false: the rule is not evaluated (how a default rule is switched off)
    metric: str  # a figure name (see FIGURES; scope "sample")
    op: Op = ">"
    threshold: float
    # Hysteresis: once firing, the rule stays firing while `value op clear` holds. Default: threshold.
    clear: float | None = None
    for_samples: int | None = Field(None, ge=1, le=1_000_000)  # consecutive matching evaluations before firing
    for_seconds: float | None = Field(None, ge=0, le=MAX_RULE_SECONDS)  # continuous matching time before firing
    # Once the clear level is reached, stay firing this long anyway (counter rules: avoid flapping).
    keep_firing_seconds: float = Field(0.0, ge=0, le=MAX_RULE_SECONDS)
    cooldown_seconds: float = Field(300.0, ge=0, le=MAX_RULE_SECONDS)  # minimum time between two actions
    # After this many ineffective remedial actions in a row, stop acting and raise <alertname>Persists.
    # An action is ineffective when the rule is firing again (or still) within cooldown_seconds of it.
    persist_after: int | None = Field(3, ge=1, le=1000)
    actions: tuple[ActionName, ...] = ("alert",)
    severity: Severity = "warning"
    alertname: str | None = None  # default: Zmon + CamelCase(name)
    summary: str = ""
    description: str = ""
    persist_summary: str = ""
    persist_description: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be snake_case: lower-case letters, digits and _, starting with a letter")
        return v

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, v: str) -> str:
        if v not in SAMPLE_FIGURES:
            raise ValueError(f"unknown metric {v!r}; valid names: {', '.join(sorted(SAMPLE_FIGURES))}")
        return v

    @field_validator("alertname")
    @classmethod
    def _check_alertname(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError("must be a valid Prometheus label value for alertname: letters, digits, _")
        return v

    @model_validator(mode="after")
    def _check(self) -> Rule:
        if self.for_samples is not None and self.for_seconds is not None:
            raise ValueError("set for_samples or for_seconds, not both")
        if self.clear is not None:
            if self.op in (">", ">=") and self.clear > self.threshold:
                raise ValueError(f"clear ({self.clear}) must be <= threshold ({self.threshold}) for op {self.op}")
            if self.op in ("<", "<=") and self.clear < self.threshold:
                raise ValueError(f"clear ({self.clear}) must be >= threshold ({self.threshold}) for op {self.op}")
            if self.op in ("==", "!=") and self.clear != self.threshold:
                raise ValueError(f"clear has no meaning for op {self.op}; leave it out")
        if len(set(self.actions)) != len(self.actions):
            raise ValueError("actions listed twice")
        return self

    @property
    def clear_level(self) -> float:
        return self.threshold if self.clear is None else self.clear

    @property
    def alert_name(self) -> str:
        return self.alertname or default_alertname(self.name)

    @property
    def remedial_actions(self) -> tuple[str, ...]:
        return tuple(a for a in self.actions if a in REMEDIAL_ACTIONS)

    def matches(self, value: float | None) -> bool:
        """The firing condition: `value op threshold` (an absent value never matches)."""
        return bool(compare(value, self.op, self.threshold))

    def holds(self, value: float | None) -> bool:
        """The staying condition while firing: `value op clear`."""
        return bool(compare(value, self.op, self.clear_level))


def default_rules() -> list[Rule]:
    """The rules in effect when `policy.rules` is not configured."""
    return [
        Rule(
            name="reserved_unallocated_high",
            metric="torch_reserved_unallocated_ratio",
            op=">",
            threshold=0.30,
            clear=0.25,
            for_samples=3,
            cooldown_seconds=300,
            persist_after=3,
            actions=("empty_cache", "alert"),
            severity="warning",
            summary="Allocator holds over 30% of its reserved memory unallocated",
            description=(
                "(reserved − allocated) / reserved has stayed above 30%. This is mostly cache the allocator "
                "keeps for the largest shape seen, not fragmentation; zmon releases it with empty_cache "
                "between generations. Check zmon_torch_fragmentation_ratio for real fragmentation."
            ),
            persist_summary=("fragmentation persists — consider expandable_segments / fixed resolution buckets"),
            persist_description=(
                "empty_cache did not keep the reserved-unallocated share below the threshold several times "
                "in a row, so zmon stopped calling it. Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                "(never with max_split_size_mb), pre-warm the largest shape, or serve a few fixed "
                "resolutions."
            ),
        ),
        Rule(
            name="alloc_retries_rising",
            metric="torch_alloc_retries_delta",
            op=">",
            threshold=0,
            keep_firing_seconds=600,
            cooldown_seconds=0,
            actions=("alert",),
            severity="warning",
            summary="CUDA allocator retried allocations after flushing its cache",
            description=(
                "num_alloc_retries rose: cudaMalloc failed and the allocator freed its cache to retry, a "
                "synchronising slow path that precedes out-of-memory errors. Memory is tight or fragmented."
            ),
        ),
        Rule(
            name="ooms_rising",
            metric="torch_ooms_delta",
            op=">",
            threshold=0,
            keep_firing_seconds=600,
            cooldown_seconds=0,
            actions=("alert",),
            severity="critical",
            summary="CUDA out-of-memory errors in the watched process",
            description=(
                "num_ooms rose: generations failed with CUDA out of memory. Compare "
                "zmon_torch_headroom_bytes with the peak of the largest resolution; look at "
                "zmon_torch_fragmentation_ratio."
            ),
        ),
    ]
