"""The Monitor: a snapshot store, a sampler, zmon's collectors and (optionally) the HTTP server.

Every mode assembles one (zmon.app.watch / run / attach / profile): sources, collectors and routes are
added through `add_source`, `add_collector`, `http.add_route` and `sampler.add_listener`. Scrapes only read
the store.

A configuration reload (zmon.app.reload) changes a running Monitor in two ways: sources are built in named
groups (`source_group`), each from its own sub-config, so a group whose sub-config changed is dropped and
built again while the others keep sampling; and the HTTP server is replaced (`prepare_server` binds the new
one, which can fail without changing anything; `commit_server` starts it and drains the old one).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.collectors.base import Collector, ExpositionErrors, Guarded
from zmon.collectors.self_metrics import SelfCollector
from zmon.config import SamplingConfig, ServerConfig
from zmon.sampling import Sampler, SnapshotStore, SourceSpec
from zmon.sampling.store import Key, key_name
from zmon.server import App, Limits, RenderCache, Server
from zmon.server.runbooks import PATH as RUNBOOKS_PATH
from zmon.server.runbooks import runbooks_handler

log = logging.getLogger(__name__)

SERVER_DRAIN_SECONDS = 5.0  # a replaced server lets requests in progress finish this long


@dataclass
class _Group:
    """What one source group registered: rebuilt as a whole when its key (sub-config) changes."""

    key: Any
    sources: list[str] = field(default_factory=list)
    collectors: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)


class Monitor:
    """One zmon instance. `serve_http=False`: no server (a host's registry, or `zmon profile`)."""

    def __init__(
        self,
        sampling: SamplingConfig,
        server: ServerConfig,
        *,
        mode: str,
        registry: CollectorRegistry | None = None,
        store: SnapshotStore | None = None,
        serve_http: bool = True,
    ) -> None:
        self.sampling_config = sampling
        self.server_config = server
        self.mode = mode
        self.store = store or SnapshotStore()
        self.sampler = Sampler(
            self.store,
            misfire_grace_seconds=sampling.misfire_grace_seconds,
            max_backoff_seconds=sampling.max_backoff_seconds,
        )
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.errors = ExpositionErrors()
        self._closers: list[Callable[[], None]] = []
        self._collectors: list[Guarded] = []
        self._groups: dict[str, _Group] = {}
        self._group: _Group | None = None  # the group being built (source_group)
        self.add_collector("self", SelfCollector(self.store, self.errors, mode))
        self.render_cache = RenderCache(lambda: self._collectors)
        self.sampler.add_listener(lambda source, ok: self.render_cache.warm(source) if ok else None)
        # The token is looked up in the server config in force at each request: a reload changes it.
        self.http = App(
            self.registry, self.store.ready, lambda: self.server_config.auth.token(), cache=self.render_cache
        )
        # The target of every alert's runbook_url (alerting.runbook_base_url, the shipped Prometheus rules).
        self.http.add_route(RUNBOOKS_PATH, runbooks_handler, methods=("GET", "HEAD"))
        self.server: Server | None = None
        self._serve_http = serve_http
        self._stopping = threading.Event()  # stop() has begun
        self._stopped = threading.Event()  # stop() has finished: sources closed, the server down
        # Held while the monitor is changed (a reload) or stopped: the two never interleave.
        self.lock = threading.RLock()

    @property
    def max_backoff_seconds(self) -> float:
        return self.sampling_config.max_backoff_seconds

    def add_collector(self, name: str, collector: Collector, sources: Sequence[Key] = ()) -> None:
        """Register a collector. `sources`: the store sources it reads, when its output depends on nothing
        else — its rendered text is then reused until one of them has a new sample."""
        key = None
        names = tuple(key_name(s) for s in sources)
        if names:
            store = self.store

            def key() -> Hashable:
                return tuple(getattr(store.get(s), "taken_at", None) for s in names)

        guarded = Guarded(name, collector, self.errors, cache_key=key, sources=names)
        self.registry.register(guarded)
        self._collectors = [*self._collectors, guarded]  # a new list: scrapes iterate the old one unlocked
        if self._group is not None:
            self._group.collectors.append(name)

    def remove_collector(self, name: str) -> None:
        """Unregister a collector (a reload that drops its source); its cached text goes with it."""
        for guarded in [c for c in self._collectors if c.name == name]:
            self._collectors = [c for c in self._collectors if c is not guarded]
            with contextlib.suppress(KeyError):
                self.registry.unregister(guarded)
        self.render_cache.forget(name)

    def unregister_collectors(self) -> None:
        """Take zmon's collectors out of the registry (a host's own registry, after attach)."""
        for guarded in self._collectors:
            with contextlib.suppress(KeyError):  # never registered, or already gone
                self.registry.unregister(guarded)

    def add_source(
        self,
        key: Key,
        sample: Callable[[], Any],
        interval_seconds: float,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.sampler.add(SourceSpec(key_name(key), sample, interval_seconds))
        if self._group is not None:
            self._group.sources.append(key_name(key))
        if close is not None:
            self.add_closer(close)

    def add_closer(self, close: Callable[[], None]) -> None:
        """Called (in reverse order of registration) when the monitor stops, or its source group is dropped."""
        if self._group is not None:
            self._group.closers.append(close)
        else:
            self._closers.append(close)

    # -- source groups (reload) ------------------------------------------------------------------------

    @contextlib.contextmanager
    def source_group(self, name: str, key: Any) -> Iterator[None]:
        """Sources, collectors and closers added inside belong to group `name`, built from `key` (its
        sub-config): `drop_group(name)` removes them all. Groups do not nest."""
        if self._group is not None:
            raise RuntimeError("source groups do not nest")
        if name in self._groups:
            raise ValueError(f"source group {name!r} exists; drop it first")
        group = _Group(key)
        self._group = group
        try:
            yield
        finally:
            self._group = None
            self._groups[name] = group

    def group_key(self, name: str, default: Any = None) -> Any:
        """The key group `name` was built from (`default` when there is no such group)."""
        group = self._groups.get(name)
        return default if group is None else group.key

    def drop_group(self, name: str) -> None:
        """Stop and remove the sources, collectors and closers of group `name` (nothing if there is none)."""
        group = self._groups.pop(name, None)
        if group is None:
            return
        for source in group.sources:
            self.sampler.remove(source)
            self.store.unregister(source)
        for collector in group.collectors:
            self.remove_collector(collector)
        for close in reversed(group.closers):
            try:
                close()
            except Exception:
                log.exception("closing source group %s failed", name)

    @property
    def serves_http(self) -> bool:
        """Whether this monitor serves its own /metrics (False: a host's registry, `zmon profile`, a worker)."""
        return self._serve_http

    @property
    def serving(self) -> bool:
        """True once /metrics is bound (always True for a monitor that serves no HTTP)."""
        return self.server is not None or not self._serve_http

    def mark_unavailable(self, key: Key, reason: str, *, expected: bool = False) -> None:
        """A source that cannot exist here: logged once (INFO when `expected`, e.g. no GPU on a CPU host;
        else WARNING), exported as zmon_collector_available 0."""
        log.log(
            logging.INFO if expected else logging.WARNING,
            "%s unavailable: %s — continuing without it",
            key_name(key),
            reason,
        )
        self.store.mark_unavailable(key_name(key), reason)
        if self._group is not None:
            self._group.sources.append(key_name(key))  # dropped with its group (a reload may retry it)

    def start(self) -> None:
        self.sampler.start()
        if self._serve_http:
            self.server = self._new_server(self.server_config)
            self.server.start()
            log.info("serving /metrics on %s/metrics", self.server.url)

    def _new_server(self, s: ServerConfig, sock: Any = None) -> Server:
        web = s.web_config_file.expanduser() if s.web_config_file is not None else None
        return Server(
            self.http, s.listen.host, s.listen.port, limits=Limits.from_config(s), web_config_file=web, sock=sock
        )

    # -- reload ------------------------------------------------------------------------------------------

    def configure_sampling(self, sampling: SamplingConfig) -> None:
        """Sampler-wide settings of a new configuration (the sources themselves are rebuilt by group)."""
        self.sampling_config = sampling
        self.sampler.configure(
            misfire_grace_seconds=sampling.misfire_grace_seconds, max_backoff_seconds=sampling.max_backoff_seconds
        )

    def server_changes(self, new: ServerConfig) -> list[str]:
        """Why the HTTP server must be replaced to serve `new` ([] when it can stay)."""
        if not self._serve_http or self.server is None:
            return []
        old = self.server_config
        why = [
            k
            for k in (
                "listen",
                "max_connections",
                "workers",
                "read_timeout_seconds",
                "idle_timeout_seconds",
                "write_timeout_seconds",
                "web_config_file",
            )
            if getattr(old, k) != getattr(new, k)
        ]
        if not why and new.web_config_file is not None and self.server.web is not None:
            from zmon.server import load_web_config

            try:  # TLS switched on or off inside the same file: the running watcher refuses that, a new one not
                tls = load_web_config(new.web_config_file.expanduser()).ssl_context is not None
            except Exception:
                tls = self.server.tls
            if tls != self.server.tls:
                why.append("web_config_file (TLS on/off)")
        return why

    def prepare_server(self, new: ServerConfig) -> Server | None:
        """Bind the server that will serve `new`, not started yet (None when the running one can stay).

        Raises OSError (address in use, permission) or ConfigError (web config) and changes nothing then.
        The same address is served through the running server's listening socket, so there is no moment
        without a listener and nothing to bind twice.
        """
        if not self.server_changes(new):
            return None
        assert self.server is not None
        old = self.server_config
        same_address = (new.listen.host, new.listen.port) == (old.listen.host, old.listen.port)
        sock = self.server.listener() if same_address else None
        try:
            return self._new_server(new, sock)
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    def commit_server(self, new: ServerConfig, server: Server | None) -> None:
        """Serve with `server` (from prepare_server) and drain the old one; or only adopt `new` (auth)."""
        self.server_config = new
        if server is None:
            return
        old = self.server
        server.start()
        self.server = server
        log.info("serving /metrics on %s/metrics", server.url)
        if old is not None:
            old.shutdown(drain_seconds=SERVER_DRAIN_SECONDS)

    def stop(self) -> None:
        """Stop serving and sampling, then run the closers (newest first); idempotent."""
        with self.lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            try:
                if self.server is not None:
                    self.server.shutdown()
                self.sampler.shutdown()
                closers = [c for g in self._groups.values() for c in g.closers] + self._closers
                for close in reversed(closers):
                    try:
                        close()
                    except Exception:
                        log.exception("closing a source failed")
            finally:
                self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once stop() has finished (so a caller that then exits loses nothing stop() had to do)."""
        return self._stopped.wait(timeout)

    # -- what `zmon profile` asks of its sampler -----------------------------------------------------

    def wait_ready(self, timeout: float) -> bool:
        """Wait for the first good sample of every available source."""
        return self.store.wait_ready(timeout)

    def sample_now(self) -> None:
        """Sample every source once, now, on this thread (the last reading of a profile)."""
        for name in self.sampler.sources:
            st = self.store.get(name)
            if st is None or st.available:
                self.sampler.run_once(name)

    def sample_failures(self) -> int:
        return sum(st.failures_total for st in self.store.all())

    def install_signal_handlers(self, on_stop: Callable[[], None] | None = None) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            if on_stop is not None:
                on_stop()
            threading.Thread(target=self.stop, name="zmon-stop", daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
