"""Command line: parses arguments into a Config and runs a mode; the only module that exits the process."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from zmon import __version__
from zmon.config import DEFAULT_LISTEN, Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # invalid arguments or configuration

log = logging.getLogger("zmon")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(cfg: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.logging.level)
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help=f"address for /metrics (default {DEFAULT_LISTEN}; loopback only)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zmon",
        description="Resource profiler and monitoring sidecar for diffusion image-generation services.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    w = sub.add_parser("watch", help="watch a host from outside: NVML + host counters, served as /metrics")
    _add_common(w)
    w.add_argument("--pid", type=int, metavar="PID", help="process to watch as the workload")

    c = sub.add_parser("check-config", help="validate a configuration file; lists every error, exit 2 if any")
    c.add_argument("file", metavar="FILE")

    sub.add_parser("version", help="print the version")
    return parser


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides: dict[str, Any] = dict(extra or {})
    if getattr(args, "listen", None):
        overrides.setdefault("server", {})["listen"] = args.listen
    return load_config(args.config, overrides=overrides)


def cmd_watch(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.pid is not None:
        extra["sampling"] = {"process": {"pid": args.pid}}
    cfg = _load(args, extra)
    setup_logging(cfg)
    from zmon.app import build_watch

    mon = build_watch(cfg)
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


def cmd_check_config(args: argparse.Namespace) -> int:
    from zmon.app import iter_problems

    cfg = load_config(args.file)
    warnings = list(iter_problems(cfg))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{args.file}: OK")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "version":
            print(f"zmon {__version__}")
            return EXIT_OK
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "watch":
            return cmd_watch(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE  # unreachable: parser.error exits


def run() -> None:
    t0 = time.monotonic()
    code = main()
    log.debug("exit %d after %.1fs", code, time.monotonic() - t0)
    sys.exit(code)


if __name__ == "__main__":
    run()
