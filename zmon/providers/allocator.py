"""PyTorch CUDA caching-allocator statistics: the only module touching torch.cuda memory APIs.

Usage (the sampler calls `sample()` on its interval; ~0.1 ms per device, no device synchronisation)::

    provider = AllocatorProvider()            # torch is imported lazily, on the first sample
    sample = provider.sample()                # AllocatorSample, or raises SourceUnavailable
    for dev in sample.devices:
        dev.reserved_unallocated_ratio        # (reserved − allocated) / reserved: mostly reusable cache
        dev.fragmentation_ratio               # inactive_split / reserved: real fragmentation
        dev.headroom_bytes                    # mem_get_info().free + (reserved − allocated)

Honest names (see docs): what the source article calls "fragmentation", (reserved − allocated) / reserved,
is memory the caching allocator keeps for reuse, sized for the largest shape seen; it is exported as
`reserved_unallocated_ratio`. Real fragmentation is the free part of partly-used segments that cannot be
released, `inactive_split_bytes / reserved_bytes` (`fragmentation_ratio`); it reads 0 under
`expandable_segments:True`, so the allocator configuration is part of every sample.

Allocator statistics exist only inside the process that owns the CUDA context. Until that process has
initialised CUDA the sample carries no devices (`cuda_initialized=False`) rather than creating a context:
`mem_get_info` on an untouched GPU would allocate one (hundreds of MB). For the same reason, with
`devices=None` only devices the allocator has used (plus the current one) are read.

Side effects for remediation (`empty_cache`, reserved totals) live in zmon.providers.cuda, the one module
that calls into torch.cuda.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zmon.providers.base import SourceUnavailable, nvidia_devices_present
from zmon.providers.cuda import cuda_ready, load_torch_cuda

# PyTorch ≥ 2.9 reads PYTORCH_ALLOC_CONF and still honours the older CUDA-specific name.
ALLOC_CONF_ENV_VARS: tuple[str, ...] = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")

_TRUE = frozenset({"true", "1", "yes", "on"})


@dataclass(frozen=True)
class AllocatorSettings:
    """The caching allocator's configuration, parsed from the environment string.

    `alloc_conf` is the raw value ("" when unset); `options` its `key:value` pairs in order.
    """

    alloc_conf: str = ""
    env_var: str | None = None  # which variable it came from
    options: tuple[tuple[str, str], ...] = ()
    expandable_segments: bool = False
    backend: str = "native"  # "native" or "cudaMallocAsync"
    max_split_size_mb: int | None = None

    def option(self, key: str) -> str | None:
        for k, v in self.options:
            if k == key:
                return v
        return None


def parse_alloc_conf(value: str, env_var: str | None = None) -> AllocatorSettings:
    """Parse a `PYTORCH_CUDA_ALLOC_CONF` string such as "expandable_segments:True,max_split_size_mb:128".

    Unknown keys are kept in `options`; malformed items (no colon) are ignored, as PyTorch would reject them
    at start-up anyway.
    """
    value = value.strip()
    options: list[tuple[str, str]] = []
    for item in value.split(","):
        key, sep, val = item.partition(":")
        if sep and key.strip():
            options.append((key.strip(), val.strip()))
    opts = dict(options)
    max_split: int | None = None
    raw_split = opts.get("max_split_size_mb")
    if raw_split is not None:
        try:
            max_split = int(raw_split)
        except ValueError:
            max_split = None
    return AllocatorSettings(
        alloc_conf=value,
        env_var=env_var,
        options=tuple(options),
        expandable_segments=opts.get("expandable_segments", "").lower() in _TRUE,
        backend=opts.get("backend", "native") or "native",
        max_split_size_mb=max_split,
    )


def settings_from_env(environ: Mapping[str, str] | None = None) -> AllocatorSettings:
    """The allocator settings this process started with (PYTORCH_ALLOC_CONF wins over the older name)."""
    env = os.environ if environ is None else environ
    for var in ALLOC_CONF_ENV_VARS:
        raw = env.get(var)
        if raw:
            return parse_alloc_conf(raw, var)
    return AllocatorSettings()


@dataclass(frozen=True)
class DeviceAllocatorStats:
    """One CUDA device as seen by this process's caching allocator. Bytes; counters since process start.

    A field is None when this torch version does not report it (unknown is absent, never 0).
    """

    device: int
    allocated_bytes: int  # memory occupied by live tensors ("allocated_bytes.all.current")
    reserved_bytes: int  # memory held from the driver by the allocator, cache included
    active_bytes: int | None  # allocated plus blocks waiting for pending stream work to free them
    requested_bytes: int | None  # what callers asked for, before the allocator's rounding
    inactive_split_bytes: int | None  # free pieces of partly-used segments: cannot be released
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_active_bytes: int | None
    peak_requested_bytes: int | None
    peak_inactive_split_bytes: int | None
    segments: int | None  # segments currently obtained from cudaMalloc / cuMemMap
    alloc_retries: int | None  # failed cudaMalloc calls that forced a cache flush and retry
    ooms: int | None  # out-of-memory errors raised by the allocator
    sync_all_streams: int | None  # synchronize_and_free_events calls (each stalls the device)
    device_allocs: int | None  # cudaMalloc / cuMemMap calls
    device_frees: int | None  # cudaFree / cuMemUnmap calls
    free_bytes: int | None  # device-wide free memory (cudaMemGetInfo), other processes included
    total_bytes: int | None  # device memory size (cudaMemGetInfo)

    @property
    def reserved_unallocated_bytes(self) -> int:
        """Reserved but not allocated: the allocator's reusable cache plus any fragmentation."""
        return max(0, self.reserved_bytes - self.allocated_bytes)

    @property
    def reserved_unallocated_ratio(self) -> float | None:
        """(reserved − allocated) / reserved, 0..1: the article's "fragmentation", mostly reusable cache.

        None when nothing is reserved.
        """
        if self.reserved_bytes <= 0:
            return None
        return min(1.0, self.reserved_unallocated_bytes / self.reserved_bytes)

    @property
    def fragmentation_ratio(self) -> float | None:
        """inactive_split / reserved, 0..1: memory stuck in split segments (reads 0 with expandable segments).

        None when nothing is reserved or the split statistic is unknown.
        """
        if self.reserved_bytes <= 0 or self.inactive_split_bytes is None:
            return None
        return min(1.0, self.inactive_split_bytes / self.reserved_bytes)

    @property
    def headroom_bytes(self) -> int | None:
        """What this process could still allocate: device free memory plus its own unallocated cache."""
        if self.free_bytes is None:
            return None
        return self.free_bytes + self.reserved_unallocated_bytes


@dataclass(frozen=True)
class AllocatorSample:
    """Allocator statistics of every watched CUDA device of this process at one instant."""

    devices: tuple[DeviceAllocatorStats, ...]
    settings: AllocatorSettings
    cuda_initialized: bool  # False: CUDA not initialised in this process yet, so no device is read
    taken_at: float  # monotonic seconds

    def device(self, index: int) -> DeviceAllocatorStats | None:
        for d in self.devices:
            if d.device == index:
                return d
        return None


def _int(stats: Mapping[str, Any], key: str) -> int | None:
    v = stats.get(key)
    return None if v is None else int(v)


class AllocatorProvider:
    """Samples `torch.cuda.memory_stats` and `mem_get_info` for each watched device.

    `torch_cuda` is injected in tests (tests/fakes/cuda_allocator.py); `devices=None` watches every device
    the allocator has touched plus the current device. `sample()` raises SourceUnavailable when torch is
    missing or CUDA is unavailable on this host.
    """

    name = "allocator"

    def __init__(
        self,
        torch_cuda: Any | None = None,
        devices: Sequence[int] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._injected = torch_cuda
        self._cuda: Any = None
        self._devices = None if devices is None else tuple(devices)
        self._environ = environ
        self._clock = clock
        self._lock = threading.Lock()

    def _torch_cuda(self) -> Any:
        with self._lock:
            if self._cuda is None:
                self._cuda = load_torch_cuda(self._injected)
            return self._cuda

    def settings(self) -> AllocatorSettings:
        """The allocator configuration (from the environment this process started with)."""
        s = settings_from_env(self._environ)
        cuda = self._cuda
        if cuda is not None and s.backend == "native":
            # The backend may also be chosen by other means; ask torch when it can tell.
            get_backend = getattr(cuda, "get_allocator_backend", None)
            if get_backend is not None:
                try:
                    backend = str(get_backend())
                except Exception:
                    backend = s.backend
                if backend != s.backend:
                    s = AllocatorSettings(
                        s.alloc_conf,
                        s.env_var,
                        s.options,
                        s.expandable_segments,
                        backend,
                        s.max_split_size_mb,
                    )
        return s

    def watched_devices(self) -> tuple[int, ...]:
        """Device indices read by the next sample (only meaningful once CUDA is initialised)."""
        cuda = self._torch_cuda()
        if self._devices is not None:
            return self._devices
        n = int(cuda.device_count())
        current = int(cuda.current_device()) if n else -1
        out = []
        for d in range(n):
            if d == current:
                out.append(d)
                continue
            stats = cuda.memory_stats(d)
            if stats.get("reserved_bytes.all.peak", 0) or stats.get("num_device_alloc", 0):
                out.append(d)
        return tuple(out)

    def _device(self, cuda: Any, d: int, async_backend: bool) -> DeviceAllocatorStats:
        s = cuda.memory_stats(d)
        free: int | None
        total: int | None
        try:
            free_raw, total_raw = cuda.mem_get_info(d)
            free, total = int(free_raw), int(total_raw)
        except Exception:
            free = total = None

        def split(key: str) -> int | None:
            # cudaMallocAsync does not track split blocks: its zeros mean "unknown".
            return None if async_backend else _int(s, key)

        return DeviceAllocatorStats(
            device=d,
            allocated_bytes=int(s.get("allocated_bytes.all.current", 0)),
            reserved_bytes=int(s.get("reserved_bytes.all.current", 0)),
            active_bytes=_int(s, "active_bytes.all.current"),
            requested_bytes=_int(s, "requested_bytes.all.current"),
            inactive_split_bytes=split("inactive_split_bytes.all.current"),
            peak_allocated_bytes=int(s.get("allocated_bytes.all.peak", 0)),
            peak_reserved_bytes=int(s.get("reserved_bytes.all.peak", 0)),
            peak_active_bytes=_int(s, "active_bytes.all.peak"),
            peak_requested_bytes=_int(s, "requested_bytes.all.peak"),
            peak_inactive_split_bytes=split("inactive_split_bytes.all.peak"),
            segments=_int(s, "segment.all.current"),
            alloc_retries=_int(s, "num_alloc_retries"),
            ooms=_int(s, "num_ooms"),
            sync_all_streams=_int(s, "num_sync_all_streams"),
            device_allocs=_int(s, "num_device_alloc"),
            device_frees=_int(s, "num_device_free"),
            free_bytes=free,
            total_bytes=total,
        )

    def sample(self) -> AllocatorSample:
        cuda = self._torch_cuda()
        try:
            available = bool(cuda.is_available())
        except Exception as e:
            raise SourceUnavailable(f"CUDA is not usable: {e}") from None
        if not available:
            if nvidia_devices_present():  # a GPU host: a CPU-only torch build or a broken CUDA setup
                raise SourceUnavailable("CUDA is not available (a CPU-only torch build, or CUDA cannot start)")
            raise SourceUnavailable("CUDA is not available (no NVIDIA GPU on this host)", expected=True)
        settings = self.settings()
        if not cuda_ready(cuda):
            return AllocatorSample((), settings, cuda_initialized=False, taken_at=self._clock())
        async_backend = settings.backend == "cudaMallocAsync"
        devices = tuple(self._device(cuda, d, async_backend) for d in self.watched_devices())
        return AllocatorSample(devices, settings, cuda_initialized=True, taken_at=self._clock())

    def close(self) -> None:
        """Nothing to release: the CUDA context belongs to the host process."""
