"""The variant registry: each speed fix `zmon tune` can try, as a named, documented, reversible transformation.

A `Variant` says what it is (description, exact or lossy, fresh process or not, the exclusive group it
belongs to), when it cannot apply here (`check` returns the reason), how to switch it on for a loaded
pipeline (`apply` returns the undo), and which configuration keys it stands for (`settings`: merged into
the emitted config so `zmon run` applies the same thing through zmon.workload.options).

| name | what | exact/lossy | how |
|---|---|---|---|
| compile | torch.compile the denoiser | exact | swap in the compiled wrapper |
| cuda_graphs | compile mode reduce-overhead (CUDA graphs) | exact | swap (CUDA only) |
| compile_max_autotune | compile mode max-autotune (opt-in: long) | exact | swap |
| compile_vae | torch.compile vae.decoder | exact | swap |
| attention:<backend> | diffusers dispatcher backend | exact | set / restore backend |
| channels_last | VAE in channels_last memory format | exact | convert / convert back |
| prompt_cache | LRU of prompt embeddings | exact | hook on encode_prompt around each block |
| fp8 | torchao float8 dynamic quant of the denoiser's linears | lossy | quantized copy swapped in |
| fewer_steps | the model card's fewest steps (distilled models) | lossy | call argument |
| expandable_segments | allocator expandable segments | exact | fresh process (env before CUDA) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from zmon.config import Config, PromptCacheConfig
from zmon.tune.names import ATTENTION_BACKENDS, ATTENTION_PREFIX, VARIANT_NAMES
from zmon.workload import options as opt
from zmon.workload.alloc_conf import ALLOC_CONF_ENV
from zmon.workload.spec import WorkloadSpec
from zmon.workload.tiny import is_builtin, is_complete

Undo = Callable[[], None]

# Fewest steps a model card documents for a distilled model, keyed like loading.KNOWN_DEFAULTS (the last
# path component of the model id, lowercase). Z-Image-Turbo's card: "8 DiT forwards"; diffusers 0.42 runs
# steps=9 as 9 forwards, so steps=8 is the card's own count. The embedded tiny model mimics Z-Image-Turbo.
CARD_FEWEST_STEPS: Final[dict[str, tuple[int, str]]] = {
    "z-image-turbo": (8, "Z-Image-Turbo's model card: 8 DiT forwards"),
}


@dataclass
class TuneContext:
    """The loaded baseline a variant applies to, and state shared across variants."""

    pipe: Any
    cfg: Config  # the configuration the baseline was built from
    spec: WorkloadSpec
    model_id: str
    device: str  # "cuda:0", "cpu"
    dtype: str  # "bfloat16", "float32"
    compile_backend: Any = None  # None: zmon.workload.options.DEFAULT_COMPILE_BACKEND when applied
    cache: dict[Any, Any] = field(default_factory=dict)  # compiled / quantized modules, reused on re-apply
    overrides: dict[str, Any] = field(default_factory=dict)  # pipeline call arguments set by variants
    # The prompt cache in force (the configured one, or the prompt_cache variant's). It is a hook in the
    # pipeline's HookRegistry, which also hooks the denoiser modules present when it is registered, so the
    # bench registers it around each block of generations, after the variants swapped their modules in, and
    # removes it before they are undone (as zmon run instruments the pipeline after loading applied them).
    prompt_cache: PromptCacheConfig | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class Variant:
    """One speed fix. `apply` is None for fresh-process variants (their `env` is set before CUDA starts)."""

    name: str
    description: str
    check: Callable[[TuneContext], str | None]  # skip reason, or None when it can apply here
    settings: Callable[[TuneContext], dict[str, Any]]  # {"model": {...}, "workload": {...}}
    apply: Callable[[TuneContext], Undo] | None = None
    env: Callable[[TuneContext], dict[str, str]] | None = None
    lossy: bool = False
    fresh_process: bool = False
    group: str | None = None  # at most one variant of a group in a combination
    compiles: bool = False  # its warm-up includes a compilation (used to budget time)
    # Changes what a compiled module traced (attention dispatch, parameter layout or type): combined with a
    # compiling variant it costs a recompile (used to budget time).
    retraces: bool = False
    note: str = ""  # a caveat the report repeats


# ------------------------------------------------------------------------------------------------ checks


def _denoiser(ctx: TuneContext) -> str | None:
    return None if opt.denoiser_modules(ctx.pipe) else f"{type(ctx.pipe).__name__} has no transformer or unet"


def _compile_check(mode: str | None, cuda_only: bool) -> Callable[[TuneContext], str | None]:
    def check(ctx: TuneContext) -> str | None:
        if reason := _denoiser(ctx):
            return reason
        if cuda_only and not ctx.cuda:
            return f"CUDA graphs need a CUDA device (this run: {ctx.device})"
        m = ctx.cfg.model
        if m.compile and (m.compile_mode or "default") == (mode or "default"):
            return "already on in the configuration (the baseline has it)"
        return None

    return check


def _compile_variant(name: str, mode: str | None, description: str, *, cuda_only: bool) -> Variant:
    def apply(ctx: TuneContext) -> Undo:
        return opt.apply_compile(ctx.pipe, mode=mode, backend=ctx.compile_backend, cache=ctx.cache)

    return Variant(
        name=name,
        description=description,
        check=_compile_check(mode, cuda_only),
        settings=lambda ctx: {"model": {"compile": True, "compile_mode": mode}},
        apply=apply,
        group="denoiser_compile",
        compiles=True,
    )


def _compile_vae_check(ctx: TuneContext) -> str | None:
    if getattr(getattr(ctx.pipe, "vae", None), "decoder", None) is None:
        return f"{type(ctx.pipe).__name__} has no vae.decoder"
    return "already on in the configuration (the baseline has it)" if ctx.cfg.model.compile_vae else None


def _channels_last_check(ctx: TuneContext) -> str | None:
    if getattr(ctx.pipe, "vae", None) is None:
        return f"{type(ctx.pipe).__name__} has no vae"
    return "already on in the configuration (the baseline has it)" if ctx.cfg.model.channels_last_vae else None


def _prompt_cache_check(ctx: TuneContext) -> str | None:
    if not callable(getattr(ctx.pipe, "encode_prompt", None)):
        return f"{type(ctx.pipe).__name__} has no encode_prompt"
    if ctx.cfg.workload.prompt_cache.enabled:
        return "already on in the configuration (the baseline has it)"
    return None


def _prompt_cache_apply(ctx: TuneContext) -> Undo:
    previous = ctx.prompt_cache
    ctx.prompt_cache = PromptCacheConfig(enabled=True, max_entries=ctx.cfg.workload.prompt_cache.max_entries)

    def undo() -> None:
        ctx.prompt_cache = previous

    return undo


def _fp8_check(ctx: TuneContext) -> str | None:
    if reason := _denoiser(ctx):
        return reason
    if ctx.cfg.model.fp8:
        return "already on in the configuration (the baseline has it)"
    return opt.fp8_problem(ctx.device)


def card_fewest_steps(model_id: str) -> tuple[int, str] | None:
    """(steps, source) when a model card documents fewer steps than usual for this (distilled) model."""
    if is_builtin(model_id) or is_complete(Path(model_id).expanduser()):
        steps, _ = CARD_FEWEST_STEPS["z-image-turbo"]
        return steps, "the embedded model mimics Z-Image-Turbo's card: 8 DiT forwards"
    return CARD_FEWEST_STEPS.get(model_id.rstrip("/").rsplit("/", 1)[-1].lower())


def _fewer_steps_check(ctx: TuneContext) -> str | None:
    card = card_fewest_steps(ctx.model_id)
    if card is None:
        return f"no model card documents a shorter schedule for {ctx.model_id} (known: {', '.join(CARD_FEWEST_STEPS)})"
    if ctx.spec.steps <= card[0]:
        return f"the workload already runs {ctx.spec.steps} steps (card: {card[0]})"
    return None


def _fewer_steps_apply(ctx: TuneContext) -> Undo:
    card = card_fewest_steps(ctx.model_id)
    assert card is not None
    previous = ctx.overrides.get("num_inference_steps")
    ctx.overrides["num_inference_steps"] = card[0]

    def undo() -> None:
        if previous is None:
            ctx.overrides.pop("num_inference_steps", None)
        else:
            ctx.overrides["num_inference_steps"] = previous

    return undo


def _fewer_steps_settings(ctx: TuneContext) -> dict[str, Any]:
    card = card_fewest_steps(ctx.model_id)
    return {"workload": {"steps": card[0] if card else ctx.spec.steps}}


EXPANDABLE: Final = "expandable_segments:True"


def expandable_alloc_conf(current: str | None) -> str:
    """The configured alloc_conf with expandable_segments:True added (or alone)."""
    items = [i.strip() for i in (current or "").split(",") if i.strip() and not i.strip().startswith("expandable")]
    return ",".join([*items, EXPANDABLE])


def _expandable_check(ctx: TuneContext) -> str | None:
    if not ctx.cuda:
        return f"a CUDA caching-allocator setting (this run: {ctx.device})"
    current = ctx.cfg.model.alloc_conf or ""
    if "expandable_segments:true" in current.lower().replace(" ", ""):
        return "already on in the configuration (the baseline has it)"
    if "max_split_size_mb" in current:
        return "model.alloc_conf sets max_split_size_mb, which must not be combined with expandable_segments"
    return None


def _attention_variant(backend: str) -> Variant:
    def check(ctx: TuneContext) -> str | None:
        if reason := _denoiser(ctx):
            return reason
        if backend == (ctx.cfg.model.attention_backend or "native"):
            return "is the baseline's backend"
        if backend.endswith("_hub"):
            return "fetches its kernel from the Hugging Face Hub at first use; zmon tune does not download"
        return opt.attention_problem(backend, ctx.device, opt.pipe_dtype(ctx.pipe))

    return Variant(
        name=ATTENTION_PREFIX + backend,
        description=f"diffusers attention dispatcher backend {backend!r} for the denoiser "
        "(transformer.set_attention_backend)",
        check=check,
        settings=lambda ctx: {"model": {"attention_backend": backend}},
        apply=lambda ctx: opt.apply_attention_backend(ctx.pipe, backend),
        group="attention",
        retraces=True,
    )


_FIXED: Final[dict[str, Variant]] = {
    v.name: v
    for v in (
        _compile_variant(
            "compile", None, "torch.compile the denoiser (default mode: inductor kernels, fusion)", cuda_only=False
        ),
        _compile_variant(
            "cuda_graphs",
            "reduce-overhead",
            "torch.compile the denoiser in reduce-overhead mode: "
            "CUDA graphs replay each step's kernels without per-launch CPU cost",
            cuda_only=True,
        ),
        _compile_variant(
            "compile_max_autotune",
            "max-autotune",
            "torch.compile the denoiser in max-autotune "
            "mode (benchmarks GEMM/conv configs, CUDA graphs; compiles for many minutes)",
            cuda_only=False,
        ),
        Variant(
            name="compile_vae",
            description="torch.compile the VAE decoder (vae.decoder)",
            check=_compile_vae_check,
            settings=lambda ctx: {"model": {"compile_vae": True}},
            apply=lambda ctx: opt.apply_compile_vae(ctx.pipe, backend=ctx.compile_backend, cache=ctx.cache),
            compiles=True,
        ),
        Variant(
            name="channels_last",
            description="VAE weights and activations in channels_last (NHWC) memory format",
            check=_channels_last_check,
            settings=lambda ctx: {"model": {"channels_last_vae": True}},
            apply=lambda ctx: opt.apply_channels_last_vae(ctx.pipe),
            retraces=True,
        ),
        Variant(
            name="prompt_cache",
            description="reuse prompt embeddings (LRU over encode_prompt): text encoding once per distinct prompt",
            check=_prompt_cache_check,
            settings=lambda ctx: {"workload": {"prompt_cache": {"enabled": True}}},
            apply=_prompt_cache_apply,
            note="every timed generation repeats the same prompt, so it is measured on cache hits: the gain "
            "appears in service only for repeated prompts",
        ),
        Variant(
            name="fp8",
            description="torchao float8 dynamic quantization of the denoiser's linear layers (weights and "
            "activations in fp8; GPUs of compute capability >= 8.9)",
            check=_fp8_check,
            settings=lambda ctx: {"model": {"fp8": True}},
            apply=lambda ctx: opt.apply_fp8(ctx.pipe, copy_module=True, cache=ctx.cache),
            lossy=True,
            retraces=True,
        ),
        Variant(
            name="fewer_steps",
            description="the fewest denoising steps the model card documents for this distilled model",
            check=_fewer_steps_check,
            settings=_fewer_steps_settings,
            apply=_fewer_steps_apply,
            lossy=True,
        ),
        Variant(
            name="expandable_segments",
            description="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set before CUDA starts: a fresh "
            "process, compared with a fresh-process control)",
            check=_expandable_check,
            settings=lambda ctx: {"model": {"alloc_conf": expandable_alloc_conf(ctx.cfg.model.alloc_conf)}},
            env=lambda ctx: {ALLOC_CONF_ENV: expandable_alloc_conf(ctx.cfg.model.alloc_conf)},
            fresh_process=True,
        ),
    )
}
assert set(_FIXED) == set(VARIANT_NAMES), "names.VARIANT_NAMES and the registry must agree"


def build_variant(name: str) -> Variant:
    """The registered variant `name` ('compile', 'attention:_native_cudnn', ...); KeyError when unknown."""
    if name in _FIXED:
        return _FIXED[name]
    if name.startswith(ATTENTION_PREFIX) and name[len(ATTENTION_PREFIX) :] in ATTENTION_BACKENDS:
        return _attention_variant(name[len(ATTENTION_PREFIX) :])
    raise KeyError(name)


def registry() -> dict[str, Variant]:
    """Every fixed variant by name (attention variants are built per backend by build_variant)."""
    return dict(_FIXED)
