#!/usr/bin/env bash
# Tuning experiment on the GPU machine: times fwd+bwd at C = 4096 for kernel
# variants selected through MHC_CUDA_DEFINES (each run first checks parity).
set -uo pipefail
for defs in "" "-DDX_MINB=1" "-DDX_MINB=2"; do
  line=$(MHC_CUDA_DEFINES="$defs" .device-bin/mhc-bench --widths 4096 --reps 20 2>&1 | grep -E "^\| 4096 \| bf16 \| false|error")
  echo "[$defs] $line"
done
