#!/usr/bin/env bash
# Builds what the GPU machine (no Rust toolchain, no Vulkan loader) needs to
# run mhc-gpu there, into .device-wgpu/ (git-ignored; name it in the device
# tool's `carry`): the release bench binary, the mhc-gpu parity test
# executables, the CUDA wrapper bench (for f32 numbers next to the CUDA
# kernels'), and Debian's libvulkan1 .deb (the Vulkan loader).
# Then run on the GPU machine: bash scripts/gpu-wgpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=.device-wgpu
mkdir -p "$out"
cargo build --release --locked -p mhc-gpu --bin mhc-gpu-bench
cp target/release/mhc-gpu-bench "$out/"
if [ "${SKIP_CUDA_BENCH:-0}" != 1 ]; then
  cargo build --release --locked -p mhc-cuda --bin mhc-bench
  cp target/release/mhc-bench "$out/"
fi
for t in parity trainer; do
  bin=$(cargo test --release --locked -p mhc-gpu --test "$t" --no-run --message-format=json 2>/dev/null \
        | T="$t" python3 -c 'import json,os,sys
for l in sys.stdin:
    m=json.loads(l)
    t=m.get("target",{})
    if m.get("reason")=="compiler-artifact" and m.get("executable") and t.get("kind")==["test"] and t.get("name")==os.environ["T"]: print(m["executable"])' | tail -n 1)
  [ -n "$bin" ] || { echo "no test binary found for $t" >&2; exit 1; }
  cp "$bin" "$out/wgpu_$t"
done
strip "$out"/mhc-* "$out"/wgpu_* 2>/dev/null || true
if ! ls "$out"/libvulkan1_*.deb >/dev/null 2>&1; then
  (cd "$out" && apt-get download libvulkan1)
fi
ls -la "$out"
