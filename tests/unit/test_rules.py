"""Prometheus rules shipped in deploy/prometheus: promtool-clean, unit-tested (every alert firing and not
firing), consistent labels/annotations/runbooks, and reading only series that zmon exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.catalogue import code_families, exported_series_names, metric_names
from tests.services import require_binary

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
ALERTS = PROM / "zmon.rules.yml"
RECORDING = PROM / "zmon.recording.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))
RUNBOOK = "http://{{ $labels.instance }}/runbooks#runbook-"  # the runbooks the scraped zmon serves
SEVERITIES = {"critical", "warning", "info"}
# Series Prometheus itself makes.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in rules(ALERTS) if "alert" in r]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_promtool_check_rules_is_clean() -> None:
    promtool = require_binary("promtool")
    r = subprocess.run(
        [promtool, "check", "rules", str(RECORDING), str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in (r.stdout + r.stderr).upper(), r.stdout + r.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    assert UNIT_TESTS
    r = subprocess.run([promtool, "test", "rules", *map(str, UNIT_TESTS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_required_alerts_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    required = {
        "ZmonReservedUnallocatedHigh",
        "ZmonFragmentationHigh",
        "ZmonAllocRetriesIncreasing",
        "ZmonOOM",
        "ZmonGpuUnderutilized",
        "ZmonVramHigh",
        "ZmonCheckpointReadSlow",
        "ZmonLatencyRegression",
        "ZmonStepTimeSpreadHigh",
        "ZmonGpuHot",
        "ZmonGpuThrottled",
        "ZmonGpuXidErrors",
        "ZmonGpuEccErrors",
        "ZmonExporterDown",
        "ZmonSamplesStale",
        "ZmonCollectorFailing",
        "ZmonRemediationNotHelping",
    }
    assert required <= names, required - names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_labels_and_annotations(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert re.fullmatch(r"Zmon[A-Z][A-Za-z]+", name)
    assert rule["labels"]["severity"] in SEVERITIES
    ann = rule["annotations"]
    assert set(ann) == {"summary", "description", "runbook_url"}
    assert ann["runbook_url"] == RUNBOOK + name.lower()
    assert "{{ $value" in ann["description"] or "{{ $labels." in ann["description"]
    assert "$labels.instance" in ann["summary"] + ann["description"]


def test_rules_read_only_exported_series() -> None:
    exported = exported_series_names() | PROMETHEUS_SERIES
    missing = {
        (r.get("alert") or r.get("record"), name)
        for path in (RECORDING, ALERTS)
        for r in rules(path)
        for name in metric_names(r["expr"])
        if name not in exported
    }
    assert not missing, f"rules read series zmon does not export: {sorted(missing)}"


def test_recording_rule_names_follow_the_convention() -> None:
    for r in rules(RECORDING):
        level, metric, ops = r["record"].split(":")
        assert level and ops and metric.startswith("zmon_"), r["record"]
        assert metric.removeprefix("zmon_").split("_")[0] in {
            n.removeprefix("zmon_").split("_")[0] for n in code_families()
        }, r["record"]


def test_runbook_anchors_are_listed_in_deploy_docs() -> None:
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    for rule in alert_rules():
        assert "#runbook-" + rule["alert"].lower() in text, rule["alert"]


def test_readme_has_a_runbook_section_per_alert() -> None:
    """runbook_url points at README.md#runbook-<alertname>: each needs a heading 'Runbook: <AlertName>'."""
    readme = (ROOT / "README.md").read_text()
    anchors = {github_slug(m.group(1)) for m in re.finditer(r"^#{2,6}\s+(.+)$", readme, re.M)}
    missing = [r["alert"] for r in alert_rules() if "runbook-" + r["alert"].lower() not in anchors]
    assert not missing, f"README.md lacks the headings '### Runbook: <name>' for {missing}"
