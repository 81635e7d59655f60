"""`zmon run`: the generation loop (errors, OOM, pacing, stop, boundaries) and the CLI end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.services import require_binary, zmon_process
from zmon.app.monitor import Monitor
from zmon.app.run import RunSession, build_run
from zmon.collectors.generation import GenerationMetrics
from zmon.config import Config
from zmon.instrumentation.boundaries import Boundaries
from zmon.workload.spec import build_spec

TINY = {"resolution": (64, 64), "steps": 9, "guidance_scale": 0.0, "distilled": True}
T2I_STAGES = ("text_encode", "denoise", "vae_decode", "postprocess")


# --- the loop, with a fake pipeline ------------------------------------------------------------------------


@dataclass
class FakeInstrumentation:
    boundaries: Boundaries = field(default_factory=Boundaries)
    owner: Any = None
    removed: bool = False
    record_listeners: list[Any] = field(default_factory=list)  # as Instrumentation's (the status line's)

    def remove(self) -> None:
        self.removed = True


class FakePipe:
    """Raises the exceptions queued in `script` (None = succeed), then succeeds; records its calls."""

    def __init__(self, script: list[BaseException | None], boundaries: Boundaries) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []
        self.boundaries = boundaries

    def __call__(self, **kwargs: Any) -> Any:
        self.boundaries.started()
        try:
            self.calls.append(kwargs)
            exc = self.script.pop(0) if self.script else None
            if exc is not None:
                raise exc
            images = [Image.new("RGB", (kwargs["width"], kwargs["height"]))] * kwargs["num_images_per_prompt"]
            return type("Out", (), {"images": images})()
        finally:
            self.boundaries.finished()


@dataclass
class FakeLoaded:
    pipe: Any


def fake_session(script: list[BaseException | None], **workload: Any) -> tuple[RunSession, FakePipe]:
    cfg = Config.model_validate({"workload": workload})
    inst = FakeInstrumentation()
    pipe = FakePipe(script, inst.boundaries)
    mon = Monitor(cfg.sampling, cfg.server, mode="run", registry=CollectorRegistry(), serve_http=False)
    session = RunSession(mon, GenerationMetrics(), build_spec(cfg, TINY), FakeLoaded(pipe), inst)  # type: ignore[arg-type]
    return session, pipe


def test_loop_passes_the_workload_to_the_pipeline() -> None:
    session, pipe = fake_session([], resolutions=["64x64", "128x64"], seed=5, batch_size=2, steps=3)
    result = session.run(max_generations=3)
    assert (result.generations, result.ok, result.images, result.exit_code) == (3, 3, 6, 0)
    assert [(c["width"], c["height"]) for c in pipe.calls] == [(64, 64), (128, 64), (64, 64)]
    assert {c["num_inference_steps"] for c in pipe.calls} == {3}
    assert {c["num_images_per_prompt"] for c in pipe.calls} == {2}
    assert {c["guidance_scale"] for c in pipe.calls} == {0.0}
    assert [c["generator"].initial_seed() for c in pipe.calls] == [5, 6, 7]
    assert pipe.calls[0]["prompt"] == pipe.calls[1]["prompt"] != pipe.calls[2]["prompt"]
    session.close()
    assert session.instrumentation.removed


def test_every_one_of_the_first_three_failing_stops_with_exit_1() -> None:
    session, _ = fake_session([ValueError("boom")] * 10)
    result = session.run(max_generations=10)
    assert (result.generations, result.errors, result.broken_setup, result.exit_code) == (3, 3, True, 1)


def test_a_failing_generation_after_a_good_one_keeps_running() -> None:
    session, _ = fake_session([None, ValueError("a"), ValueError("b"), ValueError("c"), None])
    result = session.run(max_generations=5)
    assert (result.ok, result.errors, result.exit_code) == (2, 3, 0)


def test_a_single_failing_generation_is_a_broken_setup_when_it_is_all_there_is() -> None:
    session, _ = fake_session([ValueError("a")])
    assert session.run(max_generations=1).exit_code == 1


def test_out_of_memory_is_counted_and_the_run_goes_on() -> None:
    session, _ = fake_session([torch.OutOfMemoryError("CUDA out of memory")] * 4)
    result = session.run(max_generations=5)
    assert (result.oom, result.ok, result.errors, result.exit_code) == (4, 1, 0, 0)


def test_stop_event_ends_after_the_current_generation() -> None:
    session, pipe = fake_session([])
    stop = threading.Event()

    class StopAfterTwo:
        n = 0

        def generation_started(self) -> None:
            pass

        def generation_finished(self) -> None:
            self.n += 1
            if self.n == 2:
                stop.set()

    session.add_boundary_listener(StopAfterTwo())
    result = session.run(stop_event=stop)  # no limit: runs until stopped
    assert result.generations == 2 and result.stopped_early and len(pipe.calls) == 2


def test_rate_paces_generations() -> None:
    session, _ = fake_session([], rate_per_second=20)
    t0 = time.monotonic()
    session.run(max_generations=4)
    assert time.monotonic() - t0 >= 0.15  # 3 intervals of 50 ms


def test_output_dir_gets_every_image(tmp_path: Path) -> None:
    session, _ = fake_session([], output_dir=str(tmp_path / "out"), batch_size=2)
    session.run(max_generations=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gen-000000-0.png",
        "gen-000000-1.png",
        "gen-000001-0.png",
        "gen-000001-1.png",
    ]


# --- in process, with the real tiny pipeline ---------------------------------------------------------------


def test_build_run_in_process(tiny_cache_dir: Path, tmp_path: Path, torch_single_thread: None) -> None:
    cfg = Config.model_validate(
        {
            "model": {"cache_dir": str(tiny_cache_dir)},
            "workload": {"steps": 2, "jsonl": {"path": str(tmp_path / "gen.jsonl")}},
        }
    )
    reg = CollectorRegistry()
    session = build_run(cfg, registry=reg, serve_http=False)
    events: list[str] = []

    class Listener:
        def generation_started(self) -> None:
            events.append(f"start:{reg.get_sample_value('zmon_generation_in_progress')}")

        def generation_finished(self) -> None:
            events.append("end")

    session.add_boundary_listener(Listener())
    pipe = session.pipe
    try:
        result = session.run(max_generations=2)
    finally:
        session.close()
    assert result.ok == 2 and result.exit_code == 0
    assert events == ["start:1.0", "end"] * 2
    labels = {"model": "builtin:tiny-z-image", "resolution": "64x64", "device": "cpu"}
    assert reg.get_sample_value("zmon_denoise_steps_total", labels) == 4
    assert reg.get_sample_value("zmon_checkpoint_bytes", {"model": "builtin:tiny-z-image"}) > 0
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2
    assert type(pipe).__name__ == "ZImagePipeline" and "_zmon_stage_timing" not in vars(type(pipe))


# --- the CLI end to end ------------------------------------------------------------------------------------


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return str(r.read().decode())


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    }


def _wait_for_generations(url: str, n: int, proc: subprocess.Popen[bytes], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "zmon run exited before its metrics were read"
        text = _scrape(url)
        ok = sum(v for k, v in _samples(text, "zmon_generations_total").items() if ("status", "ok") in k)
        if ok >= n:
            return text
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {n} generations within {timeout}s")


def _stage_counts(text: str) -> dict[str, float]:
    return {dict(k)["stage"]: v for k, v in _samples(text, "zmon_stage_duration_seconds_count").items()}


ENV = {"OMP_NUM_THREADS": "1"}  # the tiny model gains nothing from intra-op threads on a shared 2-core box


def test_zmon_run_text_to_image_end_to_end(tiny_cache_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "zmon.yaml"
    config.write_text(
        f"model:\n  cache_dir: {tiny_cache_dir}\n"
        f"workload:\n  output_dir: {tmp_path / 'out'}\n  jsonl:\n    path: {tmp_path / 'gen.jsonl'}\n"
        "  prompt_cache:\n    enabled: true\n"
    )
    with zmon_process(
        ["run", "-c", str(config), "--max-generations", "3", "--linger", "120"], env=ENV, ready_timeout=120
    ) as (url, proc):
        text = _wait_for_generations(url, 3, proc)
        counts = _stage_counts(text)
        assert {s: counts.get(s) for s in T2I_STAGES} == dict.fromkeys(T2I_STAGES, 3.0), counts
        assert "vae_encode" not in counts
        for fam in (
            "zmon_denoise_step_duration_seconds_count",
            "zmon_images_total",
            "zmon_denoise_steps_total",
            "zmon_checkpoint_load_seconds",
            "zmon_pipeline_info",
            "zmon_prompt_cache_misses_total",
            "zmon_process_resident_memory_bytes",
        ):
            assert any(v > 0 for v in _samples(text, fam).values()), fam
        assert _samples(text, "zmon_jsonl_write_failures_total") == {(): 0.0}
        assert _samples(text, "zmon_workload_misconfiguration")[(("kind", "cfg_on_distilled"),)] == 0

        promtool = require_binary("promtool")
        body = _scrape(url).encode()
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
            lint.stdout.decode() + lint.stderr.decode()
        )
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    records = [json.loads(ln) for ln in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    assert all(r["stage_seconds"]["vae_encode"] is None for r in records)
    assert all(r["stage_seconds"]["denoise"] > 0 for r in records)


def test_zmon_run_img2img_shows_vae_encode_and_exits_0(tiny_cache_dir: Path, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(init)
    config = tmp_path / "zmon.yaml"
    config.write_text(
        f"model:\n  cache_dir: {tiny_cache_dir}\nworkload:\n  init_images: ['{init}']\n  steps: 4\n  strength: 0.5\n"
    )
    with zmon_process(
        ["run", "-c", str(config), "--max-generations", "2", "--linger", "3"], env=ENV, ready_timeout=120
    ) as (url, proc):
        text = _wait_for_generations(url, 2, proc)
        counts = _stage_counts(text)
        assert {s: counts.get(s) for s in ("vae_encode", *T2I_STAGES)} == dict.fromkeys(
            ("vae_encode", *T2I_STAGES), 2.0
        ), counts
        info = _samples(text, "zmon_pipeline_info")
        assert any(("pipeline_class", "ZImageImg2ImgPipeline") in k for k in info), info
        assert proc.wait(60) == 0  # exits by itself once the linger is over
