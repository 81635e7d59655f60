"""`zmon profile` end to end on the embedded model, a real CPU-bound case, and `zmon compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zmon.analysis.diagnosis import RULES
from zmon.analysis.live import VERDICTS
from zmon.analysis.report import load_profile
from zmon.app.profile import profile_monitor
from zmon.capture.disk import disk_speed_test, drop_page_cache
from zmon.capture.profile import profile_pipeline
from zmon.capture.progress import Progress
from zmon.cli import main
from zmon.config import load_config
from zmon.instrumentation.hooks import HookRegistry

ROOT = Path(__file__).resolve().parents[2]
ENV = {"OMP_NUM_THREADS": "1"}  # the tiny model gains nothing from intra-op threads on a shared 2-core box
SLEEP_SECONDS = 0.05  # added to every text-encoder forward: text encoding then dominates the generation


def _config(tmp_path: Path, cache_dir: Path, extra: str = "") -> Path:
    path = tmp_path / "zmon.yaml"
    path.write_text(
        f"model:\n  cache_dir: {cache_dir}\n"
        "profiling:\n  disk_test_bytes: 4194304\n  sample_interval_seconds: 0.02\n" + extra
    )
    return path


# ------------------------------------------------------------------------------------------------ end to end


def test_zmon_profile_end_to_end(tiny_cache_dir: Path, tmp_path: Path) -> None:
    """Reports, consistent numbers, the Markdown on stdout, --trace files, and --memory-snapshot's CPU note."""
    config = _config(tmp_path, tiny_cache_dir)
    out = tmp_path / "report"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zmon",
            "profile",
            "-c",
            str(config),
            "--runs",
            "3",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--trace",
            "--memory-snapshot",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **ENV},
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 120
    for name in ("profile.json", "profile.md", "profile.html"):
        assert (out / name).is_file(), name
    md = (out / "profile.md").read_text()
    assert proc.stdout.strip() == md.strip()  # stdout is the Markdown report
    assert "## Verdict: `" in proc.stdout and "## Stages" in proc.stdout

    facts, diagnosis = load_profile(out / "profile.json")
    b = facts.baseline
    assert (b.warmup, b.generations, b.failed_generations) == (1, 3, 0)
    assert len(b.totals_seconds) == 3 and b.latency is not None and b.latency.n == 3
    assert diagnosis.verdict in VERDICTS
    assert {f.kind for f in diagnosis.findings} == {r.kind for r in RULES}
    # Stages nest inside the generation: their sum never exceeds it and covers most of it.
    stage_sum = sum(s.mean_seconds for s in facts.stages.stages)
    assert 0.6 * b.latency.mean < stage_sum <= b.latency.mean * 1.0001
    assert sum(s.share for s in facts.stages.stages) <= 1.0001
    assert {s.stage for s in facts.stages.stages} >= {"text_encode", "denoise_step", "vae_decode"}
    steps = facts.stages.get("denoise_step")
    assert steps is not None and steps.spans_per_generation == facts.workload.steps == 9
    tl = facts.stages.timeline
    assert facts.stages.timeline_total_seconds is not None
    assert sum(s.seconds for s in tl) <= facts.stages.timeline_total_seconds * 1.0001
    # CPU run: no GPU samples (unknown, not 0), CPU samples at the configured rate, stage CPU attributed.
    assert not facts.utilization.gpu_measured
    assert len(facts.utilization.cpu_samples) >= 3
    assert "denoise_step" in facts.utilization.process_cpu_by_stage
    # I/O: a measured load from a dropped page cache and a real disk test.
    io = facts.io
    assert io.checkpoint_load_seconds and io.checkpoint_load_seconds > 0
    assert io.checkpoint_bytes and io.checkpoint_bytes > 1_000_000
    assert io.cache_state == "cold"
    assert io.disk_read_bytes_per_second and io.disk_write_bytes_per_second
    assert io.first_generation_seconds is not None and io.first_generation_slowdown is not None
    assert facts.environment.torch_version and facts.environment.compiled is False
    assert not list(Path(io.model_dir or "/nonexistent").glob(".zmon-disktest-*"))  # test file removed

    # --trace: Chrome trace with the stage ranges, and a TensorBoard log directory.
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"zmon/denoise_step", "zmon/text_encode", "zmon/generation"} <= names
    assert list((out / "tb").glob("*.pt.trace.json"))
    # --memory-snapshot on CPU: a clear note, no file, exit 0.
    assert "--memory-snapshot needs CUDA" in proc.stderr
    assert not (out / "memory_snapshot.pickle").exists()


def test_invalid_workload_lists_every_problem_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"  # would be created by building the embedded model
    config = _config(
        tmp_path,
        cache,
        f"workload:\n  resolutions: ['64x65', 'big']\n  prompts_file: {tmp_path / 'missing.txt'}\n",
    )
    (tmp_path / "file").write_text("x")
    code = main(["profile", "-c", str(config), "--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 2
    assert "4 error(s)" in err
    for needle in ("resolutions[0]", "resolutions[1]", "prompts_file", "output_dir"):
        assert needle in err
    assert not cache.exists()


def test_invalid_config_and_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiling:\n  runs: 0\n  sample_interval: 1\n")
    assert main(["profile", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "profiling.runs" in err and "profiling.sample_interval: unknown key" in err
    with pytest.raises(SystemExit) as e:
        main(["profile", "--runs", "0"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ in process


@pytest.fixture
def slow_text_encoder(tiny_pipe: Any) -> Iterator[Any]:
    """The shared tiny pipeline with a text encoder that sleeps SLEEP_SECONDS per forward (undone after)."""
    encoder = tiny_pipe.text_encoder
    original = encoder.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLEEP_SECONDS)
        return original(*args, **kwargs)

    encoder.forward = slow_forward
    try:
        yield tiny_pipe
    finally:
        del encoder.forward


def _profile(pipe: Any, tmp_path: Path, name: str, *, cache: bool) -> Any:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a wooden table\n")  # one prompt: the cache hits after the warm-up
    yaml = (
        f"workload:\n  prompts_file: {prompts}\n  prompt_cache:\n    enabled: {str(cache).lower()}\n"
        "profiling:\n  sample_interval_seconds: 0.02\n"
    )
    (tmp_path / f"{name}.yaml").write_text(yaml)
    cfg = load_config(tmp_path / f"{name}.yaml", environ={})
    mon, history = profile_monitor(cfg)  # the sampler `zmon profile` uses: a Monitor without HTTP
    try:
        return profile_pipeline(pipe, cfg, sampling=mon, history=history, out_dir=tmp_path / name, runs=3, warmup=1)
    finally:
        mon.stop()


def test_slow_text_encoder_is_diagnosed_cpu_bound_and_the_cache_fixes_it(
    slow_text_encoder: Any, tmp_path: Path, torch_single_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _profile(slow_text_encoder, tmp_path, "before", cache=False)
    d = before.diagnosis
    assert d.verdict == "cpu_bound", d.summary
    assert d.steps[0].answer == "yes"
    finding = next(f for f in d.active_findings if f.kind == "cpu_bound")
    assert finding.fix is not None and "workload.prompt_cache.enabled: true" in finding.fix
    share = before.facts.stages.share("text_encode")
    assert share is not None and share > 0.25
    assert before.facts.stages.get("text_encode").mean_seconds >= SLEEP_SECONDS  # type: ignore[union-attr]
    assert len(before.records) == 4 and len(before.wall_seconds) == 4
    assert HookRegistry.get(slow_text_encoder) is None  # instrumentation removed

    after = _profile(slow_text_encoder, tmp_path, "after", cache=True)
    assert after.facts.workload.prompt_cache_hit_ratio == 1.0
    assert "cpu_bound" not in {f.kind for f in after.diagnosis.active_findings}
    assert after.facts.stages.get("text_encode") is None or (after.facts.stages.share("text_encode") or 0) < 0.1

    capsys.readouterr()
    code = main(["compare", str(before.paths["json"]), str(after.paths["json"])])
    text = capsys.readouterr().out
    assert code == 0
    assert "Resolved: cpu_bound" in text and "`cpu_bound` →" in text
    row = next(line for line in text.splitlines() if line.startswith("| latency p50 "))
    assert "| better |" in row and "-" in row.split("|")[4]


def test_compare_reports_a_missing_or_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text('{"kind": "something else"}')
    assert main(["compare", str(tmp_path / "nope.json"), str(garbage)]) == 2
    assert "nope.json: cannot read" in capsys.readouterr().err
    assert main(["compare", str(other), str(garbage)]) == 2
    assert "other.json: not a zmon profile.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ pieces


def test_disk_speed_test_measures_and_cleans_up(tmp_path: Path) -> None:
    speed = disk_speed_test(tmp_path, 3 * 1024 * 1024 + 5)
    assert speed.bytes_tested == 3 * 1024 * 1024 + 5
    assert speed.read_bytes_per_second > 0 and speed.write_bytes_per_second > 0
    assert list(tmp_path.iterdir()) == []


def test_drop_page_cache(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 4096)
    assert drop_page_cache([f]) == "cold"
    assert drop_page_cache([]) == "unknown"


def test_progress_bar_on_a_terminal_and_lines_elsewhere() -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress(tty, width=10)
    p.start("measure", 2)
    p.advance(0.5)
    p.advance(0.25)
    assert "\rmeasure    [#####.....] 1/2  last 0.500 s" in tty.getvalue()
    assert "[##########] 2/2" in tty.getvalue() and tty.getvalue().endswith("s)\n")
    plain = io.StringIO()
    p = Progress(plain)
    p.start("warm-up", 1)
    p.advance()
    assert "\r" not in plain.getvalue() and plain.getvalue().startswith("warm-up: 1 generation(s)\n")
