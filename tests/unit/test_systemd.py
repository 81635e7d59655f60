"""systemd: the unit file (systemd-analyze verify/security, sysusers), and the sd_notify protocol end to end
against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import require_binary, zmon_process
from zmon.app.monitor import Monitor
from zmon.app.watch import build_watch
from zmon.config import Config, load_config
from zmon.systemd import Notifier, attach_systemd, watchdog_interval

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "zmon.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "zmon.env"
SYSUSERS = ROOT / "deploy" / "systemd" / "zmon.sysusers.conf"


# -- the unit file ------------------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """'Key=value' lines of all sections → {key: [values in order]} (repeated keys such as DeviceAllow)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _installable_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart's binary pointed at a stub: `verify` checks that it is executable,
    and /usr/local/bin/zmon is not installed here. Nothing else is changed."""
    stub = tmp_path / "bin" / "zmon"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/zmon " in text
    unit = tmp_path / "zmon.service"
    unit.write_text(text.replace("/usr/local/bin/zmon", str(stub)))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    unit = _installable_unit(tmp_path)
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not r.stderr.strip(), f"verify warned: {r.stderr}"


def test_unit_hardening_exposure_is_low(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    unit = _installable_unit(tmp_path)
    # Exposure is 0.0 (locked down) .. 10.0 (unprotected); --threshold is the same scale × 10.
    r = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert r.returncode == 0, (level.group(0) if level else "") + r.stdout[-3000:] + r.stderr
    assert level and float(level.group(1)) <= 2.5


def test_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] == "30"
    assert one["Restart"] == "on-failure" and "RestartSec" in one
    assert (one["User"], one["Group"], one["DynamicUser"]) == ("zmon", "zmon", "no")
    assert one["ExecStart"].startswith("/usr/local/bin/zmon watch --config /etc/zmon/config.yaml")
    assert one["EnvironmentFile"] == "-/etc/zmon/zmon.env"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"  # zmon reloads its configuration on SIGHUP
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }.items():
        assert one[key] == value, key
    allowed = " ".join(s["DeviceAllow"])
    assert "/dev/nvidiactl" in allowed and "char-nvidia-uvm" in allowed


def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    sysusers = require_binary("systemd-sysusers")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\nvideo:x:44:\n")
    r = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^zmon:x:\d+:\d+:", (etc / "passwd").read_text(), re.M)
    assert re.search(r"^video:x:44:.*\bzmon\b", (etc / "group").read_text(), re.M)


def test_env_file_examples_are_valid_configuration() -> None:
    """Every ZMON_ line of the example environment file, commented or not, is accepted by the loader."""
    env: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        m = re.match(r"^#?(ZMON_[A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    assert "ZMON_SERVER__LISTEN" in env and "ZMON_ARGS" in env
    cfg = load_config(None, environ=env)
    assert cfg.server.listen == "0.0.0.0:8739"


# -- the protocol -------------------------------------------------------------------------------------------


@dataclass
class Message:
    at: float  # monotonic seconds
    fields: dict[str, str]


class FakeSystemd:
    """A bound AF_UNIX datagram socket (path or abstract) collecting sd_notify messages on a thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append(Message(time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0, after: float = 0.0) -> Message:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.at >= after and key in m.fields and (value is None or m.fields[key] == value):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")
                self._cond.wait(left)

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        with self._cond:
            return [m.at for m in self.messages if "WATCHDOG" in m.fields and since <= m.at <= until]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@contextmanager
def _fake(address: str) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(address)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    with _fake(str(tmp_path / "notify.sock")) as fake:
        yield fake


@pytest.fixture(params=["path", "abstract"])
def any_fake_systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    """Both address kinds: a socket file, and '@name' in the abstract namespace."""
    address = str(tmp_path / "notify.sock") if request.param == "path" else f"@zmon-test-{uuid.uuid4().hex}"
    with _fake(address) as fake:
        yield fake


def test_notifier_sends_each_message(any_fake_systemd: FakeSystemd) -> None:
    fake = any_fake_systemd
    n = Notifier.from_env({"NOTIFY_SOCKET": fake.address})
    assert n.enabled
    assert n.ready("up") and n.watchdog() and n.status("line one\nline two") and n.stopping()
    fake.wait_for("STOPPING", "1", timeout=5)
    got = [m.fields for m in fake.messages]
    assert got == [
        {"READY": "1", "STATUS": "up"},
        {"WATCHDOG": "1"},
        {"STATUS": "line one line two"},
        {"STOPPING": "1"},
    ]
    n.close()


def test_notifier_without_socket_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()


def test_notifier_failure_is_reported_not_raised(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert n.watchdog() is False
    assert n.watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_attach_without_notify_socket_does_nothing() -> None:
    mon = build_watch(Config(), serve_http=False)
    assert attach_systemd(mon, environ={}) is None
    mon.stop()


def _monitor() -> Monitor:
    return build_watch(Config(), serve_http=False)


def test_ready_after_first_samples_then_watchdog_repeats(fake_systemd: FakeSystemd) -> None:
    mon = _monitor()
    handle = attach_systemd(mon, environ={"NOTIFY_SOCKET": fake_systemd.address, "WATCHDOG_USEC": "2000000"})
    assert handle is not None and handle.watchdog_seconds == 2.0
    assert not fake_systemd.messages, "nothing is sent before sampling starts"
    t0 = time.monotonic()
    mon.start()
    try:
        ready = fake_systemd.wait_for("READY", "1")
        assert mon.store.ready()
        assert all(st.taken_at is not None for st in mon.store.all() if st.available)
        time.sleep(3.6)
        pings = fake_systemd.pings(since=ready.at)
        assert len(pings) >= 3, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # At least timeout/4 apart, at most timeout/2 (+ scheduling slack on a busy CI machine).
        assert all(0.45 <= g <= 1.25 for g in gaps), f"ping spacing outside [timeout/4, timeout/2]: {gaps}"
        assert ready.at - t0 < 10
    finally:
        mon.stop()
    fake_systemd.wait_for("STOPPING", "1", timeout=5)
    assert sum("READY" in m.fields for m in fake_systemd.messages) == 1


def test_stuck_source_stops_the_watchdog_and_recovery_resumes_it(fake_systemd: FakeSystemd) -> None:
    mon = _monitor()
    release = threading.Event()
    calls = 0

    def sample() -> int:
        nonlocal calls
        calls += 1
        if calls >= 3:
            release.wait(30)  # a driver call that never returns
        return calls

    mon.add_source("stuck", sample, 0.5)
    attach_systemd(mon, environ={"NOTIFY_SOCKET": fake_systemd.address, "WATCHDOG_USEC": "2000000"})
    mon.start()
    try:
        fake_systemd.wait_for("READY", "1")
        first = fake_systemd.wait_for("WATCHDOG", "1")
        stuck = fake_systemd.wait_for("STATUS", "sampling stuck: stuck", timeout=10, after=first.at)
        # Other sources keep sampling, yet no ping once the stuck source is overdue.
        time.sleep(3.0)
        assert fake_systemd.pings(since=stuck.at + 0.05) == []
        assert mon.store.get("host").attempts_total > 3  # type: ignore[union-attr]
        release.set()
        resumed = fake_systemd.wait_for("WATCHDOG", "1", timeout=10, after=stuck.at + 0.05)
        assert resumed.at > stuck.at
        fake_systemd.wait_for("STATUS", "sampling", after=stuck.at)
    finally:
        release.set()
        mon.stop()


def test_zmon_watch_subprocess_talks_to_systemd(fake_systemd: FakeSystemd) -> None:
    """The real command: READY once /readyz is ready, WATCHDOG repeating, STOPPING on SIGTERM."""
    env = {"NOTIFY_SOCKET": fake_systemd.address, "WATCHDOG_USEC": "2000000"}
    with zmon_process(["watch"], env=env) as (_url, proc):
        ready = fake_systemd.wait_for("READY", "1")
        time.sleep(3.2)
        assert len(fake_systemd.pings(since=ready.at)) >= 2
        proc.send_signal(signal.SIGTERM)
        fake_systemd.wait_for("STOPPING", "1", timeout=10)
        assert proc.wait(15) == 0
