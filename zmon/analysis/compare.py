"""Before/after comparison of two profile.json documents: per-figure deltas and the verdict change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zmon.analysis.diagnosis import Diagnosis, format_value
from zmon.analysis.facts import DENOISE, WHOLE_GENERATION, ProfileFacts, to_jsonable
from zmon.analysis.report import load_profile, profile_from_dict
from zmon.analysis.rows import headline

Direction = Literal["better", "worse", "same", "n/a"]
# A figure is a (name, unit, value, lower_is_better) row; lower_is_better None = no preferred direction.
FigureRow = tuple[str, str, float | None, bool | None]


@dataclass(frozen=True)
class FigureDelta:
    """One figure before and after; delta = after − before, delta_pct relative to before."""

    figure: str
    unit: str
    before: float | None
    after: float | None
    delta: float | None
    delta_pct: float | None  # 0.10 = +10%; None when before is 0 or either side is missing
    lower_is_better: bool | None
    direction: Direction


@dataclass(frozen=True)
class Comparison:
    before_label: str
    after_label: str
    before_verdict: str
    after_verdict: str
    figures: tuple[FigureDelta, ...]
    resolved_findings: tuple[str, ...]  # kinds active before and not after
    new_findings: tuple[str, ...]  # kinds active after and not before

    @property
    def verdict_changed(self) -> bool:
        return self.before_verdict != self.after_verdict

    def get(self, figure: str) -> FigureDelta | None:
        return next((f for f in self.figures if f.figure == figure), None)

    def to_dict(self) -> dict[str, Any]:
        return {**to_jsonable(self), "verdict_changed": self.verdict_changed}


def _i(v: int | None) -> float | None:
    return None if v is None else float(v)


def figures(facts: ProfileFacts) -> list[FigureRow]:
    """The comparable figures of one profile, in report order."""
    b, lat = facts.baseline, facts.baseline.latency
    rows: list[FigureRow] = []
    for name in ("mean", "p50", "p95", "p99", "min", "max", "std"):
        rows.append((f"latency {name}", "s", None if lat is None else getattr(lat, name), True))
    rows += [
        ("latency CV", "cv", None if lat is None else lat.cv, True),
        ("run-to-run CV (same shape)", "cv", b.run_cv, True),
        ("images per second", "", b.images_per_second, False),
    ]
    for s in facts.stages.stages:
        rows.append((f"stage {s.stage} mean", "s", s.mean_seconds, True))
    st, u, m, io = facts.stages, facts.utilization, facts.memory, facts.io
    rows += [
        ("time outside stages", "s", st.unattributed_mean_seconds, True),
        ("mean step", "s", st.step_mean_seconds, True),
        ("step-time CV within a generation", "cv", st.step_cv, True),
        ("GPU utilization during diffusion", "ratio", u.gpu_by_stage.get(DENOISE), False),
        ("GPU utilization during generation", "ratio", u.gpu_by_stage.get(WHOLE_GENERATION), False),
        ("host CPU during generation", "ratio", u.host_cpu_by_stage.get(WHOLE_GENERATION), None),
        ("peak allocated", "B", _i(m.peak_allocated_bytes), True),
        ("peak reserved", "B", _i(m.peak_reserved_bytes), True),
        ("VRAM in use / card", "ratio", m.vram_used_fraction, True),
        ("reserved-unallocated ratio", "cv", m.reserved_unallocated_ratio, True),
        ("fragmentation ratio", "cv", m.fragmentation_ratio, True),
        ("headroom", "B", _i(m.headroom_bytes), False),
        ("allocator retries", "count", _i(m.alloc_retries), True),
        ("allocator OOMs", "count", _i(m.ooms), True),
        ("checkpoint load", "s", io.checkpoint_load_seconds, True),
        ("checkpoint read throughput", "B/s", io.checkpoint_read_bytes_per_second, False),
        ("sequential disk read", "B/s", io.disk_read_bytes_per_second, False),
        ("first generation", "s", io.first_generation_seconds, True),
        ("first / steady state", "x", io.first_generation_slowdown, True),
    ]
    return rows


def _delta(
    name: str, unit: str, before: float | None, after: float | None, lower: bool | None, rel_tol: float
) -> FigureDelta:
    if before is None or after is None:
        return FigureDelta(name, unit, before, after, None, None, lower, "n/a")
    delta = after - before
    pct = delta / abs(before) if before != 0 else None
    direction: Direction
    if delta == 0 or (pct is not None and abs(pct) <= rel_tol):
        direction = "same"
    elif lower is None:
        direction = "n/a"
    else:
        direction = "better" if (delta < 0) == lower else "worse"
    return FigureDelta(name, unit, before, after, delta, pct, lower, direction)


def compare_profiles(
    before: tuple[ProfileFacts, Diagnosis], after: tuple[ProfileFacts, Diagnosis], *, rel_tol: float = 0.01
) -> Comparison:
    """Compare two parsed profiles. Changes within rel_tol (relative) count as "same"."""
    (bf, bd), (af, ad) = before, after
    brows = {name: (unit, value, lower) for name, unit, value, lower in figures(bf)}
    arows = {name: (unit, value, lower) for name, unit, value, lower in figures(af)}
    names = list(brows) + [n for n in arows if n not in brows]  # stages seen on either side
    deltas = []
    for name in names:
        unit, b_value, lower = brows.get(name) or (arows[name][0], None, arows[name][2])
        a_value = arows[name][1] if name in arows else None
        deltas.append(_delta(name, unit, b_value, a_value, lower, rel_tol))
    b_active = [f.kind for f in bd.active_findings]
    a_active = [f.kind for f in ad.active_findings]
    return Comparison(
        before_label=headline(bf),
        after_label=headline(af),
        before_verdict=bd.verdict,
        after_verdict=ad.verdict,
        figures=tuple(deltas),
        resolved_findings=tuple(k for k in b_active if k not in a_active),
        new_findings=tuple(k for k in a_active if k not in b_active),
    )


def compare(before: Mapping[str, Any], after: Mapping[str, Any], *, rel_tol: float = 0.01) -> Comparison:
    """Compare two profile.json documents (as loaded with json.load)."""
    return compare_profiles(profile_from_dict(before), profile_from_dict(after), rel_tol=rel_tol)


def compare_files(before: str | Path, after: str | Path, *, rel_tol: float = 0.01) -> Comparison:
    return compare_profiles(load_profile(before), load_profile(after), rel_tol=rel_tol)


def render_comparison(c: Comparison, *, changed_only: bool = False) -> str:
    """Markdown: the verdict change, the findings resolved or new, and a table of deltas."""
    verdict = f"`{c.before_verdict}` → `{c.after_verdict}`" if c.verdict_changed else f"`{c.after_verdict}` (unchanged)"
    out = [
        "# zmon profile comparison",
        "",
        f"before: {c.before_label}  ",
        f"after: {c.after_label}",
        "",
        f"**Verdict:** {verdict}",
        "",
    ]
    if c.resolved_findings:
        out.append("Resolved: " + ", ".join(c.resolved_findings))
    if c.new_findings:
        out.append("New: " + ", ".join(c.new_findings))
    if c.resolved_findings or c.new_findings:
        out.append("")
    out += ["| figure | before | after | change | change % | |", "|---|---|---|---|---|---|"]
    for f in c.figures:
        if changed_only and f.direction in ("same", "n/a"):
            continue
        if f.before is None and f.after is None:
            continue
        change = "-" if f.delta is None else ("+" if f.delta > 0 else "") + format_value(f.delta, f.unit)
        pct = "-" if f.delta_pct is None else f"{f.delta_pct:+.1%}"
        mark = {"better": "better", "worse": "**worse**", "same": "same", "n/a": ""}[f.direction]
        out.append(
            f"| {f.figure} | {format_value(f.before, f.unit)} | {format_value(f.after, f.unit)} | {change} "
            f"| {pct} | {mark} |"
        )
    return "\n".join(out) + "\n"
