"""Fresh-process side of `zmon tune`: `python -m zmon.tune.worker SPEC.json`.

Some variants only exist from process start: the CUDA caching allocator reads PYTORCH_CUDA_ALLOC_CONF once,
when CUDA initialises. The parent (zmon.tune.runner.run_worker) starts this module with the setting in the
environment; here the pipeline is built (SPEC's factory "module:function", else loaded from the config,
which also applies its `model:` options), warmed up with the same detection, measured on the same timed
generation (the workload's first item and seed) and its check outputs saved, so the parent compares it
like any variant.
The result JSON carries an "error" instead when something fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from zmon.capture.profile import workload_spec
from zmon.config import Config
from zmon.instrumentation import anatomy
from zmon.tune.measure import WarmupRule
from zmon.tune.runner import Bench, Measurement, TuneOptions, failure_reason
from zmon.tune.variants import TuneContext
from zmon.workload import options as opt
from zmon.workload.alloc_conf import effective_alloc_conf, export_alloc_conf
from zmon.workload.loading import load_pipeline


def _build(spec: dict[str, Any], cfg: Config) -> tuple[Any, str]:
    """(pipeline with the config's model options applied, model id)."""
    factory = spec.get("factory")
    if factory:
        export_alloc_conf(cfg.model.alloc_conf)  # the parent set it already; this checks it
        module, _, name = str(factory).partition(":")
        pipe = getattr(importlib.import_module(module), name)()
        opt.apply_model_options(pipe, cfg.model)
        return pipe, str(spec.get("model_id") or cfg.model.id)
    loaded = load_pipeline(cfg.model, img2img=bool(cfg.workload.init_images))
    return loaded.pipe, str(spec.get("model_id") or loaded.model_id)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    o = spec["options"]
    if o.get("compile_backend"):
        opt.DEFAULT_COMPILE_BACKEND = o["compile_backend"]  # what the parent's tune compiles with
    cfg = Config.model_validate(spec["config"])
    options = TuneOptions(
        runs=int(o["runs"]),
        rounds=int(o["rounds"]),
        check_items=int(o["check_items"]),
        warmup=WarmupRule(**o["warmup"]),
    )
    pipe, model_id = _build(spec, cfg)
    ctx = TuneContext(
        pipe=pipe,
        cfg=cfg,
        spec=workload_spec(cfg, pipe, model_id),
        model_id=model_id,
        device=anatomy.pipeline_device(pipe),
        dtype=anatomy.dtype(pipe) or "float32",
        prompt_cache=cfg.workload.prompt_cache if cfg.workload.prompt_cache.enabled else None,
    )
    bench = Bench(ctx)
    warm = bench.warm(options.warmup, "fresh")
    outputs = bench.outputs(options.check_items)
    m = Measurement()
    for _ in range(options.rounds):
        walls, records = bench.block(options.per_round)
        m.add_round(walls, records)
    torch.save(outputs, spec["outputs"])
    return {
        "walls": m.walls,
        "round_medians": m.round_medians,
        "records": [dataclasses.asdict(r) for r in m.records],
        "warmup": warm.to_dict(),
        "device": ctx.device,
        "alloc_conf": effective_alloc_conf(),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    try:
        result = run(spec)
    except Exception as e:
        result = {"error": failure_reason(e)}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
