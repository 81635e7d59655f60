"""`zmon watch` end to end: live /metrics is promtool-clean, Prometheus stores its series, torch never loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.services import get_json, prometheus, require_binary, zmon_process


def test_watch_never_imports_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from prometheus_client import generate_latest
        from zmon.app.watch import build_watch
        from zmon.config import Config
        mon = build_watch(Config(), serve_http=False)
        for name in mon.sampler.sources:
            mon.sampler.run_once(name)
        text = generate_latest(mon.registry).decode()
        mon.stop()
        assert "zmon_host_memory_total_bytes" in text, text[:500]
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        print("HEAVY=" + ",".join(heavy))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY=\n" in r.stdout, r.stdout


def test_watch_metrics_promtool_clean_and_scraped_by_prometheus(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    with zmon_process(["watch", "--pid", str(__import__("os").getpid())]) as (url, _proc):
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            body = r.read()
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
            lint.stdout.decode() + lint.stderr.decode()
        )
        text = body.decode()
        for family in (
            "zmon_build_info",
            "zmon_collector_success",
            "zmon_sample_age_seconds",
            "zmon_host_cpu_seconds_total",
            "zmon_process_resident_memory_bytes",
        ):
            assert family in text, family
        # no GPU here: NVML is reported unavailable, never fatal
        assert 'zmon_collector_available{collector="nvml"} 0.0' in text

        target = url.removeprefix("http://")
        cfg = (
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: zmon\n    static_configs:\n      - targets: ['{target}']\n"
        )
        with prometheus(tmp_path, cfg) as prom:
            deadline = time.monotonic() + 30
            series: list[object] = []
            while time.monotonic() < deadline:
                q = urllib.parse.urlencode({"query": 'zmon_host_memory_total_bytes{job="zmon"}'})
                series = get_json(f"{prom}/api/v1/query?{q}")["data"]["result"]
                if series:
                    break
                time.sleep(0.5)
            assert series, "Prometheus stored no zmon series"
            up = get_json(f"{prom}/api/v1/query?query=up")["data"]["result"]
            assert up and up[0]["value"][1] == "1"


def test_watch_bad_listen_address_fails_cleanly() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "zmon", "watch", "--listen", "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "server.listen" in r.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_watch_stops_on_signal(sig: str) -> None:
    import signal

    with zmon_process(["watch"]) as (_url, proc):
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(15) == 0
