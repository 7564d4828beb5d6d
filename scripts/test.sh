#!/usr/bin/env bash
# The project's test command (README, .ci/run): setup, formatting, lints,
# every test, the no_std builds of mhc-core, its docs, and the web demo
# (mhc-wasm in headless Chromium, the page end to end with Playwright).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "setup (idempotent)"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, golden vectors, properties, doc tests; kernels compiled by NVRTC)"
# NVRTC only (no driver): the CUDA kernels compile offline, the GPU tests skip.
LD_LIBRARY_PATH="$(bash scripts/cuda-tools.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  MHC_REQUIRE_NVRTC=1 cargo test --workspace --locked

step "mhc-core without std: wasm32-unknown-unknown and thumbv7em-none-eabihf"
cargo build -p mhc-core --locked --target wasm32-unknown-unknown
cargo build -p mhc-core --locked --target thumbv7em-none-eabihf
cargo build -p mhc-core --locked --no-default-features --target thumbv7em-none-eabihf

step "mhc-gpu for the browser (WebGPU): wasm32-unknown-unknown"
cargo build -p mhc-gpu --locked --target wasm32-unknown-unknown

step "rustdoc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "mhc-wasm for wasm32-unknown-unknown: build and clippy"
cargo build -p mhc-wasm --locked --target wasm32-unknown-unknown
cargo clippy -p mhc-wasm --locked --target wasm32-unknown-unknown --all-targets -- -D warnings

step "mhc-wasm's JS API in headless Chromium (wasm-bindgen-test)"
# The runner starts chromedriver and adds --headless and --no-sandbox itself;
# webdriver.json adds the quiet-start flags. Release: the tests train models.
CHROMEDRIVER=/usr/bin/chromedriver \
  WASM_BINDGEN_TEST_WEBDRIVER_JSON="$PWD/mhc-wasm/webdriver.json" \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  cargo test --release --locked -p mhc-wasm --target wasm32-unknown-unknown

step "web demo: build (scripts/build-web.sh)"
bash scripts/build-web.sh

step "web demo: end-to-end in headless Chromium (Playwright), CPU and WebGPU flags"
node tests/e2e/web.e2e.mjs

step "all checks passed"
