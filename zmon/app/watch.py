"""`zmon watch`: NVML and host counters from outside the workload, served as /metrics. Never imports torch.

SIGTERM/SIGINT stop it; SIGHUP reloads the configuration (zmon.app.reload): sources and their intervals,
the listen address, serving limits, the web config file, the control token and logging apply live.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.app.monitor import Monitor
from zmon.app.reload import ConfigSource, Plan, Reloader, monitor_reloader
from zmon.app.sources import install_sources
from zmon.config import Config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK
from zmon.systemd import SystemdHandle, attach_systemd

log = logging.getLogger(__name__)

# What `zmon watch` applies on SIGHUP; it uses no other section (model, workload, profiling, policy, alerting).
WATCH_PLAN = Plan(restart=(), live=("server", "sampling", "logging"))


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
    install_sources(mon, cfg.sampling, watched_pid=cfg.sampling.process.pid, nvml=nvml, psutil_module=psutil_module)
    return mon


def watch_reloader(
    mon: Monitor,
    cfg: Config,
    source: ConfigSource,
    *,
    systemd: SystemdHandle | None = None,
    nvml: Any | None = None,
    psutil_module: Any | None = None,
) -> Reloader:
    """The SIGHUP reloader of a watch monitor (its state exported as zmon_config_*)."""
    return monitor_reloader(
        mon,
        cfg,
        source,
        mode="watch",
        plan=WATCH_PLAN,
        rebuild_sources=lambda sampling: install_sources(
            mon, sampling, watched_pid=sampling.process.pid, nvml=nvml, psutil_module=psutil_module
        ),
        systemd=systemd,
    )


def watch_main(cfg: Config, source: ConfigSource | None = None) -> int:
    """The body of `zmon watch`: serve until SIGTERM/SIGINT, reload on SIGHUP; exit 1 when the port cannot be
    bound."""
    mon = build_watch(cfg)
    sd = attach_systemd(mon)  # READY / WATCHDOG under systemd Type=notify; a no-op elsewhere
    reloader = watch_reloader(mon, cfg, source or ConfigSource(lambda: cfg), systemd=sd)
    mon.install_signal_handlers()
    try:
        mon.start()
    except OSError as e:
        log.error("cannot listen on %s: %s", cfg.server.listen, e)
        mon.stop()
        return EXIT_FAILURE
    reloader.start()
    try:
        while not mon.wait(1.0):
            pass
    finally:
        reloader.stop()
    return EXIT_OK
