"""Data-parallel workers without processes: device plans, the scaling figure, the merges that keep counters
monotonic across worker restarts, and the worker families."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.services import require_binary
from zmon.alerting.alertmanager import DeliveryStats
from zmon.analysis.scaling import Finished, scaling
from zmon.app.workers.parent import MergedPolicy, MergedPromptCache, ScalingWindow
from zmon.app.workers.protocol import MULTICAST_OFF, Placement, WorkerSpec
from zmon.app.workers.supervisor import DevicePlanError, plan_devices
from zmon.collectors.policy import PolicyCollector
from zmon.collectors.workers import ScalingState, WorkerCollector, WorkerStatus
from zmon.config import Config, ConfigError, load_config
from zmon.instrumentation.records import GenerationRecord
from zmon.policy.actions import PolicySnapshot
from zmon.policy.engine import RuleStatus

# ------------------------------------------------------------------------------------------------ config, plans


@pytest.mark.parametrize(
    ("value", "expected"),
    [([0, 1], (0, 1)), (["cuda:1", 0], (1, 0)), ("auto", "auto"), ("CPU:3", "cpu:3"), (None, None)],
)
def test_devices_accepted(value: Any, expected: Any) -> None:
    assert load_config(overrides={"model": {"devices": value}}, environ={}).model.devices == expected


@pytest.mark.parametrize("value", ["gpu", [], [0, 0], "cpu:0", [True], [-1], 3, ["cuda"]])
def test_devices_rejected_with_a_reason(value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"model": {"devices": value}}, environ={})
    assert e.value.problems[0].startswith("model.devices:")


def test_device_and_devices_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_config(overrides={"model": {"devices": [0], "device": "cuda:1"}}, environ={})


def test_devices_from_the_environment() -> None:
    cfg = load_config(environ={"ZMON_MODEL__DEVICES": "[0, 1]", "ZMON_MODEL__WORKERS__MAX_RESTARTS": "2"})
    assert cfg.model.devices == (0, 1) and cfg.model.workers.max_restarts == 2


def test_plan_devices() -> None:
    assert plan_devices("cpu:2", cuda_count=lambda: 0) == [Placement("cpu:0", "cpu"), Placement("cpu:1", "cpu")]
    assert plan_devices("auto", cuda_count=lambda: 2) == [
        Placement("cuda:0", "cuda:0", 0),
        Placement("cuda:1", "cuda:1", 1),
    ]
    assert [p.label for p in plan_devices((1,), cuda_count=lambda: 2)] == ["cuda:1"]
    with pytest.raises(DevicePlanError, match="found no CUDA device"):
        plan_devices("auto", cuda_count=lambda: 0)
    with pytest.raises(DevicePlanError, match="no CUDA device 2"):
        plan_devices((0, 2), cuda_count=lambda: 2)


def test_round_robin_share_keeps_every_item_once() -> None:
    cfg = Config()
    shares = [list(WorkerSpec(k, 3, Placement(f"cpu:{k}", "cpu"), cfg, start=k, limit=10).items()) for k in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    resumed = WorkerSpec(1, 3, Placement("cpu:1", "cpu"), cfg, start=7, limit=10)  # after a restart at item 7
    assert list(resumed.items()) == [7]


def test_multicast_stays_off() -> None:
    assert MULTICAST_OFF == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


# ------------------------------------------------------------------------------------------------ scaling


def gens(worker: str, start: float, n: int, seconds: float = 1.0, gap: float = 0.0) -> list[Finished]:
    return [Finished(worker, start + k * (seconds + gap), seconds, 1) for k in range(n)]


def test_two_busy_workers_scale_perfectly() -> None:
    sc = scaling(gens("a", 0, 10) + gens("b", 0, 10), 2)
    assert sc is not None and sc.efficiency == pytest.approx(1.0) and sc.speedup == pytest.approx(2.0)
    assert sc.worker_images_per_second == {"a": 1.0, "b": 1.0}


def test_idle_gaps_a_late_start_and_a_dead_worker_cost_efficiency() -> None:
    gappy = scaling(gens("a", 0, 10, gap=1.0) + gens("b", 0, 10, gap=1.0), 2)
    assert gappy is not None and gappy.efficiency == pytest.approx(10 * 2 / 19 / 2)  # busy half the time
    dead = scaling(gens("a", 0, 10), 2)  # the second worker never generated
    assert dead is not None and dead.efficiency == pytest.approx(0.5) and dead.generating_workers == 1
    late = gens("a", 0, 10) + gens("b", 5, 10)
    live = scaling(late, 2)
    assert live is not None and live.efficiency == pytest.approx(20 / 15 / 2)
    profile = scaling(late, 2, overlap=True)  # a profile judges only the time both generated
    assert profile is not None and profile.efficiency == pytest.approx(1.0)


def test_too_little_is_unknown() -> None:
    assert scaling([], 2) is None
    assert scaling(gens("a", 0, 1), 2) is None
    with pytest.raises(ValueError):
        scaling(gens("a", 0, 4), 0)


def record(start: float, seconds: float = 1.0, status: str = "ok") -> GenerationRecord:
    return GenerationRecord(started_at=start, total_seconds=seconds, stages=(), status=status)  # type: ignore[arg-type]


def test_scaling_window_leaves_out_each_start_s_first_generation() -> None:
    now = [1000.0]
    w = ScalingWindow(2, 300, clock=lambda: now[0])
    for name in ("cpu:0", "cpu:1"):
        w.started(name)
        w.add(name, record(900, 30.0))  # warm-up: left out
        for k in range(3):
            w.add(name, record(931 + k, 1.0))
    w.add("cpu:0", record(940, 1.0, status="error"))  # failures are not throughput
    sc = w.current()
    assert sc is not None and sc.worker_images_per_second == {"cpu:0": 1.0, "cpu:1": 1.0}
    mg = w.multi_gpu()
    assert mg is not None and mg.gpu_count == 2 and mg.speedup_vs_single == pytest.approx(sc.speedup)
    assert ScalingWindow(2, 300, rate_limited=True).current() is None  # workers wait on purpose: no figure
    assert ScalingWindow(1, 300).multi_gpu() is None


# ------------------------------------------------------------------------------------------------ merges


def policy_snapshot(ok: int, firings: int, device: str = "") -> PolicySnapshot:
    status = RuleStatus("reserved_unallocated_high", "firing", False, 0, firings, 0.5)
    return PolicySnapshot(
        dry_run=False,
        actions=(("empty_cache", "ok", ok),),
        freed_bytes_total=100 * ok,
        last_at=(("empty_cache", 10.0 + ok),),
        last_seconds=(("empty_cache", 0.004),),
        last_freed=(("empty_cache", 100),),
        pending_actions=1,
        rules=((device, status),),
        decisions=(("reserved_unallocated_high", "fired", firings),),
    )


def test_merged_policy_counters_never_go_back_across_a_restart() -> None:
    merged = MergedPolicy(dry_run=False)
    merged.update("cpu:0", policy_snapshot(ok=3, firings=2), DeliveryStats(5, 1, 0, 2, 0))
    merged.update("cpu:1", policy_snapshot(ok=1, firings=1), None)
    before = merged.snapshot()
    assert dict(((a, r), n) for a, r, n in before.actions)[("empty_cache", "ok")] == 4
    assert {d for d, _ in before.rules} == {"cpu:0", "cpu:1"}  # no device: the worker's label
    merged.carry("cpu:0")  # cpu:0 restarts: its counts are kept, its gauges go
    after_restart = merged.snapshot()
    assert dict(((a, r), n) for a, r, n in after_restart.actions)[("empty_cache", "ok")] == 4
    assert {d for d, _ in after_restart.rules} == {"cpu:1"} and after_restart.pending_actions == 1
    merged.update("cpu:0", policy_snapshot(ok=1, firings=1), DeliveryStats(1, 0, 0, 1, 0))  # counts from 0
    later = merged.snapshot()
    assert dict(((a, r), n) for a, r, n in later.actions)[("empty_cache", "ok")] == 5
    assert dict(later.rules)["cpu:0"].firings_total == 3 and later.freed_bytes_total == 500
    assert merged.stats() == DeliveryStats(ok=6, error=1, dropped=0, active=1, queued=0)
    registry = CollectorRegistry()
    registry.register(PolicyCollector(merged, merged))
    assert registry.get_sample_value("zmon_remediation_actions_total", {"action": "empty_cache", "result": "ok"}) == 5
    assert (
        registry.get_sample_value(
            "zmon_policy_rule_firings_total", {"rule": "reserved_unallocated_high", "device": "cpu:0"}
        )
        == 3
    )


def test_merged_prompt_cache() -> None:
    cache = MergedPromptCache()
    cache.update("cpu:0", (5, 2, 0, 2))
    cache.update("cpu:1", (1, 1, 1, 1))
    cache.carry("cpu:1")
    cache.update("cpu:1", (0, 1, 0, 1))
    assert (cache.hits, cache.misses, cache.evictions, cache.size) == (6, 4, 1, 3)


def test_worker_families_are_promtool_clean() -> None:
    statuses = [
        WorkerStatus("cuda:0", True, "ready", {"exit": 1, "hang": 0, "start_timeout": 0}, 0.4),
        WorkerStatus("cuda:1", False, "backoff", {"exit": 2, "hang": 1, "start_timeout": 0}, None),
    ]
    state = ScalingState(0.93, {"cuda:0": 0.8, "cuda:1": 0.7})
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: statuses, lambda: state))
    assert registry.get_sample_value("zmon_worker_up", {"device": "cuda:1"}) == 0.0
    assert registry.get_sample_value("zmon_worker_restarts_total", {"device": "cuda:1", "reason": "hang"}) == 1.0
    assert registry.get_sample_value("zmon_worker_state", {"device": "cuda:1", "state": "backoff"}) == 1.0
    assert registry.get_sample_value("zmon_worker_heartbeat_age_seconds", {"device": "cuda:1"}) is None  # unknown
    assert registry.get_sample_value("zmon_scaling_efficiency_ratio") == 0.93
    text = generate_latest(registry).decode()
    check = subprocess.run(
        [require_binary("promtool"), "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    empty = CollectorRegistry()
    empty.register(WorkerCollector(lambda: statuses, lambda: None))
    assert empty.get_sample_value("zmon_scaling_efficiency_ratio") is None  # absent until measured
