"""A healthy start is quiet and shows progress: `zmon run` on the embedded model (built from scratch) and a host
service calling `zmon.attach(pipe)` log no WARNING and nothing from third-party loggers (APScheduler,
diffusers, transformers, accelerate), no progress bars, no stray lines — while `zmon run` reports the model
build, the load and a periodic status line. Both run as subprocesses on a CPU-only host, side by side."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import yaml

from tests.services import free_port, wait_http
from zmon.providers.base import nvidia_devices_present

RUN_SECONDS = 30.0  # long enough for many sampler ticks of every source and three status lines
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<msg>.*)$")

HOST = textwrap.dedent('''
    """A host service as a user writes one: its own logging at INFO, its own pipeline, then zmon.attach."""
    import logging, sys, time

    import torch
    from diffusers import DiffusionPipeline

    import zmon

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("host")
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    log.info("ATTACH")
    handle = zmon.attach(pipe)  # no config: defaults + ZMON_* overrides (the test sets the listen address)
    deadline = time.monotonic() + float(sys.argv[2])
    n = 0
    while time.monotonic() < deadline:
        pipe("a red fox", width=64, height=64, num_inference_steps=2, guidance_scale=0.0,
             generator=torch.Generator("cpu").manual_seed(n))
        n += 1
        time.sleep(0.2)
    handle.detach()
    log.info("DONE %d generations", n)
''')


def _problems(lines: list[str], allowed_loggers: tuple[str, ...]) -> list[str]:
    """Lines that are not INFO/DEBUG log records of zmon (or of the allowed host loggers)."""
    bad = []
    for line in lines:
        m = LINE.match(line)
        if m is None:
            bad.append(f"not a log record: {line!r}")
        elif m["level"] not in ("INFO", "DEBUG"):
            bad.append(f"{m['level']}: {line}")
        elif not m["logger"].startswith(allowed_loggers):
            bad.append(f"third-party logger {m['logger']}: {line}")
    return bad


def test_healthy_run_and_attach_are_quiet_and_show_progress(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ZMON_SERVER__LISTEN", None)
    cfg = tmp_path / "zmon.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"cache_dir": str(tmp_path / "fresh-cache")},  # the embedded model is built in this run
                "workload": {"rate_per_second": 4},
                "logging": {"status_interval_seconds": 8},
            }
        )
    )
    run_port, attach_port = free_port(), free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "zmon", "run", "--config", str(cfg), "--listen", f"127.0.0.1:{run_port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    script = tmp_path / "host.py"
    script.write_text(HOST)
    host = subprocess.Popen(
        [sys.executable, str(script), str(tiny_model_dir), str(RUN_SECONDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "ZMON_SERVER__LISTEN": f"127.0.0.1:{attach_port}"},
    )
    try:
        wait_http(f"http://127.0.0.1:{run_port}/metrics", timeout=60)
        started = time.monotonic()
        wait_http(f"http://127.0.0.1:{attach_port}/metrics", timeout=90)
        with urllib.request.urlopen(f"http://127.0.0.1:{attach_port}/metrics", timeout=10) as r:
            metrics = r.read()
        if not nvidia_devices_present():  # an absent GPU is still exported as unavailable
            assert b'zmon_collector_available{collector="nvml"} 0.0' in metrics
        host_out, _ = host.communicate(timeout=RUN_SECONDS + 90)
        time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))
    finally:
        run.terminate()
        run_out, _ = run.communicate(timeout=60)
        if host.poll() is None:
            host.kill()
            host.communicate()

    run_lines = run_out.splitlines()
    assert run.returncode == 0, run_out[-3000:]
    assert not _problems(run_lines, ("zmon",)), "\n".join(_problems(run_lines, ("zmon",)))
    text = "\n".join(run_lines)
    if not nvidia_devices_present():  # a CPU host: NVML and CUDA are absent, said at INFO with the reason
        assert "unavailable" in text and "no NVIDIA GPU on this host" in text
    assert re.search(r"INFO zmon\.workload\.tiny: built the embedded tiny Z-Image pipeline in \d", text), text
    assert re.search(r"INFO zmon\.app\.run: loaded builtin:tiny-z-image .* in \d+\.\d\ds", text), text
    statuses = [line for line in run_lines if "zmon.app.run: status: " in line]
    assert len(statuses) >= 2, text
    assert re.search(r"status: \d+ generations \(0 failed.*images/s and p50 \d", statuses[-1]), statuses[-1]

    host_lines = host_out.splitlines()
    assert host.returncode == 0, host_out[-3000:]
    marker = next(i for i, line in enumerate(host_lines) if line.endswith("host: ATTACH"))
    after = host_lines[marker + 1 :]
    problems = _problems(after, ("zmon", "host"))
    assert not problems, "\n".join(problems)
    assert any("zmon attached to" in line for line in after)
    assert re.search(r"host: DONE [1-9]\d* generations$", after[-1]), after[-1]
