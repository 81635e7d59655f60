"""Soak: 10,000 generations of the embedded model under `zmon run`, scraped every second.

Reports what a long-running daemon must not do: grow (RSS of the zmon process, target < 5 %), slow down (the
median generation time of the last 1,000 generations against the first 1,000, target < 5 %), or fail
(generations not ok, failed scrapes, collector failures, exposition errors, JSONL failures: target 0).

Run:  nice python -m benchmarks.soak                         # 10,000 generations (~10-20 min on 2 busy cores)
      python -m benchmarks.soak --generations 500 --out /tmp/soak   # a quick look

RSS is read from /proc/<pid>/status at each scrape. "Growth" compares the median RSS over the first 1,000
generations after a warm-up of WARMUP generations with the median over the last 1,000; the peak is shown
too. Generation times come from zmon's own JSONL log (total_seconds per generation). The host's load
average is recorded, because on a shared machine other work moves latency medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 100  # generations left out of the RSS baseline (imports, first allocations, caches)
WINDOW = 1000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and labels in line.rpartition(" ")[0]:
            total += float(line.rpartition(" ")[2])
    return total


@dataclass
class Scrape:
    t: float  # seconds since start
    ok: bool
    seconds: float
    rss: int | None
    generations: float = 0.0
    load1: float = 0.0  # the host's 1-minute load average: other work on a shared host moves latencies


@dataclass
class Report:
    generations: int = 0
    wall_seconds: float = 0.0
    generations_ok: int = 0
    generations_failed: int = 0
    scrapes: int = 0
    scrapes_failed: int = 0
    scrape_p50_ms: float | None = None
    scrape_p99_ms: float | None = None
    collector_failures: float = 0.0
    exposition_errors: float = 0.0
    jsonl_failures: float = 0.0
    jsonl_lines: int = 0
    jsonl_bad_lines: int = 0
    rss_start_mib: float | None = None  # median over the first window after warm-up
    rss_end_mib: float | None = None  # median over the last window
    rss_peak_mib: float | None = None
    rss_growth_pct: float | None = None
    latency_first_median_ms: float | None = None
    latency_last_median_ms: float | None = None
    latency_drift_pct: float | None = None
    latency_block_medians_ms: list[float] = field(default_factory=list)  # per 1,000 generations, in order
    loadavg_start: str = ""
    loadavg_end: str = ""
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> float:
        return (
            self.generations_failed
            + self.scrapes_failed
            + self.collector_failures
            + self.exposition_errors
            + self.jsonl_failures
            + self.jsonl_bad_lines
        )


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def soak(
    generations: int, out: Path, *, interval: float = 1.0, cache_dir: str | None = None, threads: int = 1
) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "generations.jsonl"
    jsonl.unlink(missing_ok=True)
    cfg = out / "zmon.yaml"
    model: dict[str, object] = {"cpu_threads": threads}
    if cache_dir:
        model["cache_dir"] = cache_dir
    cfg.write_text(
        json.dumps(
            {  # JSON is YAML
                "model": model,
                "workload": {"steps": 2, "resolutions": ["64x64"], "jsonl": {"path": str(jsonl), "max_bytes": 1 << 30}},
            }
        )
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMON_")}
    env["PYTHONPATH"] = str(ROOT)
    log = open(out / "zmon.log", "wb")  # noqa: SIM115 - closed after the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zmon",
            "run",
            "--config",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
            "--max-generations",
            str(generations),
            "--linger",
            "3",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=out,
    )
    report = Report(loadavg_start=" ".join(Path("/proc/loadavg").read_text().split()[:3]))
    scrapes: list[Scrape] = []
    last_text = [""]
    t0 = time.monotonic()

    def scraper() -> None:
        while proc.poll() is None:
            start = time.monotonic()
            ok = False
            gens = scrapes[-1].generations if scrapes else 0.0
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    text = r.read().decode()
                ok = r.status == 200
                last_text[0] = text
                gens = _metric(text, "zmon_generations_total")
            except Exception:
                ok = False
            took = time.monotonic() - start
            if proc.poll() is None:
                load1 = float(Path("/proc/loadavg").read_text().split()[0])
                scrapes.append(Scrape(start - t0, ok, took, _rss(proc.pid), gens, load1))
            time.sleep(max(0.0, interval - took))

    th = threading.Thread(target=scraper, daemon=True)
    th.start()
    progress_at = 0.0
    while proc.poll() is None:
        time.sleep(1)
        if time.monotonic() - progress_at > 60 and scrapes:
            progress_at = time.monotonic()
            s = scrapes[-1]
            print(
                f"[{s.t:6.0f}s] {int(s.generations)} generations, RSS {((s.rss or 0) / 2**20):.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
    th.join(15)
    log.close()
    report.exit_code = proc.returncode
    report.wall_seconds = time.monotonic() - t0
    report.loadavg_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    # scrapes, failures (from the last good scrape: the counters are totals)
    text = last_text[0]
    # Counted from the first good scrape (the server starts with the process) to the last one: after the last
    # generation and the linger, zmon closes its server while the process is still exiting.
    serving = [s for s in scrapes if s.ok]
    first_ok = serving[0].t if serving else float("inf")
    last_ok = serving[-1].t if serving else float("-inf")
    counted = [s for s in scrapes if first_ok <= s.t <= last_ok]
    report.scrapes = len(counted)
    report.scrapes_failed = sum(1 for s in counted if not s.ok)
    lat = [s.seconds * 1e3 for s in counted if s.ok]
    report.scrape_p50_ms, report.scrape_p99_ms = _pct(lat, 0.5), _pct(lat, 0.99)
    report.generations_ok = int(_metric(text, "zmon_generations_total", 'status="ok"'))
    report.generations = int(_metric(text, "zmon_generations_total"))
    report.generations_failed = report.generations - report.generations_ok
    report.collector_failures = _metric(text, "zmon_collector_failures_total")
    report.exposition_errors = _metric(text, "zmon_exposition_errors_total")
    report.jsonl_failures = _metric(text, "zmon_jsonl_write_failures_total")

    # latency drift from the JSONL log
    times: list[float] = []
    for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            report.jsonl_bad_lines += 1
            continue
        report.jsonl_lines += 1
        if rec.get("status") == "ok" and rec.get("total_seconds") is not None:
            times.append(float(rec["total_seconds"]))
    window = min(WINDOW, len(times) // 2)
    report.latency_block_medians_ms = [
        round(statistics.median(times[i : i + WINDOW]) * 1e3, 2) for i in range(0, len(times), WINDOW)
    ]
    if window:
        first, last = _median(times[:window]), _median(times[-window:])
        assert first is not None and last is not None
        report.latency_first_median_ms, report.latency_last_median_ms = first * 1e3, last * 1e3
        report.latency_drift_pct = (last / first - 1) * 100

    # RSS: windows by generation count (the scrape's zmon_generations_total)
    rss_first = [s.rss for s in scrapes if s.rss and WARMUP <= s.generations < WARMUP + WINDOW]
    rss_last = [s.rss for s in scrapes if s.rss and s.generations >= report.generations - WINDOW]
    if rss_first and rss_last:
        a, b = statistics.median(rss_first), statistics.median(rss_last)
        report.rss_start_mib, report.rss_end_mib = a / 2**20, b / 2**20
        report.rss_growth_pct = (b / a - 1) * 100
    peaks = [s.rss for s in scrapes if s.rss]
    report.rss_peak_mib = max(peaks) / 2**20 if peaks else None
    (out / "scrapes.json").write_text(json.dumps([asdict(s) for s in scrapes]))
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def table(r: Report, generations: int) -> str:
    def f(x: float | None, fmt: str = "{:.1f}") -> str:
        return "n/a" if x is None else fmt.format(x)

    rows = [
        (
            "generations",
            f"{r.generations} of {generations} ({r.generations_ok} ok) in {r.wall_seconds / 60:.1f} min",
            "all ok",
            r.generations == generations and r.generations_failed == 0,
        ),
        (
            "RSS (median, first 1,000 after warm-up → last 1,000)",
            f"{f(r.rss_start_mib)} → {f(r.rss_end_mib)} MiB ({f(r.rss_growth_pct, '{:+.2f}')} %), "
            f"peak {f(r.rss_peak_mib)} MiB",
            "< 5 %",
            r.rss_growth_pct is not None and r.rss_growth_pct < 5,
        ),
        (
            "generation time (median, first 1,000 → last 1,000)",
            f"{f(r.latency_first_median_ms, '{:.2f}')} → {f(r.latency_last_median_ms, '{:.2f}')} ms "
            f"({f(r.latency_drift_pct, '{:+.2f}')} %)",
            "< 5 %",
            r.latency_drift_pct is not None and abs(r.latency_drift_pct) < 5,
        ),
        (
            "scrapes (1/s)",
            f"{r.scrapes} ({r.scrapes_failed} failed), p50 {f(r.scrape_p50_ms, '{:.2f}')} ms, "
            f"p99 {f(r.scrape_p99_ms, '{:.2f}')} ms",
            "0 failed",
            r.scrapes_failed == 0,
        ),
        (
            "errors",
            f"generations {r.generations_failed}, collector failures {r.collector_failures:g}, exposition "
            f"{r.exposition_errors:g}, JSONL failures {r.jsonl_failures:g}, JSONL bad lines {r.jsonl_bad_lines} "
            f"(of {r.jsonl_lines})",
            "0",
            r.errors == 0,
        ),
        ("median per 1,000 generations", " ".join(f"{x:.1f}" for x in r.latency_block_medians_ms) + " ms", "", True),
        ("load average (start → end)", f"{r.loadavg_start} → {r.loadavg_end}", "", True),
        ("exit code", str(r.exit_code), "0", r.exit_code == 0),
    ]
    head = ("figure", "measured", "target", "met")
    cells = [head] + [(a, b, c, "yes" if d else "NO") for a, b, c, d in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    ap.add_argument("--threads", type=int, default=1, help="model.cpu_threads (1 on a small shared host)")
    ap.add_argument("--cache-dir", help="model.cache_dir (default: zmon's)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="zmon-soak-")))
    args = ap.parse_args(argv)
    r = soak(args.generations, args.out, interval=args.interval, cache_dir=args.cache_dir, threads=args.threads)
    print(table(r, args.generations))
    print(f"(files: {args.out})")
    ok = r.errors == 0 and r.exit_code == 0 and (r.rss_growth_pct or 0) < 5 and abs(r.latency_drift_pct or 0) < 5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
