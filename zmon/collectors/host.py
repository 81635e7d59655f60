"""Host, disk, network and process families built from the latest psutil snapshots (never calls psutil)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.providers.host import DiskSample, HostSample, NetworkSample, ProcessSample
from zmon.sampling.store import SnapshotStore


def _gauges(rows: Iterable[tuple[str, str, float | None]]) -> Iterator[Metric]:
    """Unlabelled gauges from (name, help, value) rows; an unknown (None) value leaves its family out."""
    for name, help_text, value in rows:
        if value is not None:
            yield GaugeMetricFamily(name, help_text, value=value)


class HostCollector:
    """CPU utilization and time, load average, memory and swap of the host."""

    def __init__(self, store: SnapshotStore, *, source: str = "host") -> None:
        self.store = store
        self.source = source

    def collect(self) -> Iterable[Metric]:
        s: HostSample | None = self.store.latest(self.source)
        if s is None:
            return
        # Utilization needs two samples: absent on the first, never reported as 0.
        yield from _gauges(
            [
                (
                    "zmon_host_cpu_utilization_ratio",
                    "Busy share of all CPU cores over the last sampling interval, 0 to 1.",
                    s.cpu_utilization_ratio,
                )
            ]
        )
        if s.cpu_core_utilization_ratio is not None:
            cores = GaugeMetricFamily(
                "zmon_host_cpu_core_utilization_ratio",
                "Busy share of one logical CPU core over the last sampling interval, 0 to 1.",
                labels=["cpu"],
            )
            for i, ratio in enumerate(s.cpu_core_utilization_ratio):
                cores.add_metric([str(i)], ratio)
            yield cores
        seconds = CounterMetricFamily(
            "zmon_host_cpu_seconds",
            "CPU time of all cores by mode, in seconds (guest modes are also counted in user and nice).",
            labels=["mode"],
        )
        for mode, value in s.cpu_seconds:
            seconds.add_metric([mode], value)
        yield seconds
        yield from _gauges(
            [
                ("zmon_host_cpus", "Logical CPU cores of the host.", s.cpu_count),
                ("zmon_host_load1", "Run-queue length averaged over 1 minute.", s.load1),
                ("zmon_host_load5", "Run-queue length averaged over 5 minutes.", s.load5),
                ("zmon_host_load15", "Run-queue length averaged over 15 minutes.", s.load15),
                ("zmon_host_memory_total_bytes", "Physical memory of the host.", s.memory_total_bytes),
                (
                    "zmon_host_memory_available_bytes",
                    "Memory that can be given to processes without swapping.",
                    s.memory_available_bytes,
                ),
                ("zmon_host_memory_used_bytes", "Memory in use as psutil computes it.", s.memory_used_bytes),
                ("zmon_host_swap_total_bytes", "Swap space of the host.", s.swap_total_bytes),
                ("zmon_host_swap_used_bytes", "Swap space in use.", s.swap_used_bytes),
            ]
        )


class DiskCollector:
    """Per-device I/O counters and space on the configured filesystems."""

    def __init__(self, store: SnapshotStore, *, source: str = "disk") -> None:
        self.store = store
        self.source = source

    def collect(self) -> Iterable[Metric]:
        s: DiskSample | None = self.store.latest(self.source)
        if s is None:
            return
        counters = (
            ("read_bytes", "zmon_disk_read_bytes", "Bytes read from the device."),
            ("written_bytes", "zmon_disk_written_bytes", "Bytes written to the device."),
            ("reads", "zmon_disk_reads", "Read operations completed by the device."),
            ("writes", "zmon_disk_writes", "Write operations completed by the device."),
            ("io_time_seconds", "zmon_disk_io_time_seconds", "Seconds the device spent with I/O in flight."),
        )
        for attr, name, help_text in counters:
            family = CounterMetricFamily(name, help_text, labels=["device"])
            for d in s.devices:
                value = getattr(d, attr)
                if value is not None:  # io_time is absent where psutil has no busy_time
                    family.add_metric([d.device], value)
            yield family

        up = GaugeMetricFamily(
            "zmon_filesystem_up",
            "1 if the filesystem of the configured path could be read, else 0.",
            labels=["path"],
        )
        for fs in s.filesystems:
            up.add_metric([fs.path], 1.0 if fs.ok else 0.0)
        yield up
        gauges = (
            (
                "free_bytes",
                "zmon_filesystem_free_bytes",
                "Bytes free for unprivileged users on the filesystem.",
            ),
            ("size_bytes", "zmon_filesystem_size_bytes", "Size of the filesystem in bytes."),
            ("used_bytes", "zmon_filesystem_used_bytes", "Bytes used on the filesystem."),
        )
        for attr, name, help_text in gauges:
            gauge = GaugeMetricFamily(name, help_text, labels=["path"])
            for fs in s.filesystems:
                value = getattr(fs, attr)
                if value is not None:  # a path that could not be read has only zmon_filesystem_up 0
                    gauge.add_metric([fs.path], value)
            yield gauge


class NetworkCollector:
    """Per-interface traffic, error and drop counters."""

    def __init__(self, store: SnapshotStore, *, source: str = "network") -> None:
        self.store = store
        self.source = source

    def collect(self) -> Iterable[Metric]:
        s: NetworkSample | None = self.store.latest(self.source)
        if s is None:
            return
        counters = (
            ("received_bytes", "zmon_network_received_bytes", "Bytes received by the interface."),
            ("transmitted_bytes", "zmon_network_transmitted_bytes", "Bytes sent by the interface."),
            ("received_packets", "zmon_network_received_packets", "Packets received by the interface."),
            ("transmitted_packets", "zmon_network_transmitted_packets", "Packets sent by the interface."),
            ("receive_errors", "zmon_network_receive_errors", "Errors while receiving on the interface."),
            ("transmit_errors", "zmon_network_transmit_errors", "Errors while sending on the interface."),
            ("receive_drops", "zmon_network_receive_drops", "Incoming packets dropped on the interface."),
            ("transmit_drops", "zmon_network_transmit_drops", "Outgoing packets dropped on the interface."),
        )
        for attr, name, help_text in counters:
            family = CounterMetricFamily(name, help_text, labels=["interface"])
            for nic in s.interfaces:
                family.add_metric([nic.interface], getattr(nic, attr))
            yield family


class ProcessCollector:
    """The watched process: up, identity, CPU time, memory, threads, descriptors, start time."""

    def __init__(self, store: SnapshotStore, *, source: str = "process") -> None:
        self.store = store
        self.source = source

    def collect(self) -> Iterable[Metric]:
        s: ProcessSample | None = self.store.latest(self.source)
        if s is None:
            return
        yield GaugeMetricFamily(
            "zmon_process_up", "1 if the watched process is running, else 0.", value=1.0 if s.exists else 0.0
        )
        if not s.exists:
            return
        info = InfoMetricFamily("zmon_process", "Identity of the watched process; constant 1.")
        info.add_metric([], {"pid": str(s.pid), "name": s.name or ""})
        yield info
        cpu = CounterMetricFamily(
            "zmon_process_cpu_seconds",
            "CPU time of the watched process by mode, in seconds.",
            labels=["mode"],
        )
        for mode, value in (("user", s.cpu_user_seconds), ("system", s.cpu_system_seconds)):
            if value is not None:
                cpu.add_metric([mode], value)
        yield cpu
        if s.read_bytes is not None:
            yield CounterMetricFamily(
                "zmon_process_storage_read_bytes",
                "Bytes the watched process read from storage (page-cache misses), since it started.",
                value=float(s.read_bytes),
            )
        yield from _gauges(
            [
                (
                    "zmon_process_resident_memory_bytes",
                    "Resident memory of the watched process.",
                    s.resident_memory_bytes,
                ),
                (
                    "zmon_process_virtual_memory_bytes",
                    "Virtual memory of the watched process.",
                    s.virtual_memory_bytes,
                ),
                ("zmon_process_threads", "Threads of the watched process.", s.threads),
                ("zmon_process_open_fds", "Open file descriptors of the watched process.", s.open_fds),
                ("zmon_process_open_files", "Regular files open in the watched process.", s.open_files),
                (
                    "zmon_process_start_time_seconds",
                    "Start time of the watched process, in seconds since the Unix epoch.",
                    s.start_time_seconds,
                ),
            ]
        )
