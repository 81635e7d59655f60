"""Runbooks resolve: every zmon serves the README's runbooks at GET /runbooks, with an anchor per alert (the
shipped Prometheus rules' and zmon's own policy alerts'), and the packaged copy is the README's section."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from zmon.alerting.alertmanager import AlertmanagerClient
from zmon.app.monitor import Monitor
from zmon.config import AlertingConfig, Config, PolicyConfig

ROOT = Path(__file__).resolve().parents[2]


def alert_names() -> set[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "zmon.rules.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    rules_ = PolicyConfig().rules.values()  # the default policy's alerts, and Persists where it acts
    names |= {r.alert_name for r in rules_ if "alert" in r.actions}
    names |= {r.alert_name + "Persists" for r in rules_ if r.remedial_actions}
    return names


def test_the_packaged_copy_is_the_readme_section() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_runbooks.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


def test_every_zmon_serves_an_anchor_for_every_alert() -> None:
    cfg = Config.model_validate({"server": {"listen": "127.0.0.1:0"}})
    mon = Monitor(cfg.sampling, cfg.server, mode="watch")
    mon.start()
    try:
        assert mon.server is not None
        with urllib.request.urlopen(mon.server.url + "/runbooks", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            page = resp.read().decode()
    finally:
        mon.stop()
    anchors = set(re.findall(r'id="(runbook-[a-z0-9]+)"', page))
    missing = sorted(n for n in alert_names() if "runbook-" + n.lower() not in anchors)
    assert not missing, f"/runbooks has no section for {missing}"
    assert "<code>zmon_torch_fragmentation_ratio</code>" in page and "<li>" in page


def test_policy_alerts_link_to_the_sending_zmon_unless_configured() -> None:
    default = AlertmanagerClient(AlertingConfig(), generator_url="http://gpu-7:8739/metrics")
    assert default.runbook_base_url == "http://gpu-7:8739/runbooks#runbook-"
    own = AlertmanagerClient(AlertingConfig(runbook_base_url="https://wiki.example/zmon#"), generator_url=None)
    assert own.runbook_base_url == "https://wiki.example/zmon#"
