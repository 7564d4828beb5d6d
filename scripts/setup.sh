#!/usr/bin/env bash
# Installs what the tests need, idempotently: every step checks before it acts,
# so running it twice costs seconds. Needs the Rust toolchain (rustup) only.
set -euo pipefail

have_component() { rustup component list --installed 2>/dev/null | grep -q "^$1"; }
have_target() { rustup target list --installed 2>/dev/null | grep -qx "$1"; }

for component in rustfmt clippy; do
  have_component "$component" || rustup component add "$component"
done

# mhc-core must build without std: for the browser and for a bare-metal target.
for target in wasm32-unknown-unknown thumbv7em-none-eabihf; do
  have_target "$target" || rustup target add "$target"
done

# --- Debian packages ---------------------------------------------------------
# Mesa's lavapipe (software Vulkan) for mhc-gpu's tests when no GPU is present;
# Chromium and its WebDriver, Node.js for Playwright and Python for the static
# server for the browser tests (mhc-wasm, web/). apt-get update only when
# something is missing.
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
missing=()
for pkg in mesa-vulkan-drivers libvulkan1 chromium chromium-driver; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if ((${#missing[@]})); then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# wasm-bindgen-cli (wasm-bindgen, wasm-bindgen-test-runner) at exactly the
# version of the wasm-bindgen crate in Cargo.lock. `--locked` first; when the
# registry index lacks a locked transitive version, resolve afresh.
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [[ "$have" != "$want" ]]; then
  cargo install --locked wasm-bindgen-cli --version "$want" ||
    cargo install --force wasm-bindgen-cli --version "$want"
fi

# playwright-core (drives /usr/bin/chromium; downloads no browser) and
# binaryen's wasm-opt, from the committed lock file.
e2e=tests/e2e
if ! cmp -s "$e2e/package-lock.json" "$e2e/node_modules/.mhc-installed-lock" 2>/dev/null; then
  (cd "$e2e" && npm ci --no-audit --no-fund)
  cp "$e2e/package-lock.json" "$e2e/node_modules/.mhc-installed-lock"
fi

# CUDA 13's NVRTC (NVIDIA's PyPI wheel, unpacked into .cuda-tools/): the
# offline compile test builds every kernel for sm_90 and sm_80 without a GPU.
bash scripts/cuda-tools.sh >/dev/null
