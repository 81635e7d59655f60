"""Render the Grafana dashboard's panels from real Prometheus query results (no Grafana needed).

Starts `zmon run` on the embedded tiny model (CPU) and a Prometheus scraping it every second (with the shipped
recording rules), waits, then runs every panel's queries through /api/v1/query_range and writes a
self-contained HTML page of inline SVG line charts plus a PNG screenshot of it (headless chromium):

    .venv-dev/bin/python tools/render_panels.py --seconds 90 --out docs/

The output is labelled as what it is: a rendering of query results, not a Grafana screenshot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.catalogue import grafana_to_promql, load_dashboard, metric_names  # noqa: E402
from tests.services import get_json, prometheus, zmon_process  # noqa: E402

PROM_RULES = ROOT / "deploy" / "prometheus"
GPU_ONLY_PREFIXES = ("zmon_gpu_", "zmon_nvml_", "zmon_torch_")
COLORS = ["#3274d9", "#e0752d", "#56a64b", "#a352cc", "#e02f44", "#37872d", "#8ab8ff", "#f2cc0c"]
COLUMNS = 3
CARD_H = 325  # px, fixed so the page height is known in advance
ROW_HEAD_H = 48
BANNER_H = 130
MAX_LEGEND = 6

# ---------------------------------------------------------------- running zmon + Prometheus


def zmon_config(tmp: Path) -> Path:
    cfg = {
        "model": {"id": "builtin:tiny-z-image", "cache_dir": str(tmp / "cache"), "cpu_threads": 1},
        "sampling": {"allocator": {"enabled": False}},
        "workload": {"prompt_cache": {"enabled": True}},
    }
    path = tmp / "zmon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prom_query(prom: str, path: str, **params: Any) -> dict[str, Any]:
    data: dict[str, Any] = get_json(f"{prom}{path}?{urllib.parse.urlencode(params)}")
    return data


def collect(seconds: float, step: float, tmp: Path) -> tuple[list[dict[str, Any]], float, float]:
    """Panels (dashboard order, rows included) with their query results attached; and the window."""
    cfg = zmon_config(tmp)
    args = ["run", "--config", str(cfg), "--max-generations", "1000000", "--linger", str(int(seconds) + 600)]
    with zmon_process(args, env={"OMP_NUM_THREADS": "1"}, ready_timeout=300) as (zmon_url, _proc):
        prom_cfg = f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [zmon.recording.yml]
scrape_configs:
  - job_name: zmon
    static_configs:
      - targets: ['{zmon_url.removeprefix("http://")}']
"""
        rules = {"zmon.recording.yml": (PROM_RULES / "zmon.recording.yml").read_text()}
        with prometheus(tmp, prom_cfg, rule_files=rules) as prom:
            start = time.time()
            print(f"zmon at {zmon_url}, Prometheus at {prom}; collecting for {seconds:.0f}s", flush=True)
            time.sleep(seconds)
            end = time.time()
            panels = []
            for p in load_dashboard()["panels"]:
                p = dict(p)
                p["_results"] = []
                for t in p.get("targets", []):
                    expr = t.get("expr")
                    if not expr:
                        continue
                    r = prom_query(
                        prom,
                        "/api/v1/query_range",
                        query=grafana_to_promql(expr),
                        start=f"{start:.3f}",
                        end=f"{end:.3f}",
                        step=f"{step:g}",
                    )
                    if r.get("status") != "success":
                        raise RuntimeError(f"{p.get('title')}: {expr}: {r}")
                    p["_results"].append((t, expr, r["data"]["result"]))
                panels.append(p)
            return panels, start, end


# ---------------------------------------------------------------- formatting


def fmt(v: float, unit: str | None) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if unit == "percentunit":
        return f"{v * 100:.3g}%"

    def si(x: float, base: float, suffixes: list[str]) -> str:
        i = 0
        while abs(x) >= base and i < len(suffixes) - 1:
            x /= base
            i += 1
        return f"{x:.3g} {suffixes[i]}".rstrip()

    if unit == "bytes":
        return si(v, 1024, ["B", "KiB", "MiB", "GiB", "TiB"])
    if unit == "Bps":
        return si(v, 1024, ["B/s", "KiB/s", "MiB/s", "GiB/s"])
    if unit == "s":
        if v != 0 and abs(v) < 1:
            return f"{v * 1000:.3g} ms"
        return f"{v:.3g} s"
    if unit == "ops":
        return f"{v:.3g} /s"
    if unit == "watt":
        return f"{v:.3g} W"
    if unit == "celsius":
        return f"{v:.3g} °C"
    if unit == "hertz":
        return si(v, 1000, ["Hz", "kHz", "MHz", "GHz"])
    return si(v, 1000, ["", "k", "M", "G", "T"])


def legend_name(target: dict[str, Any], metric: dict[str, str]) -> str:
    lf = target.get("legendFormat")
    if lf and lf != "__auto":
        return re.sub(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}", lambda m: metric.get(m.group(1), ""), lf).strip()
    labels = {k: v for k, v in metric.items() if k not in ("job",)}
    name = labels.pop("__name__", "")
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else name


def is_gpu_only(panel: dict[str, Any]) -> bool:
    names: set[str] = set()
    for _t, expr, _r in panel["_results"]:
        names |= metric_names(expr)
    return any(n.startswith(GPU_ONLY_PREFIXES) for n in names)


# ---------------------------------------------------------------- SVG / HTML


def chart_svg(panel: dict[str, Any], start: float, end: float) -> tuple[str, list[tuple[str, str]]]:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    if panel.get("type") == "heatmap":
        unit = "short"  # plotted as one line per bucket (counts); the unit belongs to the bucket bounds
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for t, _expr, result in panel["_results"]:
        for s in result:
            pts = [(float(ts), float(v)) for ts, v in s["values"]]
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                series.append((legend_name(t, s["metric"]), pts))
    w, h, left, right, top, bottom = 420, 170, 64, 8, 8, 22
    if not series:
        return "", []
    ys = [y for _n, pts in series for _x, y in pts]
    lo, hi = min(ys), max(ys)
    if lo > 0 and lo < hi * 0.5:
        lo = 0.0
    if hi == lo:
        lo, hi = (lo - 1, hi + 1) if lo == 0 else (min(0.0, lo), max(0.0, hi) * 1.1 or 1.0)
    pw, ph = w - left - right, h - top - bottom

    def px(x: float) -> float:
        return left + (x - start) / (end - start) * pw

    def py(y: float) -> float:
        return top + (1 - (y - lo) / (hi - lo)) * ph

    out = [
        f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#181b1f" stroke="#2c3235"/>',
    ]
    for frac in (0.25, 0.5, 0.75):
        y = top + frac * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>')
    out.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" class="ax">{html.escape(fmt(hi, unit))}</text>')
    out.append(f'<text x="{left - 4}" y="{top + ph}" text-anchor="end" class="ax">{html.escape(fmt(lo, unit))}</text>')
    t0 = dt.datetime.fromtimestamp(start, dt.UTC).strftime("%H:%M:%S")
    t1 = dt.datetime.fromtimestamp(end, dt.UTC).strftime("%H:%M:%S")
    out.append(f'<text x="{left}" y="{h - 6}" class="ax">{t0}</text>')
    out.append(f'<text x="{left + pw}" y="{h - 6}" text-anchor="end" class="ax">{t1} UTC</text>')
    legend = []
    for i, (name, pts) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        if len(pts) == 1:
            x, y = pts[0]
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{c}"/>')
        else:
            poly = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{poly}" fill="none" stroke="{c}" stroke-width="1.6"/>')
        if panel.get("type") == "heatmap":
            name = f"le={name}"
        legend.append((c, f"{name or '(value)'} — last {fmt(pts[-1][1], unit)}"))
    out.append("</svg>")
    return "".join(out), legend


def card_html(panel: dict[str, Any], start: float, end: float) -> tuple[str, bool]:
    title = html.escape(panel.get("title", ""))
    kind = html.escape(panel.get("type", ""))
    svg, legend = chart_svg(panel, start, end)
    if not svg:
        msg = "no data on CPU (GPU-only)" if is_gpu_only(panel) else "no data in this run"
        body = f'<div class="empty">{msg}</div>'
    else:
        items = "".join(
            f'<li><span class="sw" style="background:{c}"></span>{html.escape(t)}</li>' for c, t in legend[:MAX_LEGEND]
        )
        more = f'<li class="more">… {len(legend) - MAX_LEGEND} more series</li>' if len(legend) > MAX_LEGEND else ""
        body = f'{svg}<ul class="lg">{items}{more}</ul>'
    return f'<div class="card"><div class="ttl">{title}<span class="kind">{kind}</span></div>{body}</div>', bool(svg)


CSS = f"""
body{{margin:0;background:#111217;color:#ccccdc;font:13px/1.35 'DejaVu Sans',Arial,sans-serif}}
.banner{{height:{BANNER_H - 24}px;box-sizing:border-box;margin:12px;padding:14px 18px;border:3px solid #f2cc0c;
  background:#2a2410;color:#f8e58c;border-radius:6px}}
.banner b{{font-size:19px;color:#fff3b0}} .banner div{{margin-top:6px}}
h2{{height:{ROW_HEAD_H - 16}px;margin:8px 12px;padding:4px 8px 0;font-size:17px;color:#fff;
  border-bottom:1px solid #34373d}}
.grid{{display:grid;grid-template-columns:repeat({COLUMNS},1fr);gap:10px;margin:0 12px 10px}}
.card{{height:{CARD_H - 10}px;box-sizing:border-box;overflow:hidden;background:#181b1f;border:1px solid #2c3235;
  border-radius:4px;padding:6px 8px}}
.ttl{{font-weight:bold;color:#fff;margin-bottom:4px;white-space:nowrap;overflow:hidden}}
.kind{{float:right;font-weight:normal;color:#7b7f87;font-size:11px}}
svg{{display:block;width:100%;height:auto}} .ax{{fill:#9fa3ab;font-size:10px}}
.lg{{list-style:none;margin:4px 0 0;padding:0;font-size:11px}}
.lg li{{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}} .lg .more{{color:#7b7f87}}
.sw{{display:inline-block;width:10px;height:3px;margin:0 5px 3px 0;vertical-align:middle}}
.empty{{height:200px;display:flex;align-items:center;justify-content:center;color:#7b7f87;font-style:italic;
  border:1px dashed #34373d;margin-top:6px}}
"""


def build_html(panels: list[dict[str, Any]], start: float, end: float) -> tuple[str, int, int, int]:
    """The page, its height in px, and counts of panels with data / without."""
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for p in panels:
        if p.get("type") == "row":
            groups.append((p.get("title", ""), []))
        else:
            if not groups:
                groups.append(("", []))
            groups[-1][1].append(p)
    when = dt.datetime.fromtimestamp(end, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f'<div class="banner"><b>Rendered from Prometheus query results by tools/render_panels.py — not a '
        f"Grafana screenshot.</b><div>zmon run on the embedded model, CPU host, {when}. Window "
        f"{end - start:.0f} s, scrape every 1 s, query_range step 2 s; panel queries from "
        f"grafana/dashboards/zmon.json with $instance/$gpu = .*, $__rate_interval/$__range = 1m.</div></div>"
    ]
    height, with_data, empty = BANNER_H, 0, 0
    for title, ps in groups:
        if not ps:
            continue
        body.append(f'<h2>{html.escape(title)}</h2><div class="grid">')
        height += ROW_HEAD_H
        for p in ps:
            card, has = card_html(p, start, end)
            body.append(card)
            with_data += has
            empty += not has
        body.append("</div>")
        height += math.ceil(len(ps) / COLUMNS) * CARD_H + 10
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>zmon dashboard preview (rendered, not Grafana)'
        f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return page, height + 20, with_data, empty


def screenshot(html_path: Path, png: Path, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: the HTML is written, the PNG is not")
    with tempfile.TemporaryDirectory(prefix="zmon-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size=1400,{height}",
                f"--screenshot={png.resolve()}",
                html_path.resolve().as_uri(),
            ],
            check=True,
            timeout=120,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90, help="how long Prometheus collects (default 90)")
    ap.add_argument("--step", type=float, default=2, help="query_range step in seconds (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="output folder (default docs/)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zmon-render-") as tmp:
        panels, start, end = collect(a.seconds, a.step, Path(tmp))
    page, height, with_data, empty = build_html(panels, start, end)
    html_path, png = a.out / "dashboard-preview.html", a.out / "dashboard-preview.png"
    html_path.write_text(page)
    screenshot(html_path, png, height)
    print(f"panels with data: {with_data}, without: {empty}; wrote {html_path} and {png} (1400x{height})")


if __name__ == "__main__":
    main()
