#!/usr/bin/env bash
# GPU machine, run 3: `zmon profile` (CLI on the embedded model on CUDA; full size eager + compiled, overhead),
# and the runner's OOM path with real CUDA. Only 8 files come back: the chosen ones are copied to $OUT's top.
source benchmarks/gpu_env.sh
FULL="$OUT/full/a/b"; mkdir -p "$FULL"
python3 -m benchmarks.gpu_oom_check --out "$FULL" > "$OUT/run3.log" 2>&1; echo "oom check rc=$?" >> "$OUT/run3.log"
OUT="$FULL" bash benchmarks/gpu_profile.sh >> "$OUT/run3.log" 2>&1; echo "profile rc=$?" >> "$OUT/run3.log"
cp "$FULL/summary.json" "$OUT/" 2>/dev/null
for d in eager compiled; do
  cp "$FULL/profile-$d/profile.json" "$OUT/$d-profile.json" 2>/dev/null
  cp "$FULL/profile-$d/profile.md" "$OUT/$d-profile.md" 2>/dev/null
done
cp "$FULL/profile-eager/profile.html" "$OUT/eager-profile.html" 2>/dev/null
cp "$FULL/cli-tiny.md" "$OUT/cli-tiny.md" 2>/dev/null
ls -la "$FULL" "$FULL"/profile-eager >> "$OUT/run3.log" 2>&1
grep -E "zmon_generations_total|empty_cache actions|result:|snapshots:|rc=|cli-tiny: exit|total .* s" "$OUT/run3.log"
