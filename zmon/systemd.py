"""systemd integration, no dependencies: sd_notify (READY, RELOADING, WATCHDOG, STATUS, STOPPING) over $NOTIFY_SOCKET.

Protocol (man sd_notify): newline-separated KEY=VALUE fields in one AF_UNIX datagram sent to the socket named
by $NOTIFY_SOCKET; a leading '@' names a socket in the abstract namespace. The watchdog expects WATCHDOG=1 at
least every $WATCHDOG_USEC microseconds (systemd's advice: every half of it), and only from $WATCHDOG_PID when
that is set.

`attach_systemd(monitor)` wires it to a Monitor (anything `Watched`): READY=1 once the store is ready (first
good sample of every enabled source), WATCHDOG=1 (from the sampler's listener, and a small thread that keeps
the pace) only while every source keeps completing its attempts, so a sampler stuck in a blocking call stops
feeding the watchdog and systemd restarts zmon; STOPPING=1 when the monitor stops. Without $NOTIFY_SOCKET it
does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from zmon.sampling import Sampler, SnapshotStore

log = logging.getLogger(__name__)

# A source counts as stuck when its last attempt is older than STALL_INTERVALS × its usual interval
# (and at least half the watchdog timeout): a sample that takes a few intervals is slow, not stuck.
STALL_INTERVALS = 3.0


class Notifier:
    """Sends sd_notify datagrams to one socket; every method is a harmless no-op when disabled.

    Sending never raises: a failure is logged once at WARNING (then DEBUG) and reported as False.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()  # abstract namespace
        return self.address

    def notify(self, *fields: str) -> bool:
        """Send fields such as 'READY=1' in one datagram; True when it was sent."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self._target())
            except OSError as e:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "sd_notify to %s failed: %s", self.address, e)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic time, as sd_notify(3) asks of a service reloading its configuration."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds from $WATCHDOG_USEC, or None when there is none for this process.

    None when unset, not a positive integer, or when $WATCHDOG_PID names another process (the variables were
    inherited from a parent that systemd watches).
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1e6


class Watched(Protocol):
    """What the notifier watches (zmon.app.Monitor): the sampler, its store, whether /metrics is bound."""

    store: SnapshotStore
    sampler: Sampler

    @property
    def serving(self) -> bool: ...

    @property
    def max_backoff_seconds(self) -> float: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def add_closer(self, close: Callable[[], None]) -> None: ...


class SystemdHandle:
    """What attach_systemd wired: sends READY once, feeds the watchdog while sampling is alive.

    `on_sample` is the sampler listener; `check()` decides whether every source is alive; `close()` stops
    acting (the listener stays registered but does nothing).
    """

    def __init__(
        self,
        monitor: Watched,
        notifier: Notifier,
        watchdog_seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monitor = monitor
        self.notifier = notifier
        self.watchdog_seconds = watchdog_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._started: float | None = None  # first listener call: sampling has begun
        self._last_attempt: dict[str, float] = {}
        self._min_gap: dict[str, float] = {}
        self._last_ping: float | None = None
        self._first_seen: dict[str, float] = {}  # when a source was first checked (one a reload added: then)
        self._ready_sent = False
        self._stalled: tuple[str, ...] = ()
        self._closed = False
        self.pings = 0

    @property
    def ready_sent(self) -> bool:
        return self._ready_sent

    def on_sample(self, source: str, ok: bool) -> None:
        """Sampler listener: record the attempt, send READY once, then feed the watchdog if all are alive."""
        if self._closed:
            return
        now = self._clock()
        with self._lock:
            if self._started is None:
                self._started = now
            last = self._last_attempt.get(source)
            if last is not None and now > last:
                gap = now - last
                self._min_gap[source] = min(self._min_gap.get(source, gap), gap)
            self._last_attempt[source] = now
        self._maybe_ready()
        self.tick(now)

    def _serving(self) -> bool:
        """/metrics is bound (Monitor.start binds it just after starting the sampler), or none is served."""
        return bool(self.monitor.serving)

    def _maybe_ready(self) -> None:
        """READY=1, once: every enabled source has a good sample and /metrics accepts connections."""
        if self._ready_sent or not self.monitor.store.ready() or not self._serving():
            return
        with self._lock:
            if self._ready_sent:
                return
            self._ready_sent = True
        n = len(self.monitor.sampler.sources)
        status = f"ready: {n} sources sampled" if n else "ready: no sampled sources"
        self.notifier.ready(status)
        log.info("told systemd READY=1 (%s)", status)

    def follow(self) -> None:
        """Thread body: also checks at least every quarter of the watchdog timeout, so pings keep their pace
        when the sources sample less often than that (still only while none is stuck), and readiness is seen
        when no source is sampled at all. STOPPING=1 once the monitor stops."""
        tick = min(self.watchdog_seconds / 4, 1.0) if self.watchdog_seconds else 1.0
        while not self.monitor.wait(tick):
            self._maybe_ready()
            if self._ready_sent:
                self.tick()
        self.stopping()

    def stopping(self) -> None:
        """STOPPING=1, once; the monitor's closers call it, so it is sent before the process can exit."""
        if not self._closed:
            self._closed = True
            self.notifier.stopping()

    def tick(self, now: float | None = None) -> None:
        """Send WATCHDOG=1 if due and no source is stuck.

        Pings are spaced by at least a quarter of the watchdog timeout, so that with the listener and the
        follow thread calling this, one goes out at least every half of it (systemd's advice).
        """
        if self._closed or self.watchdog_seconds is None:
            return
        now = self._clock() if now is None else now
        stuck = self.stuck_sources(now)
        with self._lock:
            changed = stuck != self._stalled
            self._stalled = stuck
            due = self._last_ping is None or now - self._last_ping >= self.watchdog_seconds / 4
            ping = due and not stuck
            if ping:
                self._last_ping = now
                self.pings += 1
        if changed:
            if stuck:
                log.error("sampling stuck in %s: no longer feeding the systemd watchdog", ", ".join(stuck))
                self.notifier.status(f"sampling stuck: {', '.join(stuck)}")
            else:
                log.info("sampling alive again: feeding the systemd watchdog")
                self.notifier.status("sampling")
        if ping:
            self.notifier.watchdog()

    def stuck_sources(self, now: float | None = None) -> tuple[str, ...]:
        """Sources whose last attempt is overdue (longer ago than their allowance)."""
        now = self._clock() if now is None else now
        floor = (self.watchdog_seconds or 0.0) / 2
        backoff = self.monitor.max_backoff_seconds
        out = []
        with self._lock:
            for name in self.monitor.sampler.sources:
                st = self.monitor.store.get(name)
                if st is not None and not st.available:
                    continue  # found not to exist here (e.g. no CUDA): no longer sampled
                last = self._last_attempt.get(name)
                gap = self._min_gap.get(name)
                if last is None or gap is None:
                    # Until its usual interval is known, allow the whole watchdog timeout.
                    allowed = max(self.watchdog_seconds or 0.0, floor)
                    if last is None and not self._first_seen:  # the sources of the start: since sampling began
                        self._first_seen.update(dict.fromkeys(self.monitor.sampler.sources, self._started or now))
                    since = last if last is not None else self._first_seen.setdefault(name, now)
                else:
                    allowed = max(STALL_INTERVALS * gap, floor)
                    since = last
                if st is not None and st.consecutive_failures:
                    allowed += backoff  # the sampler skips a failing source (no attempt) while it backs off
                if now - since > allowed:
                    out.append(name)
        return tuple(out)

    def reloading(self) -> None:
        """A configuration reload begins (SIGHUP): RELOADING=1."""
        if not self._closed:
            self.notifier.reloading()

    def reloaded(self, summary: str) -> None:
        """The reload is over (applied or refused): READY=1 again, with the outcome as STATUS."""
        if not self._closed:
            self.notifier.notify("READY=1", f"STATUS={summary[:200].replace(chr(10), ' ')}")

    def close(self) -> None:
        self._closed = True


def attach_systemd(
    monitor: Watched,
    *,
    environ: Mapping[str, str] | None = None,
    notifier: Notifier | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SystemdHandle | None:
    """Wire sd_notify to a Monitor (before or after `start()`); None, doing nothing, without NOTIFY_SOCKET."""
    notifier = notifier or Notifier.from_env(environ)
    if not notifier.enabled:
        return None
    handle = SystemdHandle(monitor, notifier, watchdog_interval(environ), clock)
    monitor.sampler.add_listener(handle.on_sample)
    monitor.add_closer(handle.stopping)

    threading.Thread(target=handle.follow, name="zmon-systemd", daemon=True).start()
    log.info(
        "systemd notify socket %s; watchdog %s",
        notifier.address,
        f"{handle.watchdog_seconds:g}s" if handle.watchdog_seconds else "off",
    )
    return handle
