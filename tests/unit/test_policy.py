"""Policy as pure logic with a fake clock; the safe-point gate; the runner end to end with the fake CUDA."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from tests.fakes.cuda_allocator import GIB, FakeTorchCuda
from tests.services import require_binary
from zmon.alerting.alertmanager import DeliveryStats
from zmon.collectors.policy import PolicyCollector
from zmon.config import Config, ConfigError, PolicyConfig, load_config
from zmon.policy import (
    ActionResult,
    Alert,
    Decision,
    PolicyEngine,
    PolicyRunner,
    PolicyState,
    Remediator,
    SafePointGate,
    build_figures,
)
from zmon.providers.allocator import AllocatorProvider
from zmon.rules import KNOWN_FIGURES, SAMPLE_FIGURES, Rule


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def rule(**kw: Any) -> Rule:
    base: dict[str, Any] = {"name": "r", "metric": "torch_reserved_unallocated_ratio", "threshold": 0.3}
    base.update(kw)
    return Rule.model_validate(base)


def events(decisions: Iterable[Decision]) -> list[str]:
    return [d.event for d in decisions]


class Run:
    """Feeds values to one engine, one per `step` seconds of the fake clock."""

    def __init__(self, *rules: Rule, step: float = 1.0, dry_run: bool = False) -> None:
        self.clock = FakeClock()
        self.engine = PolicyEngine(rules, self.clock, wall=lambda: 1.7e9, labels={"device": "0"}, dry_run=dry_run)
        self.step = step

    def feed(self, value: float | None, metric: str = "torch_reserved_unallocated_ratio") -> list[Decision]:
        self.clock.advance(self.step)
        return self.engine.evaluate({} if value is None else {metric: value})

    def state(self, name: str = "r") -> str:
        return next(s.state for s in self.engine.status() if s.rule == name)


# ------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("op", "value", "fires"),
    [
        (">", 0.31, True),
        (">", 0.3, False),
        (">=", 0.3, True),
        ("<", 0.29, True),
        ("<", 0.3, False),
        ("<=", 0.3, True),
        ("==", 0.3, True),
        ("==", 0.31, False),
        ("!=", 0.31, True),
    ],
)
def test_operators(op: str, value: float, fires: bool) -> None:
    r = Run(rule(op=op))
    assert events(r.feed(value)) == (["fired"] if fires else [])


def test_threshold_fires_with_alert_and_actions() -> None:
    r = Run(rule(actions=["empty_cache", "alert", "log"], severity="critical", summary="too much cache"))
    assert r.feed(0.1) == [] and r.state() == "inactive"
    (d,) = r.feed(0.4)
    assert d.event == "fired" and d.actions == ("empty_cache",) and d.log and d.value == 0.4
    assert d.alert is not None and d.alert.status == "firing"
    assert d.alert.label_dict() == {"alertname": "ZmonR", "severity": "critical", "rule": "r", "device": "0"}
    assert d.alert.summary == "too much cache" and d.alert.starts_at == 1.7e9
    assert r.state() == "firing"
    assert r.feed(0.5) == []  # still firing: nothing new until the cooldown passes
    (d,) = r.feed(0.1)
    assert d.event == "resolved" and d.alert is not None and d.alert.status == "resolved"
    assert d.alert.ends_at == 1.7e9 and d.alert.key() == sink_key(d.alert)


def sink_key(a: Alert) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"alertname": a.alertname, "severity": a.severity, "rule": a.rule, "device": "0"}.items()))


def test_absent_value_never_fires_and_resolves() -> None:
    r = Run(rule())
    assert r.feed(None) == []
    assert events(r.feed(0.5)) == ["fired"]
    assert events(r.feed(None)) == ["resolved"]  # no data resolves, as in Prometheus


def test_for_samples() -> None:
    r = Run(rule(for_samples=3))
    assert r.feed(0.5) == [] and r.state() == "pending"
    assert r.feed(0.5) == []
    assert r.feed(0.1) == [] and r.state() == "inactive"  # one miss resets the count
    assert r.feed(0.5) == [] and r.feed(0.5) == []
    assert events(r.feed(0.5)) == ["fired"]


def test_for_seconds() -> None:
    r = Run(rule(for_seconds=10), step=4)
    assert r.feed(0.5) == []  # t=4: pending since 4
    assert r.feed(0.5) == []  # t=8
    assert r.feed(0.5) == []  # t=12: 8 s
    assert events(r.feed(0.5)) == ["fired"]  # t=16: 12 s >= 10


def test_hysteresis() -> None:
    r = Run(rule(clear=0.25))
    assert events(r.feed(0.35)) == ["fired"]
    assert r.feed(0.28) == [] and r.state() == "firing"  # below threshold, above clear: still firing
    assert events(r.feed(0.25)) == ["resolved"]  # no longer > 0.25
    assert r.feed(0.28) == []  # re-firing needs the threshold again
    assert events(r.feed(0.31)) == ["fired"]


def test_keep_firing_seconds() -> None:
    r = Run(rule(metric="torch_alloc_retries_delta", threshold=0, keep_firing_seconds=5))
    assert events(r.feed(2, "torch_alloc_retries_delta")) == ["fired"]
    for _ in range(5):
        assert r.feed(0, "torch_alloc_retries_delta") == []
    assert events(r.feed(0, "torch_alloc_retries_delta")) == ["resolved"]


# ------------------------------------------------------------------------------------ cooldown, persistence


def test_cooldown_between_actions() -> None:
    r = Run(rule(actions=["empty_cache"], cooldown_seconds=10, persist_after=None))
    assert r.feed(0.5)[0].actions == ("empty_cache",)  # t=1
    assert events(r.feed(0.1)) == ["resolved"]  # t=2: the action helped for a moment
    (d,) = r.feed(0.5)  # t=3: fired again inside the cooldown: no action
    assert d.event == "fired" and d.actions == () and "cooldown" in d.reason
    for _ in range(7):  # t=4..10
        assert r.feed(0.5) == []
    (d,) = r.feed(0.5)  # t=11: cooldown over, still firing: act again
    assert d.event == "acted" and d.actions == ("empty_cache",)


def test_persistence_stops_acting_and_raises_distinct_alert() -> None:
    cfg = PolicyConfig()
    frag = cfg.rules["reserved_unallocated_high"]
    r = Run(frag.model_copy(update={"for_samples": None}), step=1)
    acted = 0
    persisted: list[Decision] = []
    for cycle in range(6):
        # each cycle: fire, empty_cache "runs", the ratio drops, then comes back 50 s later (< 300 s cooldown)
        if cycle:
            r.clock.advance(300)
        ds = r.feed(0.4) + r.feed(0.1) + [d for _ in range(50) for d in r.feed(0.2)] + r.feed(0.4)
        acted += sum(1 for d in ds if d.actions)
        persisted += [d for d in ds if d.event == "persisted"]
        r.feed(0.1)
    assert acted == 3  # three ineffective actions, then no more
    (p,) = persisted
    assert p.alert is not None and p.alert.alertname == "ZmonReservedUnallocatedHighPersists"
    assert "fragmentation persists" in p.alert.summary and "expandable_segments" in p.alert.summary
    assert next(s for s in r.engine.status()).persistent
    # Quiet for a whole cooldown window: the persistence alert resolves and acting resumes.
    ds = [d for _ in range(301) for d in r.feed(0.1)]
    (pr,) = [d for d in ds if d.event == "persist_resolved"]
    assert pr.alert is not None and pr.alert.status == "resolved"
    assert pr.alert.alertname == "ZmonReservedUnallocatedHighPersists"
    assert r.feed(0.4)[0].actions == ("empty_cache",)


def test_persistence_when_still_firing_after_each_action() -> None:
    r = Run(rule(actions=["empty_cache", "alert"], cooldown_seconds=10, persist_after=2), step=5)
    ds = [d for _ in range(12) for d in r.feed(0.5)]  # t=5..60, never clears
    assert [(d.event, d.actions) for d in ds] == [
        ("fired", ("empty_cache",)),  # t=5
        ("acted", ("empty_cache",)),  # t=15: first action ineffective (streak 1)
        ("persisted", ()),  # t=25: second ineffective (streak 2): stop
    ]


def test_effective_action_resets_the_streak() -> None:
    r = Run(rule(actions=["empty_cache"], cooldown_seconds=10, persist_after=2))
    for _ in range(4):
        assert r.feed(0.5)[0].actions == ("empty_cache",)  # fires and acts
        assert events(r.feed(0.1)) == ["resolved"]
        for _ in range(12):  # stays quiet past the cooldown: the action helped
            assert r.feed(0.1) == []
    assert all(not s.persistent and s.ineffective_streak == 0 for s in r.engine.status())


def test_dry_run_decisions_are_flagged_and_never_persist() -> None:
    r = Run(rule(actions=["empty_cache"], cooldown_seconds=10, persist_after=1), step=5, dry_run=True)
    ds = [d for _ in range(10) for d in r.feed(0.5)]
    assert all(d.dry_run for d in ds) and "persisted" not in events(ds)
    assert sum(1 for d in ds if d.actions) == 5  # every cooldown, as it would act for real


# ------------------------------------------------------------------------------------------- validation


def test_unknown_metric_rejected_with_valid_names() -> None:
    with pytest.raises(ValidationError) as ei:
        PolicyConfig.model_validate({"rules": {"x": {"metric": "torch_fragmentaton", "threshold": 1}}})
    msg = str(ei.value)
    assert "unknown metric 'torch_fragmentaton'" in msg
    for name in ("torch_fragmentation_ratio", "torch_reserved_unallocated_ratio", "torch_ooms_delta"):
        assert name in msg
    assert ei.value.errors()[0]["loc"] == ("rules", "x", "metric")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"for_samples": 2, "for_seconds": 5}, "not both"),
        ({"clear": 0.4}, "clear (0.4) must be <= threshold"),
        ({"op": "<", "clear": 0.2}, "must be >= threshold"),
        ({"op": "~"}, "Input should be"),
        ({"actions": ["reboot"]}, "Input should be"),
        ({"thresold": 1}, "Extra inputs"),
        ({"name": "Bad Name"}, "snake_case"),
    ],
)
def test_rule_validation(extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=None) as ei:
        rule(**extra)
    assert needle in str(ei.value)


def test_a_new_rule_by_name_keeps_the_defaults() -> None:
    text = """
rules:
  real_fragmentation:
    metric: torch_fragmentation_ratio
    op: ">="
    threshold: 0.2
    for_seconds: 30
    actions: [alert, log]
"""
    cfg = PolicyConfig.model_validate(yaml.safe_load(text))
    r = cfg.rules["real_fragmentation"]
    assert r.name == "real_fragmentation" and r.alert_name == "ZmonRealFragmentation" and r.clear_level == 0.2
    assert [x.name for x in cfg.active_rules] == [
        "reserved_unallocated_high",
        "alloc_retries_rising",
        "ooms_rising",
        "real_fragmentation",
    ]


def test_one_line_changes_one_threshold_and_clear_keeps_its_gap(tmp_path: Any) -> None:
    path = tmp_path / "zmon.yaml"
    path.write_text("policy:\n  rules:\n    reserved_unallocated_high:\n      threshold: 0.4\n")
    r = load_config(path).policy.rules["reserved_unallocated_high"]
    assert (r.threshold, r.clear, r.for_samples, r.actions) == (0.4, pytest.approx(0.35), 3, ("empty_cache", "alert"))
    # the same through the environment, as one variable
    cfg = load_config(environ={"ZMON_POLICY__RULES__RESERVED_UNALLOCATED_HIGH__THRESHOLD": "0.5"})
    assert cfg.policy.rules["reserved_unallocated_high"].threshold == 0.5
    # and the diagnosis judges the cache ratio against that same number: one knob
    assert cfg.diagnosis_thresholds.cache_ratio_high == 0.5


def test_a_default_rule_is_switched_off_explicitly() -> None:
    cfg = PolicyConfig.model_validate({"rules": {"ooms_rising": {"enabled": False}}})
    assert "ooms_rising" in cfg.rules and not cfg.rules["ooms_rising"].enabled
    assert [r.name for r in cfg.active_rules] == ["reserved_unallocated_high", "alloc_retries_rising"]


def test_the_old_list_form_is_read_with_a_note_showing_the_new_form() -> None:
    cfg = load_config(
        overrides={
            "policy": {
                "rules": [
                    {
                        "name": "reserved_unallocated_high",
                        "metric": "torch_reserved_unallocated_ratio",
                        "threshold": 0.45,
                    }
                ]
            }
        }
    )
    assert [r.name for r in cfg.policy.active_rules] == ["reserved_unallocated_high"]  # it replaced the rest
    assert cfg.policy.rules["reserved_unallocated_high"].threshold == 0.45
    (note,) = cfg.notes
    assert "list form is deprecated" in note
    assert "reserved_unallocated_high:\n      threshold: 0.45" in note
    assert "ooms_rising:\n      enabled: false" in note


def test_rule_errors_name_the_rule_and_the_key() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(
            overrides={
                "policy": {
                    "rules": {
                        "reserved_unallocated_high": {"threshold": "high"},
                        "mine": {"metric": "torch_fragmentation_ratio"},
                        "typo": {"metric": "torch_fragmentation", "threshold": 1},
                    }
                }
            }
        )
    text = str(ei.value)
    assert "policy.rules.reserved_unallocated_high.threshold" in text
    assert "policy.rules.mine.threshold: Field required" in text
    assert "policy.rules.typo.metric" in text and "unknown metric" in text


def test_window_figures_are_not_rule_metrics() -> None:
    assert "denoise_step_cv" in KNOWN_FIGURES and "denoise_step_cv" not in SAMPLE_FIGURES
    with pytest.raises(ValidationError, match="unknown metric"):
        rule(metric="denoise_step_cv")


def test_moved_threshold_is_migrated_with_a_note() -> None:
    cfg = load_config(overrides={"profiling": {"thresholds": {"reserved_unallocated_high": 0.42}}})
    assert cfg.policy.rules["reserved_unallocated_high"].threshold == 0.42
    assert cfg.diagnosis_thresholds.cache_ratio_high == 0.42
    assert any("moved to policy.rules.reserved_unallocated_high.threshold" in n for n in cfg.notes)
    assert Config().diagnosis_thresholds.cache_ratio_high == 0.30


def test_default_config() -> None:
    cfg = PolicyConfig()
    assert cfg.enabled and not cfg.dry_run and cfg.periodic_empty_cache_generations is None
    by_name = cfg.rules
    frag = by_name["reserved_unallocated_high"]
    assert (frag.metric, frag.op, frag.threshold) == ("torch_reserved_unallocated_ratio", ">", 0.30)
    assert set(frag.actions) == {"empty_cache", "alert"}
    assert by_name["alloc_retries_rising"].metric == "torch_alloc_retries_delta"
    assert by_name["ooms_rising"].metric == "torch_ooms_delta"
    assert all(r.metric in SAMPLE_FIGURES for r in cfg.rules.values())
    with pytest.raises(ValidationError):
        cfg.dry_run = True  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- figures


def test_build_figures_with_deltas() -> None:
    cuda = FakeTorchCuda(2)
    p = AllocatorProvider(cuda, devices=[0, 1])
    cuda.devices[1].set(allocated=4 * GIB, reserved=8 * GIB, inactive_split=GIB)
    first = p.sample()
    assert "torch_alloc_retries_delta" not in build_figures(first, None, device=1)
    cuda.devices[1].alloc_retries = 3
    cuda.devices[1].ooms = 1
    second = p.sample()
    f = build_figures(second, first, device=1, extra={"gpu_utilization_ratio": 0.9, "generation_seconds": None})
    assert f["torch_alloc_retries_delta"] == 3 and f["torch_ooms_delta"] == 1 and f["torch_ooms_total"] == 1
    assert f["torch_reserved_unallocated_ratio"] == 0.5 and f["torch_fragmentation_ratio"] == 0.125
    assert f["torch_reserved_ratio"] == pytest.approx(0.1)
    assert f["gpu_utilization_ratio"] == 0.9 and "generation_seconds" not in f
    assert set(f) <= KNOWN_FIGURES
    cuda.devices[1].alloc_retries = 0  # counters reset: a delta is unknown, not negative
    assert "torch_alloc_retries_delta" not in build_figures(p.sample(), second, device=1)
    assert "torch_reserved_unallocated_ratio" not in build_figures(p.sample(), device=0)  # reserved 0
    with pytest.raises(ValueError, match="unknown figure 'gpu_util'"):
        build_figures(None, extra={"gpu_util": 1.0})


# ------------------------------------------------------------------------------------------- safe points


class Recorder:
    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    def __call__(self, action: str, reason: str) -> ActionResult:
        self.ran.append((action, reason))
        return ActionResult(action, "ok")


def test_gate_never_runs_mid_generation() -> None:
    rec = Recorder()
    gate = SafePointGate(rec)
    gate.generation_started()
    gate.submit("empty_cache", "rule a")
    gate.submit("empty_cache", "rule b")  # deduplicated
    gate.submit("gc_collect", "rule c")
    assert gate.idle_tick() == [] and rec.ran == []  # the sampler ticks while a generation runs: nothing
    assert gate.in_generation
    results = gate.generation_finished()
    assert [r.action for r in results] == ["gc_collect", "empty_cache"]  # gc first
    assert rec.ran == [("gc_collect", "rule c"), ("empty_cache", "rule a; rule b")]
    assert gate.pending() == ()


def test_gate_idle_tick_and_nesting() -> None:
    rec = Recorder()
    gate = SafePointGate(rec)
    gate.submit("empty_cache", "x")
    assert len(gate.idle_tick()) == 1  # idle: runs at once
    gate.generation_started()
    gate.generation_started()  # two pipelines (or attach handles) in flight
    gate.submit("empty_cache", "y")
    assert gate.generation_finished() == []  # one still running
    assert len(gate.generation_finished()) == 1


def test_generation_waits_for_a_running_action() -> None:
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow(action: str, reason: str) -> ActionResult:
        started.set()
        release.wait(5)
        order.append("action done")
        return ActionResult(action, "ok")

    gate = SafePointGate(slow)
    gate.submit("empty_cache")
    t = threading.Thread(target=gate.idle_tick)
    t.start()
    assert started.wait(5)

    def generation() -> None:
        gate.generation_started()
        order.append("generation started")
        gate.generation_finished()

    g = threading.Thread(target=generation)
    g.start()
    time.sleep(0.05)
    assert order == []  # blocked while empty_cache runs
    release.set()
    t.join(5)
    g.join(5)
    assert order == ["action done", "generation started"]


# ------------------------------------------------------------------------------------------- runner


class Sink:
    def __init__(self) -> None:
        self.fired: list[Alert] = []
        self.resolved: list[Alert] = []

    def fire(self, alert: Alert) -> None:
        self.fired.append(alert)

    def resolve(self, alert: Alert) -> None:
        self.resolved.append(alert)


def _runner(
    cfg: Mapping[str, Any] | None = None,
) -> tuple[PolicyRunner, FakeTorchCuda, AllocatorProvider, Sink]:
    cuda = FakeTorchCuda()
    clock = FakeClock()
    config = PolicyConfig.model_validate(cfg or {})
    sink = Sink()
    runner = PolicyRunner(
        config,
        remediator=Remediator(cuda, dry_run=config.dry_run),
        alerts=sink,
        clock=clock,
        wall=lambda: 1.7e9,
    )
    return runner, cuda, AllocatorProvider(cuda), sink


def _observe(runner: PolicyRunner, provider: AllocatorProvider, n: int = 1) -> list[Decision]:
    out = []
    for _ in range(n):
        runner._clock.advance(1)  # type: ignore[attr-defined]
        out += runner.observe(provider.sample())
    return out


def test_runner_decision_mid_generation_waits_for_the_safe_point() -> None:
    runner, cuda, provider, sink = _runner()
    cuda.devices[0].set(allocated=6 * GIB, reserved=10 * GIB)  # ratio 0.4 > 0.30
    runner.generation_started()
    ds = _observe(runner, provider, 3)  # for_samples: 3
    assert events(ds) == ["fired"] and ds[0].actions == ("empty_cache",)
    assert [a.alertname for a in sink.fired] == ["ZmonReservedUnallocatedHigh"]
    assert sink.fired[0].label_dict()["device"] == "0"
    assert "empty_cache" not in cuda.calls and runner.gate.pending() == ("empty_cache",)  # mid-generation
    (r,) = runner.generation_finished()
    assert r.result == "ok" and r.freed_bytes == 4 * GIB and cuda.devices[0].reserved == 6 * GIB
    ds = _observe(runner, provider)
    assert events(ds) == ["resolved"] and sink.resolved[0].ends_at == 1.7e9

    snap = runner.state.snapshot()
    assert ("empty_cache", "ok", 1) in snap.actions and snap.freed_bytes_total == 4 * GIB
    reg = CollectorRegistry()
    reg.register(PolicyCollector(runner.state))
    v = reg.get_sample_value
    assert v("zmon_remediation_actions_total", {"action": "empty_cache", "result": "ok"}) == 1
    assert v("zmon_remediation_actions_total", {"action": "gc_collect", "result": "error"}) == 0
    assert v("zmon_remediation_freed_bytes_total") == 4 * GIB
    assert v("zmon_remediation_last_action_timestamp_seconds", {"action": "empty_cache"}) is not None
    assert v("zmon_remediation_last_duration_seconds", {"action": "empty_cache"}) is not None
    assert v("zmon_remediation_last_freed_bytes", {"action": "empty_cache"}) == 4 * GIB
    assert v("zmon_remediation_pending_actions") == 0
    assert v("zmon_policy_rule_state", {"rule": "reserved_unallocated_high", "device": "0"}) == 0
    assert v("zmon_policy_rule_firings_total", {"rule": "reserved_unallocated_high", "device": "0"}) == 1
    assert v("zmon_policy_rule_persistent", {"rule": "ooms_rising", "device": "0"}) == 0
    assert v("zmon_policy_dry_run") == 0


def test_runner_idle_runs_at_once_and_counts_ooms() -> None:
    runner, cuda, provider, sink = _runner()
    cuda.devices[0].set(allocated=2 * GIB, reserved=8 * GIB)
    _observe(runner, provider, 3)  # idle: observe() gives the gate an idle tick
    assert cuda.calls.get("empty_cache") == 1 and cuda.devices[0].reserved == 2 * GIB
    cuda.devices[0].ooms += 1
    ds = _observe(runner, provider)
    assert ("ooms_rising", "fired") in [(d.rule, d.event) for d in ds]
    assert any(a.alertname == "ZmonOomsRising" and a.severity == "critical" for a in sink.fired)


def test_runner_dry_run_counts_but_never_calls_empty_cache() -> None:
    runner, cuda, provider, _ = _runner({"dry_run": True})
    cuda.devices[0].set(allocated=2 * GIB, reserved=8 * GIB)
    ds = _observe(runner, provider, 3)
    assert ds and all(d.dry_run for d in ds)
    assert "empty_cache" not in cuda.calls and cuda.devices[0].reserved == 8 * GIB
    assert ("empty_cache", "dry_run", 1) in runner.state.snapshot().actions
    reg = CollectorRegistry()
    reg.register(PolicyCollector(runner.state))
    assert reg.get_sample_value("zmon_remediation_actions_total", {"action": "empty_cache", "result": "dry_run"}) == 1
    assert reg.get_sample_value("zmon_policy_dry_run") == 1


def test_periodic_empty_cache_every_n_generations() -> None:
    runner, cuda, _, _ = _runner({"periodic_empty_cache_generations": 3, "rules": []})
    ran = []
    for _ in range(7):
        cuda.devices[0].set(allocated=GIB, reserved=3 * GIB)
        runner.generation_started()
        ran.append(len(runner.generation_finished()))
    assert ran == [0, 0, 1, 0, 0, 1, 0]
    assert cuda.calls["empty_cache"] == 2


def test_runner_disabled_does_nothing() -> None:
    runner, cuda, provider, sink = _runner({"enabled": False, "periodic_empty_cache_generations": 1})
    cuda.devices[0].set(allocated=GIB, reserved=8 * GIB)
    assert _observe(runner, provider, 5) == []
    runner.generation_started()
    assert runner.generation_finished() == [] and "empty_cache" not in cuda.calls and sink.fired == []


class _Stats:
    def stats(self) -> DeliveryStats:
        return DeliveryStats(ok=3, error=1, dropped=2, active=1, queued=0)


@pytest.mark.parametrize("fresh", [True, False])
def test_policy_collector_exposition_passes_promtool(fresh: bool) -> None:
    promtool = require_binary("promtool")
    runner, cuda, provider, _ = _runner()
    if not fresh:
        cuda.devices[0].set(allocated=GIB, reserved=8 * GIB)
        _observe(runner, provider, 3)
    reg = CollectorRegistry()
    reg.register(PolicyCollector(PolicyState() if fresh else runner.state, _Stats()))
    text = generate_latest(reg)
    assert b"# TYPE zmon_alerts_sent_total counter" in text
    assert reg.get_sample_value("zmon_alerts_sent_total", {"result": "dropped"}) == 2
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_runner_scopes_before_cuda_init_and_without_allocator() -> None:
    runner, cuda, provider, sink = _runner(
        {"rules": [{"name": "gpu_idle", "metric": "gpu_utilization_ratio", "op": "<", "threshold": 0.8}]}
    )
    cuda.initialized = False
    assert runner.observe(provider.sample(), extra={"gpu_utilization_ratio": 0.1}) == []  # no devices yet
    (d,) = runner.observe(None, extra={"gpu_utilization_ratio": 0.1})
    assert d.event == "fired" and sink.fired[0].label_dict() == {
        "alertname": "ZmonGpuIdle",
        "severity": "warning",
        "rule": "gpu_idle",
    }
