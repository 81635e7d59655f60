"""GPU: data-parallel workers, the interconnect probe and a context-parallel pipeline's communication, on the
full-size random-weight Z-Image (benchmarks/fullsize.py).

Modes:
  --mode one     ONE GPU: `zmon run`'s worker path with 1 worker (devices [0]) generating --gens images at
                 --size², the parent serving /metrics; checks the merged exposition (every family once per
                 device, promtool clean, generations/images/allocator/NVML/worker families present, scaling
                 efficiency exported) and reports the worker's own rate against the parent's aggregate.
  --mode multi   N GPUs (--gpus, default 2; needs a machine with that many):
                 1. `zmon probe interconnect` over the GPUs (NCCL): busbw/latency against NVLink's nominal figure;
                 2. data parallel: 1 worker then N workers, --gens each per worker; the measured scaling
                    efficiency (N-worker images/s / (N × 1-worker images/s)) next to zmon_scaling_efficiency_ratio;
                 3. context parallel: the pipeline split over N ranks (zmon.workload.parallel, Ulysses) with
                    zmon's collective timing: time in collectives per step and per stage, the verdict;
                 4. the same with an injected slow collective (every all-to-all delayed on the GPU by --inject-ms):
                    the diagnosis must turn to network_bound.
  --cpu          the same on the CPU (embedded tiny model, gloo, cpu:N workers): the dry run of either mode.

Prints tables and writes $OUT/gpu_multi_<mode>.json (+ metrics-*.txt, probe.json). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) in every process.
Run from the repo root: python -m benchmarks.gpu_multi --mode one --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from zmon.app.workers.protocol import MULTICAST_OFF

os.environ.update(MULTICAST_OFF)

FULL_MODEL_ID = "random/Z-Image-Turbo"  # last component: zmon's Z-Image-Turbo defaults (9 steps, guidance 0)
PROMPT = "a photorealistic portrait of an astronaut in a garden at sunset, cinematic lighting"


# ------------------------------------------------------------------------------------------------ helpers


def _promtool() -> str | None:
    for p in ("/tmp/promtool", shutil.which("promtool")):
        if p and Path(p).exists():
            return p
    return None


def promtool_check(text: str) -> str:
    tool = _promtool()
    if tool is None:
        return "promtool not available"
    run = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    return "clean" if run.returncode == 0 else (run.stdout + run.stderr).decode()[-2000:]


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def steady_rate(records: list[tuple[str, Any]]) -> dict[str, Any]:
    """Images/s of the successful generations after each worker's first, aggregate and per worker."""
    seen: set[str] = set()
    steady = []
    for worker, r in sorted(records, key=lambda x: x[1].started_at):
        if r.status != "ok":
            continue
        if worker not in seen:
            seen.add(worker)
            continue
        steady.append((worker, r))
    if not steady:
        return {}
    start = min(r.started_at for _, r in steady)
    end = max(r.started_at + r.total_seconds for _, r in steady)
    per: dict[str, list[float]] = {}
    for w, r in steady:
        per.setdefault(w, []).append(r.total_seconds)
    return {
        "images": sum(r.batch_size for _, r in steady),
        "wall_seconds": end - start,
        "aggregate_images_per_second": sum(r.batch_size for _, r in steady) / (end - start),
        "worker_median_seconds": {w: statistics.median(v) for w, v in sorted(per.items())},
    }


# ------------------------------------------------------------------------------------------------ workers


def _fullsize_worker(spec: Any, conn: Any, beat: Any) -> None:
    """Worker target: zmon's worker, its loader replaced by the on-GPU build of the full-size architecture."""
    import zmon.app.workers.worker as worker
    from zmon.workload.loading import LoadedPipeline

    def load(cfg: Any, *, img2img: bool = False) -> Any:
        from benchmarks.fullsize import build_full_z_image

        t0 = time.perf_counter()
        pipe = build_full_z_image(cfg.device)
        return LoadedPipeline(
            pipe, cfg.id, type(pipe).__name__, cfg.device, "bfloat16", time.perf_counter() - t0, None, None, False
        )

    worker.load_pipeline = load  # type: ignore[assignment]
    worker.worker_main(spec, conn, beat)


def worker_config(devices: Any, *, cpu: bool, size: int, steps: int, gens: int) -> Any:
    from zmon.config import load_config

    model: dict[str, Any] = {"devices": devices}
    workload: dict[str, Any] = {"max_generations": gens, "steps": steps}
    if cpu:
        model.update(cpu_threads=1)
    else:
        model.update(id=FULL_MODEL_ID, pipeline_class="ZImagePipeline")
        workload.update(resolutions=[f"{size}x{size}"], prompts_file=None)
    return load_config(
        overrides={"model": model, "workload": workload, "server": {"listen": f"127.0.0.1:{free_port()}"}}
    )


def dp_run(label: str, devices: Any, *, cpu: bool, size: int, steps: int, gens: int, out: Path) -> dict[str, Any]:
    """One `zmon run` worker setup (parent + workers), scraped over HTTP while it runs and once at the end."""
    from zmon.app.workers.parent import WorkerParent
    from zmon.app.workers.supervisor import plan_devices

    placements = plan_devices(devices)
    cfg = worker_config(devices, cpu=cpu, size=size, steps=steps, gens=gens * len(placements))
    parent = WorkerParent(cfg, placements)
    records: list[tuple[str, Any]] = []
    parent.merge.raw_listeners.append(lambda w, m, r: records.append((w, r)))
    sup = parent.supervise(cfg.workload.max_generations, entry=None if cpu else _fullsize_worker)
    parent.monitor.start()
    url = f"{parent.monitor.server.url}/metrics" if parent.monitor.server else None
    scrapes: list[float] = []
    live_text: list[str] = [""]  # the last scrape while the workers ran: their gauges go when they exit
    stop = threading.Event()

    def scrape_loop() -> None:
        while not stop.wait(2.0):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=10) as r:  # type: ignore[arg-type]
                    body = r.read().decode()
                scrapes.append(time.perf_counter() - t0)
                if "zmon_torch_reserved_bytes{" in body:
                    live_text[0] = body
            except OSError:
                pass

    scraper = threading.Thread(target=scrape_loop, daemon=True)
    scraper.start()
    t0 = time.perf_counter()
    try:
        result = sup.run(threading.Event())
        wall = time.perf_counter() - t0
        stop.set()
        with urllib.request.urlopen(url, timeout=10) as r:  # type: ignore[arg-type]
            text = r.read().decode()
    finally:
        parent.monitor.stop()
    (out / f"metrics-{label}.txt").write_text(text)
    values = samples(text)
    lines = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    duplicates = [k for k, n in Counter(lines).items() if n > 1]
    labels = [p.label for p in placements]
    checks = {
        "outcomes": result.outcomes,
        "restarts": result.restarts,
        "generations_ok": {
            d: sum(
                v
                for k, v in values.items()
                if k.startswith("zmon_generations_total{") and f'device="{d}"' in k and 'status="ok"' in k
            )
            for d in labels
        },
        "worker_up_families": sorted(k for k in values if k.startswith("zmon_worker_up{")),
        "scaling_efficiency_ratio": values.get("zmon_scaling_efficiency_ratio"),
        "worker_images_per_second": {k: v for k, v in values.items() if k.startswith("zmon_worker_images_per_second")},
        "allocator_devices": sorted(  # from a scrape while the workers ran (a worker's gauges go with it)
            {
                m.group(1)
                for k in samples(live_text[0])
                if (m := re.match(r'zmon_torch_reserved_bytes\{device="(\d+)"', k))
            }
        ),
        "nvml_gpus": sorted(
            {m.group(1) for k in values if (m := re.match(r'zmon_gpu_utilization_ratio\{gpu="(\d+)"', k))}
        ),
        "duplicate_series": duplicates,
        "promtool": promtool_check(text),
        "series": len(lines),
        "scrape_seconds_median": statistics.median(scrapes) if scrapes else None,
        "bottleneck_verdict": next(
            (k for k, v in values.items() if k.startswith("zmon_bottleneck_verdict") and v == 1), None
        ),
    }
    rate = steady_rate(records)
    ok = (
        all(v == "done" for v in result.outcomes.values())
        and not duplicates
        and checks["promtool"] in ("clean", "promtool not available")
        and all(n == gens for n in checks["generations_ok"].values())
    )
    return {
        "label": label,
        "devices": labels,
        "wall_seconds": wall,
        "ok": ok,
        "checks": checks,
        "rate": rate,
        "latencies": [r.total_seconds for _, r in records if r.status == "ok"],
    }


# ------------------------------------------------------------------------------------------------ context parallel


def _cp_rank(
    rank: int, world: int, store: str, cpu: bool, size: int, steps: int, gens: int, inject_ms: float, queue: Any
) -> None:
    os.environ.update(MULTICAST_OFF)
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from zmon.instrumentation.collectives import apply_collective_timing
    from zmon.instrumentation.stages import StageTimingConfig, apply_stage_timing
    from zmon.workload.parallel import apply_context_parallel

    try:
        if cpu:
            torch.set_num_threads(1)
            device = "cpu"
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
            from zmon.workload.tiny import make_tiny_z_image_pipeline

            pipe = make_tiny_z_image_pipeline()
            pipe.set_progress_bar_config(disable=True)
        else:
            device = f"cuda:{rank}"
            torch.cuda.set_device(rank)
            dist.init_process_group(
                "nccl", init_method=f"file://{store}", rank=rank, world_size=world, device_id=torch.device(device)
            )
            from benchmarks.fullsize import build_full_z_image

            pipe = build_full_z_image(device)
        kw = dict(
            prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0, output_type="pt"
        )

        def gen(seed: int = 7) -> tuple[float, Any]:
            if not cpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            image = pipe(**kw, generator=torch.Generator(device).manual_seed(seed)).images
            if not cpu:
                torch.cuda.synchronize()
            return time.perf_counter() - t0, image

        gen()  # warm-up
        single = [gen()[0] for _ in range(2)]
        _, reference = gen()
        apply_context_parallel(pipe, world)
        gen()  # warm-up of the split pipeline
        bare = [gen()[0] for _ in range(gens)]  # no zmon hooks: the reference for their overhead
        phases: dict[str, Any] = {}
        for phase in ("plain", "slow"):
            if phase == "slow":
                funcol.all_to_all_single = _delayed(funcol.all_to_all_single, inject_ms / 1e3, cpu)
            records: list[Any] = []
            timing = apply_stage_timing(pipe, StageTimingConfig(on_record=records.append))
            collectives = apply_collective_timing(pipe)
            try:
                walls = [gen()[0] for _ in range(gens)]
                _, image = gen()
            finally:
                collectives.remove()
                timing.remove()
            phases[phase] = {
                "records": records[:gens],
                "walls": walls,
                "max_diff": float((image.float() - reference.float()).abs().max()),
            }
        queue.put((rank, {"single_seconds": single, "bare_seconds": bare, "phases": phases, "device": device}))
    except BaseException as e:
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _delayed(fn: Any, seconds: float, cpu: bool) -> Any:
    """A slow link: the collective starts `seconds` late, on the GPU stream (or the calling thread on CPU)."""
    if cpu:

        def slow_cpu(*a: Any, **k: Any) -> Any:
            time.sleep(seconds)
            return fn(*a, **k)

        return slow_cpu
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * seconds / (start.elapsed_time(end) / 1e3))

    def slow_gpu(*a: Any, **k: Any) -> Any:
        torch.cuda._sleep(cycles)
        return fn(*a, **k)

    return slow_gpu


def cp_run(world: int, *, cpu: bool, size: int, steps: int, gens: int, inject_ms: float) -> dict[str, Any]:
    import multiprocessing

    from zmon.analysis.diagnosis import diagnose
    from zmon.analysis.facts import build_facts

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="zmon-cp-") as tmp:
        procs = [
            ctx.Process(target=_cp_rank, args=(r, world, f"{tmp}/store", cpu, size, steps, gens, inject_ms, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=900) for _ in procs)
        for p in procs:
            p.join(60)
    errors = {r: v["error"] for r, v in got.items() if "error" in v}
    if errors:
        return {"ok": False, "errors": errors}
    out: dict[str, Any] = {"world": world, "single_gpu_seconds": statistics.median(got[0]["single_seconds"])}
    verdicts = {}
    for phase in ("plain", "slow"):
        recs = got[0]["phases"][phase]["records"]
        facts = build_facts(recs)
        d = diagnose(facts)
        mg = facts.multi_gpu
        steps_comm = [r.step_communication_seconds() for r in recs]
        steps_time = [r.step_seconds() for r in recs]
        per_step = [
            statistics.median(c[k] / t[k] for c, t in zip(steps_comm, steps_time, strict=True) if t[k] > 0)
            for k in range(len(steps_time[0]))
        ]
        per_stage = {
            s: statistics.median(r.communication_seconds(s) or 0.0 for r in recs)
            for s in ("text_encode", "denoise_step", "vae_decode", "other")
        }
        calls = Counter()
        for c in recs[-1].communication or ():
            calls[c.stage] += c.calls
        out[phase] = {
            "latency_seconds": statistics.median(r.total_seconds for r in recs),
            "wall_seconds": statistics.median(got[0]["phases"][phase]["walls"]),
            "communication_share": None if mg is None else mg.nccl_time_share,
            "step_communication_share": None if mg is None else mg.step_communication_share,
            "share_per_step": per_step,
            "communication_seconds_per_stage": per_stage,
            "calls_per_generation": dict(calls),
            "max_diff_vs_single_gpu": [got[r]["phases"][phase]["max_diff"] for r in sorted(got)],
            "verdict": d.verdict,
            "multi_gpu_network_active": next(f.active for f in d.findings if f.kind == "multi_gpu_network"),
        }
        verdicts[phase] = d.verdict
    out["speedup_vs_single_gpu"] = out["single_gpu_seconds"] / out["plain"]["latency_seconds"]
    bare = statistics.median(got[0]["bare_seconds"])
    out["bare_wall_seconds"] = bare
    # stage + collective timing (CUDA events around every collective) against the same split pipeline bare
    out["instrumentation_overhead"] = out["plain"]["wall_seconds"] / bare - 1
    out["ok"] = verdicts["slow"] == "network_bound" and (out["slow"]["communication_share"] or 0) > (
        out["plain"]["communication_share"] or 0
    )
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("one", "multi"), required=True)
    ap.add_argument("--cpu", action="store_true", help="dry run: embedded tiny model, cpu:N workers, gloo")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--gens", type=int, default=6, help="generations per worker (per phase in context parallel)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--inject-ms", type=float, default=2.0, help="delay added to every all-to-all (slow phase)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    if args.cpu:
        args.size, args.steps = 64, 3
        args.inject_ms = max(args.inject_ms, 20.0)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "mode": args.mode,
        "cpu": args.cpu,
        "size": args.size,
        "steps": args.steps,
        "gens": args.gens,
    }
    if args.mode == "one":
        run = dp_run(
            "one-worker",
            "cpu:1" if args.cpu else (0,),
            cpu=args.cpu,
            size=args.size,
            steps=args.steps,
            gens=args.gens,
            out=args.out,
        )
        report["one_worker"] = run
        ok = run["ok"] and run["checks"]["scaling_efficiency_ratio"] is not None
        if not args.cpu:
            ok = ok and run["checks"]["allocator_devices"] == ["0"] and "0" in run["checks"]["nvml_gpus"]
        report["ok"] = ok
        c = run["checks"]
        print("\n| check | value |\n|---|---|")
        for k in (
            "outcomes",
            "restarts",
            "generations_ok",
            "scaling_efficiency_ratio",
            "worker_images_per_second",
            "allocator_devices",
            "nvml_gpus",
            "duplicate_series",
            "promtool",
            "series",
            "scrape_seconds_median",
            "bottleneck_verdict",
        ):
            print(f"| {k} | {c[k]} |")
        print(f"| steady aggregate images/s | {run['rate'].get('aggregate_images_per_second')} |")
        print(f"| latencies (s) | {[round(x, 3) for x in run['latencies']]} |")
    else:
        n = args.gpus
        devices_n = f"cpu:{n}" if args.cpu else tuple(range(n))
        probe_out = args.out / "probe.json"
        cmd = [
            sys.executable,
            "-m",
            "zmon",
            "probe",
            "interconnect",
            "--devices",
            f"cpu:{n}" if args.cpu else ",".join(map(str, range(n))),
            "--out",
            str(probe_out),
        ]
        if args.cpu:
            cmd += ["--min-bytes", "1K", "--max-bytes", "256K", "--iters", "5"]
        probe = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        print(probe.stdout)
        report["probe"] = {
            "rc": probe.returncode,
            "stderr": probe.stderr[-2000:],
            "result": json.loads(probe_out.read_text()) if probe_out.exists() else None,
        }
        one = dp_run(
            "dp-1",
            "cpu:1" if args.cpu else (0,),
            cpu=args.cpu,
            size=args.size,
            steps=args.steps,
            gens=args.gens,
            out=args.out,
        )
        many = dp_run(
            f"dp-{n}", devices_n, cpu=args.cpu, size=args.size, steps=args.steps, gens=args.gens, out=args.out
        )
        r1 = one["rate"].get("aggregate_images_per_second")
        rn = many["rate"].get("aggregate_images_per_second")
        measured = rn / (n * r1) if r1 and rn else None
        report["data_parallel"] = {
            "one": one,
            "many": many,
            "measured_scaling_efficiency": measured,
            "zmon_scaling_efficiency_ratio": many["checks"]["scaling_efficiency_ratio"],
        }
        print(
            f"\ndata parallel: 1 worker {r1} img/s, {n} workers {rn} img/s → measured efficiency {measured}; "
            f"zmon_scaling_efficiency_ratio {many['checks']['scaling_efficiency_ratio']}"
        )
        cp = cp_run(n, cpu=args.cpu, size=args.size, steps=args.steps, gens=args.gens, inject_ms=args.inject_ms)
        report["context_parallel"] = cp
        if "plain" in cp:
            print("\n| context parallel | plain | slow collective |\n|---|---|---|")
            for k in (
                "latency_seconds",
                "communication_share",
                "step_communication_share",
                "calls_per_generation",
                "max_diff_vs_single_gpu",
                "verdict",
                "multi_gpu_network_active",
            ):
                print(f"| {k} | {cp['plain'][k]} | {cp['slow'][k]} |")
            print(
                f"| share per step | {[round(x, 3) for x in cp['plain']['share_per_step']]} | "
                f"{[round(x, 3) for x in cp['slow']['share_per_step']]} |"
            )
            print(
                f"single GPU {cp['single_gpu_seconds']:.3f}s, {n} ranks {cp['plain']['latency_seconds']:.3f}s: "
                f"speedup {cp['speedup_vs_single_gpu']:.2f}×; zmon timing overhead on the split pipeline "
                f"{cp['instrumentation_overhead']:+.1%} (bare {cp['bare_wall_seconds']:.3f}s)"
            )
        else:
            print("context parallel failed:", cp)
        report["ok"] = bool(probe.returncode == 0 and one["ok"] and many["ok"] and cp.get("ok"))
    report["seconds"] = time.perf_counter() - t0
    path = args.out / f"gpu_multi_{args.mode}{'_cpu' if args.cpu else ''}.json"
    path.write_text(json.dumps(report, indent=1, default=lambda o: repr(o)))
    print(f"\n{'OK' if report['ok'] else 'FAILED'} in {report['seconds']:.0f}s; wrote {path}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
