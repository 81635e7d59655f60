"""The model's storage: where its weights are, evicting them from the page cache, a sequential disk test.

`zmon profile` measures a cold load where it can (the diagnosis judges I/O on it) and the filesystem's own
read speed next to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zmon.analysis.facts import CacheState
from zmon.config import ModelConfig
from zmon.workload.tiny import ensure_builtin, is_builtin

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DISK_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class DiskSpeed:
    """Sequential throughput of one filesystem, bytes per second."""

    read_bytes_per_second: float
    write_bytes_per_second: float
    bytes_tested: int


def local_model_dir(model: ModelConfig) -> Path | None:
    """The directory the weights will be read from, without loading anything (None: not on disk yet)."""
    if is_builtin(model.id):
        return ensure_builtin(model.id, model.cache_dir)  # builds it once, so the load below is a pure read
    path = Path(model.id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download  # lazy: heavy, and only for hub models

        return Path(snapshot_download(model.id, local_files_only=True))
    except Exception:  # not a hub id, or not cached: loading will download it
        return None


def weight_files(model_dir: Path) -> list[Path]:
    """Every weight file under the model directory (symlinks into the hub cache resolved)."""
    out = []
    for p in sorted(model_dir.rglob("*")):
        if p.name.endswith(WEIGHT_SUFFIXES):
            real = p.resolve()
            if real.is_file():
                out.append(real)
    return out


def drop_page_cache(files: Sequence[Path]) -> CacheState:
    """Evict the files from the page cache so the load reads the disk: "cold" when done, else "warm".

    posix_fadvise(DONTNEED) per file needs no privileges (dirty pages are flushed first, since only clean
    pages can be dropped); /proc/sys/vm/drop_caches is the fallback when running as root. Pages another
    process keeps mapped stay resident: the result is best effort.
    """
    if not files:
        return "unknown"
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        try:
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                try:
                    with contextlib.suppress(OSError):
                        os.fsync(fd)
                    fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            return "cold"
        except OSError as e:
            log.debug("posix_fadvise failed: %s", e)
    drop = Path("/proc/sys/vm/drop_caches")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and os.access(drop, os.W_OK):
        try:
            os.sync()
            drop.write_text("1\n")
            return "cold"
        except OSError as e:
            log.debug("drop_caches failed: %s", e)
    return "warm"


def disk_speed_test(directory: Path, nbytes: int) -> DiskSpeed:
    """Write `nbytes` sequentially (fsync included), evict them from the page cache, read them back.

    The temporary file lives in `directory` (so the figure is that filesystem's) and is always removed.
    Raises OSError when the directory is not writable.
    """
    path = directory / f".zmon-disktest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    chunk = os.urandom(min(DISK_CHUNK_BYTES, nbytes))  # incompressible, so compressing filesystems can't cheat
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t0 = time.perf_counter()
        written = 0
        try:
            while written < nbytes:
                view = memoryview(chunk)[: min(len(chunk), nbytes - written)]
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            os.fsync(fd)
            write_seconds = time.perf_counter() - t0
            _fadvise_dontneed(fd)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            _fadvise_dontneed(fd)
            t0 = time.perf_counter()
            read = 0
            while block := os.read(fd, DISK_CHUNK_BYTES):
                read += len(block)
            read_seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return DiskSpeed(
        read_bytes_per_second=read / max(read_seconds, 1e-9),
        write_bytes_per_second=written / max(write_seconds, 1e-9),
        bytes_tested=written,
    )


def _fadvise_dontneed(fd: int) -> None:
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        with contextlib.suppress(OSError):
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
