"""What `zmon run` generates: prompts, resolutions, steps, batch, init images; validated before loading."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmon.config import Config, WorkloadConfig

# Varied on purpose: prompt length drives text-encoding time, which dominates when the encoder runs on CPU.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "a red apple on a wooden table",
    "a lighthouse at dusk",
    "portrait of an old fisherman, weathered face, soft window light, 85mm lens, shallow depth of field",
    "a cat",
    "isometric illustration of a tiny city built on the back of a giant turtle swimming through clouds",
    "a bowl of ramen with a soft-boiled egg, steam rising, top-down food photography",
    "mountain lake, morning mist",
    "a futuristic train station in Shanghai at night, neon signs reflected on wet pavement, crowds of "
    "commuters with umbrellas, cinematic wide shot, volumetric light, highly detailed",
    "watercolor painting of a fox in a snowy forest",
    "a vintage bicycle leaning against a yellow wall",
    "macro photo of a dew drop on a spider web",
    "a medieval library with towering shelves, ladders, floating candles, dust in the light beams, "
    "an old librarian reading a huge leather-bound book, warm tones, oil painting in the style of the "
    "Dutch golden age, rich textures, dramatic chiaroscuro",
    "minimalist logo of a paper airplane",
    "astronaut riding a horse on the moon",
    "a street market in Marrakech, spices in colorful pyramids",
    "close-up of a hummingbird feeding from a purple flower",
    "sunset",
    "a cozy cabin interior with a fireplace, knitted blankets, a sleeping dog, rain on the windows",
    "product shot of a glass perfume bottle on black marble, studio lighting",
    "a detailed map of an imaginary island with mountains, rivers, villages and a dragon's lair, "
    "hand-drawn fantasy cartography, parchment texture, compass rose, sea monsters in the margins",
)

# Pixel multiple each pipeline class needs (the latent grid × patch size), known without loading anything.
# Z-Image: vae_scale_factor 8 × patch 2 = 16. Unknown classes fall back to DEFAULT_RESOLUTION_MULTIPLE and
# are re-checked against the loaded pipeline.
RESOLUTION_MULTIPLE_BY_CLASS: Mapping[str, int] = {
    "ZImagePipeline": 16,
    "ZImageImg2ImgPipeline": 16,
    "ZImageInpaintPipeline": 16,
    "ZImageControlNetPipeline": 16,
    "ZImageControlNetInpaintPipeline": 16,
    "ZImageOmniPipeline": 16,
    "FluxPipeline": 16,
    "FluxImg2ImgPipeline": 16,
    "StableDiffusion3Pipeline": 16,
    "StableDiffusionPipeline": 8,
    "StableDiffusionImg2ImgPipeline": 8,
    "StableDiffusionXLPipeline": 8,
    "StableDiffusionXLImg2ImgPipeline": 8,
}
DEFAULT_RESOLUTION_MULTIPLE = 8
MAX_RESOLUTION_SIDE = 16384  # pixels; 16384² is already ~4× what any diffusion model of this family generates
BUILTIN_MODEL_PREFIX = "builtin:"
Z_IMAGE_HUB_IDS = ("tongyi-mai/z-image-turbo", "tongyi-mai/z-image")


class WorkloadError(Exception):
    """Raised with every problem found in a workload, each as 'key: message'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} workload error(s)\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class WorkloadSpec:
    """A fully resolved workload: every value explicit (model defaults filled in), ready to run."""

    prompts: tuple[str, ...]
    resolutions: tuple[tuple[int, int], ...]  # (width, height)
    steps: int
    guidance_scale: float
    batch_size: int
    seed: int | None
    seed_fixed: bool = False  # True: every generation uses `seed`; False: seed + i (varied, reproducible)
    init_images: tuple[Path, ...] = ()
    strength: float = 0.6
    max_generations: int | None = None
    rate_per_second: float | None = None
    output_dir: Path | None = None
    distilled: bool = False
    resolution_multiple: int = DEFAULT_RESOLUTION_MULTIPLE

    @property
    def img2img(self) -> bool:
        return bool(self.init_images)

    def item(self, i: int) -> tuple[str, tuple[int, int]]:
        """The i-th (prompt, resolution) of the prompts × resolutions cycle (resolution varies fastest)."""
        n_res = len(self.resolutions)
        return self.prompts[(i // n_res) % len(self.prompts)], self.resolutions[i % n_res]

    def seed_for(self, i: int) -> int | None:
        if self.seed is None:
            return None
        return self.seed if self.seed_fixed else self.seed + i

    def pipeline_kwargs(self, i: int, init_images: Sequence[Any] = ()) -> dict[str, Any]:
        """The pipeline arguments of generation i; a fresh generator each call, so a retry repeats the image."""
        import torch

        prompt, (width, height) = self.item(i)
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "width": width,
            "height": height,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "num_images_per_prompt": self.batch_size,
        }
        seed = self.seed_for(i)
        if seed is not None:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        if self.img2img and init_images:
            kwargs["image"] = init_images[i % len(init_images)]
            kwargs["strength"] = self.strength
        return kwargs


def static_pipeline_class(cfg: Config) -> str | None:
    """The pipeline class name known without importing diffusers: the override, the embedded model, a known
    hub id, or `_class_name` in a local model_index.json. None when it cannot be told before loading."""
    m = cfg.model
    if m.pipeline_class:
        return m.pipeline_class
    img2img = bool(cfg.workload.init_images)
    if m.id.startswith(BUILTIN_MODEL_PREFIX) or m.id.lower() in Z_IMAGE_HUB_IDS:
        return "ZImageImg2ImgPipeline" if img2img else "ZImagePipeline"
    index = Path(m.id).expanduser() / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    if img2img and name.endswith("Pipeline") and "Img2Img" not in name:
        return name[: -len("Pipeline")] + "Img2ImgPipeline"
    return name


def resolution_multiple(class_name: str | None) -> int:
    return RESOLUTION_MULTIPLE_BY_CLASS.get(class_name or "", DEFAULT_RESOLUTION_MULTIPLE)


def parse_resolution(value: str, multiple: int) -> tuple[int, int]:
    """'WIDTHxHEIGHT' → (width, height); ValueError names the value and, when relevant, the multiple."""
    w_s, sep, h_s = value.strip().lower().partition("x")
    if not sep:
        raise ValueError(f"{value!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
    try:
        w, h = int(w_s), int(h_s)
    except ValueError:
        raise ValueError(f"{value!r} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{value!r}: width and height must be positive")
    if w > MAX_RESOLUTION_SIDE or h > MAX_RESOLUTION_SIDE:
        raise ValueError(f"{value!r}: width and height must be at most {MAX_RESOLUTION_SIDE}")
    if w % multiple or h % multiple:
        raise ValueError(
            f"{value!r}: width and height must be multiples of {multiple} for this pipeline "
            f"(VAE scale factor × patch size); nearest: {_nearest(w, multiple)}x{_nearest(h, multiple)}"
        )
    return w, h


def _nearest(v: int, multiple: int) -> int:
    return max(multiple, (v + multiple // 2) // multiple * multiple)  # half rounds up


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file, one per line; blank lines and lines starting with '#' are skipped.

    Raises ValueError naming the path when the file cannot be read, is not UTF-8 or holds no prompt.
    """
    p = path.expanduser()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad = raw[e.start]
        raise ValueError(f"{p} is not UTF-8 text (invalid byte 0x{bad:02x} on line {line})") from None
    prompts = [s for s in (ln.strip() for ln in text.splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"{p} contains no prompts (blank lines and '#' comments are skipped)")
    return prompts


def check_image(path: Path) -> str | None:
    """None when the path is an image Pillow can read, else the reason."""
    from PIL import Image, UnidentifiedImageError

    p = path.expanduser()
    if not p.is_file():
        return f"{p} does not exist" if not p.exists() else f"{p} is not a file"
    try:
        with Image.open(p) as im:
            im.verify()
    except UnidentifiedImageError:
        return f"{p} is not an image Pillow can read"
    except OSError as e:
        if e.errno is not None:
            return f"cannot read {p}: {e.strerror or e}"
        return f"{p} is a damaged image: {e}"
    except Exception as e:  # Pillow raises assorted errors on truncated/corrupt files
        return f"{p} is a damaged image: {e}"
    return None


def _check(cfg: Config) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """(problems, prompts, resolutions) — every problem found, not just the first."""
    w: WorkloadConfig = cfg.workload
    problems: list[str] = []
    prompts: list[str] = list(BUILTIN_PROMPTS)
    if w.prompts_file is not None:
        try:
            prompts = read_prompts(w.prompts_file)
        except ValueError as e:
            problems.append(f"workload.prompts_file: {e}")
    multiple = resolution_multiple(static_pipeline_class(cfg))
    resolutions: list[tuple[int, int]] = []
    for i, r in enumerate(w.resolutions):
        try:
            resolutions.append(parse_resolution(r, multiple))
        except ValueError as e:
            problems.append(f"workload.resolutions[{i}]: {e}")
    if w.steps is not None and w.steps <= 0:
        problems.append(f"workload.steps: must be > 0, got {w.steps}")
    if w.guidance_scale is not None and w.guidance_scale < 0:
        problems.append(f"workload.guidance_scale: must be >= 0, got {w.guidance_scale}")
    if w.batch_size <= 0:
        problems.append(f"workload.batch_size: must be > 0, got {w.batch_size}")
    for i, img in enumerate(w.init_images):
        reason = check_image(img)
        if reason:
            problems.append(f"workload.init_images[{i}]: {reason}")
    if w.output_dir is not None:
        out = w.output_dir.expanduser()
        if out.exists() and not out.is_dir():
            problems.append(f"workload.output_dir: {out} exists and is not a directory")
    return problems, prompts, resolutions


def validate_workload(cfg: Config) -> list[str]:
    """Every problem with the workload, found without loading (or importing) the model; [] when fine."""
    return _check(cfg)[0]


def build_spec(cfg: Config, defaults: Mapping[str, Any]) -> WorkloadSpec:
    """Resolve the workload against the model's defaults (`model_defaults()`: resolution, steps,
    guidance_scale, distilled). Raises WorkloadError listing every problem."""
    problems, prompts, resolutions = _check(cfg)
    if problems:
        raise WorkloadError(problems)
    w = cfg.workload
    if not resolutions:
        resolutions = [_default_resolution(defaults.get("resolution"))]
    return WorkloadSpec(
        prompts=tuple(prompts),
        resolutions=tuple(resolutions),
        steps=w.steps if w.steps is not None else int(defaults.get("steps") or 9),
        guidance_scale=(
            w.guidance_scale if w.guidance_scale is not None else float(defaults.get("guidance_scale") or 0.0)
        ),
        batch_size=w.batch_size,
        seed=w.seed,
        # workload.seed_mode ("increment" | "fixed") is read when the config has it; increment otherwise.
        seed_fixed=getattr(w, "seed_mode", "increment") == "fixed",
        init_images=tuple(p.expanduser() for p in w.init_images),
        strength=w.strength,
        max_generations=w.max_generations,
        rate_per_second=w.rate_per_second,
        output_dir=w.output_dir.expanduser() if w.output_dir is not None else None,
        distilled=bool(defaults.get("distilled", False)),
        resolution_multiple=resolution_multiple(static_pipeline_class(cfg)),
    )


def _default_resolution(value: Any) -> tuple[int, int]:
    """model_defaults' resolution: an int (square), a (width, height) pair or 'WxH'; 1024² if absent."""
    if value is None:
        return 1024, 1024
    if isinstance(value, int):
        return value, value
    if isinstance(value, str):
        return parse_resolution(value, 1)
    if isinstance(value, Sequence) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"unexpected default resolution {value!r}")


def recheck_resolutions(spec: WorkloadSpec, multiple: int) -> list[str]:
    """Problems with the spec's resolutions against the loaded pipeline's real pixel multiple."""
    out = []
    for i, (w, h) in enumerate(spec.resolutions):
        if w % multiple or h % multiple:
            out.append(
                f"workload.resolutions[{i}]: '{w}x{h}': width and height must be multiples of {multiple} for "
                f"the loaded pipeline; nearest: {_nearest(w, multiple)}x{_nearest(h, multiple)}"
            )
    return out
