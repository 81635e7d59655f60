"""Data-parallel workers on CPU (`model.devices: cpu:2`, the embedded tiny Z-Image): the supervisor restarts a
crashed and a hung worker with backoff, each workload item is generated exactly once, and the parent's merged
/metrics has every worker's series once, promtool clean."""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from tests.integration import worker_faults
from tests.services import require_binary
from zmon.app.profile import profile_main
from zmon.app.workers.parent import WorkerParent
from zmon.app.workers.protocol import Record
from zmon.app.workers.supervisor import Supervisor, plan_devices
from zmon.config import Config, load_config
from zmon.exitcodes import EXIT_FAILURE
from zmon.instrumentation.records import GenerationRecord

ITEMS = 8


def worker_config(cache_dir: Path, **workers: Any) -> Config:
    return load_config(
        overrides={
            "model": {"devices": "cpu:2", "cpu_threads": 1, "cache_dir": str(cache_dir), "workers": workers},
            "workload": {"max_generations": ITEMS, "steps": 2},
            "sampling": {"nvml": {"enabled": False}, "disk": {"enabled": False}, "network": {"enabled": False}},
        },
        environ={},
    )


def series(text: str) -> list[str]:
    """Every sample line's name and labels (comments and values left out)."""
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]


def test_crash_and_hang_are_restarted_and_metrics_merge(tiny_cache_dir: Path) -> None:
    cfg = worker_config(
        tiny_cache_dir, heartbeat_timeout_seconds=4.0, restart_backoff_seconds=0.2, start_timeout_seconds=120.0
    )
    registry = CollectorRegistry(auto_describe=False)
    parent = WorkerParent(cfg, plan_devices("cpu:2"), registry=registry, serve_http=False)
    items: list[tuple[str, int, GenerationRecord]] = []
    parent.merge.raw_listeners.append(lambda w, m, r: items.append((w, m.item, r)))
    sup = parent.supervise(ITEMS, entry=worker_faults.crash_once_and_hang_once)
    parent.monitor.start()
    try:
        result = sup.run(threading.Event())
        text = generate_latest(registry).decode()
    finally:
        parent.monitor.stop()

    assert result.outcomes == {"cpu:0": "done", "cpu:1": "done"} and result.exit_code == 0
    assert result.restarts["cpu:0"] == {"exit": 1, "hang": 0, "start_timeout": 0}
    assert result.restarts["cpu:1"] == {"exit": 0, "hang": 1, "start_timeout": 0}
    # every item exactly once, by its round-robin owner; the crashed and the hung one were redone
    ok = Counter(i for _, i, r in items if r.status == "ok")
    assert sorted(ok) == list(range(ITEMS)) and set(ok.values()) == {1}
    assert all(w == f"cpu:{i % 2}" for w, i, _ in items)
    assert {r.device for _, _, r in items} == {"cpu:0", "cpu:1"}  # relabelled: "cpu" twice would merge them

    lines = series(text)
    duplicates = [s for s, n in Counter(lines).items() if n > 1]
    assert not duplicates, duplicates
    assert 'zmon_worker_restarts_total{device="cpu:0",reason="exit"}' in lines
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values['zmon_worker_restarts_total{device="cpu:0",reason="exit"}']) == 1.0
    assert float(values['zmon_worker_restarts_total{device="cpu:1",reason="hang"}']) == 1.0
    generated = sum(
        float(v) for k, v in values.items() if k.startswith("zmon_generations_total") and 'status="ok"' in k
    )
    assert generated == ITEMS
    assert float(values["zmon_generation_in_progress"]) == 0.0  # the killed workers' calls were closed with them
    assert re.search(r'^zmon_images_total\{device="cpu:1",', text, re.M)
    assert 'zmon_pipeline_info{compiled="false",device="cpu:0,cpu:1"' in text
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_restarts_are_bounded_with_backoff(tiny_cache_dir: Path) -> None:
    cfg = worker_config(tiny_cache_dir, max_restarts=2, restart_backoff_seconds=0.5)
    events: list[tuple[str, float]] = []
    sup = Supervisor(cfg, plan_devices("cpu:1"), _Sink(), limit=ITEMS, entry=worker_faults.exit_at_once)
    spawn, ended = sup._spawn, sup._ended

    def timed_spawn(w: Any) -> None:
        events.append(("spawn", time.monotonic()))
        spawn(w)

    def timed_ended(w: Any, now: float) -> None:
        events.append(("ended", time.monotonic()))
        ended(w, now)

    sup._spawn, sup._ended = timed_spawn, timed_ended  # type: ignore[method-assign]
    result = sup.run(threading.Event())
    assert result.outcomes == {"cpu:0": "given_up"} and result.exit_code == EXIT_FAILURE
    assert result.restarts["cpu:0"]["exit"] == 2
    assert [e for e, _ in events] == ["spawn", "ended", "spawn", "ended", "spawn", "ended"]
    waits = [events[i + 1][1] - events[i][1] for i in (1, 3)]  # from an exit to the next start
    assert waits[0] >= 0.5 and waits[1] >= 1.0 and waits[1] > waits[0], waits  # 0.5 s, then doubled


def test_a_worker_that_never_gets_ready_is_given_up(tiny_cache_dir: Path) -> None:
    cfg = worker_config(tiny_cache_dir, max_restarts=1, restart_backoff_seconds=0.1, start_timeout_seconds=1.0)
    sup = Supervisor(cfg, plan_devices("cpu:1"), _Sink(), limit=ITEMS, entry=worker_faults.never_ready)
    result = sup.run(threading.Event())
    assert result.outcomes == {"cpu:0": "given_up"}
    assert result.restarts["cpu:0"] == {"exit": 0, "hang": 0, "start_timeout": 1}


def test_a_stop_during_loading_does_not_wait_for_the_load(tiny_cache_dir: Path) -> None:
    cfg = worker_config(tiny_cache_dir, drain_timeout_seconds=600.0)
    sup = Supervisor(cfg, plan_devices("cpu:1"), _Sink(), limit=ITEMS, entry=worker_faults.never_ready)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    result = sup.run(stop)
    assert result.stopped and result.exit_code == 0 and result.outcomes == {"cpu:0": "stopped"}
    assert time.monotonic() - t0 < 30  # not the drain timeout: a loading worker has no generation to finish


class _Sink:
    def ready(self, worker: str, message: Any) -> None:
        raise AssertionError("no worker of these tests gets ready")

    def record(self, worker: str, message: Record) -> None:
        raise AssertionError("no worker of these tests generates")

    def message(self, worker: str, message: object) -> None:
        pass

    def down(self, worker: str) -> None:
        pass


def test_profile_over_two_workers_reports_their_scaling(tiny_cache_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        overrides={
            "model": {"devices": "cpu:2", "cpu_threads": 1, "cache_dir": str(tiny_cache_dir)},
            "workload": {"steps": 2},
            "profiling": {"runs": 4, "warmup": 1, "disk_test_bytes": 0, "formats": ["json", "md"]},
            "sampling": {"nvml": {"enabled": False}},
        },
        environ={},
    )
    out, err = io.StringIO(), io.StringIO()
    assert profile_main(cfg, out_dir=tmp_path, stdout=out, stderr=err) == 0, err.getvalue()
    doc = json.loads((tmp_path / "profile.json").read_text())
    facts = doc["facts"]
    mg = facts["multi_gpu"]
    assert mg["gpu_count"] == 2 and mg["speedup_vs_single"] is not None and mg["nccl_time_share"] is None
    assert facts["baseline"]["generations"] == 4 and facts["baseline"]["warmup"] == 2  # one warm-up per worker
    assert "## Multi-GPU" in out.getvalue() and "scaling efficiency" in out.getvalue()
    assert "scaling efficiency" in err.getvalue()
