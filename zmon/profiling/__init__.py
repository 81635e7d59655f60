"""`zmon profile` library: facts from generation records, the diagnosis flowchart, reports and comparisons.

Typical use (the CLI's `zmon profile`, or a daemon on a rolling window)::

    facts = build_facts(records, gpu_samples=gpu, cpu_samples=cpu, memory=mem, io=io, env=env, warmup=1)
    diagnosis = diagnose(facts, config.profiling.thresholds)
    paths = write_reports(facts, diagnosis, out_dir)
    print(render_markdown(facts, diagnosis))
"""

from zmon.profiling.compare import Comparison, compare, compare_files, render_comparison
from zmon.profiling.config import ProfilingConfig, Thresholds
from zmon.profiling.diagnosis import Diagnosis, Evidence, Finding, FlowStep, diagnose
from zmon.profiling.facts import (
    SCHEMA_VERSION,
    CpuSample,
    EnvironmentFacts,
    GpuSample,
    IoFacts,
    MemoryFacts,
    MultiGpuFacts,
    ProfileFacts,
    attribute_utilization,
    build_facts,
    cpu_samples_from_counters,
    memory_facts_from_allocator,
)
from zmon.profiling.html import render_html
from zmon.profiling.report import load_profile, render_markdown, write_reports

__all__ = [
    "SCHEMA_VERSION",
    "Comparison",
    "CpuSample",
    "Diagnosis",
    "EnvironmentFacts",
    "Evidence",
    "Finding",
    "FlowStep",
    "GpuSample",
    "IoFacts",
    "MemoryFacts",
    "MultiGpuFacts",
    "ProfileFacts",
    "ProfilingConfig",
    "Thresholds",
    "attribute_utilization",
    "build_facts",
    "compare",
    "compare_files",
    "cpu_samples_from_counters",
    "diagnose",
    "load_profile",
    "memory_facts_from_allocator",
    "render_comparison",
    "render_html",
    "render_markdown",
    "write_reports",
]
