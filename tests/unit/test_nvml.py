"""NVML provider and collector over the fake NVML: values, absent fields, lost GPUs, golden exposition."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.fakes.nvml import (
    GIB,
    OTHER_PID,
    VANISHED_PID,
    WORKLOAD_PID,
    FakeNvml,
    h100,
    make_absent,
    make_fake,
    make_gpm,
    make_mixed,
)
from tests.services import require_binary
from zmon.app.monitor import Monitor
from zmon.app.sources import add_nvml_sources
from zmon.collectors.nvml import NvmlCollector
from zmon.config import Config
from zmon.providers.base import SourceUnavailable
from zmon.providers.nvml import (
    CLOCK_EVENT_REASONS,
    GPM_METRICS,
    GpuSample,
    NvmlProvider,
    NvmlSample,
    decode_clock_event_reasons,
)
from zmon.sampling.scheduler import Sampler, SourceSpec
from zmon.sampling.store import SnapshotStore

Golden = Callable[[str, str], None]  # the conftest fixture: compare with tests/golden/<name>


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def exposition(provider: NvmlProvider, *, slow: bool = True) -> tuple[CollectorRegistry, str]:
    """Sample once into a store with a fake clock; a fresh registry holding only the NVML collector."""
    store = SnapshotStore(clock=FakeClock(), wall=FakeClock(1.7e9))
    store.put("nvml", provider.sample(), 0.004)
    if slow:
        store.put("nvml_slow", provider.sample_slow(), 0.041)
    registry = CollectorRegistry()
    registry.register(NvmlCollector(store))
    return registry, generate_latest(registry).decode()


@pytest.fixture
def fake() -> FakeNvml:
    return make_mixed()


@pytest.fixture
def provider(fake: FakeNvml) -> Iterator[NvmlProvider]:
    p = NvmlProvider(fake, watched_pid=WORKLOAD_PID)
    yield p
    p.close()


# -- the provider ----------------------------------------------------------------------------------------


def test_values_in_base_units(provider: NvmlProvider) -> None:
    s = provider.sample()
    assert (s.driver_version, s.nvml_version, s.cuda_driver_version) == ("580.95.05", "13.580.95.05", "13.0")
    assert [g.index for g in s.gpus] == [0, 1, 2]
    g = s.gpus[0]
    assert g.up and g.error is None
    assert (g.uuid, g.name, g.pci_bus_id) == (
        "GPU-00000000-1111-2222-3333-444455556666",
        "NVIDIA H100 80GB HBM3",
        "00000000:18:00.0",
    )
    assert g.utilization_gpu_ratio == pytest.approx(0.87)
    assert g.utilization_memory_ratio == pytest.approx(0.41)
    # memory v2, as nvidia-smi: used leaves the driver's reserve out; used + free + reserved = total
    assert g.memory_total_bytes == 80 * GIB
    assert g.memory_used_bytes == 32 * GIB
    assert g.memory_free_bytes == 80 * GIB - 32 * GIB - 512 * 1024**2
    assert g.power_watts == pytest.approx(612.345)
    assert g.power_limit_watts == pytest.approx(700.0)
    assert g.energy_joules == pytest.approx(123_456.789)
    assert g.temperature_celsius == 64.0
    assert g.sm_clock_hertz == 1.98e9 and g.memory_clock_hertz == 2.619e9 and g.sm_clock_max_hertz == 1.98e9
    assert g.performance_state == 0
    assert (g.ecc_volatile_corrected, g.ecc_volatile_uncorrected) == (2, 0)
    assert (g.ecc_aggregate_corrected, g.ecc_aggregate_uncorrected) == (17, 1)
    assert (g.remapped_rows_correctable, g.remapped_rows_uncorrectable) == (3, 0)
    assert g.remapped_rows_pending is False and g.remapped_rows_failure is False
    assert dict(g.clock_events or ())["sw_power_cap"] is True
    assert sum(active for _, active in g.clock_events or ()) == 1


def test_unsupported_fields_are_none(provider: NvmlProvider) -> None:
    g0, g1, g2 = provider.sample().gpus
    assert g0.fan_speed_ratio is None and g0.retired_pages_single_bit is None  # H100 SXM: no fan, rows remapped
    assert g1.utilization_gpu_ratio is None and g1.utilization_memory_ratio is None
    assert g1.power_watts == 98.0  # the rest of that GPU is there
    assert g2.power_watts is None and g2.power_limit_watts is None and g2.energy_joules is None
    assert g2.ecc_aggregate_corrected is None and g2.ecc_volatile_uncorrected is None
    assert g2.remapped_rows_correctable is None and g2.remapped_rows_pending is None
    assert g2.xid_errors is None and g2.last_xid is None  # events not supported
    assert g2.fan_speed_ratio == pytest.approx(0.35)
    assert (g2.retired_pages_single_bit, g2.retired_pages_double_bit) == (2, 0)
    assert g2.performance_state == 8


def test_processes_deduped_with_workload_flag(provider: NvmlProvider) -> None:
    g0, g1, g2 = provider.sample().gpus
    assert g0.processes is not None
    # the workload is listed as compute and graphics: one entry
    assert [(p.pid, p.used_memory_bytes, p.is_workload) for p in g0.processes] == [
        (WORKLOAD_PID, 31 * GIB, True),
        (OTHER_PID, 1 * GIB, False),
    ]
    assert g1.processes is not None
    assert [(p.pid, p.used_memory_bytes) for p in g1.processes] == [(VANISHED_PID, None)]
    assert g2.processes == ()


def test_processes_off(fake: FakeNvml) -> None:
    p = NvmlProvider(fake, processes=False)
    assert all(g.processes is None for g in p.sample().gpus)
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 0
    _, text = exposition(p)
    assert "zmon_gpu_process_memory_used_bytes" not in text


def test_sample_is_immutable(provider: NvmlProvider) -> None:
    s = provider.sample()
    assert isinstance(s, NvmlSample) and isinstance(s.gpus, tuple)
    with pytest.raises(AttributeError):
        s.gpus[0].up = False  # type: ignore[misc]


def test_xid_events_counted_without_blocking(fake: FakeNvml, provider: NvmlProvider) -> None:
    assert provider.sample().gpus[0].xid_errors == 0
    fake.inject_xid(0, 13)
    fake.inject_xid(0, 31)
    fake.inject_xid(1, 48)
    g0, g1, _ = provider.sample().gpus
    assert (g0.xid_errors, g0.last_xid) == (2, 31)
    assert (g1.xid_errors, g1.last_xid) == (1, 48)
    g0 = provider.sample().gpus[0]
    assert (g0.xid_errors, g0.last_xid) == (2, 31)  # a counter: kept, not re-counted


def test_clock_event_reasons_decoded() -> None:
    assert [name for name, _ in CLOCK_EVENT_REASONS] == [
        "gpu_idle",
        "applications_clocks_setting",
        "sw_power_cap",
        "hw_slowdown",
        "sync_boost",
        "sw_thermal_slowdown",
        "hw_thermal_slowdown",
        "hw_power_brake_slowdown",
        "display_clock_setting",
    ]
    # the bits match pynvml's names, old and new
    assert dict(CLOCK_EVENT_REASONS)["hw_power_brake_slowdown"] == pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown
    assert dict(CLOCK_EVENT_REASONS)["display_clock_setting"] == pynvml.nvmlClocksEventReasonDisplayClockSetting
    active = [name for name, on in decode_clock_event_reasons(0x1 | 0x40 | 0x10000) if on]
    assert active == ["gpu_idle", "hw_thermal_slowdown"]  # unknown bits ignored


def test_old_driver_fallbacks() -> None:
    fake = make_mixed(
        missing_functions={
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetComputeRunningProcesses",  # pynvml raises NVMLLibraryMismatchError for these
            "nvmlDeviceGetGraphicsRunningProcesses",
            "nvmlSystemGetCudaDriverVersion_v2",
            "nvmlDeviceGetMemoryInfo_v2",
        }
    )
    p = NvmlProvider(fake, watched_pid=WORKLOAD_PID)
    s = p.sample()
    g0 = s.gpus[0]
    assert s.cuda_driver_version == "13.0"
    assert g0.clock_event_reasons == pynvml.nvmlClocksThrottleReasonSwPowerCap
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3
    assert g0.processes is not None and [p.pid for p in g0.processes] == [WORKLOAD_PID, OTHER_PID]
    # memory v1: used includes the driver's reserve
    assert g0.memory_used_bytes == 32 * GIB + 512 * 1024**2
    assert g0.memory_used_bytes + (g0.memory_free_bytes or 0) == g0.memory_total_bytes


def test_missing_python_function_is_absent() -> None:
    """An old pynvml without a newer function name behaves like a driver without it."""
    fake = make_mixed()

    class OldPynvml:
        def __getattr__(self, name: str) -> object:
            if name == "nvmlDeviceGetCurrentClocksEventReasons":
                raise AttributeError(name)
            return getattr(fake, name)

    p = NvmlProvider(OldPynvml())
    assert p.sample().gpus[0].clock_event_reasons == pynvml.nvmlClocksEventReasonSwPowerCap


@pytest.mark.parametrize(
    "code",
    [pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_UNKNOWN, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND],
)
def test_not_available_errors_read_as_absent(code: int) -> None:
    fake = make_mixed()
    fake.gpus[0].errors["nvmlDeviceGetPowerUsage"] = code
    g0 = NvmlProvider(fake).sample().gpus[0]
    assert g0.up and g0.power_watts is None and g0.power_limit_watts == 700.0


def test_unexpected_error_is_absent_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = make_mixed()
    fake.gpus[0].errors["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_IRQ_ISSUE
    p = NvmlProvider(fake)
    with caplog.at_level(logging.WARNING, logger="zmon.providers.nvml"):
        for _ in range(3):
            g0 = p.sample().gpus[0]
    assert g0.up and g0.temperature_celsius is None and g0.power_watts is not None
    assert len([r for r in caplog.records if "nvmlDeviceGetTemperature" in r.getMessage()]) == 1


def test_unknown_performance_state_is_absent() -> None:
    fake = make_mixed()
    fake.gpus[0].pstate = 32  # NVML_PSTATE_UNKNOWN
    assert NvmlProvider(fake).sample().gpus[0].performance_state is None


# -- lost GPUs and failures --------------------------------------------------------------------------------


def test_lost_gpu_is_down_and_others_go_on(fake: FakeNvml, provider: NvmlProvider) -> None:
    provider.sample()
    fake.inject_xid(1, 79)
    provider.sample()
    fake.lose(1)
    s = provider.sample()
    g0, g1, g2 = s.gpus
    assert g0.up and g2.up and g0.power_watts is not None and g2.temperature_celsius == 41.0
    assert not g1.up and g1.error and "GPU is lost" in g1.error
    assert g1.uuid == "GPU-00000001-1111-2222-3333-444455556666"  # identity kept for the info metric
    assert g1.memory_used_bytes is None and g1.processes is None and g1.xid_errors is None
    assert fake.gpus[1].generation == 1
    # still lost: no exception, still down
    assert not provider.sample().gpus[1].up
    # the slow job skips it
    assert [p.index for p in provider.sample_slow().gpus] == [0, 2]


def test_lost_gpu_recovers_with_a_new_handle(fake: FakeNvml, provider: NvmlProvider) -> None:
    fake.inject_xid(1, 79)
    provider.sample()
    fake.lose(1)
    assert not provider.sample().gpus[1].up
    before = fake.calls["nvmlDeviceGetHandleByUUID"]
    fake.restore(1)
    g1 = provider.sample().gpus[1]
    assert g1.up and g1.error is None and g1.power_watts == 98.0
    assert fake.calls["nvmlDeviceGetHandleByUUID"] == before + 1  # re-acquired by UUID
    assert (g1.xid_errors, g1.last_xid) == (1, 79)  # the counter survives the loss
    fake.inject_xid(1, 13)
    assert provider.sample().gpus[1].xid_errors == 2  # events registered again on the new handle
    assert fake.live_event_sets == 2  # GPUs 0 and 1; the lost GPU's old set was freed


def test_lost_gpu_exposition(fake: FakeNvml, provider: NvmlProvider) -> None:
    fake.lose(1)
    registry, text = exposition(provider)
    assert registry.get_sample_value("zmon_gpu_up", {"gpu": "1"}) == 0.0
    assert registry.get_sample_value("zmon_gpu_up", {"gpu": "0"}) == 1.0
    assert registry.get_sample_value("zmon_gpu_power_watts", {"gpu": "0"}) == pytest.approx(612.345)
    assert registry.get_sample_value("zmon_gpu_memory_used_bytes", {"gpu": "1"}) is None
    per_gpu1 = [ln for ln in text.splitlines() if 'gpu="1"' in ln]
    assert [ln.split("{")[0] for ln in per_gpu1] == ["zmon_gpu_info", "zmon_gpu_up"]
    fake.restore(1)
    registry, _ = exposition(provider)
    assert registry.get_sample_value("zmon_gpu_up", {"gpu": "1"}) == 1.0
    assert registry.get_sample_value("zmon_gpu_memory_used_bytes", {"gpu": "1"}) == 0.0


def test_gpu_lost_before_start_comes_up_later() -> None:
    fake = make_mixed()
    fake.lose(2)
    p = NvmlProvider(fake)
    g2 = p.sample().gpus[2]
    assert not g2.up and g2.uuid is None
    _, text = exposition(p)
    assert 'zmon_gpu_info{gpu="2"' not in text and 'zmon_gpu_up{gpu="2"} 0.0' in text
    fake.restore(2)
    g2 = p.sample().gpus[2]
    assert g2.up and g2.name == "Quadro P2000"


def test_gpu_where_nothing_reads_is_down() -> None:
    fake = make_mixed()
    fake.gpus[0].errors["*"] = pynvml.NVML_ERROR_UNKNOWN
    g0, g1, _ = NvmlProvider(fake).sample().gpus
    assert not g0.up and g0.error == "no NVML call succeeded"
    assert g1.up


def test_driver_gone_fails_the_sample_and_the_sampler_backs_off(fake: FakeNvml, provider: NvmlProvider) -> None:
    clock = FakeClock()
    store = SnapshotStore(clock=clock)
    sampler = Sampler(store, clock=clock)
    sampler.add(SourceSpec("nvml", provider.sample, 1.0))
    assert sampler.run_once("nvml")
    fake.driver_gone = True
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        provider.sample()
    assert not sampler.run_once("nvml")
    st = store.get("nvml")
    assert st is not None and st.last_success is False and "DriverNotLoaded" in (st.last_error or "")
    assert isinstance(st.data, NvmlSample)  # the last good sample is kept
    fake.driver_gone = False
    clock.t += 5.0  # past the backoff
    assert sampler.run_once("nvml")
    assert store.get("nvml").consecutive_failures == 0  # type: ignore[union-attr]


def test_with_the_real_sampler(provider: NvmlProvider) -> None:
    store = SnapshotStore(clock=FakeClock())
    sampler = Sampler(store)
    sampler.add(SourceSpec("nvml", provider.sample, 1.0))
    sampler.add(SourceSpec("nvml_slow", provider.sample_slow, 10.0))
    assert sampler.run_once("nvml") and sampler.run_once("nvml_slow")
    registry = CollectorRegistry()
    registry.register(NvmlCollector(store))
    assert registry.get_sample_value("zmon_gpu_utilization_ratio", {"gpu": "0"}) == pytest.approx(0.87)
    assert registry.get_sample_value("zmon_gpu_pcie_rx_bytes_per_second", {"gpu": "0"}) == 3_400_000 * 1024


# -- unavailable ----------------------------------------------------------------------------------------


def test_no_library_is_unavailable() -> None:
    with pytest.raises(SourceUnavailable, match="NVML Shared Library Not Found"):
        NvmlProvider(make_absent())


def test_no_gpu_is_unavailable() -> None:
    fake = FakeNvml([])
    with pytest.raises(SourceUnavailable, match="no GPU"):
        NvmlProvider(fake)
    assert not fake.initialized  # shut down again


def test_no_pynvml_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(SourceUnavailable, match="not installed"):
        NvmlProvider()


def test_real_nvml_here_works_or_is_unavailable() -> None:
    try:
        p = NvmlProvider()
    except SourceUnavailable:
        return
    try:
        assert p.sample().gpus
    finally:
        p.close()


def test_close_is_idempotent(fake: FakeNvml) -> None:
    p = NvmlProvider(fake)
    assert fake.live_event_sets == 2
    p.close()
    p.close()
    assert not fake.initialized and fake.live_event_sets == 0
    with pytest.raises(RuntimeError):
        p.sample()


# -- the collector ----------------------------------------------------------------------------------------


def test_unsupported_fields_absent_from_exposition(provider: NvmlProvider) -> None:
    registry, text = exposition(provider)
    get = registry.get_sample_value
    assert get("zmon_gpu_utilization_ratio", {"gpu": "1"}) is None  # not 0
    assert get("zmon_gpu_utilization_ratio", {"gpu": "2"}) == 0.0  # a real 0 stays
    assert get("zmon_gpu_power_watts", {"gpu": "2"}) is None
    assert get("zmon_gpu_energy_joules_total", {"gpu": "2"}) is None
    assert get("zmon_gpu_ecc_errors_total", {"gpu": "2", "type": "corrected"}) is None
    assert get("zmon_gpu_fan_speed_ratio", {"gpu": "0"}) is None
    assert get("zmon_gpu_fan_speed_ratio", {"gpu": "2"}) == pytest.approx(0.35)
    assert get("zmon_gpu_xid_errors_total", {"gpu": "2"}) is None
    assert get("zmon_gpu_last_xid", {"gpu": "0"}) is None  # no Xid yet: unknown, not 0
    assert get("zmon_gpu_ecc_errors_total", {"gpu": "0", "type": "uncorrected"}) == 1.0
    assert get("zmon_gpu_process_memory_used_bytes", {"gpu": "0", "pid": "4242", "workload": "true"}) == 31 * GIB
    assert f'pid="{VANISHED_PID}"' not in text  # memory unknown: no sample
    assert get("zmon_gpu_clock_event_active", {"gpu": "2", "reason": "display_clock_setting"}) == 1.0
    info = {
        "uuid": "GPU-99999999-8888-7777-6666-555544443333",
        "name": "Quadro P2000",
        "pci_bus_id": "00000000:AF:00.0",
    }
    assert get("zmon_gpu_info", {"gpu": "2", **info}) == 1.0


def test_empty_store_exports_nothing() -> None:
    registry = CollectorRegistry()
    registry.register(NvmlCollector(SnapshotStore()))
    assert generate_latest(registry) == b""


def test_metric_names_follow_conventions(provider: NvmlProvider) -> None:
    store = SnapshotStore(clock=FakeClock())
    store.put("nvml", provider.sample(), 0.0)
    store.put("nvml_slow", provider.sample_slow(), 0.0)
    families = list(NvmlCollector(store).collect())
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    for f in families:
        assert f.name.startswith("zmon_")
        assert f.documentation.endswith(".")
        for s in f.samples:
            if s.name != "zmon_nvml_info":
                assert "gpu" in s.labels, s


def test_promtool_check_metrics(provider: NvmlProvider) -> None:
    promtool = require_binary("promtool")
    _, text = exposition(provider)
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# -- golden exposition ----------------------------------------------------------------------------------


def test_golden_mixed(golden: Golden, fake: FakeNvml, provider: NvmlProvider) -> None:
    fake.inject_xid(0, 13)
    _, text = exposition(provider)
    golden("nvml_mixed.prom", text)


def test_golden_lost(golden: Golden, fake: FakeNvml, provider: NvmlProvider) -> None:
    provider.sample()
    fake.lose(1)
    _, text = exposition(provider)
    golden("nvml_lost.prom", text)


# -- the 8-GPU host --------------------------------------------------------------------------------------


def test_eight_gpus() -> None:
    fake = make_fake(n_gpus=8)
    p = NvmlProvider(fake, watched_pid=WORKLOAD_PID)
    t0 = time.perf_counter()
    s = p.sample()
    elapsed = time.perf_counter() - t0
    assert len(s.gpus) == 8 and all(g.up for g in s.gpus)
    assert elapsed < 0.5  # Python overhead only; the real calls cost ~4 ms per GPU
    registry, text = exposition(p)
    assert registry.get_sample_value("zmon_gpu_up", {"gpu": "7"}) == 1.0
    assert registry.get_sample_value("zmon_gpu_utilization_ratio", {"gpu": "7"}) == pytest.approx(0.80)
    workload = [ln for ln in text.splitlines() if 'workload="true"' in ln]
    assert len(workload) == 1  # only GPU 0 runs the watched pid
    assert h100(7).pci_bus_id == "00000000:8F:00.0"


# -- GPM (Hopper and later) ------------------------------------------------------------------------------

MIB = 1024**2
GPM_FIELDS = tuple(name for name, _, _ in GPM_METRICS)


def gpm_values(g: GpuSample) -> dict[str, float | None]:
    return {name: getattr(g, name) for name in GPM_FIELDS}


NO_GPM = dict.fromkeys(GPM_FIELDS)


@pytest.fixture
def gpm_fake() -> FakeNvml:
    return make_gpm()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gpm_provider(gpm_fake: FakeNvml, clock: FakeClock) -> Iterator[NvmlProvider]:
    p = NvmlProvider(gpm_fake, watched_pid=WORKLOAD_PID, gpm=True, clock=clock)
    yield p
    p.close()


def tick(provider: NvmlProvider, clock: FakeClock, seconds: float = 1.0) -> NvmlSample:
    """The next fast sample, `seconds` after the previous one."""
    clock.t += seconds
    return provider.sample()


def test_gpm_first_sample_absent_then_values_in_base_units(
    gpm_fake: FakeNvml, gpm_provider: NvmlProvider, clock: FakeClock
) -> None:
    first = gpm_provider.sample()
    assert [gpm_values(g) for g in first.gpus] == [NO_GPM] * 3  # no interval yet: absent, not 0
    assert first.gpus[0].utilization_gpu_ratio == pytest.approx(0.87)  # the classic fields are there
    g0, g1, g2 = tick(gpm_provider, clock).gpus
    assert gpm_values(g0) == {
        "sm_active_ratio": 0.95,
        "sm_occupancy_ratio": 0.14,
        "tensor_active_ratio": 0.92,
        "dram_bandwidth_utilization_ratio": 0.17,
        "nvlink_rx_bytes_per_second": 1536 * MIB,  # NVML gives MiB/s
        "nvlink_tx_bytes_per_second": 512 * MIB,
    }
    # GPU 1 has no NVLink: NVML answers NotSupported for those two metrics only
    assert gpm_values(g1) == {
        "sm_active_ratio": 0.97,
        "sm_occupancy_ratio": 0.83,
        "tensor_active_ratio": 0.0,  # a measured 0 stays 0
        "dram_bandwidth_utilization_ratio": 0.85,
        "nvlink_rx_bytes_per_second": None,
        "nvlink_tx_bytes_per_second": None,
    }
    assert gpm_values(g2) == NO_GPM  # Ampere
    # each interval is its own: the values follow the GPU
    gpm_fake.gpus[0].gpm_metrics[pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL] = 3.0
    assert tick(gpm_provider, clock).gpus[0].tensor_active_ratio == pytest.approx(0.03)
    # two buffers per GPM GPU, reused: nothing allocated per tick
    assert gpm_fake.calls["nvmlGpmSampleAlloc"] == 4 and gpm_fake.live_gpm_samples == 4
    assert gpm_fake.calls["nvmlGpmSampleGet"] == 6 and gpm_fake.calls["nvmlGpmMetricsGet"] == 4


def test_gpm_unsupported_gpus_pay_one_query_at_start(clock: FakeClock) -> None:
    fake = make_mixed()  # H100s without GPM, as every older card
    p = NvmlProvider(fake, gpm=True, clock=clock)
    for _ in range(3):
        s = tick(p, clock)
    assert [gpm_values(g) for g in s.gpus] == [NO_GPM] * 3
    assert fake.calls["nvmlGpmQueryDeviceSupport"] == 3  # detected once per GPU, at acquire
    assert fake.gpm_calls() == 3 and fake.live_gpm_samples == 0
    # and the exposition is byte-identical to gpm off
    _, with_gpm = exposition(p)
    _, without = exposition(NvmlProvider(make_mixed()))
    assert with_gpm == without


def test_gpm_support_flag_zero_is_unsupported(clock: FakeClock) -> None:
    class ReportsUnsupported(FakeNvml):
        """A driver that answers the query with isSupportedDevice 0 instead of NotSupported."""

        def nvmlGpmQueryDeviceSupport(self, handle: object) -> pynvml.c_nvmlGpmSupport_t:
            self.calls["nvmlGpmQueryDeviceSupport"] += 1
            return pynvml.c_nvmlGpmSupport_t(version=pynvml.NVML_GPM_SUPPORT_VERSION, isSupportedDevice=0)

    fake = ReportsUnsupported(make_gpm().gpus)
    p = NvmlProvider(fake, gpm=True, clock=clock)
    tick(p, clock)
    assert gpm_values(tick(p, clock).gpus[0]) == NO_GPM
    assert fake.calls["nvmlGpmQueryDeviceSupport"] == 3 and fake.calls["nvmlGpmSampleAlloc"] == 0


def test_gpm_driver_without_gpm_is_absent_quietly(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    fake = make_gpm(missing_functions={"nvmlGpmQueryDeviceSupport"})  # driver < 520
    p = NvmlProvider(fake, gpm=True, clock=clock)
    with caplog.at_level(logging.WARNING, logger="zmon.providers.nvml"):
        tick(p, clock)
        g0 = tick(p, clock).gpus[0]
    assert g0.up and gpm_values(g0) == NO_GPM
    assert fake.calls["nvmlGpmSampleAlloc"] == 0 and not caplog.records


def test_gpm_off_makes_no_gpm_calls(gpm_fake: FakeNvml, clock: FakeClock) -> None:
    p = NvmlProvider(gpm_fake, gpm=False, clock=clock)
    for _ in range(3):
        s = tick(p, clock)
    assert [gpm_values(g) for g in s.gpus] == [NO_GPM] * 3
    assert gpm_fake.gpm_calls() == 0
    p.close()


@pytest.mark.parametrize("gpm", [True, False])
def test_gpm_config_switch_reaches_the_provider(gpm: bool) -> None:
    fake = make_gpm()
    cfg = Config.model_validate({"sampling": {"nvml": {"gpm": gpm}}})
    mon = Monitor(cfg.sampling, cfg.server, mode="watch", serve_http=False)
    add_nvml_sources(mon, cfg.sampling.nvml, watched_pid=None, nvml=fake)
    assert mon.sampler.run_once("nvml")
    assert fake.calls["nvmlGpmQueryDeviceSupport"] == (3 if gpm else 0)
    assert fake.live_gpm_samples == (4 if gpm else 0)
    assert (fake.gpm_calls() == 0) is not gpm
    mon.stop()
    assert fake.live_gpm_samples == 0  # freed when the monitor closes the provider


def test_gpm_metric_failing_is_absent(gpm_fake: FakeNvml, gpm_provider: NvmlProvider, clock: FakeClock) -> None:
    gpm_fake.gpus[0].gpm_metric_errors[pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL] = pynvml.NVML_ERROR_UNKNOWN
    gpm_provider.sample()
    g0 = tick(gpm_provider, clock).gpus[0]
    assert g0.dram_bandwidth_utilization_ratio is None
    assert g0.sm_active_ratio == 0.95 and g0.tensor_active_ratio == 0.92  # the others are there


def test_gpm_call_failing_is_absent_for_that_tick(
    gpm_fake: FakeNvml, gpm_provider: NvmlProvider, clock: FakeClock
) -> None:
    gpm_provider.sample()
    tick(gpm_provider, clock)
    gpm_fake.gpus[0].errors["nvmlGpmSampleGet"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    g0, g1, _ = tick(gpm_provider, clock).gpus
    assert g0.up and gpm_values(g0) == NO_GPM and g0.power_watts is not None
    assert g1.sm_active_ratio == 0.97  # the other GPU is not affected
    del gpm_fake.gpus[0].errors["nvmlGpmSampleGet"]
    # back at once: the interval runs from the last good sample (the fake checks the pair is in order)
    assert tick(gpm_provider, clock).gpus[0].sm_active_ratio == 0.95


def test_gpm_whole_metrics_call_failing_is_absent(clock: FakeClock) -> None:
    fake = make_gpm(missing_functions={"nvmlGpmMetricsGet"})
    p = NvmlProvider(fake, gpm=True, clock=clock)
    tick(p, clock)
    g0 = tick(p, clock).gpus[0]
    assert g0.up and gpm_values(g0) == NO_GPM and g0.utilization_gpu_ratio == pytest.approx(0.87)


def test_gpm_samples_at_most_every_100_ms(gpm_fake: FakeNvml, gpm_provider: NvmlProvider, clock: FakeClock) -> None:
    gpm_provider.sample()
    # NVML refreshes its counters every ~100 ms: a shorter interval would read an idle GPU
    assert gpm_values(tick(gpm_provider, clock, 0.05).gpus[0]) == NO_GPM
    assert gpm_fake.calls["nvmlGpmSampleGet"] == 2  # one per GPM GPU, from the first tick only
    assert tick(gpm_provider, clock, 0.06).gpus[0].sm_active_ratio == 0.95  # 110 ms after the first
    assert gpm_fake.calls["nvmlGpmSampleGet"] == 4


def test_gpm_lost_gpu_frees_samples_and_rearms(
    gpm_fake: FakeNvml, gpm_provider: NvmlProvider, clock: FakeClock
) -> None:
    gpm_provider.sample()
    tick(gpm_provider, clock)
    assert gpm_fake.live_gpm_samples == 4
    gpm_fake.lose(0)
    g0, g1, _ = tick(gpm_provider, clock).gpus
    assert not g0.up and gpm_values(g0) == NO_GPM
    assert g1.sm_active_ratio == 0.97
    assert gpm_fake.live_gpm_samples == 2  # the lost GPU's two buffers are freed
    tick(gpm_provider, clock)
    assert gpm_fake.live_gpm_samples == 2  # still lost: nothing allocated
    queries = gpm_fake.calls["nvmlGpmQueryDeviceSupport"]
    gpm_fake.restore(0)
    g0 = tick(gpm_provider, clock).gpus[0]
    assert g0.up and gpm_values(g0) == NO_GPM  # first sample after recovery: no interval yet
    assert gpm_fake.calls["nvmlGpmQueryDeviceSupport"] == queries + 1  # support detected again
    assert gpm_fake.live_gpm_samples == 4
    assert tick(gpm_provider, clock).gpus[0].sm_active_ratio == 0.95
    assert gpm_fake.calls["nvmlGpmSampleAlloc"] == 6  # 4 at start, 2 on recovery: never more


def test_gpm_gpu_lost_while_arming_leaks_nothing(clock: FakeClock) -> None:
    fake = make_gpm()
    fake.gpus[0].errors["nvmlDeviceGetMigMode"] = pynvml.NVML_ERROR_GPU_IS_LOST  # lost half-way through acquire
    p = NvmlProvider(fake, gpm=True, clock=clock)
    assert not p.sample().gpus[0].up
    assert fake.live_gpm_samples == 2 and fake.live_event_sets == 2  # GPUs 1 and 2 only
    del fake.gpus[0].errors["nvmlDeviceGetMigMode"]
    assert tick(p, clock).gpus[0].up
    assert fake.live_gpm_samples == 4 and fake.live_event_sets == 3
    p.close()
    assert fake.live_gpm_samples == 0 and fake.live_event_sets == 0


def test_gpm_off_in_mig_mode(clock: FakeClock) -> None:
    fake = make_gpm()
    fake.gpus[0].mig_mode = 1
    p = NvmlProvider(fake, gpm=True, clock=clock)
    p.sample()
    g0, g1, _ = tick(p, clock).gpus
    assert gpm_values(g0) == NO_GPM and g1.sm_active_ratio == 0.97
    assert fake.live_gpm_samples == 2


def test_gpm_samples_freed_on_close(gpm_fake: FakeNvml, clock: FakeClock) -> None:
    p = NvmlProvider(gpm_fake, gpm=True, clock=clock)
    p.sample()
    assert gpm_fake.live_gpm_samples == 4
    p.close()
    p.close()
    assert gpm_fake.live_gpm_samples == 0 and not gpm_fake.initialized


def test_gpm_exposition(gpm_provider: NvmlProvider, clock: FakeClock) -> None:
    registry, text = exposition(gpm_provider)
    assert "zmon_gpu_sm_active_ratio" not in text  # first sample: the families are absent
    clock.t += 1.0
    registry, text = exposition(gpm_provider)
    get = registry.get_sample_value
    assert get("zmon_gpu_sm_active_ratio", {"gpu": "0"}) == 0.95
    assert get("zmon_gpu_sm_occupancy_ratio", {"gpu": "1"}) == 0.83
    assert get("zmon_gpu_tensor_active_ratio", {"gpu": "1"}) == 0.0
    assert get("zmon_gpu_dram_bandwidth_utilization_ratio", {"gpu": "0"}) == 0.17
    assert get("zmon_gpu_nvlink_rx_bytes_per_second", {"gpu": "0"}) == 1536 * MIB
    assert get("zmon_gpu_nvlink_tx_bytes_per_second", {"gpu": "0"}) == 512 * MIB
    assert get("zmon_gpu_nvlink_rx_bytes_per_second", {"gpu": "1"}) is None
    assert get("zmon_gpu_sm_active_ratio", {"gpu": "2"}) is None
    assert get("zmon_gpu_utilization_ratio", {"gpu": "2"}) == 0.99  # what GPM would have corrected
    out = subprocess.run(
        [require_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_golden_gpm(golden: Golden, gpm_provider: NvmlProvider, clock: FakeClock) -> None:
    gpm_provider.sample()
    clock.t += 1.0
    _, text = exposition(gpm_provider)
    golden("nvml_gpm.prom", text)
