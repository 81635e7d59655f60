#!/usr/bin/env bash
# GPU machine, run 1: `zmon watch` and `zmon run` on the real card (/metrics fetched and linted with promtool),
# the watch benchmark with real NVML, and the full-size stage split / instrumentation overhead.
# Usage (repo root, device tool): bash benchmarks/gpu_exporter.sh   (writes to $OUT)
source benchmarks/gpu_env.sh
fetch() { python3 -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen('$1', timeout=10).read().decode())"; }

python3 -m zmon watch --listen 127.0.0.1:8739 > "$OUT/watch.log" 2>&1 &
W=$!; sleep 12
fetch http://127.0.0.1:8739/metrics > "$OUT/watch_metrics.txt"
/tmp/promtool check metrics < "$OUT/watch_metrics.txt" > "$OUT/watch_promtool.txt" 2>&1; echo "promtool rc=$?" >> "$OUT/watch_promtool.txt"
kill $W; wait $W
echo "== watch: $(wc -l < "$OUT/watch_metrics.txt") lines; $(cat "$OUT/watch_promtool.txt")"

cat > /tmp/run.yaml <<'YAML'
model: {device: cuda, cache_dir: /tmp/zmon-cache}
workload: {max_generations: 30, resolutions: ["64x64", "128x128"]}
YAML
python3 -m zmon run -c /tmp/run.yaml --listen 127.0.0.1:8740 --linger 20 > "$OUT/run.log" 2>&1 &
R=$!; sleep 25
fetch http://127.0.0.1:8740/metrics > "$OUT/run_metrics.txt"
/tmp/promtool check metrics < "$OUT/run_metrics.txt" > "$OUT/run_promtool.txt" 2>&1; echo "promtool rc=$?" >> "$OUT/run_promtool.txt"
kill $R; wait $R
echo "== run: $(wc -l < "$OUT/run_metrics.txt") lines; $(cat "$OUT/run_promtool.txt")"
grep -E '^zmon_(torch_(reserved|allocated|fragmentation|reserved_unallocated)|generations_total|stage_duration_seconds_count|collector_available)' "$OUT/run_metrics.txt" | head -30

python3 -m benchmarks.bench_watch --real-nvml --seconds 10 --scrapes 300 2>&1 | tee "$OUT/bench_watch.txt"
python3 -m benchmarks.gpu_stages --pairs 12 --repeats 2 --out "$OUT" 2>&1 | tee "$OUT/gpu_stages.txt"
