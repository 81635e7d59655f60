"""profile.json / profile.md reports, their schema document, and before/after comparison."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from tests.fakes.profiles import HEALTHY_UTIL, gpu_trace, healthy_facts, make_records
from zmon.analysis.compare import compare, compare_files, render_comparison
from zmon.analysis.diagnosis import diagnose
from zmon.analysis.facts import ProfileFacts
from zmon.analysis.report import load_profile, profile_to_dict, render_markdown, write_reports

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "PROFILE_SCHEMA.md"


def _facts(records_text: float = 0.05, util: float = 0.97) -> ProfileFacts:
    records = make_records(text=records_text)
    util_by_stage = {**HEALTHY_UTIL, "denoise_step": util}
    return healthy_facts(records, gpu_samples=gpu_trace(records, util_by_stage, idle=0.9))


def test_markdown_leads_with_verdict_and_evidence() -> None:
    facts = _facts(0.5, 0.5)
    d = diagnose(facts)
    md = render_markdown(facts, d)
    assert md.startswith("# zmon profile: Tongyi-MAI/Z-Image-Turbo on NVIDIA H100 80GB HBM3")
    verdict_at = md.index("## Verdict: `cpu_bound`")
    assert verdict_at < md.index("## Findings") < md.index("## Baseline") < md.index("## Stages")
    assert md.index("## Stages") < md.index("## Memory") < md.index("## I/O") < md.index("## Environment")
    assert "GPU utilization over whole generations 64% < 80%" in md
    assert "## Verdict: `cpu_bound` (confidence high)" in md and "> 1 generation(s) left out" in md
    assert "CPU bottleneck: optimize data loading, prompt encoding and output processing" in md
    # The first finding is the priority-1 CPU-side one, with its fix.
    first = md.index("### 1. ")
    assert md[first:].startswith("### 1. CPU-bound: data loading and prompt encoding (priority 1")
    assert "**Fix:** the GPU is idle 36% of each generation, most of it in the denoise steps" in md
    assert "| text_encode | 0.500 s |" in md


def test_markdown_of_a_cpu_run_says_not_measured() -> None:
    from zmon.analysis.facts import EnvironmentFacts, build_facts

    facts = build_facts(make_records(device="cpu"), env=EnvironmentFacts(device="cpu"), warmup=1, created_at=1.0)
    md = render_markdown(facts, diagnose(facts))
    assert "GPU utilization: not measured." in md
    assert (
        "| 1 | Is the GPU idle for more than the threshold over whole generations or between them, with the CPU side "
        "behind it?"
        " | not measured |"
    ) in md


def test_write_reports_and_load_profile_round_trip(tmp_path: Path) -> None:
    facts = _facts(0.5, 0.5)
    d = diagnose(facts)
    paths = write_reports(facts, d, tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {
        "json": "profile.json",
        "md": "profile.md",
        "html": "profile.html",
    }
    doc = json.loads(paths["json"].read_text())
    assert (doc["kind"], doc["schema_version"]) == ("zmon.profile", 2)
    assert doc["diagnosis"]["verdict"] == "cpu_bound"
    assert load_profile(paths["json"]) == (facts, d)
    assert paths["md"].read_text() == render_markdown(facts, d)
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ValueError, match="unknown report format"):
        write_reports(facts, d, tmp_path, formats=["pdf"])


def test_load_profile_rejects_other_documents(tmp_path: Path) -> None:
    facts = _facts()
    doc = profile_to_dict(facts, diagnose(facts))
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**doc, "schema_version": 3}))
    with pytest.raises(ValueError, match="schema_version 3"):
        load_profile(path)
    # version 1 (before the excluded runs, gaps and GPM fields) still reads, with their defaults
    old = {**doc, "schema_version": 1, "facts": {**doc["facts"], "schema_version": 1}}
    del old["facts"]["baseline"]["excluded"], old["facts"]["stages"]["gaps"]
    path.write_text(json.dumps(old))
    facts1, _ = load_profile(path)
    assert facts1.baseline.excluded == () and facts1.stages.gaps == ()
    path.write_text(json.dumps({**doc, "kind": "other"}))
    with pytest.raises(ValueError, match="not a zmon profile"):
        load_profile(path)


def _field_paths(cls: type, prefix: str = "") -> set[str]:
    import typing

    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.add(path)
        for arg in (hints[f.name], *typing.get_args(hints[f.name])):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg) and prefix.count(".") < 1:
                out |= _field_paths(arg, path + ".")
    return out


def test_schema_document_names_every_field() -> None:
    text = SCHEMA_DOC.read_text()
    documented = set(re.findall(r"`([a-z_][a-z0-9_.]*)`", text))
    missing = sorted(p for p in _field_paths(ProfileFacts) if p not in documented)
    assert not missing, f"docs/PROFILE_SCHEMA.md lacks: {missing}"
    for key in ("verdict", "summary", "action", "steps", "findings", "thresholds", "evidence", "holds"):
        assert f"`{key}`" in text


# ------------------------------------------------------------------------------------------------ compare


def test_compare_two_profiles() -> None:
    bf = _facts(0.5, 0.5)
    af = _facts(0.05, 0.97)
    before = profile_to_dict(bf, diagnose(bf))
    after = profile_to_dict(af, diagnose(af))
    c = compare(before, after)
    assert (c.before_verdict, c.after_verdict, c.verdict_changed) == ("cpu_bound", "optimized", True)
    assert "cpu_bound" in c.resolved_findings and c.new_findings == ()

    assert bf.baseline.latency is not None and af.baseline.latency is not None
    mean = c.get("latency mean")
    assert mean is not None
    assert mean.before == pytest.approx(bf.baseline.latency.mean)
    assert mean.after == pytest.approx(af.baseline.latency.mean)
    assert mean.delta == pytest.approx(-0.45)
    assert mean.delta_pct == pytest.approx(-0.45 / bf.baseline.latency.mean)
    assert mean.direction == "better"

    text = c.get("stage text_encode mean")
    assert text is not None and text.delta == pytest.approx(-0.45) and text.direction == "better"
    assert c.get("stage denoise_step mean").direction == "same"  # type: ignore[union-attr]
    util = c.get("GPU utilization during diffusion")
    assert util is not None and util.direction == "better" and util.delta == pytest.approx(0.47, abs=0.02)
    assert c.get("checkpoint load").direction == "n/a"  # type: ignore[union-attr]

    # Swapped, everything that got better got worse.
    back = compare(after, before)
    assert back.get("latency mean").direction == "worse"  # type: ignore[union-attr]
    assert back.new_findings and "cpu_bound" in back.new_findings

    md = render_comparison(c)
    assert "**Verdict:** `cpu_bound` → `optimized`" in md
    assert "Resolved: cpu_bound" in md
    assert re.search(r"\| latency mean \| [\d.]+ s \| [\d.]+ s \| -0\.450 s \| -\d+\.\d% \| better \|", md)
    assert "checkpoint load" not in md  # unmeasured on both sides
    assert "| stage denoise_step mean" not in render_comparison(c, changed_only=True)
    json.dumps(c.to_dict(), allow_nan=False)


def test_compare_files_and_stages_seen_on_one_side(tmp_path: Path) -> None:
    bf = _facts()
    af = dataclasses.replace(bf, stages=dataclasses.replace(bf.stages, stages=bf.stages.stages[1:]))
    write_reports(bf, diagnose(bf), tmp_path / "a", formats=["json"])
    write_reports(af, diagnose(af), tmp_path / "b", formats=["json"])
    c = compare_files(tmp_path / "a" / "profile.json", tmp_path / "b" / "profile.json")
    gone = c.get("stage text_encode mean")
    assert gone is not None and gone.after is None and gone.direction == "n/a"
    assert not c.verdict_changed
    assert "(unchanged)" in render_comparison(c)
