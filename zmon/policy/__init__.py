"""Policy: rules over sampled figures → remedial actions at safe points and alerts (see actions.PolicyRunner).

Modules, in data-flow order:
- `rules`: the figures rules may reference (`FIGURES`, `KNOWN_FIGURES`, `build_figures`), the `Rule` model
  and `default_rules()`;
- `config`: the `policy:` and `alerting:` configuration sections (`PolicyConfig`, `AlertingConfig`);
- `engine`: `PolicyEngine`, a pure state machine (figures, clock → `Decision`s and `Alert`s);
- `actions`: the side effects — `Remediator` (empty_cache, gc_collect, measured), `SafePointGate` (never
  during a generation), `PolicyState` (counters for `zmon.collectors.policy`) and `PolicyRunner`, which
  wires them together for `zmon run` and `attach`.
"""

from zmon.policy.actions import ActionResult, PolicyRunner, PolicyState, Remediator, SafePointGate
from zmon.policy.config import AlertingConfig, PolicyConfig
from zmon.policy.engine import Alert, Decision, PolicyEngine
from zmon.policy.rules import FIGURES, KNOWN_FIGURES, Rule, build_figures, default_rules

__all__ = [
    "FIGURES",
    "KNOWN_FIGURES",
    "ActionResult",
    "Alert",
    "AlertingConfig",
    "Decision",
    "PolicyConfig",
    "PolicyEngine",
    "PolicyRunner",
    "PolicyState",
    "Remediator",
    "Rule",
    "SafePointGate",
    "build_figures",
    "default_rules",
]
