"""`zmon probe interconnect`: spawn one rank per device, time all_reduce / all_gather over a range of sizes,
compare the bus bandwidth with the link's nominal figure, print a table and write JSON.

The ranks (zmon.capture.interconnect.run_rank) rendezvous through a file store in a private temporary
directory; each gets MULTICAST_OFF in its environment (NVLink multicast stays off, see
zmon.app.workers.protocol). The nominal bandwidth comes from NVML (active NVLinks × link speed, each
direction, the slowest participating GPU) where the GPUs report NVLink, else from a table of known cards by
name; on the CPU (gloo) there is none.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from zmon.app.workers.protocol import MULTICAST_OFF, Placement
from zmon.app.workers.supervisor import DevicePlanError, plan_devices
from zmon.capture.interconnect import (
    BACKENDS,
    OPS,
    Nominal,
    Op,
    ProbeResult,
    RankResult,
    RankSpec,
    measurements,
    message_sizes,
    render_table,
    run_rank,
)
from zmon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from zmon.providers.base import SourceUnavailable
from zmon.providers.nvml import GpuSample, NvmlProvider

log = logging.getLogger(__name__)

# Per-GPU NVLink bandwidth each direction (bytes/s) of known cards, for when NVML cannot tell: links × 25 GB/s
# (NVLink 2-4) or × 50 GB/s (NVLink 5). Matched as substrings of the NVML / CUDA card name, first match wins.
NOMINAL_NVLINK: tuple[tuple[str, float], ...] = (
    ("GB200", 900e9),
    ("B200", 900e9),
    ("H200 NVL", 450e9),
    ("H200", 450e9),
    ("H100 NVL", 300e9),
    ("H100 PCIe", 0.0),  # no NVLink on the plain PCIe card (bridges are optional)
    ("H100", 450e9),
    ("A100-SXM", 300e9),
    ("A100 80GB PCIe", 0.0),
    ("V100-SXM2", 150e9),
)


class ProbeError(ValueError):
    """Bad input for the probe (exit 2): one device, an unknown backend, a backend the devices cannot use."""


@dataclass(frozen=True)
class ProbeOptions:
    devices: tuple[int, ...] | str = "auto"  # as model.devices: [0, 1], "auto", "cpu:N"
    backend: str | None = None  # None: nccl on CUDA, gloo on the CPU
    ops: tuple[Op, ...] = OPS
    min_bytes: int = 1024
    max_bytes: int = 1 << 30
    factor: int = 4
    iters: int = 20
    warmup: int = 5
    timeout_seconds: float = 300.0


def plan(options: ProbeOptions) -> tuple[list[Placement], str]:
    """The ranks and the backend, or ProbeError with the reason."""
    try:
        placements = plan_devices(options.devices)
    except DevicePlanError as e:
        raise ProbeError(str(e)) from None
    if len(placements) < 2:
        raise ProbeError(
            f"an interconnect needs at least 2 devices, got {len(placements)} ({placements[0].label}); "
            "pass --devices 0,1 (or cpu:2 for a CPU check)"
        )
    on_cuda = placements[0].cuda_index is not None
    backend = options.backend or ("nccl" if on_cuda else "gloo")
    if backend not in BACKENDS:
        raise ProbeError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
    if backend == "nccl" and not on_cuda:
        raise ProbeError("the nccl backend needs CUDA devices; use --backend gloo with cpu:N")
    if options.iters < 1 or options.warmup < 0:
        raise ProbeError("--iters must be >= 1 and --warmup >= 0")
    for op in options.ops:
        if op not in OPS:
            raise ProbeError(f"unknown operation {op!r}: use {', '.join(OPS)}")
    try:
        message_sizes(options.min_bytes, options.max_bytes, options.factor, ranks=len(placements))
    except ValueError as e:
        raise ProbeError(f"sizes: {e}") from None
    return placements, backend


def probe(options: ProbeOptions, *, nvml: Any | None = None) -> ProbeResult:
    """Run the probe (raises ProbeError for bad input, RuntimeError when a rank fails)."""
    placements, backend = plan(options)
    n = len(placements)
    sizes = tuple(message_sizes(options.min_bytes, options.max_bytes, options.factor, ranks=n))
    ctx = multiprocessing.get_context("spawn")
    results: queue.Queue[RankResult] = ctx.Queue()  # type: ignore[assignment]
    os.environ.update(MULTICAST_OFF)  # inherited by the spawned ranks
    with tempfile.TemporaryDirectory(prefix="zmon-probe-") as tmp:
        specs = [
            RankSpec(
                rank=r,
                ranks=n,
                backend=backend,
                device=p.device,
                cuda_index=p.cuda_index,
                init_method=f"file://{Path(tmp) / 'store'}",
                ops=options.ops,
                sizes=sizes,
                iters=options.iters,
                warmup=options.warmup,
                timeout_seconds=options.timeout_seconds,
            )
            for r, p in enumerate(placements)
        ]
        procs = [
            ctx.Process(target=_rank_entry, args=(spec, results), name=f"zmon-probe-{spec.rank}") for spec in specs
        ]
        for proc in procs:
            proc.start()
        got: dict[int, RankResult] = {}
        try:
            while len(got) < n:
                try:
                    r = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"rank process {dead[0].name} exited with {dead[0].exitcode}") from None
                    continue
                if r.error:
                    raise RuntimeError(f"rank {r.rank}: {r.error}")
                got[r.rank] = r
        finally:
            for proc in procs:
                proc.join(options.timeout_seconds if not got or len(got) == n else 5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
    rows = []
    for op in options.ops:
        per_size = [(size, [got[r].times[op][k][1] for r in range(n)]) for k, size in enumerate(sizes)]
        rows.extend(measurements(op, n, per_size))
    cards, nominal, notes = _nominal([got[r] for r in range(n)], placements, nvml)
    return ProbeResult(
        backend=backend,
        ranks=n,
        devices=tuple(p.label for p in placements),
        iters=options.iters,
        warmup=options.warmup,
        measurements=tuple(rows),
        nominal=nominal,
        cards=cards,
        notes=notes,
    )


def _rank_entry(spec: RankSpec, results: Any) -> None:
    os.environ.update(MULTICAST_OFF)
    try:
        results.put(run_rank(spec))
    except BaseException as e:
        results.put(RankResult(spec.rank, {}, None, f"{type(e).__name__}: {e}"))
        raise


def _nominal(
    ranks: Sequence[RankResult], placements: Sequence[Placement], nvml: Any | None
) -> tuple[tuple[str, ...], Nominal | None, tuple[str, ...]]:
    """The participating cards' names and the nominal per-GPU link bandwidth (the slowest GPU's)."""
    identities = [r.identity for r in ranks if r.identity is not None]
    if not identities:
        return (), None, ("no link bandwidth to compare with on the CPU",)
    names = tuple(i.name or "unknown" for i in identities)
    gpus: list[GpuSample] = []
    try:
        provider = NvmlProvider(nvml, processes=False)
        try:
            gpus = list(provider.sample().gpus)
        finally:
            provider.close()
    except (SourceUnavailable, RuntimeError) as e:
        log.info("NVML unavailable for the link figures: %s", e)
    if gpus:
        # Each rank reported its CUDA identity: find its NVML GPU by UUID (NVML ignores CUDA_VISIBLE_DEVICES).
        chosen = [
            g for i in identities for g in gpus if i.uuid and g.uuid and g.uuid.lower().removeprefix("gpu-") == i.uuid
        ]
        bandwidths = [g.nvlink_bandwidth_bytes_per_second for g in chosen]
        if chosen and len(chosen) == len(placements) and all(b for b in bandwidths):
            slowest = min(chosen, key=lambda g: g.nvlink_bandwidth_bytes_per_second or 0.0)
            return (
                names,
                Nominal(
                    float(slowest.nvlink_bandwidth_bytes_per_second or 0.0),
                    f"NVML: {slowest.nvlink_links_active} NVLinks × "
                    f"{(slowest.nvlink_link_bytes_per_second or 0) / 1e9:.1f} GB/s on GPU {slowest.index}",
                ),
                (),
            )
    for marker, bandwidth in NOMINAL_NVLINK:
        if all(marker in name for name in names):
            if bandwidth <= 0:
                return names, None, (f"{marker}: no NVLink; PCIe carries the traffic",)
            return names, Nominal(bandwidth, f"table: {marker}"), ()
    return names, None, ("nominal link bandwidth unknown for these cards",)


def probe_main(options: ProbeOptions, *, out: Path | None, stdout: TextIO, stderr: TextIO) -> int:
    """The body of `zmon probe interconnect`: returns the exit code."""
    try:
        plan(options)
    except ProbeError as e:
        stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    if out is not None and out.exists() and out.is_dir():
        stderr.write(f"error: --out {out} is a directory\n")
        return EXIT_USAGE
    try:
        result = probe(options)
    except RuntimeError as e:
        stderr.write(f"error: the probe failed: {e}\n")
        return EXIT_FAILURE
    stdout.write(render_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        stderr.write(f"wrote {out}\n")
    return EXIT_OK
