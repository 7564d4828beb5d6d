#!/usr/bin/env bash
# On the GPU machine: per-kernel times of one GPT training step (d = 768,
# the scheme given, default residual; bf16 products) with Nsight Compute, summed by kernel name.
# Output: $OUT/profile_<scheme>.txt. Needs .device-bin/ (scripts/build-device-bin.sh).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
scheme=${1:-residual}
# About one step after the warm-up (measured on the H200: ~800 kernels per residual
# step, ~1100 per mHC step); SKIP/COUNT override.
case "$scheme" in
  residual) skip=2500; count=1000 ;;
  *) skip=5000; count=1600 ;;
esac
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 0; }
# Skip the set-up and warm-up steps' kernels, then profile about one step.
timeout "${PROFILE_TIMEOUT:-150}" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
  --launch-skip "${SKIP:-$skip}" --launch-count "${COUNT:-$count}" \
  .device-bin/mhc-bench --train-width 768 --schemes "$scheme" --reps 5 > /tmp/ncu.csv 2> /tmp/ncu.err
python3 - "$scheme" "$out" <<'PY'
import csv, collections, sys
scheme, out = sys.argv[1], sys.argv[2]
rows = [r for r in csv.reader(open("/tmp/ncu.csv")) if len(r) > 10]
head = rows[0]; name_i = head.index("Kernel Name"); val_i = head.index("Metric Value")
unit_i = head.index("Metric Unit") if "Metric Unit" in head else None
scale = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[1:]:
    try: v = float(r[val_i].replace(",", "")) * (scale.get(r[unit_i], 1.0) if unit_i is not None else 1.0)
    except ValueError: continue
    k = r[name_i].split("(")[0][:60]; tot[k] += v; cnt[k] += 1
all_ns = sum(tot.values())
with open(f"{out}/profile_{scheme}.txt", "w") as f:
    f.write(f"{len(rows)-1} kernels, {all_ns/1e6:.1f} ms of kernel time\n")
    for k, v in tot.most_common(25):
        f.write(f"{v/1e6:8.2f} ms {100*v/all_ns:5.1f}% {cnt[k]:5d}x {k}\n")
print(open(f"{out}/profile_{scheme}.txt").read())
PY
