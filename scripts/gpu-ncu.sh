#!/usr/bin/env bash
# On the GPU machine: Nsight Compute sections (speed of light, occupancy,
# warp stalls, scheduler, memory) of one launch of the kernel named $1 in
# d = 768 GPT training steps of scheme $2 (default mhc), after SKIP (default
# 30) launches of it. Output: $OUT/ncu_<kernel>.txt and a summary on stdout.
# NCU_SOURCE=1 also profiles that launch with the source counters into
# $OUT/ncu_<kernel>.ncu-rep and prints from it, as CSV, the SASS with each
# instruction's stall samples (ncu_<kernel>_sass.csv) and every metric collected
# (ncu_<kernel>_raw.csv): where the warps wait, when a kernel's bound is unclear.
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
if [[ -n "${NCU_SOURCE:-}" ]]; then
  timeout "${PROFILE_TIMEOUT:-200}" "$NCU" --clock-control none -k "regex:^${kernel}\$" -s "${SKIP:-30}" -c 1 \
    --section WarpStateStats --section SourceCounters -f -o "$out/ncu_$kernel" \
    .device-bin/mhc-bench --train-width 768 --schemes "$scheme" --reps 5 > "$out/ncu_${kernel}_src.log" 2>&1
  "$NCU" --import "$out/ncu_$kernel.ncu-rep" --page source --print-source sass --csv > "$out/ncu_${kernel}_sass.csv" 2>&1
  "$NCU" --import "$out/ncu_$kernel.ncu-rep" --page raw --csv > "$out/ncu_${kernel}_raw.csv" 2>&1
  grep -i "stall" "$out/ncu_${kernel}_raw.csv" | head -c 4000
fi
