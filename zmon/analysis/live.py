"""The live diagnosis as data: one evaluation of the rolling window, its JSON, its text and its metrics.

Pure: the window itself (records and samples, on threads) is zmon.capture.live; this module only shapes
what an evaluation found, for GET /diagnosis, `zmon diagnose` and the zmon_bottleneck* families.
"""

from __future__ import annotations

import datetime as dt
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zmon.analysis.diagnosis import RULES, Diagnosis, Verdict
from zmon.analysis.facts import ProfileFacts

KINDS: tuple[str, ...] = tuple(r.kind for r in RULES)
VERDICTS: tuple[str, ...] = typing.get_args(Verdict)

# One fixed remedy per finding kind for the `fix` label: the diagnosis' own fix text quotes live figures
# (41% of the generation…) and would mint a new series at every evaluation. The tailored text is in
# GET /diagnosis.
LIVE_FIXES: Mapping[str, str] = {
    "cpu_bound": "enable the prompt cache (workload.prompt_cache.enabled), batch prompt encoding, encode PNGs "
    "off the critical path, prepare next inputs while the GPU works",
    "memory_fragmentation": "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, empty_cache only at safe "
    "points, pre-warm the largest shape",
    "gpu_underutilization": "raise the batch size, torch.compile the transformer, find the gaps in a trace",
    "io_throttling": "keep the model resident on fast storage (NVMe, safetensors) and warm up before serving",
    "untimed_work": "find the work between stages in a trace (POST /trace) and move it off the critical path",
    "latency_variance": "look for other tenants on the GPU or CPU, throttled clocks, swapping or a varying workload",
    "recompiles": "pad prompts to a fixed length, serve fixed resolution buckets, or mark the varying dims dynamic",
    "kernel_optimization": "capture a trace (POST /trace) and look for synchronisations, throttled clocks or "
    "recompiles",
    "multi_gpu_network": "use NVLink-connected GPUs, larger per-GPU batches, fewer synchronisation points",
    "cfg_on_distilled": "set guidance_scale 0 on the guidance-distilled model",
    "excess_steps": "use the step count of the model card",
    "compile_off": "torch.compile the transformer (model.compile: true)",
    "cpu_offload": "drop enable_*_cpu_offload and keep the pipeline on the GPU: the weights fit",
    "float32_on_gpu": "load the pipeline with torch_dtype=torch.bfloat16 (model.dtype: bfloat16)",
}


@dataclass(frozen=True)
class LiveSnapshot:
    """One evaluation of the rolling window; `diagnosis` is None until enough generations were seen."""

    evaluated_at: float  # unix seconds
    window_seconds: float
    generations: int  # successful generations in the window
    min_generations: int
    diagnosis: Diagnosis | None
    facts: ProfileFacts | None

    def to_dict(self) -> dict[str, Any]:
        facts = None
        if self.facts is not None:
            facts = self.facts.to_dict()
            # The raw samples are many and add nothing a dashboard lacks; the per-stage figures stay.
            facts["utilization"].pop("gpu_samples", None)
            facts["utilization"].pop("cpu_samples", None)
        return {
            "evaluated_at": self.evaluated_at,
            "window_seconds": self.window_seconds,
            "generations": self.generations,
            "min_generations": self.min_generations,
            "verdict": None if self.diagnosis is None else self.diagnosis.verdict,
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
            "facts": facts,
        }


def render_live(doc: Mapping[str, Any]) -> str:
    """The verdict and active findings of a /diagnosis document, as plain text."""

    window = doc.get("window_seconds")
    n = doc.get("generations", 0)
    when = doc.get("evaluated_at")
    stamp = (
        dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(when, (int, float))
        else "unknown"
    )
    span = f"{n} generation(s) in the last {window:g} s (evaluated {stamp})" if window else f"{n} generation(s)"
    d = doc.get("diagnosis")
    if not d:
        return (
            f"no diagnosis yet: {span}; it needs at least {doc.get('min_generations', '?')} successful "
            "generation(s) in the window\n"
        )
    confidence = d.get("confidence")
    head = f"verdict: {d['verdict']}" + (f" (confidence {confidence})" if confidence else "") + f" — {d['action']}"
    out = [head, f"  {d['summary']}", f"window: {span}"]
    for caveat in d.get("caveats") or ():
        out.append(f"  caveat: {caveat}")
    out.append("")
    active = [f for f in d.get("findings", []) if f.get("active")]
    if not active:
        out.append("no active findings")
    else:
        out.append("active findings (by priority):")
        for i, f in enumerate(active, 1):
            out.append(f"  {i}. {f['title']} [priority {f['priority']}: impact {f['impact']}, effort {f['effort']}]")
            if f.get("fix"):
                out.append(f"     fix: {f['fix']}")
    return "\n".join(out) + "\n"
