"""A real Prometheus scrapes `zmon watch` over TLS with basic auth, using the exporter-toolkit web config file
that node_exporter takes (and node_exporter, given the very same file, is scraped the same way)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.services import free_port, get_json, prometheus, require_binary
from tests.tlsfiles import make_pki

PASSWORD = "scrape-me"


def web_config(d: Path) -> Path:
    """The file as node_exporter's docs show it: relative cert paths, a $2y$ (htpasswd -B) hash, headers."""
    h = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$", 1)
    p = d / "web-config.yml"
    p.write_text(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS12\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        f"basic_auth_users:\n  prometheus: {h}\n"
    )
    return p


def wait_https(url: str, ctx: ssl.SSLContext, auth: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"exited {proc.returncode}: {out[-3000:]}")
        try:
            req = urllib.request.Request(url, headers={"Authorization": auth})
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_prometheus_scrapes_zmon_and_node_exporter_over_tls_with_basic_auth(tmp_path: Path) -> None:
    node_exporter = require_binary("prometheus-node-exporter", "node_exporter")
    pki = make_pki(tmp_path / "pki")
    cfg = web_config(pki.dir)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    import base64

    auth = "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
    zport, nport = free_port(), free_port()
    zmon = subprocess.Popen(
        [sys.executable, "-m", "zmon", "watch", "--listen", f"127.0.0.1:{zport}", "--web.config.file", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ZMON_AUTH_TOKEN": ""},
    )
    node = subprocess.Popen(
        [
            node_exporter,
            f"--web.listen-address=127.0.0.1:{nport}",
            f"--web.config.file={cfg}",
            "--collector.disable-defaults",
            "--collector.loadavg",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_https(f"https://127.0.0.1:{zport}/readyz", ctx, auth, zmon)
        wait_https(f"https://127.0.0.1:{nport}/metrics", ctx, auth, node)
        for port in (zport, nport):  # both refuse a scrape without credentials, both set the header
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=5)
            assert e.value.code == 401
            req = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers={"Authorization": auth})
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                assert r.headers["X-Content-Type-Options"] == "nosniff"

        def job(name: str, port: int, with_auth: bool = True) -> str:
            creds = f"    basic_auth:\n      username: prometheus\n      password: {PASSWORD}\n" if with_auth else ""
            return (
                f"  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {pki.ca}\n"
                f"{creds}    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            )

        prom_cfg = (
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
            + job("zmon", zport)
            + job("node", nport)
            + job("zmon_noauth", zport, with_auth=False)
        )
        with prometheus(tmp_path, prom_cfg) as prom:
            deadline = time.monotonic() + 40
            up: dict[str, str] = {}
            series: list[object] = []
            while time.monotonic() < deadline:
                up = {
                    r["metric"]["job"]: r["value"][1]
                    for r in get_json(f"{prom}/api/v1/query?query=up")["data"]["result"]
                }
                q = urllib.parse.urlencode({"query": 'zmon_host_memory_total_bytes{job="zmon"}'})
                series = get_json(f"{prom}/api/v1/query?{q}")["data"]["result"]
                if up.get("zmon") == "1" and up.get("node") == "1" and "zmon_noauth" in up and series:
                    break
                time.sleep(0.5)
            assert up.get("zmon") == "1" and up.get("node") == "1", up
            assert up.get("zmon_noauth") == "0", up  # basic auth is enforced
            assert series, "Prometheus stored no zmon series over TLS"
    finally:
        stop(zmon)
        stop(node)
