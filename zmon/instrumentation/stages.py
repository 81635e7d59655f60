"""Per-stage timing of diffusers pipeline calls: hooks that produce one GenerationRecord per generation."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from zmon.instrumentation.records import GenerationRecord, Stage, StageTiming, Status

log = logging.getLogger(__name__)

# Components whose forward marks the start of a denoise step (the first one to run in each step).
DENOISER_NAMES: Final = ("transformer", "transformer_2", "unet", "controlnet")
RANGE_PREFIX: Final = "zmon/"  # NVTX / torch.profiler range names: zmon/generation, zmon/text_encode, ...
_ERROR_MAX_CHARS: Final = 300
# Layer priorities in a patched method's wrapper chain: higher sits further out (runs first).
PRIORITY_TIMING: Final = 100
PRIORITY_CACHE: Final = 10


# ---------------------------------------------------------------------------------------------------------
# Method patching shared by the stage timer and the prompt cache.


class MethodPatch:
    """One wrapper layer installed as an instance attribute over `owner.name`.

    Several layers on the same attribute form a chain ordered by priority (highest outermost), whatever the
    order they were installed in, and each can be removed in any order: removal splices the layer out and the
    last one restores the attribute exactly as it was (absent → deleted again, so the class method shows).
    """

    def __init__(self, owner: Any, name: str, wrap: Callable[..., Any], priority: int) -> None:
        self.owner = owner
        self.name = name
        self.wrap = wrap  # wrap(inner, *args, **kwargs)
        self.priority = priority
        self.inner: Callable[..., Any] = _missing
        self.had_instance_attr = False  # meaningful for the innermost layer only
        self.saved_instance_attr: Any = None
        self.installed = False

        @functools.wraps(getattr(owner, name))
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self.wrap(self.inner, *args, **kwargs)

        wrapper.__zmon_patch__ = self  # type: ignore[attr-defined]
        self.wrapper: Callable[..., Any] = wrapper

    def install(self) -> MethodPatch:
        with _PATCH_LOCK:
            outer: MethodPatch | None = None
            current = vars(self.owner).get(self.name, _missing)
            while (layer := _layer_of(current)) is not None and layer.priority >= self.priority:
                outer, current = layer, layer.inner
            below = _layer_of(current)
            if below is not None:
                self.inner = below.wrapper
            elif outer is not None:  # new innermost layer: takes over the restore state from the outer one
                self.inner = outer.inner
                self.had_instance_attr = outer.had_instance_attr
                self.saved_instance_attr = outer.saved_instance_attr
            else:  # the only layer: remember what the instance had and call through to it
                self.had_instance_attr = current is not _missing
                self.saved_instance_attr = current if self.had_instance_attr else None
                self.inner = current if self.had_instance_attr else getattr(self.owner, self.name)
            if outer is None:
                _set_instance_attr(self.owner, self.name, self.wrapper)
            else:
                outer.inner = self.wrapper
            self.installed = True
        return self

    def remove(self) -> None:
        """Splice this layer out; idempotent. Does nothing if someone replaced the attribute meanwhile."""
        with _PATCH_LOCK:
            if not self.installed:
                return
            self.installed = False
            current = vars(self.owner).get(self.name, _missing)
            outer: MethodPatch | None = None
            while (layer := _layer_of(current)) is not None and layer is not self:
                outer, current = layer, layer.inner
            if current is not self.wrapper:
                log.debug("%s.%s was replaced by someone else; left as is", type(self.owner).__name__, self.name)
                return
            innermost = _layer_of(self.inner) is None
            if outer is not None:
                outer.inner = self.inner
                if innermost:
                    outer.had_instance_attr = self.had_instance_attr
                    outer.saved_instance_attr = self.saved_instance_attr
            elif not innermost:
                _set_instance_attr(self.owner, self.name, self.inner)
            elif self.had_instance_attr:
                _set_instance_attr(self.owner, self.name, self.saved_instance_attr)
            else:
                _del_instance_attr(self.owner, self.name)


class _Missing:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unpatched")


_missing: Final = _Missing()
_PATCH_LOCK = threading.RLock()


def _layer_of(value: Any) -> MethodPatch | None:
    return getattr(value, "__zmon_patch__", None) if callable(value) else None


def _set_instance_attr(owner: Any, name: str, value: Any) -> None:
    # object.__setattr__ bypasses DiffusionPipeline.__setattr__ (config bookkeeping); torch modules keep
    # functions in __dict__ as well, so the plain path is right for both.
    object.__setattr__(owner, name, value)


def _del_instance_attr(owner: Any, name: str) -> None:
    object.__delattr__(owner, name)


def patch_method(owner: Any, name: str, wrap: Callable[..., Any], *, priority: int) -> MethodPatch:
    """Install `wrap(inner, *args, **kwargs)` over `owner.name`; returns the layer (call .remove())."""
    return MethodPatch(owner, name, wrap, priority).install()


def installed_layers(owner: Any, name: str) -> list[MethodPatch]:
    """The zmon layers currently over `owner.name`, outermost first."""
    layers = []
    current = vars(owner).get(name, _missing)
    while (layer := _layer_of(current)) is not None:
        layers.append(layer)
        current = layer.inner
    return layers


# ---------------------------------------------------------------------------------------------------------
# Per-thread stack of generations in progress, so that other hooks (the prompt cache) can annotate them.

_THREAD = threading.local()


def _active_stack() -> list[_CallState]:
    stack: list[_CallState] | None = getattr(_THREAD, "stack", None)
    if stack is None:
        stack = _THREAD.stack = []
    return stack


def note_prompt_cache(hit: bool) -> None:
    """Tell the generation running in this thread (if timed) that a prompt-cache lookup hit or missed."""
    stack = _active_stack()
    if stack:
        stack[-1].cache_lookups.append(hit)


# ---------------------------------------------------------------------------------------------------------
# Configuration, handle and per-call state.


@dataclass(frozen=True)
class StageTimingConfig:
    """How stage timing behaves.

    on_record: called with each GenerationRecord after the generation returned (or failed); exceptions it
      raises are logged, never propagated into the host's generation.
    use_cuda_events: None = CUDA events when the pipeline executes on CUDA, else the monotonic clock.
      Events are recorded at stage boundaries on the current stream and read once after the call; nothing
      synchronizes inside the generation. False on CUDA gives host-side times: kernels run asynchronously,
      so a stage then shows when its work was queued, not when it ran.
    nvtx: open a torch.profiler.record_function range (and an NVTX range on CUDA) per stage, named
      "zmon/<stage>" and "zmon/generation", for torch.profiler / Nsight Systems traces.
    track_memory: on CUDA, reset the device's peak-memory statistics before each call and read the peaks
      after it (neither synchronizes). Turn off if something else in the process owns those peaks.
    """

    on_record: Callable[[GenerationRecord], None] | None = None
    use_cuda_events: bool | None = None
    nvtx: bool = False
    track_memory: bool = True


@dataclass
class _Span:
    stage: Stage
    index: int
    start: int  # mark index
    end: int | None = None
    ranges: tuple[Any, ...] = ()


@dataclass
class _CallState:
    """Everything measured during one pipeline call; lives in the calling thread only."""

    use_events: bool
    nvtx: bool
    cuda: bool
    stream: Any = None  # the CUDA stream events are recorded on
    perf: list[float] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    spans: list[_Span] = field(default_factory=list)
    open: dict[str, _Span] = field(default_factory=dict)  # text_encode/vae_*/postprocess in progress
    calls: dict[str, int] = field(default_factory=dict)  # call counter per stage → StageTiming.index
    step: _Span | None = None
    steps: int = 0
    forwards: int = 0
    cache_lookups: list[bool] = field(default_factory=list)

    def mark(self) -> int:
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            self.events.append(event)
        self.perf.append(time.perf_counter())
        return len(self.perf) - 1

    def begin(self, stage: Stage, index: int) -> _Span:
        span = _Span(stage, index, self.mark(), ranges=_open_ranges(stage, self.cuda) if self.nvtx else ())
        self.spans.append(span)
        return span

    def end(self, span: _Span) -> None:
        if span.end is None:
            span.end = self.mark()
            _close_ranges(span.ranges)

    def begin_call(self, stage: Stage) -> _Span:
        index = self.calls.get(stage, 0)
        self.calls[stage] = index + 1
        span = self.begin(stage, index)
        self.open[stage] = span
        return span

    def finish(self) -> int:
        """Take the final mark and close whatever is still open (a failed generation) at it."""
        final = self.mark()
        for span in self.spans:
            if span.end is None:
                span.end = final
                _close_ranges(span.ranges)
        return final


def _open_ranges(stage: str, cuda: bool) -> tuple[Any, ...]:
    name = RANGE_PREFIX + stage
    rf = torch.autograd.profiler.record_function(name)
    rf.__enter__()
    if cuda:
        return rf, torch.cuda.nvtx.range_start(name)
    return (rf,)


def _close_ranges(ranges: tuple[Any, ...]) -> None:
    for r in ranges:
        if isinstance(r, int):
            torch.cuda.nvtx.range_end(r)
        else:
            r.__exit__(None, None, None)


class StageTimingHandle:
    """Returned by apply_stage_timing: counters, the last record, and remove().

    One generation at a time per pipeline, from any thread (diffusers pipelines do not support concurrent
    calls on one object anyway): per-call state is thread-local, counters are updated under a lock.
    """

    def __init__(self, pipe: Any, config: StageTimingConfig) -> None:
        self._pipe = pipe
        self._config = config
        self._lock = threading.Lock()
        self._local = threading.local()
        self._patches: list[MethodPatch] = []
        self._hooks: list[tuple[Any, Any]] = []  # (module, RemovableHandle)
        self._patched_ids: set[tuple[int, str]] = set()
        self._targets: list[Any] = []  # keeps patched objects alive so their ids stay unique
        self._original_class: type = type(pipe)
        self._signature = inspect.signature(self._original_class.__call__)
        self._removed = False
        self.last_record: GenerationRecord | None = None
        self.records_total = 0

    # -- installation ----------------------------------------------------------------------------------

    def _install(self) -> None:
        original = self._original_class
        handle = self

        @functools.wraps(original.__call__)
        def __call__(pipe_self: Any, *args: Any, **kwargs: Any) -> Any:
            return handle._generate(pipe_self, args, kwargs)

        subclass = type(
            original.__name__,
            (original,),
            {
                "__call__": __call__,
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "_zmon_stage_timing": self,
            },
        )
        object.__setattr__(self._pipe, "__class__", subclass)
        self._ensure_patched()

    def _patch(self, owner: Any, name: str, wrap: Callable[..., Any]) -> None:
        key = (id(owner), name)
        if owner is None or key in self._patched_ids or not callable(getattr(owner, name, None)):
            return
        self._patched_ids.add(key)
        self._targets.append(owner)
        self._patches.append(patch_method(owner, name, wrap, priority=PRIORITY_TIMING))

    def _ensure_patched(self) -> None:
        """Patch the pipeline's current components (again if one was swapped since, e.g. a new scheduler)."""
        pipe = self._pipe
        vae = getattr(pipe, "vae", None)
        self._patch(pipe, "encode_prompt", self._timed("text_encode"))
        self._patch(vae, "encode", self._timed("vae_encode"))
        self._patch(vae, "decode", self._timed("vae_decode"))
        self._patch(getattr(pipe, "image_processor", None), "postprocess", self._timed("postprocess"))
        self._patch(getattr(pipe, "scheduler", None), "step", self._scheduler_step)
        for name in DENOISER_NAMES:
            module = getattr(pipe, name, None)
            key = (id(module), "forward_pre_hook")
            if isinstance(module, torch.nn.Module) and key not in self._patched_ids:
                self._patched_ids.add(key)
                self._targets.append(module)
                self._hooks.append((module, module.register_forward_pre_hook(self._denoiser_pre_hook)))

    # -- hooks -----------------------------------------------------------------------------------------

    def _state(self) -> _CallState | None:
        return getattr(self._local, "state", None)

    def _timed(self, stage: Stage) -> Callable[..., Any]:
        def wrap(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            state = self._state()
            if state is None or stage in state.open:  # outside a generation, or re-entered
                return inner(*args, **kwargs)
            span = state.begin_call(stage)
            try:
                return inner(*args, **kwargs)
            finally:
                state.end(span)
                del state.open[stage]

        return wrap

    def _denoiser_pre_hook(self, module: Any, args: Any) -> None:
        state = self._state()
        if state is None:
            return
        state.forwards += 1
        if state.step is None:
            state.step = state.begin("denoise_step", state.steps)

    def _scheduler_step(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = self._state()
        if state is None:
            return inner(*args, **kwargs)
        if state.step is None:  # no denoiser forward seen: time the scheduler step alone
            state.step = state.begin("denoise_step", state.steps)
        result = inner(*args, **kwargs)
        state.end(state.step)
        state.step = None
        state.steps += 1
        return result

    # -- one generation ----------------------------------------------------------------------------------

    def _generate(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = self._original_class.__call__
        if self._removed or self._state() is not None:  # removed mid-flight, or re-entrant
            return call(pipe, *args, **kwargs)
        self._ensure_patched()
        device = _execution_device(pipe)
        cuda = device.type == "cuda"
        use_events = cuda if self._config.use_cuda_events is None else (self._config.use_cuda_events and cuda)
        track_memory = cuda and self._config.track_memory
        if track_memory:
            torch.cuda.reset_peak_memory_stats(device)
        stream = torch.cuda.current_stream(device) if use_events else None
        state = _CallState(use_events=use_events, nvtx=self._config.nvtx, cuda=cuda, stream=stream)
        call_args = self._call_args(pipe, args, kwargs)
        # Counted before the call: Z-Image rewrites list prompts in place (chat template).
        prompt_chars = _prompt_chars(call_args.get("prompt"))
        started_at = time.time()
        generation_ranges = _open_ranges("generation", cuda) if self._config.nvtx else ()
        stack = _active_stack()
        stack.append(state)
        self._local.state = state
        state.mark()
        status: Status = "ok"
        error: str | None = None
        output: Any = None
        try:
            output = call(pipe, *args, **kwargs)
            return output
        except Exception as exc:
            status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
            error = f"{type(exc).__name__}: {exc}"[:_ERROR_MAX_CHARS]
            raise
        finally:
            state.finish()
            _close_ranges(generation_ranges)
            self._local.state = None
            stack.pop()
            # Only Exceptions get a record; KeyboardInterrupt and friends just unwind.
            if status != "ok" or output is not None:
                self._emit_safely(pipe, state, device, started_at, call_args, prompt_chars, output, status, error)

    def _emit_safely(self, *args: Any) -> None:
        """Build and deliver the record; a failure here is logged, never raised into the host's generation."""
        try:
            record = self._record(*args)
        except Exception:
            log.exception("stage timing could not build the generation record")
            return
        self._emit(record)

    def _record(
        self,
        pipe: Any,
        state: _CallState,
        device: torch.device,
        started_at: float,
        call_args: dict[str, Any],
        prompt_chars: int | None,
        output: Any,
        status: Status,
        error: str | None,
    ) -> GenerationRecord:
        offsets, method = _resolve_offsets(state)
        stages = tuple(
            sorted(
                (
                    StageTiming(
                        stage=s.stage,
                        seconds=max(0.0, offsets[s.end if s.end is not None else -1] - offsets[s.start]),
                        start_offset_seconds=offsets[s.start],
                        index=s.index,
                    )
                    for s in state.spans
                ),
                key=lambda t: t.start_offset_seconds,
            )
        )
        width, height, batch = _output_geometry(output, call_args)
        guidance = call_args.get("guidance_scale")
        peak_alloc = peak_reserved = None
        if state.cuda and self._config.track_memory:
            peak_alloc = int(torch.cuda.max_memory_allocated(device))
            peak_reserved = int(torch.cuda.max_memory_reserved(device))
        forwards_per_step = state.forwards / state.steps if state.steps else 0.0
        return GenerationRecord(
            started_at=started_at,
            total_seconds=offsets[-1],
            stages=stages,
            status=status,
            steps=state.steps,
            width=width,
            height=height,
            batch_size=batch,
            prompt_chars=prompt_chars,
            guidance_scale=float(guidance) if isinstance(guidance, (int, float)) else None,
            cfg_active=_cfg_active(pipe, forwards_per_step) if status == "ok" else None,
            device=str(device),
            timing_method=method,
            peak_allocated_bytes=peak_alloc,
            peak_reserved_bytes=peak_reserved,
            prompt_cache_hit=all(state.cache_lookups) if state.cache_lookups else None,
            error=error,
            extra={"pipeline": self._original_class.__name__, "denoiser_forwards": str(state.forwards)},
        )

    def _call_args(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, with the pipeline's defaults filled in."""
        try:
            bound = self._signature.bind(pipe, *args, **kwargs)
        except TypeError:
            return dict(kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def _emit(self, record: GenerationRecord) -> None:
        with self._lock:
            self.last_record = record
            self.records_total += 1
        if self._config.on_record is not None:
            try:
                self._config.on_record(record)
            except Exception:
                log.exception("stage timing on_record callback failed")

    # -- removal ---------------------------------------------------------------------------------------

    @property
    def nvtx(self) -> bool:
        """Whether stage ranges (record_function / NVTX "zmon/<stage>") are emitted; a trace turns them on."""
        return self._config.nvtx

    @nvtx.setter
    def nvtx(self, on: bool) -> None:
        self._config = dataclasses.replace(self._config, nvtx=on)

    def remove(self) -> None:
        """Restore the pipeline's class, every patched method and hook; idempotent."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
        for patch in reversed(self._patches):
            patch.remove()
        for _module, hook in self._hooks:
            hook.remove()
        self._patches.clear()
        self._hooks.clear()
        self._targets.clear()
        self._patched_ids.clear()
        if getattr(type(self._pipe), "_zmon_stage_timing", None) is self:
            object.__setattr__(self._pipe, "__class__", self._original_class)
        else:
            log.warning("pipeline class was changed after stage timing was applied; not restoring it")


def apply_stage_timing(pipe: Any, config: StageTimingConfig | None = None) -> StageTimingHandle:
    """Time every stage of each call of `pipe` (any diffusers pipeline); raises ValueError if already applied.

    Stages: text_encode (pipe.encode_prompt), vae_encode (pipe.vae.encode), denoise_step (from the first
    denoiser forward of a step to the end of scheduler.step, so CFG with several forwards per step counts
    once), vae_decode (pipe.vae.decode: a method, forward hooks would not see it), postprocess
    (pipe.image_processor.postprocess). The whole call is timed by swapping the instance's class for a
    subclass whose __call__ wraps the original (pipe(...) looks __call__ up on the type).
    Compose with apply_prompt_cache in either order: the timing layer always sits outside the cache.
    """
    existing = getattr(type(pipe), "_zmon_stage_timing", None)
    if existing is not None:
        raise ValueError("stage timing is already applied to this pipeline; remove() it first")
    handle = StageTimingHandle(pipe, config or StageTimingConfig())
    handle._install()
    return handle


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _execution_device(pipe: Any) -> torch.device:
    """Where the pipeline computes, cheaply (microseconds).

    diffusers' _execution_device walks every submodule looking for offload hooks, and ModelMixin.device
    scans parameters: ~1 ms each for the tiny model, more for a 6 B one. So the first parameter of each
    component decides (an accelerator wins over CPU when components are split), and diffusers is asked only
    when a component carries an offload hook (its weights then rest on the CPU between uses).
    """
    try:
        components = getattr(pipe, "components", {}) or {}
        modules = [c for c in components.values() if isinstance(c, torch.nn.Module)]
        if any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in modules):
            return torch.device(pipe._execution_device)
        devices = [p.device for m in modules if (p := next(m.parameters(), None)) is not None]
    except Exception:
        log.debug("could not determine the execution device", exc_info=True)
        return torch.device("cpu")
    for device in devices:
        if device.type not in ("cpu", "meta"):
            return device
    return devices[0] if devices else torch.device("cpu")


def _resolve_offsets(state: _CallState) -> tuple[list[float], Any]:
    """Seconds from the first mark for every mark; CUDA events are read here, after the call."""
    if state.use_events and len(state.events) == len(state.perf):
        try:
            state.events[-1].synchronize()
            first = state.events[0]
            return [first.elapsed_time(e) / 1000.0 for e in state.events], "cuda_event"
        except RuntimeError:  # e.g. a sticky CUDA error after a failed generation
            log.debug("could not resolve CUDA events; using the monotonic clock", exc_info=True)
    t0 = state.perf[0]
    return [t - t0 for t in state.perf], "monotonic"


def _prompt_chars(prompt: Any) -> int | None:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return sum(len(p) for p in prompt)
    return None


def _iter_images(output: Any) -> Iterator[Any]:
    images = getattr(output, "images", None)
    if images is None and isinstance(output, tuple) and output:
        images = output[0]
    if images is None:
        return iter(())
    if isinstance(images, (list, tuple)):
        return iter(images)
    return iter([images])


def _output_geometry(output: Any, call_args: dict[str, Any]) -> tuple[int | None, int | None, int]:
    """(width, height, images) from the output when it holds images, else from the call's arguments."""
    width, height = call_args.get("width"), call_args.get("height")
    count = 0
    size: tuple[int, int] | None = None
    latent = call_args.get("output_type") == "latent"
    for item in _iter_images(output):
        shape = getattr(item, "shape", None)
        if hasattr(item, "size") and not callable(item.size) and shape is None:  # PIL
            count += 1
            size = size or (int(item.size[0]), int(item.size[1]))
        elif shape is not None and len(shape) == 4:  # a batch tensor / array
            count += int(shape[0])
            if not latent:
                size = size or _hw_to_wh(tuple(shape), channels_last=not isinstance(item, torch.Tensor))
        elif shape is not None and len(shape) == 3:
            count += 1
            if not latent:
                size = size or _hw_to_wh(tuple(shape), channels_last=not isinstance(item, torch.Tensor))
    if size is not None:
        width, height = size
    if count == 0:
        prompt = call_args.get("prompt")
        per_prompt = call_args.get("num_images_per_prompt") or 1
        count = (len(prompt) if isinstance(prompt, list) else 1) * int(per_prompt)
    return (
        int(width) if isinstance(width, int) else None,
        int(height) if isinstance(height, int) else None,
        count,
    )


def _hw_to_wh(shape: tuple[int, ...], *, channels_last: bool) -> tuple[int, int]:
    h, w = (shape[-3], shape[-2]) if channels_last else (shape[-2], shape[-1])
    return int(w), int(h)


def _cfg_active(pipe: Any, forwards_per_step: float) -> bool | None:
    """The pipeline's own do_classifier_free_guidance when it has one; else several forwards per step."""
    try:
        value = pipe.do_classifier_free_guidance
    except Exception:
        value = None
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return bool(value.item())
    return forwards_per_step > 1 if forwards_per_step else None
