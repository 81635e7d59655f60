"""Host-side sources: providers against real psutil and a fake one; collectors against golden exposition."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.psutil_fake import WATCHED_PID, FakePsutil
from tests.services import require_binary
from zmon.collectors.host import DiskCollector, HostCollector, NetworkCollector, ProcessCollector
from zmon.providers.host import (
    DiskProvider,
    DiskSample,
    HostProvider,
    HostSample,
    NetworkProvider,
    NetworkSample,
    ProcessProvider,
    ProcessSample,
)
from zmon.sampling import Sampler, SnapshotStore, SourceSpec

FAKE_PATHS = (Path("/models"), Path("/mnt/missing"))


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# -------------------------------------------------------------------------------- rig


@dataclasses.dataclass
class Rig:
    """All four sources over a fake psutil, sampled by the real Sampler into a store, behind a registry."""

    fake: FakePsutil
    clock: FakeClock
    sampler: Sampler
    registry: CollectorRegistry

    def sample_all(self) -> None:
        for name in self.sampler.sources:
            assert self.sampler.run_once(name), self.sampler.store.get(name)
        self.clock.now += 1.0

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


def make_rig(fake: FakePsutil, *, per_cpu: bool = True) -> Rig:
    clock = FakeClock()
    store = SnapshotStore(clock=clock, wall=lambda: 1_767_225_600.0 + clock())
    sampler = Sampler(store, clock=clock)
    sampler.add(SourceSpec("host", HostProvider(fake, per_cpu=per_cpu).sample, 1.0))
    sampler.add(SourceSpec("disk", DiskProvider(fake, paths=FAKE_PATHS).sample, 1.0))
    sampler.add(SourceSpec("network", NetworkProvider(fake).sample, 1.0))
    sampler.add(SourceSpec("process", ProcessProvider(WATCHED_PID, fake).sample, 1.0))
    registry = CollectorRegistry()
    for collector in (HostCollector, DiskCollector, NetworkCollector, ProcessCollector):
        registry.register(collector(store))
    return Rig(fake, clock, sampler, registry)


@pytest.fixture
def rig() -> Rig:
    return make_rig(FakePsutil())


def check_exposition(text: str) -> None:
    """Parses back, and passes `promtool check metrics` where promtool is installed."""
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert all(n.startswith("zmon_") for n in names)
    r = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -------------------------------------------------------------------------------- golden


def test_golden_first_sample(rig: Rig, golden: Callable[[str, str], None]) -> None:
    rig.sample_all()
    text = rig.exposition()
    check_exposition(text)
    golden("host_first_sample.prom", text)


def test_golden_second_sample(rig: Rig, golden: Callable[[str, str], None]) -> None:
    rig.sample_all()
    rig.fake.tick()
    rig.sample_all()
    text = rig.exposition()
    check_exposition(text)
    golden("host_second_sample.prom", text)


def test_golden_process_vanished(rig: Rig, golden: Callable[[str, str], None]) -> None:
    rig.sample_all()
    rig.fake.vanish()
    rig.fake.tick()
    rig.sample_all()
    text = rig.exposition()
    check_exposition(text)
    golden("host_process_vanished.prom", text)


# -------------------------------------------------------------------------------- fake: host


def test_cpu_utilization_only_from_second_sample(rig: Rig) -> None:
    rig.sample_all()
    assert rig.value("zmon_host_cpu_utilization_ratio") is None
    assert rig.value("zmon_host_cpu_core_utilization_ratio", {"cpu": "0"}) is None
    assert rig.value("zmon_host_cpu_seconds_total", {"mode": "user"}) == 150.0

    rig.fake.tick()
    rig.sample_all()
    # Core 0 75% busy, core 1 25% (iowait counts as idle, guest is inside user): the host 50%.
    assert rig.value("zmon_host_cpu_utilization_ratio") == 0.5
    assert rig.value("zmon_host_cpu_core_utilization_ratio", {"cpu": "0"}) == 0.75
    assert rig.value("zmon_host_cpu_core_utilization_ratio", {"cpu": "1"}) == 0.25
    assert rig.value("zmon_host_cpu_seconds_total", {"mode": "user"}) == 150.75


def test_no_elapsed_cpu_time_gives_no_ratio() -> None:
    fake = FakePsutil()
    host = HostProvider(fake)
    host.sample()
    again = host.sample()  # no tick: no CPU time passed, so no ratio rather than a made-up 0
    assert again.cpu_utilization_ratio is None
    assert again.cpu_core_utilization_ratio is None


def test_per_cpu_off() -> None:
    rig = make_rig(FakePsutil(), per_cpu=False)
    rig.sample_all()
    rig.fake.tick()
    rig.sample_all()
    assert rig.value("zmon_host_cpu_utilization_ratio") == 0.5
    assert "zmon_host_cpu_core_utilization_ratio" not in rig.exposition()
    assert rig.value("zmon_host_cpus") == 2


# -------------------------------------------------------------------------------- fake: disk, net


def test_missing_path_is_flagged_not_fatal(rig: Rig) -> None:
    rig.sample_all()
    assert rig.value("zmon_filesystem_up", {"path": "/models"}) == 1
    assert rig.value("zmon_filesystem_free_bytes", {"path": "/models"}) == 512 * 2**30
    assert rig.value("zmon_filesystem_up", {"path": "/mnt/missing"}) == 0
    assert rig.value("zmon_filesystem_free_bytes", {"path": "/mnt/missing"}) is None
    fs = rig.sampler.store.latest("disk").filesystems[1]
    assert not fs.ok and fs.error is not None and "FileNotFoundError" in fs.error


def test_default_exclusions() -> None:
    fake = FakePsutil()
    assert [d.device for d in DiskProvider(fake).sample().devices] == ["nvme0n1", "sdb"]
    assert [n.interface for n in NetworkProvider(fake).sample().interfaces] == ["eth0", "ib0"]


def test_custom_and_empty_exclusions() -> None:
    fake = FakePsutil()
    assert [d.device for d in DiskProvider(fake, exclude_devices=r"^(sd|loop)").sample().devices] == [
        "nvme0n1",
        "ram0",
    ]
    assert len(DiskProvider(fake, exclude_devices="").sample().devices) == 4
    assert [n.interface for n in NetworkProvider(fake, exclude_interfaces=r"^ib").sample().interfaces] == [
        "br-5f2a9c",
        "docker0",
        "eth0",
        "lo",
        "veth1a2b3c",
    ]
    assert len(NetworkProvider(fake, exclude_interfaces="").sample().interfaces) == 6


def test_busy_time_absent_where_psutil_lacks_it(rig: Rig) -> None:
    rig.sample_all()
    assert rig.value("zmon_disk_io_time_seconds_total", {"device": "nvme0n1"}) == 3.5
    assert rig.value("zmon_disk_io_time_seconds_total", {"device": "sdb"}) is None
    assert rig.value("zmon_disk_reads_total", {"device": "sdb"}) == 20


# -------------------------------------------------------------------------------- fake: process


def test_vanished_pid_reports_down_then_recovers_on_reuse(rig: Rig) -> None:
    rig.sample_all()
    assert rig.value("zmon_process_up") == 1
    assert rig.value("zmon_process_start_time_seconds") == 1_767_225_600.5

    rig.fake.vanish()
    rig.sample_all()
    assert rig.value("zmon_process_up") == 0
    assert rig.value("zmon_process_resident_memory_bytes") is None
    status = rig.sampler.store.get("process")
    assert status is not None and status.last_success  # a gone process is a good sample, not a failure

    rig.fake.spawn(name="python3.12", create_time=1_767_229_200.0)
    rig.sample_all()
    assert rig.value("zmon_process_up") == 1
    assert rig.value("zmon_process_start_time_seconds") == 1_767_229_200.0
    assert rig.value("zmon_process_info", {"pid": str(WATCHED_PID), "name": "python3.12"}) == 1
    assert rig.value("zmon_process_cpu_seconds_total", {"mode": "user"}) == 0.5


def test_pid_reused_between_samples_reports_the_new_process() -> None:
    fake = FakePsutil()
    provider = ProcessProvider(WATCHED_PID, fake)
    first = provider.sample()
    fake.vanish()
    fake.spawn(name="other", create_time=1_767_300_000.0)
    second = provider.sample()
    assert second.exists and second.name == "other"
    assert second.start_time_seconds != first.start_time_seconds


def test_zombie_is_not_running() -> None:
    fake = FakePsutil()
    fake.procs[WATCHED_PID].status = fake.STATUS_ZOMBIE
    assert ProcessProvider(WATCHED_PID, fake).sample() == ProcessSample(WATCHED_PID, exists=False)


def test_denied_fields_are_absent_not_zero(rig: Rig) -> None:
    rig.fake.procs[WATCHED_PID].denied = frozenset({"num_fds", "open_files"})
    rig.sample_all()
    assert rig.value("zmon_process_up") == 1
    assert rig.value("zmon_process_open_fds") is None
    assert rig.value("zmon_process_open_files") is None
    assert rig.value("zmon_process_threads") == 24


def test_no_sample_yields_nothing() -> None:
    store = SnapshotStore()
    for collector in (HostCollector, DiskCollector, NetworkCollector, ProcessCollector):
        assert list(collector(store).collect()) == []


def test_collectors_read_the_named_source() -> None:
    store = SnapshotStore()
    store.put("watched-2", ProcessProvider(WATCHED_PID, FakePsutil()).sample(), 0.0)
    assert list(ProcessCollector(store).collect()) == []
    names = [f.name for f in ProcessCollector(store, source="watched-2").collect()]
    assert names[0] == "zmon_process_up"


def test_samples_are_immutable() -> None:
    fake = FakePsutil()
    host = HostProvider(fake)
    host.sample()
    fake.tick()
    samples: list[Any] = [
        host.sample(),
        DiskProvider(fake, paths=FAKE_PATHS).sample(),
        NetworkProvider(fake).sample(),
        ProcessProvider(WATCHED_PID, fake).sample(),
    ]
    for s in samples:
        hash(s)  # only immutable parts inside
        field = dataclasses.fields(s)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s, field, None)


# -------------------------------------------------------------------------------- real psutil


def test_real_host() -> None:
    host = HostProvider()
    first = host.sample()
    assert isinstance(first, HostSample)
    assert first.cpu_utilization_ratio is None and first.cpu_core_utilization_ratio is None
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:  # burn a little CPU so time passes on every core's clock
        pass
    second = host.sample()
    assert second.cpu_utilization_ratio is not None and 0.0 <= second.cpu_utilization_ratio <= 1.0
    assert second.cpu_core_utilization_ratio is not None
    assert len(second.cpu_core_utilization_ratio) == psutil.cpu_count()
    assert all(0.0 <= r <= 1.0 for r in second.cpu_core_utilization_ratio)
    modes = dict(second.cpu_seconds)
    assert {"user", "system", "idle"} <= modes.keys()
    assert all(isinstance(v, float) and v >= 0 for v in modes.values())
    assert modes["user"] >= dict(first.cpu_seconds)["user"]
    assert second.cpu_count == os.cpu_count()
    assert 0 < second.memory_available_bytes <= second.memory_total_bytes
    assert 0 < second.memory_used_bytes < second.memory_total_bytes
    assert 0 <= second.swap_used_bytes <= second.swap_total_bytes
    assert all(isinstance(x, float) and x >= 0 for x in (second.load1, second.load5, second.load15))
    assert isinstance(second.memory_total_bytes, int)


def test_real_disk(tmp_path: Path) -> None:
    s = DiskProvider(paths=[Path("/"), tmp_path / "missing"]).sample()
    assert isinstance(s, DiskSample)
    assert not any(d.device.startswith(("loop", "ram")) for d in s.devices)
    for d in s.devices:
        assert all(isinstance(v, int) and v >= 0 for v in (d.read_bytes, d.written_bytes, d.reads, d.writes))
        if sys.platform.startswith("linux"):
            assert d.io_time_seconds is not None and d.io_time_seconds >= 0
    root, missing = s.filesystems
    assert root.ok and root.size_bytes and root.free_bytes is not None and root.used_bytes is not None
    assert 0 < root.free_bytes <= root.size_bytes
    assert not missing.ok and missing.size_bytes is None and missing.path == str(tmp_path / "missing")


def test_real_network() -> None:
    s = NetworkProvider().sample()
    assert isinstance(s, NetworkSample)
    assert "lo" not in [n.interface for n in s.interfaces]
    for nic in s.interfaces:
        values = dataclasses.astuple(nic)[1:]
        assert all(isinstance(v, int) and v >= 0 for v in values)


def test_real_process_self() -> None:
    s = ProcessProvider(os.getpid()).sample()
    assert s.exists and s.pid == os.getpid()
    assert s.name == psutil.Process().name()
    assert s.cpu_user_seconds is not None and s.cpu_user_seconds > 0
    assert s.cpu_system_seconds is not None and s.cpu_system_seconds >= 0
    assert s.resident_memory_bytes and s.virtual_memory_bytes
    assert 0 < s.resident_memory_bytes <= s.virtual_memory_bytes
    assert s.threads is not None and s.threads >= 1
    assert s.open_files is not None and s.open_files >= 0
    if sys.platform.startswith("linux"):
        assert s.open_fds is not None and s.open_fds >= 3
    assert s.start_time_seconds is not None and s.start_time_seconds <= time.time()


def test_real_process_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: Linux hands out pids in sequence, so this one stays free for now
    assert ProcessProvider(child.pid).sample() == ProcessSample(child.pid, exists=False)


def test_real_exposition() -> None:
    store = SnapshotStore()
    sampler = Sampler(store)
    sampler.add(SourceSpec("host", HostProvider().sample, 1.0))
    sampler.add(SourceSpec("disk", DiskProvider(paths=[Path("/")]).sample, 1.0))
    sampler.add(SourceSpec("network", NetworkProvider().sample, 1.0))
    sampler.add(SourceSpec("process", ProcessProvider(os.getpid()).sample, 1.0))
    registry = CollectorRegistry()
    for collector in (HostCollector, DiskCollector, NetworkCollector, ProcessCollector):
        registry.register(collector(store))
    for _ in range(2):
        for name in sampler.sources:
            assert sampler.run_once(name)
        time.sleep(0.05)  # CPU clocks tick at 100 Hz: let some CPU time pass between the two samples
    text = generate_latest(registry).decode()
    check_exposition(text)
    assert registry.get_sample_value("zmon_process_up") == 1
    assert registry.get_sample_value("zmon_host_cpu_utilization_ratio") is not None
