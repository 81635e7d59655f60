"""Real Prometheus / Alertmanager (Debian packages) started on loopback for tests, with temp storage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(*names: str) -> str:
    """Path of the first of `names` on the PATH (or beside this Python). Missing: the test fails, never skips:
    the test setup installs every binary the suite needs (bash scripts/setup dev --services)."""
    for n in names:
        p = shutil.which(n) or shutil.which(n, path=str(Path(sys.executable).parent))
        if p:
            return p
    pytest.fail(f"{' / '.join(names)} not installed: run `make test` (or `bash scripts/setup dev --services`)")


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{out[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def alertmanager(tmp_path: Path, config: str | None = None) -> Iterator[str]:
    """A real Alertmanager on a free loopback port; yields its base URL."""
    binary = require_binary("prometheus-alertmanager", "alertmanager")
    d = tmp_path / "alertmanager"
    d.mkdir(parents=True, exist_ok=True)
    (d / "alertmanager.yml").write_text(
        config
        or "route:\n  receiver: 'null'\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n"
        "receivers:\n  - name: 'null'\n"
    )
    port, cport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={d / 'alertmanager.yml'}",
            f"--storage.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--cluster.listen-address=127.0.0.1:{cport}",
            "--cluster.advertise-address=127.0.0.1:" + str(cport),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", proc=proc)
        yield url
    finally:
        _stop(proc)


@contextmanager
def prometheus(tmp_path: Path, config: str, rule_files: dict[str, str] | None = None) -> Iterator[str]:
    """A real Prometheus on a free loopback port with the given prometheus.yml text; yields its base URL."""
    binary = require_binary("prometheus")
    d = tmp_path / "prometheus"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (rule_files or {}).items():
        (d / name).write_text(text)
    (d / "prometheus.yml").write_text(config)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=d,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", proc=proc)
        yield url
    finally:
        _stop(proc)


@contextmanager
def zmon_process(
    args: list[str], env: dict[str, str] | None = None, ready_timeout: float = 60.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m zmon ARGS --listen 127.0.0.1:<free>`; yields (base URL, process) once /readyz is 200."""
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmon", *args, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz", timeout=ready_timeout, proc=proc)
        yield url, proc
    finally:
        _stop(proc)
