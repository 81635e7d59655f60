"""`zmon tune`: try the speed fixes on the configured pipeline, time them fairly, hand back the fastest proven config.

Modules:
  names.py    torch-free names (variants, attention backends, compile modes) for config and CLI validation
  options.py  apply_model_options(pipe, model_cfg): the one place the `model:` speed options are applied
              (zmon run / profile / tune through loading, host services through `optimize`)
  variants.py the variant registry: name, description, exact or lossy, fresh process, applicability, apply/undo
  measure.py  warm-up detection, spread statistics, the noise rule, output comparison
  flops.py    FLOPs of one generation (FlopCounterMode) and the device's measured matmul rate
  runner.py   the tune itself: warm-up, output checks, interleaved rounds, greedy combination, subprocesses
  worker.py   the fresh-process side (allocator settings that must precede CUDA initialisation)
  report.py   tune.json, tune.md, tune.html and the ready-to-use config snippet

`optimize(pipe, config)` is importable from here without importing torch first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["optimize"]


def __getattr__(name: str) -> Any:
    # Lazy: zmon.config imports zmon.tune.names, and this package must not pull in torch for that.
    if name == "optimize":
        from zmon.tune.options import optimize

        return optimize
    raise AttributeError(name)
