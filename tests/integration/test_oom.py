"""Out-of-memory generations in `zmon run`: counted, memory snapshot, empty_cache (counted), one retry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.fakes.cuda_allocator import GIB, FakeTorchCuda
from zmon.app.run import RunSession, build_run
from zmon.config import Config, OomConfig
from zmon.policy import PolicyState, Remediator
from zmon.workload.oom import OomHandler

WALL = 1_700_000_000.0


class FakeCudaMemory:
    """The `torch.cuda.memory` functions OomHandler calls; `_dump_snapshot` writes a small file."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def _record_memory_history(self, enabled: str | None = "all", **kwargs: Any) -> None:
        self.calls.append(("record", {"enabled": enabled, **kwargs}))

    def _dump_snapshot(self, filename: str) -> None:
        self.calls.append(("dump", filename))
        Path(filename).write_bytes(b"snapshot")


class FakeCuda(FakeTorchCuda):
    """FakeTorchCuda with a `memory` module; one device with 6 GiB of releasable cache."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory = FakeCudaMemory()
        self.devices[0].set(allocated=2 * GIB, reserved=8 * GIB)


def handler(cuda: FakeCuda, state: PolicyState | None = None, **oom: Any) -> OomHandler:
    return OomHandler(OomConfig(**oom), remediator=Remediator(cuda), state=state, torch_cuda=cuda, wall=lambda: WALL)


# ------------------------------------------------------------------------------------------------ unit


def test_recover_runs_empty_cache_counts_it_and_retries_once() -> None:
    cuda, state = FakeCuda(), PolicyState()
    h = handler(cuda, state)
    assert h.recover(0, attempt=0) is True
    assert cuda.calls["empty_cache"] == 1 and cuda.devices[0].reserved == 2 * GIB
    (event,) = h.events
    assert (event.generation, event.attempt, event.retry) == (0, 0, True)
    assert event.empty_cache.result == "ok" and event.empty_cache.reason == "oom"
    assert event.empty_cache.freed_bytes == 6 * GIB
    assert h.recover(0, attempt=1) is False  # the retry failed too: no second retry
    snap = state.snapshot()
    assert ("empty_cache", "ok", 2) in snap.actions and snap.freed_bytes_total == 6 * GIB


def test_recover_without_policy_state_and_in_dry_run() -> None:
    cuda = FakeCuda()
    h = OomHandler(OomConfig(), torch_cuda=cuda)  # no policy wired: its own Remediator, nothing counted
    assert h.recover(3, 0) and cuda.calls["empty_cache"] == 1

    cuda, state = FakeCuda(), PolicyState(dry_run=True)
    h = OomHandler(OomConfig(retry=False), remediator=Remediator(cuda, dry_run=True), state=state)
    assert h.recover(0, 0) is False
    assert "empty_cache" not in cuda.calls and ("empty_cache", "dry_run", 1) in state.snapshot().actions


def test_recover_without_cuda_is_skipped_not_raised() -> None:
    cuda, state = FakeCuda(available=False), PolicyState()
    assert handler(cuda, state).recover(0, 0) is True
    assert ("empty_cache", "skipped", 1) in state.snapshot().actions


def test_memory_snapshots_named_and_capped(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    cuda = FakeCuda()
    h = handler(cuda, memory_snapshot_dir=d, max_snapshots=3, max_entries=1234)
    assert h.snapshot(0) is None  # not recording yet
    assert h.start() is True and h.start() is True  # idempotent
    assert cuda.memory.calls == [("record", {"enabled": "all", "max_entries": 1234, "stacks": "python"})]
    assert d.is_dir()
    (d / f"oom-{int(WALL) - 60}-9.pickle").write_bytes(b"from an earlier run")  # counts towards the cap
    assert h.snapshot(4) == d / f"oom-{int(WALL)}-4.pickle"
    assert h.snapshot(4, attempt=1) == d / f"oom-{int(WALL)}-4-retry.pickle"
    assert h.snapshot(5) is None and h.snapshot(6) is None  # 3 files there: capped
    assert sorted(p.name for p in d.iterdir()) == [
        f"oom-{int(WALL) - 60}-9.pickle",
        f"oom-{int(WALL)}-4-retry.pickle",
        f"oom-{int(WALL)}-4.pickle",
    ]
    assert [c for c in cuda.memory.calls if c[0] == "dump"] == [
        ("dump", str(d / f"oom-{int(WALL)}-4.pickle")),
        ("dump", str(d / f"oom-{int(WALL)}-4-retry.pickle")),
    ]
    assert h.snapshots == [d / f"oom-{int(WALL)}-4.pickle", d / f"oom-{int(WALL)}-4-retry.pickle"]
    h.stop()
    h.stop()
    assert cuda.memory.calls[-1] == ("record", {"enabled": None}) and len(cuda.memory.calls) == 4


def test_no_recording_without_a_directory_or_without_cuda(tmp_path: Path) -> None:
    cuda = FakeCuda()
    h = handler(cuda)
    assert h.start() is False and cuda.memory.calls == []
    cuda = FakeCuda(initialized=False)  # CUDA not in use by this process
    h = handler(cuda, memory_snapshot_dir=tmp_path)
    assert h.start() is False and h.snapshot(0) is None and cuda.memory.calls == []
    h.stop()
    assert cuda.memory.calls == []


def test_a_failing_dump_is_logged_not_raised(tmp_path: Path) -> None:
    cuda = FakeCuda()

    def broken(filename: str) -> None:
        raise RuntimeError("no history")

    cuda.memory._dump_snapshot = broken  # type: ignore[method-assign]
    h = handler(cuda, memory_snapshot_dir=tmp_path)
    assert h.start() and h.snapshot(0) is None and h.snapshots == []


# ------------------------------------------------------------------------------- the tiny pipeline, on CPU

LABELS = {"model": "builtin:tiny-z-image", "resolution": "64x64", "device": "cpu"}


@pytest.fixture
def session(tiny_cache_dir: Path, torch_single_thread: None) -> Iterator[tuple[RunSession, CollectorRegistry]]:
    cfg = Config.model_validate({"model": {"cache_dir": str(tiny_cache_dir)}, "workload": {"steps": 2}})
    reg = CollectorRegistry()
    s = build_run(cfg, registry=reg, serve_http=False, start=False)
    try:
        yield s, reg
    finally:
        s.close()


def oom_on_calls(s: RunSession, failing: set[int]) -> tuple[list[Any], Callable[[], None]]:
    """Make the denoiser raise torch.OutOfMemoryError on the given forward calls (1-based); returns the
    inputs seen by every forward and the hook's remover."""
    seen: list[Any] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append([t.clone() for t in args[0]])  # the latents
        if len(seen) in failing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    handle = s.pipe.transformer.register_forward_pre_hook(hook)
    return seen, handle.remove


def generations(reg: CollectorRegistry, status: str) -> float:
    return reg.get_sample_value("zmon_generations_total", {"status": status, **LABELS}) or 0.0


def remediations(reg: CollectorRegistry, result: str = "ok") -> float:
    v = reg.get_sample_value("zmon_remediation_actions_total", {"action": "empty_cache", "result": result})
    return v or 0.0


def inject(s: RunSession, cuda: FakeCuda, **oom: Any) -> OomHandler:
    """The handler build_run made, with the fake torch.cuda (the policy's counters are kept)."""
    assert s.oom is not None and s.policy is not None and s.oom.state is s.policy.runner.state
    s.oom = handler(cuda, s.policy.runner.state, **oom)
    return s.oom


def test_oom_once_then_the_retry_succeeds(session: tuple[RunSession, CollectorRegistry]) -> None:
    s, reg = session
    cuda = FakeCuda()
    h = inject(s, cuda)
    seen, remove = oom_on_calls(s, {1})  # the first denoiser call of generation 0
    try:
        result = s.run(max_generations=3)
    finally:
        remove()
    assert (result.generations, result.ok, result.oom, result.errors) == (3, 3, 0, 0)
    assert (result.oom_retries, result.oom_recovered, result.images, result.exit_code) == (1, 1, 3, 0)
    assert generations(reg, "oom") == 1 and generations(reg, "ok") == 3
    assert cuda.calls["empty_cache"] == 1
    assert remediations(reg) == 1 and reg.get_sample_value("zmon_remediation_freed_bytes_total") == 6 * GIB
    assert [(e.generation, e.attempt, e.retry) for e in h.events] == [(0, 0, True)]
    # the retry is the same generation: same seed, so the same initial latents
    assert len(seen) == 1 + 2 * 3 and all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))


def test_persistent_oom_is_retried_once_then_the_run_goes_on(
    session: tuple[RunSession, CollectorRegistry], tmp_path: Path
) -> None:
    s, reg = session
    cuda = FakeCuda()
    h = inject(s, cuda, memory_snapshot_dir=tmp_path / "snaps")
    seen, remove = oom_on_calls(s, {1, 2})  # generation 0 and its retry
    try:
        result = s.run(max_generations=2)
    finally:
        remove()
    assert (result.generations, result.ok, result.oom, result.errors, result.exit_code) == (2, 1, 1, 0, 0)
    assert (result.oom_retries, result.oom_recovered) == (1, 0)
    assert generations(reg, "oom") == 2 and generations(reg, "ok") == 1  # the original and the retry
    assert cuda.calls["empty_cache"] == 2 and remediations(reg) == 2
    assert [(e.generation, e.attempt, e.retry) for e in h.events] == [(0, 0, True), (0, 1, False)]
    assert len(seen) == 2 + 2  # two failed first steps, then generation 1's two steps
    # memory history recorded from the start of the run, one snapshot per OOM, stopped on close
    assert cuda.memory.calls[0] == ("record", {"enabled": "all", "max_entries": 100_000, "stacks": "python"})
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [
        f"oom-{int(WALL)}-0-retry.pickle",
        f"oom-{int(WALL)}-0.pickle",
    ]
    s.close()
    assert cuda.memory.calls[-1] == ("record", {"enabled": None})


def test_retry_off_counts_releases_and_goes_on(session: tuple[RunSession, CollectorRegistry]) -> None:
    s, reg = session
    cuda = FakeCuda()
    inject(s, cuda, retry=False)
    _, remove = oom_on_calls(s, {1})
    try:
        result = s.run(max_generations=2)
    finally:
        remove()
    assert (result.generations, result.ok, result.oom, result.oom_retries, result.exit_code) == (2, 1, 1, 0, 0)
    assert generations(reg, "oom") == 1 and generations(reg, "ok") == 1
    assert cuda.calls["empty_cache"] == 1 and remediations(reg) == 1


def test_build_run_wires_the_oom_handler_to_the_policy(session: tuple[RunSession, CollectorRegistry]) -> None:
    s, reg = session
    assert s.oom is not None and s.policy is not None
    assert s.oom.remediator is s.policy.runner.remediator and s.oom.state is s.policy.runner.state
    assert s.oom.config == OomConfig()
    # on this CPU-only host the real empty_cache is skipped, and counted as such
    _, remove = oom_on_calls(s, {1})
    try:
        result = s.run(max_generations=1)
    finally:
        remove()
    assert (result.ok, result.oom_retries) == (1, 1)
    assert remediations(reg, "skipped") == 1 and remediations(reg, "ok") == 0
