"""A scriptable stand-in for the `torch.cuda` memory API subset that zmon.providers.allocator uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
MIB = 1024**2


@dataclass
class FakeDevice:
    """One GPU's allocator state; tests set fields directly to script a scenario."""

    total: int = 80 * GIB
    allocated: int = 0
    reserved: int = 0
    active: int | None = None  # None: same as allocated
    requested: int | None = None  # None: same as allocated
    inactive_split: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_inactive_split: int = 0
    segments: int = 0
    alloc_retries: int = 0
    ooms: int = 0
    sync_all_streams: int = 0
    device_allocs: int = 0
    device_frees: int = 0
    other_processes: int = 0  # memory used on the card outside this process
    # When set, empty_cache leaves this much of the unallocated cache reserved (split blocks it cannot free).
    unreleasable: int = 0
    extra_stats: dict[str, Any] = field(default_factory=dict)
    drop_keys: set[str] = field(default_factory=set)  # keys an older torch would not report

    def set(
        self, *, allocated: int | None = None, reserved: int | None = None, inactive_split: int | None = None
    ) -> None:
        """Change current values and keep the peaks consistent, as the real allocator does."""
        if allocated is not None:
            self.allocated = allocated
        if reserved is not None:
            self.reserved = reserved
        if inactive_split is not None:
            self.inactive_split = inactive_split
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.peak_inactive_split = max(self.peak_inactive_split, self.inactive_split)


class FakeTorchCuda:
    """Mimics `torch.cuda`: is_available, is_initialized, device_count, current_device, memory_stats,
    mem_get_info, memory_allocated, memory_reserved, empty_cache (frees unallocated cache down to the
    device's `unreleasable` bytes), get_allocator_backend. Calls are counted in `calls`."""

    def __init__(
        self, devices: int = 1, *, available: bool = True, initialized: bool = True, backend: str = "native"
    ) -> None:
        self.devices = [FakeDevice() for _ in range(devices)]
        self.available = available
        self.initialized = initialized
        self.backend = backend
        self.current = 0
        self.empty_cache_error: Exception | None = None
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def is_available(self) -> bool:
        self._count("is_available")
        return self.available

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        return len(self.devices) if self.available else 0

    def current_device(self) -> int:
        return self.current

    def get_allocator_backend(self) -> str:
        return self.backend

    def _dev(self, device: int | None) -> FakeDevice:
        return self.devices[self.current if device is None else device]

    def memory_stats(self, device: int | None = None) -> dict[str, Any]:
        self._count("memory_stats")
        if not self.initialized:
            return {}
        d = self._dev(device)
        active = d.allocated if d.active is None else d.active
        requested = d.allocated if d.requested is None else d.requested
        stats: dict[str, Any] = {
            "allocated_bytes.all.current": d.allocated,
            "allocated_bytes.all.peak": d.peak_allocated,
            "reserved_bytes.all.current": d.reserved,
            "reserved_bytes.all.peak": d.peak_reserved,
            "active_bytes.all.current": active,
            "active_bytes.all.peak": max(active, d.peak_allocated),
            "requested_bytes.all.current": requested,
            "requested_bytes.all.peak": max(requested, d.peak_allocated),
            "inactive_split_bytes.all.current": d.inactive_split,
            "inactive_split_bytes.all.peak": d.peak_inactive_split,
            "segment.all.current": d.segments,
            "num_alloc_retries": d.alloc_retries,
            "num_ooms": d.ooms,
            "num_sync_all_streams": d.sync_all_streams,
            "num_device_alloc": d.device_allocs,
            "num_device_free": d.device_frees,
            **d.extra_stats,
        }
        for k in d.drop_keys:
            stats.pop(k, None)
        return stats

    def mem_get_info(self, device: int | None = None) -> tuple[int, int]:
        self._count("mem_get_info")
        d = self._dev(device)
        return d.total - d.reserved - d.other_processes, d.total

    def memory_allocated(self, device: int | None = None) -> int:
        return self._dev(device).allocated

    def memory_reserved(self, device: int | None = None) -> int:
        return self._dev(device).reserved

    def empty_cache(self) -> None:
        self._count("empty_cache")
        if self.empty_cache_error is not None:
            raise self.empty_cache_error
        for d in self.devices:
            keep = min(d.unreleasable, d.reserved - d.allocated)
            new_reserved = d.allocated + keep
            if new_reserved < d.reserved:
                d.device_frees += 1
            d.reserved = new_reserved
            d.inactive_split = min(d.inactive_split, keep)
