"""HTTP: /metrics content negotiation, health and readiness, auth on control routes, 4xx with reasons."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from zmon.server import App, HTTPError, Request, Response, Server


class One:
    def collect(self):  # type: ignore[no-untyped-def]
        g = GaugeMetricFamily("zmon_test_value", "A test value.")
        g.add_metric([], 1.5)
        yield g


@pytest.fixture
def served() -> Iterator[tuple[str, dict[str, object]]]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    state: dict[str, object] = {"ready": False, "token": None}
    app = App(reg, lambda: bool(state["ready"]), lambda: state["token"])  # type: ignore[arg-type,return-value]

    def act(req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict) or "n" not in body:
            raise HTTPError(400, "expected a JSON object with 'n'")
        return Response(202, {"accepted": body["n"]})

    app.add_route("/act", act, methods=("POST",), auth=True)
    srv = Server(app, "127.0.0.1", 0)
    srv.start()
    try:
        yield f"http://127.0.0.1:{srv.port}", state
    finally:
        srv.shutdown()


def fetch(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_metrics_text_and_openmetrics(served: tuple[str, dict[str, object]]) -> None:
    base, _ = served
    code, headers, body = fetch(base + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"zmon_test_value 1.5" in body
    code, headers, body = fetch(base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_health_and_readiness(served: tuple[str, dict[str, object]]) -> None:
    base, state = served
    assert fetch(base + "/healthz")[0] == 200
    assert fetch(base + "/readyz")[0] == 503
    state["ready"] = True
    assert fetch(base + "/readyz")[0] == 200


def test_control_routes_need_auth(served: tuple[str, dict[str, object]]) -> None:
    base, state = served
    code, _, body = fetch(base + "/act", data=b"{}", method="POST")
    assert code == 403 and b"disabled" in body
    state["token"] = "s3cret"
    code, headers, _ = fetch(base + "/act", data=b'{"n": 1}', method="POST")
    assert code == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    code, _, _ = fetch(base + "/act", data=b'{"n": 1}', method="POST", headers={"Authorization": "Bearer nope"})
    assert code == 401
    ok = {"Authorization": "Bearer s3cret"}
    code, _, body = fetch(base + "/act", data=b'{"n": 1}', method="POST", headers=ok)
    assert code == 202 and json.loads(body) == {"accepted": 1}
    code, _, body = fetch(base + "/act", data=b"{not json", method="POST", headers=ok)
    assert code == 400 and b"not valid JSON" in body
    code, _, body = fetch(base + "/act", data=b"[]", method="POST", headers=ok)
    assert code == 400 and b"expected a JSON object" in body
    code, _, _ = fetch(base + "/act", headers=ok)
    assert code == 405
    code, _, _ = fetch(base + "/act", data=b"x" * (70 * 1024), method="POST", headers=ok)
    assert code == 413


def test_unknown_path_is_404(served: tuple[str, dict[str, object]]) -> None:
    base, _ = served
    code, _, body = fetch(base + "/nope")
    assert code == 404 and b"no such endpoint" in body
