"""Benchmark of `zmon watch`: scrape latency with 8 fake GPUs, sampling cost per source, RSS and CPU.

Run: .venv/bin/python -m benchmarks.bench_watch [--seconds 30] [--real-nvml]
Targets (issue 2): scrape p99 <= 5 ms at 8 GPUs; RSS <= 60 MB; <= 1% of a core at 1 s intervals.
With --real-nvml the GPUs are the host's real ones (use on a GPU machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request

import psutil


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _daemon_code(real: bool) -> str:
    return textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from zmon.app.watch import build_watch
        from zmon.config import load_config
        nvml = None
        if not {real}:
            from tests.fakes.nvml import make_fake
            nvml = make_fake(n_gpus=8)
        cfg = load_config(overrides={{"server": {{"listen": "127.0.0.1:" + sys.argv[1]}}}})
        mon = build_watch(cfg, nvml=nvml)
        mon.start()
        print("READY", flush=True)
        mon.wait()
        """
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to watch the daemon's RSS/CPU")
    ap.add_argument("--scrapes", type=int, default=500)
    ap.add_argument("--real-nvml", action="store_true")
    args = ap.parse_args()

    from prometheus_client import generate_latest

    from zmon.app.watch import build_watch
    from zmon.config import Config

    nvml = None
    if not args.real_nvml:
        from tests.fakes.nvml import make_fake

        nvml = make_fake(n_gpus=8)
    mon = build_watch(Config(), nvml=nvml, serve_http=False)
    rows: list[tuple[str, str]] = []
    print(f"{'source':<12} {'median ms':>10} {'p99 ms':>8}   (one sample() call, 200 runs)")
    for name in mon.sampler.sources:
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            mon.sampler.run_once(name)
            ts.append((time.perf_counter() - t0) * 1e3)
        print(f"{name:<12} {statistics.median(ts):>10.3f} {pct(ts, 0.99):>8.3f}")
        rows.append((f"sample {name}", f"{statistics.median(ts):.3f} ms"))
    ts = []
    for _ in range(args.scrapes):
        t0 = time.perf_counter()
        body = generate_latest(mon.registry)
        ts.append((time.perf_counter() - t0) * 1e3)
    lines = body.decode().count("\n")
    print(f"\nexposition, prometheus_client ({lines} lines): p50 {pct(ts, 0.5):.3f} ms  p99 {pct(ts, 0.99):.3f} ms")
    from prometheus_client.exposition import choose_encoder

    encoder, ctype = choose_encoder("")
    mon.render_cache.render(encoder, ctype)  # a scraper asked for this format once
    cached = []
    for _ in range(args.scrapes):
        for name in mon.sampler.sources:  # fresh samples before every scrape (the worst case at 1 s sampling)
            mon.sampler.run_once(name)
        t0 = time.perf_counter()
        mon.render_cache.render(encoder, ctype)
        cached.append((time.perf_counter() - t0) * 1e3)
    print(f"exposition, zmon render cache: p50 {pct(cached, 0.5):.3f} ms  p99 {pct(cached, 0.99):.3f} ms")
    mon.stop()

    port = 20000 + os.getpid() % 20000
    proc = subprocess.Popen(
        [sys.executable, "-c", _daemon_code(args.real_nvml), str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        url = f"http://127.0.0.1:{port}/metrics"
        time.sleep(2)
        http = []
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            http.append((time.perf_counter() - t0) * 1e3)
        p = psutil.Process(proc.pid)
        time.sleep(2)
        c0 = p.cpu_times()
        t0 = time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.seconds:
            rss.append(p.memory_info().rss)
            time.sleep(1)
        c1 = p.cpu_times()
        cpu = (c1.user + c1.system - c0.user - c0.system) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait(10)
    gpus = "real GPUs" if args.real_nvml else "8 fake GPUs"
    print(f"\n| figure ({gpus}, 1 s intervals) | value | target |")
    print("|---|---|---|")
    print(f"| scrape over HTTP p50 | {pct(http, 0.5):.2f} ms | |")
    print(f"| scrape over HTTP p99 | {pct(http, 0.99):.2f} ms | <= 5 ms |")
    print(
        f"| exposition in process p99 (prometheus_client / zmon cache) | {pct(ts, 0.99):.2f} / "
        f"{pct(cached, 0.99):.2f} ms | |"
    )
    print(f"| RSS (max over {args.seconds:.0f} s, idle) | {max(rss) / 2**20:.1f} MiB | <= 60 MB |")
    print(f"| CPU (idle, no scrapes) | {cpu * 100:.2f}% of a core | <= 1% |")
    for k, v in rows:
        print(f"| {k} | {v} | |")


if __name__ == "__main__":
    main()
