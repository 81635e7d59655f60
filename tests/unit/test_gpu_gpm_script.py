"""benchmarks/gpu_gpm.py without a GPU: its windows, table, timing and outputs over the fake NVML; clear exits."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pynvml
import pytest

from benchmarks import gpu_gpm
from tests.fakes.nvml import GPM_COPY, GPM_GEMM, FakeNvml, make_gpm
from tests.services import require_binary
from zmon.providers.nvml import NvmlProvider

IDLE = dict.fromkeys(GPM_GEMM, 0.0)
TINY = {**IDLE, pynvml.NVML_GPM_METRIC_SM_UTIL: 0.5}  # launch-bound: the SMs mostly wait


def fake_workloads(fake: FakeNvml) -> dict[str, gpu_gpm.Workload]:
    """Each workload sets GPU 0's readings (utilization.gpu in percent, GPM values) for its window."""

    def workload(util: int, gpm: dict[int, float]) -> gpu_gpm.Workload:
        def run(deadline: float) -> dict[str, float]:
            fake.gpus[0].utilization_gpu = util
            fake.gpus[0].gpm_metrics = dict(gpm)
            time.sleep(max(0.0, deadline - time.monotonic()))
            return {"util_set": float(util)}

        return run

    return {
        "idle": workload(0, IDLE),
        "gemm": workload(99, GPM_GEMM),
        "copy": workload(97, GPM_COPY),
        "tiny": workload(1, TINY),
    }


def test_measure_over_the_fake_nvml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = make_gpm()
    on, off = NvmlProvider(fake, gpm=True), NvmlProvider(fake, gpm=False)
    try:
        result = gpu_gpm.measure(
            on,
            off,
            fake_workloads(fake),
            0,
            tmp_path,
            window_seconds=0.5,
            period_seconds=0.12,
            timing_calls=5,
            timing_spacing_seconds=0.11,
        )
    finally:
        on.close()
        off.close()
    assert fake.live_gpm_samples == 0
    w = result["workloads"]
    assert list(w) == ["idle", "gemm", "copy", "tiny"]
    assert all(s["samples"] >= 2 for s in w.values()), {k: s["samples"] for k, s in w.items()}
    # only intervals inside a window count: each workload reads exactly its own values
    assert (w["gemm"]["utilization_gpu_ratio"], w["gemm"]["sm_active_ratio"]) == (0.99, 0.95)
    assert (w["gemm"]["tensor_active_ratio"], w["gemm"]["dram_bandwidth_utilization_ratio"]) == (0.92, 0.17)
    assert w["gemm"]["nvlink_rx_bytes_per_second"] == 1536 * 1024**2
    assert (w["copy"]["tensor_active_ratio"], w["copy"]["dram_bandwidth_utilization_ratio"]) == (0.0, 0.85)
    assert w["copy"]["nvlink_rx_bytes_per_second"] is None  # GPM_COPY has no NVLink: absent, not 0
    assert (w["tiny"]["utilization_gpu_ratio"], w["tiny"]["sm_active_ratio"]) == (0.01, 0.005)
    assert w["idle"]["sm_active_ratio"] == 0.0 and w["gemm"]["util_set"] == 99.0
    timing = result["sample_timing"]
    assert timing["gpm_on"]["calls"] == timing["gpm_off"]["calls"] == 5
    assert timing["gpm_on"]["samples_with_gpm_values"] == 5  # spaced enough for every call to take GPM
    assert timing["gpm_on"]["p95_ms"] >= timing["gpm_on"]["median_ms"] > 0
    assert result["sampler_errors"] == []
    # outputs
    assert json.loads((tmp_path / "gpm.json").read_text())["workloads"]["gemm"]["sm_active_ratio"] == 0.95
    prom = (tmp_path / "gpm_metrics.prom").read_text()
    assert 'zmon_gpu_tensor_active_ratio{gpu="0"} 0.92' in prom
    require_binary("promtool")  # the script checks its own exposition with promtool where it finds one
    assert result["promtool_check_metrics"] == "ok"
    table = capsys.readouterr().out
    gemm_row = next(line for line in table.splitlines() if line.startswith("gemm"))
    assert gemm_row.split()[2:7] == ["99.0%", "95.0%", "14.0%", "92.0%", "17.0%"]
    copy_row = next(line for line in table.splitlines() if line.startswith("copy"))
    assert copy_row.split()[-2:] == ["-", "-"]


def test_no_nvml_exits_2_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fakes.nvml import make_absent

    def provider(**kwargs: Any) -> NvmlProvider:
        return NvmlProvider(make_absent(), **kwargs)

    monkeypatch.setattr("zmon.providers.nvml.NvmlProvider", provider)
    assert gpu_gpm.main(["--out", str(tmp_path)]) == 2
    assert "NVML unavailable" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_no_cuda_exits_2_and_frees_nvml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = make_gpm()

    def provider(**kwargs: Any) -> NvmlProvider:
        return NvmlProvider(fake, **kwargs)

    monkeypatch.setattr("zmon.providers.nvml.NvmlProvider", provider)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_gpm.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert fake.live_gpm_samples == 0 and not fake.initialized
