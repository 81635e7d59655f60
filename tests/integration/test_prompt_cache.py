"""The prompt-embedding cache over encode_prompt: hits, misses, LRU eviction, keys, bypass, removal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from zmon.config import PromptCacheConfig
from zmon.instrumentation.prompt_cache import PromptCacheHandle, apply_prompt_cache

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def encode(pipe: Any, prompt: str | list[str], **kwargs: Any) -> Any:
    args: dict[str, Any] = {"device": "cpu", "do_classifier_free_guidance": False, "max_sequence_length": 64}
    args.update(kwargs)
    return pipe.encode_prompt(prompt, **args)


@pytest.fixture
def cache(tiny_pipe: Any) -> Iterator[PromptCacheHandle]:
    handle = apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=True, max_entries=2))
    try:
        yield handle
    finally:
        handle.remove()


def test_hit_returns_equal_embeddings_in_the_same_structure(tiny_pipe: Any, cache: PromptCacheHandle) -> None:
    first = encode(tiny_pipe, "a cat", do_classifier_free_guidance=True, negative_prompt="blurry")
    second = encode(tiny_pipe, "a cat", do_classifier_free_guidance=True, negative_prompt="blurry")
    assert (cache.hits, cache.misses, cache.size) == (1, 1, 1)
    # Z-Image: (list of per-prompt embeddings, list of negative ones)
    assert isinstance(second, tuple) and len(second) == 2 and isinstance(second[0], list)
    for a, b in zip(first, second, strict=True):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    second[0].clear()  # containers are fresh per call: mutating one does not damage the cache
    third = encode(tiny_pipe, "a cat", do_classifier_free_guidance=True, negative_prompt="blurry")
    assert len(third[0]) == 1 and cache.hits == 2


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a dog"},
        {"max_sequence_length": 32},
        {"do_classifier_free_guidance": True},
        {"do_classifier_free_guidance": True, "negative_prompt": "dark"},
        {"prompt": ["a cat", "a cat"]},
    ],
)
def test_key_covers_prompt_and_encoding_parameters(
    tiny_pipe: Any, cache: PromptCacheHandle, change: dict[str, Any]
) -> None:
    base: dict[str, Any] = {"prompt": "a cat", "do_classifier_free_guidance": False}
    encode(tiny_pipe, **base)
    encode(tiny_pipe, **{**base, **change})
    assert (cache.hits, cache.misses) == (0, 2)


def test_lru_eviction(tiny_pipe: Any, cache: PromptCacheHandle) -> None:
    for prompt in ("a", "b", "a", "c"):  # "a" refreshed before "c" arrives: "b" is the least recently used
        encode(tiny_pipe, prompt)
    assert (cache.hits, cache.misses, cache.evictions, cache.size) == (1, 3, 1, 2)
    encode(tiny_pipe, "a")
    assert cache.hits == 2
    encode(tiny_pipe, "b")
    assert (cache.misses, cache.evictions) == (4, 2)


def test_precomputed_embeddings_bypass(tiny_pipe: Any, cache: PromptCacheHandle) -> None:
    (embeds,), _ = encode(tiny_pipe, "a cat")
    encode(tiny_pipe, "a cat", prompt_embeds=[embeds])
    assert (cache.hits, cache.misses, cache.bypasses, cache.size) == (0, 1, 1, 1)


def test_new_text_encoder_misses(tiny_model_dir: Any) -> None:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    handle = apply_prompt_cache(pipe, PromptCacheConfig(enabled=True))
    encode(pipe, "a cat")
    pipe.text_encoder = type(pipe.text_encoder)(pipe.text_encoder.config)
    encode(pipe, "a cat")
    assert (handle.hits, handle.misses) == (0, 2)
    handle.clear()
    assert handle.size == 0
    handle.remove()


def test_identical_image_with_a_cache_hit(tiny_pipe: Any) -> None:
    def image() -> np.ndarray:
        out = tiny_pipe(
            "a lighthouse at night",
            width=64,
            height=64,
            num_inference_steps=9,
            guidance_scale=2.0,
            negative_prompt="blurry",
            generator=torch.Generator().manual_seed(7),
        )
        return np.asarray(out.images[0])

    bare = image()
    handle = apply_prompt_cache(tiny_pipe)  # no config: enabled with the default size
    try:
        miss, hit = image(), image()
    finally:
        handle.remove()
    assert (handle.hits, handle.misses) == (1, 1)
    assert np.array_equal(bare, miss) and np.array_equal(bare, hit)


def test_applying_twice_raises_and_remove_restores(tiny_pipe: Any, cache: PromptCacheHandle) -> None:
    with pytest.raises(ValueError, match="already applied"):
        apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=True))
    encode(tiny_pipe, "a cat")
    cache.remove()
    cache.remove()  # idempotent
    assert "encode_prompt" not in vars(tiny_pipe) and cache.size == 0
    assert tiny_pipe.encode_prompt.__func__ is type(tiny_pipe).encode_prompt
    encode(tiny_pipe, "a cat")
    assert cache.misses == 1  # no longer counting


def test_disabled_config_installs_nothing(tiny_pipe: Any) -> None:
    handle = apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=False))
    assert "encode_prompt" not in vars(tiny_pipe)
    encode(tiny_pipe, "a cat")
    assert (handle.hits, handle.misses) == (0, 0)
    handle.remove()


def test_clone_tensors(tiny_pipe: Any) -> None:
    handle = apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=True), clone_tensors=True)
    try:
        (a,), _ = encode(tiny_pipe, "a cat")
        (b,), _ = encode(tiny_pipe, "a cat")
    finally:
        handle.remove()
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
