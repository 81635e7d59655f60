#!/usr/bin/env bash
# GPU machine, run 2: the allocator sweep (policy on/off, memory cap, expandable segments), then RSS of
# `zmon watch` import by import. Only 8 files come back from $OUT: the chosen ones are copied to its top level.
source benchmarks/gpu_env.sh
FULL="$OUT/full/a/b"; mkdir -p "$FULL"
timeout 480 python3 -m benchmarks.gpu_sweep --out "$FULL" --budget 430 > "$OUT/gpu_sweep.log" 2>&1; echo "sweep rc=$?"
cp "$FULL/gpu_sweep.txt" "$FULL/gpu_sweep.json" "$OUT/" 2>/dev/null
for m in default expandable; do cp "$FULL/sweep-$m.json" "$OUT/" 2>/dev/null; done
python3 - > "$OUT/rss.txt" 2>&1 <<'PY'
import psutil, time
p = psutil.Process()
r = lambda: p.memory_info().rss / 2**20
print(f"interpreter {r():.1f} MiB")
import pydantic; print(f"+pydantic {r():.1f}")
import prometheus_client, apscheduler.schedulers.background; print(f"+prometheus_client, apscheduler {r():.1f}")
import zmon.app; print(f"+zmon.app {r():.1f}")
import pynvml; pynvml.nvmlInit(); print(f"+nvmlInit {r():.1f}")
from zmon.app import build_watch
from zmon.config import Config
mon = build_watch(Config(), serve_http=False); mon.start(); time.sleep(5); print(f"running 5 s {r():.1f}")
import sys; print("modules", len(sys.modules))
mon.stop()
PY
cat "$OUT/rss.txt"; tail -40 "$OUT/gpu_sweep.txt"
