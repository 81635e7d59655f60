"""Policy and alerting families (zmon_policy_*, zmon_remediation_*, zmon_alerts_*) from PolicyState.

Wiring: `registry.register(Guarded("policy", PolicyCollector(runner.state, alert_client), errors))`; the
alert client (anything with `stats() -> DeliveryStats`) is optional. Reads counters only; never calls torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from zmon.alerting.alertmanager import DeliveryStats
from zmon.policy.actions import PolicySnapshot
from zmon.policy.engine import RULE_STATE_VALUES

ACTIONS = ("empty_cache", "gc_collect")
RESULTS = ("ok", "error", "dry_run", "skipped")


class _HasStats(Protocol):
    def stats(self) -> DeliveryStats: ...


class _HasSnapshot(Protocol):
    def snapshot(self) -> PolicySnapshot: ...


class PolicyCollector:
    """`state`: a PolicyState, or anything with its snapshot() (the merge of data-parallel workers' states)."""

    def __init__(self, state: _HasSnapshot, alerts: _HasStats | None = None) -> None:
        self.state = state
        self.alerts = alerts

    def collect(self) -> Iterable[Metric]:
        s = self.state.snapshot()

        actions = CounterMetricFamily(
            "zmon_remediation_actions",
            "Remedial actions by outcome (ok, error, dry_run, skipped), run at safe points only.",
            labels=["action", "result"],
        )
        counts = {(a, r): n for a, r, n in s.actions}
        for a in sorted({a for a, _ in counts} | set(ACTIONS)):
            for r in RESULTS:
                actions.add_metric([a, r], float(counts.get((a, r), 0)))
        yield actions

        freed = CounterMetricFamily(
            "zmon_remediation_freed_bytes", "Reserved memory released by remedial actions (empty_cache)."
        )
        freed.add_metric([], float(s.freed_bytes_total))
        yield freed

        last_at = GaugeMetricFamily(
            "zmon_remediation_last_action_timestamp_seconds",
            "Unix time of the last successful run of the action.",
            labels=["action"],
        )
        for a, t in s.last_at:
            last_at.add_metric([a], t)
        yield last_at

        last_dur = GaugeMetricFamily(
            "zmon_remediation_last_duration_seconds",
            "Duration of the last successful run of the action (empty_cache synchronises with the GPU).",
            labels=["action"],
        )
        for a, sec in s.last_seconds:
            last_dur.add_metric([a], sec)
        yield last_dur

        last_freed = GaugeMetricFamily(
            "zmon_remediation_last_freed_bytes",
            "Reserved memory released by the last successful run of the action.",
            labels=["action"],
        )
        for a, b in s.last_freed:
            last_freed.add_metric([a], float(b))
        yield last_freed

        pending = GaugeMetricFamily(
            "zmon_remediation_pending_actions", "Remedial actions queued until the next safe point."
        )
        pending.add_metric([], float(s.pending_actions))
        yield pending

        dry = GaugeMetricFamily("zmon_policy_dry_run", "1 if remedial actions are only logged and counted, else 0.")
        dry.add_metric([], 1.0 if s.dry_run else 0.0)
        yield dry

        state = GaugeMetricFamily(
            "zmon_policy_rule_state",
            "Policy rule state: 0 inactive, 1 pending, 2 firing.",
            labels=["rule", "device"],
        )
        persistent = GaugeMetricFamily(
            "zmon_policy_rule_persistent",
            "1 while the rule's actions are suspended because they stopped helping, else 0.",
            labels=["rule", "device"],
        )
        firings = CounterMetricFamily(
            "zmon_policy_rule_firings", "Times the rule started firing.", labels=["rule", "device"]
        )
        for device, st in s.rules:
            state.add_metric([st.rule, device], float(RULE_STATE_VALUES[st.state]))
            persistent.add_metric([st.rule, device], 1.0 if st.persistent else 0.0)
            firings.add_metric([st.rule, device], float(st.firings_total))
        yield from (state, persistent, firings)

        if self.alerts is not None and getattr(self.alerts, "enabled", True):  # no Alertmanager URL: no families
            ds = self.alerts.stats()
            sent = CounterMetricFamily(
                "zmon_alerts_sent",
                "Alerts sent to Alertmanager per alert and URL: ok, error (after retries), dropped (queue full).",
                labels=["result"],
            )
            sent.add_metric(["ok"], float(ds.ok))
            sent.add_metric(["error"], float(ds.error))
            sent.add_metric(["dropped"], float(ds.dropped))
            yield sent
            active = GaugeMetricFamily("zmon_alerts_active", "Alerts zmon currently reports as firing.")
            active.add_metric([], float(ds.active))
            yield active
            queued = GaugeMetricFamily("zmon_alerts_queued", "Alert deliveries waiting in the per-Alertmanager queues.")
            queued.add_metric([], float(ds.queued))
            yield queued
