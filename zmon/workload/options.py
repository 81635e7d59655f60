"""The `model:` speed options (compile, compile_vae, attention_backend, channels_last_vae, fp8), applied in one place.

`apply_model_options(pipe, model_cfg)` is what loading calls (`zmon run`, `zmon profile`, `zmon tune`'s
baseline), and what `zmon.tune.optimize(pipe, config)` calls for host services that load their own pipeline
before `zmon.attach`. `zmon tune` measures the same appliers one at a time, reversibly (each returns an
undo), so what the tune timed is what the runner gets.

Order of application, and why:
  channels_last_vae → fp8 → attention_backend → compile → compile_vae
  (quantize before compiling so the compiled graph holds the float8 kernels; set the attention backend
  before compiling so the first trace already dispatches to it instead of recompiling on the change.)
Every denoiser the pipeline has (zmon.instrumentation.anatomy: transformer, transformer_2, unet) gets the
denoiser options. `model.alloc_conf` is not a pipeline transformation: see zmon.workload.alloc_conf.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

import torch

from zmon.config import Config, ModelConfig
from zmon.instrumentation import anatomy
from zmon.instrumentation.hooks import HookRegistry
from zmon.providers import cuda
from zmon.workload.alloc_conf import ALLOC_CONF_ENV, ModelOptionsError, effective_alloc_conf

log = logging.getLogger(__name__)

# torch.compile backend of every compile option. Not a config key: tests and the tune's dry runs set it
# ("eager" traces with dynamo but skips inductor codegen, which takes ~30 s for the tiny model on a CPU).
DEFAULT_COMPILE_BACKEND: Any = "inductor"
CUDA_GRAPH_MODES: Final = ("reduce-overhead", "max-autotune")
FP8_MIN_CAPABILITY: Final = (8, 9)  # Ada / Hopper and newer have float8 tensor cores
FP8_DIM_MULTIPLE: Final = 16  # torch._scaled_mm needs both matrix dimensions divisible by 16

Undo = Callable[[], None]

__all__ = [
    "AppliedOptions",
    "ModelOptionsError",
    "apply_model_options",
    "model_option_problems",
    "optimize",
]


# ------------------------------------------------------------------------------------------------ helpers


def unwrap(module: Any) -> Any:
    """The module under a torch.compile wrapper (OptimizedModule keeps it as `_orig_mod`)."""
    return getattr(module, "_orig_mod", module)


def denoiser_modules(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """(attribute, module) of every denoiser that is a torch module (compiled wrappers included)."""
    return [(n, m) for n, m in anatomy.denoisers(pipe) if isinstance(m, torch.nn.Module)]


def pipe_dtype(pipe: Any) -> torch.dtype:
    """The denoiser's parameter dtype (torch.float32 when it has none)."""
    name = anatomy.dtype(pipe)
    value = getattr(torch, name, None) if name else None
    return value if isinstance(value, torch.dtype) else torch.float32


def is_attached(pipe: Any) -> bool:
    """True when a zmon hook (stage timing, prompt cache, attach) is on the pipeline: they hook the modules
    present when they were registered."""
    return HookRegistry.get(pipe) is not None


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """set/reset_attention_backend log an 'experimental feature' warning on every call: once is enough."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _swap_all(owner: Any, values: dict[str, Any]) -> Undo:
    """setattr(owner, name, value) for each; the undo puts the previous objects back."""
    previous = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)

    def undo() -> None:
        for name, value in previous.items():
            setattr(owner, name, value)

    return undo


# ------------------------------------------------------------------------------------------------ appliers


def apply_compile(
    pipe: Any, *, mode: str | None = None, backend: Any = None, cache: dict[Any, Any] | None = None
) -> Undo:
    """torch.compile every denoiser by swapping in the compiled wrapper; compilation happens at the first call.

    `cache` (the tune's) keeps each wrapper so re-applying it later reuses the compiled code instead of
    compiling again. Compiling an already compiled denoiser recompiles its original module in `mode`.
    """
    found = denoiser_modules(pipe)
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to compile")
    mode = None if mode in (None, "default") else mode
    backend = backend or DEFAULT_COMPILE_BACKEND
    swapped: dict[str, Any] = {}
    for name, module in found:
        base = unwrap(module)
        key = ("compile", id(base), mode, backend)
        compiled: Any = cache.get(key) if cache is not None else None
        if compiled is None:
            compiled = torch.compile(base, mode=mode, backend=backend)
            if mode in CUDA_GRAPH_MODES and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                # A denoising loop calls the graph once per step while the previous output may still be
                # read; marking each call as a new step keeps CUDA-graph trees from treating the loop as one
                # invocation (their documented remedy for "output overwritten by a subsequent run").
                compiled.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
            if cache is not None:
                cache[key] = compiled
        swapped[name] = compiled
    return _swap_all(pipe, swapped)


def apply_compile_vae(pipe: Any, *, backend: Any = None, cache: dict[Any, Any] | None = None) -> Undo:
    """torch.compile the VAE decoder (`vae.decoder`: what `vae.decode` spends its time in)."""
    vae = getattr(pipe, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no vae.decoder to compile")
    base = unwrap(decoder)
    backend = backend or DEFAULT_COMPILE_BACKEND
    key = ("compile_vae", id(base), backend)
    compiled = cache.get(key) if cache is not None else None
    if compiled is None:
        compiled = torch.compile(base, backend=backend)
        if cache is not None:
            cache[key] = compiled
    return _swap_all(vae, {"decoder": compiled})


def apply_channels_last_vae(pipe: Any) -> Undo:
    """VAE weights in channels_last (NHWC): convolution kernels that prefer it skip layout conversions."""
    if not isinstance(getattr(pipe, "vae", None), torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no vae")
    vae: Any = pipe.vae  # Any: nn.Module.to's stubs lack memory_format, which it accepts (4-D parameters)
    vae.to(memory_format=torch.channels_last)

    def undo() -> None:
        vae.to(memory_format=torch.contiguous_format)

    return undo


def attention_problem(name: str, device: str, dtype: Any, *, probe: bool = True) -> str | None:
    """Why diffusers' attention backend `name` cannot run here, or None.

    Checks that the installed diffusers registers it and that its package requirements hold, then (probe)
    runs one small attention call through the dispatcher on the device in the pipeline's dtype: a backend
    that errors there cannot run this pipeline. The probe passes no mask, as Z-Image does for a batch of
    one (its mask only exists when sequences of a batch differ in length); a backend that cannot take the
    pipeline's real arguments fails in its warm-up and is rejected there with the error.
    """
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError as e:
        return f"this diffusers has no attention dispatcher ({e})"
    try:
        backend = ad.AttentionBackendName(name)
    except ValueError:
        return f"diffusers {_version('diffusers')} has no attention backend {name!r}"
    if backend not in ad._AttentionBackendRegistry._backends:
        return f"not registered by diffusers {_version('diffusers')}"
    try:
        ad._check_attention_backend_requirements(backend)
    except Exception as e:
        return str(e)
    if not probe:
        return None
    try:
        q, k, v = (torch.randn(1, 32, 2, 64, device=device, dtype=dtype) for _ in range(3))
        out = ad.dispatch_attention_fn(q, k, v, backend=backend)
        if not torch.isfinite(out).all():
            return "the probe call returned non-finite values"
    except Exception as e:
        return f"not runnable on {device} ({str(dtype).removeprefix('torch.')}): {type(e).__name__}: {_short(e)}"
    return None


_MISSING: Final = object()


def apply_attention_backend(pipe: Any, name: str) -> Undo:
    """Route every denoiser's attention through diffusers' dispatcher backend `name`.

    diffusers' own reset_attention_backend() clears the per-processor choice but leaves the global active
    backend that set_attention_backend() changed, so the undo restores both exactly.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    modules = [unwrap(m) for _, m in denoiser_modules(pipe)]
    modules = [m for m in modules if hasattr(m, "set_attention_backend")]
    if not modules:
        raise ValueError(f"{type(pipe).__name__}'s denoiser has no diffusers attention backend to set")
    processors = [
        (p, p.__dict__.get("_attention_backend", _MISSING))
        for module in modules
        for m in module.modules()
        if (p := getattr(m, "processor", None)) is not None and hasattr(p, "_attention_backend")
    ]
    active = _AttentionBackendRegistry._active_backend

    def undo() -> None:
        for proc, value in processors:
            if value is _MISSING:
                proc.__dict__.pop("_attention_backend", None)  # back to the class attribute
            else:
                proc._attention_backend = value
        _AttentionBackendRegistry.set_active_backend(active)

    try:
        with _quiet_diffusers():
            for module in modules:
                module.set_attention_backend(name)
    except BaseException:
        undo()
        raise
    return undo


def fp8_problem(device: str) -> str | None:
    """Why float8 quantization cannot run here, or None: a CUDA device of compute capability >= 8.9 and torchao."""
    if not device.startswith("cuda"):
        return f"float8 matmuls need a CUDA GPU of compute capability >= 8.9 (this run: {device})"
    cap = cuda.capability(torch.device(device))
    if cap < FP8_MIN_CAPABILITY:
        return f"{cuda.device_name(torch.device(device))} has compute capability {cap[0]}.{cap[1]} < 8.9"
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return None


def _fp8_quantize(module: Any) -> None:
    from torchao.quantization import quantize_

    try:  # torchao >= 0.9
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        config: Any = Float8DynamicActivationFloat8WeightConfig()
    except ImportError:  # older torchao
        from torchao.quantization import float8_dynamic_activation_float8_weight

        config = float8_dynamic_activation_float8_weight()

    def eligible(m: Any, fqn: str) -> bool:
        return (
            isinstance(m, torch.nn.Linear)
            and m.in_features % FP8_DIM_MULTIPLE == 0
            and m.out_features % FP8_DIM_MULTIPLE == 0
        )

    quantize_(module, config, filter_fn=eligible)


def apply_fp8(pipe: Any, *, copy_module: bool, cache: dict[Any, Any] | None = None) -> Undo:
    """torchao float8 dynamic quantization of every denoiser's linear layers (activations and weights in fp8).

    copy_module=True quantizes copies and swaps them in, so the undo restores the original weights (the tune;
    costs the copies' memory). False quantizes in place (zmon run): the undo cannot restore the weights and
    raises.
    """
    found = denoiser_modules(pipe)
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to quantize")
    if not copy_module:
        for _, module in found:
            _fp8_quantize(unwrap(module))

        def cannot_undo() -> None:
            raise RuntimeError("fp8 was applied in place; reload the pipeline to undo it")

        return cannot_undo
    swapped: dict[str, Any] = {}
    for name, module in found:
        base = unwrap(module)
        key = ("fp8", id(base))
        quantized = cache.get(key) if cache is not None else None
        if quantized is None:
            quantized = copy.deepcopy(base)
            _fp8_quantize(quantized)
            if cache is not None:
                cache[key] = quantized
        swapped[name] = quantized
    return _swap_all(pipe, swapped)


# ------------------------------------------------------------------------------------------------ all at once


@dataclass
class AppliedOptions:
    """What apply_model_options did; `remove()` undoes it (newest first) where the option allows."""

    applied: list[str] = field(default_factory=list)  # e.g. ["attention_backend=_native_cudnn", "compile"]
    compiled: bool = False
    _undo: list[Undo] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.applied.clear()
        self.compiled = False


def model_option_problems(pipe: Any, cfg: ModelConfig) -> list[str]:
    """Every `model:` speed option that cannot apply to this pipeline here, each as 'model.key: reason'."""
    device = anatomy.pipeline_device(pipe)
    problems: list[str] = []
    if (cfg.compile or cfg.fp8) and not denoiser_modules(pipe):
        problems.append(f"model.compile/fp8: {type(pipe).__name__} has no transformer or unet")
    if cfg.compile_vae and getattr(getattr(pipe, "vae", None), "decoder", None) is None:
        problems.append(f"model.compile_vae: {type(pipe).__name__} has no vae.decoder")
    if cfg.channels_last_vae and getattr(pipe, "vae", None) is None:
        problems.append(f"model.channels_last_vae: {type(pipe).__name__} has no vae")
    if cfg.fp8 and (reason := fp8_problem(device)):
        problems.append(f"model.fp8: {reason}")
    if cfg.attention_backend is not None:
        hub = cfg.attention_backend.endswith("_hub")  # fetched from the Hub on first use: not probed
        reason = attention_problem(cfg.attention_backend, device, pipe_dtype(pipe), probe=not hub)
        if reason:
            problems.append(f"model.attention_backend: {cfg.attention_backend}: {reason}")
    if cfg.alloc_conf is not None and device.startswith("cuda") and effective_alloc_conf() != cfg.alloc_conf:
        problems.append(
            f"model.alloc_conf: this process runs with {ALLOC_CONF_ENV}={effective_alloc_conf()!r}; torch reads "
            f"it once, when CUDA initialises: start the process with {ALLOC_CONF_ENV}={cfg.alloc_conf!r}"
        )
    return problems


def apply_model_options(
    pipe: Any,
    cfg: ModelConfig,
    *,
    compile_backend: Any = None,
    cache: dict[Any, Any] | None = None,
    fp8_copy: bool = False,
) -> AppliedOptions:
    """Apply every `model:` speed option set in `cfg` to `pipe`, in the order the module docstring gives.

    Checks everything first and raises ModelOptionsError listing every problem, so a failed check leaves the
    pipeline untouched. Compilation itself happens at the first generation (errors surface there).
    """
    problems = model_option_problems(pipe, cfg)
    if problems:
        raise ModelOptionsError(problems)
    out = AppliedOptions()
    steps: list[tuple[bool, str, Callable[[], Undo]]] = [
        (cfg.channels_last_vae, "channels_last_vae", lambda: apply_channels_last_vae(pipe)),
        (cfg.fp8, "fp8", lambda: apply_fp8(pipe, copy_module=fp8_copy, cache=cache)),
        (
            cfg.attention_backend is not None,
            f"attention_backend={cfg.attention_backend}",
            lambda: apply_attention_backend(pipe, str(cfg.attention_backend)),
        ),
        (
            cfg.compile,
            "compile" + (f"(mode={cfg.compile_mode})" if cfg.compile_mode else ""),
            lambda: apply_compile(pipe, mode=cfg.compile_mode, backend=compile_backend, cache=cache),
        ),
        (cfg.compile_vae, "compile_vae", lambda: apply_compile_vae(pipe, backend=compile_backend, cache=cache)),
    ]
    try:
        for enabled, label, apply in steps:
            if enabled:
                out._undo.append(apply())
                out.applied.append(label)
    except BaseException:
        with contextlib.suppress(Exception):
            out.remove()
        raise
    out.compiled = bool(cfg.compile)
    if out.applied:
        log.info("model options applied: %s", ", ".join(out.applied))
    return out


def optimize(pipe: Any, config: Config | ModelConfig | None = None, **kwargs: Any) -> AppliedOptions:
    """Apply the configuration's `model:` speed options to a pipeline a host loaded itself (zmon.tune.optimize).

    Refuses a pipeline zmon is attached to: its hooks sit on the modules present when it attached.
    """
    if is_attached(pipe):
        raise RuntimeError("zmon is attached to this pipeline: call optimize() before zmon.attach()")
    model_cfg = config.model if isinstance(config, Config) else (config or ModelConfig())
    return apply_model_options(pipe, model_cfg, **kwargs)


# ------------------------------------------------------------------------------------------------ misc


def _short(e: BaseException, limit: int = 240) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:limit]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
