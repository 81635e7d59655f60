"""zmon: resource profiler and monitoring sidecar for diffusion image-generation services."""

from __future__ import annotations

__version__ = "0.1.0"

# Imported eagerly (it pulls in no torch): a lazy wrapper named like the submodule would be shadowed by
# the module object as soon as anything imports zmon.attach.
from zmon.attach import Handle, attach

__all__ = ["Handle", "__version__", "attach"]
