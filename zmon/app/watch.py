"""`zmon watch`: NVML and host counters from outside the workload, served as /metrics. Never imports torch.

SIGTERM/SIGINT stop it; SIGHUP reloads the configuration (zmon.app.reload): sources and their intervals,
the listen address, serving limits, the web config file, the control token and logging apply live.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from zmon.app.monitor import Monitor
from zmon.app.reload import ConfigSource, Plan, Reloader, hold_sighup
from zmon.app.sources import install_sources
from zmon.collectors.reload import ReloadCollector, ReloadState
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

    def apply(old: Config, new: Config, live: list[str]) -> None:
        server = mon.prepare_server(new.server)  # may raise: nothing has changed yet
        mon.configure_sampling(new.sampling)
        rebuilt = install_sources(
            mon, new.sampling, watched_pid=new.sampling.process.pid, nvml=nvml, psutil_module=psutil_module
        )
        if rebuilt:
            log.info("sources rebuilt: %s", ", ".join(rebuilt))
        mon.commit_server(new.server, server)
        if source.apply_logging is not None and new.logging != old.logging:
            source.apply_logging(new)

    state = ReloadState()
    mon.add_collector("config", ReloadCollector(state))
    return Reloader(
        cfg,
        source,
        mode="watch",
        plan=WATCH_PLAN,
        apply=apply,
        state=state,
        requests=hold_sighup(),
        lock=mon.lock,
        stopped=lambda: mon.wait(0),
        **systemd_hooks(systemd),
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


def systemd_hooks(sd: SystemdHandle | None) -> dict[str, Any]:
    """Reloader hooks telling systemd about a reload: RELOADING=1 … READY=1 with a STATUS line (what
    `systemctl reload` waits for with Type=notify-reload, harmless with Type=notify)."""
    if sd is None:
        return {}
    return {"on_reloading": sd.reloading, "on_reloaded": lambda ok, summary: sd.reloaded(summary)}
