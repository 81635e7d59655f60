"""GPU: `zmon profile` on the full-size random-weight Z-Image, eager then compiled, and the profiler's overhead.

In one process: build the pipeline on the GPU (benchmarks.fullsize), run zmon's profile runner on it in
process (no save_pretrained of 20 GB, so no checkpoint I/O figures), eager with --trace and --memory-snapshot,
then the overhead comparison (bare generation loop vs profile_pipeline, interleaved blocks, same prompts and
seeds, wall-clock medians), then torch.compile(pipe.transformer) and a second profile.
Writes OUT/profile-eager/, OUT/profile-compiled/ and OUT/summary.json (rewritten after every phase, so a
timeout still leaves what was measured).
Run: python -m benchmarks.gpu_profile --out DIR [--runs 10] [--warmup 2] [--size 1024] [--steps 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

MODEL_ID = "random-weights/Z-Image-Turbo"  # last component picks the model card's defaults and checks


def trace_summary(path: Path) -> dict[str, Any]:
    """What the Chrome trace holds: zmon ranges, kernels and how busy the GPU was inside the trace."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    cats = Counter(str(e.get("cat")) for e in events)
    zmon = Counter(str(e["name"]) for e in events if str(e.get("name", "")).startswith("zmon/"))
    kernels = [e for e in events if e.get("cat") == "kernel"]
    busy_us = sum(float(e.get("dur", 0)) for e in kernels)
    spans = [e for e in events if e.get("name") == "zmon/generation" and "dur" in e]
    gen_us = sum(float(e["dur"]) for e in spans)
    return {
        "bytes": path.stat().st_size,
        "events": len(events),
        "categories": dict(cats.most_common(12)),
        "zmon_ranges": dict(zmon),
        "kernels": len(kernels),
        "kernel_busy_seconds": busy_us / 1e6,
        "generation_seconds": gen_us / 1e6,
        "kernel_busy_share_of_generation": busy_us / gen_us if gen_us else None,
        "nccl_kernels": sum(1 for e in kernels if "nccl" in str(e.get("name", "")).lower()),
    }


def profile_summary(result: Any, seconds: float) -> dict[str, Any]:
    f, d = result.facts, result.diagnosis
    lat = f.baseline.latency
    return {
        "phase_seconds": seconds,
        "reported_median_s": None if lat is None else lat.p50,
        "reported_p95_s": None if lat is None else lat.p95,
        "wall_median_s": statistics.median(result.measured_wall_seconds) if result.measured_wall_seconds else None,
        "first_generation_s": f.io.first_generation_seconds,
        "stages_mean_s": {s.stage: s.mean_seconds for s in f.stages.stages},
        "step_mean_s": f.stages.step_mean_seconds,
        "step_cv": f.stages.step_cv,
        "run_cv": f.baseline.run_cv,
        "gpu_util_by_stage": f.utilization.gpu_by_stage,
        "process_cpu_by_stage": f.utilization.process_cpu_by_stage,
        "gpu_samples": len(f.utilization.gpu_samples),
        "memory": {
            "peak_allocated_bytes": f.memory.peak_allocated_bytes,
            "peak_reserved_bytes": f.memory.peak_reserved_bytes,
            "vram_used_fraction": f.memory.vram_used_fraction,
            "vram_used_source": f.memory.vram_used_source,
            "reserved_unallocated_ratio": f.memory.reserved_unallocated_ratio,
            "fragmentation_ratio": f.memory.fragmentation_ratio,
        },
        "environment": {
            k: getattr(f.environment, k)
            for k in (
                "card_name",
                "driver_version",
                "cuda_version",
                "torch_version",
                "diffusers_version",
                "device",
                "dtype",
                "attention_backend",
                "compiled",
                "alloc_conf",
            )
        },
        "timing_method": f.workload.timing_method,
        "verdict": d.verdict,
        "verdict_summary": d.summary,
        "active_findings": [{"kind": x.kind, "priority": x.priority, "fix": x.fix} for x in d.active_findings],
        "notes": result.notes,
        "reports": {k: str(v) for k, v in result.paths.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--pairs", type=int, default=4, help="interleaved bare/profiled blocks for the overhead")
    ap.add_argument("--block", type=int, default=5, help="generations per block")
    ap.add_argument("--skip-compiled", action="store_true")
    args = ap.parse_args()

    import torch

    from benchmarks.fullsize import build_full_z_image
    from zmon.app.profile import profile_monitor
    from zmon.capture.profile import profile_pipeline as _profile_pipeline
    from zmon.capture.profile import workload_spec
    from zmon.capture.progress import Progress
    from zmon.config import load_config
    from zmon.workload.runner import Workload

    def profile_pipeline(pipe: Any, cfg: Any, **kw: Any) -> Any:
        mon, history = profile_monitor(cfg)  # the profile samples through zmon's own sampler
        try:
            return _profile_pipeline(pipe, cfg, sampling=mon, history=history, **kw)
        finally:
            mon.stop()

    class WorkloadCaller:
        def __init__(self, pipe: Any, spec: Any) -> None:
            self.workload = Workload(pipe, spec)

        def __call__(self, i: int) -> float:
            return self.workload.call(i).seconds

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary: dict[str, Any] = {
        "card": card,
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "warmup": args.warmup,
    }

    def save() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    t0 = time.perf_counter()
    pipe = build_full_z_image()
    summary["build_seconds"] = time.perf_counter() - t0
    cfg = load_config(
        None,
        environ={},
        overrides={
            "model": {"id": MODEL_ID},
            "workload": {"resolutions": [f"{args.size}x{args.size}"], "steps": args.steps, "guidance_scale": 0.0},
            "profiling": {"runs": args.runs, "warmup": args.warmup, "disk_test_bytes": 0},
        },
    )
    progress = Progress(sys.stderr)
    save()

    # 1. eager, with a trace and a memory snapshot after the measured runs
    t0 = time.perf_counter()
    eager = profile_pipeline(
        pipe, cfg, out_dir=out / "profile-eager", model_id=MODEL_ID, trace=True, memory_snapshot=True, progress=progress
    )
    summary["eager"] = profile_summary(eager, time.perf_counter() - t0)
    if eager.trace is not None:
        summary["eager"]["trace"] = trace_summary(eager.trace.chrome_trace)
    if eager.memory_snapshot is not None:
        summary["eager"]["memory_snapshot_bytes"] = eager.memory_snapshot.stat().st_size
    print(f"eager: {summary['eager']['reported_median_s']:.4f} s median, verdict {eager.diagnosis.verdict}")
    save()

    # 2. overhead: bare loop vs profile_pipeline, interleaved blocks over the same prompts and seeds
    t0 = time.perf_counter()
    call = WorkloadCaller(pipe, workload_spec(cfg, pipe, MODEL_ID))
    bare: list[float] = []
    profiled_wall: list[float] = []
    profiled_reported: list[float] = []
    blocks = []
    for rep in range(args.pairs):
        b = [call(i) for i in range(args.block)]
        r = profile_pipeline(pipe, cfg, runs=args.block, warmup=0, model_id=MODEL_ID, write=False)
        p_wall, p_rep = r.measured_wall_seconds, list(r.facts.baseline.totals_seconds)
        bare += b
        profiled_wall += p_wall
        profiled_reported += p_rep
        blocks.append({"bare": b, "profiled_wall": p_wall, "profiled_reported": p_rep})
        print(
            f"overhead block {rep}: bare {statistics.median(b):.4f}s  profiled {statistics.median(p_wall):.4f}s "
            f"(reported {statistics.median(p_rep):.4f}s)"
        )
    mb, mw, mr = (statistics.median(x) for x in (bare, profiled_wall, profiled_reported))
    summary["overhead"] = {
        "phase_seconds": time.perf_counter() - t0,
        "bare_wall_median_s": mb,
        "profiled_wall_median_s": mw,
        "profiled_reported_median_s": mr,
        "overhead_pct": (mw / mb - 1) * 100,  # what profiling costs each generation
        "reported_vs_bare_pct": (mr / mb - 1) * 100,  # how close the report's figure is to an unprofiled loop
        "block_medians": [{k: statistics.median(v) for k, v in blk.items()} for blk in blocks],
        "blocks": blocks,
    }
    print(
        f"overhead: bare {mb:.4f}s  profiled {mw:.4f}s ({(mw / mb - 1) * 100:+.2f}%)  "
        f"reported {mr:.4f}s ({(mr / mb - 1) * 100:+.2f}%)"
    )
    save()

    # 3. compiled transformer (compilation happens in the first warm-up generation)
    if not args.skip_compiled:
        import torch._dynamo.utils as dynamo_utils

        pipe.transformer = torch.compile(pipe.transformer)
        t0 = time.perf_counter()
        compiled = profile_pipeline(pipe, cfg, out_dir=out / "profile-compiled", model_id=MODEL_ID, progress=progress)
        summary["compiled"] = profile_summary(compiled, time.perf_counter() - t0)
        summary["compiled"]["dynamo_counters"] = {
            k: dict(v) for k, v in dynamo_utils.counters.items() if k in ("stats", "recompiles", "frames")
        }
        print(
            f"compiled: {summary['compiled']['reported_median_s']:.4f} s median, verdict {compiled.diagnosis.verdict}"
        )
        save()
    print(
        json.dumps({k: summary[k] for k in ("eager", "overhead", "compiled") if k in summary}, indent=1, default=str)[
            :6000
        ]
    )


if __name__ == "__main__":
    main()
