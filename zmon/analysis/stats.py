"""Small, dependency-free statistics for profiles: percentiles, spread and time-weighted window means."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A closed-open time window in unix seconds: [start, end).
Window = tuple[float, float]


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for no values."""
    return math.fsum(values) / len(values) if values else None


def stdev(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n − 1, as `statistics.stdev`); 0.0 for one value, None for none."""
    n = len(values)
    if n == 0:
        return None
    if n == 1:
        return 0.0
    m = math.fsum(values) / n
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def cv(values: Sequence[float]) -> float | None:
    """Coefficient of variation: sample std / mean; None when undefined (no values, mean ≤ 0)."""
    m = mean(values)
    s = stdev(values)
    if m is None or s is None or m <= 0:
        return None
    return s / m


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rate(previous: tuple[float, float] | None, current: tuple[float, float]) -> float | None:
    """Per-second increase of a cumulative counter between two (time, value) reads; None without a previous
    read or elapsed time. A decrease (a reset) reads as 0."""
    if previous is None or current[0] <= previous[0]:
        return None
    return max(0.0, (current[1] - previous[1]) / (current[0] - previous[0]))


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


@dataclass(frozen=True)
class Summary:
    """Distribution of one figure (seconds for latencies). `cv` is std / mean, None when mean is 0."""

    n: int
    mean: float
    p50: float
    p95: float
    p99: float
    min: float
    max: float
    std: float
    cv: float | None


def summarize(values: Sequence[float]) -> Summary | None:
    """Summary of a sample; None for an empty one."""
    if not values:
        return None
    return Summary(
        n=len(values),
        mean=mean(values) or 0.0,
        p50=percentile(values, 50) or 0.0,
        p95=percentile(values, 95) or 0.0,
        p99=percentile(values, 99) or 0.0,
        min=min(values),
        max=max(values),
        std=stdev(values) or 0.0,
        cv=cv(values),
    )


def backward_intervals(timestamps: Sequence[float]) -> list[Window]:
    """The interval each sample describes, for counters averaged since the previous read.

    NVML utilization and CPU-time deltas both report the period *before* the read, so sample i covers
    (t[i-1], t[i]]. The first sample has no predecessor: it is given the median spacing of the others
    (or nothing, when it is alone). Timestamps must be sorted.
    """
    if not timestamps:
        return []
    gaps = [b - a for a, b in itertools.pairwise(timestamps) if b > a]
    first_span = median(gaps) or 0.0
    out: list[Window] = [(timestamps[0] - first_span, timestamps[0])]
    out.extend(itertools.pairwise(timestamps))
    return out


def windowed_mean(samples: Sequence[tuple[float, float | None]], windows: Iterable[Window]) -> float | None:
    """Time-weighted mean of a sampled signal over a set of windows.

    `samples` are (timestamp, value) sorted by time, each value averaged over the interval before it (see
    `backward_intervals`); a None value (not measured) contributes nothing. Each sample contributes its
    value weighted by how long its interval overlaps the windows, so a 40 ms stage between two 1 s reads
    still gets the value of the read that covers it.
    None when no sample interval overlaps any window.
    """
    if not samples:
        return None
    intervals = backward_intervals([t for t, _ in samples])
    ends = [end for _, end in intervals]
    weight = 0.0
    total = 0.0
    for w_start, w_end in windows:
        # Intervals are sorted and adjacent: start at the first one ending after the window opens.
        i = bisect.bisect_right(ends, w_start)
        while i < len(intervals) and intervals[i][0] < w_end:
            i_start, i_end = intervals[i]
            value = samples[i][1]
            overlap = min(w_end, i_end) - max(w_start, i_start)
            if overlap > 0 and value is not None:
                weight += overlap
                total += overlap * value
            i += 1
    return total / weight if weight > 0 else None
