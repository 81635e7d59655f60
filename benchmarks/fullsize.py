"""A full-size Z-Image-Turbo-shaped pipeline with random weights, built on the GPU (no download).

Recipe from shared/FACTS.md: 6.15 B-parameter DiT (default ZImageTransformer2DModel config), a 4.02 B Qwen3 text
encoder, the 84 M 16-channel VAE, FlowMatchEulerDiscreteScheduler(shift=3.0); bf16; the tokenizer is zmon's
locally built word-level one (its ids are valid for the 151936-entry vocabulary).
"""

from __future__ import annotations

import time
from typing import Any


def build_full_z_image(device: str = "cuda", dtype: Any = None, seed: int = 0) -> Any:
    """Seeded, so every process builds the same weights: `zmon tune` compares a fresh process's images with
    this one's (unseeded, expandable_segments' fresh process measured 13.5 dB PSNR against the baseline)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers.models import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zmon.workload.tiny import make_tiny_tokenizer

    dtype = dtype or torch.bfloat16
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device's generator
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel()
            text_encoder = Qwen3Model(
                Qwen3Config(
                    vocab_size=151936,
                    hidden_size=2560,
                    num_hidden_layers=36,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    intermediate_size=9728,
                    head_dim=128,
                    max_position_embeddings=40960,
                )
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
    finally:
        torch.set_default_dtype(prev)
    for m in (transformer, text_encoder, vae):
        m.to(device=device, dtype=dtype).eval()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tiny_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    n = sum(p.numel() for m in (transformer, text_encoder, vae) for p in m.parameters())
    print(f"built full-size Z-Image ({n / 1e9:.2f} B params, {dtype}) in {time.perf_counter() - t0:.1f}s")
    return pipe
