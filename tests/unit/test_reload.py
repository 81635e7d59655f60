"""Configuration reload (zmon.app.reload) on an in-process `zmon watch` monitor: a good file applies (sources
rebuilt by group, the listen address rebound, logging), a broken one or one that cannot be applied changes
nothing and is reported; sampler, policy and systemd parts of a reload. SIGHUP itself, against the real
daemon: tests/e2e/test_faults_daemon.py."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.nvml import make_fake
from tests.services import free_port
from zmon.app.monitor import Monitor
from zmon.app.reload import ConfigSource, Plan, Reloader, changed_paths, keep_running
from zmon.app.run import RUN_RESTART_ALWAYS
from zmon.app.watch import build_watch, watch_reloader
from zmon.config import Config, load_config
from zmon.policy.engine import PolicyEngine
from zmon.rules import Rule
from zmon.sampling import Sampler, SnapshotStore, SourceSpec


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


class Daemon:
    def __init__(self, tmp_path: Path, text: str) -> None:
        self.file = tmp_path / "zmon.yaml"
        self.file.write_text(text)
        self.cfg = load_config(self.file, environ={})
        self.nvml = make_fake(1)
        self.mon: Monitor = build_watch(self.cfg, nvml=self.nvml)
        self.logged: list[Config] = []
        source = ConfigSource(lambda: load_config(self.file, environ={}), str(self.file), self.logged.append)
        self.reloader = watch_reloader(self.mon, self.cfg, source, nvml=self.nvml)
        self.mon.start()

    @property
    def url(self) -> str:
        assert self.mon.server is not None
        return self.mon.server.url

    def reload(self, text: str) -> bool:
        self.file.write_text(text)
        return self.reloader.reload()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, f"server:\n  listen: 127.0.0.1:{free_port()}\n")
    yield d
    d.mon.stop()


def test_a_good_file_applies_live(daemon: Daemon) -> None:
    listen = daemon.cfg.server.listen
    assert daemon.mon.store.wait_ready(10)
    assert {"host", "network", "nvml"} <= set(daemon.mon.sampler.sources)
    host_sampler = daemon.mon.sampler._specs["host"]
    nvml_key = daemon.mon.group_key("nvml")
    ok = daemon.reload(
        f"server:\n  listen: {listen}\nlogging:\n  level: DEBUG\n"
        "sampling:\n  host:\n    interval_seconds: 2.5\n  network:\n    enabled: false\n"
        "  misfire_grace_seconds: 3\nmodel:\n  id: other\n"
    )
    assert ok
    specs = daemon.mon.sampler._specs
    assert specs["host"].interval_seconds == 2.5 and specs["host"] is not host_sampler
    assert "network" not in specs and daemon.mon.store.get("network") is None
    assert daemon.mon.group_key("nvml") == nvml_key  # unchanged group: untouched (same provider, same job)
    assert daemon.mon.sampler._misfire_grace == 3
    assert [c.logging.level for c in daemon.logged] == ["DEBUG"]
    text = _scrape(daemon.url)
    assert 'collector="network"' not in text  # gone from the self-metrics, its families gone too
    assert "zmon_network_" not in text
    assert _value(text, "zmon_config_last_reload_successful") == 1.0
    assert daemon.reloader.current.model.id == "other"  # watch does not use it: nothing to restart for


def test_a_broken_file_keeps_the_running_configuration(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    listen = daemon.cfg.server.listen
    before = dict(daemon.mon.sampler._specs)
    at = _value(_scrape(daemon.url), "zmon_config_last_reload_success_timestamp_seconds")
    with caplog.at_level(logging.ERROR, "zmon.app.reload"):
        assert not daemon.reload(f"server:\n  listen: {listen}\nsampling:\n  host:\n    interval_seconds: .inf\n")
    assert "keeping the running configuration" in caplog.text
    assert "sampling.host.interval_seconds: Input should be a finite number" in caplog.text
    assert daemon.mon.sampler._specs == before
    text = _scrape(daemon.url)
    assert _value(text, "zmon_config_last_reload_successful") == 0.0
    assert _value(text, "zmon_config_last_reload_success_timestamp_seconds") == at
    for broken in ("a: [", "\xff", "sampling:\n  nvml: 1\n", f"server:\n  web_config_file: {daemon.file}.absent\n"):
        assert not daemon.reload(broken)
    assert daemon.reload(f"server:\n  listen: {listen}\n")  # fixed: applies, and says so
    assert _value(_scrape(daemon.url), "zmon_config_last_reload_successful") == 1.0


def test_a_new_listen_address_is_bound_and_the_old_one_closed(daemon: Daemon) -> None:
    old_url = daemon.url
    port = free_port()
    assert daemon.reload(f"server:\n  listen: 127.0.0.1:{port}\n")
    assert daemon.url == f"http://127.0.0.1:{port}"
    assert "zmon_build_info" in _scrape(daemon.url)
    with pytest.raises(urllib.error.URLError):
        _scrape(old_url)


def test_an_address_in_use_fails_the_reload_and_changes_nothing(daemon: Daemon) -> None:
    listen = daemon.cfg.server.listen
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert not daemon.reload(f"server:\n  listen: 127.0.0.1:{busy}\nsampling:\n  host:\n    interval_seconds: 4\n")
    assert daemon.url.endswith(f":{listen.port}")
    assert daemon.mon.sampler._specs["host"].interval_seconds == 1.0  # all or nothing
    assert _value(_scrape(daemon.url), "zmon_config_last_reload_successful") == 0.0


def test_new_limits_on_the_same_address_replace_the_server_without_a_gap(daemon: Daemon) -> None:
    listen = daemon.cfg.server.listen
    old = daemon.mon.server
    assert daemon.reload(f"server:\n  listen: {listen}\n  workers: 2\n  read_timeout_seconds: 3\n")
    assert daemon.mon.server is not old and daemon.mon.server is not None
    assert daemon.mon.server.limits.workers == 2 and daemon.mon.server.limits.read_timeout == 3
    assert "zmon_build_info" in _scrape(daemon.url)


def test_the_control_token_follows_the_file(daemon: Daemon, tmp_path: Path) -> None:
    listen = daemon.cfg.server.listen
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert daemon.reload(f"server:\n  listen: {listen}\n  auth:\n    token_file: {token}\n")
    assert daemon.mon.http._token() == "s3cret"


def test_a_reload_request_is_served_on_the_reloader_thread(daemon: Daemon) -> None:
    daemon.file.write_text(f"server:\n  listen: {daemon.cfg.server.listen}\nsampling:\n  disk:\n    enabled: false\n")
    daemon.reloader.start()
    try:
        daemon.reloader.request()
        for _ in range(100):
            if daemon.reloader.reloads:
                break
            import time

            time.sleep(0.05)
    finally:
        daemon.reloader.stop()
    assert daemon.reloader.reloads == 1 and "disk" not in daemon.mon.sampler.sources


# --- what changed, what needs a restart ------------------------------------------------------------------


def test_changes_are_classified_and_restart_values_keep_running() -> None:
    old = Config()
    new = Config.model_validate(
        {
            "model": {"id": "x"},
            "sampling": {"host": {"interval_seconds": 2}},
            "policy": {"rules": {"ooms_rising": {"severity": "warning"}}},
            "profiling": {"runs": 3},
        }
    )
    changed = changed_paths(old, new)
    assert changed == [
        "model.id",
        "policy.rules.ooms_rising.severity",
        "profiling.runs",
        "sampling.host.interval_seconds",
    ]
    plan = Plan(restart=RUN_RESTART_ALWAYS, live=("sampling", "policy"))
    live, restart, unused = plan.split(changed)
    assert (live, restart, unused) == (
        ["policy.rules.ooms_rising.severity", "sampling.host.interval_seconds"],
        ["model.id"],
        ["profiling.runs"],
    )
    running = keep_running(old, new, restart)
    assert running.model.id == old.model.id and running.sampling.host.interval_seconds == 2
    assert changed_paths(running, new) == ["model.id"]  # still reported on the next reload


def test_a_failing_apply_is_a_failed_reload(tmp_path: Path) -> None:
    def apply(old: Config, new: Config, live: list[str]) -> None:
        raise OSError(98, "Address already in use")

    f = tmp_path / "z.yaml"
    f.write_text("logging:\n  level: DEBUG\n")
    r = Reloader(
        Config(),
        ConfigSource(lambda: load_config(f, environ={})),
        mode="watch",
        plan=Plan(restart=(), live=("logging",)),
        apply=apply,
    )
    assert not r.reload()
    assert r.current == Config() and r.failures == 1 and r.state.snapshot()[0] is False


# --- the parts a reload touches ------------------------------------------------------------------------------


def test_sampler_remove_and_grace_per_job() -> None:
    store = SnapshotStore()
    s = Sampler(store, misfire_grace_seconds=30)
    s.add(SourceSpec("a", lambda: 1, 0.5))
    s.add(SourceSpec("b", lambda: 2, 60))
    assert s._grace(s._specs["a"]) == 1  # at most the interval, at least 1 s
    assert s._grace(s._specs["b"]) == 30
    s.start()
    try:
        s.configure(misfire_grace_seconds=5, max_backoff_seconds=10)
        assert s._scheduler is not None
        assert s._scheduler.get_job("b").misfire_grace_time == 5
        s.remove("a")
        assert s.sources == ["b"] and s._scheduler.get_job("a") is None
    finally:
        s.shutdown()


def _rule(**kw: object) -> Rule:
    base: dict[str, object] = {
        "name": "hot",
        "metric": "gpu_temperature_celsius",
        "threshold": 80.0,
        "for_samples": 1,
        "actions": ("alert",),
    }
    return Rule.model_validate({**base, **kw})


def test_policy_engine_keeps_unchanged_rules_and_resolves_changed_ones() -> None:
    t = [0.0]
    other = _rule(name="other", metric="gpu_power_watts", threshold=10.0)
    engine = PolicyEngine([_rule(), other], clock=lambda: t[0], wall=lambda: 1000.0 + t[0])
    engine.evaluate({"gpu_temperature_celsius": 90.0, "gpu_power_watts": 20.0})
    assert {a.rule for a in engine.active_alerts()} == {"hot", "other"}
    t[0] = 5.0
    ended = engine.reconfigure([_rule(threshold=85.0), other])
    assert [(a.rule, a.ends_at) for a in ended] == [("hot", 1005.0)]
    assert {a.rule for a in engine.active_alerts()} == {"other"}  # unchanged: still firing, not re-fired
    assert engine.evaluate({"gpu_temperature_celsius": 90.0, "gpu_power_watts": 20.0})[0].rule == "hot"
    assert [a.rule for a in engine.reconfigure([_rule(threshold=85.0)])] == ["other"]  # removed


def test_target_instance_is_what_prometheus_calls_the_target() -> None:
    from zmon.app.parts import target_instance

    assert target_instance("127.0.0.1", 8739) == "127.0.0.1:8739"  # only a local Prometheus can scrape it
    assert target_instance("10.1.2.3", 9000) == "10.1.2.3:9000"
    assert target_instance("::1", 8739) == "[::1]:8739"
    assert target_instance("0.0.0.0", 8739) == f"{socket.gethostname()}:8739"  # scraped by the host's name
    assert target_instance("::", 1) == f"{socket.gethostname()}:1"


def test_a_sample_finishing_after_its_source_was_removed_is_dropped() -> None:
    """An attempt in flight when a reload removes its source must not bring the source back into the store
    (its age would grow for ever and page as stale)."""
    import threading

    store = SnapshotStore()
    s = Sampler(store)
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(5)
        return 1

    s.add(SourceSpec("slow", slow, 1.0))
    t = threading.Thread(target=s.run_once, args=("slow",))
    t.start()
    assert started.wait(5)
    s.remove("slow")
    store.unregister("slow")
    release.set()
    t.join(5)
    assert store.get("slow") is None
