"""Sampled snapshots → the analysis core's inputs, once for both `zmon profile` and the live diagnosis.

`window_facts(records, history, ...)` is the one place facts are built from generation records and what the
sampler saw meanwhile; the profile (its whole run) and the live diagnosis (a rolling window) both call it, so
they judge the same workload the same way.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import replace

from zmon.analysis.facts import (
    CpuPoint,
    EnvironmentFacts,
    GpuPoint,
    IoFacts,
    IoPoint,
    MemoryFacts,
    MultiGpuFacts,
    ProfileFacts,
    build_facts,
    cpu_points_from_counters,
)
from zmon.analysis.stats import rate
from zmon.capture.environment import nvml_index_for
from zmon.instrumentation.records import GenerationRecord
from zmon.providers import cuda
from zmon.providers.allocator import AllocatorSample
from zmon.providers.nvml import GpuSample
from zmon.sampling import SampleHistory
from zmon.sampling.keys import ALLOCATOR, DISK, HOST, NVML, PROCESS


class GpuResolver:
    """Which NVML GPU a CUDA device is (asked once per device: CUDA's answer does not change)."""

    def __init__(self) -> None:
        self._cache: dict[int, int | None] = {}

    def nvml_index(self, device: str, gpus: Sequence[GpuSample]) -> int | None:
        index = cuda.device_index(device)
        if index is None or not gpus:
            return None
        if index not in self._cache:
            self._cache[index] = nvml_index_for(index, gpus)
        return self._cache[index]


def computing_gpu(
    history: SampleHistory, device: str, resolver: GpuResolver, since: float | None = None
) -> list[tuple[float, GpuSample]]:
    """NVML's readings of the card `device` computes on, oldest first ([] off GPU, or when it is not found)."""
    samples = history.samples(NVML, since)
    if not samples or not device.startswith("cuda"):
        return []
    index = resolver.nvml_index(device, samples[-1][1].gpus)
    if index is None:
        return []
    out = []
    for t, sample in samples:
        gpu = next((g for g in sample.gpus if g.index == index), None)
        if gpu is not None:
            out.append((t, gpu))
    return out


def gpu_points(
    history: SampleHistory, device: str, resolver: GpuResolver, since: float | None = None
) -> tuple[list[GpuPoint], GpuSample | None]:
    """The computing card's utilization/memory reads, and its latest NVML reading (None off GPU)."""
    out: list[GpuPoint] = []
    latest: GpuSample | None = None
    for t, gpu in computing_gpu(history, device, resolver, since):
        if gpu.up:
            out.append(
                GpuPoint(
                    t,
                    gpu.utilization_gpu_ratio,
                    gpu.memory_used_bytes,
                    sm_active_ratio=gpu.sm_active_ratio,
                    tensor_active_ratio=gpu.tensor_active_ratio,
                    dram_bandwidth_ratio=gpu.dram_bandwidth_utilization_ratio,
                )
            )
            latest = gpu
    return out, latest


def other_gpu_processes(
    history: SampleHistory, device: str, resolver: GpuResolver, since: float | None = None
) -> tuple[int | None, int | None]:
    """(most other processes seen on the computing GPU at once, their memory then), from NVML's process lists.

    Counted only in samples that list this process itself (`is_workload`): in a container NVML may report the
    host's pids, and then no process is known to be ours and none to be another's. (None, None) when unknown."""
    most: tuple[int, int] | None = None
    for _t, gpu in computing_gpu(history, device, resolver, since):
        if not gpu.processes or not any(p.is_workload for p in gpu.processes):
            continue
        others = [p for p in gpu.processes if not p.is_workload]
        seen = (len(others), sum(p.used_memory_bytes or 0 for p in others))
        if most is None or seen > most:
            most = seen
    return (None, None) if most is None else most


def cpu_points(history: SampleHistory, since: float | None = None) -> tuple[CpuPoint, ...]:
    """Process cores busy (from cumulative CPU seconds) with the host's busy ratio at the same time.

    Without a process source (zmon watch without a pid), the host's readings alone.
    """
    hosts = history.samples(HOST, since)
    host_times = [t for t, _ in hosts]
    processes = history.samples(PROCESS, since)
    if not processes:
        return cpu_points_from_counters((t, None, h.cpu_utilization_ratio) for t, h in hosts)

    def host_at(t: float) -> float | None:
        i = bisect.bisect_right(host_times, t) - 1
        return hosts[i][1].cpu_utilization_ratio if i >= 0 else None

    return cpu_points_from_counters(
        (t, p.cpu_user_seconds + p.cpu_system_seconds, host_at(t))
        if p.exists and p.cpu_user_seconds is not None and p.cpu_system_seconds is not None
        else (t, None, host_at(t))
        for t, p in processes
    )


def io_points(history: SampleHistory, since: float | None = None) -> tuple[IoPoint, ...]:
    """Storage read rates between consecutive samples: every disk (DISK) and the process (PROCESS)."""
    out: dict[float, IoPoint] = {}
    previous: tuple[float, float] | None = None
    for t, d in history.samples(DISK, since):
        total = (t, float(sum(dev.read_bytes for dev in d.devices)))
        out[t] = IoPoint(t, disk_read_bytes_per_second=rate(previous, total))
        previous = total
    previous = None
    for t, p in history.samples(PROCESS, since):
        if not p.exists or p.read_bytes is None:
            previous = None
            continue
        point = (t, float(p.read_bytes))
        own = rate(previous, point)
        previous = point
        base = out.get(t, IoPoint(t))
        out[t] = IoPoint(t, base.disk_read_bytes_per_second, own)
    return tuple(out[t] for t in sorted(out))


def memory_facts(allocator: AllocatorSample | None, device: str, card_total_bytes: int | None) -> MemoryFacts:
    """MemoryFacts from the caching allocator's latest sample of the computing device (empty off CUDA).

    Peaks are left to the generation records (stage timing resets the peak statistics per generation).
    """
    index = cuda.device_index(device) if device.startswith("cuda") else None
    dev = None if allocator is None or index is None else allocator.device(index)
    if dev is None:
        return MemoryFacts(card_total_bytes=card_total_bytes)
    return MemoryFacts(
        card_total_bytes=card_total_bytes if card_total_bytes is not None else dev.total_bytes,
        reserved_unallocated_ratio=dev.reserved_unallocated_ratio,
        fragmentation_ratio=dev.fragmentation_ratio,
        headroom_bytes=dev.headroom_bytes,
        alloc_retries=dev.alloc_retries,
        ooms=dev.ooms,
    )


def window_facts(
    records: Sequence[GenerationRecord],
    history: SampleHistory,
    *,
    env: EnvironmentFacts,
    resolver: GpuResolver,
    io: IoFacts | None = None,
    warmup: int = 0,
    since: float | None = None,
    created_at: float | None = None,
    first_generation_in_window: bool = True,
    outlier_ratio: float = 3.0,
    multi_gpu: MultiGpuFacts | None = None,
) -> ProfileFacts:
    """Facts of consecutive generations (oldest first) and what the sampler saw since `since`.

    The environment's card name and driver come from NVML when the caller could not tell; the card's
    memory from NVML, else CUDA. `first_generation_in_window` False drops the first-generation slowdown
    (a rolling window whose oldest generation is not the process's first). `multi_gpu`: what the caller knows
    of a multi-GPU setup (data-parallel workers); the records' collective timings complete it.
    """
    device = env.device
    gpu, latest = gpu_points(history, device, resolver, since)
    nvml = history.latest(NVML)
    if latest is not None and env.card_name is None:
        env = replace(env, card_name=latest.name)
    if nvml is not None and env.driver_version is None:
        env = replace(env, driver_version=nvml.driver_version)
    total = latest.memory_total_bytes if latest is not None else None
    if total is None and (index := cuda.device_index(device)) is not None and device.startswith("cuda"):
        ident = cuda.device_identity(index)
        total = None if ident is None else ident.total_memory_bytes
    facts = build_facts(
        records,
        gpu_samples=gpu,
        cpu_samples=cpu_points(history, since),
        io_samples=io_points(history, since),
        memory=memory_facts(history.latest(ALLOCATOR), device, total),
        io=io,
        env=env,
        multi_gpu=multi_gpu,
        warmup=warmup,
        created_at=created_at,
        outlier_ratio=outlier_ratio,
        first_is_cold=first_generation_in_window,
    )
    if not first_generation_in_window:
        facts = replace(facts, io=replace(facts.io, first_generation_seconds=None, first_generation_slowdown=None))
    others, others_memory = other_gpu_processes(history, device, resolver, since)
    if others is not None:
        facts = replace(
            facts,
            utilization=replace(
                facts.utilization, other_gpu_processes=others, other_gpu_processes_memory_bytes=others_memory
            ),
        )
    return facts
