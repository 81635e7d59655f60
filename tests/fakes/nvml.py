"""A fake pynvml: GPUs with deterministic readings, unsupported fields, lost GPUs, no library."""

from __future__ import annotations

import ctypes
import functools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

# Only for its error classes and constants, so the provider's except-clauses work exactly as with the real
# module (NVMLError(code) returns the NVMLError_<Name> subclass).
import pynvml

GIB = 1024**3
MIB = 1024**2

XID = pynvml.nvmlEventTypeXidCriticalError
# Unversioned pynvml wrappers that turn a missing C symbol into NVMLLibraryMismatchError.
_MISMATCH_WRAPPED = {"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"}


def nvml_error(code: int) -> pynvml.NVMLError:
    """The exception real pynvml raises for an NVML return code."""
    return pynvml.NVMLError(code)


@dataclass
class FakeGpu:
    """One GPU's readings in NVML's own units (MHz, mW, mJ, percent, KB/s). Mutable: tests change them."""

    name: str
    uuid: str
    pci_bus_id: str
    memory_total: int = 80 * GIB
    memory_used: int = 0  # what nvidia-smi calls used (v2: without the driver's reserve)
    memory_reserved: int = 512 * MIB
    utilization_gpu: int = 0  # percent
    utilization_memory: int = 0  # percent
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    energy_mj: int = 1_000_000
    temperature_c: int = 30
    sm_clock_mhz: int = 345
    mem_clock_mhz: int = 2619
    max_sm_clock_mhz: int = 1980
    clock_reasons: int = pynvml.nvmlClocksEventReasonGpuIdle
    fan_percent: int = 30
    pstate: int = 0
    # (memory error type, counter type) -> count
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)
    # page retirement cause -> page addresses
    retired_pages: dict[int, list[int]] = field(default_factory=dict)
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    pcie_tx_kbs: int = 0
    pcie_rx_kbs: int = 0
    supported_events: int = XID | pynvml.nvmlEventTypeSingleBitEccError | pynvml.nvmlEventTypeDoubleBitEccError
    unsupported: set[str] = field(default_factory=set)  # NVML functions that raise NotSupported here
    errors: dict[str, int] = field(default_factory=dict)  # function ("*" = any) -> NVML error code it raises
    lost: bool = False  # the switch: every call on this GPU raises GpuIsLost
    generation: int = 0  # bumped on loss: handles taken before it are stale
    xid_queue: list[int] = field(default_factory=list)
    # GPM (Hopper and later). Off by default: the GPM functions raise NotSupported, as on an older card.
    gpm_supported: bool = False
    # NVML_GPM_METRIC_* id -> value in NVML's unit (percent, MiB/s) over any interval; an id not listed
    # reads nvmlReturn NotSupported in nvmlGpmMetricsGet.
    gpm_metrics: dict[int, float] = field(default_factory=dict)
    gpm_metric_errors: dict[int, int] = field(default_factory=dict)  # metric id -> its nvmlReturn code
    mig_mode: int | None = None  # current MIG mode (0 off, 1 on); None: nvmlDeviceGetMigMode NotSupported
    # NVLink. 0 links: the NVLink functions raise NotSupported (a PCIe card, or no NVLink support).
    nvlink_links: int = 0  # links the GPU has (link indices beyond raise InvalidArgument)
    nvlink_down: set[int] = field(default_factory=set)  # links that are not active
    nvlink_speed_mbps: int | None = None  # NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON; None: NotSupported
    nvlink_tx_kib: int = 0  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX summed over links (KiB)
    nvlink_rx_kib: int = 0


@dataclass(frozen=True)
class FakeHandle:
    position: int
    generation: int


@dataclass
class FakeEventSet:
    registrations: list[FakeHandle] = field(default_factory=list)
    freed: bool = False


@dataclass
class FakeGpmSample:
    """What NVML keeps behind one nvmlGpmSample_t: the counters of one GPU at one nvmlGpmSampleGet."""

    buffer: ctypes.Array[ctypes.c_char]  # the memory the pynvml pointer points at (kept alive here)
    freed: bool = False
    position: int | None = None  # GPU it was taken on; None until nvmlGpmSampleGet
    generation: int = 0
    sequence: int = 0  # order of nvmlGpmSampleGet calls across the fake
    metrics: dict[int, float] = field(default_factory=dict)  # the GPU's values when it was taken
    metric_errors: dict[int, int] = field(default_factory=dict)


def _address(pointer: Any) -> int | None:
    """The address a ctypes pointer (pynvml's c_nvmlGpmSample_t) holds; None for NULL or a non-pointer."""
    try:
        return ctypes.cast(pointer, ctypes.c_void_p).value
    except ctypes.ArgumentError:
        return None


F = TypeVar("F", bound=Callable[..., Any])


def _api(fn: F) -> F:
    """Common behaviour of every fake NVML function: call counting, init state, missing functions."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: FakeNvml, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        if name in self.missing_functions:
            if name in _MISMATCH_WRAPPED:
                raise pynvml.NVMLLibraryMismatchError(f"{name}: unversioned function not in this NVML")
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if name != "nvmlInit" and self._init_count == 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        if self.driver_gone and name != "nvmlShutdown":
            raise nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class FakeNvml:
    """Module-like stand-in for pynvml over a list of FakeGpu.

    Functions zmon calls are methods with pynvml's names and signatures; constants and error classes are
    pynvml's own (through __getattr__); any other pynvml function does not exist here.
    """

    def __init__(
        self,
        gpus: Iterable[FakeGpu],
        *,
        library_present: bool = True,
        driver_version: str = "580.95.05",
        nvml_version: str = "13.580.95.05",
        cuda_driver_version: int = 13000,
        missing_functions: Iterable[str] = (),
    ) -> None:
        self.gpus = list(gpus)
        self.library_present = library_present
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.cuda_driver_version = cuda_driver_version
        self.missing_functions = set(missing_functions)
        self.driver_gone = False  # the switch: every call raises DriverNotLoaded
        self.calls: Counter[str] = Counter()
        self.event_sets: list[FakeEventSet] = []
        self.gpm_samples: dict[int, FakeGpmSample] = {}  # by address, as NVML's allocations
        self._gpm_sequence = 0
        self._init_count = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(pynvml, name)
        if callable(value) and not isinstance(value, type):
            raise AttributeError(f"fake NVML has no function {name}")
        return value

    # -- switches for tests ---------------------------------------------------------------------------

    def lose(self, index: int) -> None:
        """The GPU falls off the bus: calls raise GpuIsLost and its handles go stale."""
        self.gpus[index].lost = True
        self.gpus[index].generation += 1

    def restore(self, index: int) -> None:
        """The GPU is back (after a reset): a fresh handle works again."""
        self.gpus[index].lost = False

    def inject_xid(self, index: int, code: int) -> None:
        self.gpus[index].xid_queue.append(code)

    @property
    def initialized(self) -> bool:
        return self._init_count > 0

    @property
    def live_event_sets(self) -> int:
        return sum(not s.freed for s in self.event_sets)

    @property
    def live_gpm_samples(self) -> int:
        return sum(not s.freed for s in self.gpm_samples.values())

    def gpm_calls(self) -> int:
        """Calls of any NVML GPM function so far."""
        return sum(n for name, n in self.calls.items() if name.startswith("nvmlGpm"))

    # -- helpers --------------------------------------------------------------------------------------

    def _gpu(self, handle: FakeHandle, function: str) -> FakeGpu:
        gpu = self.gpus[handle.position]
        if gpu.lost or handle.generation != gpu.generation:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        code = gpu.errors.get(function, gpu.errors.get("*"))
        if code is not None:
            raise nvml_error(code)
        if function in gpu.unsupported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _handle(self, position: int) -> FakeHandle:
        gpu = self.gpus[position]
        if gpu.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return FakeHandle(position, gpu.generation)

    # -- library and system ---------------------------------------------------------------------------

    @_api
    def nvmlInit(self) -> None:
        if not self.library_present:
            raise nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self._init_count += 1

    @_api
    def nvmlShutdown(self) -> None:
        self._init_count -= 1

    @_api
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    @_api
    def nvmlSystemGetNVMLVersion(self) -> str:
        return self.nvml_version

    @_api
    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_driver_version

    @_api
    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.cuda_driver_version

    # -- handles and identity -------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    @_api
    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._handle(index)

    @_api
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        for position, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return self._handle(position)
        raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)

    @_api
    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    @_api
    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    @_api
    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo")
        # Real pynvml returns the ctypes struct: char arrays come back as bytes.
        return SimpleNamespace(busId=gpu.pci_bus_id.encode(), busIdLegacy=gpu.pci_bus_id[4:].encode())

    # -- fast readings --------------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    @_api
    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> SimpleNamespace:
        if version and "nvmlDeviceGetMemoryInfo_v2" in self.missing_functions:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)  # what real pynvml does on old drivers
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        if version:  # v2: `used` leaves the driver's reserve out, as nvidia-smi does
            free = gpu.memory_total - gpu.memory_used - gpu.memory_reserved
            return SimpleNamespace(
                version=version,
                total=gpu.memory_total,
                reserved=gpu.memory_reserved,
                free=free,
                used=gpu.memory_used,
            )
        used = gpu.memory_used + gpu.memory_reserved
        return SimpleNamespace(total=gpu.memory_total, free=gpu.memory_total - used, used=used)

    @_api
    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    @_api
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    @_api
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    @_api
    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    @_api
    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        clocks = {pynvml.NVML_CLOCK_SM: gpu.sm_clock_mhz, pynvml.NVML_CLOCK_MEM: gpu.mem_clock_mhz}
        if clock_type not in clocks:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return clocks[clock_type]

    @_api
    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetMaxClockInfo")
        if clock_type != pynvml.NVML_CLOCK_SM:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.max_sm_clock_mhz

    @_api
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").clock_reasons

    @_api
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_reasons

    @_api
    def nvmlDeviceGetFanSpeed(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetFanSpeed").fan_percent

    @_api
    def nvmlDeviceGetPerformanceState(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPerformanceState").pstate

    @_api
    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        return gpu.ecc.get((error_type, counter_type), 0)

    @_api
    def nvmlDeviceGetRetiredPages(self, handle: FakeHandle, cause: int) -> list[int]:
        return list(self._gpu(handle, "nvmlDeviceGetRetiredPages").retired_pages.get(cause, []))

    @_api
    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        return self._gpu(handle, "nvmlDeviceGetRemappedRows").remapped_rows

    def _processes(self, handle: FakeHandle, function: str, rows: str) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, function)
        return [
            # Real pynvml maps NVML_VALUE_NOT_AVAILABLE to None.
            SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
            for pid, used in getattr(gpu, rows)
        ]

    @_api
    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._processes(handle, "nvmlDeviceGetComputeRunningProcesses", "compute_processes")

    @_api
    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._processes(handle, "nvmlDeviceGetComputeRunningProcesses_v2", "compute_processes")

    @_api
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._processes(handle, "nvmlDeviceGetGraphicsRunningProcesses", "graphics_processes")

    @_api
    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._processes(handle, "nvmlDeviceGetGraphicsRunningProcesses_v2", "graphics_processes")

    # -- Xid events -----------------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "nvmlDeviceGetSupportedEventTypes").supported_events

    @_api
    def nvmlEventSetCreate(self) -> FakeEventSet:
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    @_api
    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        gpu = self._gpu(handle, "nvmlDeviceRegisterEvents")
        if event_types & ~gpu.supported_events:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        event_set.registrations.append(handle)

    @_api
    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> SimpleNamespace:
        if event_set.freed:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for handle in event_set.registrations:
            gpu = self._gpu(handle, "nvmlEventSetWait")
            if gpu.xid_queue:
                code = gpu.xid_queue.pop(0)
                return SimpleNamespace(
                    device=handle, eventType=XID, eventData=code, gpuInstanceId=0, computeInstanceId=0
                )
        raise nvml_error(pynvml.NVML_ERROR_TIMEOUT)

    @_api
    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True

    # -- MIG and GPM ----------------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetMigMode")
        if gpu.mig_mode is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [gpu.mig_mode, gpu.mig_mode]  # [current, pending]

    def _gpm_gpu(self, handle: FakeHandle, function: str) -> FakeGpu:
        gpu = self._gpu(handle, function)
        if not gpu.gpm_supported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _live_sample(self, pointer: Any) -> FakeGpmSample:
        address = _address(pointer)
        sample = None if address is None else self.gpm_samples.get(address)
        if sample is None or sample.freed:  # real NVML would read freed memory: make the misuse loud
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return sample

    @_api
    def nvmlGpmQueryDeviceSupport(self, handle: FakeHandle) -> pynvml.c_nvmlGpmSupport_t:
        self._gpm_gpu(handle, "nvmlGpmQueryDeviceSupport")
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = 1
        return support

    @_api
    def nvmlGpmSampleAlloc(self) -> Any:
        buffer = ctypes.create_string_buffer(16)  # stands in for NVML's opaque allocation
        self.gpm_samples[ctypes.addressof(buffer)] = FakeGpmSample(buffer)
        return ctypes.cast(buffer, pynvml.c_nvmlGpmSample_t)

    @_api
    def nvmlGpmSampleFree(self, gpm_sample: Any) -> None:
        self._live_sample(gpm_sample).freed = True

    @_api
    def nvmlGpmSampleGet(self, handle: FakeHandle, gpm_sample: Any) -> Any:
        gpu = self._gpm_gpu(handle, "nvmlGpmSampleGet")
        sample = self._live_sample(gpm_sample)
        self._gpm_sequence += 1
        sample.position, sample.generation, sample.sequence = handle.position, handle.generation, self._gpm_sequence
        sample.metrics, sample.metric_errors = dict(gpu.gpm_metrics), dict(gpu.gpm_metric_errors)
        return gpm_sample

    @_api
    def nvmlGpmMetricsGet(self, metrics_get: pynvml.c_nvmlGpmMetricsGet_t) -> pynvml.c_nvmlGpmMetricsGet_t:
        """Values of sample2 (the GPU's values over the interval it closes); checks the request as NVML would."""
        if not isinstance(metrics_get, pynvml.c_nvmlGpmMetricsGet_t):
            raise TypeError(f"expected c_nvmlGpmMetricsGet_t, got {type(metrics_get).__name__}")
        first, second = self._live_sample(metrics_get.sample1), self._live_sample(metrics_get.sample2)
        if (
            metrics_get.version != pynvml.NVML_GPM_METRICS_GET_VERSION
            or not 0 < metrics_get.numMetrics <= pynvml.NVML_GPM_METRIC_MAX
            or first.position is None
            or (first.position, first.generation) != (second.position, second.generation)
            or first.sequence >= second.sequence
        ):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for i in range(metrics_get.numMetrics):
            m = metrics_get.metrics[i]
            if m.metricId in second.metric_errors:
                m.nvmlReturn, m.value = second.metric_errors[m.metricId], 0.0
            elif m.metricId in second.metrics:
                m.nvmlReturn, m.value = pynvml.NVML_SUCCESS, second.metrics[m.metricId]
            else:
                m.nvmlReturn, m.value = pynvml.NVML_ERROR_NOT_SUPPORTED, 0.0
        return metrics_get

    # -- NVLink ---------------------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetNvLinkState(self, handle: FakeHandle, link: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetNvLinkState")
        if gpu.nvlink_links == 0:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= gpu.nvlink_links:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_DISABLED if link in gpu.nvlink_down else pynvml.NVML_FEATURE_ENABLED

    @_api
    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[Any]) -> Any:
        """pynvml's return shape: an array of c_nvmlFieldValue_t with a per-field nvmlReturn."""
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for i, fid in enumerate(field_ids):
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            values[i].fieldId, values[i].scopeId = fid, scope
            reading = {
                pynvml.NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON: gpu.nvlink_speed_mbps,
                pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: gpu.nvlink_tx_kib,
                pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: gpu.nvlink_rx_kib,
            }.get(fid)
            if gpu.nvlink_links == 0 or reading is None:
                values[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            values[i].nvmlReturn = pynvml.NVML_SUCCESS
            values[i].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            values[i].value.ullVal = reading
        return values

    # -- slow readings --------------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetPcieThroughput(self, handle: FakeHandle, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPcieThroughput")
        return gpu.pcie_tx_kbs if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else gpu.pcie_rx_kbs


# -- scenarios --------------------------------------------------------------------------------------------

WORKLOAD_PID = 4242  # the generation service zmon watches
OTHER_PID = 5151
VANISHED_PID = 999_999  # listed by NVML, gone from the process table, memory unknown

_ECC = {
    (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): 2,
    (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): 0,
    (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC): 17,
    (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): 1,
}
_HOPPER_UNSUPPORTED = {"nvmlDeviceGetFanSpeed", "nvmlDeviceGetRetiredPages"}  # SXM: no fan; rows are remapped


def h100(i: int, **overrides: Any) -> FakeGpu:
    """A busy H100 SXM with every field but fan and retired pages (Hopper remaps rows instead)."""
    values: dict[str, Any] = dict(
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{i:08x}-1111-2222-3333-444455556666",
        pci_bus_id=f"00000000:{0x18 + 0x11 * i:02X}:00.0",
        memory_total=80 * GIB,
        memory_used=32 * GIB + i * GIB,
        utilization_gpu=87 - i,
        utilization_memory=41,
        power_mw=612_345 - 1000 * i,
        power_limit_mw=700_000,
        energy_mj=123_456_789 + i,
        temperature_c=64 + i,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        max_sm_clock_mhz=1980,
        clock_reasons=pynvml.nvmlClocksEventReasonSwPowerCap,
        pstate=0,
        ecc=dict(_ECC),
        remapped_rows=(3, 0, 0, 0),
        compute_processes=[(WORKLOAD_PID + i, 31 * GIB), (OTHER_PID + i, 1 * GIB)],
        pcie_tx_kbs=1_200_000,
        pcie_rx_kbs=3_400_000,
        unsupported=set(_HOPPER_UNSUPPORTED),
    )
    values.update(overrides)
    return FakeGpu(**values)


def make_mixed(**nvml_kwargs: Any) -> FakeNvml:
    """2 H100 + 1 older card, the main scenario.

    GPU 0: everything (but fan, retired pages); the workload (pid 4242) listed as compute and graphics, plus
    another process. GPU 1: utilization not supported (as in MIG mode), idle, a vanished process with unknown
    memory. GPU 2: an older card without power readings, ECC, row remapping or Xid events, but with a fan
    and retired pages.
    """
    gpu0 = h100(
        0,
        compute_processes=[(WORKLOAD_PID, 31 * GIB), (OTHER_PID, 1 * GIB)],
        graphics_processes=[(WORKLOAD_PID, 31 * GIB)],
    )
    gpu1 = h100(
        1,
        memory_used=0,
        power_mw=98_000,
        temperature_c=35,
        sm_clock_mhz=345,
        clock_reasons=pynvml.nvmlClocksEventReasonGpuIdle,
        ecc={},
        remapped_rows=(0, 0, 0, 0),
        compute_processes=[(VANISHED_PID, None)],
        pcie_tx_kbs=0,
        pcie_rx_kbs=12,
        unsupported=_HOPPER_UNSUPPORTED | {"nvmlDeviceGetUtilizationRates"},
    )
    gpu2 = FakeGpu(
        name="Quadro P2000",
        uuid="GPU-99999999-8888-7777-6666-555544443333",
        pci_bus_id="00000000:AF:00.0",
        memory_total=5 * GIB,
        memory_used=0,
        memory_reserved=64 * MIB,
        utilization_gpu=0,
        utilization_memory=0,
        temperature_c=41,
        sm_clock_mhz=139,
        mem_clock_mhz=405,
        max_sm_clock_mhz=1721,
        clock_reasons=pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonDisplayClockSetting,
        fan_percent=35,
        pstate=8,
        retired_pages={
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [0x1000, 0x2000],
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: [],
        },
        pcie_tx_kbs=5,
        pcie_rx_kbs=7,
        supported_events=0,
        unsupported={
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetEnforcedPowerLimit",
            "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetRemappedRows",
        },
    )
    return FakeNvml([gpu0, gpu1, gpu2], **nvml_kwargs)


def make_fake(n_gpus: int = 8) -> FakeNvml:
    """n busy H100s with every field (the benchmark host): each runs one workload process."""
    return FakeNvml([h100(i) for i in range(n_gpus)])


# GPM readings in NVML's units (percent, MiB/s), as measured on an H200 (docs/BENCHMARKS.md, FACTS.md).
GPM_GEMM = {
    pynvml.NVML_GPM_METRIC_SM_UTIL: 95.0,
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 14.0,
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 92.0,
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 17.0,
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: 1536.0,
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: 512.0,
}
GPM_COPY = {
    pynvml.NVML_GPM_METRIC_SM_UTIL: 97.0,
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 83.0,
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 0.0,
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 85.0,
}


def make_gpm(**nvml_kwargs: Any) -> FakeNvml:
    """GPM-capable and older GPUs side by side.

    GPU 0: an H200 SXM running a GEMM loop, NVLink traffic included. GPU 1: an H100 PCIe without NVLink
    running a copy loop: its NVLink metrics come back with nvmlReturn NotSupported. GPU 2: an A100 (Ampere):
    no GPM at all.
    """
    gpu0 = h100(0, name="NVIDIA H200", memory_total=141 * GIB, gpm_supported=True, gpm_metrics=dict(GPM_GEMM))
    gpu1 = h100(
        1,
        name="NVIDIA H100 PCIe",
        gpm_supported=True,
        gpm_metrics=dict(GPM_COPY),
        gpm_metric_errors={
            pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: pynvml.NVML_ERROR_NOT_SUPPORTED,
            pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: pynvml.NVML_ERROR_NOT_SUPPORTED,
        },
    )
    gpu2 = h100(2, name="NVIDIA A100-SXM4-80GB", utilization_gpu=99)
    return FakeNvml([gpu0, gpu1, gpu2], **nvml_kwargs)


def make_absent() -> FakeNvml:
    """No NVML library on this host: nvmlInit raises NVMLError_LibraryNotFound."""
    return FakeNvml([], library_present=False)
