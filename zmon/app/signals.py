"""SIGTERM / SIGINT for the long-running modes: the first signal asks for a graceful stop, a second one interrupts."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event, doing: str) -> dict[int, Any]:
    """On SIGTERM or SIGINT set `stop` and log "<SIGNAL>: <doing>"; when `stop` is already set, raise
    KeyboardInterrupt. Returns the previous handlers for `restore_handlers` (none off the main thread, where
    Python allows no signal handlers)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("%s: %s", signal.Signals(signum).name, doing)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def linger(stop: threading.Event, seconds: float) -> None:
    """After the work is done, keep serving /metrics for `seconds` (--linger) unless a stop signal came or comes."""
    if seconds > 0 and not stop.is_set():
        log.info("done; serving /metrics for %.0fs more (SIGTERM to stop now)", seconds)
        stop.wait(seconds)
