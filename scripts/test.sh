#!/usr/bin/env bash
# The project's test command (README, .ci/run): setup, formatting, lints,
# every test, the no_std builds of mhc-core and its docs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "setup (idempotent)"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, golden vectors, properties, doc tests)"
cargo test --workspace --locked

step "mhc-core without std: wasm32-unknown-unknown and thumbv7em-none-eabihf"
cargo build -p mhc-core --locked --target wasm32-unknown-unknown
cargo build -p mhc-core --locked --target thumbv7em-none-eabihf
cargo build -p mhc-core --locked --no-default-features --target thumbv7em-none-eabihf

step "mhc-gpu for the browser (WebGPU): wasm32-unknown-unknown"
cargo build -p mhc-gpu --locked --target wasm32-unknown-unknown

step "rustdoc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "all checks passed"
