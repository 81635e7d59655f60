"""NVML provider, the only module that imports pynvml: reads every GPU into immutable samples."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zmon.providers.base import SourceUnavailable, nvidia_devices_present

log = logging.getLogger(__name__)

# Clock event ("throttle") reason bits: nvmlClocksEventReason* in nvml.h, stable across driver versions.
CLOCK_EVENT_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)

# NVML constants used below, with their nvml.h values in case an old pynvml lacks the name.
_CONSTANTS: dict[str, int] = {
    "NVML_TEMPERATURE_GPU": 0,
    "NVML_CLOCK_SM": 1,
    "NVML_CLOCK_MEM": 2,
    "NVML_MEMORY_ERROR_TYPE_CORRECTED": 0,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
    "NVML_VOLATILE_ECC": 0,
    "NVML_AGGREGATE_ECC": 1,
    "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS": 0,
    "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR": 1,
    "NVML_PCIE_UTIL_TX_BYTES": 0,
    "NVML_PCIE_UTIL_RX_BYTES": 1,
    "nvmlEventTypeXidCriticalError": 0x8,
    "NVML_SUCCESS": 0,
    "NVML_GPM_METRICS_GET_VERSION": 1,
    "NVML_GPM_METRIC_SM_UTIL": 2,
    "NVML_GPM_METRIC_SM_OCCUPANCY": 3,
    "NVML_GPM_METRIC_ANY_TENSOR_UTIL": 5,
    "NVML_GPM_METRIC_DRAM_BW_UTIL": 10,
    "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC": 60,
    "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC": 61,
    "NVML_NVLINK_MAX_LINKS": 18,
    "NVML_FEATURE_ENABLED": 1,
    "NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON": 90,
    "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX": 138,
    "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX": 139,
    "NVML_VALUE_TYPE_DOUBLE": 0,
}
_ALL_LINKS = 0xFFFFFFFF  # a field's scopeId for the sum over every NVLink of the GPU
_PSTATE_UNKNOWN = 32  # NVML_PSTATE_UNKNOWN
_MAX_EVENTS_PER_SAMPLE = 64  # bounds one drain of an Xid storm; the rest is read on the next tick


# GPM (GPU Performance Monitoring, Hopper and later): GpuSample field, NVML_GPM_METRIC_* name, conversion from
# NVML's unit to zmon's. The utilizations come in percent; the NVLink rates in MiB/s (nvml.h: "in MiB/sec").
def _from_percent(value: float) -> float:
    return value / 100.0


def _from_mib(value: float) -> float:
    return value * 1024.0 * 1024.0


GPM_METRICS: tuple[tuple[str, str, Callable[[float], float]], ...] = (
    ("sm_active_ratio", "NVML_GPM_METRIC_SM_UTIL", _from_percent),  # share of SMs busy (DCGM's SM_ACTIVE)
    ("sm_occupancy_ratio", "NVML_GPM_METRIC_SM_OCCUPANCY", _from_percent),  # resident warps / the maximum
    ("tensor_active_ratio", "NVML_GPM_METRIC_ANY_TENSOR_UTIL", _from_percent),  # any tensor pipe (HMMA, IMMA..)
    ("dram_bandwidth_utilization_ratio", "NVML_GPM_METRIC_DRAM_BW_UTIL", _from_percent),  # of the peak
    ("nvlink_rx_bytes_per_second", "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", _from_mib),  # all links
    ("nvlink_tx_bytes_per_second", "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", _from_mib),
)
# NVML refreshes the GPM counters about every 100 ms ("the interval between two nvmlGpmSampleGet() calls should
# be greater than 100ms"): a shorter interval reads zeros, which would look like an idle GPU.
GPM_MIN_INTERVAL_SECONDS = 0.1

# NVML errors meaning "this value does not exist here": the field is absent, never 0.
_ABSENT_ERRORS = (
    "NVMLError_NotSupported",
    "NVMLError_NoPermission",
    "NVMLError_FunctionNotFound",
    "NVMLError_NotFound",
    "NVMLError_NoData",
    "NVMLError_NotReady",
    "NVMLError_InvalidArgument",
    "NVMLError_Unknown",
)
# The GPU itself is gone or needs a reset: it is reported down, the other GPUs go on.
_LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired", "NVMLError_GpuNotFound")
# The library is unusable: the whole sample fails (the sampler backs off and retries).
_FATAL_ERRORS = (
    "NVMLError_Uninitialized",
    "NVMLError_DriverNotLoaded",
    "NVMLError_LibRmVersionMismatch",
    "NVMLError_LibraryNotFound",
)


@dataclass(frozen=True)
class ProcessSample:
    """One process holding GPU memory (`nvidia-smi --query-compute-apps=pid,used_memory`)."""

    pid: int
    used_memory_bytes: int | None  # None when NVML cannot tell (e.g. no permission, WDDM)
    is_workload: bool  # pid == the watched pid (the generation service)


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one instant. Every reading is None when NVML does not support it: unknown, not 0."""

    index: int  # NVML index (`index`), the `gpu` label
    uuid: str | None  # `uuid`
    name: str | None  # `name`
    pci_bus_id: str | None  # `pci.bus_id`
    up: bool = True  # False when the GPU is lost (fell off the bus, needs a reset) or unreadable
    error: str | None = None  # why it is down
    utilization_gpu_ratio: float | None = None  # `utilization.gpu` / 100: time a kernel ran, 0..1
    utilization_memory_ratio: float | None = None  # `utilization.memory` / 100: time memory was read/written
    memory_used_bytes: int | None = None  # `memory.used`
    memory_free_bytes: int | None = None  # `memory.free`
    memory_total_bytes: int | None = None  # `memory.total`
    power_watts: float | None = None  # `power.draw`
    power_limit_watts: float | None = None  # `enforced.power.limit`
    energy_joules: float | None = None  # total energy since the driver loaded (no --query-gpu field)
    temperature_celsius: float | None = None  # `temperature.gpu`
    sm_clock_hertz: float | None = None  # `clocks.sm` × 1e6
    memory_clock_hertz: float | None = None  # `clocks.mem` × 1e6
    sm_clock_max_hertz: float | None = None  # `clocks.max.sm` × 1e6
    clock_event_reasons: int | None = None  # `clocks_event_reasons.active` bitmask (see CLOCK_EVENT_REASONS)
    fan_speed_ratio: float | None = None  # `fan.speed` / 100 (of the maximum; may exceed 1 on some boards)
    performance_state: int | None = None  # `pstate`: 0 (maximum performance) .. 15 (minimum)
    ecc_volatile_corrected: int | None = None  # `ecc.errors.corrected.volatile.total`, since driver load
    ecc_volatile_uncorrected: int | None = None  # `ecc.errors.uncorrected.volatile.total`
    ecc_aggregate_corrected: int | None = None  # `ecc.errors.corrected.aggregate.total`, lifetime
    ecc_aggregate_uncorrected: int | None = None  # `ecc.errors.uncorrected.aggregate.total`
    retired_pages_single_bit: int | None = None  # `retired_pages.sbe` (pre-Ampere)
    retired_pages_double_bit: int | None = None  # `retired_pages.dbe` (pre-Ampere)
    remapped_rows_correctable: int | None = None  # `remapped_rows.correctable` (Ampere and later)
    remapped_rows_uncorrectable: int | None = None  # `remapped_rows.uncorrectable`
    remapped_rows_pending: bool | None = None  # `remapped_rows.pending`: a reset is needed to apply them
    remapped_rows_failure: bool | None = None  # `remapped_rows.failure`: a remapping failed
    xid_errors: int | None = None  # critical Xid events seen since zmon started; None: events unsupported
    last_xid: int | None = None  # code of the latest of them
    processes: tuple[ProcessSample, ...] | None = None  # None when disabled or not supported
    # GPM (Hopper and later), averaged over the interval since the previous sample; None before Hopper, in MIG
    # mode, with gpm off, and on the first sample after start or recovery (no interval yet).
    sm_active_ratio: float | None = None  # share of SMs with at least one warp resident, 0..1
    sm_occupancy_ratio: float | None = None  # resident warps / the maximum the SMs hold, 0..1
    tensor_active_ratio: float | None = None  # share of time the tensor cores were busy, 0..1
    dram_bandwidth_utilization_ratio: float | None = None  # DRAM throughput / its theoretical peak, 0..1
    nvlink_rx_bytes_per_second: float | None = None  # received over all NVLinks
    nvlink_tx_bytes_per_second: float | None = None  # sent over all NVLinks
    # NVLink as the driver describes it (read once per handle); None without NVLink (PCIe only) or support.
    nvlink_links_active: int | None = None  # `nvidia-smi nvlink -s`: links up
    nvlink_link_bytes_per_second: float | None = None  # one link's speed, each direction (NVML: MBps)

    @property
    def nvlink_bandwidth_bytes_per_second(self) -> float | None:
        """Nominal NVLink bandwidth of the GPU in each direction: active links × link speed."""
        if self.nvlink_links_active is None or self.nvlink_link_bytes_per_second is None:
            return None
        return self.nvlink_links_active * self.nvlink_link_bytes_per_second

    @property
    def clock_events(self) -> tuple[tuple[str, bool], ...] | None:
        """The reason bitmask decoded into (name, active) pairs, in CLOCK_EVENT_REASONS order."""
        if self.clock_event_reasons is None:
            return None
        return decode_clock_event_reasons(self.clock_event_reasons)


@dataclass(frozen=True)
class NvmlSample:
    """All GPUs at one instant, with the software versions."""

    driver_version: str | None  # `driver_version`
    nvml_version: str | None
    cuda_driver_version: str | None  # highest CUDA version the driver supports, e.g. "13.0"
    gpus: tuple[GpuSample, ...]


@dataclass(frozen=True)
class PcieSample:
    """PCIe throughput of one GPU over NVML's ~20 ms window (`nvidia-smi dmon -s t`)."""

    index: int
    tx_bytes_per_second: float | None  # from the GPU to the host
    rx_bytes_per_second: float | None  # from the host to the GPU
    # Data sent / received over all the GPU's NVLinks since the driver loaded (classic throughput counters,
    # any GPU with NVLink); None without NVLink.
    nvlink_tx_bytes: int | None = None
    nvlink_rx_bytes: int | None = None


@dataclass(frozen=True)
class NvmlSlowSample:
    """The slow readings of every GPU that is up."""

    gpus: tuple[PcieSample, ...]


def decode_clock_event_reasons(mask: int) -> tuple[tuple[str, bool], ...]:
    """(name, active) for each known clock event reason in `mask`; unknown bits are ignored."""
    return tuple((name, bool(mask & bit)) for name, bit in CLOCK_EVENT_REASONS)


class _GpuLost(Exception):
    """Raised inside one GPU's read when NVML says the GPU is gone."""


class _Errors:
    """The NVML error classes of one pynvml-like module, grouped by what zmon does about them."""

    def __init__(self, nvml: Any) -> None:
        def group(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
            return tuple(getattr(nvml, n) for n in names if hasattr(nvml, n))

        self.base: type[BaseException] = nvml.NVMLError
        self.absent = group(_ABSENT_ERRORS)
        self.lost = group(_LOST_ERRORS)
        self.fatal = group(_FATAL_ERRORS)
        self.timeout = group(("NVMLError_Timeout",))
        # A newer name missing from this driver: try the fallback. pynvml raises NVMLLibraryMismatchError
        # (not an NVMLError) from unversioned wrappers such as nvmlDeviceGetComputeRunningProcesses.
        self.no_function = group(("NVMLError_FunctionNotFound", "NVMLLibraryMismatchError"))


@dataclass
class _GpuState:
    """What the provider keeps between samples for one GPU (mutable, never exposed)."""

    index: int
    handle: Any = None  # None until acquired, and again after the GPU is lost
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    sm_clock_max_hertz: float | None = None
    event_set: Any = None  # its own event set, so each Xid is attributed to this GPU
    xid_errors: int = 0
    last_xid: int | None = None
    lost_error: str | None = None
    # Two NVML GPM sample buffers, [previous, spare]; None when GPM is off for this GPU. Swapped on each good
    # sample, so a tick allocates nothing.
    gpm_samples: list[Any] | None = None
    gpm_taken_at: float | None = None  # clock time of the sample in gpm_samples[0]; None: no interval start yet
    nvlink_links: int | None = None  # active NVLinks; None: no NVLink here
    nvlink_link_bytes_per_second: float | None = None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version(value: int | None) -> str | None:
    return None if value is None else f"{value // 1000}.{value % 1000 // 10}"


def _ratio(percent: Any) -> float | None:
    return None if percent is None else float(percent) / 100.0


def _milli(value: Any) -> float | None:
    return None if value is None else float(value) / 1000.0


def _mega(value: Any) -> float | None:
    return None if value is None else float(value) * 1e6


class NvmlProvider:
    """Samples every GPU that NVML sees (CUDA_VISIBLE_DEVICES does not apply to NVML).

    `sample()` is the fast set (3.4 ms median for one busy H200, processes included); `sample_slow()`
    reads PCIe throughput, which blocks ~20 ms per call, and belongs to its own slow job. Both may run at
    once from two threads.

    With `gpm=True`, each fast sample of a GPM-capable GPU (Hopper and later) also takes a GPM sample and
    computes SM, tensor, DRAM and NVLink activity over the interval since the previous one
    (`nvmlGpmSampleGet` 0.2-0.6 ms + `nvmlGpmMetricsGet` 1-6 ms per GPU on an H200). Off by default here, so
    callers sampling fast (the profiler, every 0.1 s) do not pay for it unasked; `sampling.nvml.gpm` turns
    it on for the daemon. `clock` (monotonic seconds) enforces NVML's 100 ms minimum between GPM samples.
    """

    name = "nvml"

    def __init__(
        self,
        nvml: Any | None = None,
        *,
        processes: bool = True,
        watched_pid: int | None = None,
        gpm: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        if nvml is None:
            try:
                import pynvml
            except ImportError as e:
                raise SourceUnavailable(
                    f"nvidia-ml-py (pynvml) is not installed: {e}", expected=not nvidia_devices_present()
                ) from e
            nvml = pynvml
        self._nvml: Any = nvml
        self._errors = _Errors(nvml)
        self._processes = processes
        self._watched_pid = watched_pid
        # An old pynvml without the GPM bindings cannot build the request struct: GPM stays off.
        self._gpm = gpm and hasattr(nvml, "c_nvmlGpmMetricsGet_t")
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._warned: set[tuple[str, str]] = set()
        try:
            nvml.nvmlInit()
        except (self._errors.base, OSError) as e:
            no_gpu = not nvidia_devices_present()
            raise SourceUnavailable(
                f"NVML cannot start: {e}" + (" (no NVIDIA GPU on this host)" if no_gpu else ""), expected=no_gpu
            ) from e
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except self._errors.base as e:
            self._shutdown()
            raise SourceUnavailable(f"NVML cannot count GPUs: {e}") from e
        if count == 0:
            self._shutdown()
            raise SourceUnavailable("NVML sees no GPU", expected=True)
        self.driver_version = _text(self._query("nvmlSystemGetDriverVersion"))
        self.nvml_version = _text(self._query("nvmlSystemGetNVMLVersion"))
        self.cuda_driver_version = _cuda_version(
            self._query(("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"))
        )
        self._gpus = [_GpuState(i) for i in range(count)]
        try:
            for gpu in self._gpus:
                self._acquire(gpu)
        except self._errors.base as e:  # library-level failure right after init
            for gpu in self._gpus:
                self._free_event_set(gpu.event_set)
                self._disarm_gpm(gpu)
            self._shutdown()
            raise SourceUnavailable(f"NVML cannot read the GPUs: {e}") from e
        if gpm and not self._gpm:
            log.info("this pynvml has no GPM bindings (too old): GPM metrics left out")

    # -- the one NVML boundary ------------------------------------------------------------------------

    def _call(self, names: str | tuple[str, ...], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """Call the first function of `names` this NVML has: (True, value), or (False, None) if unavailable.

        NotSupported-like errors give (False, None); GPU-lost errors raise _GpuLost; library-level errors
        propagate. Any other NVML error is logged once and also reads as unavailable.
        """
        errors = self._errors
        for name in (names,) if isinstance(names, str) else names:
            fn = getattr(self._nvml, name, None)
            if fn is None:
                continue
            try:
                return True, fn(*args, **kwargs)
            except errors.no_function:
                continue
            except errors.lost as e:
                raise _GpuLost(f"{name}: {e}") from e
            except errors.fatal:
                raise
            except errors.base as e:
                if not isinstance(e, errors.absent):
                    self._warn_once(name, e)
                return False, None
        return False, None

    def _query(self, names: str | tuple[str, ...], *args: Any, **kwargs: Any) -> Any:
        """The value of an NVML call, or None when NVML cannot give it here."""
        return self._call(names, *args, **kwargs)[1]

    def _const(self, name: str) -> Any:
        return getattr(self._nvml, name, _CONSTANTS.get(name))

    def _warn_once(self, name: str, error: BaseException) -> None:
        key = (name, type(error).__name__)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("NVML %s failed (%s); the value is left out", name, error)

    # -- GPU handles and Xid events -------------------------------------------------------------------

    def _acquire(self, gpu: _GpuState) -> bool:
        """Get (or get back) the GPU's handle, identity and Xid registration; False while it is lost."""
        try:
            handle = None
            if gpu.uuid is not None:  # by UUID: indices shift when a GPU falls off the bus
                handle = self._query("nvmlDeviceGetHandleByUUID", gpu.uuid)
            if handle is None:
                handle = self._query("nvmlDeviceGetHandleByIndex", gpu.index)
            if handle is None:
                gpu.lost_error = "no NVML handle"
                return False
            if gpu.uuid is None:
                gpu.uuid = _text(self._query("nvmlDeviceGetUUID", handle))
                gpu.name = _text(self._query("nvmlDeviceGetName", handle))
                pci = self._query("nvmlDeviceGetPciInfo", handle)
                gpu.pci_bus_id = None if pci is None else _text(pci.busId)
            gpu.sm_clock_max_hertz = _mega(
                self._query("nvmlDeviceGetMaxClockInfo", handle, self._const("NVML_CLOCK_SM"))
            )
            gpu.nvlink_links, gpu.nvlink_link_bytes_per_second = self._read_nvlink(handle)
            gpu.event_set = self._register_xid_events(handle)
            self._arm_gpm(gpu, handle)
        except _GpuLost as e:
            # Lost half-way: release what this attempt registered, the next one starts clean.
            self._free_event_set(gpu.event_set)
            gpu.event_set = None
            self._disarm_gpm(gpu)
            gpu.lost_error = str(e)
            return False
        gpu.handle = handle
        gpu.lost_error = None
        return True

    def _read_nvlink(self, handle: Any) -> tuple[int | None, float | None]:
        """(active links, one link's bytes/s each way), read once per handle: (None, None) without NVLink.

        Links are probed from 0 until NVML refuses an index (a GPU has fewer links than the maximum)."""
        enabled = self._const("NVML_FEATURE_ENABLED")
        active, probed = 0, 0
        for link in range(int(self._const("NVML_NVLINK_MAX_LINKS"))):
            ok, state = self._call("nvmlDeviceGetNvLinkState", handle, link)
            if not ok:
                break
            probed += 1
            active += int(state == enabled)
        if probed == 0:
            return None, None
        speed = self._field(handle, "NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON")
        return active, None if speed is None or speed <= 0 else speed * 1e6

    def _field(self, handle: Any, field: str, scope: int | None = None) -> float | None:
        """One NVML field value (nvmlDeviceGetFieldValues), or None where NVML cannot give it."""
        fid = int(self._const(field))
        values = self._query("nvmlDeviceGetFieldValues", handle, [fid if scope is None else (fid, scope)])
        if not values:
            return None
        v = values[0]
        if v.nvmlReturn != self._const("NVML_SUCCESS"):
            return None
        if v.valueType == self._const("NVML_VALUE_TYPE_DOUBLE"):
            return float(v.value.dVal)
        return float(v.value.ullVal)  # the union's widest integer member reads every integer type

    def _register_xid_events(self, handle: Any) -> Any:
        """A new event set with this GPU's critical Xid events, or None where events are not supported."""
        xid = self._const("nvmlEventTypeXidCriticalError")
        supported = self._query("nvmlDeviceGetSupportedEventTypes", handle)
        if supported is None or not supported & xid:
            return None
        event_set = self._query("nvmlEventSetCreate")
        if event_set is None:
            return None
        try:
            ok, _ = self._call("nvmlDeviceRegisterEvents", handle, xid, event_set)
        except _GpuLost:
            self._free_event_set(event_set)
            raise
        if not ok:
            self._free_event_set(event_set)
            return None
        return event_set

    def _free_event_set(self, event_set: Any) -> None:
        if event_set is None:
            return
        # Best effort: the set dies with the NVML session anyway.
        with contextlib.suppress(_GpuLost, self._errors.base):
            self._query("nvmlEventSetFree", event_set)

    def _drain_xids(self, gpu: _GpuState) -> None:
        """Count the Xid events queued since the last sample, without waiting (timeout 0)."""
        xid = self._const("nvmlEventTypeXidCriticalError")
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                data = self._nvml.nvmlEventSetWait(gpu.event_set, 0)
            except self._errors.timeout:
                return  # nothing queued
            except self._errors.lost as e:
                raise _GpuLost(f"nvmlEventSetWait: {e}") from e
            except self._errors.fatal:
                raise
            except self._errors.base as e:
                self._warn_once("nvmlEventSetWait", e)
                return
            if data.eventType & xid:
                gpu.xid_errors += 1
                gpu.last_xid = int(data.eventData)

    def _mark_lost(self, gpu: _GpuState, error: str) -> None:
        if gpu.handle is not None:
            log.warning("GPU %d (%s) is lost: %s", gpu.index, gpu.uuid, error)
        self._free_event_set(gpu.event_set)
        gpu.event_set = None
        self._disarm_gpm(gpu)  # re-detected with the new handle when the GPU comes back
        gpu.handle = None
        gpu.lost_error = error

    # -- GPM (Hopper and later) ----------------------------------------------------------------------

    def _arm_gpm(self, gpu: _GpuState, handle: Any) -> None:
        """Detect GPM on this GPU and allocate its two sample buffers; GPM stays off where unsupported."""
        self._disarm_gpm(gpu)
        if not self._gpm:
            return
        # Before Hopper NVML raises NotSupported (or reports isSupportedDevice 0); before driver 520 the
        # function does not exist: all three read as "no GPM here".
        support = self._query("nvmlGpmQueryDeviceSupport", handle)
        if support is None or not support.isSupportedDevice:
            return
        # In MIG mode the device-wide counters are not the instances' (those need nvmlGpmMigSampleGet, out of
        # scope): leave GPM off rather than report numbers nobody can attribute.
        mig = self._query("nvmlDeviceGetMigMode", handle)  # [current, pending]; NotSupported without MIG
        if mig is not None and mig[0]:
            log.info("GPU %d is in MIG mode: GPM metrics left out", gpu.index)
            return
        samples: list[Any] = []
        for _ in range(2):
            sample = self._query("nvmlGpmSampleAlloc")
            if sample is None:
                self._free_gpm_samples(samples)
                return
            samples.append(sample)
        gpu.gpm_samples = samples
        gpu.gpm_taken_at = None

    def _free_gpm_samples(self, samples: list[Any]) -> None:
        for sample in samples:
            # Freeing is host memory only (no GPU access), but stay best effort: never fail a loss or a close.
            with contextlib.suppress(_GpuLost, self._errors.base):
                self._query("nvmlGpmSampleFree", sample)

    def _disarm_gpm(self, gpu: _GpuState) -> None:
        if gpu.gpm_samples is not None:
            self._free_gpm_samples(gpu.gpm_samples)
        gpu.gpm_samples = None
        gpu.gpm_taken_at = None

    def _read_gpm(self, gpu: _GpuState) -> dict[str, float]:
        """GPM values over the interval since this GPU's previous GPM sample: {GpuSample field: value}.

        Empty on the first sample (no interval yet), within 100 ms of the previous one, or when NVML cannot
        give them; a metric whose own nvmlReturn is an error is left out. Raises _GpuLost.
        """
        if gpu.gpm_samples is None:
            return {}
        now = self._clock()
        if gpu.gpm_taken_at is not None and now - gpu.gpm_taken_at < GPM_MIN_INTERVAL_SECONDS:
            return {}  # keep the previous sample: the next tick measures the longer interval from it
        previous, spare = gpu.gpm_samples
        ok, _ = self._call("nvmlGpmSampleGet", gpu.handle, spare)
        if not ok:
            return {}  # the spare buffer holds nothing usable; the previous sample still starts the interval
        start = gpu.gpm_taken_at
        gpu.gpm_samples = [spare, previous]
        gpu.gpm_taken_at = now
        if start is None:
            return {}
        return self._gpm_metrics(previous, spare)

    def _gpm_metrics(self, sample1: Any, sample2: Any) -> dict[str, float]:
        request = self._nvml.c_nvmlGpmMetricsGet_t()
        request.version = self._const("NVML_GPM_METRICS_GET_VERSION")
        request.numMetrics = len(GPM_METRICS)
        request.sample1 = sample1
        request.sample2 = sample2
        for i, (_, metric, _) in enumerate(GPM_METRICS):
            request.metrics[i].metricId = self._const(metric)
        result = self._query("nvmlGpmMetricsGet", request)
        if result is None:
            return {}
        success = self._const("NVML_SUCCESS")
        out: dict[str, float] = {}
        for i, (name, _, convert) in enumerate(GPM_METRICS):
            m = result.metrics[i]
            value = float(m.value)
            # Per metric: NotSupported for NVLink on a card without links, for example.
            if m.nvmlReturn == success and math.isfinite(value):
                out[name] = convert(value)
        return out

    # -- samples --------------------------------------------------------------------------------------

    def sample(self) -> NvmlSample:
        """Every GPU's fast fields. A lost GPU is reported with up=False; library failures raise."""
        with self._lock:
            if self._closed:
                raise RuntimeError("NVML provider is closed")
            gpus = tuple(self._sample_gpu(gpu) for gpu in self._gpus)
        return NvmlSample(self.driver_version, self.nvml_version, self.cuda_driver_version, gpus)

    def _down(self, gpu: _GpuState) -> GpuSample:
        return GpuSample(gpu.index, gpu.uuid, gpu.name, gpu.pci_bus_id, up=False, error=gpu.lost_error)

    def _sample_gpu(self, gpu: _GpuState) -> GpuSample:
        if gpu.handle is None and not self._acquire(gpu):
            return self._down(gpu)
        try:
            return self._read(gpu)
        except _GpuLost as e:
            self._mark_lost(gpu, str(e))
            return self._down(gpu)

    def _read(self, gpu: _GpuState) -> GpuSample:
        h = gpu.handle
        # GPM first: its sample then falls at the same point of every tick, so the interval it averages over
        # is the sampling interval, not shifted by how long the reads below took (process lists vary).
        gpm = self._read_gpm(gpu)
        reads = 0  # successful calls: a GPU where nothing at all can be read is reported down

        def q(names: str | tuple[str, ...], *args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            ok, value = self._call(names, *args, **kwargs)
            reads += ok
            return value

        util = q("nvmlDeviceGetUtilizationRates", h)
        # v2 (driver >= 510) matches nvidia-smi: `used` leaves out the memory the driver reserves.
        v2 = getattr(self._nvml, "nvmlMemory_v2", None)
        mem = None if v2 is None else q("nvmlDeviceGetMemoryInfo", h, version=v2)
        if mem is None:
            mem = q("nvmlDeviceGetMemoryInfo", h)
        power = q("nvmlDeviceGetPowerUsage", h)  # mW
        limit = q("nvmlDeviceGetEnforcedPowerLimit", h)  # mW
        energy = q("nvmlDeviceGetTotalEnergyConsumption", h)  # mJ
        temp = q("nvmlDeviceGetTemperature", h, self._const("NVML_TEMPERATURE_GPU"))
        sm = q("nvmlDeviceGetClockInfo", h, self._const("NVML_CLOCK_SM"))  # MHz
        memclk = q("nvmlDeviceGetClockInfo", h, self._const("NVML_CLOCK_MEM"))  # MHz
        # ClocksEventReasons is the newer name (driver >= 535) of ClocksThrottleReasons.
        reasons = q(("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"), h)
        fan = q("nvmlDeviceGetFanSpeed", h)  # percent
        pstate = q("nvmlDeviceGetPerformanceState", h)
        ecc = self._ecc(q, h)
        retired = [
            q("nvmlDeviceGetRetiredPages", h, self._const(cause))
            for cause in (
                "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS",
                "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR",
            )
        ]
        remapped = q("nvmlDeviceGetRemappedRows", h)  # (correctable, uncorrectable, pending, failure)
        processes = self._read_processes(q, h) if self._processes else None
        if gpu.event_set is not None:
            self._drain_xids(gpu)
        if reads == 0:
            raise _GpuLost("no NVML call succeeded")

        return GpuSample(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            pci_bus_id=gpu.pci_bus_id,
            utilization_gpu_ratio=None if util is None else _ratio(util.gpu),
            utilization_memory_ratio=None if util is None else _ratio(util.memory),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_free_bytes=None if mem is None else int(mem.free),
            memory_total_bytes=None if mem is None else int(mem.total),
            power_watts=_milli(power),
            power_limit_watts=_milli(limit),
            energy_joules=_milli(energy),
            temperature_celsius=None if temp is None else float(temp),
            sm_clock_hertz=_mega(sm),
            memory_clock_hertz=_mega(memclk),
            sm_clock_max_hertz=gpu.sm_clock_max_hertz,
            clock_event_reasons=None if reasons is None else int(reasons),
            fan_speed_ratio=_ratio(fan),
            performance_state=None if pstate is None or pstate == _PSTATE_UNKNOWN else int(pstate),
            ecc_volatile_corrected=ecc[0],
            ecc_volatile_uncorrected=ecc[1],
            ecc_aggregate_corrected=ecc[2],
            ecc_aggregate_uncorrected=ecc[3],
            retired_pages_single_bit=None if retired[0] is None else len(retired[0]),
            retired_pages_double_bit=None if retired[1] is None else len(retired[1]),
            remapped_rows_correctable=None if remapped is None else int(remapped[0]),
            remapped_rows_uncorrectable=None if remapped is None else int(remapped[1]),
            remapped_rows_pending=None if remapped is None else bool(remapped[2]),
            remapped_rows_failure=None if remapped is None else bool(remapped[3]),
            xid_errors=None if gpu.event_set is None else gpu.xid_errors,
            last_xid=None if gpu.event_set is None else gpu.last_xid,
            processes=processes,
            sm_active_ratio=gpm.get("sm_active_ratio"),
            sm_occupancy_ratio=gpm.get("sm_occupancy_ratio"),
            tensor_active_ratio=gpm.get("tensor_active_ratio"),
            dram_bandwidth_utilization_ratio=gpm.get("dram_bandwidth_utilization_ratio"),
            nvlink_rx_bytes_per_second=gpm.get("nvlink_rx_bytes_per_second"),
            nvlink_tx_bytes_per_second=gpm.get("nvlink_tx_bytes_per_second"),
            nvlink_links_active=gpu.nvlink_links,
            nvlink_link_bytes_per_second=gpu.nvlink_link_bytes_per_second,
        )

    def _ecc(self, q: Any, h: Any) -> tuple[int | None, ...]:
        """(volatile corrected, volatile uncorrected, aggregate corrected, aggregate uncorrected)."""
        out: list[int | None] = []
        for counter in ("NVML_VOLATILE_ECC", "NVML_AGGREGATE_ECC"):
            for kind in ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED"):
                v = q("nvmlDeviceGetTotalEccErrors", h, self._const(kind), self._const(counter))
                out.append(None if v is None else int(v))
        return tuple(out)

    def _read_processes(self, q: Any, h: Any) -> tuple[ProcessSample, ...] | None:
        """Compute and graphics processes, one entry per pid (a C+G process is listed twice by NVML)."""
        compute = q(("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"), h)
        graphics = q(("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2"), h)
        if compute is None and graphics is None:
            return None
        used: dict[int, int | None] = {}
        for p in [*(compute or ()), *(graphics or ())]:
            pid = int(p.pid)
            mem = getattr(p, "usedGpuMemory", None)
            mem = None if mem is None else int(mem)
            if used.get(pid) is None:  # first reading of a pid wins unless it was unknown
                used[pid] = mem
        return tuple(ProcessSample(pid, mem, pid == self._watched_pid) for pid, mem in sorted(used.items()))

    def sample_slow(self) -> NvmlSlowSample:
        """PCIe tx/rx throughput of every GPU that is up; blocks ~20 ms per call (2 calls per GPU). GPUs with
        NVLink add their NVLink data counters (one field-value call each, ~1-3 ms)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("NVML provider is closed")
            handles = [(g.index, g.handle, g.nvlink_links) for g in self._gpus if g.handle is not None]
        # Not under the lock: the fast sample must not wait for these. Loss is handled by the fast sample.
        out = []
        for index, h, links in handles:
            nvtx = nvrx = None
            try:
                tx = self._query("nvmlDeviceGetPcieThroughput", h, self._const("NVML_PCIE_UTIL_TX_BYTES"))
                rx = self._query("nvmlDeviceGetPcieThroughput", h, self._const("NVML_PCIE_UTIL_RX_BYTES"))
                if links:  # NVLink data counters, summed over the links: KiB since the driver loaded
                    nvtx = self._field(h, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", _ALL_LINKS)
                    nvrx = self._field(h, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", _ALL_LINKS)
            except _GpuLost:
                continue
            # NVML reports KB/s (1 KB = 1024 bytes).
            out.append(
                PcieSample(
                    index,
                    None if tx is None else float(tx) * 1024.0,
                    None if rx is None else float(rx) * 1024.0,
                    None if nvtx is None else int(nvtx) * 1024,
                    None if nvrx is None else int(nvrx) * 1024,
                )
            )
        return NvmlSlowSample(tuple(out))

    def close(self) -> None:
        """Free the event sets and GPM samples and shut NVML down; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for gpu in self._gpus:
                self._free_event_set(gpu.event_set)
                gpu.event_set = None
                self._disarm_gpm(gpu)
                gpu.handle = None
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._errors.base as e:
            log.debug("nvmlShutdown failed: %s", e)
