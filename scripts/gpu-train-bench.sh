#!/usr/bin/env bash
# On the GPU machine (one call): the CUDA parity tests, then GPT training-step
# timings of mhc-train's GPU model next to its PyTorch peers (BENCH.md's
# shapes), in the same session. Needs .device-bin/ (scripts/build-device-bin.sh)
# and the Liger-Kernel wheel in .whl/. JSON and logs land in $OUT.
# PACK=1: everything, with this script's output as train_bench.log, goes into one
# archive, $OUT/train_bench.tar.gz (the device tool returns only a few files of a
# call; the rest are left out).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
if [[ -n "${PACK:-}" && -z "${PACK_INNER:-}" ]]; then
  stage=$(mktemp -d)
  PACK_INNER=1 OUT="$stage" bash "$0" "$@" 2>&1 | tee "$stage/train_bench.log"
  rc=${PIPESTATUS[0]}
  tar czf "$out/train_bench.tar.gz" -C "$stage" .
  exit "$rc"
fi
B=.device-bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
pip install --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl > /dev/null 2>&1 \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
echo "== parity tests"
for t in cuda_parity cuda_model_ops cuda_trainer; do
  $B/$t --test-threads 1 2>&1 | grep -E "test result|FAILED|panicked|error" | sed "s/^/$t: /"
done | tee "$out/parity.log"
echo "== mhc-train GPU model (bf16 products, f32 weights; bf16 streams for residual and mHC, f32 for HC)"
$B/mhc-bench --train-width 768 --heads 12 --batch 16 --schemes residual,hc,mhc --json "$out/train_768.json"
$B/mhc-bench --train-width 2048 --heads 16 --batch 8 --schemes residual,mhc --json "$out/train_2048.json"
echo "== the f32-stream option"
$B/mhc-bench --dtype f32 --train-width 768 --heads 12 --batch 16 --schemes residual,mhc --json "$out/train_768_f32.json"
echo "== PyTorch peers"
python3 mhc-cuda/bench/peers_train.py --width 768 --heads 12 --batch 16 ${PEERS_COMPILE:+--compile} --json "$out/peers_train_768.json" 2>&1 | grep -v Warning
python3 mhc-cuda/bench/peers_train.py --width 2048 --heads 16 --batch 8 --json "$out/peers_train_2048.json" 2>&1 | grep -v Warning
