"""Command line: parses arguments into a Config and runs a mode; the only module that exits the process."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zmon.config import DEFAULT_LISTEN, MAX_PID, Config, ConfigError, ModelConfig, load_config
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.version import __version__

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
    """Logging as `cfg.logging` says (also applied again by a SIGHUP reload)."""
    handler = logging.StreamHandler(sys.stderr)
    if cfg.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.logging.level)
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))


def _printable(text: str) -> str:
    """`text` as stdout can print it: a file name from argv may hold bytes that are not UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help=f"address for /metrics (default {DEFAULT_LISTEN}; loopback only)"
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="exporter-toolkit web configuration (TLS, basic auth, headers), as node_exporter takes "
        "(server.web_config_file)",
    )


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    if n > 10**12:
        raise argparse.ArgumentTypeError(f"expected at most 10**12, got {value!r}")
    return n


def _pid(value: str) -> int:
    n = _positive_int(value)
    if n > MAX_PID:
        raise argparse.ArgumentTypeError(f"expected a process id (1..{MAX_PID}), got {n}")
    return n


def _seconds(value: str, *, zero: bool) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    limit = 7 * 86400.0
    if not math.isfinite(x) or x < 0 or (x == 0 and not zero) or x > limit:
        lower = ">= 0" if zero else "> 0"
        raise argparse.ArgumentTypeError(f"expected seconds {lower} and at most {limit:g} (a week), got {value!r}")
    return x


def _non_negative_seconds(value: str) -> float:
    return _seconds(value, zero=True)


def _positive_seconds(value: str) -> float:
    return _seconds(value, zero=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zmon",
        description="Resource profiler and monitoring sidecar for diffusion image-generation services.",
    )
    parser.add_argument("--version", action="version", version=f"zmon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    w = sub.add_parser("watch", help="watch a host from outside: NVML + host counters, served as /metrics")
    _add_common(w)
    w.add_argument("--pid", type=_pid, metavar="PID", help="process to watch as the workload")

    r = sub.add_parser("run", help="load a pipeline, generate a workload and serve its per-stage metrics")
    _add_common(r)
    r.add_argument(
        "--max-generations",
        type=_positive_int,
        metavar="N",
        help="stop after N generations and exit 0 (default: workload.max_generations; unset = forever)",
    )
    r.add_argument(
        "--linger",
        type=_non_negative_seconds,
        default=0.0,
        metavar="SECONDS",
        help="after the last generation keep serving /metrics this long, so a final scrape sees the totals",
    )

    _add_profiling_parsers(sub)
    _add_tune_parser(sub)

    _add_probe_parsers(sub)

    c = sub.add_parser(
        "check-config",
        help="validate a configuration file (with the ZMON_ environment) as `zmon run` and `zmon watch` would: "
        "the files and directories it names too; lists every error, exit 2 if any",
    )
    c.add_argument("file", metavar="FILE")

    sub.add_parser("version", help="print the version")
    return parser


# Flags that override configuration keys: errors in their values name the flag, not the file.
FLAGS = {
    "server.listen": "--listen",
    "server.web_config_file": "--web.config.file",
    "sampling.process.pid": "--pid",
    "workload.max_generations": "--max-generations",
    "profiling.runs": "--runs",
    "profiling.warmup": "--warmup",
    "profiling.output_dir": "--out",
}


def _read(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """The file, the ZMON_ environment and the flags, validated (raises ConfigError); run again on SIGHUP."""
    overrides: dict[str, Any] = dict(extra or {})
    if getattr(args, "listen", None):
        overrides.setdefault("server", {})["listen"] = args.listen
    if getattr(args, "web_config_file", None):
        overrides.setdefault("server", {})["web_config_file"] = args.web_config_file
    flags = {path: flag for path, flag in FLAGS.items() if _has(overrides, path.split("."))}
    return load_config(args.config, overrides=overrides, flags=flags)


def _has(tree: Any, path: list[str]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _load(args: argparse.Namespace, mode: Any, extra: dict[str, Any] | None = None) -> tuple[Config, list[str]]:
    """_read, then the checks of zmon.app.checks for `mode` (the same ones check-config and a reload make):
    every error at once as a ConfigError (exit 2, before anything starts); returns the warnings."""
    from zmon.app.checks import require  # torch-free

    cfg = _read(args, extra)
    return cfg, require(cfg, mode, args.config or "configuration")


def _source(args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    from zmon.app.reload import ConfigSource

    return ConfigSource(lambda: _read(args, extra), args.config or "configuration (environment)", setup_logging)


def _start_logging(cfg: Config, warnings: list[str]) -> None:
    setup_logging(cfg)
    for w in warnings:
        log.warning("config: %s", w)


def cmd_watch(args: argparse.Namespace) -> int:
    from zmon.app.reload import hold_sighup

    hold_sighup()  # first: a SIGHUP from now on asks for a reload instead of ending the process
    extra: dict[str, Any] = {}
    if args.pid is not None:
        extra["sampling"] = {"process": {"pid": args.pid}}
    cfg, warnings = _load(args, "watch", extra)
    _start_logging(cfg, warnings)
    from zmon.app.watch import watch_main  # lazy: each command imports only what it runs

    return watch_main(cfg, _source(args, extra))


def _export_alloc_conf(cfg: Config) -> bool:
    """model.alloc_conf → PYTORCH_CUDA_ALLOC_CONF before anything imports torch; False (printed) if refused."""
    from zmon.workload.alloc_conf import ModelOptionsError, export_alloc_conf  # torch-free

    try:
        export_alloc_conf(cfg.model.alloc_conf)
    except ModelOptionsError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    from zmon.app.reload import hold_sighup

    hold_sighup()  # first: a SIGHUP during the model load is queued for the first reload
    extra: dict[str, Any] = {}
    if args.max_generations is not None:
        extra["workload"] = {"max_generations": args.max_generations}
    cfg, warnings = _load(args, "run", extra)  # torch-free: every problem is reported before any load
    _start_logging(cfg, warnings)
    if not _export_alloc_conf(cfg):
        return EXIT_USAGE
    if cfg.model.devices is not None:
        from zmon.app.workers.parent import run_workers_main  # lazy: the workers import torch, the parent need not

        return run_workers_main(cfg, linger_seconds=max(0.0, args.linger), source=_source(args, extra))
    from zmon.app.run import run_main  # lazy: imports torch / diffusers

    return run_main(cfg, linger_seconds=args.linger, source=_source(args, extra))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Everything `run`, `watch` and `profile` check before starting, on one file (and the environment)."""
    cfg = load_config(args.file)
    from zmon.app.checks import check, raise_errors

    found = check(cfg, "check-config")
    for w in found.warnings:
        print(f"warning: {w}", file=sys.stderr)
    raise_errors(found, args.file)  # ConfigError listing every error: exit 2
    print(f"{_printable(args.file)}: OK")
    return EXIT_OK


# --- zmon profile / compare / diagnose ---------------------------------------------------------------------


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {n}")
    return n


def _add_profiling_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure the configured pipeline (I/O, stages, GPU/CPU use, memory), diagnose, write reports",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    p.add_argument("--runs", type=_positive_int, metavar="N", help="measured generations (profiling.runs)")
    p.add_argument(
        "--warmup", type=_non_negative_int, metavar="K", help="generations left out first (profiling.warmup)"
    )
    p.add_argument("--out", metavar="DIR", help="report directory (profiling.output_dir)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="then trace 2 generations with torch.profiler: DIR/trace.json (Chrome) and DIR/tb/ (TensorBoard)",
    )
    p.add_argument(
        "--memory-snapshot",
        action="store_true",
        help="then record 2 generations of CUDA allocator history: DIR/memory_snapshot.pickle (CUDA only)",
    )

    c = sub.add_parser("compare", help="compare two profile.json files: verdict change and figure deltas")
    c.add_argument("before", metavar="BEFORE.json")
    c.add_argument("after", metavar="AFTER.json")
    c.add_argument("--changed-only", action="store_true", help="list only figures that changed")

    d = sub.add_parser("diagnose", help="print the live verdict and active findings of a running zmon")
    d.add_argument("--url", required=True, metavar="URL", help="the daemon's base URL, e.g. http://127.0.0.1:8739")
    d.add_argument("--timeout", type=_positive_seconds, default=5.0, metavar="SECONDS", help="HTTP timeout (default 5)")


def cmd_profile(args: argparse.Namespace) -> int:
    prof: dict[str, Any] = {}
    if args.runs is not None:
        prof["runs"] = args.runs
    if args.warmup is not None:
        prof["warmup"] = args.warmup
    if args.out is not None:
        prof["output_dir"] = args.out
    cfg, warnings = _load(args, "profile", {"profiling": prof} if prof else None)  # before any load
    _start_logging(cfg, warnings)
    if not _export_alloc_conf(cfg):
        return EXIT_USAGE
    out = cfg.profiling.output_dir.expanduser()
    from zmon.app.profile import profile_main  # lazy: imports torch / diffusers

    return profile_main(cfg, out_dir=out, trace=args.trace, memory_snapshot=args.memory_snapshot)


def cmd_compare(args: argparse.Namespace) -> int:
    from zmon.analysis.compare import compare_profiles, render_comparison
    from zmon.analysis.report import load_profile

    profiles = []
    for path in (args.before, args.after):
        try:
            profiles.append(load_profile(path))
        except OSError as e:
            print(f"error: {path}: cannot read: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: {path}: not a zmon profile.json: {e}", file=sys.stderr)
            return EXIT_USAGE
    print(render_comparison(compare_profiles(profiles[0], profiles[1]), changed_only=args.changed_only), end="")
    return EXIT_OK


def cmd_diagnose(args: argparse.Namespace) -> int:
    from zmon.analysis.live import render_live
    from zmon.app.client import DiagnosisUnavailable, diagnosis_url, fetch_diagnosis

    try:
        url = diagnosis_url(args.url)
    except ValueError as e:
        print(f"error: --url: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        doc = fetch_diagnosis(url, timeout=args.timeout)
    except DiagnosisUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(render_live(doc), end="")
    return EXIT_OK


# --- zmon tune ------------------------------------------------------------------------------------------------


def _add_tune_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tune",
        help="try the speed fixes (compile, attention backends, prompt cache, ...) on the configured pipeline, "
        "time them fairly, check outputs, write the fastest proven configuration",
    )
    t.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    t.add_argument(
        "--variants",
        metavar="LIST",
        help="comma-separated variant names (default: all but compile_max_autotune); 'attention' = torch's "
        "attention backends; --variants help lists them",
    )
    t.add_argument(
        "--runs",
        type=_positive_int,
        default=6,
        metavar="N",
        help="measured generations per configuration, split over the rounds (default 6)",
    )
    t.add_argument("--rounds", type=_positive_int, default=3, metavar="R", help="interleaved timing rounds (default 3)")
    t.add_argument("--out", metavar="DIR", default="zmon-tune", help="report directory (default zmon-tune)")
    t.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="wall-clock budget; phases that would not fit are skipped and listed",
    )
    t.add_argument(
        "--allow-lossy",
        action="store_true",
        help="let lossy winners (fp8, fewer_steps) into the combination and the snippet",
    )
    t.add_argument(
        "--max-warmup",
        type=_positive_int,
        default=12,
        metavar="N",
        help="warm-up generations at most per configuration (default 12)",
    )
    t.add_argument(
        "--min-psnr",
        type=float,
        metavar="DB",
        help="PSNR exact variants must reach against the baseline (default: 30 dB bf16/fp16, 60 float32)",
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from zmon.tune.names import parse_variants, valid_variant_names

    if args.variants is not None and args.variants.strip() in ("help", "list"):
        print("\n".join(valid_variant_names()))
        return EXIT_OK
    names, problems = parse_variants(args.variants)
    cfg = _read(args)
    setup_logging(cfg)
    from zmon.workload.spec import validate_workload  # torch-free: problems are reported before any load

    problems += validate_workload(cfg)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        problems.append(f"--out: {out} exists and is not a directory")
    if args.max_seconds is not None and args.max_seconds <= 0:
        problems.append(f"--max-seconds: must be > 0, got {args.max_seconds}")
    if args.min_psnr is not None and args.min_psnr <= 0:
        problems.append(f"--min-psnr: must be > 0 dB, got {args.min_psnr}")
    if problems:
        print(f"error: {len(problems)} error(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        if any(p.startswith("unknown variant") for p in problems):
            print(f"valid variants: {', '.join(valid_variant_names())}", file=sys.stderr)
        return EXIT_USAGE
    if not _export_alloc_conf(cfg):
        return EXIT_USAGE
    from zmon.app.tune import tune_main  # lazy: imports torch / diffusers
    from zmon.tune.measure import WarmupRule
    from zmon.tune.runner import TuneOptions

    options = TuneOptions(
        runs=args.runs,
        rounds=args.rounds,
        max_seconds=args.max_seconds,
        allow_lossy=args.allow_lossy,
        warmup=WarmupRule(max_runs=args.max_warmup),
        min_psnr_db=args.min_psnr,
    )
    return tune_main(cfg, names, options, out_dir=out)


# --- zmon probe interconnect ---------------------------------------------------------------------------------

_SIZE_SUFFIXES = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "GIB": 1024**3,
}


def _size(value: str) -> int:
    """'64', '4K', '16MiB', '1G' → bytes (binary multiples)."""
    text = value.strip().upper()
    digits = text.rstrip("BKMGI")
    suffix = text[len(digits) :]
    try:
        n = int(digits) * _SIZE_SUFFIXES[suffix]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 64K, 16M or 1G, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {value!r}")
    return n


def _add_probe_parsers(sub: Any) -> None:
    p = sub.add_parser("probe", help="measure the hardware zmon runs on")
    kinds = p.add_subparsers(dest="probe", metavar="WHAT", required=True)
    i = kinds.add_parser(
        "interconnect",
        help="all_reduce / all_gather bus bandwidth and latency between the local GPUs (as nccl-tests computes "
        "them), against the link's nominal bandwidth",
    )
    i.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (model.devices is the default)")
    i.add_argument(
        "--devices",
        metavar="LIST",
        help='CUDA devices "0,1", "auto" (every visible one) or "cpu:N" (gloo, for a check without GPUs); '
        "default: model.devices, else auto",
    )
    i.add_argument("--backend", metavar="NAME", help="nccl (default on CUDA) or gloo (default on the CPU)")
    i.add_argument("--ops", default="all_reduce,all_gather", metavar="LIST", help="default: all_reduce,all_gather")
    i.add_argument("--min-bytes", type=_size, default=1024, metavar="SIZE", help="smallest message (default 1K)")
    i.add_argument("--max-bytes", type=_size, default=1024**3, metavar="SIZE", help="largest message (default 1G)")
    i.add_argument("--factor", type=_positive_int, default=4, metavar="N", help="size step (default ×4)")
    i.add_argument("--iters", type=_positive_int, default=20, metavar="N", help="timed calls per size (default 20)")
    i.add_argument("--warmup", type=_non_negative_int, default=5, metavar="N", help="untimed calls first (default 5)")
    i.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="rendezvous and collective timeout (default 300)",
    )
    i.add_argument("--out", metavar="FILE.json", help="also write the figures as JSON")


def cmd_probe(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    setup_logging(cfg)
    devices: Any = cfg.model.devices if cfg.model.devices is not None else "auto"
    if args.devices is not None:
        text = args.devices.strip()
        devices = [part.strip() for part in text.split(",")] if "," in text or text.isdigit() else text
        devices = (
            [int(d) if isinstance(d, str) and d.isdigit() else d for d in devices]
            if isinstance(devices, list)
            else devices
        )
        try:
            devices = ModelConfig.model_validate({"devices": devices}).devices
        except ValueError as e:  # pydantic's ValidationError
            print(f"error: --devices: {_first_error(e)}", file=sys.stderr)
            return EXIT_USAGE
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    from zmon.app.probe import ProbeOptions, probe_main  # lazy: imports torch in the ranks' parent

    options = ProbeOptions(
        devices=devices,
        backend=args.backend,
        ops=ops,
        min_bytes=args.min_bytes,
        max_bytes=args.max_bytes,
        factor=args.factor,
        iters=args.iters,
        warmup=args.warmup,
        timeout_seconds=args.timeout,
    )
    return probe_main(options, out=Path(args.out) if args.out else None, stdout=sys.stdout, stderr=sys.stderr)


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    return str(errors()[0]["msg"]) if callable(errors) else str(e)


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
        if args.command == "run":
            return cmd_run(args)
        if args.command == "profile":
            return cmd_profile(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "diagnose":
            return cmd_diagnose(args)
        if args.command == "tune":
            return cmd_tune(args)
        if args.command == "probe":
            return cmd_probe(args)
    except ConfigError as e:
        print(f"error: {_printable(str(e))}", file=sys.stderr)
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
