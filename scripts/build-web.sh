#!/usr/bin/env bash
# Builds the in-browser demo: mhc-wasm for wasm32-unknown-unknown (release),
# wasm-bindgen --target web into web/pkg/ (git-ignored), then wasm-opt -O when
# one is on PATH or in tests/e2e/node_modules (npm package binaryen).
# Serve the result with scripts/serve-web.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# The CLI must be the exact version of the wasm-bindgen crate in Cargo.lock.
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [[ "$have" != "$want" ]]; then
  echo "error: wasm-bindgen CLI ${have:-missing}, the crate is $want: run scripts/setup.sh" >&2
  echo "       (or: cargo install wasm-bindgen-cli --version $want)" >&2
  exit 2
fi

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" cargo build --release --locked --target wasm32-unknown-unknown -p mhc-wasm
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  target/wasm32-unknown-unknown/release/mhc_wasm.wasm

wasm_opt=$(command -v wasm-opt || true)
if [[ -z "$wasm_opt" && -x tests/e2e/node_modules/.bin/wasm-opt ]]; then
  wasm_opt=tests/e2e/node_modules/.bin/wasm-opt
fi
wasm=web/pkg/mhc_wasm_bg.wasm
if [[ -n "$wasm_opt" ]]; then
  # rustc's default wasm features; wasm-opt must accept and may keep them.
  if "$wasm_opt" -O --enable-bulk-memory --enable-nontrapping-float-to-int \
    --enable-sign-ext --enable-mutable-globals --enable-reference-types \
    --enable-multivalue --enable-simd "$wasm" -o "$wasm.opt"; then
    mv "$wasm.opt" "$wasm"
  else
    rm -f "$wasm.opt"
    echo "note: wasm-opt ($wasm_opt) failed; keeping the unoptimised module" >&2
  fi
else
  echo "note: no wasm-opt found (PATH or npm binaryen in tests/e2e); skipping it" >&2
fi
ls -l web/pkg
