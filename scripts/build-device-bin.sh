#!/usr/bin/env bash
# Builds the release binaries the GPU machine runs (it has no Rust toolchain)
# into .device-bin/ (git-ignored; name it in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device-bin
cargo build --release -p mhc-cuda --bin mhc-bench --bin mhc-train
cp target/release/mhc-bench target/release/mhc-train .device-bin/
for t in cuda_parity cuda_model_ops cuda_trainer cuda_data_parallel; do
  bin=$(cargo test --release -p mhc-cuda --test "$t" --no-run --message-format=json 2>/dev/null \
        | T="$t" python3 -c 'import json,os,sys
for l in sys.stdin:
    m=json.loads(l)
    t=m.get("target",{})
    if m.get("reason")=="compiler-artifact" and m.get("executable") and t.get("kind")==["test"] and t.get("name")==os.environ["T"]: print(m["executable"])' | tail -n 1)
  [ -n "$bin" ] || { echo "no test binary found for $t" >&2; exit 1; }
  cp "$bin" ".device-bin/$t"
done
strip .device-bin/*
ls -la .device-bin
