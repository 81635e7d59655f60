"""GPU: stage split of the full-size Z-Image architecture and the overhead of zmon's stage timing.

Interleaved A/B in one process (bare, instrumented, bare, …) over many generations, compared by medians, and the
whole comparison repeated to see its own spread (run-to-run spread is ±2% on an H100, larger than the target).
Also: prompt-embedding cache on vs off, and per-stage synchronize() timing for contrast.
Run: python -m benchmarks.gpu_stages [--pairs 15] [--repeats 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()

    import torch

    from benchmarks.fullsize import build_full_z_image
    from zmon.config import PromptCacheConfig
    from zmon.instrumentation.prompt_cache import apply_prompt_cache
    from zmon.instrumentation.records import STAGES, GenerationRecord
    from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing

    pipe = build_full_z_image()
    prompt = "a photorealistic portrait of an astronaut in a garden at sunset, cinematic lighting, 8k"
    kw: dict[str, Any] = dict(
        prompt=prompt,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=0.0,
        output_type="pil",
    )

    def gen(seed: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(generator=torch.Generator("cuda").manual_seed(seed), **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(3):
        print(f"warm-up {i}: {gen(i):.3f}s")
    records: list[GenerationRecord] = []
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "comparisons": [],
    }
    for rep in range(args.repeats):
        bare, inst = [], []
        for i in range(args.pairs):
            bare.append(gen(i))
            h = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
            inst.append(gen(i))
            h.remove()
        b, n = statistics.median(bare), statistics.median(inst)
        result["comparisons"].append(
            {
                "bare_median_s": b,
                "instrumented_median_s": n,
                "overhead_pct": (n / b - 1) * 100,
                "bare": bare,
                "instrumented": inst,
            }
        )
        print(f"repeat {rep}: bare {b:.4f}s  instrumented {n:.4f}s  overhead {(n / b - 1) * 100:+.2f}%")

    stage_med = {s: statistics.median([r.stage_seconds(s) for r in records]) for s in STAGES}
    steps = [x for r in records for x in r.step_seconds()]
    total = statistics.median([r.total_seconds for r in records])
    result["stages_median_s"] = stage_med
    result["total_median_s"] = total
    result["step_median_s"] = statistics.median(steps)
    result["step_count"] = records[-1].steps
    result["peak_allocated_bytes"] = records[-1].peak_allocated_bytes
    result["peak_reserved_bytes"] = records[-1].peak_reserved_bytes
    result["timing_method"] = records[-1].timing_method

    # prompt cache: same prompt again → text encoding skipped
    recs2: list[GenerationRecord] = []
    cache = apply_prompt_cache(pipe, PromptCacheConfig(enabled=True, max_entries=16))
    h = apply_stage_timing(pipe, StageTimingConfig(on_record=recs2.append))
    cached = [gen(i) for i in range(args.pairs)]
    h.remove()
    cache.remove()
    result["prompt_cache"] = {
        "median_s": statistics.median(cached),
        "hits": cache.hits,
        "misses": cache.misses,
        "text_encode_median_s": statistics.median(r.stage_seconds("text_encode") for r in recs2[1:]),
    }
    print("\n| stage | median s | share |")
    print("|---|---|---|")
    for s, v in stage_med.items():
        print(f"| {s} | {v:.4f} | {v / total:.1%} |")
    print(f"| total (instrumented) | {total:.4f} | |")
    print(
        f"\nstep median {result['step_median_s'] * 1e3:.1f} ms × {result['step_count']} steps; "
        f"peak allocated {result['peak_allocated_bytes'] / 1e9:.1f} GB, reserved "
        f"{result['peak_reserved_bytes'] / 1e9:.1f} GB; card {result['card']}"
    )
    print(f"prompt cache: {result['prompt_cache']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_stages.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
