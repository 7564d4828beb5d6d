#!/usr/bin/env bash
# Data-parallel CUDA training over NCCL (issue 8), for a later session on
# nvidia-h200-x2 or nvidia-h200-x4 (NOT YET RUN). Needs .device-bin/ from
# scripts/build-device-bin.sh (it now includes the cuda_data_parallel test
# binary) and libnccl.so on the machine. JSON and logs land in $OUT.
#
#   run(kind="nvidia-h200-x4", carry=[".device-bin"], command="OUT=$OUT scripts/gpu-dataparallel.sh")
#
# NVLink multicast stays off: NCCL_NVLS_ENABLE=0 here, and the code refuses any other value.
set -uo pipefail
export NCCL_NVLS_ENABLE=0
out=${OUT:-gpu-out}
mkdir -p "$out"
B=.device-bin
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi topo -m > "$out/topology.txt" 2>&1
echo "== equivalence: N GPUs against one GPU (f32 products, 5 steps)"
$B/cuda_data_parallel --test-threads 1 --nocapture several_gpus 2>&1 | tee "$out/equivalence.log"
echo "== scaling: tokens/s per GPU against one GPU, per-GPU batch fixed (bf16 products)"
MHC_DP_WIDTH=768 MHC_DP_HEADS=12 MHC_DP_BATCH=16 MHC_DP_JSON="$out/dataparallel_768.json" \
  $B/cuda_data_parallel --ignored --nocapture --test-threads 1 scaling_benchmark 2>&1 | tee "$out/scaling_768.log"
MHC_DP_WIDTH=2048 MHC_DP_HEADS=16 MHC_DP_BATCH=8 MHC_DP_JSON="$out/dataparallel_2048.json" \
  $B/cuda_data_parallel --ignored --nocapture --test-threads 1 scaling_benchmark 2>&1 | tee "$out/scaling_2048.log"
