"""`zmon probe interconnect`: collective bandwidth and latency between the local GPUs, measured as nccl-tests does.

One process per device (spawned by zmon.app.probe) joins a torch.distributed group (NCCL on GPUs, gloo on the
CPU) and times each operation over a range of message sizes: a few warm-up calls, then `iters` calls back to
back, synchronised, divided by `iters`. Per size the slowest rank's time counts (a collective ends when its
last rank does). As in nccl-tests (doc/PERFORMANCE.md):

- size: the bytes of the full result (all_reduce: the buffer; all_gather: the gathered output);
- algbw = size / time;
- busbw = algbw × factor, with factor 2(n−1)/n for all_reduce and (n−1)/n for all_gather: the bandwidth each
  rank's link actually carried, comparable with the hardware's per-direction link bandwidth and across n.

The measuring code runs in the rank processes; everything else (the math, the table, the JSON) is plain data.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from zmon.providers import cuda

Op = Literal["all_reduce", "all_gather"]
OPS: Final[tuple[Op, ...]] = ("all_reduce", "all_gather")
BACKENDS: Final = ("nccl", "gloo")
ELEMENT_BYTES: Final = 4  # float32


def bus_factor(op: Op, ranks: int) -> float:
    """nccl-tests' bus bandwidth factor: 2(n−1)/n for all_reduce, (n−1)/n for all_gather."""
    if ranks < 2:
        raise ValueError("a collective needs at least 2 ranks")
    return (2.0 if op == "all_reduce" else 1.0) * (ranks - 1) / ranks


def message_sizes(min_bytes: int, max_bytes: int, factor: int = 4, *, ranks: int = 1) -> list[int]:
    """min, min×factor, … up to max (inclusive), each rounded up to whole float32 elements per rank."""
    if min_bytes <= 0 or max_bytes < min_bytes or factor < 2:
        raise ValueError("need 0 < min_bytes <= max_bytes and factor >= 2")
    quantum = ELEMENT_BYTES * ranks
    out: list[int] = []
    size = min_bytes
    while size <= max_bytes:
        rounded = -(-size // quantum) * quantum
        if not out or rounded != out[-1]:
            out.append(rounded)
        size *= factor
    return out


@dataclass(frozen=True)
class Measurement:
    """One operation at one message size."""

    op: Op
    bytes: int
    seconds: float  # per call, the slowest rank
    algbw_bytes_per_second: float
    busbw_bytes_per_second: float


@dataclass(frozen=True)
class Nominal:
    """The link bandwidth the busbw is compared with, each direction, per GPU; and where the figure comes from."""

    bytes_per_second: float
    source: str  # e.g. "NVML: 18 NVLinks × 26.6 GB/s", "table: NVIDIA H200"


@dataclass(frozen=True)
class ProbeResult:
    backend: str
    ranks: int
    devices: tuple[str, ...]
    iters: int
    warmup: int
    measurements: tuple[Measurement, ...]
    nominal: Nominal | None = None
    cards: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def of(self, op: Op) -> list[Measurement]:
        return [m for m in self.measurements if m.op == op]

    def latency_seconds(self, op: Op) -> float | None:
        """Time of the smallest message: the collective's fixed cost."""
        rows = self.of(op)
        return min(rows, key=lambda m: m.bytes).seconds if rows else None

    def peak_busbw(self, op: Op) -> float | None:
        rows = self.of(op)
        return max(m.busbw_bytes_per_second for m in rows) if rows else None

    def to_dict(self) -> dict[str, Any]:
        ops = sorted({m.op for m in self.measurements}, key=OPS.index)
        return {
            "backend": self.backend,
            "ranks": self.ranks,
            "devices": list(self.devices),
            "cards": list(self.cards),
            "iters": self.iters,
            "warmup": self.warmup,
            "nominal": None
            if self.nominal is None
            else {"bytes_per_second": self.nominal.bytes_per_second, "source": self.nominal.source},
            "ops": {
                op: {
                    "latency_seconds": self.latency_seconds(op),
                    "peak_busbw_bytes_per_second": self.peak_busbw(op),
                    "peak_busbw_of_nominal": _ratio(self.peak_busbw(op), self.nominal),
                    "sizes": [
                        {
                            "bytes": m.bytes,
                            "seconds": m.seconds,
                            "algbw_bytes_per_second": m.algbw_bytes_per_second,
                            "busbw_bytes_per_second": m.busbw_bytes_per_second,
                            "busbw_of_nominal": _ratio(m.busbw_bytes_per_second, self.nominal),
                        }
                        for m in self.of(op)
                    ],
                }
                for op in ops
            },
            "notes": list(self.notes),
        }


def _ratio(value: float | None, nominal: Nominal | None) -> float | None:
    return (
        None if value is None or nominal is None or nominal.bytes_per_second <= 0 else value / nominal.bytes_per_second
    )


def measurements(op: Op, ranks: int, times: Sequence[tuple[int, Sequence[float]]]) -> list[Measurement]:
    """Measurements from (size, per-rank seconds per call) pairs: the slowest rank counts."""
    factor = bus_factor(op, ranks)
    out = []
    for size, per_rank in times:
        seconds = max(per_rank)
        algbw = size / seconds if seconds > 0 else float("inf")
        out.append(Measurement(op, size, seconds, algbw, algbw * factor))
    return out


# ------------------------------------------------------------------------------------------------ rendering


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _rate(b: float) -> str:
    return f"{b / 1e9:.2f} GB/s"


def render_table(result: ProbeResult) -> str:
    """A table per operation, as nccl-tests prints it, with busbw against the nominal link bandwidth."""
    lines = [
        f"interconnect probe: {result.ranks} ranks over {result.backend} on {', '.join(result.devices)}"
        + (f" ({', '.join(sorted(set(result.cards)))})" if result.cards else ""),
        "nominal link bandwidth: "
        + (
            f"{_rate(result.nominal.bytes_per_second)} each way per GPU ({result.nominal.source})"
            if result.nominal
            else "unknown"
        ),
        f"{result.warmup} warm-up + {result.iters} timed calls per size; busbw = algbw × "
        "2(n−1)/n (all_reduce), × (n−1)/n (all_gather)",
    ]
    for op in OPS:
        rows = result.of(op)
        if not rows:
            continue
        lines += ["", op, f"{'size':>10} {'time':>11} {'algbw':>12} {'busbw':>12} {'of nominal':>11}"]
        for m in rows:
            share = _ratio(m.busbw_bytes_per_second, result.nominal)
            lines.append(
                f"{_bytes(m.bytes):>10} {_time(m.seconds):>11} {_rate(m.algbw_bytes_per_second):>12} "
                f"{_rate(m.busbw_bytes_per_second):>12} {'-' if share is None else f'{share:.0%}':>11}"
            )
        latency, peak = result.latency_seconds(op), result.peak_busbw(op)
        share = _ratio(peak, result.nominal)
        lines.append(
            f"latency {_time(latency or 0.0)} (smallest size), peak busbw {_rate(peak or 0.0)}"
            + ("" if share is None else f" = {share:.0%} of nominal")
        )
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ one rank


@dataclass(frozen=True)
class RankSpec:
    """What one rank process measures."""

    rank: int
    ranks: int
    backend: str
    device: str  # "cuda:1" or "cpu"
    cuda_index: int | None
    init_method: str  # e.g. file:///tmp/zmon-probe-xxx/store
    ops: tuple[Op, ...]
    sizes: tuple[int, ...]
    iters: int
    warmup: int
    timeout_seconds: float


@dataclass(frozen=True)
class RankResult:
    rank: int
    times: dict[str, list[tuple[int, float]]]  # op → (size, seconds per call)
    identity: Any = None  # zmon.providers.cuda.DeviceIdentity on CUDA
    error: str | None = None


def run_rank(spec: RankSpec) -> RankResult:
    """Join the group and time every (op, size); called in the rank's own process."""
    import torch
    import torch.distributed as dist

    identity = None
    if spec.cuda_index is not None:
        cuda.set_device(spec.cuda_index)
        identity = cuda.device_identity(spec.cuda_index)
    extra: dict[str, Any] = {}
    if spec.cuda_index is not None:  # NCCL binds the rank to its GPU up front (barriers included)
        extra["device_id"] = torch.device("cuda", spec.cuda_index)
    dist.init_process_group(
        spec.backend,
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.ranks,
        timeout=dt.timedelta(seconds=spec.timeout_seconds),
        **extra,
    )
    device = torch.device(spec.device)
    times: dict[str, list[tuple[int, float]]] = {}
    try:
        for op in spec.ops:
            for size in spec.sizes:
                times.setdefault(op, []).append((size, _time_op(op, size, spec, device)))
    finally:
        dist.destroy_process_group()
    return RankResult(spec.rank, times, identity)


def _time_op(op: Op, size: int, spec: RankSpec, device: Any) -> float:
    import torch
    import torch.distributed as dist

    elements = size // ELEMENT_BYTES
    if op == "all_reduce":
        buf = torch.ones(elements, dtype=torch.float32, device=device)

        def call() -> None:
            dist.all_reduce(buf)

    else:
        out = torch.empty(elements, dtype=torch.float32, device=device)
        chunk = torch.ones(elements // spec.ranks, dtype=torch.float32, device=device)
        # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

        def call() -> None:
            gather(out, chunk)

    for _ in range(spec.warmup):
        call()
    _sync(spec)
    dist.barrier()
    _sync(spec)
    t0 = time.perf_counter()
    for _ in range(spec.iters):
        call()
    _sync(spec)
    return (time.perf_counter() - t0) / spec.iters


def _sync(spec: RankSpec) -> None:
    if spec.cuda_index is not None:
        cuda.synchronize(spec.cuda_index)
