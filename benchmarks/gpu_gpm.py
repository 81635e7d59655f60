"""GPU check of the NVML GPM metrics: what utilization.gpu says vs SM / tensor / DRAM activity, and what GPM costs.

Runs on GPU 0 (CUDA device 0, matched to its NVML index by UUID): idle, a bf16 8192x8192 GEMM loop, a large
device-to-device copy loop and a stream of tiny kernels, ~3 s each, while a thread calls the real
`NvmlProvider(gpm=True).sample()` every 0.5 s. Prints per workload the medians of the samples whose GPM interval
lies inside its window; then times `sample()` with GPM on and off (interleaved, >= 100 ms apart, as NVML's GPM
needs). Writes $OUT/gpm.json (all figures) and $OUT/gpm_metrics.prom (the collector's exposition of one GEMM
sample). OUT defaults to ./out. About 35 s in all.

    OUT=/tmp/out python3 benchmarks/gpu_gpm.py        # from the repository root (or python3 -m benchmarks.gpu_gpm)

Exit status: 0 done, 2 no NVML / no CUDA GPU / zmon's dependencies missing (with the reason on stderr).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: import zmon from this checkout
    sys.path.insert(0, str(ROOT))

# (GpuSample field, table header, how to print it)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("utilization_gpu_ratio", "util.gpu"),
    ("sm_active_ratio", "SM active"),
    ("sm_occupancy_ratio", "SM occ."),
    ("tensor_active_ratio", "tensor"),
    ("dram_bandwidth_utilization_ratio", "DRAM bw"),
    ("nvlink_rx_bytes_per_second", "NVLink rx"),
    ("nvlink_tx_bytes_per_second", "NVLink tx"),
)


class Unavailable(Exception):
    """This host cannot run the check (no NVML, no CUDA GPU, a dependency missing)."""


# A workload runs until the deadline (time.monotonic), waits for the GPU, and returns its own figures.
Workload = Callable[[float], dict[str, float]]


@dataclass
class Sampled:
    """One provider.sample() from the sampling thread: when the call started (the GPM sample instant)."""

    t: float
    sample: Any  # NvmlSample


@dataclass
class Window:
    name: str
    start: float
    end: float
    stats: dict[str, float] = field(default_factory=dict)


class SamplingThread(threading.Thread):
    """Calls sample() every `period` seconds until stopped, keeping every result."""

    def __init__(self, sample: Callable[[], Any], period: float) -> None:
        super().__init__(name="gpm-sampler", daemon=True)
        self._sample = sample
        self._period = period
        self._stop_event = threading.Event()
        self.samples: list[Sampled] = []
        self.errors: list[str] = []

    def run(self) -> None:
        next_t = time.monotonic()
        while not self._stop_event.is_set():
            t = time.monotonic()
            try:
                self.samples.append(Sampled(t, self._sample()))
            except Exception as e:  # keep sampling: one failed call must not end the run
                self.errors.append(f"{type(e).__name__}: {e}")
            next_t += self._period
            self._stop_event.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def gpu_of(sample: Any, nvml_index: int) -> Any:
    return next((g for g in sample.gpus if g.index == nvml_index), None)


def window_summary(samples: Sequence[Sampled], window: Window, nvml_index: int) -> dict[str, Any]:
    """Medians over the samples whose GPM interval (previous sample, this sample] lies inside the window."""
    inside = [cur for prev, cur in itertools.pairwise(samples) if prev.t >= window.start and cur.t <= window.end]
    out: dict[str, Any] = {"samples": len(inside), "seconds": round(window.end - window.start, 3), **window.stats}
    gpus = [g for s in inside if (g := gpu_of(s.sample, nvml_index)) is not None and g.up]
    for name, _ in COLUMNS:
        values = [v for g in gpus if (v := getattr(g, name)) is not None]
        out[name] = median(values)
        out[name + "_values"] = len(values)  # absent values are left out, never counted as 0
    return out


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    header = f"{'workload':<8} {'n':>3} " + " ".join(f"{title:>10}" for _, title in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, s in summaries.items():
        cells = []
        for key, _ in COLUMNS:
            v = s.get(key)
            if v is None:
                cells.append(f"{'-':>10}")  # absent: unsupported or no sample in the window, not 0
            elif key.endswith("_ratio"):
                cells.append(f"{100 * v:>9.1f}%")
            else:
                cells.append(f"{v / 1e9:>6.2f}GB/s")
        lines.append(f"{name:<8} {s['samples']:>3} " + " ".join(cells))
    return "\n".join(lines)


def time_samples(
    on: Callable[[], Any], off: Callable[[], Any], nvml_index: int, calls: int, spacing_seconds: float
) -> dict[str, Any]:
    """sample() with GPM on and off, interleaved; the GPM provider's calls `spacing_seconds` apart, since GPM
    samples closer than 100 ms are skipped (they would not measure the GPM calls)."""
    on_s: list[float] = []
    off_s: list[float] = []
    with_gpm = 0
    time.sleep(spacing_seconds)  # the sampling thread's last GPM sample may be recent: the first call must count
    for _ in range(calls):
        t0 = time.perf_counter()
        s = on()
        t1 = time.perf_counter()
        off()
        t2 = time.perf_counter()
        on_s.append(t1 - t0)
        off_s.append(t2 - t1)
        g = gpu_of(s, nvml_index)
        with_gpm += g is not None and g.sm_active_ratio is not None
        time.sleep(max(0.0, spacing_seconds - (time.perf_counter() - t0)))

    def ms(values: list[float]) -> dict[str, Any]:
        return {"calls": len(values), "median_ms": 1e3 * (median(values) or 0.0), "p95_ms": 1e3 * (p95(values) or 0.0)}

    return {
        "gpm_on": {**ms(on_s), "samples_with_gpm_values": with_gpm},
        "gpm_off": ms(off_s),
        "spacing_seconds": spacing_seconds,
    }


def exposition(sample: Any) -> str:
    """The NVML collector's text for one sample, as /metrics would show it."""
    from prometheus_client import CollectorRegistry, generate_latest

    from zmon.collectors.nvml import NvmlCollector
    from zmon.sampling.store import SnapshotStore

    store = SnapshotStore()
    store.put("nvml", sample, 0.0)
    registry = CollectorRegistry()
    registry.register(NvmlCollector(store))
    return generate_latest(registry).decode()


def promtool_check(text: str) -> str | None:
    """promtool's verdict on the exposition, when promtool is on PATH."""
    promtool = shutil.which("promtool") or (os.path.exists("/tmp/promtool") and "/tmp/promtool") or None
    if not promtool:
        return None
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    return "ok" if r.returncode == 0 else (r.stdout + r.stderr).strip()


def measure(
    provider_on: Any,
    provider_off: Any,
    workloads: dict[str, Workload],
    nvml_index: int,
    out_dir: Path,
    *,
    window_seconds: float = 3.0,
    period_seconds: float = 0.5,
    timing_calls: int = 60,
    timing_spacing_seconds: float = 0.11,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run each workload for `window_seconds` under the sampling thread, time sample(), write the outputs."""
    thread = SamplingThread(provider_on.sample, period_seconds)
    thread.start()
    windows: list[Window] = []
    try:
        time.sleep(period_seconds * 1.5)  # a first sample (no GPM values yet) before the first window
        for name, run in workloads.items():
            start = time.monotonic()
            stats = run(start + window_seconds)
            windows.append(Window(name, start, time.monotonic(), stats))
        time.sleep(period_seconds * 1.2)  # the sample closing the last window
    finally:
        thread.stop()
    summaries = {w.name: window_summary(thread.samples, w, nvml_index) for w in windows}
    print(format_table(summaries))
    for w in windows:
        if w.stats:
            print(f"  {w.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in w.stats.items()))

    timing = time_samples(provider_on.sample, provider_off.sample, nvml_index, timing_calls, timing_spacing_seconds)
    n_gpus = len(thread.samples[-1].sample.gpus) if thread.samples else None
    on, off = timing["gpm_on"], timing["gpm_off"]
    print(f"\nprovider.sample() for {n_gpus} GPU(s), {timing_calls} calls each, {timing_spacing_seconds:.2f} s apart:")
    print(
        f"  gpm on : median {on['median_ms']:.2f} ms, p95 {on['p95_ms']:.2f} ms "
        f"({on['samples_with_gpm_values']} of {on['calls']} with GPM values)"
    )
    print(f"  gpm off: median {off['median_ms']:.2f} ms, p95 {off['p95_ms']:.2f} ms")

    # The exposition of a sample from the GEMM window (GPM values present where supported).
    shown = next((w for w in windows if w.name == "gemm"), windows[-1])
    inside = [s for s in thread.samples if shown.start <= s.t <= shown.end] or thread.samples
    text = exposition(inside[-1].sample)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpm_metrics.prom").write_text(text)
    result: dict[str, Any] = {
        **(extra or {}),
        "nvml_index": nvml_index,
        "gpus_sampled": n_gpus,
        "sample_period_seconds": period_seconds,
        "window_seconds": window_seconds,
        "workloads": summaries,
        "sample_timing": timing,
        "sampler_errors": thread.errors,
        "exposition_workload": shown.name,
        "promtool_check_metrics": promtool_check(text),
    }
    (out_dir / "gpm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_dir / 'gpm.json'} and {out_dir / 'gpm_metrics.prom'}")
    return result


# -- the real GPU ---------------------------------------------------------------------------------------------


def cuda_workloads(torch: Any) -> dict[str, Workload]:
    """idle, GEMM, copy, tiny kernels on cuda:0; tensors allocated and kernels warmed up before any window."""
    dev = torch.device("cuda:0")
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    copy_bytes = 2 * 1024**3
    src = torch.empty(copy_bytes, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    one = torch.zeros(1, device=dev)
    torch.mm(a, b, out=c)
    dst.copy_(src)
    one.add_(1.0)
    torch.cuda.synchronize()

    def idle(deadline: float) -> dict[str, float]:
        time.sleep(max(0.0, deadline - time.monotonic()))
        return {}

    def gemm(deadline: float) -> dict[str, float]:
        count, t0 = 0, time.perf_counter()
        while time.monotonic() < deadline:
            for _ in range(10):  # bounded queue: the window ends within a few ms of the deadline
                torch.mm(a, b, out=c)
            torch.cuda.synchronize()
            count += 10
        elapsed = time.perf_counter() - t0
        return {"gemms": count, "tflops": 2 * n**3 * count / elapsed / 1e12}

    def copy(deadline: float) -> dict[str, float]:
        count, t0 = 0, time.perf_counter()
        while time.monotonic() < deadline:
            for _ in range(5):
                dst.copy_(src)
            torch.cuda.synchronize()
            count += 5
        elapsed = time.perf_counter() - t0
        # Each copy reads and writes copy_bytes.
        return {
            "copies": count,
            "copied_gb_per_s": copy_bytes * count / elapsed / 1e9,
            "dram_traffic_gb_per_s": 2 * copy_bytes * count / elapsed / 1e9,
        }

    def tiny(deadline: float) -> dict[str, float]:
        count, t0 = 0, time.perf_counter()
        while time.monotonic() < deadline:
            for _ in range(1000):  # one-element kernels: launch-bound, the GPU mostly waits
                one.add_(1.0)
            torch.cuda.synchronize()
            count += 1000
        elapsed = time.perf_counter() - t0
        return {"kernels": count, "kernels_per_s": count / elapsed}

    return {"idle": idle, "gemm": gemm, "copy": copy, "tiny": tiny}


def nvml_index_of_cuda0(torch: Any, gpus: Sequence[Any]) -> int:
    """NVML index of CUDA device 0, by UUID (NVML ignores CUDA_VISIBLE_DEVICES)."""
    want = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "").lower().removeprefix("gpu-")
    for g in gpus:
        if want and g.uuid and g.uuid.lower().removeprefix("gpu-") == want:
            return int(g.index)
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return 0
    raise Unavailable("cannot match CUDA device 0 to an NVML GPU (UUIDs differ)")


def nvml_metric_info(nvml_index: int) -> dict[str, Any]:
    """NVML's own name and unit of each GPM metric zmon reads (checks the MiB/s conversion of NVLink).

    Straight pynvml, outside zmon: a cross-check of the provider's assumptions, not part of it.
    """
    import pynvml

    from zmon.providers.nvml import GPM_METRICS

    out: dict[str, Any] = {}
    pynvml.nvmlInit()
    samples: list[Any] = []
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        samples = [pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()]
        pynvml.nvmlGpmSampleGet(handle, samples[0])
        time.sleep(0.2)
        pynvml.nvmlGpmSampleGet(handle, samples[1])
        req = pynvml.c_nvmlGpmMetricsGet_t()
        req.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(GPM_METRICS)
        req.sample1, req.sample2 = samples
        for i, (_, const, _) in enumerate(GPM_METRICS):
            req.metrics[i].metricId = getattr(pynvml, const)
        pynvml.nvmlGpmMetricsGet(req)

        def text(v: bytes | None) -> str | None:
            return None if v is None else v.decode(errors="replace")

        for i, (name, const, _) in enumerate(GPM_METRICS):
            m = req.metrics[i]
            out[name] = {
                "metric": const,
                "nvmlReturn": int(m.nvmlReturn),
                "value": float(m.value),
                "shortName": text(m.metricInfo.shortName),
                "longName": text(m.metricInfo.longName),
                "unit": text(m.metricInfo.unit),
            }
    finally:
        for s in samples:
            pynvml.nvmlGpmSampleFree(s)
        pynvml.nvmlShutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--window-seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    try:
        from zmon.providers.base import SourceUnavailable
        from zmon.providers.nvml import NvmlProvider
    except ImportError as e:
        print(f"gpu_gpm: zmon cannot be imported ({e}); install its dependencies (README)", file=sys.stderr)
        return 2
    try:
        provider_on = NvmlProvider(processes=True, gpm=True)
    except SourceUnavailable as e:
        print(f"gpu_gpm: NVML unavailable: {e}. This check needs an NVIDIA GPU and driver.", file=sys.stderr)
        return 2
    provider_off = NvmlProvider(processes=True, gpm=False)
    try:
        try:
            import torch
        except ImportError as e:
            raise Unavailable(f"torch is not installed ({e})") from e
        if not torch.cuda.is_available():
            raise Unavailable(f"CUDA is not available to torch {torch.__version__} (CPU build or no GPU)")
        first = provider_on.sample()  # arms GPM; its values come with the next sample
        nvml_index = nvml_index_of_cuda0(torch, first.gpus)
        gpu = gpu_of(first, nvml_index)
        print(
            f"GPU {nvml_index}: {gpu.name}, driver {provider_on.driver_version}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda})\n"
        )
        workloads = cuda_workloads(torch)
        try:
            info: Any = nvml_metric_info(nvml_index)
        except Exception as e:  # pre-Hopper, old driver or pynvml: the provider reports GPM absent anyway
            info = f"{type(e).__name__}: {e}"
        extra = {
            "gpu": gpu.name,
            "driver_version": provider_on.driver_version,
            "nvml_version": provider_on.nvml_version,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "gpm_metric_info": info,
        }
        result = measure(
            provider_on, provider_off, workloads, nvml_index, args.out, window_seconds=args.window_seconds, extra=extra
        )
        if all(s["sm_active_ratio"] is None for s in result["workloads"].values()):
            print("note: no GPM values on this GPU (GPM needs Hopper or later, driver >= 520, no MIG)")
    except Unavailable as e:
        print(f"gpu_gpm: {e}", file=sys.stderr)
        return 2
    finally:
        provider_on.close()
        provider_off.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
