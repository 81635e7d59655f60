"""torch.profiler traces: `zmon profile --trace` pieces and the daemon's authenticated POST/GET /trace."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from zmon.app.instrument import Instrumentation
from zmon.app.monitor import Monitor
from zmon.app.parts import add_trace_endpoint
from zmon.capture.trace import (
    MemorySnapshotUnavailable,
    TraceBusy,
    TraceController,
    capture_memory_snapshot,
    capture_trace,
)
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config, TraceConfig
from zmon.instrumentation.boundaries import Boundaries

TOKEN = "s3cret-token"


# ------------------------------------------------------------------------------------------------ pieces


def test_capture_trace_writes_chrome_and_tensorboard(tmp_path: Path) -> None:
    def work(k: int) -> None:
        with torch.profiler.record_function("zmon/denoise_step"):
            torch.ones(8, 8) @ torch.ones(8, 8)

    out = capture_trace(work, 2, tmp_path / "t", cuda=False)
    events = json.loads(out.chrome_trace.read_text())["traceEvents"]
    assert sum(e.get("name") == "zmon/denoise_step" for e in events) == 2
    tb = list(out.tensorboard_dir.glob("*.pt.trace.json"))
    assert len(tb) == 1 and tb[0].read_bytes() == out.chrome_trace.read_bytes()


def test_memory_snapshot_needs_cuda(tmp_path: Path) -> None:
    calls: list[int] = []
    with pytest.raises(MemorySnapshotUnavailable, match="needs CUDA"):
        capture_memory_snapshot(calls.append, 2, tmp_path / "m.pickle", max_entries=10, device="cpu")
    assert calls == [] and not (tmp_path / "m.pickle").exists()


class FakeProfiler:
    def __init__(self, activities: list[Any], log: list[str]) -> None:
        self.activities = activities
        self.log = log

    def start(self) -> None:
        self.log.append("start")

    def stop(self) -> None:
        self.log.append("stop")

    def export_chrome_trace(self, path: str) -> None:
        self.log.append("export")
        Path(path).write_text('{"traceEvents": []}')


def fake_controller(tmp_path: Path, log: list[str], **kw: Any) -> TraceController:
    return TraceController(
        tmp_path / "traces", 5, cuda=False, profiler_factory=lambda acts: FakeProfiler(acts, log), **kw
    )


def test_controller_captures_exactly_the_next_n_generations(tmp_path: Path) -> None:
    log: list[str] = []
    c = fake_controller(tmp_path, log)
    c.generation_started()
    c.generation_finished()  # idle: nothing happens
    path = c.request(2)
    assert c.status()["state"] == "armed" and path.parent == tmp_path / "traces"
    with pytest.raises(TraceBusy):
        c.request(1)
    for _ in range(3):
        c.generation_started()
        c.generation_finished()
        log.append("gen")
    assert log == ["start", "gen", "stop", "export", "gen", "gen"]
    st = c.status()
    assert st["state"] == "done" and st["captured_generations"] == 2 and st["last_path"] == str(path)
    assert path.is_file()
    assert c.request(1) != path  # a new capture may be armed once done


@pytest.mark.parametrize("bad", [0, 6, -1, "2", 1.5, True, None])
def test_controller_rejects_bad_counts(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="generations must"):
        fake_controller(tmp_path, []).request(bad)


def test_controller_failures_and_close(tmp_path: Path) -> None:
    log: list[str] = []

    def broken(acts: list[Any]) -> Any:
        raise RuntimeError("no kineto")

    c = TraceController(tmp_path, 3, cuda=False, profiler_factory=broken)
    c.request(1)
    c.generation_started()
    assert c.status()["state"] == "failed" and "no kineto" in c.status()["error"]
    c = fake_controller(tmp_path, log)
    c.request(3)
    c.generation_started()
    c.close()
    assert log == ["start", "stop"] and c.status()["state"] == "failed"


# ------------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def daemon(
    tiny_pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[str, TraceController, Instrumentation]]:
    """A run-mode monitor serving /trace over the instrumented tiny pipeline; the token per the test."""
    token = getattr(request, "param", TOKEN)
    if token:
        monkeypatch.setenv("ZMON_AUTH_TOKEN", token)
    else:
        monkeypatch.delenv("ZMON_AUTH_TOKEN", raising=False)
    cfg = Config.model_validate(
        {
            "server": {"listen": "127.0.0.1:0"},
            "profiling": {"trace": {"enabled": True, "directory": str(tmp_path / "traces")}},
        }
    )
    mon = Monitor(cfg.sampling, cfg.server, mode="run", registry=CollectorRegistry(auto_describe=False))
    inst = Instrumentation(tiny_pipe, cfg.workload, GenerationMetrics(model="tiny"), model_id="tiny")
    controller = add_trace_endpoint(
        mon, cfg.profiling.trace, boundaries=inst.boundaries, stage_timing=inst.stage_timing
    )
    assert controller is not None
    mon.start()
    try:
        assert mon.server is not None
        yield f"http://127.0.0.1:{mon.server.port}/trace", controller, inst
    finally:
        mon.stop()
        inst.remove()


def call(url: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("daemon", [""], indirect=True)
def test_trace_endpoint_is_forbidden_without_a_configured_token(daemon: Any) -> None:
    url, _, _ = daemon
    code, body = call(url, b'{"generations": 1}')
    assert code == 403 and "server.auth" in body["error"]


def test_trace_endpoint_auth_validation_and_capture(daemon: Any, torch_single_thread: None) -> None:
    url, controller, inst = daemon
    assert call(url, b'{"generations": 1}', token="wrong")[0] == 401
    assert call(url, b'{"generations": 1}', token=None)[0] == 401
    for body, reason in (
        (b"{nope", "not valid JSON"),
        (b'{"generations": 0}', "1..20"),
        (b'{"generations": 21}', "1..20"),
        (b'{"generations": "2"}', "integer"),
        (b'{"generations": 2, "x": 1}', "unknown key"),
        (b"[2]", "JSON object"),
    ):
        code, answer = call(url, body)
        assert code == 400 and reason in answer["error"], (body, answer)
    assert controller.status()["state"] == "idle"

    code, answer = call(url, b'{"generations": 2}')
    assert code == 202 and answer["generations"] == 2
    path = Path(answer["path"])
    assert call(url, b'{"generations": 1}')[0] == 409
    pipe = inst.pipe
    for i in range(2):
        assert not path.exists()
        pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(i))
    code, status = call(url)
    assert code == 200 and status["state"] == "done" and status["last_path"] == str(path)
    names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
    assert {"zmon/denoise_step", "zmon/generation", "zmon/text_encode"} <= names
    assert inst.stage_timing is not None and inst.stage_timing.nvtx is False  # ranges back off after the capture


def test_trace_endpoint_is_absent_unless_enabled() -> None:
    cfg = Config()
    mon = Monitor(
        cfg.sampling, cfg.server, mode="run", registry=CollectorRegistry(auto_describe=False), serve_http=False
    )
    assert add_trace_endpoint(mon, TraceConfig(), boundaries=Boundaries(), stage_timing=None) is None
