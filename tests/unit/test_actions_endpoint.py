"""POST /actions: an authenticated request queues a remedial action for the next safe point."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from zmon.app.monitor import Monitor
from zmon.app.parts import add_policy
from zmon.config import load_config


def post(url: str, body: bytes, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def make() -> tuple[Monitor, object]:
    cfg = load_config(environ={}, overrides={"server": {"listen": "127.0.0.1:0"}})
    mon = Monitor(cfg.sampling, cfg.server, mode="run")
    wiring = add_policy(mon, cfg.policy, cfg.alerting, listen=cfg.server.listen)
    assert wiring is not None
    mon.start()
    return mon, wiring.runner


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Monitor, object]]:
    monkeypatch.setenv("ZMON_AUTH_TOKEN", "tok")  # server.auth.token_env: read at each request
    mon, policy = make()
    assert mon.server is not None
    try:
        yield f"http://127.0.0.1:{mon.server.port}/actions", mon, policy
    finally:
        mon.stop()


def test_actions_refused_without_configured_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZMON_AUTH_TOKEN", raising=False)
    mon, _ = make()
    assert mon.server is not None
    try:
        code, body = post(f"http://127.0.0.1:{mon.server.port}/actions", b'{"action": "gc_collect"}', "x")
        assert code == 403 and "disabled" in str(body["error"])
    finally:
        mon.stop()


def test_actions_auth_validation_and_effect(served: tuple[str, Monitor, object]) -> None:
    url, mon, _ = served
    assert post(url, b'{"action": "gc_collect"}')[0] == 401
    assert post(url, b'{"action": "gc_collect"}', "wrong")[0] == 401
    code, body = post(url, b'{"action": "reboot"}', "tok")
    assert code == 400 and "empty_cache" in str(body["error"])
    assert post(url, b"not json", "tok")[0] == 400
    code, body = post(url, b'{"action": "gc_collect"}', "tok")
    assert code == 202 and body["queued"] == "gc_collect"
    # idle (no generation in progress): it ran at once and was counted
    assert (
        mon.registry.get_sample_value("zmon_remediation_actions_total", {"action": "gc_collect", "result": "ok"}) == 1.0
    )


def test_action_requested_mid_generation_waits_for_the_boundary(served: tuple[str, Monitor, object]) -> None:
    url, mon, policy = served
    policy.generation_started()  # type: ignore[attr-defined]
    code, body = post(url, b'{"action": "gc_collect"}', "tok")
    assert code == 202 and body["pending"] == ["gc_collect"]
    assert mon.registry.get_sample_value(
        "zmon_remediation_actions_total", {"action": "gc_collect", "result": "ok"}
    ) in (None, 0.0)
    policy.generation_finished()  # type: ignore[attr-defined]
    assert (
        mon.registry.get_sample_value("zmon_remediation_actions_total", {"action": "gc_collect", "result": "ok"}) == 1.0
    )
