"""Per-generation JSONL: contents, rotation, untorn lines under threads, failures counted but never raised."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from zmon.instrumentation.jsonl import JsonlLog, record_to_dict
from zmon.instrumentation.records import GenerationRecord, StageTiming


def record(**kw: Any) -> GenerationRecord:
    stages = (
        StageTiming("text_encode", 0.020, 0.0),
        StageTiming("denoise_step", 0.100, 0.02, index=0),
        StageTiming("denoise_step", 0.110, 0.12, index=1),
        StageTiming("vae_decode", 0.030, 0.23),
        StageTiming("postprocess", 0.005, 0.26),
    )
    base: dict[str, Any] = dict(
        started_at=1_764_000_000.25,
        total_seconds=0.27,
        stages=stages,
        steps=2,
        width=64,
        height=64,
        prompt_chars=17,
        guidance_scale=0.0,
        cfg_active=False,
        device="cpu",
        prompt_cache_hit=True,
    )
    base.update(kw)
    return GenerationRecord(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_record_fields() -> None:
    d = record_to_dict(record(peak_allocated_bytes=123, peak_reserved_bytes=456), model="m")
    assert d["timestamp"] == "2025-11-24T16:00:00.250Z"
    assert dt.datetime.fromisoformat(d["timestamp"].replace("Z", "+00:00")).timestamp() == d["unix"]
    assert d["stage_seconds"] == {
        "text_encode": 0.02,
        "vae_encode": None,
        "denoise": pytest.approx(0.21),
        "vae_decode": 0.03,
        "postprocess": 0.005,
    }
    assert d["step_seconds"] == [0.1, 0.11]
    assert {
        k: d[k]
        for k in (
            "status",
            "model",
            "device",
            "steps",
            "width",
            "height",
            "batch_size",
            "prompt_chars",
            "guidance_scale",
            "cfg",
            "prompt_cache_hit",
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "total_seconds",
        )
    } == {
        "status": "ok",
        "model": "m",
        "device": "cpu",
        "steps": 2,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "prompt_chars": 17,
        "guidance_scale": 0.0,
        "cfg": False,
        "prompt_cache_hit": True,
        "peak_allocated_bytes": 123,
        "peak_reserved_bytes": 456,
        "total_seconds": 0.27,
    }


def test_error_text_is_reduced_to_its_type() -> None:
    # An exception message may quote the prompt: only its type is logged.
    d = record_to_dict(record(status="error", error="ValueError: bad prompt 'a secret castle'"), model="m")
    assert d["error"] == "ValueError" and "secret" not in json.dumps(d)
    assert (
        record_to_dict(record(status="oom", error="OutOfMemoryError: CUDA out of memory"), model="m")["error"]
        == "OutOfMemoryError"
    )


def test_appends_one_line_per_generation(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "gen.jsonl")
    for i in range(3):
        assert log.write(record(steps=i + 1), model="m")
    log.close()
    got = lines(tmp_path / "gen.jsonl")
    assert [g["steps"] for g in got] == [1, 2, 3]
    assert log.failures == 0 and log.lines_written == 3


def test_rotation_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    one = len(json.dumps(record_to_dict(record(), model="m"), separators=(",", ":"))) + 1
    log = JsonlLog(path, max_bytes=one * 2 + 10, backups=2)  # two lines per file
    for i in range(9):
        assert log.write(record(steps=i), model="m")
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "gen.jsonl.1", "gen.jsonl.2"]
    assert [g["steps"] for g in lines(path)] == [8]
    assert [g["steps"] for g in lines(path.with_name("gen.jsonl.1"))] == [6, 7]
    assert [g["steps"] for g in lines(path.with_name("gen.jsonl.2"))] == [4, 5]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= one * 2 + 10


def test_rotation_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    log = JsonlLog(path, max_bytes=1000, backups=0)
    for i in range(12):
        log.write(record(steps=i), model="m")
    assert [p.name for p in tmp_path.iterdir()] == ["gen.jsonl"]
    assert path.stat().st_size <= 1000 and lines(path)[-1]["steps"] == 11


def test_lines_are_never_torn_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    logs = [JsonlLog(path), JsonlLog(path)]  # two writers on one file, as two processes would be

    def worker(n: int) -> None:
        for i in range(100):
            logs[n % 2].write(record(steps=n * 1000 + i), model="m")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = lines(path)
    assert len(got) == 400 and len({g["steps"] for g in got}) == 400


def test_a_writer_follows_the_file_another_writer_rotated(tmp_path: Path) -> None:
    """Two logs on one path (two processes of a host service): when one rotates, the other's next line goes
    to the new file, not into the backup it still holds open, and it does not rotate that backup again."""
    path = tmp_path / "gen.jsonl"
    one = len(json.dumps(record_to_dict(record(), model="m"), separators=(",", ":"))) + 1
    a, b = JsonlLog(path, max_bytes=one * 3 + 10, backups=3), JsonlLog(path, max_bytes=one * 3 + 10, backups=3)
    assert a.write(record(steps=1), model="m") and b.write(record(steps=2), model="m")
    assert a.write(record(steps=3), model="m") and a.write(record(steps=4), model="m")  # a rotates: 1,2,3 → .1
    assert b.write(record(steps=5), model="m")
    a.close()
    b.close()
    assert [g["steps"] for g in lines(path.with_name("gen.jsonl.1"))] == [1, 2, 3]
    assert [g["steps"] for g in lines(path)] == [4, 5]
    assert not path.with_name("gen.jsonl.2").exists()


def _write_many(path: str, writer: int, n: int, max_bytes: int) -> None:
    log = JsonlLog(path, max_bytes=max_bytes, backups=200)
    for i in range(n):
        assert log.write(record(steps=writer * 10_000 + i), model="m")
    log.close()


def test_processes_sharing_a_rotating_file_lose_no_line(tmp_path: Path) -> None:
    """Three processes append to one file that rotates every few lines: every line lands whole, once, and no
    file grows past max_bytes (rotation and appends are serialised by the file lock)."""
    path = tmp_path / "gen.jsonl"
    one = len(json.dumps(record_to_dict(record(steps=10_000), model="m"), separators=(",", ":"))) + 1
    max_bytes = one * 5 + 10
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), w, 150, max_bytes)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = sorted(tmp_path.iterdir())
    got = [g["steps"] for f in files for g in lines(f)]
    assert sorted(got) == sorted(w * 10_000 + i for w in range(3) for i in range(150))
    assert all(f.stat().st_size <= max_bytes for f in files)


@pytest.mark.parametrize("case", ["directory", "missing_dir", "disk_full"])
def test_write_failures_are_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    if case == "directory":
        path = tmp_path
    elif case == "missing_dir":
        path = tmp_path / "nope" / "gen.jsonl"
    else:
        assert os.path.exists("/dev/full"), "Linux provides /dev/full"
        path = Path("/dev/full")
    log = JsonlLog(path)
    with caplog.at_level(logging.WARNING, logger="zmon.instrumentation.jsonl"):
        results = [log.write(record(), model="m") for _ in range(3)]
    assert results == [False, False, False]
    assert log.failures == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


def test_recovers_after_the_directory_appears(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "later" / "gen.jsonl"
    log = JsonlLog(path)
    with caplog.at_level(logging.INFO, logger="zmon.instrumentation.jsonl"):
        assert not log.write(record(), model="m")
        path.parent.mkdir()
        assert log.write(record(), model="m")
    assert log.failures == 1 and len(lines(path)) == 1
    assert any("writable again" in r.getMessage() for r in caplog.records)
    # a new streak is logged again
    path.unlink()
    path.parent.rmdir()
    log.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zmon.instrumentation.jsonl"):
        log.write(record(), model="m")
        log.write(record(), model="m")
    assert log.failures == 3 and len(caplog.records) == 1


def test_failing_log_never_stops_a_generation(tiny_pipe: Any, tmp_path: Path, torch_single_thread: None) -> None:
    from prometheus_client import CollectorRegistry

    from zmon.app.instrument import Instrumentation
    from zmon.collectors.generation import GenerationMetrics
    from zmon.config import Config

    cfg = Config.model_validate({"workload": {"jsonl": {"path": str(tmp_path)}}})  # a directory: unwritable
    metrics = GenerationMetrics(model="tiny")
    reg = CollectorRegistry()
    reg.register(metrics)  # type: ignore[arg-type]
    inst = Instrumentation(tiny_pipe, cfg.workload, metrics, model_id="tiny")
    try:
        out = tiny_pipe("a cat", width=64, height=64, num_inference_steps=2, guidance_scale=0.0)
    finally:
        inst.remove()
    assert len(out.images) == 1
    assert reg.get_sample_value("zmon_jsonl_write_failures_total") == 1.0
    labels = {"status": "ok", "model": "tiny", "resolution": "64x64", "device": "cpu"}
    assert reg.get_sample_value("zmon_generations_total", labels) == 1.0
