"""Worker process targets that misbehave on purpose, for the supervisor tests (spawned: module-level, light).

Each wraps zmon.app.workers.worker.worker_main: the faults are real process behaviour (an exit mid-run, a generation
that never returns, a worker that never gets ready), not mocks of the supervisor.
"""

from __future__ import annotations

import os
import time
from typing import Any

CRASH_LABEL, CRASH_ITEM = "cpu:0", 2
HANG_LABEL, HANG_ITEM = "cpu:1", 3


def crash_once_and_hang_once(spec: Any, conn: Any, beat: Any) -> None:
    """cpu:0 exits (code 3) when it reaches item 2, cpu:1 hangs in item 3 — each in its first incarnation."""
    from zmon.app.workers.worker import worker_main
    from zmon.workload import runner

    call = runner.Workload.call

    def faulty(self: Any, i: int, attempt: int = 0, *, oom: Any = None) -> Any:
        if spec.incarnation == 0 and spec.placement.label == CRASH_LABEL and i == CRASH_ITEM:
            os._exit(3)
        if spec.incarnation == 0 and spec.placement.label == HANG_LABEL and i == HANG_ITEM:
            time.sleep(3600)
        return call(self, i, attempt, oom=oom)

    runner.Workload.call = faulty  # type: ignore[method-assign]
    worker_main(spec, conn, beat)


def exit_at_once(spec: Any, conn: Any, beat: Any) -> None:
    """A worker that dies before loading anything (a broken CUDA driver, say)."""
    os._exit(1)


def never_ready(spec: Any, conn: Any, beat: Any) -> None:
    """A worker whose load never finishes."""
    time.sleep(3600)
