"""The Alertmanager client against a real Alertmanager on loopback, and a tiny capture server for headers."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.services import alertmanager, free_port, get_json
from zmon.alerting.alertmanager import AlertmanagerClient, rfc3339
from zmon.config import AlertingConfig
from zmon.policy.engine import Alert

# The shared helper's default route names no receiver; give it an explicit one.
AM_CONFIG = (
    'route:\n  receiver: "null"\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n'
    'receivers:\n  - name: "null"\n'
)


@pytest.fixture
def am_url(tmp_path: Path) -> Iterator[str]:
    with alertmanager(tmp_path, AM_CONFIG) as url:
        yield url


def make_alert(name: str = "ZmonReservedUnallocatedHigh", **kw: Any) -> Alert:
    base: dict[str, Any] = {
        "alertname": name,
        "rule": "reserved_unallocated_high",
        "severity": "warning",
        "summary": "Allocator holds over 30% of its reserved memory unallocated",
        "description": "mostly cache",
        "starts_at": time.time() - 5,
        "labels": (("device", "0"),),
        "value": 0.42,
    }
    base.update(kw)
    return Alert(**base)


def client(urls: list[str], **cfg: Any) -> AlertmanagerClient:
    config = AlertingConfig.model_validate({"alertmanager_urls": urls, "backoff_seconds": 0.01, **cfg})
    return AlertmanagerClient(config, generator_url="http://zmon.test:8739/metrics", instance="gpu-host-1")


def wait_for(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def am_alerts(url: str, **params: str) -> list[dict[str, Any]]:
    query = "?" + urllib.parse.urlencode(params) if params else ""
    return [a for a in get_json(url + "/api/v2/alerts" + query) if a["labels"].get("job") == "zmon"]


# ---------------------------------------------------------------------------------------- real Alertmanager


def test_fire_then_resolve(am_url: str) -> None:
    c = client([am_url], external_labels={"cluster": "lab"})
    try:
        alert = make_alert()
        c.fire(alert)
        (got,) = wait_for(lambda: am_alerts(am_url, active="true"))
        assert got["labels"] == {
            "alertname": "ZmonReservedUnallocatedHigh",
            "severity": "warning",
            "rule": "reserved_unallocated_high",
            "device": "0",
            "job": "zmon",
            "instance": "gpu-host-1",
            "cluster": "lab",
        }
        assert got["annotations"] == {
            "summary": "Allocator holds over 30% of its reserved memory unallocated",
            "description": "mostly cache",
            "value": "0.42",
            "runbook_url": "http://zmon.test:8739/runbooks#runbook-zmonreservedunallocatedhigh",  # its own page
        }
        assert got["generatorURL"] == "http://zmon.test:8739/metrics"
        assert got["status"]["state"] == "active"
        assert got["startsAt"].startswith(rfc3339(alert.starts_at)[:19])
        assert c.stats().active == 1

        c.resolve(alert)
        wait_for(lambda: not am_alerts(am_url, active="true"))
        assert am_alerts(am_url) == []  # resolved alerts are not listed at all
        assert c.flush(5)
        s = c.stats()
        assert (s.ok, s.error, s.dropped, s.active) == (2, 0, 0, 0)
    finally:
        c.close()


def test_one_url_down_the_other_still_gets_it(am_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    c = client([dead, am_url], retries=2)
    try:
        c.fire(make_alert())
        wait_for(lambda: am_alerts(am_url))
        assert c.flush(10)
        s = c.stats()
        assert (s.ok, s.error) == (1, 1)
    finally:
        c.close()


# ------------------------------------------------------------------------------------------- capture server


class Capture:
    """A local HTTP server that records every request and answers with a scripted status."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        self.release = threading.Event()
        cap = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                cap.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                if cap.delay:
                    cap.release.wait(cap.delay)
                status = cap.statuses.pop(0) if cap.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[Callable[..., Capture]]:
    made: list[Capture] = []

    def make(*args: Any, **kw: Any) -> Capture:
        made.append(Capture(*args, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_basic_auth_header_and_payload(tmp_path: Path, capture: Callable[..., Capture]) -> None:
    srv = capture()
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    c = client([srv.url + "/prefix/"], basic_auth={"username": "zmon", "password_file": str(pw)})
    try:
        alert = make_alert()
        c.fire(alert)
        c.resolve(alert)
        assert c.flush(5)
    finally:
        c.close()
    first, second = srv.requests
    assert first["path"] == "/prefix/api/v2/alerts"
    assert first["headers"]["Authorization"] == "Basic em1vbjpzM2NyZXQ="  # base64("zmon:s3cret")
    assert first["headers"]["Content-Type"] == "application/json"
    (a,) = first["body"]
    assert "endsAt" not in a and a["labels"]["alertname"] == "ZmonReservedUnallocatedHigh"
    (b,) = second["body"]
    assert b["endsAt"] >= b["startsAt"] and b["labels"] == a["labels"]


def test_bearer_token(tmp_path: Path, capture: Callable[..., Capture]) -> None:
    srv = capture()
    tok = tmp_path / "token"
    tok.write_text("abc.def\n")
    c = client([srv.url], bearer_token_file=str(tok))
    try:
        c.fire(make_alert())
        assert c.flush(5)
    finally:
        c.close()
    assert srv.requests[0]["headers"]["Authorization"] == "Bearer abc.def"


def test_retries_with_backoff_then_success(capture: Callable[..., Capture]) -> None:
    srv = capture(statuses=[503, 500])
    c = client([srv.url], retries=3)
    try:
        c.fire(make_alert())
        assert c.flush(5)
        assert len(srv.requests) == 3 and (c.stats().ok, c.stats().error) == (1, 0)
    finally:
        c.close()


def test_client_errors_are_not_retried(capture: Callable[..., Capture]) -> None:
    srv = capture(statuses=[400])
    c = client([srv.url], retries=3)
    try:
        c.fire(make_alert())
        assert c.flush(5)
        assert len(srv.requests) == 1 and c.stats().error == 1
    finally:
        c.close()


def test_active_alerts_are_resent(capture: Callable[..., Capture]) -> None:
    srv = capture()
    c = client([srv.url], resend_seconds=0.2)
    try:
        alert = make_alert()
        c.fire(alert)
        wait_for(lambda: len(srv.requests) >= 3, timeout=5)
        c.resolve(alert)
        assert c.flush(5)
        n = len(srv.requests)
        assert "endsAt" in srv.requests[-1]["body"][0]
        time.sleep(0.5)
        assert len(srv.requests) == n  # resolved: no more resends (no active alerts, nothing to send)
    finally:
        c.close()


def test_never_blocks_and_drops_oldest_when_full(capture: Callable[..., Capture]) -> None:
    srv = capture(delay=10)  # the server hangs until released
    c = client([srv.url], queue_size=2, retries=0, timeout_seconds=10)
    try:
        t0 = time.monotonic()
        c.fire(make_alert("A"))
        wait_for(lambda: srv.requests)  # the worker is now stuck in the first request
        for name in ("B", "C", "D", "E"):
            c.fire(make_alert(name))
        assert time.monotonic() - t0 < 2  # fire() returned at once every time
        assert c.stats().dropped == 2 and c.stats().queued == 2  # B and C dropped, D and E kept
        srv.release.set()
        assert c.flush(5)
        sent = [r["body"][0]["labels"]["alertname"] for r in srv.requests]
        assert sent == ["A", "D", "E"]
    finally:
        c.close()


def test_no_urls_means_off() -> None:
    c = AlertmanagerClient(AlertingConfig())
    c.fire(make_alert())
    assert c.stats().ok == 0 and c.stats().active == 1
    c.close()
    assert not AlertingConfig().enabled


def test_config_validation() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an http"):
        AlertingConfig.model_validate({"alertmanager_urls": ["127.0.0.1:9093"]})
    with pytest.raises(ValidationError, match="invalid label names"):
        AlertingConfig.model_validate({"external_labels": {"bad-name": "x"}})
    with pytest.raises(ValidationError, match="not both"):
        AlertingConfig.model_validate(
            {"basic_auth": {"username": "u", "password_file": "/p"}, "bearer_token_file": "/t"}
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        AlertingConfig.model_validate({"resend": 5})


# ---------------------------------------------------------------------------------------- reload and shutdown


def test_close_resolves_active_alerts_or_leaves_them(tmp_path: Path) -> None:
    with alertmanager(tmp_path / "a", AM_CONFIG) as am:
        c = client([am])
        c.fire(make_alert())
        wait_for(lambda: am_alerts(am, active="true"))
        c.close(resolve_active=False)  # alerting.resolve_on_shutdown: false
        time.sleep(0.5)
        assert len(am_alerts(am, active="true")) == 1  # left to expire after resolve_timeout
        c2 = client([am])
        c2.fire(make_alert())
        c2.close(resolve_active=True)  # the default when zmon stops: endsAt now
        assert am_alerts(am) == []
        c2.close(resolve_active=True)  # idempotent


def test_reconfigure_moves_alerts_with_urls_and_labels(tmp_path: Path) -> None:
    with alertmanager(tmp_path / "a", AM_CONFIG) as a, alertmanager(tmp_path / "b", AM_CONFIG) as b:
        c = client([a])
        try:
            c.fire(make_alert())
            wait_for(lambda: am_alerts(a, active="true"))
            # a URL added gets the alerts in force; one removed gets them resolved
            c.reconfigure(AlertingConfig.model_validate({"alertmanager_urls": [b], "backoff_seconds": 0.01}))
            wait_for(lambda: am_alerts(b, active="true"))
            wait_for(lambda: not am_alerts(a))
            # new labels: resolved under the old ones, fired under the new ones (one alert, not two)
            c.reconfigure(AlertingConfig.model_validate({"alertmanager_urls": [b], "instance": "renamed:8739"}))
            got = wait_for(lambda: [x for x in am_alerts(b) if x["labels"]["instance"] == "renamed:8739"])
            wait_for(lambda: len(am_alerts(b)) == 1)
            assert got[0]["status"]["state"] == "active"
            # no URL: nothing sent, the alert still tracked for a later URL
            c.reconfigure(AlertingConfig())
            assert not c.enabled and c.stats().active == 1
            wait_for(lambda: not am_alerts(b))
        finally:
            c.close()
