"""Safe points: listeners told around every pipeline call (the place for empty_cache between generations).

`apply_boundaries(pipe)` registers the outermost hook of the pipeline's HookRegistry, so a listener that
blocks in `generation_started` (a safe-point gate running empty_cache) is not timed as part of the
generation, and `generation_finished` runs after the generation's record was emitted.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar, Protocol

from zmon.instrumentation.hooks import CallContext, HookRegistry, PipelineHook

log = logging.getLogger(__name__)


class BoundaryListener(Protocol):
    """Told around every pipeline call.

    generation_started() runs in the calling thread before the generation and may block (a gate);
    generation_finished() runs after it, whatever its outcome.
    """

    def generation_started(self) -> object: ...

    def generation_finished(self) -> object: ...


class Boundaries(PipelineHook):
    """An ordered set of boundary listeners; a listener that raises is logged and never breaks the call."""

    name: ClassVar[str] = "boundaries"
    priority: ClassVar[int] = 1000  # outermost

    def __init__(self) -> None:
        self._listeners: list[BoundaryListener] = []
        self._lock = threading.Lock()
        self._registry: HookRegistry | None = None
        self.owner: Any = None  # what applied them (zmon.app's Instrumentation), to name it in errors

    def add(self, listener: BoundaryListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def discard(self, listener: BoundaryListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def started(self) -> None:
        for listener in self._snapshot():
            try:
                listener.generation_started()
            except Exception:
                log.exception("boundary listener %r failed in generation_started", listener)

    def finished(self) -> None:
        for listener in reversed(self._snapshot()):
            try:
                listener.generation_finished()
            except Exception:
                log.exception("boundary listener %r failed in generation_finished", listener)

    def call_started(self, ctx: CallContext) -> None:
        self.started()

    def call_finished(self, ctx: CallContext) -> None:
        self.finished()

    def _snapshot(self) -> list[BoundaryListener]:
        with self._lock:
            return list(self._listeners)

    def remove(self) -> None:
        """Take the boundaries off the pipeline; idempotent."""
        if self._registry is not None:
            self._registry.remove(self.name)
            self._registry = None


def apply_boundaries(pipe: Any, boundaries: Boundaries | None = None) -> Boundaries:
    """Register `boundaries` (a new, empty set by default) on the pipeline; ValueError if it has one."""
    hook = boundaries or Boundaries()
    registry = HookRegistry.of(pipe)
    registry.register(hook)
    hook._registry = registry
    return hook
