#!/usr/bin/env bash
# Static SASS instruction counts per kernel (sm_90), no GPU needed: compiles a
# kernel source with `kernel_resources --cubin` (its arguments after `--`) and
# disassembles it with NVIDIA's nvdisasm (fetched by scripts/cuda-tools.sh).
# Optional kernel names before `--` keep only those. Counts are of the code, not
# of what runs: a measure of overhead, not a timing.
#
#   bash scripts/sass-count.sh flash_fwd_64 flash_bwd_dkv_64 -- --source model
#   bash scripts/sass-count.sh dx_dphi_tc -- --n 4 --streams bf16 -D TC_LEAN=1
set -euo pipefail
cd "$(dirname "$0")/.."
kernels=()
while (($#)) && [[ "$1" != -- ]]; do kernels+=("$1"); shift; done
[[ "${1:-}" == -- ]] && shift
lib=$(bash scripts/cuda-tools.sh)
nvdisasm=$(bash scripts/cuda-tools.sh nvdisasm)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo run -q -p mhc-cuda --example kernel_resources -- "$@" --cubin "$tmp/k.cubin" >/dev/null
"$nvdisasm" -c "$tmp/k.cubin" >"$tmp/k.sass"
# Sections .text.<kernel>; instruction lines carry an /*offset*/ address.
awk -v want="${kernels[*]:-}" '
  BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) keep[w[i]] = 1 }
  match($0, /\.text\.[A-Za-z0-9_]+:/) { k = substr($0, RSTART + 6, RLENGTH - 7); next }
  /^[[:space:]]+\/\*[0-9a-f]+\*\/[[:space:]]/ { if (k != "") count[k]++ }
  END { for (k in count) if (n == 0 || (k in keep)) printf "%-40s %6d\n", k, count[k] }
' "$tmp/k.sass" | sort
