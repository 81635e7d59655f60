"""Policy figures: the flat dict of named numbers (see zmon.rules.FIGURES) that rules are evaluated on.

`build_figures(sample, previous, device=0, extra={...})` builds it for one device from two consecutive
AllocatorSamples (counter deltas need both); other sources (NVML, host, generations) contribute through
`extra`, using names from zmon.rules.FIGURES. A figure that is unknown in a sample is simply absent.
"""

from __future__ import annotations

from collections.abc import Mapping

from zmon.providers.allocator import AllocatorSample, DeviceAllocatorStats
from zmon.rules import SAMPLE_FIGURES

_COUNTER_DELTAS: tuple[tuple[str, str], ...] = (
    ("torch_alloc_retries_delta", "alloc_retries"),
    ("torch_ooms_delta", "ooms"),
    ("torch_sync_all_streams_delta", "sync_all_streams"),
    ("torch_device_allocs_delta", "device_allocs"),
    ("torch_device_frees_delta", "device_frees"),
)


def device_figures(dev: DeviceAllocatorStats, previous: DeviceAllocatorStats | None = None) -> dict[str, float]:
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
        if k not in SAMPLE_FIGURES:
            raise ValueError(f"unknown figure {k!r}; valid: {', '.join(sorted(SAMPLE_FIGURES))}")
        if v is not None:
            figures[k] = float(v)
    return figures
