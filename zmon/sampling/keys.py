"""Typed names of the sampled sources: `store.latest(NVML)` is an `NvmlSample | None`, not `Any`.

A key pairs a source's name (the `collector` label of zmon's self-metrics) with the type of its samples.
Keys of the provider-backed sources are here; a source defined higher up declares its key next to its
sample type (the live diagnosis: zmon.collectors.bottleneck.DIAGNOSIS).
"""

from __future__ import annotations

from zmon.providers.allocator import AllocatorSample
from zmon.providers.host import DiskSample, HostSample, NetworkSample, ProcessSample
from zmon.providers.nvml import NvmlSample, NvmlSlowSample
from zmon.sampling.store import SourceKey

NVML: SourceKey[NvmlSample] = SourceKey("nvml", NvmlSample)
NVML_SLOW: SourceKey[NvmlSlowSample] = SourceKey("nvml_slow", NvmlSlowSample)
HOST: SourceKey[HostSample] = SourceKey("host", HostSample)
DISK: SourceKey[DiskSample] = SourceKey("disk", DiskSample)
NETWORK: SourceKey[NetworkSample] = SourceKey("network", NetworkSample)
PROCESS: SourceKey[ProcessSample] = SourceKey("process", ProcessSample)
ALLOCATOR: SourceKey[AllocatorSample] = SourceKey("allocator", AllocatorSample)
