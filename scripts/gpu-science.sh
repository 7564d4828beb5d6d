#!/usr/bin/env bash
# On the GPU machine: the science run of the CUDA-trainer issue — residual, HC
# and mHC (n = 4) from the same seed on the fortunes corpus (scripts/get-fortunes.sh,
# carried as data/fortunes), 12 blocks (24 wrapped sublayers), d = 512, bf16
# products. The three runs share the GPU as three processes; then `mhc-train plot`
# draws the figures. Metrics, plots, logs and samples land in $OUT/science.
set -uo pipefail
out=${OUT:-gpu-out}/science
runs=/tmp/science
mkdir -p "$out" "$runs"
T=.device-bin/mhc-train
STEPS=${STEPS:-2000}
for s in residual hc mhc; do
  timeout "${DEADLINE:-480}" $T --scheme "$s" --device cuda --data data/fortunes \
    --width 512 --layers 12 --heads 8 --context 256 --batch 16 --steps "$STEPS" \
    --lr 1e-3 --log-every 20 --eval-every 100 --checkpoint-every 500 \
    --out "$runs" --force > "$out/$s.log" 2>&1 &
done
wait
for s in residual hc mhc; do
  tail -n 4 "$out/$s.log"
  mkdir -p "$out/$s"
  cp "$runs/$s/metrics.jsonl" "$runs/$s/metrics.csv" "$out/$s/" 2>/dev/null
  $T sample --checkpoint "$runs/$s/checkpoint.safetensors" --length 200 --prompt "The " > "$out/$s/sample.txt" 2>&1
done
$T plot "$runs" --title "fortunes, d = 512, 12 blocks (24 wrapped sublayers), H200" && cp -r "$runs/plots" "$out/"
