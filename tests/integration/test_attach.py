"""zmon.attach: instruments in place, detach restores bit for bit, host registries, threads, the example."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import zmon
from tests.services import free_port, wait_http
from zmon.config import Config

MODEL = "builtin:tiny-z-image"
LABELS = {"model": MODEL, "resolution": "64x64", "device": "cpu"}
OK_LINE = f'zmon_generations_total{{device="cpu",model="{MODEL}",resolution="64x64",status="ok"}} 1.0'
DENOISE_LINE = (
    f'zmon_stage_duration_seconds_count{{device="cpu",model="{MODEL}",resolution="64x64",stage="denoise"}} 1.0'
)


def generate(pipe: Any, seed: int = 1, prompt: str = "a red apple") -> np.ndarray:
    import torch

    out = pipe(
        prompt,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    return np.asarray(out.images[0])


def state(pipe: Any) -> dict[str, Any]:
    """What attach may touch: the pipeline's class, and for it and its patched components the instance
    attribute names plus every callable attribute itself (a patched method shows up there)."""
    import torch

    def attrs(obj: Any) -> dict[str, Any]:
        return {k: v if callable(v) and not isinstance(v, torch.nn.Module) else type(v) for k, v in vars(obj).items()}

    return {
        "class": type(pipe),
        "pipe": attrs(pipe),
        "vae": attrs(pipe.vae),
        "scheduler": attrs(pipe.scheduler),
        "image_processor": attrs(pipe.image_processor),
        "transformer": attrs(pipe.transformer),
        "hooks": dict(pipe.transformer._forward_pre_hooks),
    }


@pytest.fixture
def attached(tiny_pipe: Any, torch_single_thread: None) -> Iterator[tuple[Any, CollectorRegistry]]:
    reg = CollectorRegistry()
    handle = zmon.attach(tiny_pipe, Config(), registry=reg, serve_http=False, model_id=MODEL)
    try:
        yield handle, reg
    finally:
        handle.detach()


def test_detach_restores_the_pipeline_bit_for_bit(tiny_pipe: Any, torch_single_thread: None) -> None:
    before = generate(tiny_pipe)
    before_state = state(tiny_pipe)  # after a call: the pipeline sets attributes of its own on each call
    cfg = Config.model_validate({"workload": {"prompt_cache": {"enabled": True}}})
    handle = zmon.attach(tiny_pipe, cfg, registry=CollectorRegistry(), serve_http=False, model_id=MODEL)
    try:
        assert type(tiny_pipe) is not before_state["class"]
        assert isinstance(tiny_pipe, before_state["class"])
        during = generate(tiny_pipe)
        again = generate(tiny_pipe)  # a prompt-cache hit
    finally:
        handle.detach()
    after = generate(tiny_pipe)
    assert np.array_equal(before, during) and np.array_equal(before, again) and np.array_equal(before, after)
    assert state(tiny_pipe) == before_state
    assert handle.instrumentation.prompt_cache.hits == 1
    handle.detach()  # idempotent


def test_metrics_land_in_the_host_registry(attached: tuple[Any, CollectorRegistry], tiny_pipe: Any) -> None:
    handle, reg = attached
    generate(tiny_pipe)
    s = reg.get_sample_value
    assert s("zmon_generations_total", {"status": "ok", **LABELS}) == 1
    for stage in ("text_encode", "denoise", "vae_decode", "postprocess"):
        assert s("zmon_stage_duration_seconds_count", {"stage": stage, **LABELS}) == 1
    text = generate_latest(reg).decode()
    assert 'zmon_build_info{mode="attach"' in text
    assert (
        s(
            "zmon_pipeline_info",
            {
                "model": MODEL,
                "pipeline_class": "ZImagePipeline",
                "device": "cpu",
                "dtype": "float32",
                "compiled": "false",
            },
        )
        == 1
    )
    handle.detach()
    assert "zmon_" not in generate_latest(reg).decode()  # collectors unregistered from the host's registry


def test_attaching_twice_raises_naming_the_handle(attached: tuple[Any, CollectorRegistry], tiny_pipe: Any) -> None:
    handle, _ = attached
    with pytest.raises(RuntimeError, match="already attached") as e:
        zmon.attach(tiny_pipe, Config(), registry=CollectorRegistry(), serve_http=False)
    assert repr(handle) in str(e.value) and f"0x{id(handle):x}" in str(e.value)
    handle.detach()
    zmon.attach(tiny_pipe, Config(), registry=CollectorRegistry(), serve_http=False).detach()  # fine now


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def generation_started(self) -> None:
        self.events.append("start")

    def generation_finished(self) -> None:
        self.events.append("end")


def test_boundary_listeners_wrap_every_call(attached: tuple[Any, CollectorRegistry], tiny_pipe: Any) -> None:
    handle, reg = attached
    rec = Recorder()
    handle.add_boundary_listener(rec)
    seen: list[float | None] = []
    rec.generation_started = lambda: (
        rec.events.append("start"),  # type: ignore[method-assign]
        seen.append(reg.get_sample_value("zmon_generation_in_progress")),
    )
    generate(tiny_pipe)
    with pytest.raises(TypeError):
        tiny_pipe("x", width=64, height=64, num_inference_steps=2, no_such_argument=1)
    assert rec.events == ["start", "end", "start", "end"]
    assert seen == [1.0, 1.0]  # the metrics listener runs first
    assert reg.get_sample_value("zmon_generation_in_progress") == 0
    assert reg.get_sample_value("zmon_generations_total", {"status": "error", **LABELS}) == 1
    handle.remove_boundary_listener(rec)
    generate(tiny_pipe)
    assert len(rec.events) == 4


def test_host_threads_one_at_a_time_give_consistent_counts(
    attached: tuple[Any, CollectorRegistry], tiny_pipe: Any
) -> None:
    _, reg = attached
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(2):
                with lock:
                    generate(tiny_pipe, seed=n * 10 + i, prompt=f"prompt {n}")
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(10):
        generate_latest(reg)  # scrapes meanwhile
    for t in threads:
        t.join()
    assert not errors
    s = reg.get_sample_value
    assert s("zmon_generations_total", {"status": "ok", **LABELS}) == 8
    assert s("zmon_images_total", LABELS) == 8
    assert s("zmon_denoise_steps_total", LABELS) == 16
    assert s("zmon_denoise_step_duration_seconds_count", LABELS) == 16
    for stage in ("text_encode", "denoise", "vae_decode", "postprocess"):
        assert s("zmon_stage_duration_seconds_count", {"stage": stage, **LABELS}) == 8
    assert s("zmon_generation_in_progress") == 0


def test_attach_serves_metrics(tiny_pipe: Any, torch_single_thread: None) -> None:
    cfg = Config.model_validate({"server": {"listen": "127.0.0.1:0"}})
    handle = zmon.attach(tiny_pipe, cfg, model_id=MODEL)
    try:
        assert handle.url is not None and handle.url in repr(handle)
        generate(tiny_pipe)
        with urllib.request.urlopen(handle.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        handle.detach()
    assert OK_LINE in text and DENOISE_LINE in text
    assert "zmon_process_resident_memory_bytes" in text


def test_a_failed_attach_leaves_the_pipeline_as_it_was(tiny_pipe: Any) -> None:
    import socket

    original = type(tiny_pipe)
    reg = CollectorRegistry()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = Config.model_validate({"server": {"listen": f"127.0.0.1:{port}"}})
        with pytest.raises(zmon.AttachError, match=f"cannot serve /metrics on 127.0.0.1:{port}") as e:
            zmon.attach(tiny_pipe, cfg, registry=reg, model_id=MODEL)
    assert "serve_http=False" in str(e.value) and "ZMON_SERVER__LISTEN" in str(e.value)  # says how to fix it
    assert isinstance(e.value.__cause__, OSError)
    assert type(tiny_pipe) is original and "encode_prompt" not in vars(tiny_pipe)
    assert "zmon_" not in generate_latest(reg).decode()
    zmon.attach(tiny_pipe, Config(), registry=reg, serve_http=False).detach()  # attachable again


def test_attach_without_config_reads_the_environment(tiny_pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`zmon.attach(pipe)` takes ZMON_* overrides, as `zmon run` does; a bad one is a ConfigError naming it."""
    from zmon.config import ConfigError

    port = free_port()
    monkeypatch.setenv("ZMON_SERVER__LISTEN", f"127.0.0.1:{port}")
    handle = zmon.attach(tiny_pipe, model_id=MODEL)
    try:
        assert handle.url == f"http://127.0.0.1:{port}"
    finally:
        handle.detach()
    monkeypatch.setenv("ZMON_SERVER__LISTEN", "nowhere")
    with pytest.raises(ConfigError, match="ZMON_SERVER__LISTEN"):
        zmon.attach(tiny_pipe, model_id=MODEL)
    assert "encode_prompt" not in vars(tiny_pipe)


def test_example_host_service(tiny_cache_dir: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    port, zport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(root / "examples" / "host_service.py"),
            "--listen",
            f"127.0.0.1:{port}",
            "--zmon-listen",
            f"127.0.0.1:{zport}",
            "--cache-dir",
            str(tiny_cache_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_http(f"http://127.0.0.1:{zport}/healthz", timeout=120, proc=proc)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/generate",
            data=json.dumps({"prompt": "a red apple", "width": 64, "height": 64, "steps": 2}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.headers["Content-Type"] == "image/png"
            assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=b'{"width": 7}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=10)
        assert e.value.code == 400
        with urllib.request.urlopen(f"http://127.0.0.1:{zport}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert OK_LINE in text and DENOISE_LINE in text
    finally:
        proc.terminate()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stdout.read().decode() if proc.stdout else rc


@pytest.mark.parametrize("serve_http", [True, False])
def test_alerts_name_the_target_zmon_serves_or_none_it_invents(serve_http: bool) -> None:
    """Serving its own /metrics, zmon's alerts carry that target as `instance` and link to it; attached into
    a host's registry (serve_http=False) zmon knows no address of its own: host name, no zmon URLs."""
    import socket

    from zmon.app.attach import add_in_process_sources
    from zmon.app.monitor import Monitor

    port = free_port()
    cfg = Config.model_validate(
        {"server": {"listen": f"127.0.0.1:{port}"}, "alerting": {"alertmanager_urls": ["http://127.0.0.1:9"]}}
    )
    mon = Monitor(cfg.sampling, cfg.server, mode="attach", registry=CollectorRegistry(), serve_http=serve_http)
    parts = add_in_process_sources(mon, cfg)
    try:
        assert parts is not None
        if serve_http:
            assert parts.alerts.instance == f"127.0.0.1:{port}"
            assert parts.alerts.runbook_base_url == f"http://127.0.0.1:{port}/runbooks#runbook-"
        else:
            assert parts.alerts.instance == socket.gethostname()
            assert parts.alerts.generator_url is None and parts.alerts.runbook_base_url is None
        configured = cfg.alerting.model_copy(update={"instance": "svc-1:8000"})
        parts.reconfigure(mon, cfg.policy, configured)  # a reload: alerting.instance wins, URLs stay as they were
        assert parts.alerts.instance == "svc-1:8000"
        assert (parts.alerts.generator_url is None) is not serve_http
    finally:
        mon.stop()


def _between_calls(pipe: Any, work: Callable[[], None], n: int = 6) -> Any:
    """Attach, call the pipeline n times with `work` between the calls, and diagnose the live window."""
    handle = zmon.attach(pipe, Config(), registry=CollectorRegistry(), serve_http=False, model_id=MODEL)
    try:
        for i in range(n):
            generate(pipe, seed=i)
            work()
        assert handle.live is not None
        return handle.live.evaluate()
    finally:
        handle.detach()


def test_live_diagnosis_names_the_callers_own_work_between_calls(tiny_pipe: Any, torch_single_thread: None) -> None:
    """A host that decodes its next input on the generating thread between calls (CPU work the GPU waits for)."""

    def decode_next_input() -> None:
        until = time.process_time() + 0.3
        while time.process_time() < until:
            pass

    snap = _between_calls(tiny_pipe, decode_next_input)
    assert snap.facts.between.gaps == 5 and snap.facts.between.process_cores > 0.7
    assert snap.diagnosis.verdict == "cpu_bound"
    cpu = next(f for f in snap.diagnosis.findings if f.kind == "cpu_bound")
    assert cpu.active and "between pipeline calls" in (cpu.fix or "") and "producer thread" in (cpu.fix or "")


def test_live_diagnosis_tells_waiting_for_requests_from_work(tiny_pipe: Any, torch_single_thread: None) -> None:
    snap = _between_calls(tiny_pipe, lambda: time.sleep(0.3))  # the host waits for its next request
    assert snap.facts.between.gaps == 5 and snap.facts.between.process_cores < 0.3
    cpu = next(f for f in snap.diagnosis.findings if f.kind == "cpu_bound")
    assert "between pipeline calls" not in (cpu.fix or "")
    held = {e.name: e.holds for e in cpu.evidence if e.name}
    assert held["between_generations_idle_share_ratio"] and held["between_generations_process_cpu_cores"] is False
