"""The sampled sources every mode assembles, each with its collector: host, disk, network, process, NVML,
the torch caching allocator. Each is built from its own sub-config, as one source group of the Monitor, so a
reload rebuilds only the sources whose sub-config changed (`install_sources`). Imports no torch (`zmon watch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zmon.app.monitor import Monitor
from zmon.collectors.allocator import AllocatorCollector
from zmon.collectors.host import DiskCollector, HostCollector, NetworkCollector, ProcessCollector
from zmon.collectors.nvml import NvmlCollector
from zmon.config import AllocatorConfig, NvmlConfig, SamplingConfig
from zmon.providers.allocator import AllocatorProvider
from zmon.providers.base import SourceUnavailable
from zmon.providers.host import DiskProvider, HostProvider, NetworkProvider, ProcessProvider
from zmon.providers.nvml import NvmlProvider
from zmon.sampling.keys import ALLOCATOR, DISK, HOST, NETWORK, NVML, NVML_SLOW, PROCESS

SOURCE_GROUPS = ("nvml", "host", "disk", "network", "process", "allocator")


def install_sources(
    mon: Monitor,
    s: SamplingConfig,
    *,
    watched_pid: int | None,
    allocator: bool = False,
    nvml: Any | None = None,
    psutil_module: Any | None = None,
    torch_cuda: Any | None = None,
) -> list[str]:
    """Build every source group whose sub-config differs from the one `mon` runs it with (all of them the first
    time), dropping the old group first; unchanged groups keep sampling untouched. Returns the groups rebuilt.

    `allocator`: the torch caching allocator of this process (in-process modes only).
    """
    groups: list[tuple[str, Any, Callable[[], None]]] = [
        ("nvml", (s.nvml, watched_pid), lambda: _nvml(mon, s.nvml, watched_pid, nvml)),
        ("host", s.host, lambda: _host(mon, s, psutil_module)),
        ("disk", s.disk, lambda: _disk(mon, s, psutil_module)),
        ("network", s.network, lambda: _network(mon, s, psutil_module)),
        ("process", (s.process, watched_pid), lambda: _process(mon, s, watched_pid, psutil_module)),
    ]
    if allocator:
        groups.append(("allocator", s.allocator, lambda: _allocator(mon, s.allocator, torch_cuda)))
    rebuilt = []
    for name, key, build in groups:
        missing = object()
        if mon.group_key(name, missing) == key:
            continue
        mon.drop_group(name)
        with mon.source_group(name, key):
            build()
        rebuilt.append(name)
    return rebuilt


def add_host_sources(
    mon: Monitor, s: SamplingConfig, *, watched_pid: int | None, psutil_module: Any | None = None
) -> None:
    """CPU/memory, disk, network and the watched process (psutil), outside any source group."""
    _host(mon, s, psutil_module)
    _disk(mon, s, psutil_module)
    _network(mon, s, psutil_module)
    _process(mon, s, watched_pid, psutil_module)


def add_nvml_sources(mon: Monitor, s: NvmlConfig, *, watched_pid: int | None, nvml: Any | None = None) -> None:
    """Per-GPU NVML fields on the fast job, PCIe throughput on its own slow job (each call blocks ~20 ms)."""
    _nvml(mon, s, watched_pid, nvml)


def add_allocator_source(mon: Monitor, s: AllocatorConfig, *, torch_cuda: Any | None = None) -> None:
    """The torch caching allocator of this process (CUDA only; without CUDA the first sample says so and the
    source is dropped)."""
    _allocator(mon, s, torch_cuda)


# ------------------------------------------------------------------------------------------------ each source


def _host(mon: Monitor, s: SamplingConfig, psutil_module: Any | None) -> None:
    if s.host.enabled:
        host = HostProvider(psutil_module, per_cpu=s.host.per_cpu)
        mon.add_source(HOST, host.sample, s.host.interval_seconds)
        mon.add_collector("host", HostCollector(mon.store), sources=(HOST,))


def _disk(mon: Monitor, s: SamplingConfig, psutil_module: Any | None) -> None:
    if s.disk.enabled:
        disk = DiskProvider(psutil_module, exclude_devices=s.disk.exclude_devices, paths=s.disk.paths)
        mon.add_source(DISK, disk.sample, s.disk.interval_seconds)
        mon.add_collector("disk", DiskCollector(mon.store), sources=(DISK,))


def _network(mon: Monitor, s: SamplingConfig, psutil_module: Any | None) -> None:
    if s.network.enabled:
        net = NetworkProvider(psutil_module, exclude_interfaces=s.network.exclude_interfaces)
        mon.add_source(NETWORK, net.sample, s.network.interval_seconds)
        mon.add_collector("network", NetworkCollector(mon.store), sources=(NETWORK,))


def _process(mon: Monitor, s: SamplingConfig, watched_pid: int | None, psutil_module: Any | None) -> None:
    if s.process.enabled and watched_pid is not None:
        proc = ProcessProvider(watched_pid, psutil_module)
        mon.add_source(PROCESS, proc.sample, s.process.interval_seconds)
        mon.add_collector("process", ProcessCollector(mon.store), sources=(PROCESS,))


def _nvml(mon: Monitor, s: NvmlConfig, watched_pid: int | None, nvml: Any | None) -> None:
    if not s.enabled:
        return
    try:
        prov = NvmlProvider(nvml, processes=s.processes, watched_pid=watched_pid, gpm=s.gpm)
    except SourceUnavailable as e:
        mon.mark_unavailable(NVML, str(e), expected=e.expected)
        return
    mon.add_source(NVML, prov.sample, s.interval_seconds, close=prov.close)
    if s.slow_interval_seconds > 0:
        mon.add_source(NVML_SLOW, prov.sample_slow, s.slow_interval_seconds)
    mon.add_collector("nvml", NvmlCollector(mon.store), sources=(NVML, NVML_SLOW))


def _allocator(mon: Monitor, s: AllocatorConfig, torch_cuda: Any | None) -> None:
    if not s.enabled:
        return
    try:
        prov = AllocatorProvider(torch_cuda)
    except SourceUnavailable as e:
        mon.mark_unavailable(ALLOCATOR, str(e), expected=e.expected)
        return
    mon.add_source(ALLOCATOR, prov.sample, s.interval_seconds)
    mon.add_collector("allocator", AllocatorCollector(mon.store), sources=(ALLOCATOR,))
