#!/usr/bin/env bash
# GPU: `zmon profile` on the full-size random-weight Z-Image (eager, then torch.compile'd) and the profiler's
# own overhead on generation time; plus the `zmon profile` CLI on the embedded model, on CUDA.
# Run from the repo root on the GPU machine with PYTHONPATH set so zmon and benchmarks import. Writes to $OUT:
#   cli-tiny/                 zmon profile CLI on CUDA (load from a dropped page cache, NVML, allocator,
#                             --trace, --memory-snapshot), stdout in cli-tiny.md, stderr in cli-tiny.err
#   profile-eager/            profile.{json,md,html}, trace.json(.gz), tb/, memory_snapshot.pickle
#   profile-compiled/         profile.{json,md,html}
#   summary.json              medians, verdicts, findings, trace summary, overhead (bare vs profiled, interleaved)
#   gpu_profile.log           everything the run printed
# Needs nvidia-ml-py in the environment for GPU utilization (without it the flowchart's first question is
# answered from stage shares only). Budget: < 8 min on one H100 (build ~10 s, eager ~1.5 min, overhead ~1 min,
# compiled ~1.5 min).
set -euo pipefail
: "${OUT:?set OUT to the output directory}"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" || true
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PYEOF' || true
import importlib.metadata as m
for p in ("torch", "diffusers", "transformers", "nvidia-ml-py", "psutil", "pydantic", "prometheus-client"):
    try:
        print(p, m.version(p))
    except Exception as e:
        print(p, "MISSING", e)
PYEOF

# 1. the CLI end to end on CUDA with the embedded model (cache outside $OUT so the weights don't come back)
CACHE=${ZMON_GPU_CACHE:-/tmp/zmon-gpu-cache}
cat > "$OUT/cli-tiny.yaml" <<YAML
model:
  cache_dir: $CACHE
profiling:
  disk_test_bytes: 268435456
YAML
timeout 120 "$PY" -m zmon profile -c "$OUT/cli-tiny.yaml" --runs 5 --warmup 1 --out "$OUT/cli-tiny" \
  --trace --memory-snapshot > "$OUT/cli-tiny.md" 2> "$OUT/cli-tiny.err" \
  && echo "cli-tiny: exit 0" || echo "cli-tiny: exit $? (see cli-tiny.err)"
head -c 3000 "$OUT/cli-tiny.md" || true

# 2. full size, in process: eager profile + trace + memory snapshot, overhead A/B, compiled profile
RC=0
timeout 380 "$PY" -m benchmarks.gpu_profile --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_profile.log" || RC=$?

# Large traces may exceed what comes back: keep a compressed copy next to the original.
if [ -f "$OUT/profile-eager/trace.json" ]; then gzip -kf "$OUT/profile-eager/trace.json"; fi
ls -la "$OUT" "$OUT"/profile-* 2>/dev/null || true
for d in profile-eager profile-compiled; do
  if [ -f "$OUT/$d/profile.md" ]; then echo "=== $d"; sed -n '1,12p' "$OUT/$d/profile.md"; fi
done
echo "total $(( $(date +%s) - START )) s, benchmarks.gpu_profile exit $RC"
exit "$RC"
