"""The policy on the embedded model: remediation only at safe points, and alerts in a real Alertmanager."""

from __future__ import annotations

import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.cuda_allocator import GIB, FakeTorchCuda
from tests.services import alertmanager, get_json, zmon_process
from zmon.app.run import build_run
from zmon.collectors.allocator import AllocatorCollector
from zmon.config import Config
from zmon.instrumentation.records import GenerationRecord
from zmon.policy import Remediator
from zmon.providers.allocator import AllocatorProvider

# --- a: a threshold crossing seen mid-generation is acted on after it ------------------------------------


class Events:
    """What happened, in order, with perf_counter times."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float, dict[str, Any]]] = []

    def add(self, name: str, **info: Any) -> None:
        self.items.append((name, time.perf_counter(), info))

    def names(self) -> list[str]:
        return [n for n, _, _ in self.items]

    def at(self, name: str, nth: int = 0) -> float:
        return [t for n, t, _ in self.items if n == name][nth]


class RecordingCuda(FakeTorchCuda):
    """FakeTorchCuda whose empty_cache is logged in `events`, with whether a generation was in flight."""

    def __init__(self, events: Events, in_generation: Callable[[], bool]) -> None:
        super().__init__()
        self.events = events
        self.in_generation = in_generation

    def empty_cache(self) -> None:
        self.events.add("empty_cache", in_generation=self.in_generation())
        super().empty_cache()


def test_crossing_mid_generation_runs_empty_cache_only_after_it(
    tiny_cache_dir: Path, torch_single_thread: None
) -> None:
    cfg = Config.model_validate(
        {
            "model": {"cache_dir": str(tiny_cache_dir)},
            "workload": {"steps": 4},
            # the real allocator source is replaced by one over a scripted fake torch.cuda (below)
            "sampling": {"allocator": {"enabled": False}},
        }
    )  # default policy rules: reserved_unallocated_high fires after 3 samples above 0.30
    reg = CollectorRegistry()
    session = build_run(cfg, registry=reg, serve_http=False, start=False)  # no scheduler: samples run below
    policy = session.policy.runner if session.policy else None
    assert policy is not None
    events = Events()
    cuda = RecordingCuda(events, lambda: policy.gate.in_generation)
    mon = session.monitor
    mon.add_source("allocator", AllocatorProvider(cuda).sample, 1.0)
    mon.add_collector("allocator", AllocatorCollector(mon.store))
    policy.remediator = Remediator(cuda)
    dev = cuda.devices[0]
    dev.set(allocated=6 * GIB, reserved=6 * GIB)  # ratio 0: quiet

    class Boundary:
        def generation_started(self) -> None:
            events.add("generation_started")

        def generation_finished(self) -> None:
            events.add("generation_finished")

    def on_record(r: GenerationRecord) -> None:
        events.add("record", status=r.status)

    forwards = 0

    def sample_mid_step(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal forwards
        forwards += 1
        if forwards == 1:  # generation 0 grows its cache: (10 − 6) / 10 = 0.4 > 0.30
            dev.set(reserved=10 * GIB)
        mon.sampler.run_once("allocator")  # → the policy evaluates, on this (the generation's) thread
        events.add("sample", pending=policy.gate.pending(), empty_cache_calls=cuda.calls.get("empty_cache", 0))

    session.add_boundary_listener(Boundary())
    session.instrumentation.record_listeners.append(on_record)
    hook = session.pipe.transformer.register_forward_pre_hook(sample_mid_step)
    try:
        result = session.run(max_generations=2)
    finally:
        hook.remove()
        session.close()

    assert result.ok == 2
    steps = forwards // 2
    assert steps >= 3, "the rule needs 3 samples inside one generation"
    gen = ["generation_started", *["sample"] * steps, "record", "generation_finished"]
    assert events.names() == [*gen, "empty_cache", *gen]

    samples = [info for n, _, info in events.items if n == "sample"]
    # fired on the 3rd sample of generation 0, queued (not run) for the rest of it
    assert [s["pending"] for s in samples[:steps]] == [(), (), *[("empty_cache",)] * (steps - 2)]
    assert all(s["empty_cache_calls"] == 0 for s in samples[:steps])
    # run after generation 0's record and boundary, before generation 1 started, never mid-generation
    ((_, t_action, info),) = [e for e in events.items if e[0] == "empty_cache"]
    assert info == {"in_generation": False}
    assert events.at("record") < events.at("generation_finished") < t_action < events.at("generation_started", 1)
    # generation 1 sees the freed cache: the rule resolved, nothing pending
    assert all(s == {"pending": (), "empty_cache_calls": 1} for s in samples[steps:])

    v = reg.get_sample_value
    assert v("zmon_remediation_actions_total", {"action": "empty_cache", "result": "ok"}) == 1
    assert v("zmon_remediation_freed_bytes_total") == 4 * GIB
    assert v("zmon_remediation_last_freed_bytes", {"action": "empty_cache"}) == 4 * GIB
    assert v("zmon_remediation_last_duration_seconds", {"action": "empty_cache"}) is not None
    assert v("zmon_remediation_pending_actions") == 0
    rule = {"rule": "reserved_unallocated_high", "device": "0"}
    assert v("zmon_policy_rule_firings_total", rule) == 1 and v("zmon_policy_rule_state", rule) == 0
    assert v("zmon_torch_reserved_bytes", {"device": "0"}) == 6 * GIB


# --- b: a forced rule on the embedded model, seen in a real Alertmanager, and its resolution ---------------

AM_CONFIG = (
    'route:\n  receiver: "null"\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n'
    'receivers:\n  - name: "null"\n'
)


def am_alerts(am: str, **params: str) -> dict[str, dict[str, Any]]:
    """zmon's alerts in Alertmanager, by alertname."""
    query = "?" + urllib.parse.urlencode(params) if params else ""
    return {
        a["labels"]["alertname"]: a for a in get_json(am + "/api/v2/alerts" + query) if a["labels"].get("job") == "zmon"
    }


def scrape(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    }


def wait_until(what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), f"zmon exited while waiting for: {what}"
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_forced_rule_alert_reaches_alertmanager_and_resolves(tiny_cache_dir: Path, tmp_path: Path) -> None:
    generations = 50
    with alertmanager(tmp_path, AM_CONFIG) as am:
        config = tmp_path / "zmon.yaml"
        config.write_text(f"""
model:
  cache_dir: {tiny_cache_dir}
  cpu_threads: 1
workload:
  rate_per_second: 10         # 50 generations over ~5 s: several policy evaluations (1/s) see them
alerting:
  alertmanager_urls: ["{am}"]
  resend_seconds: 1
  instance: zmon-e2e
policy:
  rules:
    - name: forced            # true on any host: fires at the first evaluation, stays firing
      metric: host_memory_available_ratio
      op: ">"
      threshold: 0
      actions: [alert]
      severity: info
      alertname: ZmonTestForced
      summary: forced by the e2e test
    - name: generating        # true while generations finish; clears once the run is over (linger)
      metric: generations_delta
      op: ">"
      threshold: 0
      keep_firing_seconds: 0
      actions: [alert]
      alertname: ZmonTestGenerating
      summary: generations are running
""")
        args = ["run", "-c", str(config), "--max-generations", str(generations), "--linger", "60"]
        with zmon_process(args, env={"OMP_NUM_THREADS": "1"}, ready_timeout=60) as (url, proc):
            alive = lambda: proc.poll() is None  # noqa: E731
            seen: dict[str, dict[str, Any]] = {}

            def both_seen() -> bool:
                seen.update(am_alerts(am, active="true"))
                return {"ZmonTestForced", "ZmonTestGenerating"} <= seen.keys()

            wait_until("both alerts active in Alertmanager", both_seen, 40, alive)
            forced = seen["ZmonTestForced"]
            assert forced["labels"] == {
                "alertname": "ZmonTestForced",
                "severity": "info",
                "rule": "forced",
                "job": "zmon",
                "instance": "zmon-e2e",
            }
            assert forced["annotations"]["summary"] == "forced by the e2e test"
            assert forced["annotations"]["runbook_url"].endswith("#runbook-zmontestforced")
            assert float(forced["annotations"]["value"]) > 0
            assert forced["generatorURL"] == url + "/metrics"
            assert forced["status"]["state"] == "active"
            gen = seen["ZmonTestGenerating"]
            assert gen["labels"]["severity"] == "warning" and gen["labels"]["instance"] == "zmon-e2e"

            def run_over() -> bool:
                ok = scrape(url, "zmon_generations_total")
                return sum(v for k, v in ok.items() if ("status", "ok") in k) >= generations

            wait_until("all generations done", run_over, 30, alive)
            # lingering: no generation finishes, the rule clears, zmon sends endsAt and Alertmanager drops it
            wait_until(
                "ZmonTestGenerating resolved",
                lambda: "ZmonTestGenerating" not in am_alerts(am, active="true"),
                15,
                alive,
            )
            assert "ZmonTestGenerating" not in am_alerts(am)  # resolved, not merely silenced or inhibited
            assert "ZmonTestForced" in am_alerts(am, active="true")  # still firing
            state = scrape(url, "zmon_policy_rule_state")
            assert state[(("device", ""), ("rule", "generating"))] == 0
            assert state[(("device", ""), ("rule", "forced"))] == 2
            sent = scrape(url, "zmon_alerts_sent_total")
            assert sent[(("result", "ok"),)] >= 3 and sent[(("result", "error"),)] == 0

            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert time.monotonic() - t0 < 15
