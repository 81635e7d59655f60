"""One hook registry per pipeline, in the shape of diffusers' HookRegistry: named hooks, one restore path.

Every zmon feature that instruments a pipeline (stage timing, the prompt cache, safe-point boundaries) is a
`PipelineHook` registered by name in the pipeline's `HookRegistry`. The registry owns every change made to
the pipeline, and is the only code that makes them:

- the pipeline call: the instance's class is swapped once for a subclass whose `__call__` runs the hooks'
  `call_started` (outermost first, by priority) and `call_finished` (innermost first) around the original;
- component methods (`encode_prompt`, `vae.encode`, `vae.decode`, `image_processor.postprocess`,
  `scheduler.step`): one instance-attribute patch per method, which calls the hooks' wrappers as a chain
  ordered by priority (highest outermost), whatever order the hooks were registered in;
- denoiser forwards: one forward pre-hook per step module, registered with `prepend=True` so it runs before
  any pre-hook the host registered earlier.

Each call gets a `CallContext` that the hooks share (per-hook state, notes one hook leaves for another), so
no hook needs a side channel of its own. Hooks are removed by name in any order; when the last one goes the
registry restores the class, every method and every module hook exactly as they were.

    registry = HookRegistry.of(pipe)          # created on first use
    registry.register(MyHook())               # ValueError if a hook of that name is registered
    registry.remove("my_hook")                # idempotent
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import torch

from zmon.instrumentation.anatomy import STEP_MODULE_NAMES

log = logging.getLogger(__name__)

_REGISTRY_ATTR: Final = "_zmon_hooks"  # class attribute of the swapped-in subclass

# (component attribute of the pipeline, "" for the pipeline itself; method name)
Target = tuple[str, str]
# wrapper(ctx, inner, *args, **kwargs): ctx is None outside a pipeline call
MethodWrapper = Callable[..., Any]


@dataclass
class CallContext:
    """One pipeline call in progress, shared by the hooks for its duration (one thread)."""

    pipe: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)  # per hook name: its own per-call state
    notes: dict[str, list[Any]] = field(default_factory=dict)  # what one hook tells another
    output: Any = None
    error: BaseException | None = None

    def note(self, topic: str, value: Any) -> None:
        self.notes.setdefault(topic, []).append(value)


class PipelineHook:
    """A named feature on a pipeline. Every method is optional; higher `priority` sits further out."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    def methods(self) -> Mapping[Target, MethodWrapper]:
        """The component methods this hook wraps, and its wrapper for each."""
        return {}

    def call_started(self, ctx: CallContext) -> None:
        """Before the pipeline runs (outermost hook first). May block (a safe-point gate)."""

    def call_finished(self, ctx: CallContext) -> None:
        """After it returned or raised (innermost hook first); ctx.output or ctx.error is set."""

    def step_module_called(self, ctx: CallContext, name: str) -> None:
        """A denoiser (or controlnet) forward is about to run; before any other forward pre-hook."""


@dataclass
class _Patch:
    owner: Any
    method: str
    target: Target
    had_instance_attr: bool
    saved: Any


class HookRegistry:
    """The hooks of one pipeline instance. Thread-safe to call from several threads, one call at a time
    per pipeline (diffusers pipelines do not support concurrent calls on one object)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._original_class: type = type(pipe)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._hooks: dict[str, PipelineHook] = {}
        self._ordered: tuple[PipelineHook, ...] = ()
        self._patches: dict[tuple[int, str], _Patch] = {}
        self._targets_alive: list[Any] = []  # keeps patched owners alive so their ids stay unique
        self._module_hooks: dict[int, tuple[Any, Any]] = {}  # id(module) → (module, RemovableHandle)
        self._installed = False

    # -- lookup ----------------------------------------------------------------------------------------

    @classmethod
    def of(cls, pipe: Any) -> HookRegistry:
        """The pipeline's registry, created (but not yet installed) if it has none."""
        existing = cls.get(pipe)
        return existing if existing is not None else cls(pipe)

    @staticmethod
    def get(pipe: Any) -> HookRegistry | None:
        registry = getattr(type(pipe), _REGISTRY_ATTR, None)
        return registry if isinstance(registry, HookRegistry) else None

    @property
    def original_class(self) -> type:
        return self._original_class

    def hook(self, name: str) -> PipelineHook | None:
        with self._lock:
            return self._hooks.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(h.name for h in self._ordered)

    def context(self) -> CallContext | None:
        """The call in progress on this thread, or None."""
        ctx: CallContext | None = getattr(self._local, "ctx", None)
        return ctx

    # -- registration ----------------------------------------------------------------------------------

    def register(self, hook: PipelineHook) -> None:
        if not hook.name:
            raise ValueError(f"{type(hook).__name__} has no name")
        with self._lock:
            if hook.name in self._hooks:
                raise ValueError(f"{hook.name} is already applied to this pipeline; remove it first")
            self._hooks[hook.name] = hook
            self._ordered = tuple(sorted(self._hooks.values(), key=lambda h: -h.priority))
            if not self._installed:
                self._install()
            self._ensure_patched()

    def remove(self, name: str) -> None:
        """Take one hook off; the last one restores the pipeline exactly. Idempotent."""
        with self._lock:
            if self._hooks.pop(name, None) is None:
                return
            self._ordered = tuple(sorted(self._hooks.values(), key=lambda h: -h.priority))
            if not self._hooks:
                self._uninstall()

    # -- installation ----------------------------------------------------------------------------------

    def _install(self) -> None:
        original = self._original_class
        registry = self

        @functools.wraps(original.__call__)
        def __call__(pipe_self: Any, *args: Any, **kwargs: Any) -> Any:
            return registry._call(pipe_self, args, kwargs)

        subclass = type(
            original.__name__,
            (original,),
            {
                "__call__": __call__,
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                _REGISTRY_ATTR: self,
            },
        )
        object.__setattr__(self._pipe, "__class__", subclass)
        self._installed = True

    def _uninstall(self) -> None:
        for patch in list(self._patches.values()):
            self._restore(patch)
        self._patches.clear()
        for _module, handle in self._module_hooks.values():
            handle.remove()
        self._module_hooks.clear()
        self._targets_alive.clear()
        if getattr(type(self._pipe), _REGISTRY_ATTR, None) is self:
            object.__setattr__(self._pipe, "__class__", self._original_class)
        else:
            log.warning("pipeline class was changed after zmon instrumented it; not restoring it")
        self._installed = False

    def _ensure_patched(self) -> None:
        """Patch the pipeline's current components (again after one was swapped, e.g. a new scheduler)."""
        wanted = {target for hook in self._ordered for target in hook.methods()}
        for target in wanted:
            component, method = target
            owner = self._pipe if not component else getattr(self._pipe, component, None)
            if owner is None or (id(owner), method) in self._patches:
                continue
            if not callable(getattr(owner, method, None)):
                continue
            self._patch(owner, method, target)
        for name in STEP_MODULE_NAMES:
            module = getattr(self._pipe, name, None)
            if isinstance(module, torch.nn.Module) and id(module) not in self._module_hooks:
                handle = module.register_forward_pre_hook(functools.partial(self._step_module, name), prepend=True)
                self._module_hooks[id(module)] = (module, handle)
                self._targets_alive.append(module)

    def _patch(self, owner: Any, method: str, target: Target) -> None:
        current = vars(owner).get(method, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        had = current is not _MISSING
        inner: Callable[..., Any] = current if had else getattr(owner, method)  # type: ignore[assignment]
        registry = self

        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return registry._dispatch(target, inner, args, kwargs)

        wrapper.__zmon_registry__ = self  # type: ignore[attr-defined]
        object.__setattr__(owner, method, wrapper)
        self._patches[(id(owner), method)] = _Patch(owner, method, target, had, current if had else None)
        self._targets_alive.append(owner)

    def _restore(self, patch: _Patch) -> None:
        current = vars(patch.owner).get(patch.method, _MISSING)
        if getattr(current, "__zmon_registry__", None) is not self:
            log.debug("%s.%s was replaced by someone else; left as is", type(patch.owner).__name__, patch.method)
            return
        if patch.had_instance_attr:
            object.__setattr__(patch.owner, patch.method, patch.saved)
        else:
            object.__delattr__(patch.owner, patch.method)

    # -- dispatch --------------------------------------------------------------------------------------

    def _dispatch(
        self, target: Target, inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx = self.context()
        call: Callable[..., Any] = inner
        for hook in reversed(self._ordered):  # innermost first, so the outermost wraps everything
            wrap = hook.methods().get(target)
            if wrap is not None:
                call = functools.partial(wrap, ctx, call)
        return call(*args, **kwargs)

    def _step_module(self, name: str, module: Any, args: Any) -> None:
        ctx = self.context()
        if ctx is None:
            return
        for hook in self._ordered:
            try:
                hook.step_module_called(ctx, name)
            except Exception:
                log.exception("hook %s failed in step_module_called", hook.name)

    def _call(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = self._original_class.__call__
        if not self._installed or self.context() is not None:  # removed mid-flight, or re-entrant
            return call(pipe, *args, **kwargs)
        with self._lock:
            self._ensure_patched()
            hooks = self._ordered
        ctx = CallContext(pipe, args, kwargs)
        self._local.ctx = ctx
        started: list[PipelineHook] = []
        try:
            for hook in hooks:
                try:
                    hook.call_started(ctx)
                except Exception:
                    log.exception("hook %s failed in call_started", hook.name)
                started.append(hook)
            try:
                ctx.output = call(pipe, *args, **kwargs)
                return ctx.output
            except BaseException as e:
                ctx.error = e
                raise
        finally:
            self._local.ctx = None
            for hook in reversed(started):
                try:
                    hook.call_finished(ctx)
                except Exception:
                    log.exception("hook %s failed in call_finished", hook.name)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()
