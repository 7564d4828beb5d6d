"""PyTorch peers of `mhc-bench --train-width`: GPT training steps timed in the
same GPU session (BENCH.md's table).

The model is the mhc reference model (learned positions, pre-norm RMSNorm,
causal attention, GELU MLP 4×, untied head), vocabulary 8192, random tokens,
bf16 autocast, fused AdamW — residual in PyTorch eager (and optionally under
torch.compile), and mHC n = 4 with Liger-Kernel's fused Triton `LigerMHC`
wrapping every sublayer. Median step milliseconds over CUDA-synchronised steps
after warm-up; peak memory from torch.cuda.max_memory_allocated.

    python3 mhc-cuda/bench/peers_train.py --width 768 --heads 12 --batch 16 --json peers_768.json

Liger-Kernel is pip-installed from a wheel sent along (BENCH.md); if it is
missing its rows are skipped with a message.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.w1 = nn.Linear(d, 4 * d, bias=False)
        self.w2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(self.norm(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, d, layers, heads, context, scheme, n, liger_mhc=None):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        subs = []
        for _ in range(layers):
            subs += [Attention(d, heads), Mlp(d)]
        if scheme == "mhc":
            subs = [liger_mhc(s, hc=n, c=d, phi_dtype=torch.bfloat16) for s in subs]
        self.subs = nn.ModuleList(subs)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)
        self.scheme, self.n = scheme, n

    def forward(self, idx, targets):
        b, s = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(s, device=idx.device))
        if self.scheme == "mhc":
            # LigerMHC takes a bf16 (or fp16) stream.
            x = x.unsqueeze(-2).expand(b, s, self.n, x.shape[-1]).to(torch.bfloat16).contiguous()
            for sub in self.subs:
                x = sub(x)
            x = x.float().mean(-2)
        else:
            for sub in self.subs:
                x = x + sub(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def bench(model, args, steps, label):
    dev = torch.device("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator(device=dev).manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.context + 1), device=dev, generator=gen)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    row = {
        "model": label,
        "width": args.width,
        "layers": args.layers,
        "heads": args.heads,
        "batch": args.batch,
        "context": args.context,
        "vocab": args.vocab,
        "step_ms": ms,
        "tokens_per_s": args.batch * args.context / (ms / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": float(loss.detach()),
    }
    print(
        f"| {label} | {args.width} | {ms:.1f} | {row['tokens_per_s'] / 1e3:.0f}k | {row['peak_gib']:.1f} |",
        flush=True,
    )
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time residual under torch.compile")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | d | step ms | tokens/s | peak GiB |\n|---|---|---|---|---|")
    rows = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)

    model = Gpt(args.vocab, args.width, args.layers, args.heads, args.context, "residual", 1).to(dev)
    rows.append(bench(model, args, args.steps, "residual, PyTorch eager"))
    save()
    if args.compile:
        compiled = torch.compile(model)
        rows.append(bench(compiled, args, args.steps, "residual, torch.compile"))
        save()
    del model
    torch.cuda.empty_cache()
    try:
        from liger_kernel.transformers.mhc import LigerMHC
    except Exception as e:  # noqa: BLE001 - any import failure means: skip the rows
        print(f"Liger-Kernel unavailable ({e}); its rows are skipped")
        LigerMHC = None
    if LigerMHC is not None:
        model = Gpt(
            args.vocab, args.width, args.layers, args.heads, args.context, "mhc", args.n, LigerMHC
        ).to(dev)
        rows.append(bench(model, args, args.steps, f"mHC n={args.n}, Liger-Kernel LigerMHC, eager"))
        save()


if __name__ == "__main__":
    main()
