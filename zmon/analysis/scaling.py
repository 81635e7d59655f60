"""Data-parallel scaling: the images/s of N workers against N times what one worker does on its own.

Pure: the supervisor (zmon.app.workers.parent) and the profile feed it the finished generations of every worker.

- A worker's steady-state rate is its images divided by the time it spent generating them (the sum of its
  generation times): what that device does while it generates, back to back.
- The aggregate rate is every worker's images divided by the wall time they span (first start to last end).
- Scaling efficiency = aggregate / (N × the mean steady-state rate of the workers that generated), with N the
  configured workers: 1.0 when all N are busy all the time. It falls when workers idle between generations
  (a slow parent, saving images, empty_cache at safe points), start late, or are down (a crashed or given-up
  worker counts in N but adds no images). It does not see contention between workers (shared host CPU, PCIe,
  memory bandwidth): that slows each worker's own rate, which is the reference here; compare a worker's
  latency with a single-GPU run (`zmon profile` on one device) for that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Finished:
    """One finished, successful generation of one worker."""

    worker: str  # the worker's device label
    started_at: float  # unix seconds
    seconds: float  # wall time of the call
    images: int


@dataclass(frozen=True)
class Scaling:
    """What `scaling()` measured over a set of generations."""

    workers: int  # configured workers (N)
    generating_workers: int  # workers with at least one generation counted
    aggregate_images_per_second: float
    worker_images_per_second: Mapping[str, float]  # steady-state rate of each generating worker
    efficiency: float  # aggregate / (N × mean worker rate)

    @property
    def speedup(self) -> float:
        """Aggregate / one worker's rate: the speedup over a single worker."""
        return self.efficiency * self.workers


def scaling(
    generations: Iterable[Finished], workers: int, *, min_generations: int = 2, overlap: bool = False
) -> Scaling | None:
    """Scaling over `generations` (warm-up already left out); None with fewer than `min_generations` or no
    wall time between the first start and the last end.

    `overlap=True` (a profile: a fixed number of generations per worker) measures the aggregate only while
    every configured worker was generating — from the last worker's first start to the first worker's last
    end, each generation counted by the fraction of it inside — so that workers loading at different speeds
    or finishing their share at different times do not read as poor scaling. Without it (a live window) that
    skew counts, as does a worker that is down. When not every worker generated, or they never overlapped,
    the whole span is used.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    gens = list(generations)
    if len(gens) < max(1, min_generations):
        return None
    start = min(g.started_at for g in gens)
    end = max(g.started_at + g.seconds for g in gens)
    span = end - start
    if span <= 0:
        return None
    counted = float(sum(g.images for g in gens))
    if overlap:
        firsts: dict[str, float] = {}
        lasts: dict[str, float] = {}
        for g in gens:
            firsts[g.worker] = min(firsts.get(g.worker, g.started_at), g.started_at)
            lasts[g.worker] = max(lasts.get(g.worker, g.started_at + g.seconds), g.started_at + g.seconds)
        t0, t1 = max(firsts.values()), min(lasts.values())
        if len(firsts) == workers and t1 > t0:
            span = t1 - t0
            counted = sum(g.images * _inside(g, t0, t1) for g in gens)
    busy: dict[str, float] = {}
    images: dict[str, int] = {}
    for g in gens:
        busy[g.worker] = busy.get(g.worker, 0.0) + g.seconds
        images[g.worker] = images.get(g.worker, 0) + g.images
    rates = {w: images[w] / busy[w] for w in busy if busy[w] > 0}
    if not rates:
        return None
    aggregate = counted / span
    mean_rate = sum(rates.values()) / len(rates)
    return Scaling(
        workers=workers,
        generating_workers=len(rates),
        aggregate_images_per_second=aggregate,
        worker_images_per_second=dict(sorted(rates.items())),
        efficiency=aggregate / (workers * mean_rate),
    )


def _inside(g: Finished, t0: float, t1: float) -> float:
    """The fraction of generation g that lies inside [t0, t1]."""
    if g.seconds <= 0:
        return 1.0 if t0 <= g.started_at <= t1 else 0.0
    lo, hi = max(g.started_at, t0), min(g.started_at + g.seconds, t1)
    return max(0.0, hi - lo) / g.seconds
