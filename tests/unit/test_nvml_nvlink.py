"""NVLink as NVML describes it: active links and link speed read once per handle, the data counters on the
slow job; absent (not 0) on GPUs without NVLink, and the other families unchanged."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from tests.fakes.nvml import FakeNvml, h100
from tests.services import require_binary
from tests.unit.test_nvml import exposition
from zmon.providers.nvml import NvmlProvider

Golden = Callable[[str, str], None]


def nvlink_host() -> FakeNvml:
    """Two H100 SXM on NVLink (18 links, one of GPU 1's down) and a PCIe card beside them."""
    return FakeNvml(
        [
            h100(0, nvlink_links=18, nvlink_speed_mbps=26562, nvlink_tx_kib=3 * 1024**2, nvlink_rx_kib=5 * 1024**2),
            h100(1, nvlink_links=18, nvlink_down={17}, nvlink_speed_mbps=26562),
            h100(2, name="NVIDIA H100 PCIe"),
        ]
    )


def test_links_speed_and_counters() -> None:
    fake = nvlink_host()
    provider = NvmlProvider(fake, processes=False)
    try:
        gpus = provider.sample().gpus
        assert [g.nvlink_links_active for g in gpus] == [18, 17, None]
        assert gpus[0].nvlink_link_bytes_per_second == 26562e6
        assert gpus[1].nvlink_bandwidth_bytes_per_second == 17 * 26562e6
        assert gpus[2].nvlink_bandwidth_bytes_per_second is None
        state_calls = fake.calls["nvmlDeviceGetNvLinkState"]
        provider.sample()
        assert fake.calls["nvmlDeviceGetNvLinkState"] == state_calls  # read once per handle, not per tick
        slow = {p.index: p for p in provider.sample_slow().gpus}
        assert slow[0].nvlink_tx_bytes == 3 * 1024**3 and slow[0].nvlink_rx_bytes == 5 * 1024**3
        assert slow[2].nvlink_tx_bytes is None  # no NVLink: no field-value call at all
        registry, text = exposition(provider)
        assert registry.get_sample_value("zmon_gpu_nvlink_links_active", {"gpu": "1"}) == 17
        assert registry.get_sample_value("zmon_gpu_nvlink_transmitted_bytes_total", {"gpu": "0"}) == 3 * 1024**3
        assert registry.get_sample_value("zmon_gpu_nvlink_links_active", {"gpu": "2"}) is None
        out = subprocess.run(
            [require_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        provider.close()


def test_no_nvlink_anywhere_adds_no_family() -> None:
    provider = NvmlProvider(FakeNvml([h100(0), h100(1)]), processes=False)
    try:
        _, text = exposition(provider)
    finally:
        provider.close()
    assert "nvlink_links_active" not in text and "nvlink_transmitted" not in text


def test_golden_nvlink(golden: Golden) -> None:
    provider = NvmlProvider(nvlink_host(), processes=False)
    try:
        _, text = exposition(provider)
    finally:
        provider.close()
    golden("nvml_nvlink.prom", text)
