"""Context parallelism for a loaded pipeline: one generation's denoiser split across the ranks of a process group.

diffusers 0.42 runs a transformer across GPUs with `transformer.enable_parallelism(config=ContextParallelConfig(...))`
for the classes that declare a `_cp_plan` (Flux, Flux2, QwenImage, Wan, LTX, ...): each rank holds a slice of
the sequence, and attention exchanges the rest (Ulysses: all-to-all of heads; ring: all-gather of keys and
values). Z-Image's transformer has no `_cp_plan` in 0.42 but its attention already dispatches through
diffusers' context-parallel backends, so `zimage_cp_plan` supplies one: the unified image+caption sequence is
split where the main layers start, the rotary frequencies and padding mask are split at every main layer's
attention, and the sequence is gathered after the last main layer. The refiner layers (a few, on
unsplit sequences) keep plain attention. Measured on the embedded tiny model over gloo: the 2-rank output
equals the 1-rank output exactly (tests/integration/test_collectives.py).

The process group must be initialised by the caller (torchrun, or mp.spawn + init_process_group), one rank
per GPU; every rank then calls the pipeline with the same arguments (same prompt and seed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["ulysses", "ring"]
ZIMAGE_TRANSFORMER = "ZImageTransformer2DModel"


def zimage_cp_plan(transformer: Any) -> dict[str, Any]:
    """The context-parallel plan of a ZImageTransformer2DModel (diffusers' `_cp_plan` format)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    n = len(transformer.layers)
    if n < 2:
        raise ValueError(
            "the Z-Image plan needs at least 2 main layers (split before the first, gather after the last)"
        )

    def split(dims: int) -> Any:
        return ContextParallelInput(split_dim=1, expected_dims=dims, split_output=False)

    plan: dict[str, Any] = {"layers.0": {"x": split(3)}}
    for i in range(n):
        plan[f"layers.{i}.attention"] = {"attention_mask": split(2), "freqs_cis": split(3)}
    plan[f"layers.{n - 1}"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan


def apply_context_parallel(pipe: Any, degree: int, *, kind: Kind = "ulysses") -> Any:
    """Split `pipe.transformer` across `degree` ranks of the default process group; returns the config.

    Z-Image gets zimage_cp_plan; other transformers must declare their own `_cp_plan`. Raises ValueError
    (unsupported model, degree not the group's size, heads not divisible for Ulysses) and RuntimeError
    (torch.distributed not initialised).
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group")
    world = dist.get_world_size()
    if degree != world:
        raise ValueError(f"context-parallel degree {degree} differs from the process group's size {world}")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer to split")
    name = type(transformer).__name__
    plan = None
    if name == ZIMAGE_TRANSFORMER:
        plan = zimage_cp_plan(transformer)
    elif getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"{name} declares no context-parallel plan (_cp_plan) in this diffusers")
    if kind == "ulysses":
        heads = getattr(transformer.config, "n_heads", None) or getattr(transformer.config, "num_attention_heads", None)
        if heads is not None and heads % degree:
            raise ValueError(f"Ulysses needs the {heads} attention heads to divide by the degree {degree}; use ring")
        config = ContextParallelConfig(ulysses_degree=degree)
    else:
        config = ContextParallelConfig(ring_degree=degree)
    with _cpu_accelerator_count():
        transformer.enable_parallelism(config=config, cp_plan=plan)
    if name == ZIMAGE_TRANSFORMER:
        _plain_attention_in_refiners(transformer)
    return config


def _plain_attention_in_refiners(transformer: Any) -> None:
    """The refiners see whole, unsplit sequences on every rank: context-parallel attention there would only
    exchange copies of what each rank already has."""
    for name, module in transformer.named_modules():
        if name.startswith(("noise_refiner", "context_refiner", "siglip_refiner")):
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = None


@contextlib.contextmanager
def _cpu_accelerator_count() -> Iterator[None]:
    """diffusers 0.42 places each rank on `rank % torch.accelerator.device_count()`, which divides by zero on
    a host without an accelerator (gloo on CPU); there the count reads 1 while parallelism is enabled."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or accelerator.device_count() > 0:
        yield
        return
    original = accelerator.device_count
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original
