"""The embedded tiny Z-Image: build, idempotence, loading, defaults, and that it generates fast on CPU."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zmon.config import ModelConfig
from zmon.workload.loading import (
    checkpoint_size,
    load_pipeline,
    model_defaults,
    resolve_dtype,
    vae_scale_factor,
)
from zmon.workload.tiny import (
    MARKER_FILE,
    TINY_DEFAULTS,
    TINY_DIRNAME,
    TINY_MODEL_ID,
    build_tiny_z_image,
    ensure_builtin,
    is_complete,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def generate(pipe: Any, seed: int = 0, **kwargs: Any) -> np.ndarray:
    width, height = TINY_DEFAULTS["resolution"]
    args: dict[str, Any] = {
        "prompt": "a red fox in a snowy forest",
        "width": width,
        "height": height,
        "num_inference_steps": TINY_DEFAULTS["steps"],
        "guidance_scale": TINY_DEFAULTS["guidance_scale"],
        "generator": torch.Generator().manual_seed(seed),
    }
    args.update(kwargs)
    return np.asarray(pipe(**args).images[0])


def test_build_is_idempotent(tiny_model_dir: Path) -> None:
    assert is_complete(tiny_model_dir)
    marker = tiny_model_dir / MARKER_FILE
    before = {p: p.stat().st_mtime_ns for p in tiny_model_dir.rglob("*")}
    assert build_tiny_z_image(tiny_model_dir) == tiny_model_dir
    assert {p: p.stat().st_mtime_ns for p in tiny_model_dir.rglob("*")} == before
    assert json.loads(marker.read_text())["version"] == 1
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    # A class name transformers 4 and 5 both load:
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert list(tiny_model_dir.rglob("*.safetensors"))
    assert not list(tiny_model_dir.parent.glob(".*tmp*")), "temporary build directories left behind"


def test_interrupted_build_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / TINY_DIRNAME
    (target / "transformer").mkdir(parents=True)
    (target / "transformer" / "half-written.safetensors").write_bytes(b"\0" * 10)
    assert not is_complete(target)
    build_tiny_z_image(target)
    assert is_complete(target)
    assert not (target / "transformer" / "half-written.safetensors").exists()


def test_ensure_builtin_resolves_into_cache_dir(tiny_cache_dir: Path, tiny_model_dir: Path) -> None:
    assert ensure_builtin(TINY_MODEL_ID, tiny_cache_dir) == tiny_model_dir
    assert tiny_model_dir == tiny_cache_dir / "builtin" / "tiny-z-image-v1"
    with pytest.raises(ValueError, match="unknown builtin"):
        ensure_builtin("builtin:huge-z-image", tiny_cache_dir)


def test_load_pipeline_builtin(tiny_cache_dir: Path, tiny_model_dir: Path) -> None:
    loaded = load_pipeline(ModelConfig(cache_dir=tiny_cache_dir, device="cpu"))
    assert loaded.class_name == "ZImagePipeline"
    assert (loaded.device, loaded.dtype, loaded.compiled) == ("cpu", "float32", False)
    assert loaded.path == tiny_model_dir
    weights = sum(p.stat().st_size for p in tiny_model_dir.rglob("*.safetensors"))
    assert loaded.checkpoint_bytes == weights > 0
    assert loaded.load_seconds > 0 and loaded.read_bytes_per_second is not None
    assert loaded.pipe.transformer.dtype == torch.float32
    assert vae_scale_factor(loaded.pipe) == 16  # VAE factor 8 × patch 2, as in Z-Image-Turbo

    img2img = load_pipeline(ModelConfig(cache_dir=tiny_cache_dir, device="cpu"), img2img=True)
    assert img2img.class_name == "ZImageImg2ImgPipeline"
    override = load_pipeline(ModelConfig(id=str(tiny_model_dir), device="cpu", pipeline_class="ZImageImg2ImgPipeline"))
    assert override.class_name == "ZImageImg2ImgPipeline" and override.checkpoint_bytes == weights
    with pytest.raises(ValueError, match="pipeline_class"):
        load_pipeline(ModelConfig(id=str(tiny_model_dir), device="cpu", pipeline_class="NoSuchPipeline"))


def test_load_pipeline_compile_wraps_the_denoiser(tiny_cache_dir: Path) -> None:
    loaded = load_pipeline(ModelConfig(cache_dir=tiny_cache_dir, device="cpu", compile=True))
    assert loaded.compiled
    assert type(loaded.pipe.transformer).__name__ == "OptimizedModule"  # compiled lazily, at the first call


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_checkpoint_size_counts_only_the_files_diffusers_reads(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "unet": ["diffusers", "U"], "scheduler": ["diffusers", "S"]})
    )
    unet = tmp_path / "unet"
    unet.mkdir()
    sizes = {
        "diffusion_pytorch_model.safetensors": 100,
        "diffusion_pytorch_model.bin": 1000,  # safetensors present: .bin ignored
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors": 10,
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors": 20,
    }
    for name, size in sizes.items():
        (unet / name).write_bytes(b"\0" * size)
    (tmp_path / "unused").mkdir()  # not a component: ignored
    (tmp_path / "unused" / "model.safetensors").write_bytes(b"\0" * 5000)
    assert checkpoint_size(tmp_path) == 100
    assert checkpoint_size(tmp_path, variant="fp16") == 30
    assert checkpoint_size(tmp_path, variant="bf16") == 100  # falls back to the plain files, like diffusers


def test_model_defaults(tiny_pipe: Any, tiny_model_dir: Path) -> None:
    tiny = model_defaults(tiny_pipe, TINY_MODEL_ID)
    assert tiny == {"resolution": (64, 64), "steps": 9, "guidance_scale": 0.0, "distilled": True}
    assert model_defaults(tiny_pipe, str(tiny_model_dir)) == tiny  # loaded by path: still the tiny model
    turbo = model_defaults("ZImagePipeline", "Tongyi-MAI/Z-Image-Turbo")
    assert turbo == {"resolution": (1024, 1024), "steps": 9, "guidance_scale": 0.0, "distilled": True}
    assert model_defaults("ZImagePipeline", "/models/Z-Image-Turbo/")["distilled"]
    # Anything else: the pipeline's own call defaults (Z-Image: 50 steps, guidance 5.0, 1024²).
    base = model_defaults("ZImagePipeline", "someone/z-image-base")
    assert base == {"resolution": (1024, 1024), "steps": 50, "guidance_scale": 5.0, "distilled": False}
    assert model_defaults(tiny_pipe, "/some/local/dir")["steps"] == 50
    with pytest.raises(ValueError):
        model_defaults("NoSuchPipeline", "x/y")


def test_generates_default_size_fast_and_deterministically(tiny_pipe: Any) -> None:
    first = generate(tiny_pipe, seed=1)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        image = generate(tiny_pipe, seed=1)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"\ntiny Z-Image {TINY_DEFAULTS['resolution']} × {TINY_DEFAULTS['steps']} steps on CPU: "
        f"median {median * 1000:.1f} ms over {len(times)} runs"
    )
    assert image.shape == (64, 64, 3)
    assert np.array_equal(first, image), "same seed must give the same image"
    assert not np.array_equal(image, generate(tiny_pipe, seed=2)), "the seed must matter"
    assert image.std() > 1.0, "random weights should still give a non-constant image"
    assert median < 5.0  # ~0.06 s on an idle core; generous for a loaded CI machine


def test_img2img_from_the_same_directory(tiny_model_dir: Path) -> None:
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    pipe = ZImageImg2ImgPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = pipe(
        "a cat",
        image=init,
        strength=0.6,
        num_inference_steps=9,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (64, 64)
