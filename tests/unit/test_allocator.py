"""Allocator provider, collector and Remediator against the fake torch.cuda (tests/fakes/cuda_allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.fakes.cuda_allocator import GIB, MIB, FakeTorchCuda
from tests.services import require_binary
from zmon.collectors.allocator import AllocatorCollector
from zmon.policy.actions import Remediator
from zmon.providers.allocator import (
    AllocatorProvider,
    AllocatorSample,
    parse_alloc_conf,
    settings_from_env,
)
from zmon.providers.base import SourceUnavailable
from zmon.sampling.store import SnapshotStore

# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("conf", "expandable", "backend", "max_split"),
    [
        ("", False, "native", None),
        ("expandable_segments:True", True, "native", None),
        ("expandable_segments:true", True, "native", None),
        ("expandable_segments:False,max_split_size_mb:128", False, "native", 128),
        (" max_split_size_mb:512 , garbage_collection_threshold:0.6 ", False, "native", 512),
        ("backend:cudaMallocAsync", False, "cudaMallocAsync", None),
        ("nonsense", False, "native", None),
    ],
)
def test_parse_alloc_conf(conf: str, expandable: bool, backend: str, max_split: int | None) -> None:
    s = parse_alloc_conf(conf)
    assert s.alloc_conf == conf.strip()
    assert s.expandable_segments is expandable
    assert s.backend == backend
    assert s.max_split_size_mb == max_split


def test_settings_from_env_prefers_new_name() -> None:
    assert settings_from_env({}).alloc_conf == ""
    s = settings_from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert s.expandable_segments and s.env_var == "PYTORCH_CUDA_ALLOC_CONF"
    s = settings_from_env(
        {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}
    )
    assert s.env_var == "PYTORCH_ALLOC_CONF" and not s.expandable_segments and s.option("max_split_size_mb") == "64"


# ------------------------------------------------------------------------------------------- provider


def _scenario(devices: int = 1) -> FakeTorchCuda:
    cuda = FakeTorchCuda(devices)
    d = cuda.devices[0]
    d.set(allocated=6 * GIB, reserved=10 * GIB, inactive_split=1 * GIB)
    d.requested = 6 * GIB - 10 * MIB
    d.active = 6 * GIB + 5 * MIB
    d.segments, d.alloc_retries, d.ooms, d.sync_all_streams = 12, 2, 1, 3
    d.device_allocs, d.device_frees = 40, 28
    d.other_processes = 2 * GIB
    return cuda


def test_sample_values_and_ratios() -> None:
    cuda = _scenario()
    p = AllocatorProvider(cuda, environ={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    s = p.sample()
    assert isinstance(s, AllocatorSample) and s.cuda_initialized
    assert s.settings.max_split_size_mb == 128 and not s.settings.expandable_segments
    (d,) = s.devices
    assert d.device == 0
    assert (d.allocated_bytes, d.reserved_bytes) == (6 * GIB, 10 * GIB)
    assert d.requested_bytes == 6 * GIB - 10 * MIB and d.active_bytes == 6 * GIB + 5 * MIB
    assert d.inactive_split_bytes == 1 * GIB and d.peak_inactive_split_bytes == 1 * GIB
    assert (d.segments, d.alloc_retries, d.ooms, d.sync_all_streams) == (12, 2, 1, 3)
    assert (d.device_allocs, d.device_frees) == (40, 28)
    assert d.total_bytes == 80 * GIB and d.free_bytes == 80 * GIB - 10 * GIB - 2 * GIB
    assert d.reserved_unallocated_ratio == pytest.approx(0.4)
    assert d.fragmentation_ratio == pytest.approx(0.1)
    assert d.headroom_bytes == d.free_bytes + 4 * GIB
    assert s.device(0) is d and s.device(1) is None


def test_ratios_absent_when_nothing_reserved() -> None:
    cuda = FakeTorchCuda()
    d = AllocatorProvider(cuda).sample().devices[0]
    assert d.reserved_bytes == 0
    assert d.reserved_unallocated_ratio is None and d.fragmentation_ratio is None
    assert d.headroom_bytes == 80 * GIB


def test_keys_missing_in_older_torch_are_absent() -> None:
    cuda = _scenario()
    cuda.devices[0].drop_keys = {"requested_bytes.all.current", "num_device_alloc", "num_sync_all_streams"}
    d = AllocatorProvider(cuda).sample().devices[0]
    assert d.requested_bytes is None and d.device_allocs is None and d.sync_all_streams is None
    assert d.allocated_bytes == 6 * GIB


def test_cuda_malloc_async_split_stats_unknown() -> None:
    cuda = _scenario()
    cuda.backend = "cudaMallocAsync"
    s = AllocatorProvider(cuda).sample()
    assert s.settings.backend == "cudaMallocAsync"
    assert s.devices[0].inactive_split_bytes is None and s.devices[0].fragmentation_ratio is None


def test_not_initialised_reads_nothing() -> None:
    cuda = _scenario()
    cuda.initialized = False
    s = AllocatorProvider(cuda).sample()
    assert s.devices == () and not s.cuda_initialized
    assert "mem_get_info" not in cuda.calls  # would create a CUDA context on a real GPU


def test_unavailable_cuda_raises_source_unavailable() -> None:
    with pytest.raises(SourceUnavailable, match="not available"):
        AllocatorProvider(FakeTorchCuda(available=False)).sample()


def test_missing_torch_raises_source_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(SourceUnavailable, match="torch"):
        AllocatorProvider().sample()


def test_default_devices_are_the_used_ones() -> None:
    cuda = FakeTorchCuda(3)
    cuda.devices[2].set(allocated=GIB, reserved=2 * GIB)
    p = AllocatorProvider(cuda)
    assert [d.device for d in p.sample().devices] == [0, 2]  # current device 0, and 2 (used); 1 untouched
    assert [d.device for d in AllocatorProvider(cuda, devices=[1]).sample().devices] == [1]


def test_sample_is_immutable() -> None:
    s = AllocatorProvider(_scenario()).sample()
    with pytest.raises(AttributeError):
        s.devices[0].allocated_bytes = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- collector


def _registry(store: SnapshotStore) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(AllocatorCollector(store))
    return reg


def test_collector_families() -> None:
    store = SnapshotStore()
    cuda = _scenario(2)
    cuda.devices[1].set(allocated=GIB, reserved=GIB)
    p = AllocatorProvider(cuda, devices=[0, 1], environ={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    store.put("allocator", p.sample(), 0.0001)
    reg = _registry(store)
    v = reg.get_sample_value
    assert v("zmon_torch_allocated_bytes", {"device": "0"}) == 6 * GIB
    assert v("zmon_torch_reserved_bytes", {"device": "0"}) == 10 * GIB
    assert v("zmon_torch_inactive_split_bytes", {"device": "0"}) == GIB
    assert v("zmon_torch_peak_reserved_bytes", {"device": "0"}) == 10 * GIB
    assert v("zmon_torch_segments", {"device": "0"}) == 12
    assert v("zmon_torch_alloc_retries_total", {"device": "0"}) == 2
    assert v("zmon_torch_ooms_total", {"device": "0"}) == 1
    assert v("zmon_torch_sync_all_streams_total", {"device": "0"}) == 3
    assert v("zmon_torch_device_allocs_total", {"device": "0"}) == 40
    assert v("zmon_torch_device_frees_total", {"device": "0"}) == 28
    assert v("zmon_torch_device_total_bytes", {"device": "0"}) == 80 * GIB
    assert v("zmon_torch_reserved_unallocated_ratio", {"device": "0"}) == pytest.approx(0.4)
    assert v("zmon_torch_fragmentation_ratio", {"device": "0"}) == pytest.approx(0.1)
    assert v("zmon_torch_headroom_bytes", {"device": "0"}) == (80 - 12 + 4) * GIB
    assert v("zmon_torch_reserved_unallocated_ratio", {"device": "1"}) == 0.0
    assert (
        v(
            "zmon_torch_allocator_info",
            {"alloc_conf": "expandable_segments:True", "expandable_segments": "true", "backend": "native"},
        )
        == 1.0
    )
    assert v("zmon_torch_cuda_initialized") == 1.0


def test_collector_leaves_unknown_out_and_builds_fresh_families() -> None:
    store = SnapshotStore()
    reg = _registry(store)
    assert generate_latest(reg) == b""  # no sample yet: nothing, not zeros
    cuda = FakeTorchCuda(2)
    store.put("allocator", AllocatorProvider(cuda, devices=[0, 1]).sample(), 0.0)
    assert reg.get_sample_value("zmon_torch_reserved_bytes", {"device": "1"}) == 0
    assert reg.get_sample_value("zmon_torch_reserved_unallocated_ratio", {"device": "0"}) is None
    store.put("allocator", AllocatorProvider(cuda, devices=[0]).sample(), 0.0)
    assert reg.get_sample_value("zmon_torch_reserved_bytes", {"device": "1"}) is None  # no stale series


def test_exposition_passes_promtool(tmp_path: object) -> None:
    promtool = require_binary("promtool")
    store = SnapshotStore()
    store.put("allocator", AllocatorProvider(_scenario()).sample(), 0.0)
    text = generate_latest(_registry(store))
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


# ------------------------------------------------------------------------------------------- remediator


class _Ticks:
    """A perf_counter stand-in advancing 4 ms per call."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.004
        return self.t


def test_empty_cache_measures_freed_bytes() -> None:
    cuda = _scenario(2)
    cuda.devices[0].unreleasable = GIB  # one split block cannot be returned
    cuda.devices[1].set(allocated=GIB, reserved=3 * GIB)
    r = Remediator(cuda, _Ticks(), wall=lambda: 1000.0).run("empty_cache", reason="test")
    assert r.result == "ok" and r.action == "empty_cache" and r.reason == "test"
    assert r.reserved_before == 13 * GIB
    assert r.reserved_after == 7 * GIB + GIB  # device 0: allocated + unreleasable; device 1: allocated
    assert r.freed_bytes == 5 * GIB
    assert r.seconds == pytest.approx(0.004)
    assert r.at == 1000.0
    assert cuda.calls["empty_cache"] == 1


def test_remediator_dry_run_skip_and_error() -> None:
    cuda = _scenario()
    assert Remediator(cuda, dry_run=True).run("empty_cache").result == "dry_run"
    assert "empty_cache" not in cuda.calls
    assert Remediator(cuda).run("alert").result == "skipped"
    cuda.initialized = False
    r = Remediator(cuda).run("empty_cache")
    assert r.result == "skipped" and "not initialised" in r.detail
    cuda.initialized = True
    cuda.empty_cache_error = RuntimeError("CUDA error: an illegal memory access")
    r = Remediator(cuda).run("empty_cache")
    assert r.result == "error" and "illegal memory access" in r.detail


def test_remediator_without_torch_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    assert Remediator().run("empty_cache").result == "skipped"


def test_gc_collect() -> None:
    r = Remediator(FakeTorchCuda(), collect_garbage=lambda: 7).run("gc_collect", reason="r")
    assert r.result == "ok" and r.detail == "7 unreachable objects"
