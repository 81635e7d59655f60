"""The embedded model: a real diffusers ZImagePipeline with tiny dimensions and seeded random weights."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

BUILTIN_PREFIX: Final = "builtin:"
TINY_NAME: Final = "tiny-z-image"
TINY_MODEL_ID: Final = BUILTIN_PREFIX + TINY_NAME
TINY_VERSION: Final = 1  # bump when the architecture or weights change: the cache dir name follows it
TINY_DIRNAME: Final = f"{TINY_NAME}-v{TINY_VERSION}"
MARKER_FILE: Final = "zmon-builtin.json"  # written last: its absence means an interrupted build
SEED: Final = 20251125

# What `zmon run` generates with the embedded model when the config says nothing, mimicking Z-Image-Turbo's
# model card (distilled: few steps, no CFG). 64 is the smallest side with a 4x4 patch grid at the pipeline's
# resolution multiple of 16 (VAE factor 8 × patch 2, as in the real model). With guidance 0.0 the 9 steps are
# 9 transformer forwards in diffusers 0.42.1 (the model card's "8 DiT forwards" counts differently).
TINY_DEFAULTS: Final[dict[str, Any]] = {
    "resolution": (64, 64),  # (width, height) in pixels
    "steps": 9,
    "guidance_scale": 0.0,
}

# Dimensions: every component keeps the real model's structure (16 latent channels, 4-level VAE, patch 2,
# 3 RoPE axes, Qwen3 with GQA) at a size that runs on one CPU core in a few tens of milliseconds.
_DIM: Final = 64  # transformer width and text-encoder hidden size (cap_feat_dim)
_HEADS: Final = 2  # head_dim 32 = sum(axes_dims)
_AXES_DIMS: Final = (8, 12, 12)
_CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
_SPECIAL_TOKENS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]")
_VOCABULARY: Final = (
    "a an the of and with in on at by for from to under over near behind beside "
    "photo photograph painting drawing sketch render illustration portrait landscape closeup macro "
    "cat dog bird horse fox owl fish dragon robot astronaut knight wizard child woman man people crowd "
    "city street village castle tower bridge house room kitchen forest mountain river lake ocean beach "
    "desert island sky cloud clouds sun moon stars night morning sunset sunrise rain snow fog storm "
    "red orange yellow green blue purple pink black white gray golden silver dark bright colorful "
    "old young small large tiny giant ancient modern futuristic cyberpunk steampunk medieval "
    "detailed highly realistic photorealistic cinematic dramatic soft warm cold neon lighting light "
    "shadow reflection water glass metal wood stone flowers tree trees garden field grass leaves "
    "style art digital oil watercolor anime 4k 8k hdr sharp focus bokeh wide angle lens view "
    "standing sitting running flying walking reading holding wearing looking playing sleeping "
    "hat coat dress armor helmet book lamp table chair window door car train boat ship plane "
    ", . ! ? - : ;"
)
_WORDS: Final = tuple(_VOCABULARY.split())


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """No diffusers/transformers progress bars ("Loading pipeline components", "Writing model shards") while
    zmon builds or loads a model: zmon logs what it does and how long it took instead. Restored afterwards."""
    import diffusers
    import transformers

    owners = [m.utils.logging for m in (diffusers, transformers) if m.utils.logging.is_progress_bar_enabled()]
    for owner in owners:
        owner.disable_progress_bar()
    try:
        yield
    finally:
        for owner in owners:
            owner.enable_progress_bar()


def is_builtin(model_id: str) -> bool:
    """True for ids of the form 'builtin:NAME'."""
    return model_id.startswith(BUILTIN_PREFIX)


def ensure_builtin(model_id: str, cache_dir: Path) -> Path:
    """Resolve 'builtin:tiny-z-image' to <cache_dir>/builtin/tiny-z-image-v1, building it once if needed."""
    name = model_id.removeprefix(BUILTIN_PREFIX)
    if name != TINY_NAME:
        raise ValueError(f"unknown builtin model {model_id!r}; available: {TINY_MODEL_ID!r}")
    return build_tiny_z_image(Path(cache_dir).expanduser() / "builtin" / TINY_DIRNAME)


def is_complete(target_dir: Path) -> bool:
    """True when target_dir holds a finished build of the current version."""
    try:
        marker = json.loads((target_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return marker.get("name") == TINY_NAME and marker.get("version") == TINY_VERSION


def build_tiny_z_image(target_dir: Path) -> Path:
    """Write the tiny Z-Image pipeline (safetensors) into target_dir atomically; a no-op when already built.

    The pipeline is built and saved in a sibling temporary directory, the marker file written last, then the
    directory is renamed into place, so an interrupted build never looks complete. Two processes building at
    once both succeed: the loser of the rename discards its copy.
    """
    target_dir = Path(target_dir)
    if is_complete(target_dir):
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the embedded tiny Z-Image pipeline in %s (first run only)", target_dir)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.tmp-", dir=target_dir.parent))
    try:
        with quiet_hf_progress():
            pipe = make_tiny_z_image_pipeline()
            pipe.save_pretrained(tmp, safe_serialization=True)
        _portable_tokenizer_class(tmp / "model_index.json")
        import diffusers

        marker = {"name": TINY_NAME, "version": TINY_VERSION, "seed": SEED}
        marker["diffusers"] = diffusers.__version__
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if target_dir.exists() and not is_complete(target_dir):
            log.info("removing incomplete tiny model build at %s", target_dir)
            shutil.rmtree(target_dir)
        try:
            os.replace(tmp, target_dir)
        except OSError:
            if not is_complete(target_dir):  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the embedded tiny Z-Image pipeline in %.1fs", time.perf_counter() - started)
    return target_dir


def _portable_tokenizer_class(model_index: Path) -> None:
    """Name the tokenizer class PreTrainedTokenizerFast, which transformers 4.x and 5.x both load.

    transformers 5 saves it as 'TokenizersBackend', a name transformers 4 lacks.
    """
    index = json.loads(model_index.read_text())
    if index.get("tokenizer", [None])[0] == "transformers":
        index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def make_tiny_z_image_pipeline() -> Any:
    """Construct the tiny ZImagePipeline in memory (float32, CPU), deterministically from SEED."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers.models import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        transformer: Any = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=_DIM,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=_HEADS,
            n_kv_heads=_HEADS,
            cap_feat_dim=_DIM,
            axes_dims=list(_AXES_DIMS),
            axes_lens=[1024, 512, 512],
        )
        tokenizer = make_tiny_tokenizer()
        text_encoder: Any = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=_DIM,
                intermediate_size=2 * _DIM,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=32,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae: Any = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=TINY_DEFAULTS["resolution"][0],
            scaling_factor=0.3611,  # Z-Image-Turbo's values: decoding fails without shift_factor
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        # Zero-initialised layers (adaLN, final projections) would make every output constant; random
        # weights everywhere keep images seed-dependent, which the bit-for-bit tests rely on.
        for module in (transformer, vae):
            for param in module.parameters():
                if not param.detach().any():
                    param.data.normal_(0.0, 0.02)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for module in (transformer, text_encoder, vae):
        module.eval()
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def make_tiny_tokenizer() -> Any:
    """A word-level fast tokenizer with Qwen-style chat tokens, built locally (no hub)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*_SPECIAL_TOKENS, *_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        model_max_length=1024,
        padding_side="right",
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast
