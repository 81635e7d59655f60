"""Time in torch.distributed collectives during a generation, per stage and per denoise step.

A pipeline that runs across GPUs (diffusers' context parallelism: `transformer.enable_parallelism(...)`, or a
host's own collectives) spends part of each step waiting for other ranks. `apply_collective_timing(pipe)`
registers a `PipelineHook` that, while a generation of that pipeline runs on the calling thread, times every
collective the thread issues and attributes it to the stage or denoise step in progress. The result goes
into the generation's record (`GenerationRecord.communication`) through a CallContext note that the stage
timing reads.

What is wrapped: the torch.distributed functions (`C10D_OPS`: all_reduce, all_gather(_into_tensor),
reduce_scatter(_tensor), all_to_all(_single), broadcast, send/recv, isend/irecv, barrier, …) and the
functional collectives diffusers' context parallelism calls (`FUNCTIONAL_OPS`: all_to_all_single,
all_gather_tensor, … and `wait_tensor`, where an asynchronous collective is waited for). The wrappers are
installed once per process when the first hook is applied (module attributes, restored when the last hook
goes, and only where nobody replaced them since); outside a timed generation they pass straight through.
Code that bound a collective before zmon was applied (`from torch.distributed import all_reduce`) is not seen.

What is measured is *exposed* communication: how long the generating stream waited. On CUDA each timed call
is bracketed by two CUDA events on the current stream (read after the generation: nothing synchronises
inside a step); an asynchronous collective's issue costs the stream nothing and its wait is timed where it
happens (`wait_tensor`, `Work.wait`). On CPU (gloo) the monotonic clock brackets the call on the calling
thread. Nested calls (a collective implemented with another) count once, at the outermost. Collectives inside a
torch.compile'd region are part of its graph and are not timed. An asynchronous c10d call returns its Work
wrapped (wait() timed, everything else delegated), so an `isinstance(work, dist.Work)` check sees the wrapper.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from zmon.instrumentation.anatomy import execution_device
from zmon.instrumentation.hooks import CallContext, HookRegistry, MethodWrapper, PipelineHook, Target
from zmon.instrumentation.records import CommStage, CommunicationTiming
from zmon.providers import cuda

log = logging.getLogger(__name__)

COLLECTIVES_NOTE: Final = "communication"  # CallContext note: one CommunicationResult per generation
# torch.distributed (c10d) functions that run or launch a collective or a point-to-point transfer.
C10D_OPS: Final = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_coalesced",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "barrier",
)
# torch.distributed._functional_collectives: issue an asynchronous collective (waited in wait_tensor).
FUNCTIONAL_OPS: Final = (
    "all_reduce",
    "all_gather_tensor",
    "all_gather_tensor_autograd",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_autograd",
    "all_to_all_single",
    "all_to_all_single_autograd",
    "permute_tensor",
    "broadcast",
    "all_reduce_coalesced",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced",
)
WAIT_OP: Final = "wait_tensor"
_STAGE_METHODS: Final[dict[Target, CommStage]] = {
    ("", "encode_prompt"): "text_encode",
    ("vae", "encode"): "vae_encode",
    ("vae", "decode"): "vae_decode",
    ("image_processor", "postprocess"): "postprocess",
}


@dataclass(frozen=True)
class CommunicationResult:
    """What the hook leaves for the stage timing: the per-span timings and the group's size."""

    timings: tuple[CommunicationTiming, ...]
    world_size: int


@dataclass
class _Span:
    stage: CommStage
    index: int
    start: int | float  # event mark index (CUDA) or perf_counter seconds
    end: int | float = 0
    issue: bool = True  # an issuing call (counted), not a wait


@dataclass
class _CallState:
    """One generation in progress on one thread: where it is, and the timed collective calls."""

    world_size: int
    events: cuda.EventTimeline | None  # None: monotonic clock
    stack: list[tuple[CommStage, int]] = field(default_factory=list)  # open stage methods, innermost last
    calls: dict[str, int] = field(default_factory=dict)  # stage → calls so far (the span index)
    step_open: bool = False
    steps: int = 0
    depth: int = 0  # > 0 inside a timed collective: nested calls are part of it
    spans: list[_Span] = field(default_factory=list)
    failed: bool = False

    def where(self) -> tuple[CommStage, int]:
        if self.stack:
            return self.stack[-1]
        if self.step_open:
            return "denoise_step", self.steps
        return "other", 0

    def mark(self) -> int | float:
        if self.events is not None:
            self.events.mark()
            return len(self.events) - 1
        return time.perf_counter()


# ------------------------------------------------------------------------------------------------ patching


class _Local(threading.local):
    state: _CallState | None = None


_LOCAL = _Local()


def _timed(fn: Callable[..., Any], *, issue: bool) -> Callable[..., Any]:
    """`fn` timed when called on a thread whose generation is being measured (depth 0 only)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _compiling():  # first: torch.compile traces straight through to the collective
            return fn(*args, **kwargs)
        state = _LOCAL.state
        if state is None or state.depth or state.failed:
            return fn(*args, **kwargs)
        stage, index = state.where()
        try:
            span = _Span(stage, index, state.mark(), issue=issue)
        except Exception:  # a CUDA error while recording: stop measuring this generation, never break it
            log.debug("cannot time a collective", exc_info=True)
            state.failed = True
            return fn(*args, **kwargs)
        state.depth += 1
        try:
            result = fn(*args, **kwargs)
        finally:
            state.depth -= 1
            try:
                span.end = state.mark()
                state.spans.append(span)
            except Exception:
                log.debug("cannot time a collective", exc_info=True)
                state.failed = True
        return _timed_works(result, stage, index) if issue else result

    wrapper.__zmon_collective__ = fn  # type: ignore[attr-defined]
    return wrapper


def _compiling() -> bool:
    import torch

    return bool(torch.compiler.is_compiling())


def _timed_works(result: Any, stage: CommStage, index: int) -> Any:
    """The c10d Work(s) an asynchronous call returned (async_op=True, isend/irecv, batch_isend_irecv), each
    wrapped so that its wait() is timed; anything else unchanged."""
    import torch.distributed as c10d

    work = getattr(c10d, "Work", None)
    if work is None:
        return result
    if isinstance(result, work):
        return _TimedWork(result, stage, index)
    if isinstance(result, list) and result and all(isinstance(w, work) for w in result):
        return [_TimedWork(w, stage, index) for w in result]
    return result


class _TimedWork:
    """A c10d Work whose wait() is timed where the generation waits for it (other attributes delegate)."""

    def __init__(self, work: Any, stage: CommStage, index: int) -> None:
        self._work = work
        self._stage = stage
        self._index = index

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        state = _LOCAL.state
        if state is None or state.depth or state.failed:
            return self._work.wait(*args, **kwargs)
        try:
            span = _Span(self._stage, self._index, state.mark(), issue=False)
        except Exception:
            state.failed = True
            return self._work.wait(*args, **kwargs)
        state.depth += 1
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            state.depth -= 1
            try:
                span.end = state.mark()
                state.spans.append(span)
            except Exception:
                state.failed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _Patcher:
    """Installs the timed wrappers once per process; the last release restores what is still ours."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[tuple[Any, str, Any]] = []  # (module, attribute, original)

    def acquire(self) -> bool:
        """Install (first user); False when torch.distributed is not available in this build."""
        with self._lock:
            modules = _modules()
            if modules is None:
                return False
            self._users += 1
            if self._users == 1:
                c10d, funcol = modules
                for name in C10D_OPS:
                    self._wrap(c10d, name, issue=True)
                if funcol is not None:
                    for name in FUNCTIONAL_OPS:
                        self._wrap(funcol, name, issue=True)
                    self._wrap(funcol, WAIT_OP, issue=False)
            return True

    def _wrap(self, module: Any, name: str, *, issue: bool) -> None:
        fn = getattr(module, name, None)
        if fn is None or not callable(fn):
            return
        self._saved.append((module, name, fn))
        setattr(module, name, _timed(fn, issue=issue))

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users:
                return
            for module, name, original in reversed(self._saved):
                current = getattr(module, name, None)
                if getattr(current, "__zmon_collective__", None) is original:
                    setattr(module, name, original)
                else:
                    log.debug("%s.%s was replaced after zmon wrapped it; left as is", module.__name__, name)
            self._saved.clear()

    @property
    def installed(self) -> bool:
        return self._users > 0


_PATCHER = _Patcher()


def _modules() -> tuple[Any, Any] | None:
    """(torch.distributed, its functional collectives or None), or None without distributed support."""
    import torch

    if not torch.distributed.is_available():
        return None
    import torch.distributed as c10d

    funcol: Any
    try:
        import torch.distributed._functional_collectives as funcol
    except Exception:  # older or trimmed builds
        funcol = None
    return c10d, funcol


def process_group_size() -> int | None:
    """Ranks of the default process group, or None when torch.distributed is not initialised."""
    modules = _modules()
    if modules is None:
        return None
    c10d = modules[0]
    if not c10d.is_initialized():
        return None
    return int(c10d.get_world_size())


# ------------------------------------------------------------------------------------------------ the hook


@dataclass(frozen=True)
class CollectiveTimingConfig:
    """use_cuda_events: None = CUDA events when the pipeline executes on CUDA, else the monotonic clock."""

    use_cuda_events: bool | None = None


class CollectiveTimingHandle(PipelineHook):
    """The collective-timing hook: times collectives during each generation; remove() takes it off."""

    name: ClassVar[str] = "collective_timing"
    priority: ClassVar[int] = 50  # inside stage timing (it reads the note this hook leaves), outside the cache

    def __init__(self, pipe: Any, config: CollectiveTimingConfig) -> None:
        self._pipe = pipe
        self._config = config
        self._registry: HookRegistry | None = None
        self._patched = False
        methods: dict[Target, MethodWrapper] = {t: self._stage(s) for t, s in _STAGE_METHODS.items()}
        methods[("scheduler", "step")] = self._scheduler_step
        self._methods = methods
        self.generations_measured = 0

    def methods(self) -> Mapping[Target, MethodWrapper]:
        return self._methods

    def _stage(self, stage: CommStage) -> MethodWrapper:
        def wrap(ctx: CallContext | None, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            state: _CallState | None = None if ctx is None else ctx.state.get(self.name)
            if state is None:
                return inner(*args, **kwargs)
            index = state.calls.get(stage, 0)
            state.calls[stage] = index + 1
            state.stack.append((stage, index))
            try:
                return inner(*args, **kwargs)
            finally:
                state.stack.pop()

        return wrap

    def step_module_called(self, ctx: CallContext, name: str) -> None:
        state: _CallState | None = ctx.state.get(self.name)
        if state is not None:
            state.step_open = True

    def _scheduler_step(self, ctx: CallContext | None, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state: _CallState | None = None if ctx is None else ctx.state.get(self.name)
        if state is None:
            return inner(*args, **kwargs)
        state.step_open = True  # a step without a denoiser forward still ends here
        try:
            return inner(*args, **kwargs)
        finally:
            state.step_open = False
            state.steps += 1

    def call_started(self, ctx: CallContext) -> None:
        if not self._patched:
            return
        world = process_group_size()
        if world is None:
            return
        device = execution_device(ctx.pipe)
        on_cuda = device.type == "cuda"
        use_events = on_cuda if self._config.use_cuda_events is None else (self._config.use_cuda_events and on_cuda)
        state = _CallState(world_size=world, events=cuda.EventTimeline(device) if use_events else None)
        if state.events is not None:
            state.events.mark()  # mark 0: the reference every offset is measured from
        ctx.state[self.name] = state
        _LOCAL.state = state

    def call_finished(self, ctx: CallContext) -> None:
        state: _CallState | None = ctx.state.pop(self.name, None)
        if state is None:
            return
        if _LOCAL.state is state:
            _LOCAL.state = None
        if state.failed:
            return
        try:
            timings = _resolve(state)
        except RuntimeError:  # e.g. a sticky CUDA error after a failed generation
            log.debug("could not resolve collective timings", exc_info=True)
            return
        self.generations_measured += 1
        ctx.note(COLLECTIVES_NOTE, CommunicationResult(timings, state.world_size))

    def remove(self) -> None:
        """Take the hook off (and the wrappers, when no other pipeline uses them); idempotent."""
        if self._registry is not None:
            self._registry.remove(self.name)
            self._registry = None
        if self._patched:
            self._patched = False
            _PATCHER.release()


def _resolve(state: _CallState) -> tuple[CommunicationTiming, ...]:
    """Seconds and calls per (stage, index), in order of first appearance; CUDA events are read here."""
    offsets = state.events.offsets() if state.events is not None and len(state.events) > 1 else None
    totals: dict[tuple[CommStage, int], list[float]] = {}  # → [seconds, calls]
    for span in state.spans:
        if offsets is not None:
            seconds = offsets[int(span.end)] - offsets[int(span.start)]
        else:
            seconds = float(span.end) - float(span.start)
        acc = totals.setdefault((span.stage, span.index), [0.0, 0])
        acc[0] += max(0.0, seconds)
        acc[1] += int(span.issue)
    return tuple(
        CommunicationTiming(stage=stage, seconds=acc[0], calls=int(acc[1]), index=index)
        for (stage, index), acc in totals.items()
    )


def apply_collective_timing(pipe: Any, config: CollectiveTimingConfig | None = None) -> CollectiveTimingHandle:
    """Time torch.distributed collectives during each call of `pipe`; raises ValueError if already applied.

    Cheap where nothing is distributed: without an initialised process group at the start of a call the hook
    does nothing for that call (the record's `communication` stays None).
    """
    handle = CollectiveTimingHandle(pipe, config or CollectiveTimingConfig())
    registry = HookRegistry.of(pipe)
    registry.register(handle)
    handle._registry = registry
    handle._patched = _PATCHER.acquire()
    return handle
