#!/usr/bin/env bash
# On the GPU machine: mhc-train on CUDA — a compare (residual, HC and mHC on the
# GPU), and resume on the GPU checked bit for bit against an
# uninterrupted GPU run. Results land in $OUT (or ./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
T=.device-bin/mhc-train
echo "== compare on cuda (tiny preset)"
$T --compare --device cuda --out /tmp/cmp 2>&1 | grep -vE "^\s*$" | tail -8
cp -r /tmp/cmp/plots "$out/" 2>/dev/null
for s in residual hc mhc; do cp /tmp/cmp/$s/metrics.jsonl "$out/$s.metrics.jsonl"; done
echo "== resume on cuda"
$T --scheme mhc --device cuda --steps 40 --log-every 10 --eval-every 20 --checkpoint-every 20 --out /tmp/straight > /dev/null 2>&1
$T --scheme mhc --device cuda --steps 40 --log-every 10 --eval-every 20 --checkpoint-every 20 --out /tmp/split --stop-after 20 > /dev/null 2>&1
$T --scheme mhc --device cuda --steps 40 --log-every 10 --eval-every 20 --checkpoint-every 20 --out /tmp/split --resume > /dev/null 2>&1
python3 - <<'PY'
from safetensors.numpy import load_file
a = load_file("/tmp/straight/mhc/checkpoint.safetensors"); b = load_file("/tmp/split/mhc/checkpoint.safetensors")
diff = [k for k in a if not (a[k] == b[k]).all()]
print("resume on cuda: tensors", len(a), "differing", len(diff), diff[:5])
PY
$T sample --checkpoint /tmp/cmp/mhc/checkpoint.safetensors --length 80 --prompt "the "
