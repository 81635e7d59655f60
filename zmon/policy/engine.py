"""The policy engine: a pure state machine over figures → decisions (no I/O, no torch; clocks injected).

Per rule: inactive → pending (while `for_samples` / `for_seconds` is not met) → firing → inactive again once
the value no longer satisfies `op clear` (hysteresis) for `keep_firing_seconds`. Remedial actions
(empty_cache, gc_collect) are decided when a rule fires and again while it keeps firing, at most once per
`cooldown_seconds`. An action is *ineffective* when the rule fires again (or is still firing) within
`cooldown_seconds` after it; after `persist_after` ineffective actions in a row the engine stops acting
for that rule and raises a distinct `<alertname>Persists` alert instead of thrashing. That alert resolves,
and acting resumes, once the rule has stayed inactive for a whole cooldown window.

Usage (one engine per device; `labels` go onto every alert)::

    engine = PolicyEngine(config.rules, clock=time.monotonic, labels={"device": "0"})
    for decision in engine.evaluate(build_figures(sample, previous, device=0)):
        ...  # decision.actions → SafePointGate.submit; decision.alert → AlertSink.fire/resolve

`zmon.policy.actions.PolicyRunner` does exactly this wiring; use it unless you need the parts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from zmon.rules import Rule

RuleState = Literal["inactive", "pending", "firing"]
RULE_STATE_VALUES: dict[str, int] = {"inactive": 0, "pending": 1, "firing": 2}

# fired: the rule started firing; acted: still firing, acting again after the cooldown; resolved: it
# cleared; persisted: actions stopped helping (persistence alert); persist_resolved: that alert cleared.
Event = Literal["fired", "acted", "resolved", "persisted", "persist_resolved"]


@dataclass(frozen=True)
class Alert:
    """An alert as zmon knows it; the Alertmanager client adds job, instance, runbook and external labels."""

    alertname: str
    rule: str
    severity: str
    summary: str
    description: str
    starts_at: float  # unix seconds
    ends_at: float | None = None  # unix seconds; set when resolved
    labels: tuple[tuple[str, str], ...] = ()  # extra identifying labels, e.g. (("device", "0"),)
    value: float | None = None  # the figure's value when the alert fired

    @property
    def status(self) -> Literal["firing", "resolved"]:
        return "firing" if self.ends_at is None else "resolved"

    def label_dict(self) -> dict[str, str]:
        """Identifying labels: alertname, severity, rule and the extra labels (empty values left out)."""
        out = {"alertname": self.alertname, "severity": self.severity, "rule": self.rule}
        out.update((k, v) for k, v in self.labels if v != "")
        return out

    def key(self) -> tuple[tuple[str, str], ...]:
        """Identity of the alert (as Alertmanager fingerprints it: by labels)."""
        return tuple(sorted(self.label_dict().items()))

    def resolved(self, at: float) -> Alert:
        return replace(self, ends_at=at)


@dataclass(frozen=True)
class Decision:
    """What the engine decided for one rule at one evaluation. Side effects are for the caller to perform."""

    rule: str
    event: Event
    at: float  # monotonic seconds (the engine's clock)
    value: float | None
    actions: tuple[str, ...] = ()  # remedial actions to run at the next safe point
    alert: Alert | None = None  # to fire (ends_at None) or resolve (ends_at set); None: no alert
    log: bool = False  # the rule lists the `log` action: log at WARNING
    dry_run: bool = False
    reason: str = ""  # human-readable, for logs


@dataclass(frozen=True)
class RuleStatus:
    """Read-only view of one rule's state (for the policy collector)."""

    rule: str
    state: RuleState
    persistent: bool  # actions suppressed because they stopped helping
    ineffective_streak: int
    firings_total: int
    last_value: float | None


@dataclass
class _Runtime:
    state: RuleState = "inactive"
    pending_since: float = 0.0
    pending_count: int = 0
    clear_since: float | None = None
    inactive_since: float | None = None
    alert: Alert | None = None
    last_action_at: float | None = None
    last_action_judged: bool = True
    ineffective_streak: int = 0
    persistent: bool = False
    persist_alert: Alert | None = None
    firings_total: int = 0
    last_value: float | None = None


class PolicyEngine:
    """Evaluates rules over a flat figures dict. Not thread-safe: call evaluate() from one thread."""

    def __init__(
        self,
        rules: Iterable[Rule],
        clock: Callable[[], float] = time.monotonic,
        *,
        wall: Callable[[], float] = time.time,
        labels: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        self._clock = clock
        self._wall = wall
        self.labels: tuple[tuple[str, str], ...] = tuple(sorted((labels or {}).items()))
        # In dry run nothing is executed, so whether actions help is unknown: no persistence tracking.
        self.dry_run = dry_run
        self._rt: dict[str, _Runtime] = {r.name: _Runtime() for r in self.rules}

    def reconfigure(self, rules: Iterable[Rule], *, dry_run: bool | None = None) -> list[Alert]:
        """New rules (a configuration reload). A rule whose definition is unchanged keeps its state (pending
        count, firing alert, cooldown, persistence); a changed or removed rule starts over, and the alerts it
        had firing are returned resolved (now) for the caller to send."""
        new = tuple(rules)
        names = [r.name for r in new]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        before = {r.name: r for r in self.rules}
        runtimes = {r.name: self._rt[r.name] if before.get(r.name) == r else _Runtime() for r in new}
        ended: list[Alert] = []
        for name, rt in self._rt.items():
            if runtimes.get(name) is not rt:
                ended.extend(a.resolved(self._wall()) for a in (rt.alert, rt.persist_alert) if a is not None)
        self.rules, self._rt = new, runtimes
        if dry_run is not None:
            self.dry_run = dry_run
        return ended

    def evaluate(self, figures: Mapping[str, float], now: float | None = None) -> list[Decision]:
        """Advance every rule by one observation; returns the decisions taken (often none)."""
        t = self._clock() if now is None else now
        out: list[Decision] = []
        for rule in self.rules:
            out.extend(self._step(rule, self._rt[rule.name], figures.get(rule.metric), t))
        return out

    def status(self) -> tuple[RuleStatus, ...]:
        return tuple(
            RuleStatus(r.name, rt.state, rt.persistent, rt.ineffective_streak, rt.firings_total, rt.last_value)
            for r in self.rules
            for rt in (self._rt[r.name],)
        )

    def active_alerts(self) -> list[Alert]:
        """Alerts currently firing (rule alerts and persistence alerts)."""
        out: list[Alert] = []
        for r in self.rules:
            rt = self._rt[r.name]
            out.extend(a for a in (rt.alert, rt.persist_alert) if a is not None)
        return out

    # ------------------------------------------------------------------------------------------ internals

    def _decision(
        self,
        rule: Rule,
        event: Event,
        now: float,
        value: float | None,
        *,
        actions: tuple[str, ...] = (),
        alert: Alert | None = None,
        reason: str = "",
    ) -> Decision:
        return Decision(rule.name, event, now, value, actions, alert, "log" in rule.actions, self.dry_run, reason)

    def _new_alert(self, rule: Rule, value: float | None, *, persist: bool = False) -> Alert:
        if persist:
            name = rule.alert_name + "Persists"
            summary = rule.persist_summary or f"{rule.name}: remedial actions do not help; zmon stopped acting"
            description = rule.persist_description or (
                f"The rule fired again within {rule.cooldown_seconds:g}s of each of its last "
                f"{rule.persist_after} actions ({', '.join(rule.remedial_actions)}); acting further "
                "would only stall generations. Fix the cause."
            )
        else:
            name = rule.alert_name
            summary = rule.summary or f"{rule.metric} {rule.op} {rule.threshold:g}"
            description = rule.description
        return Alert(name, rule.name, rule.severity, summary, description, self._wall(), None, self.labels, value)

    def _judge_ineffective(self, rt: _Runtime) -> None:
        """The last action did not keep the rule quiet for a cooldown window."""
        if not rt.last_action_judged and not self.dry_run:
            rt.last_action_judged = True
            rt.ineffective_streak += 1

    def _act(self, rule: Rule, rt: _Runtime, now: float) -> tuple[str, ...]:
        rt.last_action_at = now
        rt.last_action_judged = False
        return rule.remedial_actions

    def _maybe_persist(self, rule: Rule, rt: _Runtime, now: float, value: float | None) -> list[Decision]:
        if rt.persistent or rule.persist_after is None or rt.ineffective_streak < rule.persist_after:
            return []
        rt.persistent = True
        rt.persist_alert = self._new_alert(rule, value, persist=True)
        reason = f"{rt.ineffective_streak} ineffective actions in a row; actions suspended"
        return [self._decision(rule, "persisted", now, value, alert=rt.persist_alert, reason=reason)]

    def _step(self, rule: Rule, rt: _Runtime, value: float | None, now: float) -> list[Decision]:
        rt.last_value = value
        out: list[Decision] = []
        remedial = bool(rule.remedial_actions)
        since_action = None if rt.last_action_at is None else now - rt.last_action_at
        cooled = since_action is None or since_action >= rule.cooldown_seconds
        shown = f"{rule.metric}={value:g}" if value is not None else f"{rule.metric} absent"

        if rt.state == "firing":
            if rule.holds(value):
                rt.clear_since = None
            elif rt.clear_since is None:
                rt.clear_since = now
            if rt.clear_since is not None and now - rt.clear_since >= rule.keep_firing_seconds:
                rt.state, rt.inactive_since, rt.clear_since = "inactive", now, None
                alert = rt.alert.resolved(self._wall()) if rt.alert is not None else None
                rt.alert = None
                reason = f"{shown} no longer {rule.op} {rule.clear_level:g}"
                out.append(self._decision(rule, "resolved", now, value, alert=alert, reason=reason))
            elif remedial and cooled and rule.holds(value):
                # Still firing a whole cooldown after the last action: that action did not help.
                self._judge_ineffective(rt)
                out.extend(self._maybe_persist(rule, rt, now, value))
                if not rt.persistent:
                    again = self._act(rule, rt, now)
                    reason = f"{shown} still {rule.op} {rule.clear_level:g}; acting again after cooldown"
                    out.append(self._decision(rule, "acted", now, value, actions=again, reason=reason))
        elif rule.matches(value):
            if rt.state == "inactive":
                rt.state, rt.pending_since, rt.pending_count, rt.inactive_since = "pending", now, 0, None
            rt.pending_count += 1
            ready = (rule.for_samples is None or rt.pending_count >= rule.for_samples) and (
                rule.for_seconds is None or now - rt.pending_since >= rule.for_seconds
            )
            if ready:
                rt.state, rt.clear_since = "firing", None
                rt.firings_total += 1
                acts: tuple[str, ...] = ()
                persisted: list[Decision] = []
                if remedial:
                    if not cooled:
                        # Fired again inside the cooldown window of the last action: it did not help.
                        self._judge_ineffective(rt)
                    persisted = self._maybe_persist(rule, rt, now, value)
                    if cooled and not rt.persistent:
                        acts = self._act(rule, rt, now)
                if "alert" in rule.actions:
                    rt.alert = self._new_alert(rule, value)
                reason = f"{shown} {rule.op} {rule.threshold:g}"
                if remedial and not acts:
                    reason += "; actions suspended (persisting)" if rt.persistent else "; actions on cooldown"
                out.append(self._decision(rule, "fired", now, value, actions=acts, alert=rt.alert, reason=reason))
                out.extend(persisted)
        elif rt.state == "pending" or rt.inactive_since is None:
            rt.state, rt.inactive_since = "inactive", now

        if rt.state != "firing":
            # An action whose whole cooldown window passed without the rule firing again helped.
            if not rt.last_action_judged and cooled:
                rt.last_action_judged = True
                rt.ineffective_streak = 0
            quiet_since = rt.inactive_since if rt.state == "inactive" else None
            if rt.persistent and quiet_since is not None and now - quiet_since >= rule.cooldown_seconds:
                rt.persistent, rt.ineffective_streak = False, 0
                alert = rt.persist_alert.resolved(self._wall()) if rt.persist_alert is not None else None
                rt.persist_alert = None
                reason = f"inactive for {rule.cooldown_seconds:g}s; actions resumed"
                out.append(self._decision(rule, "persist_resolved", now, value, alert=alert, reason=reason))
        return out
