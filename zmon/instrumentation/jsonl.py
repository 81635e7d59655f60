"""Per-generation JSONL log, size-rotated; each line whole or not at all; failures are counted, never raised."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from zmon.instrumentation.records import GenerationRecord

log = logging.getLogger(__name__)

# Spans summed per stage; the denoise total is the sum of its steps.
_STAGE_KEYS = (
    ("text_encode", "text_encode"),
    ("vae_encode", "vae_encode"),
    ("denoise", "denoise_step"),
    ("vae_decode", "vae_decode"),
    ("postprocess", "postprocess"),
)


def record_to_dict(record: GenerationRecord, *, model: str) -> dict[str, Any]:
    """The JSONL fields of one generation. Prompt length only: prompt text never leaves the process."""
    present = {s.stage for s in record.stages}
    stages: dict[str, float | None] = {
        key: (record.stage_seconds(stage) if stage in present else None) for key, stage in _STAGE_KEYS
    }
    ts = dt.datetime.fromtimestamp(record.started_at, tz=dt.timezone.utc)
    out: dict[str, Any] = {
        "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "unix": round(record.started_at, 6),
        "status": record.status,
        "error": _error_kind(record.error),
        "model": model,
        "device": record.device,
        "total_seconds": record.total_seconds,
        "stage_seconds": stages,
        "step_seconds": record.step_seconds(),
        "steps": record.steps,
        "width": record.width,
        "height": record.height,
        "batch_size": record.batch_size,
        "prompt_chars": record.prompt_chars,
        "guidance_scale": record.guidance_scale,
        "cfg": record.cfg_active,
        "peak_allocated_bytes": record.peak_allocated_bytes,
        "peak_reserved_bytes": record.peak_reserved_bytes,
        "prompt_cache_hit": record.prompt_cache_hit,
        "text_tokens": record.text_tokens,
        "compiles": record.compiles,
        "timing_method": record.timing_method,
    }
    if record.communication is not None:  # multi-GPU pipelines only: single-GPU lines keep their shape
        spans = {c.stage for c in record.communication}
        out["communication_seconds"] = {
            key: record.communication_seconds(stage)
            for key, stage in (*_STAGE_KEYS, ("other", "other"))
            if stage in spans
        }
        out["step_communication_seconds"] = record.step_communication_seconds()
        out["world_size"] = record.world_size
    return out


def _error_kind(error: str | None) -> str | None:
    """The exception type only: a message may quote user input (the prompt), which must not be logged."""
    if not error:
        return None
    head = error.split(":", 1)[0].strip()
    return head if head.replace(".", "").replace("_", "").isalnum() else "error"


class JsonlLog:
    """Appends one JSON line per generation to `path`, rotating to path.1 … path.N past `max_bytes`.

    The file is opened with O_APPEND and each line goes out in a single os.write, so concurrent writers
    (threads, or processes sharing the file: a host service whose worker processes each attach zmon) never
    interleave inside a line. Writers that share the file also share its rotation and repair: each write,
    rotation and tail repair holds an advisory lock (flock) on the file, and a writer whose open file was
    rotated away by another follows the path to the new file instead of appending to a backup. A failing
    write (disk full, permission, missing directory, path is a directory) is counted in `failures` and logged
    once per streak of failures; it never reaches the generation. The file is reopened on the next write.

    Lines are all or nothing. A write that fits only partly (the disk fills mid-line) is cut back off at
    once. A line torn by something zmon cannot catch (kill -9 or a power cut in the middle of a write) is
    cut off the next time the file is opened (at start, and after any failed write), with a log line: no
    line is ever glued to a partial one. Readers never see more than the lines' own bytes.
    """

    def __init__(self, path: str | Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 5) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        self.path = Path(path).expanduser()
        self.max_bytes = max_bytes
        self.backups = backups
        self.failures = 0
        self.lines_written = 0
        self.torn_bytes_cut = 0  # bytes of partial lines removed (interrupted or partial writes)
        self._fd: int | None = None
        self._failing = False
        self._lock = threading.Lock()

    def open(self) -> bool:
        """Open the file now (at start-up), so a torn tail left by the last run is cut before the first
        generation; False when it cannot be opened (the first write then counts the failure)."""
        with self._lock:
            try:
                self._open()
            except OSError:
                self._close_fd()
                return False
            return True

    def write(self, record: GenerationRecord, *, model: str) -> bool:
        """Append one record; True on success. Never raises."""
        try:
            line = (json.dumps(record_to_dict(record, model=model), separators=(",", ":")) + "\n").encode()
        except Exception as e:  # a bad record is a bug, but not one that may break the generation
            return self._failed(f"cannot serialise record: {e}")
        return self.write_line(line)

    def write_line(self, line: bytes) -> bool:
        with self._lock:
            try:
                fd = self._open_current()
                try:
                    size = os.fstat(fd).st_size  # fstat, not a counter: another process may append to the file
                    if size > 0 and size + len(line) > self.max_bytes:
                        self._rotate()  # closes fd (releasing its lock) once the file is moved
                        fd = self._open_current()
                        size = os.fstat(fd).st_size
                    n = os.write(fd, line)
                    if n != len(line):
                        self._cut_partial(fd, size, n)
                        raise OSError(errno.ENOSPC, f"short write: {n} of {len(line)} bytes (disk full?), cut off")
                finally:
                    if self._fd == fd:
                        _unlock(fd)
            except OSError as e:
                self._close_fd()
                return self._failed(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
            self.lines_written += 1
            if self._failing:
                self._failing = False
                log.info("JSONL log %s writable again after %d failed write(s)", self.path, self.failures)
            return True

    def _failed(self, reason: str) -> bool:
        self.failures += 1
        if not self._failing:
            self._failing = True
            log.warning("cannot write JSONL log %s (%s); counting failures until it recovers", self.path, reason)
        return False

    def _open(self) -> int:
        if self._fd is None:
            # Read access too: the tail is checked (pread) and a torn one cut (ftruncate) at each open.
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(self.path, flags, 0o644)
            except PermissionError:  # a file we may append to but not read: no repair, still a log
                fd = os.open(self.path, flags & ~os.O_RDWR | os.O_WRONLY, 0o644)
            self._fd = fd
            self._repair(fd)
        return self._fd

    def _open_current(self) -> int:
        """The open file, locked, and still the one at `path`: when another writer rotated it away while
        this one held it open, the file at `path` now is reopened (and repaired) instead."""
        for _ in range(8):  # a rotation per pass: only a storm of other writers could use them all
            fd = self._open()
            _lock(fd)
            if not self._rotated_away(fd):
                return fd
            _unlock(fd)
            self._close_fd()
        return self._open()  # (unlocked) the line still goes to the file at path, whole

    def _rotated_away(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:  # renamed away and no new file yet: reopen creates it
            return True
        return (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino)

    def _repair(self, fd: int) -> None:
        """Cut a torn last line (one that does not end in a newline) back to the end of the last whole line."""
        _lock(fd)
        try:
            self._repair_locked(fd)
        finally:
            _unlock(fd)

    def _repair_locked(self, fd: int) -> None:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or os.pread(fd, 1, st.st_size - 1) == b"\n":
                return
            end = st.st_size
            keep = 0
            while end > 0:  # back to the last newline, 64 KiB at a time
                start = max(0, end - 65536)
                chunk = os.pread(fd, end - start, start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                end = start
            os.ftruncate(fd, keep)
        except OSError as e:  # not readable (write-only open), or the filesystem refuses: leave it
            log.debug("JSONL log %s: cannot check its last line: %s", self.path, e)
            return
        cut = st.st_size - keep
        self.torn_bytes_cut += cut
        log.warning(
            "JSONL log %s: cut a torn last line (%d bytes) left by an interrupted write; whole lines kept: %d bytes",
            self.path,
            cut,
            keep,
        )

    def _cut_partial(self, fd: int, size_before: int, written: int) -> None:
        """Undo a short write, if the file holds exactly what was there plus our partial bytes (else another
        writer appended meanwhile: the next open cuts the torn tail instead)."""
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and written > 0 and st.st_size == size_before + written:
                os.ftruncate(fd, size_before)
                self.torn_bytes_cut += written
        except OSError as e:
            log.debug("JSONL log %s: cannot cut a partial line: %s", self.path, e)

    def _rotate(self) -> None:
        """Shift the backups and move the file to path.1 (or empty it), while still holding the file's lock;
        then close it."""
        try:
            if self.backups == 0:
                os.truncate(self.path, 0)
                return
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close_fd()


def _lock(fd: int) -> None:
    """An exclusive advisory lock on the file between zmon writers; where the filesystem has none, writes go
    on unlocked (each line is still one O_APPEND write)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
