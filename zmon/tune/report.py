"""`zmon tune` reports: tune.json, tune.md (also printed), tune.html (inline SVG) and tune.config.yaml.

The config snippet holds only the keys the fastest proven configuration sets (under `model:` /
`workload:`); tune.config.yaml is the whole configuration the tune ran with, those keys merged in, ready
for `zmon run -c tune.config.yaml` (and `zmon check-config`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import yaml

from zmon.analysis.diagnosis import format_value
from zmon.analysis.html import CSS, _nice_ticks, _rect, _svg, _table, _text
from zmon.config import deep_merge
from zmon.tune.measure import Spread
from zmon.tune.runner import STAGE_KEYS, TuneResult, VariantResult

TUNE_KIND = "zmon.tune"
SCHEMA_VERSION = 1
FILENAMES = {"json": "tune.json", "md": "tune.md", "html": "tune.html", "config": "tune.config.yaml"}
VERDICT_COLORS = {"faster": "#2f8f4e", "slower": "#c0392b", "no measurable gain": "#8a939b"}


# ------------------------------------------------------------------------------------------------ snippet


def snippet_dict(result: TuneResult) -> dict[str, Any]:
    """The winner's config keys, `model:` before `workload:` (the order config.example.yaml uses)."""
    order = {"model": 0, "workload": 1}
    return dict(sorted(result.best_settings.items(), key=lambda kv: order.get(kv[0], 2)))


def snippet_yaml(result: TuneResult) -> str:
    """The keys the fastest proven configuration sets, as YAML `zmon run` accepts (a comment when none)."""
    head = f"# zmon tune: {headline(result)}\n"
    data = snippet_dict(result)
    if not data:
        return head + "# nothing measurably beat the configured pipeline: keep your configuration as it is\n"
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def full_config(result: TuneResult) -> dict[str, Any]:
    """The tune's configuration (non-default keys) with the winner's keys merged in."""
    return deep_merge(dict(result.base_config), snippet_dict(result))


def headline(result: TuneResult) -> str:
    b = result.baseline.stats
    best = result.best_stats
    if b is None:
        return f"{result.model_id}: baseline not measured"
    if not result.best or best is None:
        return f"{result.model_id}: baseline p50 {b.p50:.4f} s; no variant measurably faster"
    gain = (b.p50 - best.p50) / b.p50 if b.p50 else 0.0
    return (
        f"{result.model_id}: {' + '.join(result.best)} p50 {best.p50:.4f} s vs baseline {b.p50:.4f} s "
        f"({gain:+.1%} faster)"
    )


# ------------------------------------------------------------------------------------------------ JSON


def _spread(s: Spread | None) -> dict[str, Any] | None:
    return None if s is None else s.to_dict()


def _variant_dict(v: VariantResult) -> dict[str, Any]:
    m = v.measurement
    peaks = m.peaks() if m else (None, None)
    return {
        "name": v.name,
        "description": v.description,
        "status": v.status,
        "lossy": v.lossy,
        "fresh_process": v.fresh_process,
        "group": v.group,
        "reason": v.reason,
        "note": v.note,
        "settings": v.settings,
        "warmup": None if v.warmup is None else v.warmup.to_dict(),
        "output": None if v.output is None else v.output.to_dict(),
        "latency_seconds": _spread(v.stats),
        "walls_seconds": [] if m is None else m.walls,
        "round_medians_seconds": [] if m is None else m.round_medians,
        "stages_p50_seconds": {} if m is None else m.stages(),
        "peak_allocated_bytes": peaks[0],
        "peak_reserved_bytes": peaks[1],
        "gpu_util": v.gpu_util,
        "verdict": v.verdict,
        "gain": v.gain,
        "compared_to": v.compared_to,
    }


def to_dict(result: TuneResult) -> dict[str, Any]:
    den, gen = result.floor_seconds()
    return {
        "kind": TUNE_KIND,
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.fromtimestamp(result.started_at, dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": result.elapsed_seconds,
        "model_id": result.model_id,
        "pipeline_class": result.pipeline_class,
        "device": result.device,
        "device_name": result.device_name,
        "dtype": result.dtype,
        "versions": result.versions,
        "workload": result.workload,
        "options": result.options.to_dict(),
        "noise_floor": result.noise_floor,
        "tolerance_psnr_db": result.tolerance_db,
        "baseline": _variant_dict(result.baseline),
        "variants": [_variant_dict(v) for v in result.variants],
        "combination": [
            {
                "current": s.current,
                "added": s.added,
                "kept": s.kept,
                "reason": s.reason,
                "verdict": s.verdict,
                "gain": s.gain,
                "current_latency_seconds": _spread(s.current_stats),
                "candidate_latency_seconds": _spread(s.candidate_stats),
            }
            for s in result.combination
        ],
        "best": {
            "variants": result.best,
            "latency_seconds": _spread(result.best_stats),
            "stages_p50_seconds": result.best_stages,
            "settings": result.best_settings,
        },
        "compute_floor": {
            "flops": None if result.flops is None else result.flops.to_dict(),
            "matmul_rate": None if result.rate is None else result.rate.to_dict(),
            "denoise_floor_seconds": den,
            "generation_floor_seconds": gen,
        },
        "snippet": snippet_yaml(result),
        "notes": result.notes,
        "exit_code": result.exit_code,
    }


# ------------------------------------------------------------------------------------------------ Markdown


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _gain(v: VariantResult) -> str:
    return "—" if v.gain is None else f"{v.gain:+.1%}"


def _output(v: VariantResult) -> str:
    o = v.output
    if o is None:
        return "—"
    if o.identical:
        return "identical"
    if not o.finite:
        return "non-finite"
    psnr = "∞" if o.psnr_db is None else f"{o.psnr_db:.1f} dB"
    return f"{psnr}, max |Δ| {o.max_abs:.2g}"


def _memory(v: VariantResult) -> str:
    if v.measurement is None:
        return "—"
    alloc, reserved = v.measurement.peaks()
    if alloc is None:
        return "n/a"
    return f"{format_value(alloc, 'B')} / {format_value(reserved, 'B')}"


def _warm(v: VariantResult) -> str:
    w = v.warmup
    if w is None:
        return "—"
    flag = "" if w.settled else " (not settled)"
    return f"{w.runs} runs, {w.seconds:.1f} s{flag}"


def _verdict(v: VariantResult) -> str:
    if v.status in ("skipped", "rejected"):
        return f"{v.status}: {v.reason}"
    if v.status == "baseline":
        return "baseline"
    return v.verdict or "—"


def _has_gpu_util(result: TuneResult) -> bool:
    return any(v.gpu_util is not None for v in [result.baseline, *result.variants])


def table_header(result: TuneResult) -> tuple[str, ...]:
    return TABLE_HEADER + (("GPU util",) if _has_gpu_util(result) else ())


def table_rows(result: TuneResult) -> list[list[str]]:
    rows = []
    util = _has_gpu_util(result)
    for v in [result.baseline, *result.variants]:
        s = v.stats
        extra = [format_value(v.gpu_util, "ratio") if v.gpu_util is not None else "—"] if util else []
        rows.append([*_row(v, s), *extra])
    return rows


def _row(v: VariantResult, s: Spread | None) -> list[str]:
    return [
        v.name + (" (lossy)" if v.lossy else "") + (" (fresh process)" if v.fresh_process else ""),
        _s(s.p50 if s else None),
        "—" if s is None else f"{s.q1:.4f}–{s.q3:.4f}",
        "—" if s is None else f"{s.min:.4f}–{s.max:.4f}",
        "—" if s is None else str(s.n),
        _gain(v),
        _output(v),
        _memory(v),
        _warm(v),
        _verdict(v),
    ]


TABLE_HEADER = (
    "variant",
    "p50 s",
    "IQR s",
    "min–max s",
    "n",
    "gain",
    "output vs baseline",
    "peak alloc / reserved",
    "warm-up",
    "verdict",
)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def stage_rows(result: TuneResult) -> list[list[str]]:
    base = result.baseline.measurement.stages() if result.baseline.measurement else {}
    rows = []
    entries = [(result.baseline.name, result.baseline)] + [(v.name, v) for v in result.variants if v.measurement]
    for name, v in entries:
        st = v.measurement.stages() if v.measurement else {}
        if not st:
            continue
        cells = [name]
        for k in (*STAGE_KEYS, "total"):
            val = st.get(k)
            b = base.get(k)
            delta = "" if name == "baseline" or b is None or val is None else f" ({val - b:+.4f})"
            cells.append(f"{_s(val)}{delta}")
        rows.append(cells)
    if result.best and result.best_stages:
        st = result.best_stages
        rows.append(
            ["best: " + " + ".join(result.best)]
            + [
                f"{_s(st.get(k))}"
                + ("" if base.get(k) is None or st.get(k) is None else f" ({st.get(k, 0.0) - base.get(k, 0.0):+.4f})")
                for k in (*STAGE_KEYS, "total")
            ]
        )
    return rows


STAGE_HEADER = ("configuration", "text_encode s", "denoise s", "vae_decode s", "postprocess s", "total s")


def floor_lines(result: TuneResult) -> list[str]:
    den, gen = result.floor_seconds()
    f, r = result.flops, result.rate
    if f is None or r is None:
        return ["Compute floor: not measured."]
    best = result.best_stats or result.baseline.stats
    lines = [
        f"- FLOPs ({'counted with FlopCounterMode' if f.method == 'FlopCounterMode' else 'estimated: ' + f.method}): "
        + (
            f"{_flop(f.denoiser_flops_per_forward)} per denoiser forward × {f.denoiser_forwards} forwards"
            if f.denoiser_flops_per_forward and f.denoiser_forwards
            else "denoiser share unknown"
        )
        + (f"; {_flop(f.generation_flops)} per generation (text encoder, denoiser, VAE)" if f.generation_flops else ""),
        f"- measured matmul rate on {result.device} ({r.dtype}, {r.side}³ matmuls): {_flop(r.flops_per_second)}/s",
    ]
    if den is not None:
        lines.append(
            f"- denoise floor {den:.4f} s; whole-generation floor " + ("not counted" if gen is None else f"{gen:.4f} s")
        )
    if best is not None and gen:
        lines.append(
            f"- best p50 {best.p50:.4f} s = {best.p50 / gen:.2f}× the generation floor "
            f"({gen / best.p50:.0%} of the measured matmul rate sustained over a generation)"
        )
    return lines


def _flop(value: float | None) -> str:
    return format_value(value, "B").replace("B", "FLOP") if value else "—"


def lossy_winner_notes(result: TuneResult) -> list[str]:
    return [
        f"{v.name} is lossy and measurably faster ({v.gain:+.1%}, output {_output(v)}): left out of the snippet; "
        "judge its images, then add it by hand or rerun with --allow-lossy"
        for v in result.variants
        if v.lossy and v.verdict == "faster" and v.gain is not None and v.name not in result.best
    ]


def all_notes(result: TuneResult) -> list[str]:
    notes = [f"{v.name}: {v.note}" for v in result.variants if v.note and v.status == "measured"]
    return notes + lossy_winner_notes(result) + result.notes


def render_markdown(result: TuneResult) -> str:
    w = result.workload
    o = result.options
    out = [
        f"# zmon tune: {result.model_id}",
        "",
        f"{result.pipeline_class} on {result.device} ({result.device_name or 'unknown'}), {result.dtype}; "
        f"{', '.join(w['resolutions'])}, {w['steps']} steps, guidance {w['guidance_scale']}, batch "
        f"{w['batch_size']}. {o.rounds} interleaved round(s) × {o.per_round} measured generation(s) per "
        f"configuration; noise floor {format_value(result.noise_floor, 'ratio')}; exact variants must reach "
        f"PSNR ≥ {result.tolerance_db:.0f} dB against the baseline. {result.elapsed_seconds:.0f} s in all.",
        "",
        f"## Result: {headline(result)}",
        "",
        _md_table(table_header(result), table_rows(result)),
        "",
    ]
    if result.combination:
        out += [
            "## Combination (greedy, largest gain first)",
            "",
            "Each step re-measures the current best and the candidate in interleaved rounds of their own; the "
            "best configuration's figures come from its last such round, the baseline's from the main rounds.",
            "",
        ]
        for s in result.combination:
            base = " + ".join(s.current)
            if s.kept:
                out.append(f"- kept **{s.added}** on top of {base}: {s.verdict} ({s.gain:+.1%})")
            else:
                out.append(f"- dropped {s.added} on top of {base}: {s.reason}")
        out.append("")
    out += [
        "## Per-stage effect (median seconds; Δ vs baseline)",
        "",
        _md_table(STAGE_HEADER, stage_rows(result)),
        "",
        "## Compute floor",
        "",
        *floor_lines(result),
        "",
    ]
    notes = [f"- {n}" for n in all_notes(result)]
    if notes:
        out += ["## Notes", "", *notes, ""]
    out += [
        "## Configuration snippet",
        "",
        "Merge into your config (or run `zmon run -c tune.config.yaml`, the whole configuration with it):",
        "",
        "```yaml",
        snippet_yaml(result).rstrip(),
        "```",
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ HTML


def bar_chart(
    rows: Sequence[tuple[str, float | None, float | None, float | None, str, str]],
    *,
    unit: str,
    label: str,
    ref: float | None = None,
) -> str:
    """Horizontal bars (name, value, low, high, color, tooltip) with a whisker from low to high."""
    values = [v for _, v, _, hi, _, _ in rows for v in (v, hi) if v is not None]
    if not values:
        return "<p class='note'>not measured</p>"
    width, left, bar_h, gap, top = 900, 230, 18, 8, 8
    plot = width - left - 130
    height = top + len(rows) * (bar_h + gap) + 28
    hi_all = max(values) * 1.05 or 1.0
    x_of = lambda v: left + plot * max(v, 0.0) / hi_all  # noqa: E731
    body = []
    for i, (name, v, lo, hi, color, tip) in enumerate(rows):
        y = top + i * (bar_h + gap)
        body.append(_text(left - 8, y + bar_h * 0.75, name, "end"))
        if v is None:
            body.append(_text(left + 4, y + bar_h * 0.75, tip or "not measured"))
            continue
        body.append(_rect(left, y, x_of(v) - left, bar_h, color, tip))
        if lo is not None and hi is not None:
            yc = y + bar_h / 2
            body.append(
                f'<line x1="{x_of(lo):.1f}" y1="{yc:.1f}" x2="{x_of(hi):.1f}" y2="{yc:.1f}" '
                'stroke="#1d2327" stroke-width="1.5"/>'
            )
            for xv in (lo, hi):
                body.append(
                    f'<line x1="{x_of(xv):.1f}" y1="{y + 3:.1f}" x2="{x_of(xv):.1f}" '
                    f'y2="{y + bar_h - 3:.1f}" stroke="#1d2327" stroke-width="1.5"/>'
                )
        body.append(_text(max(x_of(v), x_of(hi or v)) + 6, y + bar_h * 0.75, format_value(v, unit)))
    if ref is not None:
        body.append(
            f'<line x1="{x_of(ref):.1f}" y1="{top}" x2="{x_of(ref):.1f}" '
            f'y2="{top + len(rows) * (bar_h + gap)}" stroke="#2e86ab" stroke-dasharray="4 3"/>'
        )
    axis = top + len(rows) * (bar_h + gap) + 14
    for t in _nice_ticks(0, hi_all, 5):
        body.append(_text(x_of(t), axis, format_value(t, unit), "middle"))
    return _svg(width, height, body, label)


def latency_chart(result: TuneResult) -> str:
    rows = []
    for v in [result.baseline, *result.variants]:
        s = v.stats
        color = "#2e86ab" if v.status == "baseline" else VERDICT_COLORS.get(v.verdict or "", "#b0b0b0")
        tip = (
            f"{v.name}: p50 {s.p50:.4f} s, IQR {s.q1:.4f}–{s.q3:.4f}, min–max {s.min:.4f}–{s.max:.4f}, n={s.n}"
            if s
            else f"{v.status}: {v.reason}"
        )
        rows.append((v.name, s.p50 if s else None, s.min if s else None, s.max if s else None, color, tip))
    base = result.baseline.stats
    return bar_chart(rows, unit="s", label="latency per variant", ref=base.p50 if base else None)


def memory_chart(result: TuneResult) -> str:
    rows = []
    for v in [result.baseline, *result.variants]:
        if v.measurement is None:
            continue
        alloc, reserved = v.measurement.peaks()
        rows.append(
            (
                v.name,
                None if alloc is None else float(alloc),
                None,
                None if reserved is None else float(reserved),
                "#a05195",
                ""
                if alloc is None
                else f"peak allocated {format_value(alloc, 'B')}, reserved {format_value(reserved, 'B')}",
            )
        )
    if not rows or all(r[1] is None for r in rows):
        return "<p class='note'>Peak memory: CUDA only (not measured on this device).</p>"
    return bar_chart(
        [(n, v, v, hi, c, t) for n, v, _, hi, c, t in rows],
        unit="B",
        label="peak memory per variant (bar: allocated, whisker to reserved)",
    )


def output_chart(result: TuneResult) -> str:
    rows = []
    cap = 120.0  # identical outputs drawn at the cap (infinite PSNR)
    for v in result.variants:
        o = v.output
        if o is None:
            continue
        psnr = cap if o.identical else (o.psnr_db if o.finite and o.psnr_db is not None else 0.0)
        ok = (v.lossy or psnr >= result.tolerance_db) and o.finite
        color = "#2f8f4e" if ok else "#c0392b"
        rows.append(
            (v.name, min(psnr, cap), None, None, color, f"{v.name}: {_output(v)}" + (" (lossy)" if v.lossy else ""))
        )
    if not rows:
        return "<p class='note'>No variant produced outputs to compare.</p>"
    return bar_chart(rows, unit="", label="PSNR against the baseline (dB; identical = 120)", ref=result.tolerance_db)


def render_html(result: TuneResult) -> str:
    """The report as one HTML document with inline CSS and SVG: no scripts, no external assets."""
    notes = "".join(f"<li>{escape(n)}</li>" for n in all_notes(result))
    combo = "".join(
        f"<li>{'kept' if s.kept else 'dropped'} <b>{escape(s.added)}</b> on top of {escape(' + '.join(s.current))}"
        f": {escape(s.verdict or '') if s.kept else escape(s.reason)}</li>"
        for s in result.combination
    )
    o = result.options
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>zmon tune: {escape(result.model_id)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>zmon tune: {escape(result.model_id)}</h1>",
        f"<div class='meta'>{escape(result.pipeline_class)} on {escape(result.device)} "
        f"({escape(result.device_name or 'unknown')}), {escape(result.dtype)} · {o.rounds} interleaved rounds × "
        f"{o.per_round} measured generations per configuration · noise floor "
        f"{escape(format_value(result.noise_floor, 'ratio'))} · tolerance PSNR ≥ {result.tolerance_db:.0f} dB · "
        f"{result.elapsed_seconds:.0f} s</div>",
        f"<section class='card'><h3>{escape(headline(result))}</h3>",
        f"<pre>{escape(snippet_yaml(result))}</pre></section>",
        "<h2>Latency per variant</h2>",
        "<div class='card'><p class='meta'>Bar: median; whisker: min–max; dashed line: baseline median. "
        "Green: measurably faster, red: measurably slower, grey: no measurable gain.</p>"
        f"{latency_chart(result)}</div>",
        f"<div class='card'>{_table(table_header(result), table_rows(result))}</div>",
        f"<div class='card'><h3>Peak memory</h3>{memory_chart(result)}</div>",
        "<div class='card'><h3>Output difference (PSNR vs baseline, dB)</h3><p class='meta'>Same prompt and "
        f"seeds; dashed line: the tolerance exact variants must reach ({result.tolerance_db:.0f} dB); identical "
        f"outputs drawn at 120.</p>{output_chart(result)}</div>",
        "<h2>Per-stage effect</h2>",
        f"<div class='card'>{_table(STAGE_HEADER, stage_rows(result))}</div>",
        f"<h2>Combination</h2><div class='card'><ul>{combo or '<li>no second winner to combine</li>'}</ul></div>",
        "<h2>Compute floor</h2>",
        "<div class='card'><ul>"
        + "".join(f"<li>{escape(x.lstrip('- '))}</li>" for x in floor_lines(result))
        + "</ul></div>",
        f"<h2>Notes</h2><div class='card'><ul>{notes or '<li>none</li>'}</ul></div>",
        f"<h2>Environment</h2><div class='card'>{_table(('package', 'version'), sorted((k, v or '—') for k, v in result.versions.items()))}</div>",  # noqa: E501
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ files


def write_reports(result: TuneResult, out_dir: str | Path) -> dict[str, Path]:
    """tune.json, tune.md, tune.html and tune.config.yaml in out_dir (created); returns {format: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "json": json.dumps(to_dict(result), indent=2, allow_nan=False, default=str) + "\n",
        "md": render_markdown(result),
        "html": render_html(result),
        "config": f"# zmon tune: {headline(result)}\n"
        + yaml.safe_dump(full_config(result), sort_keys=False, default_flow_style=False),
    }
    written: dict[str, Path] = {}
    for fmt, text in contents.items():
        path = out / FILENAMES[fmt]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written[fmt] = path
    return written
