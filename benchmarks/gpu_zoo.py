"""The bottleneck zoo: injected bottlenecks on the full-size random-weight Z-Image, each with its expected verdict.

Every case runs `zmon profile`'s own path (a Monitor without HTTP sampling NVML with GPM, host, process, disk
and the allocator at the profile's rate; stage timing; window_facts; diagnose) on one loaded pipeline, with one
bottleneck injected the way a real service would have it, and compares the verdict (or, for
misconfigurations, a priority-1 finding) with what was injected. Healthy cases must come out `optimized`
with no false priority ≤ 2 finding. Then the profiler's own overhead: interleaved blocks of bare generations
and generations under stage timing + 10 Hz sampling.

Run on the GPU machine (writes zoo.json, zoo.md and one profile per case under $OUT):
    OUT=/tmp/out python3 -m benchmarks.gpu_zoo [--cases a,b] [--runs 6] [--max-seconds 520]
Dry run on CPU with the embedded model (checks the script, not the verdicts):
    OUT=/tmp/zoo python -m benchmarks.gpu_zoo --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zmon.app.profile import profile_monitor
from zmon.capture.profile import ProfileResult, profile_pipeline
from zmon.config import Config, load_config
from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing
from zmon.workload.runner import Workload
from zmon.workload.spec import build_spec

MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"  # the model card's defaults (distilled, 9 steps, guidance 0)


@dataclass
class Case:
    name: str
    injected: str  # what the case does, in words
    expect_verdict: str | None  # None: the verdict is not what the case tests
    expect_finding: str | None = None  # a finding that must be active with priority 1
    healthy: bool = False  # no priority ≤ 2 finding may fire, except `allowed`
    allowed: tuple[str, ...] = ()
    workload: dict[str, Any] = field(default_factory=dict)
    runs: int | None = None
    gpu_only: bool = False


CASES: tuple[Case, ...] = (
    Case("healthy_eager", "nothing: the eager pipeline as built", "optimized", healthy=True, allowed=("compile_off",)),
    Case(
        "cpu_text_encoding", "0.6 s of CPU work in the text encoder's forward (a text encoder on the CPU)", "cpu_bound"
    ),
    Case(
        "cpu_output_processing", "PNG-encoding the image repeatedly in output processing (~0.5 s of CPU)", "cpu_bound"
    ),
    Case(
        "host_pre_hook",
        "a host forward pre-hook on the transformer, registered before zmon's: 80 ms of CPU per forward",
        "cpu_bound",
    ),
    Case(
        "memory_pressure",
        "the card filled so the caching allocator must flush and retry (a blocker tensor "
        "leaving half the cache the generation needs)",
        "memory_bound",
        gpu_only=True,
    ),
    Case(
        "caller_between_calls",
        "the caller spends 0.8 s of CPU after each pipeline call returns (decoding the next input, uploading the "
        "last image) before it calls again",
        "cpu_bound",
    ),
    Case("uneven_steps", "every third denoise step runs 60 extra 8192² bf16 matmuls on the GPU", "kernel_issue"),
    Case(
        "storage_reads",
        "each generation's text encoding reads a 2 GB file from storage (page cache dropped)",
        "io_or_caching",
    ),
    Case(
        "cfg_on_distilled",
        "guidance_scale 5.0 on the guidance-distilled model",
        None,
        expect_finding="cfg_on_distilled",
        workload={"guidance_scale": 5.0},
    ),
    Case(
        "excess_steps",
        "50 steps (the pipeline default) where the model card says 9",
        None,
        expect_finding="excess_steps",
        workload={"steps": 50},
        runs=3,
    ),
    Case(
        "compile_off",
        "the eager pipeline on a GPU (torch.compile off)",
        None,
        expect_finding="compile_off",
        gpu_only=True,
    ),
    Case(
        "cpu_offload",
        "enable_model_cpu_offload() on a card where the weights fit (needs accelerate on the GPU host)",
        None,
        expect_finding="cpu_offload",
        gpu_only=True,
    ),
    Case(
        "float32_on_gpu",
        "the whole pipeline cast to float32 on the GPU (from_pretrained without torch_dtype)",
        None,
        expect_finding="float32_on_gpu",
        gpu_only=True,
    ),
    Case(
        "healthy_compiled",
        "torch.compile(transformer), default warm-up 1, prompts of varying length",
        "optimized",
        healthy=True,
        runs=8,
    ),
)


# ------------------------------------------------------------------------------------------------ injections


def spin(seconds: float) -> None:
    """CPU work holding the GIL, as Python-side preprocessing or a CPU text encoder would."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


@contextlib.contextmanager
def patched(owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    original = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)  # a class: unbound
    had = name in vars(owner)
    set_attr, del_attr = (setattr, delattr) if isinstance(owner, type) else (object.__setattr__, object.__delattr__)
    set_attr(owner, name, wrap(original))
    try:
        yield
    finally:
        if had:
            set_attr(owner, name, original)
        else:
            del_attr(owner, name)


@contextlib.contextmanager
def injected(case: Case, pipe: Any, tiny: bool, scratch: Path) -> Iterator[None]:
    dev = pipe.transformer.device
    scale = 0.1 if tiny else 1.0
    if case.name == "cpu_text_encoding":
        # Inside the text encoder's forward, so it is text encoding whatever wraps encode_prompt.
        handle = pipe.text_encoder.register_forward_pre_hook(lambda m, a: spin(0.6 * scale))
        try:
            yield
        finally:
            handle.remove()
    elif case.name == "cpu_output_processing":
        import io

        def slow_pil(inner: Callable[..., Any]) -> Callable[..., Any]:
            def to_pil(*a: Any, **k: Any) -> Any:
                out = inner(*a, **k)
                end = time.perf_counter() + 0.5 * scale
                while time.perf_counter() < end:  # a service saving PNGs at several quality levels
                    for im in out:
                        im.save(io.BytesIO(), format="PNG", compress_level=9)
                return out

            return to_pil

        with patched(pipe.image_processor, "numpy_to_pil", slow_pil):  # called inside postprocess
            yield
    elif case.name == "host_pre_hook":
        handle = pipe.transformer.register_forward_pre_hook(lambda m, a: spin(0.08 * scale))
        try:
            yield
        finally:
            handle.remove()
    elif case.name == "caller_between_calls":

        def then_work(inner: Callable[..., Any]) -> Callable[..., Any]:
            def call(self: Any, *a: Any, **k: Any) -> Any:
                out = inner(self, *a, **k)
                spin(0.8 * scale)  # outside the pipeline call: zmon's stage timing has stopped
                return out

            return call

        with patched(Workload, "call", then_work):
            yield
    elif case.name == "uneven_steps":
        n = {"calls": 0}
        size = 512 if tiny else 8192
        a = torch.randn(size, size, device=dev, dtype=pipe.transformer.dtype)

        def every_third(module: Any, args: Any) -> None:
            n["calls"] += 1
            if n["calls"] % 3 == 0:
                for _ in range(6 if tiny else 60):
                    a @ a

        handle = pipe.transformer.register_forward_pre_hook(every_third)
        try:
            yield
        finally:
            handle.remove()
            del a
    elif case.name == "storage_reads":
        path = scratch / "lora-like.bin"
        size = (64 if tiny else 2048) * 2**20
        if not path.exists() or path.stat().st_size != size:
            with path.open("wb") as f:
                for _ in range(size // 2**24):
                    f.write(os.urandom(2**24))
                f.flush()
                os.fsync(f.fileno())

        def read_all(module: Any, args: Any) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # from storage, every time
                while os.read(fd, 2**23):
                    pass
            finally:
                os.close(fd)

        handle = pipe.text_encoder.register_forward_pre_hook(read_all)
        try:
            yield
        finally:
            handle.remove()
    elif case.name == "memory_pressure":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()  # the weights: they stay allocated between generations
        Workload(pipe, SPEC).call(0)
        peak_alloc, peak_res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
        # What one generation needs beyond the weights, plus half of the cache it would keep: the allocator has to
        # free its cached blocks and retry (num_alloc_retries) but every generation still fits.
        transient = peak_alloc - resident
        room = transient + (peak_res - peak_alloc) // 2
        blocker = torch.empty(max(0, free - room), dtype=torch.uint8, device=dev)
        print(
            f"  memory_pressure: weights {resident / 1e9:.1f} GB, generation peak +{transient / 1e9:.1f} GB "
            f"allocated / {peak_res / 1e9:.1f} GB reserved; blocker {blocker.numel() / 1e9:.1f} GB leaves "
            f"{room / 1e9:.1f} GB free",
            flush=True,
        )
        try:
            yield
        finally:
            del blocker
            torch.cuda.empty_cache()
    elif case.name == "cpu_offload":
        pipe.enable_model_cpu_offload(device=dev)
        try:
            yield
        finally:
            pipe.remove_all_hooks()
            pipe.to(dev)
    elif case.name == "float32_on_gpu":
        dtype = pipe.transformer.dtype
        pipe.to(torch.float32)
        try:
            yield
        finally:
            pipe.to(dtype)
    elif case.name == "healthy_compiled":
        original = pipe.transformer
        pipe.transformer = torch.compile(original)
        try:
            yield
        finally:
            pipe.transformer = original
    else:
        yield


# ------------------------------------------------------------------------------------------------ running


SPEC: Any = None


def config(args: argparse.Namespace, case: Case, tiny_cache: str | None) -> Config:
    workload: dict[str, Any] = {
        "resolutions": [f"{args.size}x{args.size}"],
        "steps": args.steps,
        "guidance_scale": 0.0,
        **case.workload,
    }
    model = {"id": "builtin:tiny-z-image", "cache_dir": tiny_cache} if args.tiny else {"id": MODEL_ID}
    return load_config(
        None,
        environ={},
        overrides={
            "model": model,
            "workload": workload,
            "profiling": {"runs": case.runs or args.runs, "warmup": 1, "disk_test_bytes": 0, "formats": ["json", "md"]},
        },
    )


def profile(pipe: Any, cfg: Config, out: Path, model_id: str) -> ProfileResult:
    mon, history = profile_monitor(cfg)
    try:
        return profile_pipeline(pipe, cfg, sampling=mon, history=history, out_dir=out, model_id=model_id)
    finally:
        mon.stop()


def judge(case: Case, result: ProfileResult) -> tuple[bool, str]:
    d = result.diagnosis
    active = {f.kind: f for f in d.active_findings}
    problems = []
    if case.expect_verdict is not None and d.verdict != case.expect_verdict:
        problems.append(f"verdict {d.verdict}, expected {case.expect_verdict}")
    if case.expect_finding is not None:
        f = active.get(case.expect_finding)
        if f is None or f.priority != 1:
            problems.append(f"{case.expect_finding} not an active priority-1 finding")
    if case.healthy:
        false = [k for k, f in active.items() if f.priority <= 2 and k not in case.allowed]
        if false:
            problems.append(f"false priority ≤ 2 findings: {', '.join(false)}")
    return not problems, "; ".join(problems) or "ok"


def overhead(pipe: Any, cfg: Config, pairs: int, block: int) -> dict[str, Any]:
    """Bare generations vs generations under stage timing + the profile's sampling, interleaved blocks."""
    work = Workload(pipe, build_spec(cfg, {"distilled": True}))
    bare: list[float] = []
    profiled: list[float] = []
    work.call(0)
    for p in range(pairs):
        bare += [work.call(p * block + k).seconds for k in range(block)]
        mon, _ = profile_monitor(cfg)
        timing = apply_stage_timing(pipe, StageTimingConfig())
        mon.start()
        mon.wait_ready(30.0)  # as zmon profile does: first samples (NVML init, GPM warm-up) before timing
        try:
            profiled += [work.call(p * block + k).seconds for k in range(block)]
        finally:
            mon.stop()
            timing.remove()
    b, q = statistics.median(bare), statistics.median(profiled)
    return {"bare_median_s": b, "profiled_median_s": q, "overhead": q / b - 1, "n_each": len(bare)}


def main() -> int:
    global SPEC
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the embedded model")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--max-seconds", type=float, default=520.0)
    ap.add_argument("--overhead-pairs", type=int, default=6)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(os.environ.get("ZMON_SCRATCH", "/tmp/zmon-zoo"))
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tiny_cache = None
    if args.tiny:
        torch.set_num_threads(1)
        from zmon.workload.loading import load_pipeline

        tiny_cache = str(scratch / "cache")
        args.size, args.runs, args.overhead_pairs = 64, 3, 2
        pipe = load_pipeline(config(args, CASES[0], tiny_cache).model).pipe
        model_id = "builtin:tiny-z-image"
    else:
        from benchmarks.fullsize import build_full_z_image

        pipe = build_full_z_image()
        model_id = MODEL_ID
    chosen = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    base_cfg = config(args, CASES[0], tiny_cache)
    SPEC = build_spec(base_cfg, {"distilled": True})
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "cases": rows,
    }
    for case in chosen:
        if case.gpu_only and args.tiny:
            rows.append({"case": case.name, "ok": None, "note": "skipped on CPU"})
            continue
        if time.monotonic() - started > args.max_seconds:
            rows.append({"case": case.name, "ok": None, "note": "skipped: out of time"})
            continue
        t0 = time.monotonic()
        cfg = config(args, case, tiny_cache)
        try:
            with injected(case, pipe, args.tiny, scratch):
                result = profile(pipe, cfg, out / case.name, model_id)
        except Exception as e:  # a case that breaks is reported, the others still run
            rows.append({"case": case.name, "ok": False, "note": f"{type(e).__name__}: {e}"})
            print(f"{case.name}: FAILED {e}", flush=True)
            continue
        ok, note = judge(case, result)
        d, f = result.diagnosis, result.facts
        lat = f.baseline.latency
        rows.append(
            {
                "case": case.name,
                "injected": case.injected,
                "expected": case.expect_verdict or case.expect_finding,
                "verdict": d.verdict,
                "confidence": d.confidence,
                "findings": [(x.kind, x.priority) for x in d.active_findings],
                "p50_s": None if lat is None else lat.p50,
                "gpu_util_whole": f.utilization.gpu_by_stage.get("generation"),
                "untimed_share": f.stages.unattributed_share,
                "excluded": [(x.kind, x.reason) for x in f.baseline.excluded],
                "summary": d.summary,
                "ok": ok,
                "note": note,
                "seconds": time.monotonic() - t0,
            }
        )
        print(
            f"{case.name}: {d.verdict} ({'ok' if ok else 'WRONG: ' + note}) in {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        (out / "zoo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.overhead_pairs > 0 and time.monotonic() - started < args.max_seconds + 60:
        summary["overhead"] = overhead(pipe, base_cfg, args.overhead_pairs, 3)
    (out / "zoo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [
        "| case | injected | expected | got | findings (priority) | p50 | GPU busy | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("verdict") is None:
            lines.append(f"| {r['case']} | | | | | | | {r['note']} |")
            continue
        busy = r["gpu_util_whole"]
        lines.append(
            f"| {r['case']} | {r['injected']} | {r['expected']} | {r['verdict']} ({r['confidence']}) | "
            + ", ".join(f"{k} ({p})" for k, p in r["findings"])
            + f" | {r['p50_s']:.3f} s | {'-' if busy is None else f'{busy:.0%}'}"
            + f" | {'✓' if r['ok'] else '✗ ' + r['note']} |"
        )
    if "overhead" in summary:
        o = summary["overhead"]
        lines.append(
            f"\nprofiler overhead: bare {o['bare_median_s']:.4f} s, profiled {o['profiled_median_s']:.4f} s "
            f"({o['overhead']:+.2%}, {o['n_each']} generations each, interleaved)"
        )
    (out / "zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] in (True, None) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
