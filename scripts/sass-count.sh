#!/usr/bin/env bash
# Static SASS instruction counts per kernel (sm_90), no GPU needed: compiles a
# kernel source with `kernel_resources --cubin` (its arguments after `--`) and
# disassembles it with NVIDIA's nvdisasm (fetched by scripts/cuda-tools.sh).
# Optional kernel names before `--` keep only those. Counts are of the code, not
# of what runs: a measure of overhead, not a timing. With LOOPS=1 it also lists
# each loop (a backward branch) of the kept kernels: its address range, its
# instructions (nested loops included once) and the most frequent opcodes.
#
#   bash scripts/sass-count.sh flash_fwd_64 flash_bwd_dkv_64 -- --source model
#   bash scripts/sass-count.sh dx_dphi_tc -- --n 4 --streams bf16 -D TC_LEAN=0
#   LOOPS=1 bash scripts/sass-count.sh coeff_fwd -- --n 4 --streams bf16 -D CF_LEAN=1
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
[[ "${LOOPS:-0}" == 1 ]] || exit 0
python3 - "$tmp/k.sass" "${kernels[@]}" <<'PY'
import collections, re, sys
text, want = open(sys.argv[1]).read(), set(sys.argv[2:])
for m in re.finditer(r"\.text\.([A-Za-z0-9_]+):(.*?)(?=\n\s*\.section|\Z)", text, re.S):
    kernel, body = m.group(1), m.group(2)
    if want and kernel not in want:
        continue
    ins, labels, pending = [], {}, None
    for line in body.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            pending = label.group(1)
            continue
        op = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if op:
            off = int(op.group(1), 16)
            ins.append((off, op.group(2)))
            if pending is not None:
                labels[pending], pending = off, None
    for off, text_ in ins:
        target = re.search(r"BRA.*?\.L_x_(\d+)", text_)
        if target and labels.get(target.group(1), off + 1) < off:
            start = labels[target.group(1)]
            seg = [t for o, t in ins if start <= o <= off]
            ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0] for t in seg)
            top = " ".join(f"{k} {v}" for k, v in ops.most_common(8))
            print(f"{kernel} loop {start:#x}-{off:#x}: {len(seg)} instructions ({top})")
PY
