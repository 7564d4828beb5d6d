#!/usr/bin/env bash
# On the GPU machine (one call): A/B of kernel variants selected through
# MHC_CUDA_DEFINES. For each variant ("" is the default build, and the first
# variant is the reference): the kernel parity tests (flash attention against
# the GEMM path and the core, the mHC kernels against mhc-core, GPU training
# steps against the CPU trainer); 40 mHC
# training steps at heads of 64 whose final weights are compared bit for bit
# with the first variant's (a variant that only changes how values are loaded
# should give 0 differing tensors); then the d = 768 training step (residual
# and mHC) and the d = 2048 one (heads of 128). Needs .device-bin/
# (scripts/build-device-bin.sh). Logs and JSON in $OUT/ab/.
#
# REF=<binary> (an mhc-train built from an earlier commit, carried in
# .device-bin/) trains the same 40 steps first, and every variant's weights are
# compared with its weights too: a restructured kernel that keeps the arithmetic
# must give 0 differing tensors.
#
#   bash scripts/gpu-ab.sh "" "-DFA_LDSM=0" "-DFA_REG_ROWS_MAX_D=32" "-DTC_EPI_SMEM=0"
#   SCHEMES=residual WIDE=0 bash scripts/gpu-ab.sh "" "-DFA_LDSM=0"
#   REF=.device-bin/mhc-train-ref WIDE=0 bash scripts/gpu-ab.sh "" "-DCF_ASYNC=1"
# PACK=1: the logs and JSON go into one archive, $OUT/ab.tar.gz (the device tool
# returns only a few files of a call).
set -uo pipefail
if [[ -n "${PACK:-}" && -z "${PACK_INNER:-}" ]]; then
  stage=$(mktemp -d)
  PACK_INNER=1 OUT="$stage" bash "$0" "$@"
  rc=$?
  mkdir -p "${OUT:-gpu-out}"
  tar czf "${OUT:-gpu-out}/ab.tar.gz" -C "$stage/ab" .
  exit "$rc"
fi
out=${OUT:-gpu-out}/ab
mkdir -p "$out"
B=.device-bin
schemes=${SCHEMES:-residual,mhc}
(($#)) || set -- ""
train40() { # binary, defines, output folder
  MHC_CUDA_DEFINES="$2" "$1" --scheme mhc --device cuda --width 256 --heads 4 \
    --steps 40 --log-every 20 --eval-every 40 --checkpoint-every 40 --seed 7 --force \
    --out "$3" > /dev/null 2>&1
}
compare() { # label, checkpoint a, checkpoint b
  python3 - "$@" <<'PY' 2>&1 | tee -a "$out/summary.txt"
import sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[2]), load_file(sys.argv[3])
diff = [k for k in a if k not in b or not (a[k] == b[k]).all()]
print(f"  40 steps vs {sys.argv[1]}: {len(a)} tensors, {len(diff)} differing {diff[:3]}")
PY
}
if [[ -n "${REF:-}" ]]; then
  echo "== ref: $REF" | tee -a "$out/summary.txt"
  train40 "$REF" "" /tmp/ab_ref || echo "  reference mhc-train failed" | tee -a "$out/summary.txt"
fi
i=0
for defs in "$@"; do
  tag="v$i"
  i=$((i + 1))
  echo "== $tag: MHC_CUDA_DEFINES='$defs'" | tee -a "$out/summary.txt"
  for t in cuda_model_ops cuda_parity cuda_trainer; do
    MHC_CUDA_DEFINES="$defs" $B/$t --test-threads 1 2>&1 | grep -E "test result|FAILED|panicked" \
      | sed "s/^/  $t: /" | tee -a "$out/summary.txt"
  done
  train40 $B/mhc-train "$defs" "/tmp/ab_$tag" || echo "  mhc-train failed" | tee -a "$out/summary.txt"
  compare v0 /tmp/ab_v0/mhc/checkpoint.safetensors "/tmp/ab_$tag/mhc/checkpoint.safetensors"
  if [[ -n "${REF:-}" ]]; then
    compare ref /tmp/ab_ref/mhc/checkpoint.safetensors "/tmp/ab_$tag/mhc/checkpoint.safetensors"
  fi
  MHC_CUDA_DEFINES="$defs" $B/mhc-bench --train-width 768 --heads 12 --batch 16 \
    --schemes "$schemes" --json "$out/${tag}_768.json" 2>&1 | grep -E "^\||error" \
    | sed "s/^/  /" | tee -a "$out/summary.txt"
  if [[ "${WIDE:-1}" == 1 ]]; then
    MHC_CUDA_DEFINES="$defs" $B/mhc-bench --train-width 2048 --heads 16 --batch 8 \
      --schemes "$schemes" --json "$out/${tag}_2048.json" 2>&1 | grep -E "^\||error" \
      | sed "s/^/  /" | tee -a "$out/summary.txt"
  fi
done
