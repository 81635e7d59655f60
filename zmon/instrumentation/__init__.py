"""Pipeline instrumentation: stage timers (CUDA events / monotonic clock) and per-generation records."""
