"""The README's metric reference against what zmon really exports, in both directions.

zmon's in-process parts are assembled as `zmon run` / `zmon.attach` assemble them (zmon.app: the monitor,
host/NVML/allocator sources, policy, live diagnosis, the instrumented tiny pipeline) — with fakes only for
NVML (GPUs with every field, GPM included) and torch.cuda — and every sample family with its label names and
values is read from one exposition. Then:

- every family, label and enumerated label value the README names exists in the code, and the reverse;
- the families the README marks "(only with `X`)" are exactly those that vanish when feature X is off.

Enumerated label values come from the code's own constants (finding kinds, verdicts, statuses, stages,
clock-event reasons, …): the exposition must stay within them, and the README must list them all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.catalogue import README, Row, readme_rows
from tests.fakes.cuda_allocator import GIB, FakeTorchCuda
from tests.fakes.nvml import GPM_GEMM, WORKLOAD_PID, FakeNvml, make_mixed
from zmon.config import Config, ListenAddress

ROOT = Path(__file__).resolve().parents[2]
MODEL = "builtin:tiny-z-image"

# -- the code side -----------------------------------------------------------------------------------------


def enumerations() -> dict[tuple[str, str], frozenset[str] | None]:
    """(family, label) → every value the code can give it, from the code's own constants; None: the values
    the full exposition shows (each of those labels is written from a fixed list in its collector, and the
    fakes exercise every entry)."""
    from zmon.analysis.live import KINDS, VERDICTS
    from zmon.app.workers.supervisor import RESTART_REASONS
    from zmon.collectors import generation, policy
    from zmon.collectors.workers import STATES
    from zmon.providers.nvml import CLOCK_EVENT_REASONS

    kinds = frozenset(KINDS)
    return {
        ("zmon_bottleneck", "kind"): kinds,
        ("zmon_bottleneck_info", "kind"): kinds,
        ("zmon_bottleneck_verdict", "verdict"): frozenset(VERDICTS),
        ("zmon_generations_total", "status"): frozenset(generation.STATUSES),
        ("zmon_stage_duration_seconds", "stage"): frozenset(label for label, _ in generation.STAGE_LABELS),
        ("zmon_workload_misconfiguration", "kind"): frozenset(generation.MISCONFIGURATIONS),
        ("zmon_gpu_clock_event_active", "reason"): frozenset(name for name, _ in CLOCK_EVENT_REASONS),
        ("zmon_remediation_actions_total", "action"): frozenset(policy.ACTIONS),
        ("zmon_remediation_actions_total", "result"): frozenset(policy.RESULTS),
        ("zmon_gpu_ecc_errors_total", "type"): None,
        ("zmon_gpu_ecc_volatile_errors_total", "type"): None,
        ("zmon_gpu_retired_pages", "cause"): None,
        ("zmon_gpu_remapped_rows", "type"): None,
        ("zmon_gpu_process_memory_used_bytes", "workload"): None,
        ("zmon_alerts_sent_total", "result"): None,
        ("zmon_process_cpu_seconds_total", "mode"): None,
        ("zmon_worker_state", "state"): frozenset(STATES),
        ("zmon_worker_restarts_total", "reason"): frozenset(RESTART_REASONS),
    }


def _full_config(**off: bool) -> Config:
    """Every optional family's feature on, except those named in `off`."""
    cfg: dict[str, Any] = {
        "sampling": {
            "host": {"per_cpu": not off.get("per_cpu")},
            "disk": {"paths": [] if off.get("paths") else [str(ROOT)]},
            "nvml": {
                "gpm": not off.get("gpm"),
                "enabled": not off.get("nvml"),
                "processes": not off.get("processes"),
                "slow_interval_seconds": 0 if off.get("pcie") else 10,
            },
            "allocator": {"enabled": not off.get("allocator")},
        },
        "workload": {"prompt_cache": {"enabled": not off.get("prompt_cache")}},
        "policy": {"enabled": not off.get("policy")},
        "alerting": {"alertmanager_urls": [] if off.get("alerts") else ["http://127.0.0.1:9"], "retries": 0},
    }
    if not off.get("jsonl"):
        cfg["workload"]["jsonl"] = {"path": "/dev/null"}
    return Config.model_validate(cfg)


def _nvml() -> FakeNvml:
    """Three GPUs that between them have every field: GPM (with NVLink), ECC, remapped rows, retired pages, a
    fan, processes (the watched one included) and a pending Xid."""
    fake = make_mixed()
    gpu0 = fake.gpus[0]
    gpu0.gpm_supported, gpu0.gpm_metrics = True, dict(GPM_GEMM)
    gpu0.nvlink_links, gpu0.nvlink_down, gpu0.nvlink_speed_mbps = 18, {17}, 26_562  # an H200 SXM, one link down
    gpu0.nvlink_tx_kib, gpu0.nvlink_rx_kib = 3 * 2**20, 2**20
    fake.inject_xid(0, 79)
    return fake


@dataclass
class Family:
    kind: str
    labels: dict[str, set[str]]
    series: int = 0  # a family can be declared (HELP/TYPE) with no series: it then does not "appear"


def exposition(tiny_pipe: Any, cfg: Config) -> dict[str, Family]:
    """{series family name (counters with _total): its type and label values} of one full assembly.

    The reload status is added as the daemon modes add it, the image-write failures as `zmon run` with an
    output directory sets them. Two parts the in-process assembly does not have are added the way their own
    modes add them: the worker
    families (`model.devices`: the parent's WorkerCollector over its workers' states) and the communication
    histograms (a record whose pipeline ran collectives, as the collective-timing hook writes it)."""
    import dataclasses

    import torch

    from zmon.app.attach import connect_in_process
    from zmon.app.instrument import Instrumentation
    from zmon.app.monitor import Monitor
    from zmon.app.parts import add_policy
    from zmon.app.sources import add_allocator_source, add_host_sources, add_nvml_sources
    from zmon.collectors.generation import GenerationMetrics, PipelineFacts
    from zmon.collectors.reload import ReloadCollector, ReloadState
    from zmon.collectors.workers import ScalingState, WorkerCollector, WorkerStatus
    from zmon.instrumentation.records import CommunicationTiming, GenerationRecord

    registry = CollectorRegistry(auto_describe=False)
    mon = Monitor(cfg.sampling, cfg.server, mode="run", registry=registry, serve_http=False)
    metrics = GenerationMetrics(model=MODEL)
    metrics.set_pipeline(
        PipelineFacts(
            MODEL,
            "ZImagePipeline",
            "cpu",
            "float32",
            distilled=True,
            load_seconds=0.5,
            checkpoint_bytes=10**6,
            read_bytes_per_second=2e6,
        )
    )
    mon.add_collector("generation", metrics)
    mon.add_collector("config", ReloadCollector(ReloadState()))  # as `zmon run` / `zmon watch` add it
    metrics.set_output_failures(lambda: 0)  # as `zmon run` with workload.output_dir sets it
    add_host_sources(mon, cfg.sampling, watched_pid=os.getpid())
    add_nvml_sources(mon, cfg.sampling.nvml, watched_pid=WORKLOAD_PID, nvml=_nvml())
    cuda = FakeTorchCuda()
    cuda.devices[0].set(allocated=2 * GIB, reserved=4 * GIB, inactive_split=GIB)
    add_allocator_source(mon, cfg.sampling.allocator, torch_cuda=cuda)
    policy = add_policy(mon, cfg.policy, cfg.alerting, listen=ListenAddress("127.0.0.1:0"))
    workers = [
        WorkerStatus("cuda:0", True, "ready", {"exit": 1, "hang": 0, "start_timeout": 0}, 0.5),
        WorkerStatus("cuda:1", False, "backoff", {"exit": 0, "hang": 1, "start_timeout": 0}, None),
    ]
    mon.add_collector("workers", WorkerCollector(lambda: workers, lambda: ScalingState(0.9, {"cuda:0": 1.1})))
    inst = Instrumentation(tiny_pipe, cfg.workload, metrics, model_id=MODEL)
    records: list[GenerationRecord] = []
    inst.record_listeners.append(records.append)
    try:
        connect_in_process(mon, cfg, inst, policy)
        for _ in range(2):  # two samples: rates and GPM need a previous one, at least 100 ms before
            for name in mon.sampler.sources:
                if name != "diagnosis":
                    mon.sampler.run_once(name)
            time.sleep(0.2)
        for seed in range(4):
            tiny_pipe(
                "a red fox",
                width=64,
                height=64,
                num_inference_steps=2,
                guidance_scale=5.0 if seed else 0,
                generator=torch.Generator("cpu").manual_seed(seed),
            )
        with pytest.raises(TypeError):
            tiny_pipe("x", no_such_argument=1)
        comm = (CommunicationTiming("denoise_step", 0.004, 3, 0), CommunicationTiming("denoise_step", 0.005, 3, 1))
        metrics.observe(dataclasses.replace(records[0], communication=comm, world_size=2))
        if policy is not None:
            policy.runner.gate.submit("gc_collect", "test")
            policy.runner.idle_tick()
            if policy.alerts is not None:
                policy.alerts.close(timeout=5.0)
        if "diagnosis" in mon.sampler.sources:
            mon.sampler.run_once("diagnosis")
        mon.errors.add("generation")  # as after a scrape in which a collector raised
        text = generate_latest(registry).decode()
    finally:
        inst.remove()
        mon.stop()
    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + ("_total" if fam.type == "counter" else "_info" if fam.type == "info" else "")
        f = out.setdefault(name, Family(fam.type, {}))
        f.series += len(fam.samples)
        for s in fam.samples:
            for k, v in s.labels.items():
                if k not in ("le", "quantile"):
                    f.labels.setdefault(k, set()).add(v)
    return out


# Features whose families exist only while they are on: README marker "(only with `KEY`)" → what turns
# the feature off in _full_config. Every other family is there whenever its source is.
FEATURES: dict[str, str] = {
    "workload.prompt_cache.enabled": "prompt_cache",
    "workload.jsonl.path": "jsonl",
    "alerting.alertmanager_urls": "alerts",
    "sampling.allocator.enabled": "allocator",
    "sampling.nvml.gpm": "gpm",
    "sampling.nvml.enabled": "nvml",
    "sampling.nvml.slow_interval_seconds": "pcie",
    "sampling.nvml.processes": "processes",
    "sampling.host.per_cpu": "per_cpu",
    "sampling.disk.paths": "paths",
    "policy.enabled": "policy",
}


# Families whose series need what the CPU test host cannot give (a real CUDA empty_cache that frees memory).
NO_SERIES = frozenset({"zmon_remediation_last_freed_bytes"})


@pytest.fixture(scope="module")
def full(tiny_pipe: Any) -> dict[str, Family]:
    return exposition(tiny_pipe, _full_config())


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return readme_rows()


def _documented(rows: list[Row], exported: set[str]) -> dict[str, Row]:
    """Exported family → the README row naming it (a `_suffix` reading that exists in the code)."""
    out: dict[str, Row] = {}
    for row in rows:
        for readings in row.names:
            for name in readings & exported:
                out[name] = row
    return out


def test_every_family_in_the_readme_exists_and_every_exported_family_is_in_the_readme(
    full: dict[str, Family], rows: list[Row]
) -> None:
    exported = set(full)
    unknown = [
        sorted(r)[0] if len(r) == 1 else f"a reading of {sorted(r)}"
        for row in rows
        for r in row.names
        if not r & exported
    ]
    assert not unknown, f"the README names families zmon does not export: {unknown}"
    missing = sorted(exported - set(_documented(rows, exported)))
    assert not missing, f"the README's metric reference lacks: {missing}"


def test_types_and_label_names_match(full: dict[str, Family], rows: list[Row]) -> None:
    problems = []
    for name, row in sorted(_documented(rows, set(full)).items()):
        fam = full[name]
        if row.kind != fam.kind:
            problems.append(f"{name}: README says {row.kind}, zmon exports a {fam.kind}")
        if not fam.labels and name in NO_SERIES:  # no series here to read label names from
            continue
        if set(row.labels) != set(fam.labels):
            problems.append(f"{name}: README labels {sorted(row.labels)}, exported {sorted(fam.labels)}")
    assert not problems, "\n".join(problems)


def test_enumerated_label_values_match_the_code(full: dict[str, Family], rows: list[Row]) -> None:
    """Every value the README lists exists in the code, and the README lists every value the code can give."""
    documented = _documented(rows, set(full))
    enums = enumerations()
    problems = []
    for (name, label), code_values in sorted(enums.items()):
        seen = full[name].labels.get(label, set())
        values = code_values if code_values is not None else frozenset(seen)
        assert seen <= values, f"{name}{{{label}}} exported {sorted(seen - values)} beyond the code's constants"
        listed = documented[name].labels.get(label)
        if listed != values:
            problems.append(f"{name}{{{label}}}: README lists {sorted(listed or ())}, the code gives {sorted(values)}")
    for name, row in sorted(documented.items()):  # values listed where the test knows of no enumeration
        for label, listed in row.labels.items():
            if listed is not None and (name, label) not in enums:
                problems.append(f"{name}{{{label}}}: README lists values for a label the test does not enumerate")
    assert not problems, "\n".join(problems)


def test_readme_kinds_are_the_exported_ones() -> None:
    """The prose names the same bottleneck kinds as the table (rules written from the README must match)."""
    from zmon.analysis.live import KINDS

    text = README.read_text()
    for stale in ("`kernel`", "misconfigurations)"):
        assert stale not in text
    for kind in KINDS:
        assert kind in text


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_only_families_are_marked(
    feature: str, full: dict[str, Family], rows: list[Row], tiny_pipe: Any
) -> None:
    """The families the README marks "(only with `feature`)" are exactly those that vanish without it."""
    without = {name for name, f in exposition(tiny_pipe, _full_config(**{FEATURES[feature]: True})).items() if f.series}
    present = {name for name, f in full.items() if f.series}
    vanished = present - without
    assert without <= present
    marked = {name for name, row in _documented(rows, set(full)).items() if row.feature == feature} - NO_SERIES
    # A family gated by a feature that another feature also gates (NVML's families need nvml; GPM's need
    # both) is marked with the narrowest one.
    narrower = {
        name for name, row in _documented(rows, set(full)).items() if row.feature in FEATURES and row.feature != feature
    }
    assert marked <= vanished, f"marked but present without {feature}: {sorted(marked - vanished)}"
    assert vanished - narrower <= marked, f"vanish without {feature} but unmarked: {sorted(vanished - marked)}"


def test_every_marker_names_a_known_feature(rows: list[Row]) -> None:
    unknown = {row.feature for row in rows if row.feature is not None} - set(FEATURES)
    assert not unknown, unknown
