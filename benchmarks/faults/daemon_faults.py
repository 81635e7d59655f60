"""Fault injection against the real daemon (`python -m zmon watch` / `run` on the embedded model): configuration
input, signals and disks. Prints a table; exit code 1 when a case fails its criteria.

Run:  python -m benchmarks.faults.daemon_faults                 # the fast cases (what CI runs)
      python -m benchmarks.faults.daemon_faults --heavy         # + a SIGHUP storm of 200, 20 kill -9 rounds
      python -m benchmarks.faults.daemon_faults --only sighup   # case name prefixes

Cases
- config: files and environments that used to end in a traceback, or pass check-config and then break
  start-up. Each must give exit code 2 with the key path (or the variable) named and no traceback, from
  `zmon check-config` and from the daemon (`run` / `watch`) alike.
- sighup: a good file applies (intervals, a disabled source, a new listen address), a broken one keeps the
  daemon on the old configuration (`zmon_config_last_reload_successful` 0), a storm of SIGHUPs is survived,
  a SIGHUP during the model load and during generations interrupts nothing.
- sigterm: SIGTERM in the middle of a generation: it finishes, zmon exits 0, the JSONL log is whole.
- disk: the JSONL log and the images on a real full filesystem (a small tmpfs: root, or a user namespace),
  a read-only output directory, and a JSONL log cut by kill -9.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_WORKLOAD = {"steps": 2, "resolutions": ["64x64"]}


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def yaml_text(data: dict[str, object]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def zmon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMON_") or k == "ZMON_FAULTS_HEAVY"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    """A zmon subprocess with its log; `url` is where it serves."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    root: str = ""  # prefix to reach its files (/proc/PID/root in a private mount namespace)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def scrape(self, url: str | None = None, timeout: float = 5.0) -> str | None:
        try:
            with urllib.request.urlopen((url or self.url) + "/metrics", timeout=timeout) as r:
                return str(r.read().decode())
        except Exception:
            return None

    def metric(self, name: str, labels: str = "", url: str | None = None) -> float | None:
        text = self.scrape(url)
        return metric(text, name, labels) if text else None

    def path(self, p: Path) -> Path:
        return Path(self.root + str(p)) if self.root else p

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of the first sample of `name` whose labels contain `labels` (e.g. 'status="ok"'), summed
    over matching series when several match."""
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if labels and labels not in head:
                continue
            total = (total or 0.0) + float(value)
    return total


def wait_until(fn: Callable[[], object], timeout: float, step: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(step)
    return last


@contextlib.contextmanager
def daemon(
    mode: str,
    workdir: Path,
    config: dict[str, object] | None,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wrap: list[str] | None = None,
    ready: bool = True,
    timeout: float = 120.0,
    port: int | None = None,
    log_name: str = "zmon.log",
) -> Iterator[Daemon]:
    """`python -m zmon MODE --config workdir/zmon.yaml --listen 127.0.0.1:free`; yields once /readyz is 200
    (or at once with ready=False). With `port`, the file sets server.listen to it (no --listen flag, so a
    reload can move it). Stopped with SIGTERM at the end if still running."""
    cfg_file = workdir / "zmon.yaml"
    if config is not None:
        cfg_file.write_text(yaml_text(config))
    cmd = [sys.executable, "-m", "zmon", mode, "--config", str(cfg_file), *args]
    if port is None:
        port = free_port()
        cmd += ["--listen", f"127.0.0.1:{port}"]
    log = workdir / log_name
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*(wrap or []), *cmd], cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=zmon_env(env)
        )
    d = Daemon(proc, f"http://127.0.0.1:{port}", log, f"/proc/{proc.pid}/root" if wrap else "")
    try:
        if ready:

            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"zmon {mode} exited {proc.returncode}:\n{d.text()[-3000:]}")
                try:
                    with urllib.request.urlopen(d.url + "/readyz", timeout=2) as r:
                        return bool(r.status == 200)
                except Exception:
                    return False

            if not wait_until(up, timeout, 0.2):
                raise RuntimeError(f"zmon {mode} not ready within {timeout}s:\n{d.text()[-3000:]}")
        yield d
    finally:
        d.stop()


def zmon_cli(
    args: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    wrap: list[str] | None = None,
) -> tuple[int, str]:
    r = subprocess.run(
        [*(wrap or []), sys.executable, "-m", "zmon", *args],
        cwd=workdir,
        capture_output=True,
        timeout=timeout,
        env=zmon_env(env),
    )
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


# ------------------------------------------------------------------------------------------------ small filesystems


class SmallFs:
    """Small tmpfs mounts: real ones as root, else in a private user + mount namespace of the daemon
    (`unshare --user --map-root-user --mount`), whose files the test reads through /proc/PID/root."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounted: list[Path] = []
        self.userns = os.geteuid() != 0 or os.environ.get("ZMON_FAULTS_USERNS") == "1"
        self.pending: list[str] = []  # mount commands run inside the namespace

    @staticmethod
    def available() -> str | None:
        """None when small filesystems can be made here, else why not."""
        if os.geteuid() == 0 and os.environ.get("ZMON_FAULTS_USERNS") != "1":
            return None
        unshare = shutil.which("unshare")
        if not unshare:
            return "not root and no unshare(1)"
        r = subprocess.run(
            [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
            capture_output=True,
        )
        return None if r.returncode == 0 else f"not root and no user namespaces: {r.stderr.decode().strip()}"

    def make(self, name: str, size: str, *, read_only: bool = False) -> Path:
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        opts = f"size={size},mode=0777" + (",ro" if read_only else "")
        if self.userns:
            self.pending.append(f"mount -t tmpfs -o {opts} tmpfs {d}")
        else:
            subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True)
            self.mounted.append(d)
        return d

    def wrap(self) -> list[str] | None:
        if not self.userns:
            return None
        script = " && ".join([*self.pending, 'exec "$0" "$@"'])
        return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]

    def close(self) -> None:
        for d in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(d)], check=False)
        self.mounted.clear()


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    case: str
    expected: str
    observed: str = ""
    passed: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def table(results: list[Result]) -> str:
    head = ("case", "expected", "observed", "s", "result")
    rows = [head] + [
        (r.case, r.expected, r.observed, f"{r.seconds:.1f}", "pass" if r.passed else "FAIL") for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {r.case}: {'; '.join(r.notes)}" for r in results if r.notes]
    return "\n".join([*lines, *([""] if notes else []), *notes])


def timed(fn: Callable[..., Result]) -> Callable[..., Result]:
    def run(*a: object, **kw: object) -> Result:
        t0 = time.monotonic()
        try:
            r = fn(*a, **kw)
        except Exception as e:  # a case that blows up is a failed case, with the reason
            r = Result(fn.__name__, "completes", f"{type(e).__name__}: {str(e)[:300]}")
        r.seconds = time.monotonic() - t0
        return r

    run.__name__ = fn.__name__
    return run


# ------------------------------------------------------------------------------------------------ config cases


@dataclass(frozen=True)
class BadInput:
    name: str
    text: str | bytes  # the configuration file
    fragment: str  # in the error output
    env: dict[str, str] = field(default_factory=dict)
    modes: tuple[str, ...] = ()  # daemons that must refuse it the same way (besides check-config)


def bad_inputs(tmp: Path) -> list[BadInput]:
    ro = "/proc/sys"  # a directory no one can create files in (EACCES / EROFS even for root)
    return [
        BadInput("deep-yaml", "a: " + "[" * 50_000 + "]" * 50_000, "nested more than 64 levels deep"),
        BadInput("5000-digit-int", "server:\n  max_connections: " + "9" * 5000, "integer too long"),
        BadInput("non-utf8", b'logging:\n  level: "\xff\xfe"\n', "not UTF-8 text"),
        BadInput(
            "tilde-nosuchuser",
            "workload:\n  output_dir: ~nosuchuser/out\n",
            "no user named 'nosuchuser'",
            modes=("run",),
        ),
        BadInput(
            "alias-bomb",
            "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "aliases are expanded",
        ),
        BadInput(
            "interval-inf",
            "sampling:\n  host:\n    interval_seconds: .inf\n",
            "sampling.host.interval_seconds: Input should be a finite number",
            modes=("watch", "run"),
        ),
        BadInput(
            "interval-1e12",
            "sampling:\n  host:\n    interval_seconds: 1e12\n",
            "sampling.host.interval_seconds: Input should be less than or equal to 3600",
            modes=("watch",),
        ),
        BadInput(
            "huge-misfire-grace",
            "sampling:\n  misfire_grace_seconds: 1e12\n",
            "sampling.misfire_grace_seconds: Input should be less than or equal to 3600",
            modes=("watch",),
        ),
        BadInput(
            "env-conflict",
            "{}\n",
            "ZMON_SAMPLING__NVML and ZMON_SAMPLING__NVML__ENABLED conflict",
            env={"ZMON_SAMPLING__NVML": "1", "ZMON_SAMPLING__NVML__ENABLED": "true"},
            modes=("watch",),
        ),
        BadInput(
            "env-unknown",
            "{}\n",
            "did you mean ZMON_SAMPLING__NVML__INTERVAL_SECONDS?",
            env={"ZMON_SAMPLING_NVML_INTERVAL_SECONDS": "2"},
            modes=("watch",),
        ),
        BadInput(
            "env-bad-value",
            "{}\n",
            "ZMON_SAMPLING__NVML__INTERVAL_SECONDS: Input should be greater",
            env={"ZMON_SAMPLING__NVML__INTERVAL_SECONDS": "-1"},
            modes=("watch",),
        ),
        BadInput(
            "bad-resolution", "workload:\n  resolutions: ['64x']\n", "workload.resolutions[0]: '64x'", modes=("run",)
        ),
        BadInput(
            "missing-prompts",
            f"workload:\n  prompts_file: {tmp / 'absent.txt'}\n",
            "workload.prompts_file: cannot read",
            modes=("run",),
        ),
        BadInput(
            "unwritable-output-dir",
            f"workload:\n  output_dir: {ro}\n",
            "workload.output_dir: cannot write",
            modes=("run",),
        ),
        BadInput(
            "uncreatable-output-dir",
            f"workload:\n  output_dir: {ro}/zmon/out\n",
            "workload.output_dir: /proc/sys/zmon/out does not exist and cannot be created",
            modes=("run",),
        ),
        BadInput(
            "jsonl-dir-missing",
            f"workload:\n  jsonl:\n    path: {tmp / 'nope' / 'g.jsonl'}\n",
            "workload.jsonl.path: the directory",
            modes=("run",),
        ),
        BadInput(
            "web-config-missing",
            f"server:\n  web_config_file: {tmp / 'web.yml'}\n",
            "server.web_config_file",
            modes=("watch",),
        ),
    ]


@timed
def config_case(case: BadInput, tmp: Path) -> Result:
    r = Result(
        f"config/{case.name}",
        "exit 2, key named, no traceback" + (f"; {'+'.join(case.modes)} too" if case.modes else ""),
    )
    d = tmp / case.name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "zmon.yaml"
    if isinstance(case.text, bytes):
        f.write_bytes(case.text)
    else:
        f.write_text(case.text)
    seen = []
    ok = True
    for mode in ("check-config", *case.modes):
        args = (
            ["check-config", str(f)]
            if mode == "check-config"
            else [mode, "--config", str(f), "--listen", "127.0.0.1:0"]
        )
        rc, out = zmon_cli(args, d, case.env)
        good = rc == 2 and case.fragment in out and "Traceback" not in out
        ok &= good
        seen.append(f"{mode}: {rc}")
        if not good:
            r.notes.append(f"{mode} rc={rc}: {out.strip()[-400:]}")
    r.observed = ", ".join(seen)
    r.passed = ok
    return r


@timed
def config_good(tmp: Path) -> Result:
    r = Result("config/example", "check-config exit 0 on config.example.yaml")
    rc, out = zmon_cli(["check-config", str(ROOT / "config.example.yaml")], tmp)
    r.observed = f"exit {rc}"
    r.passed = rc == 0
    if not r.passed:
        r.notes.append(out[-400:])
    return r


# ------------------------------------------------------------------------------------------------ signal cases


@timed
def sighup_watch(tmp: Path, storm: int) -> Result:
    """One watch daemon: a good file, a broken file, a new listen address, a storm."""
    r = Result("sighup/watch", "good file applied, broken kept + reported, rebind, storm survived")
    port = free_port()
    base: dict[str, object] = {"server": {"listen": f"127.0.0.1:{port}"}}
    with daemon("watch", tmp, base, port=port) as d:
        cfg = tmp / "zmon.yaml"
        obs = []
        # 1. a good file: an interval, a disabled source
        sampling = {"host": {"interval_seconds": 2}, "network": {"enabled": False}}
        cfg.write_text(yaml_text({**base, "sampling": sampling}))
        t0 = time.monotonic()
        d.signal(signal.SIGHUP)
        applied = wait_until(lambda: "reloaded" in d.text() and 'collector="network"' not in (d.scrape() or "x"), 10)
        obs.append(f"good: {'applied' if applied else 'NOT applied'} in {time.monotonic() - t0:.2f}s")
        ok = bool(applied) and d.metric("zmon_config_last_reload_successful") == 1.0
        # 2. a broken file
        ts = d.metric("zmon_config_last_reload_success_timestamp_seconds")
        cfg.write_text("sampling:\n  host:\n    interval_seconds: .inf\n")
        d.signal(signal.SIGHUP)
        failed = wait_until(lambda: d.metric("zmon_config_last_reload_successful") == 0.0, 10)
        ok &= bool(failed) and d.alive() and "keeping the running configuration" in d.text()
        ok &= d.metric("zmon_config_last_reload_success_timestamp_seconds") == ts
        ok &= 'collector="network"' not in (d.scrape() or "x")  # still the last good configuration
        obs.append(f"broken: {'kept, reported' if failed else 'NOT reported'}, alive={d.alive()}")
        # 3. a new listen address
        new_port = free_port()
        cfg.write_text(yaml_text({"server": {"listen": f"127.0.0.1:{new_port}"}}))
        t0 = time.monotonic()
        d.signal(signal.SIGHUP)
        new_url = f"http://127.0.0.1:{new_port}"
        moved = wait_until(lambda: d.scrape(new_url, 1) is not None, 10, 0.05)
        rebind = time.monotonic() - t0
        closed = wait_until(lambda: d.scrape(timeout=1) is None, 10)
        ok &= bool(moved) and bool(closed)
        obs.append(f"rebind: {rebind:.2f}s, old port closed={bool(closed)}")
        # 4. a storm
        for _ in range(storm):
            d.signal(signal.SIGHUP)
            time.sleep(0.005)
        time.sleep(1.0)
        ok &= d.alive() and d.scrape(new_url) is not None
        ok &= bool(wait_until(lambda: d.metric("zmon_config_last_reload_successful", url=new_url) == 1.0, 10))
        obs.append(f"storm of {storm}: alive={d.alive()}")
        d.url = new_url
        r.observed = "; ".join(obs)
        r.passed = ok and "Traceback" not in d.text()
        if not r.passed:
            r.notes.append(d.text()[-1500:])
    return r


def run_config(tmp: Path, **workload: object) -> dict[str, object]:
    return {
        "model": {"cpu_threads": 1},
        "workload": {**RUN_WORKLOAD, **workload},
        "sampling": {"host": {"interval_seconds": 0.5}},
    }


@timed
def sighup_run(tmp: Path, env: dict[str, str]) -> Result:
    """SIGHUP during the model load and during generations: nothing interrupted, reload applied after load."""
    r = Result("sighup/run", "HUP in load + during generations: 0 errors, JSONL whole, applied / needs restart")
    jsonl = tmp / "gen.jsonl"
    cfg = run_config(tmp, jsonl={"path": str(jsonl)})
    with daemon("run", tmp, cfg, env=env, ready=False) as d:
        time.sleep(0.5)
        d.signal(signal.SIGHUP)  # while torch imports and the model loads: must not kill it
        if not wait_until(lambda: d.metric("zmon_generations_total", 'status="ok"'), 120, 0.3):
            r.observed = f"no generation (alive={d.alive()})"
            r.notes.append(d.text()[-1500:])
            return r
        for i in range(10):
            changed = {
                **cfg,
                "sampling": {"host": {"interval_seconds": 0.5 + 0.1 * (i % 3)}},
                "model": {"cpu_threads": 1 + i % 2},
            }
            (tmp / "zmon.yaml").write_text(yaml_text(changed))
            d.signal(signal.SIGHUP)
            time.sleep(0.3)
        wait_until(lambda: d.text().count("configuration reloaded") >= 2, 10)
        text = d.scrape() or ""
        errors = (metric(text, "zmon_generations_total", 'status="error"') or 0) + (
            metric(text, "zmon_generations_total", 'status="oom"') or 0
        )
        ok_gens = metric(text, "zmon_generations_total", 'status="ok"') or 0
        success = metric(text, "zmon_config_last_reload_successful")
    code = d.proc.returncode
    lines = [json.loads(ln) for ln in jsonl.read_text().splitlines()] if jsonl.exists() else []
    log = d.text()
    r.observed = (
        f"{int(ok_gens)} ok, {int(errors)} errors, {log.count('configuration reloaded')} reloads logged, "
        f"success={success}, jsonl {len(lines)} lines, exit {code}"
    )
    r.passed = (
        code == 0
        and errors == 0
        and success == 1.0
        and ok_gens > 0
        and "needs a restart" in log
        and "model.cpu_threads" in log
        and "Traceback" not in log
        and all(x["status"] == "ok" for x in lines)
    )
    if not r.passed:
        r.notes.append(log[-1500:])
    return r


@timed
def sigterm_mid_generation(tmp: Path, env: dict[str, str]) -> Result:
    """SIGTERM while a generation runs: it finishes (its record is written), then zmon exits 0."""
    r = Result("sigterm/mid-generation", "generation finishes, exit 0, JSONL whole")
    jsonl = tmp / "gen.jsonl"
    cfg = run_config(tmp, jsonl={"path": str(jsonl)}, steps=12, resolutions=["256x256"])
    with daemon("run", tmp, cfg, env=env) as d:
        busy = wait_until(lambda: d.metric("zmon_generation_in_progress") == 1.0, 120, 0.02)
        before = d.metric("zmon_generations_total") or 0
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        code = d.proc.wait(120)
        took = time.monotonic() - t0
    log = d.text()
    m = re.search(r"(\d+) generation\(s\) in [\d.]+s: (\d+) ok, (\d+) oom, (\d+) error", log)
    raw = jsonl.read_bytes() if jsonl.exists() else b""
    lines = [json.loads(ln) for ln in raw.splitlines()]
    finished = int(m.group(1)) if m else -1
    r.observed = (
        f"in progress={bool(busy)}, exit {code} after {took:.1f}s, {finished} generation(s) "
        f"({int(before)} before the signal), jsonl {len(lines)} lines"
    )
    r.passed = (
        bool(busy)
        and code == 0
        and m is not None
        and m.group(4) == "0"
        and finished == len(lines)
        and finished == before + 1
        and raw.endswith(b"\n")
        and "Traceback" not in log
    )
    if not r.passed:
        r.notes.append(log[-1500:])
    return r


# ------------------------------------------------------------------------------------------------ disk cases


@timed
def disk_full(tmp: Path, env: dict[str, str], fs: SmallFs) -> Result:
    """The JSONL log and the images on two small tmpfs that fill up while generating."""
    r = Result("disk/full", "every JSONL line whole, failures counted, no partial PNG, generation goes on")
    logs = fs.make("logs", "24k")
    out = fs.make("out", "160k")
    cfg = run_config(tmp, jsonl={"path": str(logs / "gen.jsonl")}, output_dir=str(out))
    with daemon("run", tmp, cfg, env=env, wrap=fs.wrap()) as d:
        full = wait_until(
            lambda: (
                (d.metric("zmon_jsonl_write_failures_total") or 0) >= 5
                and (d.metric("zmon_output_write_failures_total") or 0) >= 5
            ),
            180,
            0.5,
        )
        text = d.scrape() or ""
        raw = d.path(logs / "gen.jsonl").read_bytes()
        names = sorted(p.name for p in d.path(out).iterdir())
        pngs_ok = _pngs_whole(d.path(out), names)
    jsonl_fail = metric(text, "zmon_jsonl_write_failures_total") or 0
    out_fail = metric(text, "zmon_output_write_failures_total") or 0
    errors = metric(text, "zmon_generations_total", 'status="error"') or 0
    ok_gens = metric(text, "zmon_generations_total", 'status="ok"') or 0
    lines = raw.splitlines()
    parsed = sum(1 for ln in lines if _json_ok(ln))
    whole = raw.endswith(b"\n")
    pngs = len([n for n in names if n.endswith(".png")])
    temps = len([n for n in names if not n.endswith(".png")])
    r.observed = (
        f"{int(ok_gens)} generations ok, {int(errors)} errors; jsonl {parsed}/{len(lines)} lines parse, "
        f"ends in a newline={whole}, {int(jsonl_fail)} failures counted; {pngs} PNGs all whole={pngs_ok}, "
        f"{int(out_fail)} failures counted, other files left={temps}"
    )
    r.passed = bool(full) and errors == 0 and parsed == len(lines) > 0 and whole and pngs_ok and temps == 0
    if fs.userns:
        r.notes.append("tmpfs in a user namespace (not root)")
    if not r.passed:
        r.notes.append(d.text()[-1500:])
    return r


def _json_ok(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _pngs_whole(out: Path, names: list[str]) -> bool:
    from PIL import Image

    for n in names:
        if not n.endswith(".png"):
            continue
        try:
            with Image.open(out / n) as im:
                im.load()
        except Exception:
            return False
    return True


@timed
def read_only_output(tmp: Path, env: dict[str, str], fs: SmallFs) -> Result:
    """A read-only output directory (a read-only mount: root ignores permission bits) and one to be created
    under it: start-up errors (exit 2, before the model loads), and check-config says the same."""
    r = Result("disk/read-only-output-dir", "run and check-config: exit 2 naming workload.output_dir")
    ro = fs.make("ro", "64k", read_only=True)
    seen = []
    ok = True
    for target, fragment in ((ro, "cannot write into"), (ro / "a" / "b", "does not exist and cannot be created")):
        cfg = tmp / f"ro-{len(seen)}.yaml"
        cfg.write_text(yaml_text(run_config(tmp, output_dir=str(target))))
        for args in (["check-config", str(cfg)], ["run", "--config", str(cfg), "--listen", "127.0.0.1:0"]):
            rc, out = zmon_cli(args, tmp, env, wrap=fs.wrap())
            good = (
                rc == 2
                and "workload.output_dir: " in out
                and str(target) in out
                and fragment in out
                and "Traceback" not in out
            )
            seen.append(f"{args[0]} {target.name}: {rc}")
            ok &= good
            if not good:
                r.notes.append(out[-600:])
    r.observed = ", ".join(seen)
    r.passed = ok
    return r


@timed
def kill9_torn_tail(tmp: Path, env: dict[str, str], rounds: int) -> Result:
    """kill -9 at random moments while generating; after each, a torn fragment is appended as a kill inside
    write() would leave it (a SIGKILL cannot be aimed at that microsecond), and zmon started again: every
    start cuts the torn tail (and says so), and the file never holds a partial or glued line."""
    r = Result("disk/kill-9", "torn tail cut at the next start, logged; every line parses")
    jsonl = tmp / "k.jsonl"
    cfg = run_config(tmp, jsonl={"path": str(jsonl)})
    cuts = 0
    rng = random.Random(7)
    for i in range(rounds):
        with daemon("run", tmp, cfg, env=env, ready=False, log_name=f"k{i}.log") as d:
            wait_until(lambda d=d: "generating" in d.text() or not d.alive(), 120, 0.2)
            cuts += int(i > 0 and "cut a torn last line" in d.text())  # cut at start-up, before generating
            time.sleep(rng.uniform(0.2, 1.5))
            d.proc.kill()
            d.proc.wait(10)
        with open(jsonl, "ab") as f:
            f.write(b'{"timestamp":"2026-01-01T00:00:00.000Z","unix":1767225600.0,"status":"o')
    with daemon("run", tmp, cfg, env=env, log_name="k-final.log") as d:
        wait_until(lambda: (d.metric("zmon_generations_total") or 0) >= 2, 60)
        cuts += int("cut a torn last line" in d.text())
    raw = jsonl.read_bytes()
    lines = raw.splitlines()
    parsed = sum(1 for ln in lines if _json_ok(ln))
    r.observed = f"{rounds} kill -9 rounds, {cuts} torn tails cut and logged, {parsed}/{len(lines)} lines parse"
    r.passed = cuts == rounds and parsed == len(lines) > 0 and raw.endswith(b"\n")
    return r


# ------------------------------------------------------------------------------------------------ main


CASES = ("config", "sighup", "sigterm", "disk")


def run_cases(
    *,
    heavy: bool,
    only: list[str] | None = None,
    cache_dir: str | None = None,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    env = {"ZMON_MODEL__CACHE_DIR": cache_dir} if cache_dir else {}
    results: list[Result] = []

    def want(name: str) -> bool:
        return not only or any(name.startswith(o) for o in only)

    def add(res: Result) -> None:
        results.append(res)
        if progress:
            progress(res)

    with tempfile.TemporaryDirectory(prefix="zmon-daemon-faults-") as t:
        tmp = Path(t)
        if want("config/example"):
            add(config_good(tmp))
        for case in bad_inputs(tmp):
            if want(f"config/{case.name}"):
                add(config_case(case, tmp / "config"))
        if want("sighup/watch"):
            (tmp / "w").mkdir()
            add(sighup_watch(tmp / "w", 200 if heavy else 20))
        if want("sighup/run"):
            (tmp / "r").mkdir()
            add(sighup_run(tmp / "r", env))
        if want("sigterm/mid-generation"):
            (tmp / "t").mkdir()
            add(sigterm_mid_generation(tmp / "t", env))
        why = SmallFs.available()
        for name, case in (("disk/full", disk_full), ("disk/read-only-output-dir", read_only_output)):
            if not want(name):
                continue
            if why is not None:
                add(Result(name, "a small tmpfs", f"not run: {why}", False))
                continue
            work = tmp / name.replace("/", "-")
            work.mkdir()
            fs = SmallFs(work / "mnt")
            try:
                add(case(work, env, fs))
            finally:
                fs.close()
        if want("disk/kill-9"):
            (tmp / "k").mkdir()
            add(kill9_torn_tail(tmp / "k", env, 20 if heavy else 3))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heavy", action="store_true", help="a SIGHUP storm of 200 and 20 kill -9 rounds")
    ap.add_argument("--only", nargs="*", help=f"case name prefixes ({', '.join(CASES)}, config/deep-yaml, ...)")
    ap.add_argument("--cache-dir", help="model.cache_dir holding the embedded model (default: zmon's)")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = ap.parse_args(argv)
    results = run_cases(
        heavy=args.heavy,
        only=args.only,
        cache_dir=args.cache_dir,
        progress=lambda r: print(
            f"{r.case}: {'pass' if r.passed else 'FAIL'} ({r.seconds:.1f}s)", file=sys.stderr, flush=True
        ),
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
