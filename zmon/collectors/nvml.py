"""GPU metric families built at scrape time from the latest NVML snapshots (never calls NVML)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.providers.nvml import GpuSample, NvmlSample, NvmlSlowSample
from zmon.sampling.store import SnapshotStore

_Reading = Callable[[GpuSample], float | None]  # int and bool readings count as float

_Labelled = Callable[[GpuSample], tuple[tuple[str, float | None], ...]]  # (label value, reading) pairs
_Family = TypeVar("_Family", GaugeMetricFamily, CounterMetricFamily)

# One gauge per GPU reading: (name, HELP, reading). A None reading leaves the GPU out of the family.
_GAUGES: tuple[tuple[str, str, _Reading], ...] = (
    (
        "zmon_gpu_utilization_ratio",
        "Fraction of the last sample period during which a kernel ran on the GPU.",
        lambda g: g.utilization_gpu_ratio,
    ),
    (
        "zmon_gpu_memory_utilization_ratio",
        "Fraction of the last sample period during which GPU memory was read or written.",
        lambda g: g.utilization_memory_ratio,
    ),
    # GPM (Hopper and later), averaged over the interval between the last two fast samples.
    (
        "zmon_gpu_sm_active_ratio",
        "Fraction of the GPU's SMs busy (a warp resident), averaged over the last sample interval (GPM).",
        lambda g: g.sm_active_ratio,
    ),
    (
        "zmon_gpu_sm_occupancy_ratio",
        "Resident warps as a fraction of the maximum the SMs hold, over the last sample interval (GPM).",
        lambda g: g.sm_occupancy_ratio,
    ),
    (
        "zmon_gpu_tensor_active_ratio",
        "Fraction of the last sample interval during which the tensor cores were busy (GPM).",
        lambda g: g.tensor_active_ratio,
    ),
    (
        "zmon_gpu_dram_bandwidth_utilization_ratio",
        "GPU memory (DRAM) throughput as a fraction of its theoretical peak over the last sample interval (GPM).",
        lambda g: g.dram_bandwidth_utilization_ratio,
    ),
    (
        "zmon_gpu_nvlink_rx_bytes_per_second",
        "Data received over all of the GPU's NVLinks over the last sample interval (GPM).",
        lambda g: g.nvlink_rx_bytes_per_second,
    ),
    (
        "zmon_gpu_nvlink_tx_bytes_per_second",
        "Data sent over all of the GPU's NVLinks over the last sample interval (GPM).",
        lambda g: g.nvlink_tx_bytes_per_second,
    ),
    (
        "zmon_gpu_memory_used_bytes",
        "GPU memory in use, as nvidia-smi memory.used.",
        lambda g: g.memory_used_bytes,
    ),
    (
        "zmon_gpu_memory_free_bytes",
        "GPU memory free, as nvidia-smi memory.free.",
        lambda g: g.memory_free_bytes,
    ),
    ("zmon_gpu_memory_total_bytes", "Total GPU memory.", lambda g: g.memory_total_bytes),
    ("zmon_gpu_power_watts", "Power drawn by the GPU board.", lambda g: g.power_watts),
    (
        "zmon_gpu_power_limit_watts",
        "Power limit the driver enforces on the GPU.",
        lambda g: g.power_limit_watts,
    ),
    ("zmon_gpu_temperature_celsius", "GPU core temperature.", lambda g: g.temperature_celsius),
    ("zmon_gpu_sm_clock_hertz", "Current SM clock.", lambda g: g.sm_clock_hertz),
    ("zmon_gpu_memory_clock_hertz", "Current memory clock.", lambda g: g.memory_clock_hertz),
    ("zmon_gpu_sm_clock_max_hertz", "Maximum SM clock of the GPU.", lambda g: g.sm_clock_max_hertz),
    ("zmon_gpu_fan_speed_ratio", "Fan speed as a fraction of its maximum.", lambda g: g.fan_speed_ratio),
    (
        "zmon_gpu_performance_state",
        "Performance state, from 0 (maximum performance) to 15 (minimum).",
        lambda g: g.performance_state,
    ),
    (
        "zmon_gpu_remapped_rows_pending",
        "1 if remapped memory rows wait for a GPU reset to take effect, else 0.",
        lambda g: g.remapped_rows_pending,
    ),
    (
        "zmon_gpu_remapped_rows_failure",
        "1 if a memory row remapping has failed, else 0.",
        lambda g: g.remapped_rows_failure,
    ),
)

# Monotonic GPU readings, exported with _total: (name without _total, HELP, reading).
_COUNTERS: tuple[tuple[str, str, _Reading], ...] = (
    (
        "zmon_gpu_energy_joules",
        "Energy consumed by the GPU since the driver was loaded.",
        lambda g: g.energy_joules,
    ),
    (
        "zmon_gpu_xid_errors",
        "Critical Xid error events of the GPU seen since zmon started.",
        lambda g: g.xid_errors,
    ),
)


class NvmlCollector:
    """Exports `store.latest(fast_source)` and `store.latest(slow_source)`; absent readings stay absent."""

    def __init__(self, store: SnapshotStore, fast_source: str = "nvml", slow_source: str = "nvml_slow") -> None:
        self.store = store
        self.fast_source = fast_source
        self.slow_source = slow_source

    def collect(self) -> Iterable[Metric]:
        fast: NvmlSample | None = self.store.latest(self.fast_source)
        slow: NvmlSlowSample | None = self.store.latest(self.slow_source)
        families: list[Metric] = []
        if fast is not None:
            families.extend(self._fast(fast))
        if slow is not None:
            families.extend(self._slow(slow))
        # A family without samples says nothing: leave it out rather than print a bare HELP/TYPE.
        return [f for f in families if f.samples]

    def _fast(self, s: NvmlSample) -> Iterator[Metric]:
        nvml = InfoMetricFamily("zmon_nvml", "NVIDIA driver, NVML and CUDA driver versions; constant 1.")
        nvml.add_metric(
            [],
            {
                "driver_version": s.driver_version or "",
                "nvml_version": s.nvml_version or "",
                "cuda_driver_version": s.cuda_driver_version or "",
            },
        )
        yield nvml

        info = InfoMetricFamily("zmon_gpu", "GPU identity: UUID, product name, PCI bus id; constant 1.", labels=["gpu"])
        up = GaugeMetricFamily(
            "zmon_gpu_up", "1 if the GPU answers NVML, 0 if it is lost or unreadable.", labels=["gpu"]
        )
        for g in s.gpus:
            if g.uuid is not None:
                info.add_metric(
                    [str(g.index)], {"uuid": g.uuid, "name": g.name or "", "pci_bus_id": g.pci_bus_id or ""}
                )
            up.add_metric([str(g.index)], 1.0 if g.up else 0.0)
        yield info
        yield up

        gpus = [g for g in s.gpus if g.up]
        for name, help_text, reading in _GAUGES:
            yield self._per_gpu(GaugeMetricFamily(name, help_text, labels=["gpu"]), gpus, reading)
        for name, help_text, reading in _COUNTERS:
            yield self._per_gpu(CounterMetricFamily(name, help_text, labels=["gpu"]), gpus, reading)

        yield self._per_gpu(
            GaugeMetricFamily("zmon_gpu_last_xid", "Code of the latest critical Xid error of the GPU.", labels=["gpu"]),
            gpus,
            lambda g: g.last_xid,
        )

        events = GaugeMetricFamily(
            "zmon_gpu_clock_event_active",
            "1 if the reason is currently holding the GPU clocks down (clocks_event_reasons), else 0.",
            labels=["gpu", "reason"],
        )
        for g in gpus:
            for reason, active in g.clock_events or ():
                events.add_metric([str(g.index), reason], 1.0 if active else 0.0)
        yield events

        yield self._labelled(
            CounterMetricFamily(
                "zmon_gpu_ecc_errors",
                "ECC memory errors over the GPU's lifetime (aggregate).",
                labels=["gpu", "type"],
            ),
            gpus,
            lambda g: (
                ("corrected", g.ecc_aggregate_corrected),
                ("uncorrected", g.ecc_aggregate_uncorrected),
            ),
        )
        yield self._labelled(
            CounterMetricFamily(
                "zmon_gpu_ecc_volatile_errors",
                "ECC memory errors since the driver was loaded.",
                labels=["gpu", "type"],
            ),
            gpus,
            lambda g: (("corrected", g.ecc_volatile_corrected), ("uncorrected", g.ecc_volatile_uncorrected)),
        )
        yield self._labelled(
            GaugeMetricFamily("zmon_gpu_retired_pages", "GPU memory pages retired, by cause.", labels=["gpu", "cause"]),
            gpus,
            lambda g: (
                ("multiple_single_bit_ecc", g.retired_pages_single_bit),
                ("double_bit_ecc", g.retired_pages_double_bit),
            ),
        )
        yield self._labelled(
            GaugeMetricFamily(
                "zmon_gpu_remapped_rows", "GPU memory rows remapped, by error type.", labels=["gpu", "type"]
            ),
            gpus,
            lambda g: (
                ("correctable", g.remapped_rows_correctable),
                ("uncorrectable", g.remapped_rows_uncorrectable),
            ),
        )

        # NVLink as the driver describes it: only on hosts whose GPUs have NVLink (absent, not 0, elsewhere).
        if any(g.nvlink_links_active is not None for g in gpus):
            yield self._per_gpu(
                GaugeMetricFamily("zmon_gpu_nvlink_links_active", "NVLinks of the GPU that are up.", labels=["gpu"]),
                gpus,
                lambda g: g.nvlink_links_active,
            )
            yield self._per_gpu(
                GaugeMetricFamily(
                    "zmon_gpu_nvlink_bandwidth_bytes_per_second",
                    "Nominal NVLink bandwidth of the GPU in each direction: active links × link speed.",
                    labels=["gpu"],
                ),
                gpus,
                lambda g: g.nvlink_bandwidth_bytes_per_second,
            )

        processes = GaugeMetricFamily(
            "zmon_gpu_process_memory_used_bytes",
            "GPU memory used by a process; workload is true for the watched generation service.",
            labels=["gpu", "pid", "workload"],
        )
        for g in gpus:
            for p in g.processes or ():
                if p.used_memory_bytes is not None:
                    processes.add_metric(
                        [str(g.index), str(p.pid), "true" if p.is_workload else "false"],
                        float(p.used_memory_bytes),
                    )
        yield processes

    def _slow(self, s: NvmlSlowSample) -> Iterator[Metric]:
        tx = GaugeMetricFamily(
            "zmon_gpu_pcie_tx_bytes_per_second", "PCIe throughput from the GPU to the host.", labels=["gpu"]
        )
        rx = GaugeMetricFamily(
            "zmon_gpu_pcie_rx_bytes_per_second", "PCIe throughput from the host to the GPU.", labels=["gpu"]
        )
        for p in s.gpus:
            if p.tx_bytes_per_second is not None:
                tx.add_metric([str(p.index)], p.tx_bytes_per_second)
            if p.rx_bytes_per_second is not None:
                rx.add_metric([str(p.index)], p.rx_bytes_per_second)
        yield from (tx, rx)
        if any(p.nvlink_tx_bytes is not None or p.nvlink_rx_bytes is not None for p in s.gpus):
            sent = CounterMetricFamily(
                "zmon_gpu_nvlink_transmitted_bytes",
                "Data the GPU sent over all its NVLinks since the driver loaded (read on the slow job).",
                labels=["gpu"],
            )
            received = CounterMetricFamily(
                "zmon_gpu_nvlink_received_bytes",
                "Data the GPU received over all its NVLinks since the driver loaded (read on the slow job).",
                labels=["gpu"],
            )
            for p in s.gpus:
                if p.nvlink_tx_bytes is not None:
                    sent.add_metric([str(p.index)], float(p.nvlink_tx_bytes))
                if p.nvlink_rx_bytes is not None:
                    received.add_metric([str(p.index)], float(p.nvlink_rx_bytes))
            yield from (sent, received)

    @staticmethod
    def _per_gpu(family: _Family, gpus: list[GpuSample], reading: _Reading) -> _Family:
        for g in gpus:
            v = reading(g)
            if v is not None:
                family.add_metric([str(g.index)], float(v))
        return family

    @staticmethod
    def _labelled(family: _Family, gpus: list[GpuSample], readings: _Labelled) -> _Family:
        for g in gpus:
            for label, v in readings(g):
                if v is not None:
                    family.add_metric([str(g.index), label], float(v))
        return family
