"""One validation path for every mode: what `zmon check-config`, `run`, `watch`, `profile`, `zmon.attach` and a
SIGHUP reload check beyond the schema, before anything starts or changes.

The schema (zmon.config) checks values; this checks them against the host: the workload files and the
resolutions (zmon.workload.spec), the directories zmon will write (tried with a temporary file, so a
read-only filesystem or a root-owned directory is found at start, not by the first lost image), the files it
will read (web config, tokens, CA bundle), and the watched process. `check-config` runs the checks of every
mode, so what it accepts, `run` and `watch` accept too. Imports no torch (`zmon watch` never loads it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from zmon.config import ENV_PREFIX, Config, ConfigError

Mode = Literal["check-config", "run", "watch", "profile", "attach"]

# What each mode uses, and so checks. check-config checks everything any mode would.
_WORKLOAD_MODES = ("check-config", "run", "profile")
_WRITES_OUTPUT = ("check-config", "run")
_IN_PROCESS = ("check-config", "run", "attach")  # JSONL log, trace directory, alerting, OOM snapshots
_SERVES = ("check-config", "run", "watch", "attach")


@dataclass
class Findings:
    """Problems that stop a start (errors) and ones that do not (warnings), each as 'key.path: message'."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check(cfg: Config, mode: Mode) -> Findings:
    """Every problem `mode` would run into with `cfg`, found without starting anything (or importing torch)."""
    out = Findings()
    out.warnings.extend(cfg.notes)
    if mode in _SERVES:
        _check_server(cfg, out)
        for p in cfg.sampling.disk.paths:
            if not _exists(p):
                out.warnings.append(f"sampling.disk.paths: {p} does not exist (its free space is reported as down)")
        pid = cfg.sampling.process.pid
        if mode in ("watch", "check-config") and pid is not None and not Path(f"/proc/{pid}").exists():
            out.warnings.append(f"sampling.process.pid: no process {pid} now (zmon_process_up 0 until it exists)")
    if mode in _WORKLOAD_MODES:
        from zmon.workload.spec import validate_workload  # torch-free

        out.errors.extend(validate_workload(cfg))
    if mode in _WRITES_OUTPUT and cfg.workload.output_dir is not None:
        _add(out, writable_dir(cfg.workload.output_dir, "workload.output_dir"))
    if mode in _IN_PROCESS:
        w = cfg.workload
        if w.jsonl.path is not None:
            _add(out, appendable_file(w.jsonl.path, "workload.jsonl.path"))
        if w.oom.memory_snapshot_dir is not None:
            _add(out, writable_dir(w.oom.memory_snapshot_dir, "workload.oom.memory_snapshot_dir"))
        if cfg.profiling.trace.enabled:
            _add(out, writable_dir(cfg.profiling.trace.directory, "profiling.trace.directory"))
        _check_alerting(cfg, out)
    if mode in ("profile", "check-config"):
        _add(out, writable_dir(cfg.profiling.output_dir, "profiling.output_dir"))
    out.errors = list(dict.fromkeys(_blame(cfg, e) for e in out.errors))  # once each (two checks may agree)
    out.warnings = list(dict.fromkeys(_blame(cfg, w) for w in out.warnings))
    return out


def _blame(cfg: Config, problem: str) -> str:
    """'key.path: …' → 'ZMON_KEY__PATH: key.path: …' when an environment variable or flag set that key."""
    key = problem.split(":", 1)[0]
    origin = cfg.origin(key) if key and " " not in key else None
    return f"{origin}: {problem}" if origin else problem


def require(cfg: Config, mode: Mode, source: str = "configuration") -> list[str]:
    """check() that raises ConfigError listing every error; returns the warnings. The error's source is the
    environment or the command line when every problem comes from there, not the file."""
    found = check(cfg, mode)
    raise_errors(found, source)
    return found.warnings


def raise_errors(found: Findings, source: str) -> None:
    """Raise ConfigError listing `found.errors`, if any (source: the file, or the environment / command line
    when every error comes from there)."""
    if found.errors:
        keys = [e.split(":", 1)[0] for e in found.errors]
        if all(k.startswith(ENV_PREFIX) for k in keys):
            source = "environment"
        elif all(k.startswith("-") for k in keys):
            source = "command line"
        raise ConfigError(found.errors, source)


# ------------------------------------------------------------------------------------------------ parts


def _check_server(cfg: Config, out: Findings) -> None:
    s = cfg.server
    if s.web_config_file is not None:
        from zmon.server import load_web_config  # no torch; parses and loads certificates

        try:
            load_web_config(s.web_config_file.expanduser())
        except ConfigError as e:
            out.errors.extend(f"server.web_config_file: {e.source}: {p}" for p in e.problems)
    if s.auth.token_file is not None:
        _add(out, readable_file(s.auth.token_file, "server.auth.token_file"))


def _check_alerting(cfg: Config, out: Findings) -> None:
    a = cfg.alerting
    if not a.enabled:
        return
    if a.ca_file is not None:
        _add(out, readable_file(a.ca_file, "alerting.ca_file"))
    if a.bearer_token_file is not None:
        _add(out, readable_file(a.bearer_token_file, "alerting.bearer_token_file"))
    if a.basic_auth is not None:
        _add(out, readable_file(a.basic_auth.password_file, "alerting.basic_auth.password_file"))


def _add(out: Findings, problem: str | None) -> None:
    if problem:
        out.errors.append(problem)


def _exists(p: Path) -> bool:
    try:
        return p.expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _probe(directory: Path) -> str | None:
    """None when a file can be created in `directory` (tried: permissions alone say nothing to root on a
    read-only mount), else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".zmon-write-test-", dir=directory)
    except OSError as e:
        return _reason(e)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def _nearest_existing(p: Path) -> Path:
    for parent in (p, *p.parents):
        if parent.exists():
            return parent
    return Path("/")


def writable_dir(path: Path, key: str) -> str | None:
    """None when `path` is a directory zmon can write into, or can be created (by zmon, at start) in one."""
    try:
        p = path.expanduser()
        if p.exists():
            if not p.is_dir():
                return f"{key}: {p} exists and is not a directory"
            why = _probe(p)
            return f"{key}: cannot write into {p}: {why}" if why else None
        base = _nearest_existing(p)
        if not base.is_dir():
            return f"{key}: cannot create {p}: {base} is not a directory"
        why = _probe(base)
        return f"{key}: {p} does not exist and cannot be created in {base}: {why}" if why else None
    except (OSError, RuntimeError, ValueError) as e:
        return f"{key}: cannot check {path}: {e}"


def appendable_file(path: Path, key: str) -> str | None:
    """None when zmon can append to `path` (an existing file opened for appending, or one it can create in an
    existing directory), else why not. Nothing is written."""
    try:
        p = path.expanduser()
        if p.exists():
            if p.is_dir():
                return f"{key}: {p} is a directory"
            try:
                fd = os.open(p, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                return f"{key}: cannot append to {p}: {_reason(e)}"
            os.close(fd)
            return None
        if not p.parent.is_dir():
            return f"{key}: the directory {p.parent} does not exist (zmon does not create it)"
        why = _probe(p.parent)
        return f"{key}: cannot create {p}: {why}" if why else None
    except (OSError, RuntimeError, ValueError) as e:
        return f"{key}: cannot check {path}: {e}"


def readable_file(path: Path, key: str) -> str | None:
    """None when `path` is a file zmon can read."""
    try:
        p = path.expanduser()
        if not p.exists():
            return f"{key}: {p} does not exist"
        if p.is_dir():
            return f"{key}: {p} is a directory"
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            return f"{key}: cannot read {p}: {_reason(e)}"
        return None
    except (OSError, RuntimeError, ValueError) as e:
        return f"{key}: cannot check {path}: {e}"


def format_problems(problems: Iterable[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)
