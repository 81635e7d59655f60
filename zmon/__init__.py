"""zmon: resource profiler and monitoring sidecar for diffusion image-generation services."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "attach"]


def attach(pipe: Any, config: Any = None, **kwargs: Any) -> Any:
    """Instrument a diffusers pipeline in place and start monitoring; see zmon.attach.attach."""
    from zmon.attach import attach as _attach

    return _attach(pipe, config, **kwargs)
