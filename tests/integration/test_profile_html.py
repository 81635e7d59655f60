"""The self-contained HTML report: static checks, then headless Chromium (screenshot, DOM, console)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes.profiles import HEALTHY_UTIL, gpu_env, gpu_trace, healthy_facts, make_records
from tests.services import require_binary
from zmon.analysis.diagnosis import diagnose
from zmon.analysis.facts import EnvironmentFacts, ProfileFacts, build_facts, cpu_points_from_counters
from zmon.analysis.html import render_html

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
# Page console output as Chromium logs it: `INFO:CONSOLE:1] "msg", source: …` (`CONSOLE(1)` in older builds).
CONSOLE_LINE = re.compile(r"CONSOLE[:(]\d+|Uncaught")
HOSTILE_MODEL = '<img src=x onerror="document.title=1">&"'


def gpu_profile() -> ProfileFacts:
    records = make_records(text=0.5)
    cpu = cpu_points_from_counters([(records[0].started_at - 1 + i * 0.1, i * 0.1, 0.4) for i in range(120)])
    return healthy_facts(
        records,
        gpu_samples=gpu_trace(records, {**HEALTHY_UTIL, "denoise_step": 0.5}, dt=0.05),
        cpu_samples=cpu,
        env=gpu_env(model_id=HOSTILE_MODEL),
    )


def cpu_profile() -> ProfileFacts:
    env = EnvironmentFacts(device="cpu", model_id="builtin:tiny-z-image")
    return build_facts(make_records(text=0.4, device="cpu"), env=env, warmup=1, created_at=1.0)


# ------------------------------------------------------------------------------------------------ static


def test_html_is_self_contained_and_escaped() -> None:
    facts = gpu_profile()
    page = render_html(facts, diagnose(facts))
    assert page.startswith("<!DOCTYPE html>")
    # Nothing fetched: no scripts, no external resources (the SVG namespace URI is a name, not a fetch).
    assert "<script" not in page
    assert not re.search(r"<[^>]*\b(src|href)\s*=|url\(|@import", page)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "<img" not in page
    assert "&lt;img src=x onerror=&quot;document.title=1&quot;&gt;&amp;&quot;" in page
    assert page.count("<svg") == page.count("</svg>") >= 6
    assert "cpu_bound" in page and "priority 1" in page


def test_html_of_a_cpu_run_notes_what_was_not_measured() -> None:
    facts = cpu_profile()
    page = render_html(facts, diagnose(facts))
    assert "GPU utilization: not measured (CPU-only run, or NVML unavailable)." in page
    assert "GPU memory over time: not measured." in page
    assert "CPU utilization: not measured." in page
    assert page.count("<svg") >= 3  # stages, timeline, latency still drawn


# ------------------------------------------------------------------------------------------------ Chromium


def _chromium() -> str:
    return require_binary(CHROMIUM)


@dataclass(frozen=True)
class Rendered:
    dom: str
    screenshot: Path
    console: list[str]


def _run(chromium: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="zmon-chromium-") as profile:
        return subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_LINE.search(line)]


def render(chromium: str, page: Path, shot: Path) -> Rendered:
    url = page.resolve().as_uri()
    dom = _run(chromium, ["--dump-dom", url])
    assert dom.returncode == 0, dom.stderr[-2000:]
    pic = _run(chromium, [f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", url])
    assert pic.returncode == 0, pic.stderr[-2000:]
    return Rendered(dom.stdout, shot, _console_lines(dom.stderr) + _console_lines(pic.stderr))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    chromium = _chromium()
    out = tmp_path_factory.mktemp("html")
    facts = gpu_profile()
    page = out / "profile.html"
    page.write_text(render_html(facts, diagnose(facts)), encoding="utf-8")
    return render(chromium, page, out / "shot.png")


def test_console_check_catches_page_errors(tmp_path: Path) -> None:
    """The console check itself works on this Chromium: a failing script shows up."""
    chromium = _chromium()
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>throw new Error('zmon-selftest')</script>")
    result = _run(chromium, ["--dump-dom", page.as_uri()])
    assert any("zmon-selftest" in line for line in _console_lines(result.stderr)), result.stderr[-2000:]


def test_report_renders_without_console_errors(rendered: Rendered) -> None:
    assert rendered.console == []


def test_dom_holds_verdict_and_charts(rendered: Rendered) -> None:
    dom = rendered.dom
    assert re.search(r"<div class=\"name\">cpu_bound</div>", dom)
    assert len(re.findall(r"<svg\b", dom)) >= 6
    for label in ("stage breakdown", "timeline of one generation", "latency distribution", "GPU utilization"):
        assert f'aria-label="{label}"' in dom
    assert "<polyline" in dom and "<rect" in dom
    # The hostile model id stayed text.
    assert "<img" not in dom and "onerror" in dom


def test_screenshot_is_not_blank(rendered: Rendered) -> None:
    image = Image.open(rendered.screenshot).convert("RGB")
    assert image.size == (1200, 2000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50
    # The verdict's red bar is painted (cpu_bound: #c0392b), not just the page background.
    target = (0xC0, 0x39, 0x2B)
    red = sum(
        n
        for n, rgb in colors
        if isinstance(rgb, tuple) and all(abs(c - t) < 24 for c, t in zip(rgb, target, strict=True))
    )
    assert red > 500
