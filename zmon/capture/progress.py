"""Progress for the long commands (profile, tune): a `\r` bar on a terminal, one line per phase otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A `\\r` text bar on a terminal; one line per phase (start and end) when the stream is not a TTY."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 30, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._label = ""
        self._total = 0
        self._done = 0
        self._started = 0.0

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done, self._started = label, total, 0, time.monotonic()
        if self._tty:
            self._draw()
        else:
            self._write(f"{label}: {total} generation(s)\n")

    def advance(self, seconds: float | None = None) -> None:
        self._done += 1
        if self._tty:
            self._draw(seconds)
        if self._done >= self._total:
            self.finish()

    def _draw(self, seconds: float | None = None) -> None:
        filled = self.width * self._done // max(1, self._total)
        bar = "#" * filled + "." * (self.width - filled)
        last = f"  last {seconds:.3f} s" if seconds is not None else ""
        self._write(f"\r{self._label:<10} [{bar}] {self._done}/{self._total}{last}")

    @property
    def in_progress(self) -> bool:
        """True between start() and the phase's last generation: a phase that stopped short needs finish()."""
        return self._done < self._total

    def finish(self) -> None:
        self._total = self._done  # ended here, short or not
        elapsed = time.monotonic() - self._started
        if self._tty:
            self._write(f"  ({elapsed:.1f} s)\n")
        else:
            self._write(f"{self._label}: done in {elapsed:.1f} s\n")

    def note(self, message: str) -> None:
        self._write(f"{message}\n")
