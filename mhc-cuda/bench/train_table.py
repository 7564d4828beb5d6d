"""Ratios of mhc-train's GPU model against its PyTorch peers, from the JSON of
one GPU call (scripts/gpu-train-bench.sh): prints the README table and writes
train_summary.json beside the inputs.

    python3 mhc-cuda/bench/train_table.py mhc-cuda/bench/results
"""
import json
import sys
from pathlib import Path

res = Path(sys.argv[1] if len(sys.argv) > 1 else "mhc-cuda/bench/results")
summary = {"targets": {
    "residual_vs_pytorch_eager_tokens": ">= 1.0 at d = 768",
    "mhc_vs_liger_tokens": ">= 2.5 at d = 768",
    "mhc_overhead_over_own_residual": "<= 20% at d = 768, <= 6.7% at d = 2048",
}, "shapes": []}
print("| d | model | step ms | tokens/s | peak GiB | ratio |")
print("|---|---|---|---|---|---|")
for d in (768, 2048):
    ours = {r["scheme"]: r for r in json.load(open(res / f"train_{d}.json"))["rows"]}
    # The f32-stream option, when the call measured it (train_<d>_f32.json).
    f32_path = res / f"train_{d}_f32.json"
    ours_f32 = {r["scheme"]: r for r in json.load(open(f32_path))["rows"]} if f32_path.exists() else {}
    peers = {r["model"]: r for r in json.load(open(res / f"peers_train_{d}.json"))["rows"]}
    eager = next(r for k, r in peers.items() if k.startswith("residual, PyTorch eager"))
    liger = next((r for k, r in peers.items() if "Liger" in k), None)
    res_ours = ours["residual"]
    shape = {"width": d, "ours": ours, "peers": peers}
    rows = []
    for k, r in peers.items():
        rows.append((k, r["step_ms"], r["tokens_per_s"], r["peak_gib"], ""))
    for s, r, base in [(s, r, res_ours) for s, r in ours.items()] + [
        (s, r, ours_f32.get("residual")) for s, r in ours_f32.items()
    ]:
        attention = r.get("attention")
        streams = r.get("stream_dtype", "f32")
        name = {"residual": "residual", "hc": "HC n=4", "mhc": "mHC n=4"}[s] + ", mhc-train (CUDA, " + r["precision"] + " products, " + streams + " streams" + (f", {attention} attention" if attention else "") + ")"
        if base is not res_ours:
            # The f32-stream rows: overhead over the f32-stream residual, kept out of the summary's ratios.
            note = "f32-stream option" if s == "residual" else f"+{100 * (r['step_ms'] / base['step_ms'] - 1):.0f}% over our f32-stream residual"
            rows.append((name, r["step_ms"], r["tokens_per_s"], r["memory_gib"], note))
            continue
        if s == "residual":
            ratio = r["tokens_per_s"] / eager["tokens_per_s"]
            shape["residual_vs_eager"] = ratio
            note = f"{ratio:.2f}× PyTorch eager"
        else:
            over = r["step_ms"] / res_ours["step_ms"] - 1
            note = f"+{100 * over:.0f}% over our residual"
            shape[f"{s}_overhead"] = over
            if s == "mhc" and liger:
                vs = r["tokens_per_s"] / liger["tokens_per_s"]
                shape["mhc_vs_liger"] = vs
                note += f"; {vs:.2f}× Liger"
        rows.append((name, r["step_ms"], r["tokens_per_s"], r["memory_gib"], note))
    for name, ms, tps, gib, note in rows:
        print(f"| {d} | {name} | {ms:.1f} | {tps / 1e3:.0f}k | {gib:.1f} | {note} |")
    summary["shapes"].append(shape)
json.dump(summary, open(res / "train_summary.json", "w"), indent=2)
