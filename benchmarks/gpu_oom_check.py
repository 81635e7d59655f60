"""GPU check of the runner's OOM path with real CUDA: a real OutOfMemoryError raised inside the denoiser on the
first call, a memory snapshot dumped, empty_cache, one retry; the run goes on. Embedded model on CUDA.
Run: python -m benchmarks.gpu_oom_check --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    from zmon.app.run import build_run
    from zmon.config import load_config

    snap = args.out / "oom-snapshots"
    cfg = load_config(
        environ={},
        overrides={
            "model": {"device": "cuda", "cache_dir": "/tmp/zmon-oom-cache"},
            "workload": {"max_generations": 3, "oom": {"memory_snapshot_dir": str(snap)}},
        },
    )
    session = build_run(cfg, serve_http=False)
    calls = {"n": 0}

    def explode(module: object, inputs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: a real allocator OOM

    h = session.pipe.transformer.register_forward_pre_hook(explode)
    try:
        result = session.run(max_generations=3)
    finally:
        h.remove()
        reg = session.monitor.registry
        for status in ("ok", "oom"):
            v = sum(
                s.value
                for m in reg.collect()
                if m.name == "zmon_generations"
                for s in m.samples
                if s.name == "zmon_generations_total" and s.labels.get("status") == status
            )
            print(f"zmon_generations_total{{status={status!r}}} = {v}")
        print(
            "empty_cache actions:",
            reg.get_sample_value("zmon_remediation_actions_total", {"action": "empty_cache", "result": "ok"}),
        )
        session.close()
    print("result:", result)
    print(
        "snapshots:", sorted(p.name for p in snap.glob("*.pickle")), [p.stat().st_size for p in snap.glob("*.pickle")]
    )


if __name__ == "__main__":
    main()
