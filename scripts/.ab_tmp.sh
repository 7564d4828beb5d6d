set -u
export MHC_CUDA_DEFINES="-DSK_RS=1"
for t in cuda_parity cuda_model_ops cuda_trainer; do
  timeout 60 .device-bin/$t --test-threads 1 2>&1 | grep -E "test result|FAILED|panicked" | sed "s/^/$t: /"
done
for k in coeff_bwd coeff_finish; do
  OUT=/tmp/n PROFILE_TIMEOUT=30 bash scripts/gpu-ncu.sh $k > /dev/null 2>&1
  echo "$k SK_RS=1: $(awk '/Duration/ {print $3; exit}' /tmp/n/ncu_$k.txt) us"; cp /tmp/n/ncu_$k.txt $OUT/ncu_${k}_sk_rs1.txt
done
t40() { MHC_CUDA_DEFINES="$1" timeout 40 .device-bin/mhc-train --scheme mhc --device cuda --width 256 --heads 4 --steps 40 --log-every 20 --eval-every 40 --checkpoint-every 40 --seed 7 --force --out "$2" > /dev/null 2>&1; }
t40 "" /tmp/a0; t40 "-DSK_RS=1" /tmp/a1
python3 -c "
from safetensors.numpy import load_file
a,b=load_file('/tmp/a0/mhc/checkpoint.safetensors'),load_file('/tmp/a1/mhc/checkpoint.safetensors')
d=[k for k in a if not (a[k]==b[k]).all()]; print('40 steps SK_RS=1 vs default:',len(a),'tensors,',len(d),'differing')"
