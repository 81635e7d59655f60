"""zmon: resource profiler and monitoring sidecar for diffusion image-generation services.

`zmon.attach(pipe)` instruments a host's pipeline in process (zmon.app.attach); importing `zmon` itself
imports nothing else, so any module may read `zmon.__version__` without pulling in the composition root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zmon.version import __version__

if TYPE_CHECKING:
    from zmon.app.attach import AttachError, Handle, attach

__all__ = ["AttachError", "Handle", "__version__", "attach"]


def __getattr__(name: str) -> Any:
    if name in ("attach", "Handle", "AttachError"):
        import importlib

        attach_module = importlib.import_module("zmon.app.attach")  # lazy: the composition root

        return getattr(attach_module, name)
    raise AttributeError(f"module 'zmon' has no attribute {name!r}")
