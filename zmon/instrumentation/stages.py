"""Per-stage timing of diffusers pipeline calls: a hook that produces one GenerationRecord per generation.

Stages: text_encode (pipe.encode_prompt), vae_encode (pipe.vae.encode), denoise_step (one loop iteration:
from the first denoiser forward of a step — before any other forward pre-hook — to the end of
scheduler.step; step k > 0 starts where step k − 1 ended, so work a host hooks onto the denoiser cannot fall
between steps), vae_decode (pipe.vae.decode: a method, forward hooks would not see it), postprocess
(pipe.image_processor.postprocess). Time outside every stage stays in the record (total minus the spans) and
is reported as untimed by the analysis.

On CUDA the boundaries are CUDA events on the current stream, read once after the call: nothing
synchronises inside a generation (measured: no overhead; a synchronize per stage costs +0.7 %).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import torch

from zmon.instrumentation.anatomy import execution_device
from zmon.instrumentation.collectives import COLLECTIVES_NOTE, CommunicationResult
from zmon.instrumentation.hooks import CallContext, HookRegistry, MethodWrapper, PipelineHook, Target
from zmon.instrumentation.records import GenerationRecord, Stage, StageTiming, Status
from zmon.providers import cuda

log = logging.getLogger(__name__)

RANGE_PREFIX: Final = "zmon/"  # NVTX / torch.profiler range names: zmon/generation, zmon/text_encode, ...
PROMPT_CACHE_NOTE: Final = "prompt_cache"  # CallContext note: True/False per encode_prompt lookup
_ERROR_MAX_CHARS: Final = 300


@dataclass(frozen=True)
class StageTimingConfig:
    """How stage timing behaves.

    on_record: called with each GenerationRecord after the generation returned (or failed); exceptions it
      raises are logged, never propagated into the host's generation.
    use_cuda_events: None = CUDA events when the pipeline executes on CUDA, else the monotonic clock.
      False on CUDA gives host-side times: kernels run asynchronously, so a stage then shows when its work
      was queued, not when it ran.
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
    """Everything measured during one pipeline call; lives in the call's context."""

    nvtx: bool
    on_cuda: bool
    device: torch.device
    started_at: float  # unix seconds
    cpu_started: float  # time.process_time() at entry
    call_args: dict[str, Any]
    prompt_chars: int | None
    events: cuda.EventTimeline | None = None
    perf: list[float] = field(default_factory=list)
    spans: list[_Span] = field(default_factory=list)
    open: dict[str, _Span] = field(default_factory=dict)  # text_encode/vae_*/postprocess in progress
    calls: dict[str, int] = field(default_factory=dict)  # call counter per stage → StageTiming.index
    step: _Span | None = None
    last_step_end: int | None = None  # mark where the previous denoise step ended: the next one starts there
    steps: int = 0
    forwards: int = 0
    text_tokens: int | None = None
    graphs_before: int = 0
    generation_ranges: tuple[Any, ...] = ()
    cpu_finished: float | None = None  # time.process_time() at return

    def mark(self) -> int:
        if self.events is not None:
            self.events.mark()
        self.perf.append(time.perf_counter())
        return len(self.perf) - 1

    def begin(self, stage: Stage, index: int, at: int | None = None) -> _Span:
        start = self.mark() if at is None else at
        span = _Span(stage, index, start, ranges=_open_ranges(stage, self.on_cuda) if self.nvtx else ())
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

    def begin_step(self) -> None:
        if self.step is None:
            self.step = self.begin("denoise_step", self.steps, at=self.last_step_end)

    def finish(self) -> int:
        """Take the final mark and close whatever is still open (a failed generation) at it."""
        final = self.mark()
        for span in self.spans:
            if span.end is None:
                span.end = final
                _close_ranges(span.ranges)
        return final


def _open_ranges(stage: str, on_cuda: bool) -> tuple[Any, ...]:
    name = RANGE_PREFIX + stage
    rf = torch.autograd.profiler.record_function(name)
    rf.__enter__()
    if on_cuda:
        return rf, cuda.nvtx_start(name)
    return (rf,)


def _close_ranges(ranges: tuple[Any, ...]) -> None:
    for r in ranges:
        if isinstance(r, int):
            cuda.nvtx_end(r)
        else:
            r.__exit__(None, None, None)


class StageTimingHandle(PipelineHook):
    """The stage-timing hook: counters, the last record, and remove().

    One generation at a time per pipeline, from any thread: per-call state lives in the call's context,
    counters are updated under a lock.
    """

    name: ClassVar[str] = "stage_timing"
    priority: ClassVar[int] = 100  # outside the prompt cache, inside the safe-point boundaries

    def __init__(self, pipe: Any, config: StageTimingConfig) -> None:
        self._pipe = pipe
        self._config = config
        self._lock = threading.Lock()
        self._registry: HookRegistry | None = None
        self._signature: inspect.Signature | None = None
        self._methods: dict[Target, MethodWrapper] = {
            ("", "encode_prompt"): self._timed("text_encode"),
            ("vae", "encode"): self._timed("vae_encode"),
            ("vae", "decode"): self._timed("vae_decode"),
            ("image_processor", "postprocess"): self._timed("postprocess"),
            ("scheduler", "step"): self._scheduler_step,
        }
        self.last_record: GenerationRecord | None = None
        self.records_total = 0

    def methods(self) -> Mapping[Target, MethodWrapper]:
        return self._methods

    # -- hooks -----------------------------------------------------------------------------------------

    def _timed(self, stage: Stage) -> MethodWrapper:
        def wrap(ctx: CallContext | None, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            state: _CallState | None = None if ctx is None else ctx.state.get(self.name)
            if state is None or stage in state.open:  # outside a generation, or re-entered
                return inner(*args, **kwargs)
            span = state.begin_call(stage)
            try:
                result = inner(*args, **kwargs)
            finally:
                state.end(span)
                del state.open[stage]
            if stage == "text_encode":
                tokens = _sequence_length(result)
                if tokens is not None:
                    state.text_tokens = max(tokens, state.text_tokens or 0)
            return result

        return wrap

    def step_module_called(self, ctx: CallContext, name: str) -> None:
        state: _CallState | None = ctx.state.get(self.name)
        if state is None:
            return
        state.forwards += 1
        state.begin_step()

    def _scheduler_step(self, ctx: CallContext | None, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state: _CallState | None = None if ctx is None else ctx.state.get(self.name)
        if state is None:
            return inner(*args, **kwargs)
        state.begin_step()  # no denoiser forward seen: the step is timed from the previous one's end
        result = inner(*args, **kwargs)
        assert state.step is not None
        state.end(state.step)
        state.last_step_end = state.step.end
        state.step = None
        state.steps += 1
        return result

    # -- one generation --------------------------------------------------------------------------------

    def call_started(self, ctx: CallContext) -> None:
        device = execution_device(ctx.pipe)
        on_cuda = device.type == "cuda"
        use_events = on_cuda if self._config.use_cuda_events is None else (self._config.use_cuda_events and on_cuda)
        if on_cuda and self._config.track_memory:
            cuda.reset_peak_memory(device)
        call_args = self._call_args(ctx.pipe, ctx.args, ctx.kwargs)
        state = _CallState(
            nvtx=self._config.nvtx,
            on_cuda=on_cuda,
            device=device,
            started_at=time.time(),
            cpu_started=time.process_time(),
            call_args=call_args,
            # Counted before the call: Z-Image rewrites list prompts in place (chat template).
            prompt_chars=_prompt_chars(call_args.get("prompt")),
            events=cuda.EventTimeline(device) if use_events else None,
        )
        state.generation_ranges = _open_ranges("generation", on_cuda) if state.nvtx else ()
        state.graphs_before = compiled_graphs()
        ctx.state[self.name] = state
        state.mark()

    def call_finished(self, ctx: CallContext) -> None:
        state: _CallState | None = ctx.state.pop(self.name, None)
        if state is None:
            return
        state.finish()
        state.cpu_finished = time.process_time()
        _close_ranges(state.generation_ranges)
        error = ctx.error
        if error is not None and not isinstance(error, Exception):
            return  # KeyboardInterrupt and friends just unwind: no record
        if error is None and ctx.output is None:
            return
        status: Status = "ok"
        message = None
        if error is not None:
            status = "oom" if isinstance(error, torch.OutOfMemoryError) else "error"
            message = f"{type(error).__name__}: {error}"[:_ERROR_MAX_CHARS]
        try:
            record = self._record(ctx, state, status, message)
        except Exception:
            log.exception("stage timing could not build the generation record")
            return
        self._emit(record)

    def _record(self, ctx: CallContext, state: _CallState, status: Status, error: str | None) -> GenerationRecord:
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
        call_args = state.call_args
        width, height, batch = _output_geometry(ctx.output, call_args)
        guidance = call_args.get("guidance_scale")
        peak_alloc = peak_reserved = None
        if state.on_cuda and self._config.track_memory:
            peak_alloc, peak_reserved = cuda.peak_memory(state.device)
        forwards_per_step = state.forwards / state.steps if state.steps else 0.0
        lookups = ctx.notes.get(PROMPT_CACHE_NOTE)
        comm = [c for c in ctx.notes.get(COLLECTIVES_NOTE, ()) if isinstance(c, CommunicationResult)]
        return GenerationRecord(
            started_at=state.started_at,
            total_seconds=offsets[-1],
            stages=stages,
            status=status,
            steps=state.steps,
            width=width,
            height=height,
            batch_size=batch,
            prompt_chars=state.prompt_chars,
            guidance_scale=float(guidance) if isinstance(guidance, (int, float)) else None,
            cfg_active=_cfg_active(ctx.pipe, forwards_per_step) if status == "ok" else None,
            device=str(state.device),
            timing_method=method,
            peak_allocated_bytes=peak_alloc,
            peak_reserved_bytes=peak_reserved,
            prompt_cache_hit=all(lookups) if lookups else None,
            text_tokens=state.text_tokens,
            compiles=max(0, compiled_graphs() - state.graphs_before),
            error=error,
            extra={"pipeline": self._original_class_name(), "denoiser_forwards": str(state.forwards)},
            communication=comm[-1].timings if comm else None,
            world_size=comm[-1].world_size if comm else None,
            process_cpu_seconds=None if state.cpu_finished is None else (state.cpu_started, state.cpu_finished),
        )

    def _original_class_name(self) -> str:
        registry = self._registry
        return (registry.original_class if registry is not None else type(self._pipe)).__name__

    def _call_args(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, with the pipeline's defaults filled in."""
        if self._signature is None:
            registry = self._registry
            cls = registry.original_class if registry is not None else type(pipe)
            self._signature = inspect.signature(cls.__call__)
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

    # -- control ---------------------------------------------------------------------------------------

    @property
    def nvtx(self) -> bool:
        """Whether stage ranges (record_function / NVTX "zmon/<stage>") are emitted; a trace turns them on."""
        return self._config.nvtx

    @nvtx.setter
    def nvtx(self, on: bool) -> None:
        self._config = dataclasses.replace(self._config, nvtx=on)

    def remove(self) -> None:
        """Take stage timing off the pipeline (the last zmon hook restores it exactly); idempotent."""
        if self._registry is not None:
            self._registry.remove(self.name)


def apply_stage_timing(pipe: Any, config: StageTimingConfig | None = None) -> StageTimingHandle:
    """Time every stage of each call of `pipe` (any diffusers pipeline); raises ValueError if already applied.

    Composes with apply_prompt_cache and apply_boundaries in any order: the registry orders the hooks by
    priority (boundaries outside timing outside the cache).
    """
    handle = StageTimingHandle(pipe, config or StageTimingConfig())
    registry = HookRegistry.of(pipe)
    registry.register(handle)
    handle._registry = registry
    return handle


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has produced in this process so far; 0 when it was never used.

    Read around each generation: a difference is a compile or a recompile during that call (the cause of
    a 70× outlier when a prompt of a new length arrives at a compiled denoiser).
    """
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return 0
    try:
        return int(dynamo.counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def _sequence_length(result: Any, depth: int = 0) -> int | None:
    """The text-embedding sequence length in what encode_prompt returned: [seq, dim] tensors (Z-Image: a
    list of them, one per prompt) or a [batch, seq, dim] tensor (most pipelines); None when there is none."""
    if isinstance(result, torch.Tensor):
        if result.dim() == 2:
            return int(result.shape[0])
        if result.dim() == 3:
            return int(result.shape[1])
        return None
    if isinstance(result, (list, tuple)) and depth < 3:
        found = [n for item in result if (n := _sequence_length(item, depth + 1)) is not None]
        if found:
            return found[0] if depth == 0 else max(found)
    return None


def _resolve_offsets(state: _CallState) -> tuple[list[float], Any]:
    """Seconds from the first mark for every mark; CUDA events are read here, after the call."""
    if state.events is not None and len(state.events) == len(state.perf):
        try:
            return state.events.offsets(), "cuda_event"
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
