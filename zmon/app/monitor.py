"""The Monitor: a snapshot store, a sampler, zmon's collectors and (optionally) the HTTP server.

Every mode assembles one (zmon.app.watch / run / attach / profile): sources, collectors and routes are
added through `add_source`, `add_collector`, `http.add_route` and `sampler.add_listener`. Scrapes only read
the store.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Hashable, Sequence
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
        self.add_collector("self", SelfCollector(self.store, self.errors, mode))
        self.render_cache = RenderCache(lambda: self._collectors)
        self.sampler.add_listener(lambda source, ok: self.render_cache.warm(source) if ok else None)
        self.http = App(self.registry, self.store.ready, server.auth.token, cache=self.render_cache)
        # The target of every alert's runbook_url (alerting.runbook_base_url, the shipped Prometheus rules).
        self.http.add_route(RUNBOOKS_PATH, runbooks_handler, methods=("GET", "HEAD"))
        self.server: Server | None = None
        self._serve_http = serve_http
        self._stopping = threading.Event()  # stop() has begun
        self._stopped = threading.Event()  # stop() has finished: sources closed, the server down

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
        self._collectors.append(guarded)
        self.registry.register(guarded)

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
        if close is not None:
            self.add_closer(close)

    def add_closer(self, close: Callable[[], None]) -> None:
        """Called (in reverse order of registration) when the monitor stops."""
        self._closers.append(close)

    @property
    def serving(self) -> bool:
        """True once /metrics is bound (always True for a monitor that serves no HTTP)."""
        return self.server is not None or not self._serve_http

    def mark_unavailable(self, key: Key, reason: str, *, expected: bool = False) -> None:
        """A source that cannot exist here: logged once (INFO when `expected`, e.g. no GPU on a CPU host;
        else WARNING), exported as zmon_collector_available 0."""
        log.log(logging.INFO if expected else logging.WARNING, "%s unavailable: %s — continuing without it",
                key_name(key), reason)
        self.store.mark_unavailable(key_name(key), reason)

    def start(self) -> None:
        self.sampler.start()
        if self._serve_http:
            s = self.server_config
            self.server = Server(
                self.http, s.listen.host, s.listen.port, limits=Limits.from_config(s), web_config_file=s.web_config_file
            )
            self.server.start()
            log.info("serving /metrics on %s/metrics", self.server.url)

    def stop(self) -> None:
        """Stop serving and sampling, then run the closers (newest first); idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            if self.server is not None:
                self.server.shutdown()
            self.sampler.shutdown()
            for close in reversed(self._closers):
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
