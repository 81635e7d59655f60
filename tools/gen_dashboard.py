"""Generates the Grafana dashboard grafana/dashboards/zmon.json from the panel list below.

    python tools/gen_dashboard.py          # rewrite the JSON
    python tools/gen_dashboard.py --check  # exit 1 if the committed JSON differs (tests/test_dashboard.py)

Every query filters on the `instance` (and, for GPU panels, `gpu`) template variables and reads its data
source from the `datasource` variable, so one dashboard serves any Prometheus holding zmon's series. Edit this
file, not the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "grafana" / "dashboards" / "zmon.json"

UID = "zmon-main"
TITLE = "zmon — diffusion generation service"
SCHEMA_VERSION = 39
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
INST = 'instance=~"$instance"'
GPU = 'instance=~"$instance", gpu=~"$gpu"'
RATE = "$__rate_interval"

NEEDS_GPU = "an NVIDIA GPU seen through NVML (sampling.nvml.enabled)"
NEEDS_GPM = "a Hopper or later GPU with NVML GPM (sampling.nvml.gpm, sampling.nvml.enabled)"
NEEDS_CUDA = "CUDA in the watched process: zmon run or zmon.attach on a GPU (sampling.allocator.enabled)"
NEEDS_DIAGNOSIS = "zmon run or zmon.attach (not zmon watch) and a few generations in the 5-minute window"
NEEDS_PCIE = "an NVIDIA GPU (sampling.nvml.enabled) and the slow NVML job (sampling.nvml.slow_interval_seconds > 0)"
NEEDS_PROCESSES = "an NVIDIA GPU (sampling.nvml.enabled) with sampling.nvml.processes"
NEEDS_NVLINK = "NVLink-connected Hopper or later GPUs with NVML GPM (sampling.nvml.gpm, sampling.nvml.enabled)"
NEEDS_POLICY = "the policy (policy.enabled) in zmon run or zmon.attach"
NEEDS_PROMPT_CACHE = "the prompt-embedding cache: set workload.prompt_cache.enabled: true (off by default)"
NEEDS_ALERTMANAGER = "Alertmanager URLs in alerting.alertmanager_urls (none by default)"


@dataclass(frozen=True)
class Q:
    """One query of a panel: PromQL, legend, and how Grafana should ask for it."""

    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"  # or "table", "heatmap"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Q, ...]
    kind: str = "timeseries"  # timeseries | stat | heatmap | table | state-timeline
    unit: str = "short"
    width: int = 8
    height: int = 8
    description: str = ""
    stacked: bool = False
    min: float | None = None
    max: float | None = None
    # What the panel's series need that a default install may not have (a feature switch, a GPU): shown in
    # place of an empty graph ("No data: …") and in the description. Name config keys verbatim.
    needs: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _p50_95_99(metric: str, by: str, legend: str) -> tuple[Q, ...]:
    return tuple(
        Q(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{INST}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in (0.5, 0.95, 0.99)
    )


ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "Images per second",
                (Q(f"sum by (instance, model) (rate(zmon_images_total{{{INST}}}[{RATE}]))", "{{instance}} {{model}}"),),
                unit="ops",
                description="Images produced by successful generations.",
            ),
            Panel(
                "Generation latency p50 / p95 / p99",
                _p50_95_99("zmon_generation_duration_seconds", "instance, model", "{{instance}} {{model}}"),
                unit="s",
                description="Wall time of one pipeline call, from zmon_generation_duration_seconds.",
            ),
            Panel(
                "Generations by outcome",
                (
                    Q(
                        f"sum by (instance, status) (rate(zmon_generations_total{{{INST}}}[{RATE}]))",
                        "{{instance}} {{status}}",
                    ),
                ),
                unit="ops",
                stacked=True,
                description="ok, oom (CUDA out of memory) and error.",
            ),
            Panel(
                "Failed generations in range",
                (
                    Q(
                        f'sum(increase(zmon_generations_total{{{INST}, status!="ok"}}[$__range]))',
                        "failed",
                        instant=True,
                    ),
                ),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Generations in progress",
                (Q(f"sum by (instance) (zmon_generation_in_progress{{{INST}}})", "{{instance}}"),),
                width=6,
                height=5,
            ),
            Panel(
                "Denoising steps per second",
                (
                    Q(
                        f"sum by (instance, model) (rate(zmon_denoise_steps_total{{{INST}}}[{RATE}]))",
                        "{{instance}} {{model}}",
                    ),
                ),
                unit="ops",
                width=6,
                height=5,
            ),
            Panel(
                "Pipeline",
                (Q(f"zmon_pipeline_info{{{INST}}}", instant=True, format="table"),),
                kind="table",
                width=6,
                height=5,
                description="Model, pipeline class, device, dtype, compiled.",
            ),
        ),
    ),
    Row(
        "Stages",
        (
            Panel(
                "Share of time per stage",
                (
                    Q(
                        f"sum by (stage) (rate(zmon_stage_duration_seconds_sum{{{INST}}}[{RATE}]))"
                        f" / ignoring (stage) group_left"
                        f" sum(rate(zmon_stage_duration_seconds_sum{{{INST}}}[{RATE}]))",
                        "{{stage}}",
                    ),
                ),
                unit="percentunit",
                stacked=True,
                min=0,
                max=1,
                width=12,
                description="Where a generation spends its time: text_encode, vae_encode, denoise, vae_decode, "
                "postprocess. A large text_encode or postprocess share means CPU-bound.",
            ),
            Panel(
                "Stage latency p95",
                (
                    Q(
                        f"histogram_quantile(0.95, sum by (le, stage) "
                        f"(rate(zmon_stage_duration_seconds_bucket{{{INST}}}[{RATE}])))",
                        "{{stage}}",
                    ),
                ),
                unit="s",
                width=12,
            ),
            Panel(
                "Denoising step time",
                (
                    Q(
                        f"sum by (le) (increase(zmon_denoise_step_duration_seconds_bucket{{{INST}}}[{RATE}]))",
                        "{{le}}",
                        format="heatmap",
                    ),
                ),
                kind="heatmap",
                unit="s",
                width=12,
                description="Distribution of single denoising steps: a second band means uneven steps.",
            ),
            Panel(
                "Step time spread p95 / p50",
                (
                    Q(
                        f"histogram_quantile(0.95, sum by (le, instance) "
                        f"(rate(zmon_denoise_step_duration_seconds_bucket{{{INST}}}[{RATE}])))"
                        f" / histogram_quantile(0.5, sum by (le, instance) "
                        f"(rate(zmon_denoise_step_duration_seconds_bucket{{{INST}}}[{RATE}])))",
                        "{{instance}}",
                    ),
                ),
                unit="short",
                width=12,
                description="Over 1.5: uneven steps (kernel or operator issue).",
            ),
            Panel(
                "Prompt cache hit ratio",
                (
                    Q(
                        f"sum by (instance) (rate(zmon_prompt_cache_hits_total{{{INST}}}[{RATE}]))"
                        f" / (sum by (instance) (rate(zmon_prompt_cache_hits_total{{{INST}}}[{RATE}]))"
                        f" + sum by (instance) (rate(zmon_prompt_cache_misses_total{{{INST}}}[{RATE}])))",
                        "{{instance}}",
                    ),
                ),
                unit="percentunit",
                min=0,
                max=1,
                width=12,
                description="Share of generations whose prompt embeddings were reused (workload.prompt_cache).",
                needs=NEEDS_PROMPT_CACHE,
            ),
            Panel(
                "Workload misconfiguration",
                (Q(f"max by (kind) (zmon_workload_misconfiguration{{{INST}}})", "{{kind}}", instant=True),),
                kind="stat",
                width=12,
                description="1: classifier-free guidance on a distilled model, or its default 50 steps.",
            ),
        ),
    ),
    Row(
        "Model loading",
        (
            Panel(
                "Checkpoint load time",
                (Q(f"zmon_checkpoint_load_seconds{{{INST}}}", "{{instance}} {{model}}", instant=True),),
                kind="stat",
                unit="s",
                width=8,
                height=5,
            ),
            Panel(
                "Checkpoint read throughput",
                (Q(f"zmon_checkpoint_read_bytes_per_second{{{INST}}}", "{{instance}} {{model}}", instant=True),),
                kind="stat",
                unit="Bps",
                width=8,
                height=5,
                description="Under 500 MB/s: I/O-bound loading.",
            ),
            Panel(
                "Checkpoint size",
                (Q(f"zmon_checkpoint_bytes{{{INST}}}", "{{instance}} {{model}}", instant=True),),
                kind="stat",
                unit="bytes",
                width=8,
                height=5,
            ),
        ),
    ),
    Row(
        "GPU",
        (
            Panel(
                "GPU utilization",
                (Q(f"zmon_gpu_utilization_ratio{{{GPU}}}", "{{instance}} GPU {{gpu}}"),),
                unit="percentunit",
                min=0,
                max=1,
                description="Share of time a kernel ran. Under 80% while generating: CPU-bound.",
                needs=NEEDS_GPU,
            ),
            Panel(
                "GPU memory",
                (
                    Q(f"zmon_gpu_memory_used_bytes{{{GPU}}}", "used {{instance}} GPU {{gpu}}"),
                    Q(f"zmon_gpu_memory_total_bytes{{{GPU}}}", "total {{instance}} GPU {{gpu}}"),
                ),
                unit="bytes",
                needs=NEEDS_GPU,
            ),
            Panel(
                "GPU power",
                (
                    Q(f"zmon_gpu_power_watts{{{GPU}}}", "{{instance}} GPU {{gpu}}"),
                    Q(f"zmon_gpu_power_limit_watts{{{GPU}}}", "limit {{instance}} GPU {{gpu}}"),
                ),
                unit="watt",
                needs=NEEDS_GPU,
            ),
            Panel(
                "GPU temperature",
                (Q(f"zmon_gpu_temperature_celsius{{{GPU}}}", "{{instance}} GPU {{gpu}}"),),
                unit="celsius",
                needs=NEEDS_GPU,
            ),
            Panel(
                "GPU clocks",
                (
                    Q(f"zmon_gpu_sm_clock_hertz{{{GPU}}}", "SM {{instance}} GPU {{gpu}}"),
                    Q(f"zmon_gpu_memory_clock_hertz{{{GPU}}}", "memory {{instance}} GPU {{gpu}}"),
                ),
                unit="hertz",
                needs=NEEDS_GPU,
            ),
            Panel(
                "Clock throttle reasons",
                (
                    Q(
                        f'max by (instance, gpu, reason) (zmon_gpu_clock_event_active{{{GPU}, reason!="gpu_idle"}})',
                        "{{instance}} GPU {{gpu}} {{reason}}",
                    ),
                ),
                kind="state-timeline",
                description="1 while the reason holds the clocks down.",
                needs=NEEDS_GPU,
            ),
            Panel(
                "PCIe throughput",
                (
                    Q(f"zmon_gpu_pcie_rx_bytes_per_second{{{GPU}}}", "host→GPU {{instance}} GPU {{gpu}}"),
                    Q(f"zmon_gpu_pcie_tx_bytes_per_second{{{GPU}}}", "GPU→host {{instance}} GPU {{gpu}}"),
                ),
                unit="Bps",
                needs=NEEDS_PCIE,
            ),
            Panel(
                "GPU memory by process",
                (Q(f"zmon_gpu_process_memory_used_bytes{{{GPU}}}", "{{instance}} GPU {{gpu}} pid {{pid}}"),),
                unit="bytes",
                stacked=True,
                needs=NEEDS_PROCESSES,
            ),
            Panel(
                "Xid and ECC errors in range",
                (
                    Q(
                        f"sum by (instance, gpu) (increase(zmon_gpu_xid_errors_total{{{GPU}}}[$__range]))",
                        "Xid {{instance}} GPU {{gpu}}",
                        instant=True,
                    ),
                    Q(
                        f'sum by (instance, gpu) (increase(zmon_gpu_ecc_errors_total{{{GPU}, type="uncorrected"}}'
                        f"[$__range]))",
                        "ECC {{instance}} GPU {{gpu}}",
                        instant=True,
                    ),
                ),
                kind="stat",
                needs=NEEDS_GPU,
            ),
            Panel(
                "GPUs",
                (Q(f"zmon_gpu_info{{{GPU}}}", instant=True, format="table"),),
                kind="table",
                width=24,
                height=5,
                needs=NEEDS_GPU,
            ),
        ),
    ),
    Row(
        "GPU efficiency (GPM, Hopper+)",
        (
            Panel(
                "SM active vs utilization.gpu",
                (
                    Q(f"zmon_gpu_sm_active_ratio{{{GPU}}}", "SM active {{instance}} GPU {{gpu}}"),
                    Q(f"zmon_gpu_utilization_ratio{{{GPU}}}", "utilization.gpu {{instance}} GPU {{gpu}}"),
                ),
                unit="percentunit",
                min=0,
                max=1,
                width=6,
                description="utilization.gpu counts time a kernel ran, however small; SM active counts busy SMs. "
                "High utilization with low SM active: kernels too small to fill the GPU.",
                needs=NEEDS_GPM,
            ),
            Panel(
                "Tensor core active",
                (Q(f"zmon_gpu_tensor_active_ratio{{{GPU}}}", "{{instance}} GPU {{gpu}}"),),
                unit="percentunit",
                min=0,
                max=1,
                width=6,
                description="Share of time the tensor cores were busy: the denoiser's matmuls in bf16/fp16 land here.",
                needs=NEEDS_GPM,
            ),
            Panel(
                "DRAM bandwidth utilization",
                (Q(f"zmon_gpu_dram_bandwidth_utilization_ratio{{{GPU}}}", "{{instance}} GPU {{gpu}}"),),
                unit="percentunit",
                min=0,
                max=1,
                width=6,
                description="DRAM throughput over its peak. High with low tensor activity: memory-bound kernels.",
                needs=NEEDS_GPM,
            ),
            Panel(
                "NVLink throughput",
                (
                    Q(f"zmon_gpu_nvlink_rx_bytes_per_second{{{GPU}}}", "rx {{instance}} GPU {{gpu}}"),
                    Q(f"zmon_gpu_nvlink_tx_bytes_per_second{{{GPU}}}", "tx {{instance}} GPU {{gpu}}"),
                ),
                unit="Bps",
                width=6,
                description="All links; absent on GPUs without NVLink.",
                needs=NEEDS_NVLINK,
            ),
        ),
    ),
    Row(
        "PyTorch allocator",
        (
            Panel(
                "Allocated, reserved and headroom",
                (
                    Q(f"zmon_torch_allocated_bytes{{{INST}}}", "allocated {{instance}} cuda:{{device}}"),
                    Q(f"zmon_torch_reserved_bytes{{{INST}}}", "reserved {{instance}} cuda:{{device}}"),
                    Q(f"zmon_torch_headroom_bytes{{{INST}}}", "headroom {{instance}} cuda:{{device}}"),
                ),
                unit="bytes",
                description="Headroom: device free memory plus the allocator's unallocated cache.",
                needs=NEEDS_CUDA,
            ),
            Panel(
                "Reserved-unallocated vs fragmentation",
                (
                    Q(
                        f"zmon_torch_reserved_unallocated_ratio{{{INST}}}",
                        "(reserved-allocated)/reserved {{instance}} cuda:{{device}}",
                    ),
                    Q(
                        f"zmon_torch_fragmentation_ratio{{{INST}}}",
                        "inactive_split/reserved {{instance}} cuda:{{device}}",
                    ),
                ),
                unit="percentunit",
                min=0,
                max=1,
                description="The first is mostly reusable cache (the article's 30% rule); the second is real "
                "fragmentation and reads 0 under expandable_segments.",
                needs=NEEDS_CUDA,
            ),
            Panel(
                "Allocation retries and OOMs",
                (
                    Q(
                        f"sum by (instance, device) (increase(zmon_torch_alloc_retries_total{{{INST}}}[{RATE}]))",
                        "retries {{instance}} cuda:{{device}}",
                    ),
                    Q(
                        f"sum by (instance, device) (increase(zmon_torch_ooms_total{{{INST}}}[{RATE}]))",
                        "OOMs {{instance}} cuda:{{device}}",
                    ),
                ),
                unit="short",
                needs=NEEDS_CUDA,
            ),
            Panel(
                "Remedial actions",
                (
                    Q(
                        f"sum by (action, result) (increase(zmon_remediation_actions_total{{{INST}}}[{RATE}]))",
                        "{{action}} {{result}}",
                    ),
                ),
                unit="short",
                stacked=True,
                description="empty_cache / gc_collect at safe points, by outcome.",
                needs=NEEDS_POLICY,
            ),
            Panel(
                "Memory freed by remedial actions",
                (
                    Q(
                        f"sum by (instance) (increase(zmon_remediation_freed_bytes_total{{{INST}}}[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
                unit="bytes",
                needs=NEEDS_POLICY,
            ),
            Panel(
                "Policy rules",
                (Q(f"max by (rule) (zmon_policy_rule_state{{{INST}}})", "{{rule}}"),),
                kind="state-timeline",
                description="0 inactive, 1 pending, 2 firing.",
                needs=NEEDS_POLICY,
            ),
            Panel(
                "Allocator configuration",
                (Q(f"zmon_torch_allocator_info{{{INST}}}", instant=True, format="table"),),
                kind="table",
                width=24,
                height=5,
                description="PYTORCH_CUDA_ALLOC_CONF of the watched process.",
                needs=NEEDS_CUDA,
            ),
        ),
    ),
    Row(
        "Host",
        (
            Panel(
                "CPU",
                (
                    Q(f"zmon_host_cpu_utilization_ratio{{{INST}}}", "all cores {{instance}}"),
                    Q(
                        f"max by (instance) (zmon_host_cpu_core_utilization_ratio{{{INST}}})",
                        "busiest core {{instance}}",
                    ),
                ),
                unit="percentunit",
                min=0,
                max=1,
                description="A busiest core near 100% with low average: single-threaded CPU work on the path.",
            ),
            Panel(
                "Watched process CPU",
                (Q(f"sum by (instance) (rate(zmon_process_cpu_seconds_total{{{INST}}}[{RATE}]))", "{{instance}}"),),
                unit="short",
                description="Cores used by the generation service.",
            ),
            Panel(
                "Memory",
                (
                    Q(f"zmon_host_memory_used_bytes{{{INST}}}", "host used {{instance}}"),
                    Q(f"zmon_host_memory_total_bytes{{{INST}}}", "host total {{instance}}"),
                    Q(f"zmon_process_resident_memory_bytes{{{INST}}}", "process RSS {{instance}}"),
                ),
                unit="bytes",
            ),
            Panel(
                "Disk throughput",
                (
                    Q(
                        f"sum by (instance, device) (rate(zmon_disk_read_bytes_total{{{INST}}}[{RATE}]))",
                        "read {{instance}} {{device}}",
                    ),
                    Q(
                        f"sum by (instance, device) (rate(zmon_disk_written_bytes_total{{{INST}}}[{RATE}]))",
                        "write {{instance}} {{device}}",
                    ),
                ),
                unit="Bps",
            ),
            Panel(
                "Disk busy",
                (Q(f"rate(zmon_disk_io_time_seconds_total{{{INST}}}[{RATE}])", "{{instance}} {{device}}"),),
                unit="percentunit",
                min=0,
                max=1,
                description="Share of time with I/O in flight; near 1: saturated.",
            ),
            Panel(
                "Network",
                (
                    Q(
                        f"sum by (instance) (rate(zmon_network_received_bytes_total{{{INST}}}[{RATE}]))",
                        "received {{instance}}",
                    ),
                    Q(
                        f"sum by (instance) (rate(zmon_network_transmitted_bytes_total{{{INST}}}[{RATE}]))",
                        "sent {{instance}}",
                    ),
                ),
                unit="Bps",
            ),
        ),
    ),
    Row(
        "Bottleneck verdicts",
        (
            Panel(
                "Flowchart verdict",
                (Q(f"max by (verdict) (zmon_bottleneck_verdict{{{INST}}})", "{{verdict}}"),),
                kind="state-timeline",
                width=12,
                description="The diagnosis flowchart over the recent generations: network_bound (multi-GPU), "
                "cpu_bound, memory_bound, kernel_issue, io_or_caching or optimized.",
                needs=NEEDS_DIAGNOSIS,
            ),
            Panel(
                "Bottlenecks found",
                (Q(f"max by (kind) (zmon_bottleneck{{{INST}}})", "{{kind}}"),),
                kind="state-timeline",
                width=12,
                description="1 while the live diagnosis finds this bottleneck.",
                needs=NEEDS_DIAGNOSIS,
            ),
            Panel(
                "Findings and fixes",
                (Q(f"zmon_bottleneck_info{{{INST}}}", instant=True, format="table"),),
                kind="table",
                width=24,
                height=6,
                description="Active findings; priority 1 = do first.",
                needs=NEEDS_DIAGNOSIS,
            ),
        ),
    ),
    Row(
        "zmon self-health",
        (
            Panel(
                "Source success",
                (Q(f"min by (collector) (zmon_collector_success{{{INST}}})", "{{collector}}"),),
                kind="state-timeline",
                description="1 if the source's last sample succeeded.",
            ),
            Panel(
                "Sample age",
                (Q(f"max by (collector) (zmon_sample_age_seconds{{{INST}}})", "{{collector}}"),),
                unit="s",
                description="Over 30 s: stale (ZmonSamplesStale).",
            ),
            Panel(
                "Sample duration",
                (Q(f"max by (collector) (zmon_collector_duration_seconds{{{INST}}})", "{{collector}}"),),
                unit="s",
            ),
            Panel(
                "Source failures",
                (
                    Q(
                        f"sum by (collector) (increase(zmon_collector_failures_total{{{INST}}}[{RATE}]))",
                        "{{collector}}",
                    ),
                    # No series until a collector first fails a scrape: read 0 per instance until then.
                    Q(
                        f"sum by (instance) (increase(zmon_exposition_errors_total{{{INST}}}[{RATE}]))"
                        f" or sum by (instance) (zmon_build_info{{{INST}}}) * 0",
                        "exposition errors {{instance}}",
                    ),
                ),
                unit="short",
                description="Failed samples per source, and scrapes in which a collector raised.",
            ),
            Panel(
                "Sources available",
                (Q(f"min by (collector) (zmon_collector_available{{{INST}}})", "{{collector}}", instant=True),),
                kind="stat",
                description="0: the source cannot exist here (no NVML, no CUDA).",
            ),
            Panel(
                "Alerts sent to Alertmanager",
                (Q(f"sum by (result) (increase(zmon_alerts_sent_total{{{INST}}}[{RATE}]))", "{{result}}"),),
                unit="short",
                description="zmon's own policy alerts, by delivery outcome (alerting.alertmanager_urls).",
                needs=NEEDS_ALERTMANAGER,
            ),
            Panel(
                "zmon build",
                (Q(f"zmon_build_info{{{INST}}}", instant=True, format="table"),),
                kind="table",
                width=24,
                height=5,
            ),
        ),
    ),
)

# Remedial actions drawn on every time series panel.
ANNOTATIONS: tuple[dict[str, Any], ...] = (
    {
        "name": "Remedial actions",
        "datasource": DS,
        "enable": True,
        "iconColor": "orange",
        "expr": f'changes(zmon_remediation_actions_total{{{INST}, result=~"ok|dry_run"}}[1m]) > 0',
        "step": "15s",
        "titleFormat": "{{action}} ({{result}})",
        "tagKeys": "instance,action,result",
        "textFormat": "zmon ran {{action}} on {{instance}}",
        "useValueForTime": False,
    },
)


def _field_config(p: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.needs:
        defaults["noValue"] = f"No data: needs {p.needs}"
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if p.stacked else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if p.stacked else "none", "group": "A"},
        }
    if p.kind == "state-timeline":
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
        }
    return {"defaults": defaults, "overrides": []}


def _options(p: Panel) -> dict[str, Any]:
    if p.kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if p.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": "value_and_name",
        }
    if p.kind == "heatmap":
        return {
            "calculate": False,
            "yAxis": {"unit": p.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "tooltip": {"show": True, "yHistogram": True},
        }
    if p.kind == "state-timeline":
        return {"showValue": "never", "mergeValues": True, "rowHeight": 0.9}
    return {"showHeader": True}


class _Grid:
    """Places panels left to right in a 24-column grid, wrapping to the next line."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.line_height = 0
        self.next_id = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self) -> dict[str, int]:
        self.newline()
        pos = {"h": 1, "w": 24, "x": 0, "y": self.y}
        self.y += 1
        return pos

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.line_height = max(self.line_height, h)
        return pos

    def newline(self) -> None:
        if self.x:
            self.y += self.line_height
        self.x = 0
        self.line_height = 0


def _panel(p: Panel, grid: _Grid) -> dict[str, Any]:
    targets = []
    for i, q in enumerate(p.queries):
        t: dict[str, Any] = {
            "datasource": DS,
            "refId": chr(ord("A") + i),
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "range": not q.instant,
            "instant": q.instant,
            "format": q.format,
        }
        targets.append(t)
    out: dict[str, Any] = {
        "id": grid.new_id(),
        "type": p.kind,
        "title": p.title,
        "datasource": DS,
        "gridPos": grid.place(p.width, p.height),
        "targets": targets,
        "fieldConfig": _field_config(p),
        "options": _options(p),
    }
    description = " ".join(x for x in (p.description, f"Needs {p.needs}." if p.needs else "") if x)
    if description:
        out["description"] = description
    if p.kind == "table":
        out["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
        ]
    return out


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,  # on time range change
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    grid = _Grid()
    panels: list[dict[str, Any]] = []
    for row in ROWS:
        panels.append(
            {
                "id": grid.new_id(),
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": grid.row(),
                "panels": [],
            }
        )
        panels.extend(_panel(p, grid) for p in row.panels)
    annotations = [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        },
        *ANNOTATIONS,
    ]
    return {
        "uid": UID,
        "title": TITLE,
        "description": "zmon: generation throughput and latency, stage shares, GPU, PyTorch allocator, host, "
        "bottleneck verdicts and zmon's own health. Generated by tools/gen_dashboard.py.",
        "tags": ["zmon", "gpu", "diffusion"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "links": [],
        "annotations": {"list": annotations},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                },
                _variable("instance", "Instance", "label_values(zmon_build_info, instance)"),
                _variable("gpu", "GPU", 'label_values(zmon_gpu_up{instance=~"$instance"}, gpu)'),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target of a dashboard dict (rows included)."""
    out: list[tuple[str, str]] = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for t in inner.get("targets", []):
                if t.get("expr"):
                    out.append((inner.get("title", ""), t["expr"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python tools/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
