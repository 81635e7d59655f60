"""Policy: rules over sampled figures → remedial actions at safe points and alerts (see actions.PolicyRunner).

Modules, in data-flow order (the rule model, the figure names and the comparator are zmon.rules; the
`policy:` section is zmon.config.PolicyConfig):
- `figures`: `build_figures`, the flat dict of named numbers rules are evaluated on;
- `engine`: `PolicyEngine`, a pure state machine (figures, clock → `Decision`s and `Alert`s);
- `actions`: the side effects — `Remediator` (empty_cache, gc_collect, measured), `SafePointGate` (never
  during a generation), `PolicyState` (counters for `zmon.collectors.policy`) and `PolicyRunner`, which
  wires them together for `zmon run` and `attach`.
"""

from zmon.policy.actions import ActionResult, PolicyRunner, PolicyState, Remediator, SafePointGate
from zmon.policy.engine import Alert, Decision, PolicyEngine
from zmon.policy.figures import build_figures

__all__ = [
    "ActionResult",
    "Alert",
    "Decision",
    "PolicyEngine",
    "PolicyRunner",
    "PolicyState",
    "Remediator",
    "SafePointGate",
    "build_figures",
]
