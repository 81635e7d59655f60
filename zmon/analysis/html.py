"""Self-contained HTML profile report: inline CSS and SVG charts drawn here, no scripts, no network."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape

from zmon.analysis.diagnosis import Diagnosis, Finding, format_value
from zmon.analysis.facts import ProfileFacts
from zmon.analysis.rows import (
    EXCLUDED_HEADER,
    STAGE_HEADER,
    baseline_rows,
    created,
    environment_rows,
    evidence_text,
    excluded_rows,
    headline,
    io_rows,
    memory_rows,
    multi_gpu_rows,
    stage_rows,
    step_rows,
)

STAGE_COLORS = {
    "text_encode": "#e4572e",
    "vae_encode": "#a05195",
    "denoise_step": "#2e86ab",
    "vae_decode": "#76b041",
    "postprocess": "#f3a712",
    "(outside stages)": "#b0b0b0",
}
SERIES_COLORS = ("#2e86ab", "#e4572e", "#76b041", "#a05195")
VERDICT_COLORS = {
    "optimized": "#2f8f4e",
    "network_bound": "#c0392b",
    "cpu_bound": "#c0392b",
    "memory_bound": "#c0392b",
    "kernel_issue": "#d68910",
    "io_or_caching": "#d68910",
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2327; background: #f6f7f9;
       margin: 0; padding: 24px 32px; }
main { max-width: 1100px; margin: auto; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.meta { color: #5f6b76; margin-bottom: 16px; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 14px 18px; margin: 10px 0; }
.verdict { border-left: 8px solid var(--vc); }
.verdict .name { font: 600 24px ui-monospace, monospace; color: var(--vc); }
.caveat { background: #fff6e0; border-left: 4px solid #e0a800; padding: 4px 8px; margin: 4px 0; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; color: #fff;
         background: #5f6b76; margin-right: 6px; }
.p1 { background: #c0392b; } .p2 { background: #d68910; }
.p3 { background: #2e86ab; } .p4 { background: #5f6b76; }
.fix { background: #eef6ee; border-radius: 6px; padding: 6px 10px; margin: 8px 0; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceff2; vertical-align: top; }
th { color: #5f6b76; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; }
.yes { color: #c0392b; font-weight: 600; } .no { color: #2f8f4e; } .not_measured { color: #8a939b; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.note { color: #8a939b; font-style: italic; }
svg { display: block; width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #38424b; }
ul.ev { margin: 4px 0 0; padding-left: 20px; }
"""


# ------------------------------------------------------------------------------------------------ SVG


def _svg(width: int, height: int, body: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}">' + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _rect(x: float, y: float, w: float, h: float, color: str, tip: str = "", extra: str = "") -> str:
    title = f"<title>{escape(tip)}</title>" if tip else ""
    box = f'x="{x:.2f}" y="{y:.2f}" width="{max(w, 0.5):.2f}" height="{h:.2f}"'
    return f'<rect {box} fill="{color}"{extra}>{title}</rect>'


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def stage_chart(facts: ProfileFacts) -> str:
    """Horizontal bars: each stage's share of the mean generation."""
    rows = [(s.stage, s.share, s.mean_seconds) for s in facts.stages.stages]
    st = facts.stages
    if st.unattributed_share is not None and st.unattributed_mean_seconds is not None:
        rows.append(("(outside stages)", st.unattributed_share, st.unattributed_mean_seconds))
    if not rows:
        return _note("No stage timings recorded.")
    width, left, bar_h, gap = 900, 140, 22, 8
    height = len(rows) * (bar_h + gap) + 10
    span = width - left - 150
    body = []
    for i, (stage, share, seconds) in enumerate(rows):
        y = 5 + i * (bar_h + gap)
        label = f"{format_value(share, 'ratio')} · {format_value(seconds, 's')}"
        body.append(_text(left - 8, y + bar_h * 0.7, stage, "end"))
        body.append(_rect(left, y, span, bar_h, "#eef0f3"))
        body.append(_rect(left, y, span * min(max(share, 0.0), 1.0), bar_h, STAGE_COLORS.get(stage, "#888"), label))
        body.append(_text(left + span + 8, y + bar_h * 0.7, label))
    return _svg(width, height, body, "stage breakdown")


def timeline_chart(facts: ProfileFacts) -> str:
    """Gantt bars of every span of the generation closest to the median."""
    spans = facts.stages.timeline
    total = facts.stages.timeline_total_seconds
    if not spans or not total:
        return _note("No stage timeline recorded.")
    lanes = list(dict.fromkeys(s.stage for s in spans))
    width, left, lane_h, top = 900, 140, 26, 8
    plot_w = width - left - 20
    height = top + len(lanes) * lane_h + 34
    x_of = lambda t: left + plot_w * t / total  # noqa: E731
    body = [_rect(left, top, plot_w, len(lanes) * lane_h, "#f7f8fa")]
    for i, lane in enumerate(lanes):
        body.append(_text(left - 8, top + i * lane_h + lane_h * 0.65, lane, "end"))
    for s in spans:
        y = top + lanes.index(s.stage) * lane_h + 3
        x0, x1 = x_of(s.start_offset_seconds), x_of(s.start_offset_seconds + s.seconds)
        color = STAGE_COLORS.get(s.stage, "#888")
        at = format_value(s.start_offset_seconds, "s")
        tip = f"{s.stage} #{s.index}: {format_value(s.seconds, 's')} at +{at}"
        body.append(_rect(x0, y, x1 - x0, lane_h - 6, color, tip, ' stroke="#fff" stroke-width="1"'))
        if s.stage == "denoise_step" and x1 - x0 > 16:
            body.append(_text((x0 + x1) / 2, y + lane_h * 0.55, str(s.index), "middle", ' style="fill:#fff"'))
    axis_y = top + len(lanes) * lane_h
    for tick in _nice_ticks(0, total):
        x = x_of(tick)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#d5d9de"/>')
        body.append(_text(x, axis_y + 16, f"{tick:g} s", "middle"))
    body.append(_text(left + plot_w, axis_y + 30, f"generation: {format_value(total, 's')}", "end"))
    return _svg(width, height, body, "timeline of one generation")


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    y_label: str,
    y_max: float | None = None,
    y_format: str = "ratio",
    x_label: str = "seconds since start",
    bands: Sequence[tuple[float, float]] = (),
    label: str,
) -> str:
    """Lines over a shared x axis; `bands` shade x ranges (e.g. generation windows)."""
    points = [p for _, pts in series for p in pts]
    if not points:
        return _note("not measured")
    width, height, left, right, top, bottom = 900, 240, 70, 20, 12, 42
    pw, ph = width - left - right, height - top - bottom
    x_lo = min(p[0] for p in points)
    x_hi = max(max(p[0] for p in points), x_lo + 1e-9)
    y_hi = y_max if y_max is not None else max(p[1] for p in points) * 1.1 or 1.0
    x_of = lambda x: left + pw * (x - x_lo) / (x_hi - x_lo)  # noqa: E731
    y_of = lambda y: top + ph * (1 - min(max(y / y_hi, 0.0), 1.0))  # noqa: E731
    body = [_rect(left, top, pw, ph, "#fbfbfc")]
    for a, b in bands:
        a, b = max(a, x_lo), min(b, x_hi)
        if b > a:
            body.append(_rect(x_of(a), top, x_of(b) - x_of(a), ph, "#e8f1f7"))
    for tick in _nice_ticks(0, y_hi, 4):
        y = y_of(tick)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e3e6ea"/>')
        body.append(_text(left - 6, y + 4, format_value(tick, y_format), "end"))
    for tick in _nice_ticks(x_lo, x_hi, 6):
        body.append(_text(x_of(tick), top + ph + 16, f"{tick:g}", "middle"))
    body.append(_text(left + pw / 2, height - 6, x_label, "middle"))
    body.append(_text(14, top + ph / 2, y_label, "middle", f' transform="rotate(-90 14 {top + ph / 2:.1f})"'))
    for i, (name, pts) in enumerate(series):
        if not pts:
            continue
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        path = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in pts)
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6">'
            f"<title>{escape(name)}</title></polyline>"
        )
        body.append(_rect(left + 8 + i * 190, top + 6, 12, 4, color))
        body.append(_text(left + 24 + i * 190, top + 11, name))
    return _svg(width, height, body, label)


def _origin(facts: ProfileFacts) -> float:
    starts = list(facts.baseline.started_at)
    starts += [s.timestamp for s in facts.utilization.gpu_samples[:1]]
    starts += [s.timestamp for s in facts.utilization.cpu_samples[:1]]
    return min(starts) if starts else 0.0


def _bands(facts: ProfileFacts, t0: float) -> list[tuple[float, float]]:
    b = facts.baseline
    return [(s - t0, s - t0 + d) for s, d in zip(b.started_at, b.totals_seconds, strict=False)]


def gpu_chart(facts: ProfileFacts) -> str:
    samples = facts.utilization.gpu_samples
    pts = [(s.timestamp, s.util_ratio) for s in samples if s.util_ratio is not None]
    if not pts:
        return _note("GPU utilization: not measured (CPU-only run, or NVML unavailable).")
    t0 = _origin(facts)
    series = [("GPU utilization", [(t - t0, v) for t, v in pts])]
    return line_chart(series, y_label="utilization", y_max=1.0, bands=_bands(facts, t0), label="GPU utilization")


def cpu_chart(facts: ProfileFacts) -> str:
    samples = facts.utilization.cpu_samples
    t0 = _origin(facts)
    host = [(s.timestamp - t0, s.host_ratio) for s in samples if s.host_ratio is not None]
    proc = [(s.timestamp - t0, s.process_cores) for s in samples if s.process_cores is not None]
    if not host and not proc:
        return _note("CPU utilization: not measured.")
    top = max([1.0] + [v for _, v in proc])
    return line_chart(
        [("host CPU (share of all cores)", host), ("process CPU (cores)", proc)],
        y_label="ratio / cores",
        y_max=top,
        y_format="",
        bands=_bands(facts, t0),
        label="CPU utilization",
    )


def memory_chart(facts: ProfileFacts) -> str:
    samples = facts.utilization.gpu_samples
    pts = [(s.timestamp, float(s.memory_used_bytes)) for s in samples if s.memory_used_bytes is not None]
    if not pts:
        return _note("GPU memory over time: not measured.")
    t0 = _origin(facts)
    total = facts.memory.card_total_bytes
    series = [("GPU memory in use", [(t - t0, v) for t, v in pts])]
    return line_chart(
        series,
        y_label="bytes",
        y_max=float(total) if total else None,
        y_format="B",
        bands=_bands(facts, t0),
        label="GPU memory",
    )


def latency_histogram(facts: ProfileFacts) -> str:
    totals = facts.baseline.totals_seconds
    lat = facts.baseline.latency
    if not totals or lat is None:
        return _note("No baseline generations.")
    bins = max(5, min(20, round(math.sqrt(len(totals)))))
    lo, hi = lat.min, lat.max
    if hi - lo < 1e-9:
        lo, hi = lo * 0.99, hi * 1.01 + 1e-6
    counts = [0] * bins
    for v in totals:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    # The strip above the bars holds the percentile labels, one row each so they never overlap.
    width, height, left, top, bottom = 900, 250, 50, 48, 40
    pw, ph = width - left - 20, height - top - bottom
    peak = max(counts)
    bw = pw / bins
    body = []
    for i, c in enumerate(counts):
        h = ph * c / peak
        a = lo + (hi - lo) * i / bins
        tip = f"{c} runs in {format_value(a, 's')} – {format_value(a + (hi - lo) / bins, 's')}"
        body.append(_rect(left + i * bw + 1, top + ph - h, bw - 2, h, "#2e86ab", tip))
    marks = (("p50", lat.p50, "#2f8f4e"), ("p95", lat.p95, "#d68910"), ("p99", lat.p99, "#c0392b"))
    for row, (name, v, color) in enumerate(marks):
        x = left + pw * (v - lo) / (hi - lo)
        y = 12 + row * 13
        body.append(
            f'<line x1="{x:.1f}" y1="{y + 2}" x2="{x:.1f}" y2="{top + ph}" stroke="{color}" stroke-dasharray="4 3"/>'
        )
        anchor, dx = ("end", -3) if x > left + pw * 0.75 else ("start", 3)
        label = f"{name} {format_value(v, 's')}"
        body.append(_text(x + dx, y, label, anchor, extra=f' style="fill:{color}"'))
    for tick in _nice_ticks(lo, hi, 6):
        x = left + pw * (tick - lo) / (hi - lo)
        body.append(_text(x, top + ph + 16, f"{tick:g} s", "middle"))
    body.append(_text(left + pw / 2, height - 4, f"generation time ({len(totals)} runs)", "middle"))
    return _svg(width, height, body, "latency distribution")


def latency_sequence(facts: ProfileFacts) -> str:
    totals = facts.baseline.totals_seconds
    if len(totals) < 2:
        return ""
    pts = [(float(i + 1), v) for i, v in enumerate(totals)]
    return line_chart(
        [("seconds per generation", pts)],
        y_label="seconds",
        y_format="s",
        x_label="generation (after warm-up)",
        label="latency per generation",
    )


# ------------------------------------------------------------------------------------------------ page


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td class='num'>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _evidence_list(lines: Iterable[str]) -> str:
    return "<ul class='ev'>" + "".join(f"<li>{escape(x)}</li>" for x in lines) + "</ul>"


def _finding(f: Finding) -> str:
    return (
        "<div class='card'>"
        f"<h3><span class='badge p{f.priority}'>priority {f.priority}</span>{escape(f.title)}</h3>"
        f"<div class='meta'>impact {escape(f.impact)}, effort {escape(f.effort)} · {escape(f.summary)}</div>"
        f"<div class='fix'><b>Fix:</b> {escape(f.fix or '')}</div>"
        f"{_evidence_list(evidence_text(f.evidence))}</div>"
    )


def render_html(facts: ProfileFacts, diagnosis: Diagnosis) -> str:
    """The report as one HTML document that needs nothing else to display."""
    d = diagnosis
    color = VERDICT_COLORS.get(d.verdict, "#5f6b76")
    flow_rows = "".join(
        f"<tr><td>{i}</td><td>{escape(s.question)}</td><td class='{escape(s.answer)}'>"
        f"{escape(s.answer.replace('_', ' '))}</td><td>{escape(s.basis)}</td>"
        f"<td>{_evidence_list(evidence_text(s.evidence))}</td></tr>"
        for i, s in enumerate(d.steps, 1)
    )
    head = "".join(f"<th>{h}</th>" for h in ("#", "question", "answer", "decided by", "evidence"))
    steps = f"<table><tr>{head}</tr>{flow_rows}</table>"
    active = d.active_findings
    inactive = [f for f in d.findings if not f.active]
    findings = "".join(_finding(f) for f in active) or "<p>No bottleneck or misconfiguration found.</p>"
    not_found = _table(("check", "priority", "state"), [(f.title, str(f.priority), f.summary) for f in inactive])
    multi = multi_gpu_rows(facts)
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>zmon profile: {escape(headline(facts))}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>zmon profile: {escape(headline(facts))}</h1>",
        f"<div class='meta'>{escape(created(facts))} · {facts.baseline.generations} steady-state generations "
        f"({len(facts.baseline.excluded)} left out: warm-up, compiles, outliers)</div>",
        f"<section class='card verdict' id='verdict' style='--vc:{color}'>",
        f"<div>Verdict (confidence {escape(d.confidence)})</div><div class='name'>{escape(d.verdict)}</div>",
        f"<p><b>{escape(d.action)}</b></p><p>{escape(d.summary)}</p>",
        "".join(f"<p class='caveat'>{escape(c)}</p>" for c in d.caveats),
        f"{steps}</section>",
        f"<h2>Findings</h2>{findings}",
        f"<details><summary>Checks that found nothing ({len(inactive)})</summary>{not_found}</details>",
        "<h2>Where the time goes</h2>",
        f"<div class='card'><h3>Stage breakdown (share of the mean generation)</h3>{stage_chart(facts)}",
        f"{_table(STAGE_HEADER, stage_rows(facts))}</div>",
        f"<div class='card'><h3>Timeline of a median generation</h3>{timeline_chart(facts)}",
        f"{_kv_table(step_rows(facts))}</div>",
        "<h2>Latency</h2>",
        f"<div class='card'><h3>Distribution</h3>{latency_histogram(facts)}{latency_sequence(facts)}",
        f"{_kv_table(baseline_rows(facts))}",
        (
            f"<h3>Left out of the steady state</h3>{_table(EXCLUDED_HEADER, excluded_rows(facts))}"
            if facts.baseline.excluded
            else ""
        ),
        "</div>",
        "<h2>Utilization and memory over time</h2>",
        "<p class='meta'>Shaded: measured generations.</p>",
        f"<div class='card'><h3>GPU utilization</h3>{gpu_chart(facts)}</div>",
        f"<div class='card'><h3>CPU utilization</h3>{cpu_chart(facts)}</div>",
        f"<div class='card'><h3>GPU memory</h3>{memory_chart(facts)}</div>",
        "<div class='grid'>",
        f"<div class='card'><h3>Memory</h3>{_kv_table(memory_rows(facts))}</div>",
        f"<div class='card'><h3>I/O</h3>{_kv_table(io_rows(facts))}</div>",
        "</div>",
        f"<div class='card'><h3>Multi-GPU</h3>{_kv_table(multi)}</div>" if multi else "",
        f"<h2>Environment</h2><div class='card'>{_kv_table(environment_rows(facts))}</div>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"
