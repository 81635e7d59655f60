"""`zmon watch`: NVML and host counters from outside the workload, served as /metrics. Never imports torch."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.app.monitor import Monitor
from zmon.app.sources import add_host_sources, add_nvml_sources
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK
from zmon.systemd import attach_systemd

log = logging.getLogger(__name__)


def build_watch(
    cfg: Config,
    *,
    nvml: Any | None = None,
    psutil_module: Any | None = None,
    registry: CollectorRegistry | None = None,
    serve_http: bool = True,
) -> Monitor:
    """The watch monitor: NVML + host sources; the process source when `sampling.process.pid` is set."""
    mon = Monitor(cfg.sampling, cfg.server, mode="watch", registry=registry, serve_http=serve_http)
    pid = cfg.sampling.process.pid
    add_nvml_sources(mon, cfg.sampling.nvml, watched_pid=pid, nvml=nvml)
    add_host_sources(mon, cfg.sampling, watched_pid=pid, psutil_module=psutil_module)
    return mon


def watch_main(cfg: Config) -> int:
    """The body of `zmon watch`: serve until SIGTERM/SIGINT; exit 1 when the port cannot be bound."""
    mon = build_watch(cfg)
    attach_systemd(mon)  # READY / WATCHDOG under systemd Type=notify; a no-op elsewhere
    mon.install_signal_handlers()
    try:
        mon.start()
    except OSError as e:
        log.error("cannot listen on %s: %s", cfg.server.listen, e)
        mon.stop()
        return EXIT_FAILURE
    while not mon.wait(1.0):
        pass
    return EXIT_OK
