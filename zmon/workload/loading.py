"""Pipeline loading for `zmon run` / `zmon profile`: builtin, hub or local model → LoadedPipeline."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from zmon.config import ModelConfig
from zmon.providers import cuda
from zmon.workload.alloc_conf import export_alloc_conf
from zmon.workload.options import apply_model_options
from zmon.workload.tiny import TINY_DEFAULTS, ensure_builtin, is_builtin, is_complete, quiet_hf_progress

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


class ModelDefaults(TypedDict):
    """How a model is meant to be run: what `zmon run` uses when the config leaves a field null."""

    resolution: tuple[int, int]  # (width, height) in pixels
    steps: int  # num_inference_steps
    guidance_scale: float
    distilled: bool  # few-step, guidance-free model: the pipeline's own defaults would be a misconfiguration


# Model-card recommendations, keyed by the hub id's (or local directory's) last path component, lowercase.
# Z-Image-Turbo: 1024², num_inference_steps=9 (the card's "8 DiT forwards"), guidance 0.0.
KNOWN_DEFAULTS: dict[str, ModelDefaults] = {
    "z-image-turbo": {"resolution": (1024, 1024), "steps": 9, "guidance_scale": 0.0, "distilled": True},
}
TINY_MODEL_DEFAULTS: ModelDefaults = {
    "resolution": TINY_DEFAULTS["resolution"],
    "steps": TINY_DEFAULTS["steps"],
    "guidance_scale": TINY_DEFAULTS["guidance_scale"],
    "distilled": True,  # mimics Z-Image-Turbo
}


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline ready to generate, and what loading it cost."""

    pipe: Any  # a diffusers.DiffusionPipeline
    model_id: str  # as configured ("builtin:tiny-z-image", a hub id or a directory)
    class_name: str  # e.g. "ZImagePipeline"
    device: str  # e.g. "cuda", "cpu"
    dtype: str  # e.g. "bfloat16"
    load_seconds: float  # from_pretrained + moving to the device (compilation happens at the first call)
    checkpoint_bytes: int | None  # weight files read (None: the local snapshot could not be found)
    read_bytes_per_second: float | None  # checkpoint_bytes / load_seconds: < 500 MB/s points at I/O
    compiled: bool
    path: Path | None = None  # the local directory the weights came from


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when available, else 'cpu'; anything else unchanged."""
    if device != "auto":
        return device
    return "cuda" if cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """'auto' → bfloat16 on CUDA, float32 elsewhere; returns a torch.dtype."""
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return getattr(torch, dtype)


def load_pipeline(cfg: ModelConfig, *, img2img: bool = False) -> LoadedPipeline:
    """Load cfg.id (building the embedded model first if needed), move it to the device, apply the speed options.

    The class comes from the model's model_index.json (DiffusionPipeline auto-detection); img2img picks the
    image-to-image variant through AutoPipelineForImage2Image (ZImagePipeline → ZImageImg2ImgPipeline);
    cfg.pipeline_class, when set, is used as given and wins over both.
    """
    export_alloc_conf(cfg.alloc_conf)  # before torch initialises CUDA; raises if it is too late
    import diffusers
    import torch

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    local_dir: Path | None
    if is_builtin(cfg.id):
        local_dir = ensure_builtin(cfg.id, cfg.cache_dir)
        source = str(local_dir)
    else:
        source = str(Path(cfg.id).expanduser()) if Path(cfg.id).expanduser().is_dir() else cfg.id
        local_dir = Path(source) if Path(source).is_dir() else None

    if cfg.pipeline_class:
        loader = getattr(diffusers, cfg.pipeline_class, None)
        if loader is None or not hasattr(loader, "from_pretrained"):
            raise ValueError(f"model.pipeline_class: diffusers has no pipeline class {cfg.pipeline_class!r}")
    elif img2img:
        loader = diffusers.AutoPipelineForImage2Image
    else:
        loader = diffusers.DiffusionPipeline

    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype, "local_files_only": cfg.local_files_only}
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    if importlib.util.find_spec("accelerate") is None:
        # What diffusers falls back to without accelerate, asked for explicitly: the same load, without its
        # warning on every start. With accelerate installed, diffusers skips random initialisation (faster).
        kwargs["low_cpu_mem_usage"] = False
        if not is_builtin(cfg.id):
            log.info("accelerate is not installed: large models load faster with it (pip install accelerate)")
    started = time.perf_counter()
    # diffusers and transformers draw loading bars on stderr; zmon logs the load instead.
    with quiet_hf_progress():
        pipe = loader.from_pretrained(source, **kwargs)
    pipe.to(device)
    if device.startswith("cuda"):
        cuda.synchronize()  # count the host→device copies in the load time
    load_seconds = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)

    # compile, compile_vae, attention_backend, channels_last_vae, fp8: one function, shared with zmon tune.
    compiled = apply_model_options(pipe, cfg).compiled

    if local_dir is None:
        local_dir = _hub_snapshot(cfg.id)
    checkpoint_bytes = checkpoint_size(local_dir, variant=cfg.variant) if local_dir is not None else None
    return LoadedPipeline(
        pipe=pipe,
        model_id=cfg.id,
        class_name=type(pipe).__name__,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        load_seconds=load_seconds,
        checkpoint_bytes=checkpoint_bytes,
        read_bytes_per_second=(checkpoint_bytes / load_seconds) if checkpoint_bytes and load_seconds else None,
        compiled=compiled,
        path=local_dir,
    )


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns since 0.4x)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present with the rename)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _hub_snapshot(model_id: str) -> Path | None:
    """The local snapshot directory of an already downloaded hub model (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache in a form we can find
        log.debug("no local snapshot found for %s", model_id, exc_info=True)
        return None


def checkpoint_size(model_dir: Path, *, variant: str | None = None) -> int:
    """Bytes of the weight files diffusers reads for this pipeline directory.

    Per component listed in model_index.json: safetensors if the folder has any (else .bin), the requested
    variant's files if it has them (else the plain ones), shards included. Symlinks (hub cache) are followed.
    """
    model_dir = Path(model_dir)
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    except (OSError, ValueError):
        components = [p.name for p in model_dir.iterdir() if p.is_dir()]
    total = 0
    for component in components:
        folder = model_dir / component
        if folder.is_dir():
            total += sum(f.stat().st_size for f in _weight_files(folder, variant))
    return total


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    files = [f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    safetensors = [f for f in files if f.name.endswith(".safetensors")]
    files = safetensors or files
    plain = [f for f in files if _variant_of(f.name) is None]
    if variant:
        return [f for f in files if _variant_of(f.name) == variant] or plain
    return plain or files


def _variant_of(filename: str) -> str | None:
    """'diffusion_pytorch_model.fp16-00001-of-00002.safetensors' → 'fp16'; plain names → None."""
    stem = filename
    for suffix in WEIGHT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    if "." not in stem:
        return None
    return _SHARD_RE.sub("", stem.rsplit(".", 1)[1]) or None


def model_defaults(pipe_or_class_name: Any, model_id: str) -> ModelDefaults:
    """Resolution, steps and guidance a model is meant to run with.

    The embedded model (by id or by its directory): TINY_DEFAULTS. Known models (Z-Image-Turbo): their
    model card. Anything else: the pipeline's own __call__ defaults (steps, guidance) and its default sample
    size where the pipeline instance exposes one (else 1024²); distilled=False.
    """
    if is_builtin(model_id) or is_complete(Path(model_id).expanduser()):  # the tiny model, by id or by path
        return TINY_MODEL_DEFAULTS.copy()
    known = KNOWN_DEFAULTS.get(model_id.rstrip("/").rsplit("/", 1)[-1].lower())
    if known is not None:
        return known.copy()

    pipe = None if isinstance(pipe_or_class_name, str) else pipe_or_class_name
    if pipe is None:
        import diffusers

        cls = getattr(diffusers, pipe_or_class_name, None)
        if cls is None:
            raise ValueError(f"diffusers has no pipeline class {pipe_or_class_name!r}")
    else:
        cls = type(pipe)
    params = inspect.signature(cls.__call__).parameters
    steps = _default(params, "num_inference_steps", 50)
    guidance = _default(params, "guidance_scale", 0.0)
    side = _default_side(pipe) or 1024
    return {
        "resolution": (side, side),
        "steps": int(steps),
        "guidance_scale": float(guidance),
        "distilled": False,
    }


def _default(params: Any, name: str, fallback: Any) -> Any:
    param = params.get(name)
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return fallback
    return param.default


def _default_side(pipe: Any) -> int | None:
    """The image side a pipeline instance generates when height/width are not given, where it says."""
    if pipe is None:
        return None
    scale = getattr(pipe, "vae_scale_factor", None)
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        unet = getattr(pipe, "unet", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(sample, int) and isinstance(scale, int):
        return sample * scale
    return None


def vae_scale_factor(pipe: Any) -> int:
    """The multiple width and height must be divisible by.

    Pipelines that patchify latents build their image processor with the VAE factor times the patch size
    (Z-Image and Flux: vae_scale_factor * 2 = 16 for the real models), so the processor's factor is the one
    that counts; pipe.vae_scale_factor otherwise; 8 when neither is there.
    """
    processor = getattr(pipe, "image_processor", None)
    factor = getattr(getattr(processor, "config", None), "vae_scale_factor", None)
    if not isinstance(factor, int):
        factor = getattr(pipe, "vae_scale_factor", None)
    return int(factor) if isinstance(factor, int) and factor > 0 else 8
