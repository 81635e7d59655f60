"""Profile reports: profile.json (versioned), profile.md (also printed by the CLI) and profile.html."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zmon.analysis.diagnosis import Diagnosis
from zmon.analysis.facts import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, ProfileFacts
from zmon.analysis.html import render_html
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

PROFILE_KIND = "zmon.profile"
FILENAMES = {"json": "profile.json", "md": "profile.md", "html": "profile.html"}


# ------------------------------------------------------------------------------------------------ JSON


def profile_to_dict(facts: ProfileFacts, diagnosis: Diagnosis) -> dict[str, Any]:
    """The document written as profile.json (see docs/PROFILE_SCHEMA.md)."""
    return {
        "kind": PROFILE_KIND,
        "schema_version": SCHEMA_VERSION,
        "facts": facts.to_dict(),
        "diagnosis": diagnosis.to_dict(),
    }


def profile_from_dict(data: Mapping[str, Any]) -> tuple[ProfileFacts, Diagnosis]:
    """Parse a profile.json document; ValueError for another kind or schema version."""
    if data.get("kind") != PROFILE_KIND:
        raise ValueError(f"not a zmon profile (kind {data.get('kind')!r})")
    if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"profile schema_version {data.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return ProfileFacts.from_dict(data["facts"]), Diagnosis.from_dict(data["diagnosis"])


def load_profile(path: str | Path) -> tuple[ProfileFacts, Diagnosis]:
    """Read a profile.json written by `write_reports`."""
    return profile_from_dict(json.loads(Path(path).read_text()))


def write_reports(
    facts: ProfileFacts,
    diagnosis: Diagnosis,
    out_dir: str | Path,
    formats: Iterable[str] = ("json", "md", "html"),
) -> dict[str, Path]:
    """Write the requested reports into out_dir (created if needed); returns {format: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderers = {
        "json": lambda: json.dumps(profile_to_dict(facts, diagnosis), indent=2, allow_nan=False) + "\n",
        "md": lambda: render_markdown(facts, diagnosis),
        "html": lambda: render_html(facts, diagnosis),
    }
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt not in renderers:
            raise ValueError(f"unknown report format {fmt!r} (expected one of {sorted(renderers)})")
        path = out / FILENAMES[fmt]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(renderers[fmt](), encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a report
        written[fmt] = path
    return written


# ------------------------------------------------------------------------------------------------ Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _section(title: str, header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    return [f"## {title}", "", *_table(header, rows), ""]


def render_markdown(facts: ProfileFacts, diagnosis: Diagnosis) -> str:
    """The whole profile as Markdown: verdict and evidence first, then findings, then the measurements."""
    d = diagnosis
    out = [
        f"# zmon profile: {headline(facts)}",
        "",
        f"{created(facts)}, {facts.baseline.generations} steady-state generations "
        f"({len(facts.baseline.excluded)} left out: warm-up, compiles, outliers).",
        "",
        f"## Verdict: `{d.verdict}` (confidence {d.confidence})",
        "",
        f"**{d.action}**",
        "",
        d.summary,
        "",
    ]
    if d.caveats:
        out += [*(f"> {c}" for c in d.caveats), ""]
    flow_rows = [
        (str(i), s.question, s.answer.replace("_", " "), s.basis, "; ".join(evidence_text(s.evidence)))
        for i, s in enumerate(d.steps, 1)
    ]
    out += _table(("#", "question", "answer", "decided by", "evidence"), flow_rows)
    out += ["", "## Findings", ""]
    active = d.active_findings
    if not active:
        out += ["No bottleneck or misconfiguration found.", ""]
    for i, f in enumerate(active, 1):
        out += [
            f"### {i}. {f.title} (priority {f.priority}: impact {f.impact}, effort {f.effort})",
            "",
            f"{f.summary[:1].upper()}{f.summary[1:]}.",
            "",
            f"**Fix:** {f.fix}",
            "",
        ]
        out += [f"- {line}" for line in evidence_text(f.evidence)]
        out.append("")
    inactive = [f for f in d.findings if not f.active]
    if inactive:
        out += ["Not found:", ""]
        out += _table(("check", "priority", "state"), [(f.title, str(f.priority), f.summary) for f in inactive])
        out.append("")
    out += _section("Baseline", ("figure", "value"), baseline_rows(facts))
    if facts.baseline.excluded:
        out += _section("Left out of the steady state", EXCLUDED_HEADER, excluded_rows(facts))
    out += _section("Stages", STAGE_HEADER, stage_rows(facts))
    out += [*_table(("denoise steps", "value"), step_rows(facts)), ""]
    if not facts.utilization.gpu_measured:
        out += ["GPU utilization: not measured.", ""]
    out += _section("Memory", ("figure", "value"), memory_rows(facts))
    out += _section("I/O", ("figure", "value"), io_rows(facts))
    if facts.multi_gpu is not None:
        out += _section("Multi-GPU", ("figure", "value"), multi_gpu_rows(facts))
    out += _section("Environment", ("", "value"), environment_rows(facts))
    return "\n".join(out)
