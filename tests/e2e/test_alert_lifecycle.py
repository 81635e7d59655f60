"""zmon's own alerts in a real Alertmanager next to a real Prometheus: the `instance` label is the one Prometheus
gives the scraped target, so the shipped inhibit rule (deploy/docker/alertmanager.yml) silences the rule-based
twin of a zmon alert; and the alerts zmon fired are resolved when it stops (alerting.resolve_on_shutdown)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.services import alertmanager, get_json, prometheus, zmon_process

ROOT = Path(__file__).resolve().parents[2]
ALERT = "ZmonTestAlways"


def _am_config() -> str:
    shipped = yaml.safe_load((ROOT / "deploy" / "docker" / "alertmanager.yml").read_text())
    return yaml.safe_dump(
        {
            "route": {"receiver": "null", "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "null"}],
            "inhibit_rules": shipped["inhibit_rules"],
        }
    )


def _zmon_config(tmp_path: Path, am: str) -> Path:
    p = tmp_path / "zmon.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "model": {"cpu_threads": 1, "cache_dir": str(Path.home() / ".cache" / "zmon")},
                "workload": {"steps": 2, "resolutions": ["64x64"], "rate_per_second": 2},
                "sampling": {"host": {"interval_seconds": 0.5}},
                "policy": {
                    "rules": {
                        "test_always": {
                            "metric": "host_memory_available_ratio",
                            "op": ">=",
                            "threshold": 0.0,
                            "for_samples": 1,
                            "actions": ["alert"],
                            "alertname": ALERT,
                            "severity": "info",
                            "summary": "always (a test)",
                        }
                    }
                },
                "alerting": {"alertmanager_urls": [am], "resend_seconds": 2},
            }
        )
    )
    return p


def _wait(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _alerts(am: str) -> list[dict[str, Any]]:
    return [a for a in get_json(am + "/api/v2/alerts") if a["labels"].get("alertname") == ALERT]


def test_instance_matches_prometheus_and_alerts_resolve_on_shutdown(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        am = stack.enter_context(alertmanager(tmp_path, _am_config()))
        url, proc = stack.enter_context(
            zmon_process(["run", "--config", str(_zmon_config(tmp_path, am))], ready_timeout=120)
        )
        target = url.removeprefix("http://")
        rules = {
            "groups": [
                {
                    "name": "t",
                    "rules": [
                        {"alert": ALERT, "expr": 'zmon_build_info{job="zmon"} == 1', "labels": {"severity": "info"}}
                    ],
                }
            ]
        }
        prom_cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am.removeprefix("http://")]}]}]},
            "scrape_configs": [{"job_name": "zmon", "static_configs": [{"targets": [target]}]}],
        }
        with prometheus(tmp_path, yaml.safe_dump(prom_cfg), {"rules.yml": yaml.safe_dump(rules)}):

            def both() -> list[dict[str, Any]] | None:
                found = _alerts(am)
                return found if len(found) == 2 else None

            found = _wait("zmon's alert and Prometheus's twin in Alertmanager", both)
            ours = next(a for a in found if "rule" in a["labels"])
            theirs = next(a for a in found if "rule" not in a["labels"])
            # what Prometheus calls the target is what zmon calls itself
            assert ours["labels"]["instance"] == theirs["labels"]["instance"] == target
            assert ours["labels"]["job"] == theirs["labels"]["job"] == "zmon"

            def inhibited() -> dict[str, Any] | None:
                twin = next((a for a in _alerts(am) if "rule" not in a["labels"]), None)
                return twin if twin and twin["status"]["inhibitedBy"] else None

            twin = _wait("the shipped inhibit rule to silence the rule-based twin", inhibited)
            assert twin["status"]["state"] == "suppressed"
            assert ours["status"]["state"] == "active"

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            t_stop = time.monotonic()
            _wait(
                "zmon's alert to be resolved", lambda: not [a for a in _alerts(am) if "rule" in a["labels"]], timeout=10
            )
            assert time.monotonic() - t_stop < 10  # not Alertmanager's resolve_timeout (5 min)
