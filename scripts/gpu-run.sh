#!/usr/bin/env bash
# Runs on the GPU machine (from the repository root, with .device-bin and .whl
# carried): the CUDA parity tests, the fused-kernel benchmark and the Python
# peers, all in one call; results land in $OUT (or ./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
echo "== CUDA parity tests"
.device-bin/cuda_parity --nocapture --test-threads 1 2>&1 | tee "$out/parity.log"
.device-bin/cuda_model_ops --nocapture 2>&1 | tee -a "$out/parity.log"
echo "== mhc-bench bf16"
.device-bin/mhc-bench --dtype bf16 --json "$out/bench_bf16.json" 2>&1 | tee "$out/bench.log"
if [ "${SKIP_PEERS:-0}" != 1 ]; then
  echo "== peers"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  PYTHONUNBUFFERED=1 python3 mhc-cuda/bench/peers.py --json "$out/peers.json" 2>&1 | tee "$out/peers.log"
fi
