"""`zmon tune`: try the speed fixes on the configured pipeline, time them fairly, hand back the fastest proven config.

Modules:
  names.py    torch-free variant names, for the CLI's validation before anything heavy is imported
  variants.py the variant registry: name, description, exact or lossy, fresh process, applicability, apply/undo
              (the `model:` appliers themselves are zmon.workload.options: loading applies the same ones)
  measure.py  warm-up detection, spread statistics, the noise rule, output comparison
  flops.py    FLOPs of one generation (FlopCounterMode) and the device's measured matmul rate
  runner.py   the tune itself: warm-up, output checks, interleaved rounds, greedy combination, subprocesses
  worker.py   the fresh-process side (allocator settings that must precede CUDA initialisation)
  report.py   tune.json, tune.md, tune.html and the ready-to-use config snippet

The composition root (zmon.app.tune) loads the pipeline and hands the tune a sampler; `optimize(pipe,
config)` below is the host-facing helper, importable without importing torch first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zmon.config import Config, ModelConfig
    from zmon.workload.options import AppliedOptions

__all__ = ["optimize"]


def optimize(pipe: Any, config: Config | ModelConfig | None = None, **kwargs: Any) -> AppliedOptions:
    """For host services: apply the configuration's `model:` speed options (what `zmon tune` recommends) to a
    pipeline the host loaded itself, the same way `zmon run` does. Call it before `zmon.attach(pipe, config)`
    (zmon's hooks sit on the modules present when it attaches). `model.alloc_conf` cannot be applied here:
    CUDA is initialised by then, so it is checked instead (start the service with PYTORCH_CUDA_ALLOC_CONF set).

        applied = zmon.tune.optimize(pipe, load_config("zmon.yaml"))
        handle = zmon.attach(pipe, load_config("zmon.yaml"))
        ...
        applied.remove()   # undo (compile, attention, channels_last; fp8 in place cannot be undone)
    """
    # Lazy: zmon.tune.names is read by the CLI before model.alloc_conf is exported, i.e. before torch loads.
    from zmon.workload.options import optimize as apply_options

    return apply_options(pipe, config, **kwargs)
