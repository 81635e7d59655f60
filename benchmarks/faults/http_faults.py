"""HTTP fault injection against a real `python -m zmon watch` (real psutil; NVML absent here): prints a table.

Run:  python -m benchmarks.faults.http_faults            # the fast cases (what CI runs, < 60 s)
      python -m benchmarks.faults.http_faults --heavy    # + 1,000 concurrent scrapes, 2,000 idle connections
      python -m benchmarks.faults.http_faults --zmon-root /path/to/other/checkout   # measure another tree

Every case talks to the daemon over loopback only, with bounded counts and timeouts, and then checks that the
samplers were unaffected: every `zmon_collector_success` is 1 and no `zmon_sample_age_seconds` is stale.
Exit code 1 when a case fails its criteria.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STALE_SECONDS = 5.0  # a sample older than this (1 s intervals) means a sampler stalled


# ------------------------------------------------------------------------------------------------ daemon


@dataclass
class Daemon:
    url: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def threads(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/task"))
        except OSError:
            return 0

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def daemon(
    zmon_root: Path = ROOT,
    config_text: str | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
    soft_nofile: int | None = None,
) -> Iterator[Daemon]:
    """`python -m zmon watch --listen 127.0.0.1:<free>` from `zmon_root`; yields once /readyz answers 200.

    `soft_nofile`: start it with that soft RLIMIT_NOFILE (systemd's default is 1,024), the hard limit unchanged.
    """
    import tempfile
    import urllib.request

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="zmon-faults-") as tmp:
        args = [sys.executable, "-m", "zmon", "watch", "--listen", f"127.0.0.1:{port}", *extra_args]
        if config_text is not None:
            cfg = Path(tmp) / "zmon.yaml"
            cfg.write_text(config_text)
            args += ["--config", str(cfg)]
        log = open(Path(tmp) / "zmon.log", "wb")  # noqa: SIM115 - closed below, after the process

        def limit() -> None:
            if soft_nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        proc = subprocess.Popen(
            args,
            cwd=workdir or zmon_root,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
            env={**os.environ, "PYTHONPATH": str(zmon_root), **(env or {})},
        )
        d = Daemon(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"zmon exited {proc.returncode}: {(Path(tmp) / 'zmon.log').read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(d.url + "/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
            yield d
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()


# ------------------------------------------------------------------------------------------------ client


async def request(
    host: str, port: int, raw: bytes, *, timeout: float, half_close: bool = False
) -> tuple[int | None, bytes, float]:
    """Send raw bytes, read until the server closes; (status or None on error/timeout, response, seconds)."""
    t0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            await writer.drain()
            if half_close:
                writer.write_eof()
            data = await _read_response(reader)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None, b"", time.perf_counter() - t0
    finally:
        if writer is not None:
            writer.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(m.group(1)) if m else None), data, time.perf_counter() - t0


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """One response: the head, then Content-Length bytes (to the close when there is none)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await reader.read(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m is None:
        return data + await reader.read(-1)
    want = int(m.group(1))
    if not head.startswith(b"HEAD") and re.match(rb"HTTP/1\.[01] (1\d\d|204|304)", head):
        want = 0
    while len(body) < want:
        chunk = await reader.read(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def get_raw(path: str, headers: dict[str, str] | None = None) -> bytes:
    h = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    return (f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode()


def scrape_text(d: Daemon, timeout: float = 10.0) -> str | None:
    status, data, _ = asyncio.run(request(d.host, d.port, get_raw("/metrics"), timeout=timeout))
    if status != 200:
        return None
    return data.partition(b"\r\n\r\n")[2].decode(errors="replace")


def samplers_ok(d: Daemon) -> tuple[bool, str]:
    """Every zmon_collector_success is 1 and every zmon_sample_age_seconds is fresh (one scrape after a case)."""
    text = scrape_text(d)
    if text is None:
        return False, "final scrape failed"
    bad = [ln for ln in text.splitlines() if ln.startswith("zmon_collector_success{") and not ln.endswith(" 1.0")]
    ages = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("zmon_sample_age_seconds{")]
    if not ages:
        return False, "no zmon_sample_age_seconds"
    if bad:
        return False, "; ".join(bad)
    if max(ages) > STALE_SECONDS:
        return False, f"stale sample: age {max(ages):.1f}s"
    if "Too many open files" in text:
        return False, "EMFILE"
    return True, f"max sample age {max(ages):.1f}s"


class RssWatch:
    """Peak RSS and thread count of the daemon while a case runs (sampled every 50 ms)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.before = d.rss_bytes()
        self.peak = self.before
        self.peak_threads = d.threads()
        self.peak_fds = d.fds()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.d.rss_bytes())
            self.peak_threads = max(self.peak_threads, self.d.threads())
            self.peak_fds = max(self.peak_fds, self.d.fds())

    def __enter__(self) -> RssWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Result:
    case: str
    sent: int = 0
    ok: int = 0
    s503: int = 0
    other: int = 0
    errors: int = 0
    p50: float | None = None
    p99: float | None = None
    rss_before: int = 0
    rss_peak: int = 0
    threads: int = 0
    fds: int = 0
    samplers: bool = True
    passed: bool = True
    notes: list[str] = field(default_factory=list)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _finish(r: Result, d: Daemon, w: RssWatch) -> Result:
    r.rss_before, r.rss_peak, r.threads, r.fds = w.before, w.peak, w.peak_threads, w.peak_fds
    ok, note = samplers_ok(d)
    r.samplers = ok
    r.notes.append(note)
    r.passed = r.passed and ok
    return r


def concurrent_scrapes(
    d: Daemon, n: int, *, timeout: float = 60.0, p99_limit: float = 1.0, rss_limit: int = 100 << 20, gzip: bool = False
) -> Result:
    """n GETs of /metrics at once, each on its own connection: every answer 200 or 503, p99 of the 200s bounded."""
    r = Result(f"{n} concurrent scrapes" + (" (gzip)" if gzip else ""), sent=n)
    raw = get_raw("/metrics", {"Accept-Encoding": "gzip"} if gzip else None)

    async def run() -> list[tuple[int | None, bytes, float]]:
        return await asyncio.gather(*(request(d.host, d.port, raw, timeout=timeout) for _ in range(n)))

    with RssWatch(d) as w:
        results = asyncio.run(run())
    lat = [t for s, _, t in results if s == 200]
    r.ok = len(lat)
    r.s503 = sum(1 for s, _, _ in results if s == 503)
    r.errors = sum(1 for s, _, _ in results if s is None)
    r.other = n - r.ok - r.s503 - r.errors
    r.p50, r.p99 = _pct(lat, 0.5), _pct(lat, 0.99)
    r.passed = (
        r.errors == 0 and r.other == 0 and r.ok > 0 and (r.p99 or 0) <= p99_limit and w.peak - w.before <= rss_limit
    )
    return _finish(r, d, w)


def idle_connections(d: Daemon, n: int, *, hold: float = 2.0, fresh: int = 5) -> Result:
    """n connections that send nothing, held open; meanwhile `fresh` scrapes must be answered."""
    r = Result(f"{n} idle connections", sent=fresh)

    async def run() -> list[tuple[int | None, bytes, float]]:
        socks: list[socket.socket] = []
        loop = asyncio.get_running_loop()
        try:
            for _ in range(n):
                s = socket.socket()
                s.setblocking(False)
                try:
                    await asyncio.wait_for(loop.sock_connect(s, (d.host, d.port)), 5)
                except (OSError, TimeoutError):
                    s.close()
                    r.notes.append("connect refused/timed out")
                    break
                socks.append(s)
            await asyncio.sleep(hold)
            out = []
            for _ in range(fresh):
                out.append(await request(d.host, d.port, get_raw("/metrics"), timeout=10))
            return out
        finally:
            for s in socks:
                s.close()

    with RssWatch(d) as w:
        results = asyncio.run(run())
    lat = [t for s, _, t in results if s == 200]
    r.ok, r.s503 = len(lat), sum(1 for s, _, _ in results if s == 503)
    r.errors = sum(1 for s, _, _ in results if s is None)
    r.other = fresh - r.ok - r.s503 - r.errors
    r.p50, r.p99 = _pct(lat, 0.5), _pct(lat, 0.99)
    r.passed = r.ok == fresh
    return _finish(r, d, w)


def slowloris(d: Daemon, n: int, *, read_timeout: float, fresh: int = 3) -> Result:
    """n clients trickling a request one byte every 0.5 s: a fresh scrape is answered, and each slow client is cut
    off (408 or close) within read_timeout + slack instead of being held forever."""
    r = Result(f"{n} slowloris clients", sent=fresh)
    raw = get_raw("/metrics", {"X-Padding": "a" * 200})

    async def slow() -> float | None:
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(d.host, d.port)
        except OSError:
            return 0.0
        try:
            for b in raw:
                writer.write(bytes([b]))
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1024), 0.5)
                except TimeoutError:
                    continue
                # the server answered (408) or closed: the slow client was cut off
                del data
                return time.perf_counter() - t0
            return None  # sent the whole request: never cut off
        except OSError:
            return time.perf_counter() - t0
        finally:
            writer.close()

    async def run() -> tuple[list[float | None], list[tuple[int | None, bytes, float]]]:
        tasks = [asyncio.create_task(slow()) for _ in range(n)]
        await asyncio.sleep(1.0)
        fr = [await request(d.host, d.port, get_raw("/metrics"), timeout=10) for _ in range(fresh)]
        return list(await asyncio.gather(*tasks)), fr

    with RssWatch(d) as w:
        cut, results = asyncio.run(run())
    r.ok = sum(1 for s, _, _ in results if s == 200)
    r.errors = fresh - r.ok
    lat = [t for s, _, t in results if s == 200]
    r.p50, r.p99 = _pct(lat, 0.5), _pct(lat, 0.99)
    never = sum(1 for c in cut if c is None)
    worst = max((c for c in cut if c is not None), default=0.0)
    r.notes.append(f"slow clients cut off after ≤{worst:.1f}s, never: {never}")
    r.passed = r.ok == fresh and never == 0 and worst <= read_timeout + 3.0
    return _finish(r, d, w)


BAD_INPUTS: list[tuple[str, bytes, Callable[[int | None], bool]]] = [
    ("Content-Length: -1", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", lambda s: s == 400),
    ("Content-Length: abc", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", lambda s: s == 400),
    (
        "Content-Length: 10**12",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
        lambda s: s == 413,
    ),
    (
        "body shorter than Content-Length",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        lambda s: s is not None and 400 <= s < 500,
    ),
    (
        "bad chunked body",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        lambda s: s == 400,
    ),
    (
        "deep JSON",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n"
        b"\r\n" + b"[" * 30000 + b"]" * 30000,
        lambda s: s is not None and 400 <= s < 500,
    ),
    ("request line 20 KiB", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", lambda s: s == 414),
    (
        "headers 40 KiB",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"b" * 40000 + b"\r\n\r\n",
        lambda s: s == 431,
    ),
    (
        "200 headers",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
        lambda s: s == 431,
    ),
    ("unknown method", b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n", lambda s: s in (405, 501)),
    ("non-UTF-8 path", b"GET /metr\xffics HTTP/1.1\r\nHost: x\r\n\r\n", lambda s: s == 400),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), lambda s: s == 400),
    ("HEAD /metrics", b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", lambda s: s == 200),
]


def bad_input(d: Daemon, *, read_timeout: float) -> Result:
    """Malformed requests: each gets a 4xx (or the noted status) within read_timeout + slack, never 500/hang."""
    r = Result("bad input", sent=len(BAD_INPUTS))

    async def run() -> list[tuple[int | None, bytes, float]]:
        return await asyncio.gather(
            *(request(d.host, d.port, raw, timeout=read_timeout + 5) for _, raw, _ in BAD_INPUTS)
        )

    with RssWatch(d) as w:
        results = asyncio.run(run())
    lat = []
    for (name, _, want), (status, _, t) in zip(BAD_INPUTS, results, strict=True):
        if want(status):
            r.ok += 1
            lat.append(t)
        else:
            r.other += 1
            r.notes.append(f"{name}: got {status}")
    r.p50, r.p99 = _pct(lat, 0.5), _pct(lat, 0.99)
    r.passed = r.other == 0
    return _finish(r, d, w)


# ------------------------------------------------------------------------------------------------ report


def table(results: list[Result]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"

    head = (
        "case",
        "sent",
        "200",
        "503",
        "other",
        "err/timeout",
        "p50",
        "p99",
        "RSS before→peak",
        "threads",
        "fds",
        "samplers",
        "result",
    )
    rows = [head]
    for r in results:
        rows.append(
            (
                r.case,
                str(r.sent),
                str(r.ok),
                str(r.s503),
                str(r.other),
                str(r.errors),
                ms(r.p50),
                ms(r.p99),
                f"{r.rss_before >> 20}→{r.rss_peak >> 20} MiB",
                str(r.threads),
                str(r.fds),
                "ok" if r.samplers else "FAILED",
                "pass" if r.passed else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {r.case}: {'; '.join(r.notes)}" for r in results if r.notes]
    return "\n".join([*lines, "", *notes])


FAST_READ_TIMEOUT = 2.0
FAST_CONFIG = f"server:\n  read_timeout_seconds: {FAST_READ_TIMEOUT}\n"


def run_cases(d: Daemon, *, heavy: bool, read_timeout: float) -> list[Result]:
    out = [
        bad_input(d, read_timeout=read_timeout),
        concurrent_scrapes(d, 1000 if heavy else 200),
        idle_connections(d, 2000 if heavy else 600),
    ]
    if heavy:
        out.append(concurrent_scrapes(d, 1000, gzip=True))
    out.append(slowloris(d, 200 if heavy else 30, read_timeout=read_timeout))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heavy", action="store_true", help="1,000 concurrent scrapes and 2,000 idle connections")
    ap.add_argument("--zmon-root", type=Path, default=ROOT, help="checkout whose zmon is started (default: this one)")
    ap.add_argument(
        "--no-config",
        action="store_true",
        help="start with no config file (for checkouts that lack server.read_timeout_seconds)",
    )
    ap.add_argument(
        "--soft-nofile",
        type=int,
        default=1024,
        help="the daemon's soft RLIMIT_NOFILE at start (default 1024, systemd's; 0 = inherit)",
    )
    ap.add_argument("--only", nargs="*", help="case name prefixes to run (bad, concurrent, idle, slowloris)")
    args = ap.parse_args(argv)
    cfg = None if args.no_config else FAST_CONFIG
    rt = FAST_READ_TIMEOUT if cfg else 30.0
    with daemon(args.zmon_root.resolve(), cfg, soft_nofile=args.soft_nofile or None) as d:
        results = []
        cases: list[tuple[str, Callable[[], Result]]] = [
            ("bad", lambda: bad_input(d, read_timeout=rt)),
            ("concurrent", lambda: concurrent_scrapes(d, 1000 if args.heavy else 200)),
            ("idle", lambda: idle_connections(d, 2000 if args.heavy else 600)),
            ("gzip", lambda: concurrent_scrapes(d, 1000 if args.heavy else 200, gzip=True)),
            ("slowloris", lambda: slowloris(d, 200 if args.heavy else 30, read_timeout=rt)),
        ]
        for name, case in cases:
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            results.append(case())
            print(f"{results[-1].case}: {'pass' if results[-1].passed else 'FAIL'}", file=sys.stderr, flush=True)
    print(table(results))
    print(f"(median of the case p50s: {statistics.median([r.p50 for r in results if r.p50] or [0]):.3f} s)")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
