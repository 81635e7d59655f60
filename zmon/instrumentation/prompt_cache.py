"""Prompt-embedding cache: an LRU over pipe.encode_prompt, the fix for CPU-bound text encoding."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from zmon.config import PromptCacheConfig
from zmon.instrumentation.hooks import CallContext, HookRegistry, MethodWrapper, PipelineHook, Target
from zmon.instrumentation.stages import PROMPT_CACHE_NOTE

log = logging.getLogger(__name__)

_TOKENS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_TOKEN_COUNTER = itertools.count(1)
_TOKEN_LOCK = threading.Lock()


class _Unhashable(Exception):
    """An encode_prompt argument that cannot be part of a key (a tensor: precomputed embeddings)."""


class PromptCacheHandle(PipelineHook):
    """The prompt-cache hook, returned by apply_prompt_cache: counters, clear() and remove().

    Cached embeddings are shared between hits: treat the tensors encode_prompt returns as read-only (the
    containers — lists, tuples — are fresh on every call). Call clear() after changing text-encoder weights
    in place (LoRA, adapters): the key knows the encoder object, not its weights.
    """

    name: ClassVar[str] = "prompt_cache"
    priority: ClassVar[int] = 10  # inside stage timing: a hit still shows as a (short) text_encode stage

    def __init__(self, pipe: Any, max_entries: int, *, clone_tensors: bool = False) -> None:
        self._pipe = pipe
        self.max_entries = max_entries
        self.clone_tensors = clone_tensors
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._registry: HookRegistry | None = None
        self._signature: inspect.Signature | None = None
        self._methods: dict[Target, MethodWrapper] = {("", "encode_prompt"): self._encode}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bypasses = 0  # calls with precomputed embeddings or arguments that cannot be keyed

    @property
    def size(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def methods(self) -> Mapping[Target, MethodWrapper]:
        return self._methods

    def remove(self) -> None:
        """Restore pipe.encode_prompt and drop the cached tensors; idempotent."""
        if self._registry is not None:
            self._registry.remove(self.name)
            self._registry = None
        self.clear()

    def _install(self) -> None:
        self._signature = inspect.signature(self._pipe.encode_prompt)
        registry = HookRegistry.of(self._pipe)
        registry.register(self)
        self._registry = registry

    def _encode(self, ctx: CallContext | None, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        if key is None:
            with self._lock:
                self.bypasses += 1
            return inner(*args, **kwargs)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if cached is not None:
            if ctx is not None:
                ctx.note(PROMPT_CACHE_NOTE, True)
            return _copy(cached, clone=self.clone_tensors)
        result = inner(*args, **kwargs)
        with self._lock:
            self.misses += 1
            self._entries[key] = _copy(result, clone=False)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1
        if ctx is not None:
            ctx.note(PROMPT_CACHE_NOTE, False)
        return result

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """sha256 over every encode_prompt argument and the text encoders' identity, dtype and device."""
        assert self._signature is not None
        try:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            parts = [f"{name}={_canonical(value)}" for name, value in bound.arguments.items()]
        except (TypeError, _Unhashable):
            return None
        parts.extend(self._encoder_identity())
        return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()

    def _encoder_identity(self) -> list[str]:
        out = []
        components = getattr(self._pipe, "components", {}) or {}
        for name, component in sorted(components.items()):
            if component is None or not name.startswith(("text_encoder", "tokenizer")):
                continue
            dtype = getattr(component, "dtype", None)
            device = getattr(component, "device", None)
            out.append(f"{name}#{_token(component)}:{dtype}:{device}")
        return out


def apply_prompt_cache(
    pipe: Any, config: PromptCacheConfig | None = None, *, clone_tensors: bool = False
) -> PromptCacheHandle:
    """Cache pipe.encode_prompt's results in an LRU of config.max_entries (a no-op handle if not enabled).

    Keyed by prompt, negative prompt and every other encode_prompt argument (max_sequence_length,
    num_images_per_prompt, do_classifier_free_guidance, device, ...) plus the text encoders' identity, dtype
    and device. Calls that pass precomputed embeddings bypass the cache. Composes with apply_stage_timing in
    either order: stage timing always wraps the cache, so a hit still shows as a (short) text_encode stage and
    the record's prompt_cache_hit says whether every lookup of that generation hit. Raises ValueError if a
    prompt cache is already applied to the pipeline.
    """
    config = config or PromptCacheConfig(enabled=True)
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise ValueError(f"{type(pipe).__name__} has no encode_prompt method to cache")
    registry = HookRegistry.get(pipe)
    if registry is not None and registry.hook(PromptCacheHandle.name) is not None:
        raise ValueError("a prompt cache is already applied to this pipeline; remove() it first")
    handle = PromptCacheHandle(pipe, config.max_entries, clone_tensors=clone_tensors)
    if config.enabled:
        handle._install()
    return handle


def _token(obj: Any) -> int:
    """A number unique to obj for its lifetime (unlike id(), never reused by a later object)."""
    with _TOKEN_LOCK:
        try:
            token = _TOKENS.get(obj)
            if token is None:
                token = _TOKENS[obj] = next(_TOKEN_COUNTER)
            return token
        except TypeError:  # not weak-referenceable
            return id(obj)


def _canonical(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ",".join(_canonical(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, (torch.device, torch.dtype)):
        return f"<{value}>"
    raise _Unhashable(type(value).__name__)


def _copy(value: Any, *, clone: bool) -> Any:
    """Fresh containers around the same (or cloned) tensors."""
    if isinstance(value, torch.Tensor):
        return value.clone() if clone else value
    if isinstance(value, list):
        return [_copy(v, clone=clone) for v in value]
    if isinstance(value, tuple):
        items = [_copy(v, clone=clone) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: _copy(v, clone=clone) for k, v in value.items()}
    return value
