"""Live diagnosis: rolling window → zmon_bottleneck* metrics, GET /diagnosis and `zmon diagnose --url`."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.services import require_binary
from zmon.analysis.diagnosis import RULES
from zmon.analysis.live import KINDS, LIVE_FIXES, VERDICTS
from zmon.app.client import diagnosis_url
from zmon.app.monitor import Monitor
from zmon.app.parts import add_live_diagnosis
from zmon.capture.live import LiveDiagnosis
from zmon.cli import main
from zmon.config import Config
from zmon.instrumentation.records import GenerationRecord, StageTiming
from zmon.providers.host import HostSample, ProcessSample
from zmon.providers.nvml import GpuSample, NvmlSample
from zmon.sampling import SampleHistory, SnapshotStore

NOW = 1_800_000_000.0
GIB = 1024**3


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(
    start: float, *, device: str = "cuda:0", text: float = 0.05, step: float = 0.1, steps: int = 8, decode: float = 0.05
) -> GenerationRecord:
    """A generation: text encoding, `steps` denoise steps, VAE decode, back to back from `start`."""
    spans = [StageTiming("text_encode", text, 0.0)]
    t = text
    for i in range(steps):
        spans.append(StageTiming("denoise_step", step, t, i))
        t += step
    spans.append(StageTiming("vae_decode", decode, t))
    t += decode
    return GenerationRecord(
        started_at=start,
        total_seconds=t,
        stages=tuple(spans),
        steps=steps,
        width=1024,
        height=1024,
        guidance_scale=0.0,
        cfg_active=False,
        device=device,
        timing_method="cuda_event",
        peak_allocated_bytes=30 * GIB,
        peak_reserved_bytes=36 * GIB,
    )


def nvml(util: float, used: int = 40 * GIB) -> NvmlSample:
    gpu = GpuSample(
        0,
        "GPU-1234",
        "NVIDIA H100 80GB HBM3",
        "00000000:3B:00.0",
        utilization_gpu_ratio=util,
        memory_used_bytes=used,
        memory_total_bytes=80 * GIB,
    )
    return NvmlSample("580.1", "13.580", "13.0", (gpu,))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Iterator[Monitor]:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # NVML index = CUDA index
    cfg = Config()
    mon = Monitor(
        cfg.sampling,
        cfg.server,
        mode="run",
        registry=CollectorRegistry(auto_describe=False),
        serve_http=False,
        store=SnapshotStore(wall=clock),
    )  # samples are stamped with the fake wall clock
    yield mon
    mon.stop()


def feed(mon: Monitor, live: LiveDiagnosis, clock: Clock, util: float, seconds: int = 30) -> None:
    """`seconds` of back-to-back generations (one per second) with NVML and CPU samples every second."""
    values: dict[str, Any] = {}
    for name in ("nvml", "process", "host"):
        if name not in mon.sampler.sources:
            mon.add_source(name, lambda name=name: values[name], 1.0)
    cpu = 0.0
    for i in range(seconds):
        clock.t = NOW + i
        if i:  # a 0.9 s generation inside each second, sampled at its end
            live.observe(record(NOW + i - 1 + 0.05))
        cpu += 1.0
        values["nvml"] = nvml(util)
        values["process"] = ProcessSample(1, True, cpu_user_seconds=cpu, cpu_system_seconds=0.0)
        values["host"] = HostSample((), 2, 0.5, None, 0, 0, 0, 64 * GIB, 32 * GIB, 32 * GIB, 0, 0)
        for name in ("nvml", "host", "process"):
            mon.sampler.run_once(name)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def install(mon: Monitor, **kw: Any) -> LiveDiagnosis:
    return add_live_diagnosis(mon, Config().diagnosis_thresholds, **kw)


def bare(**kw: Any) -> LiveDiagnosis:
    """A live diagnosis over an empty sample history (CPU-only generations need none)."""
    return LiveDiagnosis(SampleHistory(SnapshotStore(), ()), **kw)


def test_gpu_underutilized_service_reads_cpu_bound(monitor: Monitor, clock: Clock) -> None:
    live = install(monitor, window_seconds=300, interval_seconds=10)
    live._clock = clock  # type: ignore[attr-defined]
    feed(monitor, live, clock, util=0.45)
    assert monitor.sampler.run_once("diagnosis")
    reg = monitor.registry
    assert sample(reg, "zmon_bottleneck_window_generations") == 29
    assert sample(reg, "zmon_bottleneck_verdict", verdict="cpu_bound") == 1
    for v in VERDICTS:
        assert sample(reg, "zmon_bottleneck_verdict", verdict=v) == (1 if v == "cpu_bound" else 0)
    assert sample(reg, "zmon_bottleneck", kind="gpu_underutilization") == 1
    assert sample(reg, "zmon_bottleneck", kind="memory_fragmentation") == 0
    for kind in KINDS:
        assert sample(reg, "zmon_bottleneck", kind=kind) in (0.0, 1.0)
    fix = LIVE_FIXES["gpu_underutilization"]
    assert sample(reg, "zmon_bottleneck_info", kind="gpu_underutilization", priority="2", fix=fix) == 1
    snap = live.latest
    assert snap is not None and snap.facts is not None
    assert snap.facts.utilization.gpu_by_stage["denoise_step"] == pytest.approx(0.45)
    assert snap.facts.memory.card_total_bytes == 80 * GIB
    assert snap.facts.environment.card_name == "NVIDIA H100 80GB HBM3"
    # The window still holds the process's first generation: its slowdown stays a figure.
    assert snap.facts.io.first_generation_seconds is not None


def test_busy_gpu_is_optimized_and_info_series_are_stable(monitor: Monitor, clock: Clock) -> None:
    live = install(monitor, interval_seconds=10)
    live._clock = clock  # type: ignore[attr-defined]
    feed(monitor, live, clock, util=0.97)
    monitor.sampler.run_once("diagnosis")
    reg = monitor.registry
    assert sample(reg, "zmon_bottleneck_verdict", verdict="optimized") == 1
    assert sample(reg, "zmon_bottleneck", kind="gpu_underutilization") == 0
    text = generate_latest(reg).decode()
    info_lines = [ln for ln in text.splitlines() if ln.startswith("zmon_bottleneck_info{")]
    monitor.sampler.run_once("diagnosis")
    again = [ln for ln in generate_latest(reg).decode().splitlines() if ln.startswith("zmon_bottleneck_info{")]
    assert info_lines == again  # same findings → same series, whatever the figures


def test_below_min_generations_exports_only_the_window_size(monitor: Monitor) -> None:
    live = install(monitor)
    live.observe(record(NOW))
    monitor.sampler.run_once("diagnosis")
    reg = monitor.registry
    assert sample(reg, "zmon_bottleneck_window_generations") == 1
    assert sample(reg, "zmon_bottleneck_verdict", verdict="optimized") is None  # unknown is absent
    assert sample(reg, "zmon_bottleneck", kind="cpu_bound") is None


def test_window_drops_old_generations_and_first_generation_figures() -> None:
    clock = Clock()
    live = bare(window_seconds=60, clock=clock)
    live.observe(record(NOW, device="cpu", text=2.0))  # a slow first generation
    for i in range(1, 10):
        live.observe(record(NOW + 10 * i, device="cpu"))
    snap = live.evaluate()
    assert snap.facts is not None and snap.facts.io.first_generation_seconds == pytest.approx(2.85)
    clock.t = NOW + 100
    snap = live.evaluate()
    assert snap.generations == 6  # started at NOW+40 … NOW+90
    assert snap.facts is not None and snap.facts.io.first_generation_seconds is None


def test_text_heavy_cpu_generations_read_cpu_bound_with_a_fix() -> None:
    live = bare(clock=Clock(NOW + 20))
    for i in range(5):
        live.observe(record(NOW + i, device="cpu", text=0.5, step=0.02))
    d = live.evaluate().diagnosis
    assert d is not None and d.verdict == "cpu_bound"
    finding = next(f for f in d.active_findings if f.kind == "cpu_bound")
    assert "prompt" in (finding.fix or "")


def test_verdict_changes_are_logged_once_with_their_caveats(caplog: pytest.LogCaptureFixture) -> None:
    live = bare(clock=Clock(NOW + 20))
    for i in range(5):
        live.observe(record(NOW + i, device="cpu", text=0.5, step=0.02))
    with caplog.at_level(logging.INFO, logger="zmon.capture.live"):
        live.evaluate()
        live.evaluate()  # same verdict, same confidence: not logged again
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("live verdict:")]
    assert len(lines) == 1
    assert lines[0].startswith("live verdict: cpu_bound (confidence low over 5 generation(s)) — CPU-only run")


def test_every_rule_has_a_live_fix() -> None:
    assert set(LIVE_FIXES) == {r.kind for r in RULES} == set(KINDS)
    assert all(len(v) <= 160 for v in LIVE_FIXES.values())


# ------------------------------------------------------------------------------------------------ HTTP + CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_diagnosis_endpoint_and_zmon_diagnose(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config.model_validate({"server": {"listen": "127.0.0.1:0"}})
    mon = Monitor(cfg.sampling, cfg.server, mode="run", registry=CollectorRegistry(auto_describe=False))
    live = install(mon)
    mon.start()
    try:
        assert mon.server is not None
        url = f"http://127.0.0.1:{mon.server.port}"
        assert main(["diagnose", "--url", url]) == 0
        assert "no diagnosis yet: 0 generation(s)" in capsys.readouterr().out

        live._clock = Clock(NOW + 20)  # type: ignore[attr-defined]
        for i in range(5):
            live.observe(record(NOW + i, device="cpu", text=0.5, step=0.02))
        live.evaluate()
        with urllib.request.urlopen(url + "/diagnosis", timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["verdict"] == "cpu_bound" and doc["generations"] == 5
        assert "gpu_samples" not in doc["facts"]["utilization"]
        assert main(["diagnose", "--url", url + "/"]) == 0
        out = capsys.readouterr().out
        # A CPU-only window: the verdict says it describes the host, with the reason.
        assert out.startswith("verdict: cpu_bound (confidence low) — CPU bottleneck")
        assert "caveat: CPU-only run" in out and "not the model on a GPU" in out
        assert "active findings (by priority):" in out and "fix: text encoding is" in out
    finally:
        mon.stop()


def test_zmon_diagnose_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--url", f"http://127.0.0.1:{_free_port()}", "--timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    for bad in ("ftp://host/", "localhost:8739", "http://host:notaport"):
        assert main(["diagnose", "--url", bad]) == 2
        assert "error: --url" in capsys.readouterr().err
    assert diagnosis_url("http://h:1/base/") == "http://h:1/base/diagnosis"


def test_exposition_passes_promtool(monitor: Monitor, clock: Clock) -> None:
    promtool = require_binary("promtool")
    live = install(monitor)
    live._clock = clock  # type: ignore[attr-defined]
    feed(monitor, live, clock, util=0.45, seconds=10)
    monitor.sampler.run_once("diagnosis")
    text = generate_latest(monitor.registry)
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_window_is_bounded_in_count_too() -> None:
    """A fast pipeline (37 generations/s) must not hold 300 s of records: the latest max_records are kept."""
    live = LiveDiagnosis(SampleHistory(SnapshotStore(), ()), max_records=50, clock=lambda: 1000.0)
    for i in range(200):
        live.observe(record(1000.0 - 200 + i))
    assert len(live._records) == 50
    assert live._records[0].started_at == 1000.0 - 50


# ------------------------------------------------------------------------------------------------ a shared GPU


def _with_processes(*procs: tuple[int, int, bool]) -> NvmlSample:
    from dataclasses import replace

    from zmon.providers.nvml import ProcessSample as GpuProcess

    base = nvml(0.95)
    gpu = replace(base.gpus[0], processes=tuple(GpuProcess(pid, mem, ours) for pid, mem, ours in procs))
    return replace(base, gpus=(gpu,))


def test_other_processes_on_the_gpu_are_a_caveat(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from tests.fakes.profiles import healthy_facts
    from zmon.analysis.diagnosis import diagnose
    from zmon.capture.inputs import GpuResolver, other_gpu_processes
    from zmon.sampling.keys import NVML

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    history = SampleHistory(SnapshotStore(), (NVML,))
    history.add(NVML, NOW, _with_processes((10, 30 * GIB, True)))
    history.add(NVML, NOW + 1, _with_processes((10, 30 * GIB, True), (77, 8 * GIB, False), (78, GIB, False)))
    history.add(NVML, NOW + 2, _with_processes((10, 30 * GIB, True), (77, 8 * GIB, False)))
    assert other_gpu_processes(history, "cuda:0", GpuResolver()) == (2, 9 * GIB)  # the most seen at once
    assert other_gpu_processes(history, "cpu", GpuResolver()) == (None, None)

    # NVML lists pids this process cannot see as its own (a container): nothing is known about the others
    blind = SampleHistory(SnapshotStore(), (NVML,))
    blind.add(NVML, NOW, _with_processes((4242, 30 * GIB, False), (77, 8 * GIB, False)))
    assert other_gpu_processes(blind, "cuda:0", GpuResolver()) == (None, None)

    facts = healthy_facts()
    shared = replace(
        facts,
        utilization=replace(facts.utilization, other_gpu_processes=2, other_gpu_processes_memory_bytes=9 * GIB),
    )
    d = diagnose(shared)
    assert d.confidence == "medium" and any("2 other process(es)" in c and "shared GPU" in c for c in d.caveats)
    assert diagnose(facts).confidence == "high"
