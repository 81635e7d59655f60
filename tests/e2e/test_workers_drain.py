"""`zmon run` with two CPU workers (model.devices: cpu:2), as a subprocess: SIGHUP reloads what the parent runs
and keeps what the workers run for a restart, a broken file changes nothing; SIGTERM to the parent drains them —
each worker finishes the generation it is in, nothing is killed — and the parent exits 0; devices that do not
exist here are a usage error (exit 2)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.services import free_port, wait_http


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)


def test_sigterm_drains_every_worker_and_exits_0(tiny_cache_dir: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "gen.jsonl"
    cfg = tmp_path / "zmon.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"devices": "cpu:2", "cpu_threads": 1, "cache_dir": str(tiny_cache_dir)},
                # ~30 denoise steps: a generation long enough that a signal lands inside one
                "workload": {"steps": 30, "jsonl": {"path": str(jsonl)}},
                "sampling": {"nvml": {"enabled": False}},
            }
        )
    )
    port = free_port()
    log = tmp_path / "zmon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zmon", "run", "-c", str(cfg), "--listen", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the SIGHUP below goes to the parent and the workers
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, proc=proc)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # both workers generating
                lines = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []
                if {r["device"] for r in lines} == {"cpu:0", "cpu:1"}:
                    break
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            assert 'zmon_worker_up{device="cpu:0"} 1.0' in metrics and 'zmon_worker_up{device="cpu:1"} 1.0' in metrics
            # SIGHUP: what the parent runs applies live; what the workers run waits for a restart.
            good = yaml.safe_load(cfg.read_text())
            good["sampling"]["host"] = {"interval_seconds": 0.5}  # the parent's source: live
            good["policy"] = {"dry_run": True}  # the workers' policy: after a restart
            cfg.write_text(yaml.safe_dump(good))
            os.killpg(proc.pid, signal.SIGHUP)  # to the whole group, as a closed terminal would: workers ignore it
            wait_log(log, "configuration reloaded", proc)
            metrics = scrape(port)
            assert "zmon_config_last_reload_successful 1.0" in metrics
            assert "zmon_config_restart_required 1.0" in metrics
            text = log.read_text()
            assert "sampling.host.interval_seconds" in text and "needs a restart" in text and "policy.dry_run" in text
            # a broken file changes nothing: the parent and both workers run on
            cfg.write_text(yaml.safe_dump({**good, "sampling": {"host": {"interval_seconds": -1}}}))
            proc.send_signal(signal.SIGHUP)
            wait_log(log, "configuration reload failed", proc)
            metrics = scrape(port)
            assert "zmon_config_last_reload_successful 0.0" in metrics
            assert 'zmon_worker_up{device="cpu:0"} 1.0' in metrics and 'zmon_worker_up{device="cpu:1"} 1.0' in metrics
            assert "ended (" not in log.read_text()  # no worker died of the group's SIGHUP
            signalled_at = time.time()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "draining 2 worker(s)" in text and "killing it" not in text and "Traceback" not in text

    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert records and all(r["status"] == "ok" for r in records)
    # each worker's runner reports the generations it completed: together, exactly the records written
    done = [int(m) for m in re.findall(r"\] zmon\.workload\.runner: (\d+) generation\(s\) in", text)]
    assert len(done) == 2 and sum(done) == len(records), (done, len(records))
    # the generations in flight at the signal were finished, not cut
    assert any(r["unix"] + r["total_seconds"] > signalled_at for r in records)


def test_auto_devices_without_cuda_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "zmon.yaml"
    cfg.write_text("model: {devices: auto}\n")
    run = subprocess.run(
        [sys.executable, "-m", "zmon", "run", "-c", str(cfg), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "found no CUDA device" in run.stderr
