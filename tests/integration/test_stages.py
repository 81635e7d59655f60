"""Stage timing on real diffusers pipelines (tiny Z-Image txt2img/img2img, tiny Flux) on CPU."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zmon.config import PromptCacheConfig
from zmon.instrumentation.hooks import CallContext, HookRegistry, PipelineHook
from zmon.instrumentation.prompt_cache import apply_prompt_cache
from zmon.instrumentation.records import GenerationRecord
from zmon.instrumentation.stages import StageTimingConfig, StageTimingHandle, apply_stage_timing

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = "a small robot reading a book in a garden"


def generate(pipe: Any, seed: int = 0, **kwargs: Any) -> Any:
    args: dict[str, Any] = {
        "prompt": PROMPT,
        "width": 64,
        "height": 64,
        "num_inference_steps": 9,
        "guidance_scale": 0.0,
        "generator": torch.Generator().manual_seed(seed),
    }
    args.update(kwargs)
    return pipe(**args)


def pixels(output: Any) -> np.ndarray:
    return np.asarray(output.images[0])


@pytest.fixture
def fresh_pipe(tiny_model_dir: Path) -> Any:
    """A private ZImagePipeline, for tests that swap components or add hooks."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def records() -> list[GenerationRecord]:
    return []


@pytest.fixture
def timed(tiny_pipe: Any, records: list[GenerationRecord]) -> Iterator[StageTimingHandle]:
    handle = apply_stage_timing(tiny_pipe, StageTimingConfig(on_record=records.append))
    try:
        yield handle
    finally:
        handle.remove()


def check_record(record: GenerationRecord, *, steps: int, vae_encode: bool) -> None:
    """Every stage present once (steps: once each), in order, inside the generation, summing to <= total."""
    assert record.status == "ok" and record.error is None
    assert record.steps == steps
    counts = {
        s: sum(1 for t in record.stages if t.stage == s)
        for s in ("text_encode", "vae_encode", "denoise_step", "vae_decode", "postprocess")
    }
    assert counts == {
        "text_encode": 1,
        "vae_encode": int(vae_encode),
        "denoise_step": steps,
        "vae_decode": 1,
        "postprocess": 1,
    }
    assert [t.index for t in record.stages if t.stage == "denoise_step"] == list(range(steps))
    order = [t.stage for t in record.stages if t.stage != "denoise_step"]
    expected = (
        ["text_encode", "vae_encode", "vae_decode", "postprocess"]
        if vae_encode
        else ["text_encode", "vae_decode", "postprocess"]
    )
    assert order == expected
    assert record.total_seconds > 0
    end = 0.0
    for t in record.stages:  # spans do not overlap and stay within the generation
        assert t.seconds > 0
        assert t.start_offset_seconds >= end - 1e-9
        end = t.start_offset_seconds + t.seconds
    assert end <= record.total_seconds + 1e-9
    assert sum(t.seconds for t in record.stages) <= record.total_seconds
    assert record.stage_seconds("denoise_step") > 0.3 * record.total_seconds  # the bulk, even tiny
    assert record.timing_method == "monotonic" and record.device == "cpu"
    assert record.peak_allocated_bytes is None and record.peak_reserved_bytes is None


def test_txt2img_record(tiny_pipe: Any, timed: StageTimingHandle, records: list[GenerationRecord]) -> None:
    before = time.time()
    generate(tiny_pipe)
    assert timed.records_total == 1 and records == [timed.last_record]
    record = records[0]
    check_record(record, steps=9, vae_encode=False)
    assert before <= record.started_at <= time.time()
    assert (record.width, record.height, record.batch_size) == (64, 64, 1)
    assert record.prompt_chars == len(PROMPT)
    assert record.guidance_scale == 0.0 and record.cfg_active is False
    assert record.prompt_cache_hit is None
    assert record.extra == {"pipeline": "ZImagePipeline", "denoiser_forwards": "9"}
    assert len(record.step_seconds()) == 9


def test_defaults_and_cfg_and_batch(tiny_pipe: Any, timed: StageTimingHandle) -> None:
    # No width/height given: the size comes from the output; CFG (guidance > 0 in Z-Image) batches
    # the negative branch into the same forward, so still one forward per step.
    tiny_pipe(
        ["a cat", "a dog"],
        num_inference_steps=2,
        guidance_scale=3.0,
        num_images_per_prompt=2,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    record = timed.last_record
    assert record is not None and record.steps == 2
    assert (record.width, record.height, record.batch_size) == (1024, 1024, 4)
    assert record.cfg_active is True and record.guidance_scale == 3.0
    assert record.prompt_chars == len("a cat") + len("a dog")  # measured before Z-Image rewrites the list
    assert record.extra["denoiser_forwards"] == "2"


def test_img2img_record(tiny_pipe: Any, records: list[GenerationRecord]) -> None:
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    pipe = ZImageImg2ImgPipeline.from_pipe(tiny_pipe)  # shares the VAE, transformer and scheduler
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    handle = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
    try:
        pipe(
            PROMPT,
            image=init,
            strength=0.6,
            num_inference_steps=9,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    # strength 0.6 of 9 steps: t_start = int(9 - 5.4) = 3, so 6 steps run.
    check_record(records[0], steps=6, vae_encode=True)
    assert (records[0].width, records[0].height) == (64, 64)
    assert "encode" not in vars(pipe.vae) and "decode" not in vars(pipe.vae)


def test_other_family_flux_with_true_cfg(records: list[GenerationRecord]) -> None:
    pipe = make_tiny_flux()
    handle = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
    try:
        kwargs: dict[str, Any] = {
            "height": 32,
            "width": 32,
            "num_inference_steps": 4,
            "max_sequence_length": 32,
        }
        pipe(PROMPT, guidance_scale=3.5, generator=torch.Generator().manual_seed(0), **kwargs)
        # True CFG: two transformer forwards per step (and two encode_prompt calls), still 4 steps.
        pipe(
            PROMPT,
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
    finally:
        handle.remove()
    plain, cfg = records
    check_record(plain, steps=4, vae_encode=False)
    assert plain.cfg_active is False and plain.extra["denoiser_forwards"] == "4"
    assert (plain.width, plain.height) == (32, 32)
    assert cfg.steps == 4 and cfg.extra["denoiser_forwards"] == "8" and cfg.cfg_active is True
    assert [t.index for t in cfg.stages if t.stage == "text_encode"] == [0, 1]
    assert [t.index for t in cfg.stages if t.stage == "denoise_step"] == [0, 1, 2, 3]
    assert type(pipe).__name__ == "FluxPipeline" and "encode_prompt" not in vars(pipe)


def test_applying_twice_raises(tiny_pipe: Any, timed: StageTimingHandle) -> None:
    with pytest.raises(ValueError, match="already applied"):
        apply_stage_timing(tiny_pipe)


def test_remove_restores_everything_and_output_is_unchanged(tiny_pipe: Any) -> None:
    pipe_class = type(tiny_pipe)
    bare = pixels(generate(tiny_pipe, seed=3))
    handle = apply_stage_timing(tiny_pipe)
    assert type(tiny_pipe) is not pipe_class and isinstance(tiny_pipe, pipe_class)
    assert type(tiny_pipe).__name__ == pipe_class.__name__
    instrumented = pixels(generate(tiny_pipe, seed=3))
    handle.remove()
    handle.remove()  # idempotent
    after = pixels(generate(tiny_pipe, seed=3))
    assert np.array_equal(bare, instrumented) and np.array_equal(bare, after)
    assert type(tiny_pipe) is pipe_class
    assert "encode_prompt" not in vars(tiny_pipe)
    assert tiny_pipe.encode_prompt.__func__ is pipe_class.encode_prompt
    for owner, name in (
        (tiny_pipe.vae, "encode"),
        (tiny_pipe.vae, "decode"),
        (tiny_pipe.scheduler, "step"),
        (tiny_pipe.image_processor, "postprocess"),
    ):
        assert name not in vars(owner), f"{type(owner).__name__}.{name} left patched"
        assert getattr(owner, name).__func__ is getattr(type(owner), name)
    assert not tiny_pipe.transformer._forward_pre_hooks
    assert handle.records_total == 1  # nothing recorded after remove
    apply_stage_timing(tiny_pipe).remove()  # can be applied again


def test_outside_a_generation_nothing_is_recorded(tiny_pipe: Any, timed: StageTimingHandle) -> None:
    tiny_pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    tiny_pipe.vae.decode(torch.zeros(1, 16, 8, 8))
    assert timed.records_total == 0


def test_denoiser_error_is_recorded_and_propagates(fresh_pipe: Any, records: list[GenerationRecord]) -> None:
    handle = apply_stage_timing(fresh_pipe, StageTimingConfig(on_record=records.append))

    def boom(module: Any, args: Any) -> None:
        raise RuntimeError("boom in the denoiser")

    hook = fresh_pipe.transformer.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate(fresh_pipe)
    hook.remove()
    (record,) = records
    assert record.status == "error" and record.error == "RuntimeError: boom in the denoiser"
    assert record.steps == 0 and record.cfg_active is None
    stages = [t.stage for t in record.stages]
    assert stages == ["text_encode", "denoise_step"]  # the failed step is closed at the failure
    assert all(t.start_offset_seconds + t.seconds <= record.total_seconds + 1e-9 for t in record.stages)
    generate(fresh_pipe)  # the handle still works after a failure
    assert records[-1].status == "ok" and handle.records_total == 2
    handle.remove()


def test_oom_is_recorded_as_oom(fresh_pipe: Any, records: list[GenerationRecord]) -> None:
    handle = apply_stage_timing(fresh_pipe, StageTimingConfig(on_record=records.append))

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fresh_pipe.vae.decode = oom  # replaces the timing layer too: remove() must then leave it alone
    with pytest.raises(torch.OutOfMemoryError):
        generate(fresh_pipe)
    assert records[0].status == "oom" and records[0].steps == 9
    assert records[0].error is not None and records[0].error.startswith("OutOfMemoryError")
    handle.remove()
    assert fresh_pipe.vae.decode is oom
    del fresh_pipe.vae.decode
    assert getattr(fresh_pipe.vae.decode, "__func__", None) is type(fresh_pipe.vae).decode


def test_on_record_failure_does_not_break_generation(tiny_pipe: Any) -> None:
    def broken(record: GenerationRecord) -> None:
        raise KeyError("consumer bug")

    handle = apply_stage_timing(tiny_pipe, StageTimingConfig(on_record=broken))
    try:
        generate(tiny_pipe, num_inference_steps=1)
    finally:
        handle.remove()
    assert handle.records_total == 1


def test_swapped_scheduler_is_picked_up(fresh_pipe: Any) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    handle = apply_stage_timing(fresh_pipe)
    fresh_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(fresh_pipe.scheduler.config)
    generate(fresh_pipe, num_inference_steps=3)
    assert handle.last_record is not None and handle.last_record.steps == 3
    handle.remove()
    assert "step" not in vars(fresh_pipe.scheduler)


def test_calls_from_several_threads_one_at_a_time(tiny_pipe: Any, timed: StageTimingHandle) -> None:
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            with lock:  # one generation at a time: diffusers pipelines are not reentrant
                generate(tiny_pipe, seed=seed, num_inference_steps=2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and timed.records_total == 3
    assert timed.last_record is not None and timed.last_record.steps == 2


def test_profiler_ranges(tiny_pipe: Any) -> None:
    handle = apply_stage_timing(tiny_pipe, StageTimingConfig(nvtx=True))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            generate(tiny_pipe, num_inference_steps=2)
    finally:
        handle.remove()
    names = {e.name for e in prof.events()}
    assert {
        "zmon/generation",
        "zmon/text_encode",
        "zmon/denoise_step",
        "zmon/vae_decode",
        "zmon/postprocess",
    } <= names


@pytest.mark.parametrize("cache_first", [True, False])
def test_composes_with_prompt_cache_in_either_order(tiny_pipe: Any, cache_first: bool) -> None:
    records: list[GenerationRecord] = []
    apply_cache = lambda: apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=True))  # noqa: E731
    apply_timing = lambda: apply_stage_timing(tiny_pipe, StageTimingConfig(on_record=records.append))  # noqa: E731
    first, second = (apply_cache(), apply_timing()) if cache_first else (apply_timing(), apply_cache())
    try:
        miss = pixels(generate(tiny_pipe, seed=5))
        hit = pixels(generate(tiny_pipe, seed=5))
    finally:
        first.remove()  # removal order independent of application order
        second.remove()
    assert np.array_equal(miss, hit)
    assert [r.prompt_cache_hit for r in records] == [False, True]
    for r in records:  # a hit still shows as a (short) text_encode stage: timing sits outside the cache
        check_record(r, steps=9, vae_encode=False)
    assert records[1].stage_seconds("text_encode") < records[0].stage_seconds("text_encode")
    assert "encode_prompt" not in vars(tiny_pipe)


def test_measure_overhead_and_prompt_cache(tiny_pipe: Any) -> None:
    """Reported, not asserted: medians of 10 interleaved runs (bare vs instrumented, cache off vs on)."""
    n = 10
    generate(tiny_pipe)  # warm-up
    handle = apply_stage_timing(tiny_pipe)
    handle.remove()

    def timed_run() -> float:
        start = time.perf_counter()
        generate(tiny_pipe)
        return time.perf_counter() - start

    bare, instrumented = [], []
    for _ in range(n):
        bare.append(timed_run())
        handle = apply_stage_timing(tiny_pipe)
        instrumented.append(timed_run())
        handle.remove()
    no_cache, cached = [], []
    cache = apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=True))
    generate(tiny_pipe)  # fills the cache
    for _ in range(n):
        cache.remove()
        no_cache.append(timed_run())
        cache = apply_prompt_cache(tiny_pipe, PromptCacheConfig(enabled=True))
        generate(tiny_pipe)  # refill (remove() drops the entries)
        cached.append(timed_run())
    cache.remove()
    m = {
        k: statistics.median(v) * 1000
        for k, v in {
            "bare": bare,
            "instrumented": instrumented,
            "no_cache": no_cache,
            "cached": cached,
        }.items()
    }
    print(
        f"\ntiny Z-Image on CPU, median of {n} interleaved runs: bare {m['bare']:.1f} ms, "
        f"instrumented {m['instrumented']:.1f} ms ({(m['instrumented'] / m['bare'] - 1) * 100:+.1f}%); "
        f"prompt cache off {m['no_cache']:.1f} ms, hit {m['cached']:.1f} ms"
    )
    assert all(v > 0 for v in m.values())


class _Component:
    def method(self, x: list[str]) -> list[str]:
        return [*x, "original"]


class _Pipe:
    """A pipeline-shaped object: a component with a method, called inside __call__."""

    def __init__(self) -> None:
        self.part = _Component()

    def __call__(self, x: list[str]) -> list[str]:
        return self.part.method(x)


def _hook(tag: str, prio: int, log: list[str]) -> PipelineHook:
    class Tagged(PipelineHook):
        name = tag
        priority = prio

        def methods(self) -> dict[tuple[str, str], Any]:
            return {("part", "method"): lambda ctx, inner, x: inner([*x, tag])}

        def call_started(self, ctx: CallContext) -> None:
            log.append(f"start {tag}")

        def call_finished(self, ctx: CallContext) -> None:
            log.append(f"end {tag}")

    return Tagged()


@pytest.mark.parametrize("install_order", ["outer_first", "inner_first"])
@pytest.mark.parametrize("remove_order", ["outer_first", "inner_first"])
@pytest.mark.parametrize("instance_attr", [False, True])
def test_registry_orders_hooks_by_priority_and_restores_in_any_order(
    install_order: str, remove_order: str, instance_attr: bool
) -> None:
    pipe = _Pipe()
    original_class = type(pipe)
    custom = None
    if instance_attr:  # something (another tool) had already set an instance attribute: it must come back

        def custom(x: list[str]) -> list[str]:
            return [*x, "custom"]

        pipe.part.method = custom  # type: ignore[method-assign]
    bottom = "custom" if instance_attr else "original"
    log: list[str] = []
    specs = [("timing", 100), ("cache", 10), ("mid", 50)]
    if install_order == "inner_first":
        specs.reverse()
    registry = HookRegistry.of(pipe)
    for tag, prio in specs:
        registry.register(_hook(tag, prio, log))
    assert pipe([]) == ["timing", "mid", "cache", bottom]  # by priority, whatever the order
    assert log == ["start timing", "start mid", "start cache", "end cache", "end mid", "end timing"]
    assert registry.names == ("timing", "mid", "cache")
    with pytest.raises(ValueError, match="already applied"):
        registry.register(_hook("mid", 1, log))
    tags = ["timing", "mid", "cache"] if remove_order == "outer_first" else ["cache", "mid", "timing"]
    remaining = {"timing", "mid", "cache"}
    for tag in tags:
        registry.remove(tag)
        registry.remove(tag)  # idempotent
        remaining.discard(tag)
        if remaining:
            assert pipe([]) == [t for t in ("timing", "mid", "cache") if t in remaining] + [bottom]
    assert type(pipe) is original_class and HookRegistry.get(pipe) is None
    if instance_attr:
        assert vars(pipe.part)["method"] is custom
    else:
        assert "method" not in vars(pipe.part)
    assert pipe([]) == [bottom]


def test_step_timer_starts_before_a_host_pre_hook_and_steps_tile(
    fresh_pipe: Any, records: list[GenerationRecord]
) -> None:
    """Work a host hooks onto the denoiser (a pre-hook registered before zmon's) is inside the steps."""
    slow = 0.02

    def host_pre_hook(module: Any, args: Any) -> None:
        time.sleep(slow)

    host = fresh_pipe.transformer.register_forward_pre_hook(host_pre_hook)
    handle = apply_stage_timing(fresh_pipe, StageTimingConfig(on_record=records.append))
    try:
        generate(fresh_pipe, num_inference_steps=4)
    finally:
        handle.remove()
        host.remove()
    (r,) = records
    steps = [t for t in r.stages if t.stage == "denoise_step"]
    assert len(steps) == 4 and all(t.seconds >= slow for t in steps)  # every step holds the host's work
    for a, b in itertools.pairwise(steps):  # step k starts where step k - 1 ended
        assert b.start_offset_seconds == pytest.approx(a.start_offset_seconds + a.seconds, abs=1e-9)
    untimed = r.total_seconds - sum(t.seconds for t in r.stages)
    assert untimed < 4 * slow  # the host's work is not left outside every stage


# ---------------------------------------------------------------------------------------------------------


def _word_tokenizer(max_length: int) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = f"<pad> <unk> <s> </s> {PROMPT} blurry".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
    )


def make_tiny_flux() -> Any:
    """A tiny FluxPipeline (CLIP + T5 encoders, FluxTransformer2DModel, 1-channel VAE), random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=2,
                eos_token_id=3,
                pad_token_id=0,
                vocab_size=32,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                projection_dim=32,
                max_position_embeddings=77,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=3,
            )
        )
        vae = AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=1,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=clip,
        tokenizer=_word_tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=_word_tokenizer(32),
        vae=vae,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
