"""Fault injection against the real daemon (benchmarks/faults/daemon_faults.py): configuration input, SIGHUP
with a good and a broken file, SIGHUP during the model load and generations, SIGTERM during a generation, the
JSONL log and the images on a real full filesystem, a read-only output directory, kill -9. The fast cases run
here (about a minute); ZMON_FAULTS_HEAVY=1 adds a SIGHUP storm of 200 and 20 kill -9 rounds (or run
`python -m benchmarks.faults.daemon_faults --heavy` for the table).

The disk cases need small filesystems: a tmpfs as root, or one in a user namespace otherwise; where neither
can be made they fail with the reason (the unit tests fake the full disk at os.write: tests/unit/test_durability.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.faults import daemon_faults as faults

HEAVY = os.environ.get("ZMON_FAULTS_HEAVY") == "1"
CONFIG_CASES = ["config/example"] + [f"config/{c.name}" for c in faults.bad_inputs(Path("/nonexistent"))]
DAEMON_CASES = [
    "sighup/watch",
    "sighup/run",
    "sigterm/mid-generation",
    "disk/full",
    "disk/read-only-output-dir",
    "disk/kill-9",
]


def _run(case: str, cache_dir: Path | None = None) -> None:
    (r,) = faults.run_cases(heavy=HEAVY, only=[case], cache_dir=str(cache_dir) if cache_dir else None)
    print("\n" + faults.table([r]))
    assert r.passed, faults.table([r])


def test_config_inputs_are_listed_errors_from_check_config_and_the_daemons() -> None:
    results = faults.run_cases(heavy=HEAVY, only=["config/"])
    print("\n" + faults.table(results))
    assert len(results) == len(CONFIG_CASES)
    assert all(r.passed for r in results), faults.table([r for r in results if not r.passed])


@pytest.mark.parametrize("case", DAEMON_CASES)
def test_daemon_faults(case: str, tiny_cache_dir: Path) -> None:
    _run(case, tiny_cache_dir)
