#!/usr/bin/env bash
# On the GPU machine: Nsight Compute sections (speed of light, occupancy,
# warp stalls, scheduler, memory) of one launch of the kernel named $1 in
# d = 768 GPT training steps of scheme $2 (default mhc), after SKIP (default
# 30) launches of it. Output: $OUT/ncu_<kernel>.txt and a summary on stdout.
# Needs .device-bin/ (scripts/build-device-bin.sh).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
kernel=${1:?kernel name}
scheme=${2:-mhc}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 0; }
timeout "${PROFILE_TIMEOUT:-200}" "$NCU" --clock-control none -k "regex:^${kernel}\$" -s "${SKIP:-30}" -c 1 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis \
  .device-bin/mhc-bench --train-width 768 --schemes "$scheme" --reps 5 > "$out/ncu_$kernel.txt" 2>&1
grep -E "Duration|Throughput|Occupancy|Registers Per|Shared Memory Config|Dynamic Shared|Block Limit|Waves|Warp Cycles|Eligible|Issued Warp|No Eligible|Stall|stall" \
  "$out/ncu_$kernel.txt" | head -70
