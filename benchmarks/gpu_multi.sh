#!/usr/bin/env bash
# GPU machine: benchmarks/gpu_multi.py with the carried wheels (benchmarks/gpu_env.sh).
#   bash benchmarks/gpu_multi.sh one          # ONE GPU (nvidia-h200): the worker path, 1 worker, full-size Z-Image
#   bash benchmarks/gpu_multi.sh multi [N]    # N GPUs (nvidia-h200-x2 and up): probe, 1 vs N workers, context
#                                             # parallel with and without a slow collective
# $OUT gets gpu_multi_<mode>.json, gpu_multi_<mode>.log, metrics-*.txt, probe.json (multi), env.txt: <= 6 files.
# Budget: one ~1-2 min; multi ~4-6 min on 2 H200 (builds the 10 B-parameter pipeline 4 times).
source benchmarks/gpu_env.sh
mode=${1:-one}
gpus=${2:-2}
# NVLink multicast stays off (zmon sets these in every process it starts; set here too for anything else).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -x /tmp/promtool ] && export PATH="/tmp:$PATH"
python3 -m benchmarks.gpu_multi --mode "$mode" --gpus "$gpus" --out "$OUT" 2>&1 | tee "$OUT/gpu_multi_$mode.log"
exit "${PIPESTATUS[0]}"
