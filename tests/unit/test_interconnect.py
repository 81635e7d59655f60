"""The interconnect probe's arithmetic (nccl-tests' algbw/busbw), its input checks, and the nominal link
figure from NVML (fake) or the card table."""

from __future__ import annotations

import pytest

from tests.fakes.nvml import FakeNvml, h100
from zmon.app.probe import ProbeError, ProbeOptions, _nominal, plan
from zmon.app.workers.protocol import Placement
from zmon.capture.interconnect import (
    Nominal,
    ProbeResult,
    RankResult,
    bus_factor,
    measurements,
    message_sizes,
    render_table,
)
from zmon.providers.cuda import DeviceIdentity


def test_bus_factors_are_nccl_tests_ones() -> None:
    assert bus_factor("all_reduce", 2) == 1.0 and bus_factor("all_reduce", 8) == 2 * 7 / 8
    assert bus_factor("all_gather", 2) == 0.5 and bus_factor("all_gather", 4) == 0.75
    with pytest.raises(ValueError):
        bus_factor("all_reduce", 1)


def test_sizes_are_whole_elements_per_rank() -> None:
    assert message_sizes(1024, 65536) == [1024, 4096, 16384, 65536]
    assert message_sizes(10, 100, 2, ranks=3) == [12, 24, 48, 84]  # multiples of 4 bytes × 3 ranks
    with pytest.raises(ValueError):
        message_sizes(0, 10)


def test_the_slowest_rank_decides() -> None:
    (m,) = measurements("all_reduce", 4, [(1 << 30, [0.010, 0.008, 0.012, 0.009])])
    assert m.seconds == 0.012
    assert m.algbw_bytes_per_second == pytest.approx((1 << 30) / 0.012)
    assert m.busbw_bytes_per_second == pytest.approx(m.algbw_bytes_per_second * 1.5)


def test_bad_input_is_refused_with_a_reason() -> None:
    with pytest.raises(ProbeError, match="at least 2 devices"):
        plan(ProbeOptions(devices="cpu:1"))
    with pytest.raises(ProbeError, match="unknown backend 'mpi'"):
        plan(ProbeOptions(devices="cpu:2", backend="mpi"))
    with pytest.raises(ProbeError, match="needs CUDA devices"):
        plan(ProbeOptions(devices="cpu:2", backend="nccl"))
    with pytest.raises(ProbeError, match="unknown operation"):
        plan(ProbeOptions(devices="cpu:2", ops=("broadcast",)))  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="sizes"):
        plan(ProbeOptions(devices="cpu:2", min_bytes=4096, max_bytes=1024))
    assert plan(ProbeOptions(devices="cpu:2"))[1] == "gloo"


def identity(i: int, name: str = "NVIDIA H100 80GB HBM3") -> DeviceIdentity:
    return DeviceIdentity(i, name, f"{i:08x}-1111-2222-3333-444455556666", 0, 0x18 + 0x11 * i, 0, 80 << 30)


def test_nominal_from_nvml_is_the_slowest_gpus_nvlink() -> None:
    fake = FakeNvml(
        [
            h100(0, nvlink_links=18, nvlink_speed_mbps=25000),
            h100(1, nvlink_links=18, nvlink_down={0, 1}, nvlink_speed_mbps=25000),
        ]
    )
    ranks = [RankResult(r, {}, identity(r)) for r in (0, 1)]
    placements = [Placement(f"cuda:{i}", f"cuda:{i}", i) for i in (0, 1)]
    cards, nominal, notes = _nominal(ranks, placements, fake)
    assert nominal == Nominal(16 * 25e9, "NVML: 16 NVLinks × 25.0 GB/s on GPU 1") and not notes
    assert cards == ("NVIDIA H100 80GB HBM3",) * 2


def test_nominal_from_the_table_without_nvml_nvlink() -> None:
    placements = [Placement(f"cuda:{i}", f"cuda:{i}", i) for i in (0, 1)]
    h200 = [RankResult(r, {}, identity(r, "NVIDIA H200")) for r in (0, 1)]
    _, nominal, _ = _nominal(h200, placements, FakeNvml([h100(0), h100(1)]))
    assert nominal == Nominal(450e9, "table: H200")
    pcie = [RankResult(r, {}, identity(r, "NVIDIA H100 PCIe")) for r in (0, 1)]
    _, nominal, notes = _nominal(pcie, placements, FakeNvml([h100(0), h100(1)]))
    assert nominal is None and "PCIe" in notes[0]
    _, nominal, notes = _nominal([RankResult(0, {}), RankResult(1, {})], placements, None)
    assert nominal is None and "CPU" in notes[0]


def test_table_and_json() -> None:
    rows = measurements("all_reduce", 2, [(1024, [2e-5, 2e-5]), (1 << 30, [4e-3, 5e-3])])
    result = ProbeResult(
        "nccl",
        2,
        ("cuda:0", "cuda:1"),
        20,
        5,
        tuple(rows),
        Nominal(450e9, "table: H200"),
        ("NVIDIA H200", "NVIDIA H200"),
    )
    text = render_table(result)
    assert "all_reduce" in text and "1 GiB" in text and "48%" in text  # 1 GiB / 5 ms = 215 GB/s = 48% of 450
    assert "latency 20.0 µs" in text
    doc = result.to_dict()
    assert doc["ops"]["all_reduce"]["latency_seconds"] == 2e-5
    assert doc["ops"]["all_reduce"]["peak_busbw_of_nominal"] == pytest.approx((1 << 30) / 5e-3 / 450e9)
