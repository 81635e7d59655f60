"""`zmon diagnose` while `zmon run` still loads its model: a clear "loading" answer, not a 404."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from zmon.app.client import DiagnosisUnavailable, fetch_diagnosis
from zmon.app.run import loading_diagnosis
from zmon.server import App, Response, Server


def test_provisional_diagnosis_route_says_loading_then_gives_way() -> None:
    app = App(CollectorRegistry(), lambda: True)
    app.add_route("/diagnosis", loading_diagnosis("builtin:tiny-z-image"), methods=("GET", "HEAD"), provisional=True)
    srv = Server(app, "127.0.0.1", 0)
    srv.start()
    try:
        with pytest.raises(DiagnosisUnavailable) as e:
            fetch_diagnosis(srv.url + "/diagnosis", timeout=5)
        assert "HTTP 503" in str(e.value) and "loading builtin:tiny-z-image" in str(e.value)
        # the live diagnosis replaces it once the pipeline is connected; a second real route is still an error
        app.add_route("/diagnosis", lambda r: Response(200, {"verdict": None}), methods=("GET", "HEAD"))
        assert fetch_diagnosis(srv.url + "/diagnosis", timeout=5) == {"verdict": None}
        with pytest.raises(ValueError, match="twice"):
            app.add_route("/diagnosis", lambda r: Response(200, {}))
    finally:
        srv.shutdown()


def test_no_diagnosis_route_names_the_modes_that_serve_one() -> None:
    srv = Server(App(CollectorRegistry(), lambda: True), "127.0.0.1", 0)
    srv.start()
    try:
        with pytest.raises(DiagnosisUnavailable, match=r"HTTP 404.*`zmon run` and `zmon\.attach`, not by `zmon watch`"):
            fetch_diagnosis(srv.url + "/diagnosis", timeout=5)
    finally:
        srv.shutdown()
