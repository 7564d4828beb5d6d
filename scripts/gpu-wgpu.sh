#!/usr/bin/env bash
# Runs mhc-gpu on the GPU machine through Vulkan: unpacks the Vulkan loader
# carried in .device-wgpu/ (see scripts/build-wgpu-device-bin.sh), finds the
# NVIDIA ICD, runs the parity tests, then the benchmark at BENCH.md's shapes
# and the CUDA wrapper bench in f32 for comparison. Results go to $OUT
# (default: .device-wgpu/out). Works on lavapipe too (then the ICD is Mesa's).
#
#   device tool: carry [".device-wgpu"], command "bash scripts/gpu-wgpu.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.device-wgpu
OUT=${OUT:-$bin/out}
mkdir -p "$OUT"
log="$OUT/wgpu-log.txt"
: >"$log"
say() { echo "$*" | tee -a "$log"; }

# 1. The Vulkan loader, unless the system has one.
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  deb=$(ls "$bin"/libvulkan1_*.deb 2>/dev/null | head -n 1)
  [ -n "$deb" ] || { say "no libvulkan1 .deb in $bin; run scripts/build-wgpu-device-bin.sh"; exit 1; }
  if [ "$(id -u)" -eq 0 ]; then
    # Into the system's library folders, then refresh the linker cache: the
    # loader dlopens the NVIDIA ICD's libraries through that cache.
    dpkg-deb -x "$deb" / && ldconfig
    say "Vulkan loader: installed from $deb (ldconfig)"
  else
    rm -rf /tmp/vk && mkdir -p /tmp/vk && dpkg-deb -x "$deb" /tmp/vk
    libdir=$(dirname "$(find /tmp/vk -name 'libvulkan.so.1*' | head -n 1)")
    export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "Vulkan loader: $libdir (from $deb)"
  fi
fi
# 2. The NVIDIA ICD (the loader finds Mesa's by itself).
for d in /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d; do
  if [ -f "$d/nvidia_icd.json" ]; then
    export VK_ICD_FILENAMES="$d/nvidia_icd.json" VK_DRIVER_FILES="$d/nvidia_icd.json"
    say "Vulkan ICD: $d/nvidia_icd.json"
    break
  fi
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"

# 3. Parity tests (they print the adapter; without one they skip).
status=0
for t in parity trainer; do
  say "== wgpu_$t"
  "$bin/wgpu_$t" --test-threads=1 2>&1 | grep -v XDG_RUNTIME_DIR | tee -a "$log" || status=1
done

# 4. Benchmarks: wgpu at BENCH.md's shapes (smaller on a CPU adapter), then CUDA f32.
tokens=${TOKENS:-16384}
"$bin/mhc-gpu-bench" --tokens "$tokens" --widths "${WIDTHS:-1024,4096}" --reps "${REPS:-20}" \
  --train-steps "${TRAIN_STEPS:-20}" --json "$OUT/wgpu-bench.json" 2>&1 | grep -v XDG_RUNTIME_DIR | tee -a "$log" || status=1
if [ "${SKIP_CUDA:-0}" != 1 ] && [ -x "$bin/mhc-bench" ] && command -v nvidia-smi >/dev/null; then
  say "== CUDA wrapper, f32, same shapes"
  "$bin/mhc-bench" --dtype f32 --tokens "$tokens" --json "$OUT/cuda-bench-f32.json" 2>&1 | tee -a "$log" || status=1
fi
say "results in $OUT"
exit $status
