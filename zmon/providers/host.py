"""Host-side sources via psutil (the only module importing it): CPU, memory, disks, network, one process."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

# On Linux, guest and guest_nice time is already counted inside user and nice: leave it out of the total.
_CPU_MODES_NOT_IN_TOTAL = frozenset({"guest", "guest_nice"})
# Time in which a core did no work; iowait is idle time waiting for I/O (as psutil.cpu_percent counts it).
_CPU_IDLE_MODES = frozenset({"idle", "iowait"})


# ---------------------------------------------------------------------------------------------------- host


@dataclass(frozen=True)
class HostSample:
    """CPU, load and memory of the host at one instant."""

    cpu_seconds: tuple[tuple[str, float], ...]  # cumulative CPU seconds by mode, summed over all cores
    cpu_count: int | None  # logical cores; None if the OS does not say
    # Busy share of all cores since the previous sample, 0..1; None on the first sample.
    cpu_utilization_ratio: float | None
    # The same per logical core (index = core); None on the first sample, with per_cpu off, or after hotplug.
    cpu_core_utilization_ratio: tuple[float, ...] | None
    load1: float  # run-queue length averaged over 1, 5 and 15 minutes
    load5: float
    load15: float
    memory_total_bytes: int
    memory_available_bytes: int  # what can be given to processes without swapping
    memory_used_bytes: int  # as psutil computes it for this OS
    swap_total_bytes: int
    swap_used_bytes: int


def _cpu_busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) seconds of one psutil `scputimes`."""
    modes: dict[str, float] = times._asdict()
    total = sum(v for m, v in modes.items() if m not in _CPU_MODES_NOT_IN_TOTAL)
    idle = sum(v for m, v in modes.items() if m in _CPU_IDLE_MODES)
    return total - idle, total


def _utilization(before: Any, after: Any) -> float | None:
    """Busy share between two `scputimes`, clamped to 0..1; None if no CPU time passed."""
    busy0, total0 = _cpu_busy_total(before)
    busy1, total1 = _cpu_busy_total(after)
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return min(1.0, max(0.0, (busy1 - busy0) / elapsed))


class HostProvider:
    """CPU utilization (from `cpu_times` deltas between consecutive samples), load average, memory, swap."""

    name = "host"

    def __init__(self, psutil_module: Any | None = None, *, per_cpu: bool = True) -> None:
        self._ps: Any = psutil if psutil_module is None else psutil_module
        self.per_cpu = per_cpu
        self._lock = threading.Lock()  # sample() updates the previous cpu_times
        self._prev_total: Any = None
        self._prev_cores: list[Any] | None = None

    def sample(self) -> HostSample:
        ps = self._ps
        with self._lock:
            total = ps.cpu_times()
            cores = ps.cpu_times(percpu=True) if self.per_cpu else None
            ratio = None if self._prev_total is None else _utilization(self._prev_total, total)
            core_ratios = None
            if cores is not None and self._prev_cores is not None and len(cores) == len(self._prev_cores):
                per_core = [_utilization(b, a) for b, a in zip(self._prev_cores, cores, strict=True)]
                # A core that reports no elapsed time drops the breakdown rather than pretend 0.
                if all(r is not None for r in per_core):
                    core_ratios = tuple(r for r in per_core if r is not None)
            self._prev_total, self._prev_cores = total, cores
        load1, load5, load15 = ps.getloadavg()
        mem = ps.virtual_memory()
        swap = ps.swap_memory()
        return HostSample(
            cpu_seconds=tuple((mode, float(v)) for mode, v in total._asdict().items()),
            cpu_count=ps.cpu_count() or None,
            cpu_utilization_ratio=ratio,
            cpu_core_utilization_ratio=core_ratios,
            load1=float(load1),
            load5=float(load5),
            load15=float(load15),
            memory_total_bytes=int(mem.total),
            memory_available_bytes=int(mem.available),
            memory_used_bytes=int(mem.used),
            swap_total_bytes=int(swap.total),
            swap_used_bytes=int(swap.used),
        )

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- disk


@dataclass(frozen=True)
class DiskIO:
    """Cumulative I/O counters of one block device since boot."""

    device: str
    read_bytes: int
    written_bytes: int
    reads: int  # completed read operations
    writes: int  # completed write operations
    io_time_seconds: float | None  # time the device had I/O in flight (Linux `busy_time`); None elsewhere


@dataclass(frozen=True)
class FilesystemUsage:
    """Space on the filesystem holding one configured path; `ok` False (values None) if it cannot be read."""

    path: str
    ok: bool
    free_bytes: int | None = None  # available to unprivileged users
    size_bytes: int | None = None
    used_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class DiskSample:
    devices: tuple[DiskIO, ...]  # sorted by device name, excluded devices left out
    filesystems: tuple[FilesystemUsage, ...]  # in configured order


class DiskProvider:
    """Per-device I/O counters (`disk_io_counters(perdisk=True)`) and free space of configured paths."""

    name = "disk"

    def __init__(
        self,
        psutil_module: Any | None = None,
        *,
        exclude_devices: str = r"^(loop|ram|sr|fd)\d*",
        paths: Sequence[Path] = (),
    ) -> None:
        self._ps: Any = psutil if psutil_module is None else psutil_module
        self._exclude = re.compile(exclude_devices) if exclude_devices else None
        self.paths = tuple(Path(p) for p in paths)

    def sample(self) -> DiskSample:
        counters: dict[str, Any] = self._ps.disk_io_counters(perdisk=True) or {}
        devices = tuple(
            DiskIO(
                device=name,
                read_bytes=int(c.read_bytes),
                written_bytes=int(c.write_bytes),
                reads=int(c.read_count),
                writes=int(c.write_count),
                io_time_seconds=_ms_to_seconds(getattr(c, "busy_time", None)),
            )
            for name, c in sorted(counters.items())
            if not (self._exclude and self._exclude.search(name))
        )
        return DiskSample(devices=devices, filesystems=tuple(self._usage(p) for p in self.paths))

    def _usage(self, path: Path) -> FilesystemUsage:
        try:
            u = self._ps.disk_usage(str(path))
        except OSError as e:  # missing path, unmounted volume, permission: reported, never fatal
            return FilesystemUsage(str(path), ok=False, error=f"{type(e).__name__}: {e.strerror or e}")
        return FilesystemUsage(
            str(path), ok=True, free_bytes=int(u.free), size_bytes=int(u.total), used_bytes=int(u.used)
        )

    def close(self) -> None:
        pass


def _ms_to_seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


# ---------------------------------------------------------------------------------------------------- network


@dataclass(frozen=True)
class InterfaceIO:
    """Cumulative counters of one network interface since it came up."""

    interface: str
    received_bytes: int
    transmitted_bytes: int
    received_packets: int
    transmitted_packets: int
    receive_errors: int
    transmit_errors: int
    receive_drops: int
    transmit_drops: int


@dataclass(frozen=True)
class NetworkSample:
    interfaces: tuple[InterfaceIO, ...]  # sorted by name, excluded interfaces left out


class NetworkProvider:
    """Per-interface traffic counters (`net_io_counters(pernic=True)`)."""

    name = "network"

    def __init__(
        self, psutil_module: Any | None = None, *, exclude_interfaces: str = r"^(lo|veth.*|docker\d*|br-.*)$"
    ) -> None:
        self._ps: Any = psutil if psutil_module is None else psutil_module
        self._exclude = re.compile(exclude_interfaces) if exclude_interfaces else None

    def sample(self) -> NetworkSample:
        counters: dict[str, Any] = self._ps.net_io_counters(pernic=True) or {}
        return NetworkSample(
            interfaces=tuple(
                InterfaceIO(
                    interface=name,
                    received_bytes=int(c.bytes_recv),
                    transmitted_bytes=int(c.bytes_sent),
                    received_packets=int(c.packets_recv),
                    transmitted_packets=int(c.packets_sent),
                    receive_errors=int(c.errin),
                    transmit_errors=int(c.errout),
                    receive_drops=int(c.dropin),
                    transmit_drops=int(c.dropout),
                )
                for name, c in sorted(counters.items())
                if not (self._exclude and self._exclude.search(name))
            )
        )

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- process


@dataclass(frozen=True)
class ProcessSample:
    """The watched process; with `exists` False every other field is None."""

    pid: int
    exists: bool
    name: str | None = None
    cpu_user_seconds: float | None = None
    cpu_system_seconds: float | None = None
    resident_memory_bytes: int | None = None
    virtual_memory_bytes: int | None = None
    threads: int | None = None
    open_fds: int | None = None  # None where unsupported (Windows) or denied (another user's process)
    open_files: int | None = None  # regular files open; None if denied
    start_time_seconds: float | None = None  # unix seconds; changes when the pid is reused
    # Bytes read from storage (Linux /proc/<pid>/io read_bytes: page-cache misses, not cached reads).
    read_bytes: int | None = None


class ProcessProvider:
    """CPU time, memory, threads and descriptors of one pid; `exists=False` while no such process runs.

    A fresh `psutil.Process` is made on every sample: its create_time then always belongs to the process
    that holds the pid now, so a restarted or reused pid is picked up (with a new start time) and a dead
    one is never cached.
    """

    name = "process"

    def __init__(self, pid: int, psutil_module: Any | None = None) -> None:
        self.pid = pid
        self._ps: Any = psutil if psutil_module is None else psutil_module

    def sample(self) -> ProcessSample:
        ps = self._ps
        try:
            proc = ps.Process(self.pid)
            with proc.oneshot():
                # A zombie has exited and waits to be reaped: it no longer runs.
                if self._optional(proc.status) == ps.STATUS_ZOMBIE:
                    return ProcessSample(self.pid, exists=False)
                cpu = proc.cpu_times()
                mem = proc.memory_info()
                io = self._optional(getattr(proc, "io_counters", None))
                return ProcessSample(
                    pid=self.pid,
                    exists=True,
                    name=self._optional(proc.name),
                    cpu_user_seconds=float(cpu.user),
                    cpu_system_seconds=float(cpu.system),
                    resident_memory_bytes=int(mem.rss),
                    virtual_memory_bytes=int(mem.vms),
                    threads=self._optional(proc.num_threads),
                    open_fds=self._optional(getattr(proc, "num_fds", None)),
                    open_files=self._optional(lambda: len(proc.open_files())),
                    start_time_seconds=float(proc.create_time()),
                    read_bytes=None if io is None else int(io.read_bytes),
                )
        except ps.NoSuchProcess:  # includes ZombieProcess
            return ProcessSample(self.pid, exists=False)

    def _optional(self, read: Callable[[], T] | None) -> T | None:
        """One field that may be denied or unsupported: unknown stays None, never 0."""
        if read is None:
            return None
        try:
            return read()
        except (self._ps.AccessDenied, NotImplementedError):
            return None

    def close(self) -> None:
        pass
