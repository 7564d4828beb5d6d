#!/usr/bin/env bash
# CUDA 13's NVRTC from NVIDIA's PyPI wheel, into .cuda-tools/ (git-ignored),
# idempotently; no GPU or CUDA install needed. With it, the test suite compiles
# every kernel for sm_90 and sm_80 (mhc-cuda/tests/cuda_compile.rs) on a
# machine without a GPU, and `cargo run -p mhc-cuda --example kernel_resources`
# prints ptxas's registers / shared memory / spills per kernel. Prints the
# folder to put in LD_LIBRARY_PATH. With the argument `nvdisasm` it also
# unpacks NVIDIA's disassembler (the oldest CUDA 13 wheel on PyPI, 13.2, reads
# sm_90 cubins) and prints its path instead (scripts/sass-count.sh uses it).
#
#   export LD_LIBRARY_PATH="$(bash scripts/cuda-tools.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set -euo pipefail
cd "$(dirname "$0")/.."

version=13.0.88 # the H100/H200 machine's CUDA is 13.0
root=.cuda-tools
lib="$PWD/$root/cu13/lib"

# wheel name, version, sha256 of its manylinux x86_64 wheel, folder of nvidia/cu13/ to unpack
fetch() {
  local pkg=$1 version=$2 sha=$3 dir=$4 stamp="$root/.$1-$2"
  [[ -f "$stamp" ]] && return 0
  python3 -m pip --version >/dev/null 2>&1 || {
    echo "cuda-tools: python3 -m pip is missing (Debian: apt-get install python3-pip)" >&2
    exit 1
  }
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  echo "$pkg==$version --hash=sha256:$sha" >"$tmp/req.txt"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --require-hashes -r "$tmp/req.txt" -d "$tmp" >&2
  # The wheel is a zip: unpack nvidia/cu13/$dir without installing it.
  python3 - "$tmp"/*.whl "$root" "$dir" <<'PY'
import os, sys, zipfile
wheel, root, sub = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith("nvidia/cu13/") or name.endswith("/") or ".alt." in name:
            continue
        rel = name[len("nvidia/"):]
        if not rel.startswith(f"cu13/{sub}/"):
            continue
        dest = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            out.write(src.read())
        mode = (info.external_attr >> 16) & 0o777
        os.chmod(dest, mode or 0o644)
PY
  touch "$stamp"
}

mkdir -p "$root"
fetch nvidia-cuda-nvrtc "$version" ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575 lib
[[ -f "$lib/libnvrtc.so.13" ]] || { echo "cuda-tools: $lib/libnvrtc.so.13 missing" >&2; exit 1; }
if [[ "${1:-}" == nvdisasm ]]; then
  fetch nvidia-cuda-nvdisasm 13.2.78 b4ebcd3c5046bf8039ac52675b9dbefd843600969649ecaab0a42b0713a61dae bin
  bin="$PWD/$root/cu13/bin/nvdisasm"
  [[ -x "$bin" ]] || { echo "cuda-tools: $bin missing" >&2; exit 1; }
  echo "$bin"
else
  echo "$lib"
fi
