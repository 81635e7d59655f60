"""SIGHUP: re-read the configuration and apply it to the running daemon, all of it or none of it.

How a reload goes (`Reloader.reload`, on its own thread, one at a time):

1. load: the file, the ZMON_ environment and the command-line flags, exactly as at start (`ConfigSource.load`),
   then the same checks as at start (zmon.app.checks, for this mode). Any problem: the running configuration
   stays, the problems are logged, `zmon_config_last_reload_successful` drops to 0.
2. classify what changed (`changed_paths`): what this mode applies live, what needs a restart (logged as such,
   `zmon_config_restart_required` 1, and kept at its running value), what this mode does not use.
3. apply (the mode's `apply(old, new)`): first the steps that can fail and change nothing when they do
   (binding a new listen address), then the ones that cannot (sources rebuilt by group, policy rules,
   alerting, thresholds, logging, the new server started and the old one drained). A generation in progress
   is never interrupted: nothing here runs on the generation's thread, and policy actions still wait for a
   safe point.

`hold_sighup()` is installed by the CLI first thing, so a SIGHUP that arrives while a model loads is queued
for the first reload instead of killing the process (SIGHUP's default action).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from zmon.app.checks import Mode, require
from zmon.app.monitor import Monitor
from zmon.collectors.reload import ReloadCollector, ReloadState
from zmon.config import Config, ConfigError, SamplingConfig
from zmon.systemd import SystemdHandle

log = logging.getLogger(__name__)

_REQUESTS = threading.Event()  # set by SIGHUP
_INSTALLED = False


def hold_sighup() -> threading.Event:
    """Make SIGHUP request a reload instead of ending the process; returns the request event. Main thread
    only (elsewhere: nothing is installed, the event is returned anyway)."""
    global _INSTALLED
    if not _INSTALLED and threading.current_thread() is threading.main_thread():

        def on_hup(signum: int, frame: Any) -> None:
            _REQUESTS.set()

        signal.signal(signal.SIGHUP, on_hup)
        _INSTALLED = True
    return _REQUESTS


def release_sighup() -> None:
    """Back to SIGHUP's default action (tests that run a mode in-process)."""
    global _INSTALLED
    if _INSTALLED and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        _INSTALLED = False
    _REQUESTS.clear()


@dataclass(frozen=True)
class ConfigSource:
    """How the configuration in force was read, to read it again: `load()` re-reads the file with the same
    environment and flags (raises ConfigError); `apply_logging` sets up logging from a Config (the CLI's)."""

    load: Callable[[], Config]
    name: str = "configuration"
    apply_logging: Callable[[Config], None] | None = None


class ReloadError(Exception):
    """A valid configuration that could not be applied (e.g. its listen address is in use): nothing changed."""


# ------------------------------------------------------------------------------------------------ what changed


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def changed_paths(old: Config, new: Config) -> list[str]:
    """Dotted key paths whose value differs between two configurations (leaves; lists compared whole)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old.model_dump(mode="json"), "", a)
    _flatten(new.model_dump(mode="json"), "", b)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def _matches(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Plan:
    """What a mode does with each kind of change (dotted prefixes; the first list that matches wins)."""

    restart: tuple[str, ...]  # applies only after a restart
    live: tuple[str, ...]  # applied now
    unused: tuple[str, ...] = ()  # not used by this mode, although under a live prefix
    # everything else is not used by this mode either

    def split(self, changed: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
        live: list[str] = []
        restart: list[str] = []
        unused: list[str] = []
        for p in changed:
            if _matches(p, self.unused):
                unused.append(p)
            elif _matches(p, self.restart):
                restart.append(p)
            elif _matches(p, self.live):
                live.append(p)
            else:
                unused.append(p)
        return live, restart, unused


def keep_running(old: Config, new: Config, paths: Iterable[str]) -> Config:
    """`new` with the values at `paths` (changes that need a restart) taken from `old`: the configuration
    actually in force, against which the next reload is compared."""
    paths = list(paths)
    if not paths:
        return new
    data = new.model_dump(mode="json")
    running = old.model_dump(mode="json")
    for path in paths:
        keys = path.split(".")
        src: Any = running
        dst: Any = data
        for k in keys[:-1]:
            src = src.get(k) if isinstance(src, dict) else None
            dst = dst.setdefault(k, {}) if isinstance(dst, dict) else None
        if isinstance(dst, dict):
            if isinstance(src, dict) and keys[-1] in src:
                dst[keys[-1]] = src[keys[-1]]
            else:
                dst.pop(keys[-1], None)
    try:
        return Config.model_validate(data)
    except Exception:  # a mix that does not validate (cross-key rules): compare against the new file next time
        log.debug("running configuration not representable; next reload compares with the file", exc_info=True)
        return new


def _short(paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# ------------------------------------------------------------------------------------------------ the reloader


Apply = Callable[[Config, Config, list[str]], None]


class Reloader:
    """Serves reload requests (SIGHUP, or `request()`) on a thread: load, check, classify, apply; or keep the
    running configuration and say why. `current` is the configuration in force."""

    def __init__(
        self,
        current: Config,
        source: ConfigSource,
        *,
        mode: Mode,
        plan: Plan,
        apply: Apply,
        state: ReloadState | None = None,
        requests: threading.Event | None = None,
        lock: Any = None,
        stopped: Callable[[], bool] = lambda: False,
        on_reloading: Callable[[], None] | None = None,
        on_reloaded: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.current = current
        self.source = source
        self.mode = mode
        self.plan = plan
        self._apply = apply
        self.state = state or ReloadState()
        self._requests = requests if requests is not None else threading.Event()
        self._lock = lock if lock is not None else threading.RLock()
        self._stopped = stopped
        self._on_reloading = on_reloading
        self._on_reloaded = on_reloaded
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self.reloads = 0
        self.failures = 0

    def request(self) -> None:
        self._requests.set()

    def start(self) -> None:
        """Serve requests from now on (one queued before, e.g. during a model load, is served at once)."""
        self._thread = threading.Thread(target=self._run, name="zmon-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._quit.set()
        self._requests.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def _run(self) -> None:
        while True:
            self._requests.wait()
            if self._quit.is_set():
                return
            self._requests.clear()  # a SIGHUP during this reload asks for one more
            try:
                self.reload()
            except Exception:  # a bug in apply must not end reloading or the daemon
                log.exception("configuration reload failed unexpectedly")
                self.failures += 1
                self.state.failed()

    def reload(self) -> bool:
        """Reload once; True when the new configuration is in force (or nothing changed)."""
        t0 = time.monotonic()
        if self._on_reloading is not None:
            self._on_reloading()
        ok, summary = self._reload()
        log.log(logging.INFO if ok else logging.ERROR, "%s (%.0f ms)", summary, (time.monotonic() - t0) * 1e3)
        if self._on_reloaded is not None:
            self._on_reloaded(ok, summary)
        return ok

    def _reload(self) -> tuple[bool, str]:
        log.info("reloading %s", self.source.name)
        try:
            new = self.source.load()
            for w in require(new, self.mode, self.source.name):
                log.warning("config: %s", w)
        except ConfigError as e:
            return self._failed(str(e))
        with self._lock:
            if self._stopped():
                return False, "configuration reload skipped: zmon is stopping"
            old = self.current
            live, restart, unused = self.plan.split(changed_paths(old, new))
            try:
                self._apply(old, new, live)
            except (ReloadError, OSError, ConfigError) as e:
                return self._failed(f"cannot apply it: {e}")
            self.current = keep_running(old, new, restart)
        self.reloads += 1
        self.state.succeeded(restart)
        parts = [f"configuration reloaded from {self.source.name}"]
        parts.append(f"applied: {_short(live)}" if live else "no live setting changed")
        if restart:
            parts.append(f"needs a restart (still running the old value): {_short(restart)}")
        if unused:
            parts.append(f"not used by zmon {self.mode}: {_short(unused)}")
        return True, "; ".join(parts)

    def _failed(self, why: str) -> tuple[bool, str]:
        self.failures += 1
        self.state.failed()
        return False, f"configuration reload failed, keeping the running configuration: {why}"


def monitor_reloader(
    mon: Monitor,
    cfg: Config,
    source: ConfigSource,
    *,
    mode: Mode,
    plan: Plan,
    rebuild_sources: Callable[[SamplingConfig], list[str]],
    apply_more: Callable[[Config], None] | None = None,
    systemd: SystemdHandle | None = None,
) -> Reloader:
    """The SIGHUP reloader of a daemon's Monitor, its state exported as zmon_config_*. Applying a new
    configuration: bind its server first (may fail; nothing has changed yet), then the sampler's settings,
    the source groups whose sub-config changed (`rebuild_sources`, which returns their names), what the mode
    adds (`apply_more`: policy, alerting, thresholds), the new server swapped in, logging."""

    def apply(old: Config, new: Config, live: list[str]) -> None:
        server = mon.prepare_server(new.server)  # may raise: nothing has changed yet
        mon.configure_sampling(new.sampling)
        rebuilt = rebuild_sources(new.sampling)
        if rebuilt:
            log.info("sources rebuilt: %s", ", ".join(rebuilt))
        if apply_more is not None:
            apply_more(new)
        mon.commit_server(new.server, server)
        if source.apply_logging is not None and new.logging != old.logging:
            source.apply_logging(new)

    state = ReloadState()
    mon.add_collector("config", ReloadCollector(state))
    return Reloader(
        cfg,
        source,
        mode=mode,
        plan=plan,
        apply=apply,
        state=state,
        requests=hold_sighup(),
        lock=mon.lock,
        stopped=lambda: mon.wait(0),
        **systemd_hooks(systemd),
    )


def systemd_hooks(sd: SystemdHandle | None) -> dict[str, Any]:
    """Reloader hooks telling systemd about a reload: RELOADING=1 … READY=1 with a STATUS line (what
    `systemctl reload` waits for with Type=notify-reload, harmless with Type=notify)."""
    if sd is None:
        return {}
    return {"on_reloading": sd.reloading, "on_reloaded": lambda ok, summary: sd.reloaded(summary)}
