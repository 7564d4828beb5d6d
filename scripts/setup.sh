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

# mhc-gpu's tests run on Mesa's lavapipe (software Vulkan) when no GPU is present.
if command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in mesa-vulkan-drivers libvulkan1; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
  fi
fi
