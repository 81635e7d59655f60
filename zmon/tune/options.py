"""The `model:` speed options (compile, compile_vae, attention_backend, channels_last_vae, fp8, alloc_conf).

One function applies them, `apply_model_options(pipe, model_cfg)`, used by loading (`zmon run`,
`zmon profile`, `zmon tune`'s baseline) and, through `optimize(pipe, config)`, by host services that load
their own pipeline before `zmon.attach`. `zmon tune` measures the same appliers one at a time, reversibly
(each returns an undo), so what the tune timed is what the runner gets.

Order of application, and why:
  channels_last_vae → fp8 → attention_backend → compile → compile_vae
  (quantize before compiling so the compiled graph holds the float8 kernels; set the attention backend
  before compiling so the first trace already dispatches to it instead of recompiling on the change.)

`alloc_conf` is not a pipeline transformation: it must be in the environment before torch initialises
CUDA (`export_alloc_conf`, called by the CLI before anything imports torch, and by `load_pipeline`).
Once CUDA is initialised a different setting is refused with a clear message, never silently ignored.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

from zmon.config import Config, ModelConfig
from zmon.workload.spec import WorkloadError

log = logging.getLogger(__name__)

DENOISER_NAMES: Final = ("transformer", "unet")  # the module compile/fp8/attention apply to, first present wins
ALLOC_CONF_ENV: Final = "PYTORCH_CUDA_ALLOC_CONF"
NEW_ALLOC_CONF_ENV: Final = "PYTORCH_ALLOC_CONF"  # torch >= 2.9 reads it first: it would win over ours
# torch.compile backend of every compile option. Not a config key: tests and the tune's fresh processes set
# it ("eager" traces with dynamo but skips inductor codegen, which takes ~30 s for the tiny model on a CPU).
DEFAULT_COMPILE_BACKEND = "inductor"
CUDA_GRAPH_MODES: Final = ("reduce-overhead", "max-autotune")
FP8_MIN_CAPABILITY: Final = (8, 9)  # Ada / Hopper and newer have float8 tensor cores
FP8_DIM_MULTIPLE: Final = 16  # torch._scaled_mm needs both matrix dimensions divisible by 16

Undo = Callable[[], None]


class ModelOptionsError(WorkloadError):
    """A `model:` speed option that cannot apply here (device, software, process state).

    A configuration problem like a workload one, so `zmon run` reports every item and exits 2.
    """


# ------------------------------------------------------------------------------------------------ helpers


def unwrap(module: Any) -> Any:
    """The module under a torch.compile wrapper (OptimizedModule keeps it as `_orig_mod`)."""
    return getattr(module, "_orig_mod", module)


def denoiser_name(pipe: Any) -> str | None:
    """'transformer' or 'unet': the pipeline attribute holding the denoiser (a torch module)."""
    import torch

    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    return None


def pipe_device(pipe: Any) -> str:
    """Where the denoiser's weights are ('cuda:0', 'cpu'): the device generations run on."""
    name = denoiser_name(pipe)
    module = getattr(pipe, name) if name else getattr(pipe, "vae", None)
    try:
        param = next(module.parameters(), None) if module is not None else None
    except Exception:
        param = None
    return "cpu" if param is None else str(param.device)


def pipe_dtype(pipe: Any) -> Any:
    """The denoiser's parameter dtype (torch.float32 when it has none)."""
    import torch

    name = denoiser_name(pipe)
    param = next(getattr(pipe, name).parameters(), None) if name else None
    return torch.float32 if param is None else param.dtype


def is_attached(pipe: Any) -> bool:
    """True when zmon's stage timing or attach wrapper is on the pipeline (they hook the current modules)."""
    cls = type(pipe)
    return any(getattr(cls, a, None) is not None for a in ("_zmon_stage_timing", "_zmon_attach_handle"))


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


def _swap(owner: Any, name: str, value: Any) -> Undo:
    previous = getattr(owner, name)
    setattr(owner, name, value)

    def undo() -> None:
        setattr(owner, name, previous)

    return undo


# ------------------------------------------------------------------------------------------------ alloc_conf


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (False when torch is not even imported: nothing read yet)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def effective_alloc_conf(environ: MutableMapping[str, str] | None = None) -> str:
    """The allocator setting torch reads: PYTORCH_ALLOC_CONF first (torch >= 2.9), else the CUDA name."""
    env = os.environ if environ is None else environ
    return env.get(NEW_ALLOC_CONF_ENV) or env.get(ALLOC_CONF_ENV) or ""


def export_alloc_conf(alloc_conf: str | None, environ: MutableMapping[str, str] | None = None) -> bool:
    """Put `model.alloc_conf` into PYTORCH_CUDA_ALLOC_CONF for torch to read when CUDA initialises.

    Returns True when the variable was (or already is) set to it, False for None. Raises ModelOptionsError
    when CUDA is already initialised with another setting (torch reads it once), or when PYTORCH_ALLOC_CONF
    holds another value (torch would read that one instead).
    """
    if alloc_conf is None:
        return False
    env = os.environ if environ is None else environ
    newer = env.get(NEW_ALLOC_CONF_ENV)
    if newer and newer != alloc_conf:
        raise ModelOptionsError([
            f"model.alloc_conf: {NEW_ALLOC_CONF_ENV}={newer!r} is set in the environment and torch reads it "
            f"instead of {ALLOC_CONF_ENV}; unset it or make it {alloc_conf!r}"
        ])
    if effective_alloc_conf(env) == alloc_conf:
        return True
    if cuda_initialized():
        raise ModelOptionsError([
            f"model.alloc_conf: CUDA is already initialised in this process, and its caching allocator read "
            f"{ALLOC_CONF_ENV}={effective_alloc_conf(env)!r} then; start the process with "
            f"{ALLOC_CONF_ENV}={alloc_conf!r} in its environment instead"
        ])
    previous = env.get(ALLOC_CONF_ENV)
    if previous:
        log.warning("model.alloc_conf overrides %s=%r with %r", ALLOC_CONF_ENV, previous, alloc_conf)
    env[ALLOC_CONF_ENV] = alloc_conf
    torch = sys.modules.get("torch")
    if torch is not None and environ is None:
        # torch is imported but CUDA not initialised: the environment is read at initialisation, and where
        # this torch parses its allocator config earlier, the runtime setter applies it as well.
        setter = getattr(getattr(torch.cuda, "memory", None), "_set_allocator_settings", None)
        if setter is not None and torch.cuda.is_available():
            try:
                setter(alloc_conf)
            except Exception:
                log.debug("torch.cuda.memory._set_allocator_settings(%r) failed", alloc_conf, exc_info=True)
    return True


# ------------------------------------------------------------------------------------------------ appliers


def apply_compile(
    pipe: Any, *, mode: str | None = None, backend: str | None = None, cache: dict[Any, Any] | None = None
) -> Undo:
    """torch.compile the denoiser by swapping in the compiled wrapper; compilation happens at the first call.

    `cache` (the tune's) keeps each wrapper so re-applying it later reuses the compiled code instead of
    compiling again. Compiling an already compiled denoiser recompiles its original module in `mode`.
    """
    import torch

    name = denoiser_name(pipe)
    if name is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to compile")
    base = unwrap(getattr(pipe, name))
    mode = None if mode in (None, "default") else mode
    backend = backend or DEFAULT_COMPILE_BACKEND
    key = ("compile", id(base), mode, backend)
    compiled: Any = cache.get(key) if cache is not None else None
    if compiled is None:
        compiled = torch.compile(base, mode=mode, backend=backend)
        if mode in CUDA_GRAPH_MODES and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            # A denoising loop calls the graph once per step while the previous output may still be read;
            # marking each call as a new step keeps CUDA-graph trees from treating the loop as one
            # invocation (their documented remedy for "output overwritten by a subsequent run").
            compiled.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
        if cache is not None:
            cache[key] = compiled
    return _swap(pipe, name, compiled)


def apply_compile_vae(pipe: Any, *, backend: str | None = None, cache: dict[Any, Any] | None = None) -> Undo:
    """torch.compile the VAE decoder (`vae.decoder`: what `vae.decode` spends its time in)."""
    import torch

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
    return _swap(vae, "decoder", compiled)


def apply_channels_last_vae(pipe: Any) -> Undo:
    """VAE weights in channels_last (NHWC): convolution kernels that prefer it skip layout conversions."""
    import torch

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
    import torch

    try:
        q, k, v = (torch.randn(1, 32, 2, 64, device=device, dtype=dtype) for _ in range(3))
        out = ad.dispatch_attention_fn(q, k, v, backend=backend)
        if not torch.isfinite(out).all():
            return "the probe call returned non-finite values"
    except Exception as e:
        return f"not runnable on {device} ({str(dtype).removeprefix('torch.')}): {type(e).__name__}: {_short(e)}"
    return None


def apply_attention_backend(pipe: Any, name: str) -> Undo:
    """Route the denoiser's attention through diffusers' dispatcher backend `name`.

    diffusers' own reset_attention_backend() clears the per-processor choice but leaves the global active
    backend that set_attention_backend() changed, so the undo restores both exactly.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    dname = denoiser_name(pipe)
    module = unwrap(getattr(pipe, dname)) if dname else None
    if module is None or not hasattr(module, "set_attention_backend"):
        raise ValueError(f"{type(pipe).__name__}'s denoiser has no diffusers attention backend to set")
    processors = [
        (p, p.__dict__.get("_attention_backend", _MISSING))
        for m in module.modules()
        if (p := getattr(m, "processor", None)) is not None and hasattr(p, "_attention_backend")
    ]
    active = _AttentionBackendRegistry._active_backend
    with _quiet_diffusers():
        module.set_attention_backend(name)

    def undo() -> None:
        for proc, value in processors:
            if value is _MISSING:
                proc.__dict__.pop("_attention_backend", None)  # back to the class attribute
            else:
                proc._attention_backend = value
        _AttentionBackendRegistry.set_active_backend(active)

    return undo


_MISSING: Final = object()


def fp8_problem(device: str) -> str | None:
    """Why float8 quantization cannot run here, or None: a CUDA device of compute capability >= 8.9 and torchao."""
    if not device.startswith("cuda"):
        return f"float8 matmuls need a CUDA GPU of compute capability >= 8.9 (this run: {device})"
    import torch

    cap = tuple(torch.cuda.get_device_capability(torch.device(device)))
    if cap < FP8_MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(torch.device(device))} has compute capability {cap[0]}.{cap[1]} < 8.9"
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return None


def _fp8_quantize(module: Any) -> None:
    import torch
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
    """torchao float8 dynamic quantization of the denoiser's linear layers (activations and weights in fp8).

    copy_module=True quantizes a copy and swaps it in, so the undo restores the original weights (the tune;
    costs the copy's memory). False quantizes in place (zmon run): the undo cannot restore the weights and
    raises.
    """
    name = denoiser_name(pipe)
    if name is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to quantize")
    current = getattr(pipe, name)
    base = unwrap(current)
    if not copy_module:
        _fp8_quantize(base)

        def cannot_undo() -> None:
            raise RuntimeError("fp8 was applied in place; reload the pipeline to undo it")

        return cannot_undo
    key = ("fp8", id(base))
    quantized = cache.get(key) if cache is not None else None
    if quantized is None:
        quantized = copy.deepcopy(base)
        _fp8_quantize(quantized)
        if cache is not None:
            cache[key] = quantized
    return _swap(pipe, name, quantized)


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
    device = pipe_device(pipe)
    problems: list[str] = []
    if (cfg.compile or cfg.fp8) and denoiser_name(pipe) is None:
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
    compile_backend: str | None = None,
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
    """For host services: apply the configuration's `model:` speed options (what `zmon tune` recommends) to a
    pipeline the host loaded itself, the same way `zmon run` does. Call it before `zmon.attach(pipe, config)`
    (stage timing hooks the modules present when it attaches). `model.alloc_conf` cannot be applied here:
    CUDA is initialised by then, so it is checked instead (start the service with PYTORCH_CUDA_ALLOC_CONF set).

        applied = zmon.tune.optimize(pipe, load_config("zmon.yaml"))
        handle = zmon.attach(pipe, load_config("zmon.yaml"))
        ...
        applied.remove()   # undo (compile, attention, channels_last; fp8 in place cannot be undone)
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
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"
