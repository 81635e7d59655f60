#!/usr/bin/env bash
# GPU machine, one call (~5 min): what the last merges changed on a real GPU.
#   1. the profiler's overhead again (interleaved bare vs stage timing + 10 Hz sampling with GPM; the monitor's
#      first samples are now taken before timing, as `zmon profile` does);
#   2. `zmon watch` on the real NVML: start-up log (quiet on a GPU host?), /metrics through promtool, SIGHUP
#      reload with a changed config, /metrics again;
#   3. the one-GPU worker path (benchmarks/gpu_multi.sh one).
# $OUT: env.txt, overhead.json, watch.log, watch-metrics.txt (+ gpu_multi's files): at most 8.
source benchmarks/gpu_env.sh || exit 1
[ -x /tmp/promtool ] && export PATH="/tmp:$PATH"
echo "== 1. overhead"
OUT=/tmp/ovh timeout 120 python3 -m benchmarks.gpu_zoo --cases none --overhead-pairs 5 2>&1 | grep -v "skipped: maximum\|was missed by" | tail -4
cp /tmp/ovh/zoo.json "$OUT/overhead.json" 2>/dev/null
echo "== 2. zmon watch, real NVML, SIGHUP"
cfg=/tmp/zmon-watch.yaml
printf 'server: {listen: "127.0.0.1:8739"}\nsampling: {nvml: {gpm: true}}\n' > $cfg
python3 -m zmon watch --config $cfg > /tmp/watch.log 2>&1 &
pid=$!
for i in $(seq 1 40); do curl -sf http://127.0.0.1:8739/metrics > /tmp/m1.txt && grep -q '^zmon_gpu_sm_active_ratio' /tmp/m1.txt && break; sleep 0.5; done
promtool check metrics < /tmp/m1.txt && echo "promtool: clean (before reload)"
printf 'server: {listen: "127.0.0.1:8739"}\nsampling: {nvml: {gpm: true, interval_seconds: 0.5}}\nlogging: {level: DEBUG}\n' > $cfg
kill -HUP $pid; sleep 3
curl -sf http://127.0.0.1:8739/metrics > "$OUT/watch-metrics.txt"
promtool check metrics < "$OUT/watch-metrics.txt" && echo "promtool: clean (after reload)"
grep -E '^zmon_config|^zmon_gpu_(sm_active|tensor_active|dram_bandwidth)|^zmon_collector_available' "$OUT/watch-metrics.txt"
kill -TERM $pid; wait $pid; echo "watch exit: $?"
grep -v DEBUG /tmp/watch.log | tee "$OUT/watch.log" | tail -20
echo "== 3. one-GPU worker path"
timeout 150 bash benchmarks/gpu_multi.sh one | tail -30
ls "$OUT"
