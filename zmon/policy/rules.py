"""Policy rules: the figures a rule may reference, comparison operators, the rule model and the defaults.

A *figure* is one number in a flat dict built from the latest samples, e.g.
`{"torch_reserved_unallocated_ratio": 0.34, "torch_alloc_retries_delta": 0.0, ...}`.
`build_figures(sample, previous, device=0, extra={...})` builds it for one device from two consecutive
AllocatorSamples (counter deltas need both); other sources (NVML, host, generations) contribute through
`extra`, using the names listed in FIGURES. A figure that is unknown in a sample is simply absent.

A rule's YAML form (all keys, see `Rule`)::

    - name: reserved_unallocated_high
      metric: torch_reserved_unallocated_ratio
      op: ">"
      threshold: 0.30
      clear: 0.25            # hysteresis: firing ends when the value is no longer > 0.25
      for_samples: 3         # or for_seconds: 30 (not both)
      cooldown_seconds: 300  # at least this long between actions of the rule
      persist_after: 3       # after 3 ineffective actions in a row: stop acting, raise <Alertname>Persists
      actions: [empty_cache, alert]
      severity: warning
      summary: ...
      description: ...
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zmon.providers.allocator import AllocatorSample, DeviceAllocatorStats

Op = Literal[">", ">=", "<", "<=", "==", "!="]
ActionName = Literal["empty_cache", "gc_collect", "alert", "log"]
Severity = Literal["info", "warning", "critical"]

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}

# Actions with side effects on the watched process: run only at safe points (between generations, idle).
REMEDIAL_ACTIONS: frozenset[str] = frozenset({"empty_cache", "gc_collect"})

# Every figure a rule may use, with its meaning. Allocator figures come from build_figures; the others are
# supplied by their sources through `extra` (absent when that source is off).
FIGURES: dict[str, str] = {
    # allocator levels (bytes) and ratios (0..1), per device
    "torch_allocated_bytes": "memory occupied by live tensors",
    "torch_reserved_bytes": "memory held by the caching allocator, cache included",
    "torch_active_bytes": "allocated plus blocks awaiting release by pending stream work",
    "torch_requested_bytes": "memory requested before the allocator's rounding",
    "torch_inactive_split_bytes": "free pieces of partly-used segments (real fragmentation)",
    "torch_peak_allocated_bytes": "peak allocated since start or last reset",
    "torch_peak_reserved_bytes": "peak reserved since start or last reset",
    "torch_segments": "segments obtained from the driver",
    "torch_device_free_bytes": "free memory on the whole device",
    "torch_device_total_bytes": "total memory of the device",
    "torch_headroom_bytes": "device free memory plus this process's unallocated cache",
    "torch_headroom_ratio": "headroom / device total",
    "torch_reserved_ratio": "reserved / device total",
    "torch_reserved_unallocated_ratio": "(reserved − allocated) / reserved: mostly reusable cache",
    "torch_fragmentation_ratio": "inactive_split / reserved: real fragmentation (0 with expandable segments)",
    # allocator counters: totals since start and increase since the previous sample
    "torch_alloc_retries_total": "cudaMalloc retries after a cache flush, since start",
    "torch_ooms_total": "allocator out-of-memory errors, since start",
    "torch_alloc_retries_delta": "cudaMalloc retries since the previous sample",
    "torch_ooms_delta": "out-of-memory errors since the previous sample",
    "torch_sync_all_streams_delta": "allocator stream synchronisations since the previous sample",
    "torch_device_allocs_delta": "cudaMalloc / cuMemMap calls since the previous sample",
    "torch_device_frees_delta": "cudaFree / cuMemUnmap calls since the previous sample",
    # supplied through `extra` by other sources
    "gpu_utilization_ratio": "NVML GPU utilization, 0..1",
    "gpu_memory_used_ratio": "NVML used / total device memory, 0..1",
    "gpu_temperature_celsius": "NVML GPU temperature",
    "gpu_power_watts": "NVML power draw",
    "host_cpu_utilization_ratio": "host CPU busy share, 0..1",
    "host_memory_available_ratio": "host available / total memory, 0..1",
    "process_cpu_utilization_ratio": "watched process CPU use as a share of all cores, 0..1",
    "generation_seconds": "duration of the last generation",
    "generations_delta": "generations finished since the previous evaluation",
}
KNOWN_FIGURES: frozenset[str] = frozenset(FIGURES)

_COUNTER_DELTAS: tuple[tuple[str, str], ...] = (
    ("torch_alloc_retries_delta", "alloc_retries"),
    ("torch_ooms_delta", "ooms"),
    ("torch_sync_all_streams_delta", "sync_all_streams"),
    ("torch_device_allocs_delta", "device_allocs"),
    ("torch_device_frees_delta", "device_frees"),
)


def device_figures(
    dev: DeviceAllocatorStats, previous: DeviceAllocatorStats | None = None
) -> dict[str, float]:
    """Allocator figures of one device; `previous` (the same device one sample earlier) gives the deltas."""
    raw: dict[str, float | int | None] = {
        "torch_allocated_bytes": dev.allocated_bytes,
        "torch_reserved_bytes": dev.reserved_bytes,
        "torch_active_bytes": dev.active_bytes,
        "torch_requested_bytes": dev.requested_bytes,
        "torch_inactive_split_bytes": dev.inactive_split_bytes,
        "torch_peak_allocated_bytes": dev.peak_allocated_bytes,
        "torch_peak_reserved_bytes": dev.peak_reserved_bytes,
        "torch_segments": dev.segments,
        "torch_device_free_bytes": dev.free_bytes,
        "torch_device_total_bytes": dev.total_bytes,
        "torch_headroom_bytes": dev.headroom_bytes,
        "torch_reserved_unallocated_ratio": dev.reserved_unallocated_ratio,
        "torch_fragmentation_ratio": dev.fragmentation_ratio,
        "torch_alloc_retries_total": dev.alloc_retries,
        "torch_ooms_total": dev.ooms,
    }
    if dev.total_bytes:
        raw["torch_reserved_ratio"] = dev.reserved_bytes / dev.total_bytes
        if dev.headroom_bytes is not None:
            raw["torch_headroom_ratio"] = dev.headroom_bytes / dev.total_bytes
    if previous is not None:
        for fig, attr in _COUNTER_DELTAS:
            now_v, prev_v = getattr(dev, attr), getattr(previous, attr)
            # A decrease means the counters were reset (reset_accumulated_memory_stats): unknown.
            if now_v is not None and prev_v is not None and now_v >= prev_v:
                raw[fig] = now_v - prev_v
    return {k: float(v) for k, v in raw.items() if v is not None}


def build_figures(
    sample: AllocatorSample | None,
    previous: AllocatorSample | None = None,
    *,
    device: int | None = None,
    extra: Mapping[str, float | None] | None = None,
) -> dict[str, float]:
    """The flat figures dict for one device (default: the sample's first device) plus `extra` figures.

    `previous` is the preceding sample (for counter deltas). `extra` keys must be in KNOWN_FIGURES (a typo
    raises ValueError); None values are dropped (unknown is absent).
    """
    figures: dict[str, float] = {}
    if sample is not None and sample.devices:
        dev = sample.devices[0] if device is None else sample.device(device)
        if dev is not None:
            prev = None if previous is None else previous.device(dev.device)
            figures.update(device_figures(dev, prev))
    for k, v in (extra or {}).items():
        if k not in KNOWN_FIGURES:
            raise ValueError(f"unknown figure {k!r}; valid: {', '.join(sorted(KNOWN_FIGURES))}")
        if v is not None:
            figures[k] = float(v)
    return figures


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def default_alertname(rule_name: str) -> str:
    """reserved_unallocated_high → ZmonReservedUnallocatedHigh (Prometheus alert naming)."""
    return "Zmon" + "".join(p.capitalize() for p in rule_name.split("_") if p)


class Rule(BaseModel):
    """One policy rule (an item of `policy.rules`); unknown figures, operators and keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # snake_case, unique; label `rule` on metrics and alerts
    metric: str  # a figure name (see FIGURES)
    op: Op = ">"
    threshold: float
    # Hysteresis: once firing, the rule stays firing while `value op clear` holds. Default: threshold.
    clear: float | None = None
    for_samples: int | None = Field(None, ge=1)  # consecutive matching evaluations before firing
    for_seconds: float | None = Field(None, ge=0)  # continuous matching time before firing
    # Once the clear level is reached, stay firing this long anyway (counter rules: avoid flapping).
    keep_firing_seconds: float = Field(0.0, ge=0)
    cooldown_seconds: float = Field(300.0, ge=0)  # minimum time between two actions of this rule
    # After this many ineffective remedial actions in a row, stop acting and raise <alertname>Persists.
    # An action is ineffective when the rule is firing again (or still) within cooldown_seconds of it.
    persist_after: int | None = Field(3, ge=1)
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
        if v not in KNOWN_FIGURES:
            raise ValueError(f"unknown metric {v!r}; valid names: {', '.join(sorted(KNOWN_FIGURES))}")
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
                raise ValueError(
                    f"clear ({self.clear}) must be <= threshold ({self.threshold}) for op {self.op}"
                )
            if self.op in ("<", "<=") and self.clear < self.threshold:
                raise ValueError(
                    f"clear ({self.clear}) must be >= threshold ({self.threshold}) for op {self.op}"
                )
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
        return value is not None and OPS[self.op](value, self.threshold)

    def holds(self, value: float | None) -> bool:
        """The staying condition while firing: `value op clear`."""
        return value is not None and OPS[self.op](value, self.clear_level)


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
            persist_summary=(
                "fragmentation persists — consider expandable_segments / fixed resolution buckets"
            ),
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


def rules_from_yaml(data: Any) -> list[Rule]:
    """Validate a YAML-loaded list of rule mappings (helper for tests and `zmon` tooling)."""
    if not isinstance(data, list):
        raise ValueError("rules must be a list")
    return [Rule.model_validate(item) for item in data]
