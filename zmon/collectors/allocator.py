"""PyTorch caching-allocator families (zmon_torch_*) from the latest AllocatorSample in the store.

Wiring: `registry.register(Guarded("allocator", AllocatorCollector(store), errors))`, with the
AllocatorProvider sampled into the same store under the source name "allocator". Scrapes never call torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.providers.allocator import AllocatorSample, DeviceAllocatorStats
from zmon.sampling.store import SnapshotStore

# (name, HELP, value of one device or None when unknown) — gauges.
_GAUGES: tuple[tuple[str, str, Callable[[DeviceAllocatorStats], float | None]], ...] = (
    (
        "zmon_torch_allocated_bytes",
        "Memory occupied by live tensors (allocator: allocated_bytes.all.current).",
        lambda d: d.allocated_bytes,
    ),
    (
        "zmon_torch_reserved_bytes",
        "Memory the caching allocator holds from the driver, cache included.",
        lambda d: d.reserved_bytes,
    ),
    (
        "zmon_torch_active_bytes",
        "Allocated memory plus blocks awaiting release by pending stream work.",
        lambda d: d.active_bytes,
    ),
    (
        "zmon_torch_requested_bytes",
        "Memory requested by callers before the allocator's size rounding.",
        lambda d: d.requested_bytes,
    ),
    (
        "zmon_torch_inactive_split_bytes",
        "Free pieces of partly-used segments that cannot be released (real fragmentation; 0 with expandable segments).",
        lambda d: d.inactive_split_bytes,
    ),
    (
        "zmon_torch_peak_allocated_bytes",
        "Peak of allocated memory since start or the last peak reset.",
        lambda d: d.peak_allocated_bytes,
    ),
    (
        "zmon_torch_peak_reserved_bytes",
        "Peak of reserved memory since start or the last peak reset.",
        lambda d: d.peak_reserved_bytes,
    ),
    (
        "zmon_torch_peak_inactive_split_bytes",
        "Peak of inactive split memory since start or the last peak reset.",
        lambda d: d.peak_inactive_split_bytes,
    ),
    ("zmon_torch_segments", "Memory segments currently obtained from the driver.", lambda d: d.segments),
    (
        "zmon_torch_device_free_bytes",
        "Free memory on the whole device (cudaMemGetInfo), other processes included.",
        lambda d: d.free_bytes,
    ),
    (
        "zmon_torch_device_total_bytes",
        "Total memory of the device (cudaMemGetInfo).",
        lambda d: d.total_bytes,
    ),
    (
        "zmon_torch_reserved_unallocated_ratio",
        "(reserved - allocated) / reserved: mostly reusable allocator cache, not fragmentation.",
        lambda d: d.reserved_unallocated_ratio,
    ),
    (
        "zmon_torch_fragmentation_ratio",
        "inactive_split / reserved: memory stuck in split segments (reads 0 with expandable segments).",
        lambda d: d.fragmentation_ratio,
    ),
    (
        "zmon_torch_headroom_bytes",
        "Memory this process could still allocate: device free plus its unallocated cache.",
        lambda d: d.headroom_bytes,
    ),
)

# Counters: exported with the _total suffix that CounterMetricFamily adds.
_COUNTERS: tuple[tuple[str, str, Callable[[DeviceAllocatorStats], float | None]], ...] = (
    (
        "zmon_torch_alloc_retries",
        "Failed cudaMalloc calls that forced a cache flush and retry.",
        lambda d: d.alloc_retries,
    ),
    ("zmon_torch_ooms", "Out-of-memory errors raised by the caching allocator.", lambda d: d.ooms),
    (
        "zmon_torch_sync_all_streams",
        "Allocator synchronize_and_free_events calls (each stalls the device).",
        lambda d: d.sync_all_streams,
    ),
    (
        "zmon_torch_device_allocs",
        "cudaMalloc / cuMemMap calls made by the allocator.",
        lambda d: d.device_allocs,
    ),
    (
        "zmon_torch_device_frees",
        "cudaFree / cuMemUnmap calls made by the allocator.",
        lambda d: d.device_frees,
    ),
)


class AllocatorCollector:
    """Builds fresh zmon_torch_* families, one series per CUDA device (label `device`), at each scrape."""

    def __init__(self, store: SnapshotStore, source: str = "allocator") -> None:
        self.store = store
        self.source = source

    def collect(self) -> Iterable[Metric]:
        sample = self.store.latest(self.source)
        if not isinstance(sample, AllocatorSample):
            return []
        return self.families(sample)

    @staticmethod
    def families(sample: AllocatorSample) -> list[Metric]:
        """The families for one sample (also used by `zmon profile` reports)."""
        out: list[Metric] = []
        for name, help_text, get in _GAUGES:
            g = GaugeMetricFamily(name, help_text, labels=["device"])
            for d in sample.devices:
                v = get(d)
                if v is not None:
                    g.add_metric([str(d.device)], float(v))
            out.append(g)
        for name, help_text, get in _COUNTERS:
            c = CounterMetricFamily(name, help_text, labels=["device"])
            for d in sample.devices:
                v = get(d)
                if v is not None:
                    c.add_metric([str(d.device)], float(v))
            out.append(c)
        info = InfoMetricFamily(
            "zmon_torch_allocator",
            "Caching allocator configuration (PYTORCH_CUDA_ALLOC_CONF) of the watched process; constant 1.",
        )
        s = sample.settings
        info.add_metric(
            [],
            {
                "alloc_conf": s.alloc_conf,
                "expandable_segments": "true" if s.expandable_segments else "false",
                "backend": s.backend,
            },
        )
        out.append(info)
        initialized = GaugeMetricFamily(
            "zmon_torch_cuda_initialized",
            "1 once the watched process has initialised CUDA (allocator statistics exist), else 0.",
        )
        initialized.add_metric([], 1.0 if sample.cuda_initialized else 0.0)
        out.append(initialized)
        return out
