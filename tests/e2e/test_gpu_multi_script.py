"""benchmarks/gpu_multi.py's one-GPU mode, dry run on the CPU (the embedded model, one cpu worker): the script the
lead runs on the GPU machine works end to end and its merged-metrics checks pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_one_worker_dry_run(tmp_path: Path, tiny_cache_dir: Path) -> None:
    env_cfg = {"ZMON_MODEL__CACHE_DIR": str(tiny_cache_dir)}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_multi", "--mode", "one", "--cpu", "--gens", "4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env_cfg},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_multi_one_cpu.json").read_text())
    checks = report["one_worker"]["checks"]
    assert report["ok"] and checks["outcomes"] == {"cpu:0": "done"} and checks["generations_ok"] == {"cpu:0": 4.0}
    assert checks["duplicate_series"] == [] and checks["promtool"] in ("clean", "promtool not available")
    assert 0 < checks["scaling_efficiency_ratio"] <= 1.5
    assert (tmp_path / "metrics-one-worker.txt").read_text().count("zmon_worker_up{") == 1
