"""Peers of the fused CUDA mHC wrapper, timed in the same GPU session.

PyTorch eager (a plain implementation of the same math as mhc-core), the same
under torch.compile, Liger-Kernel's fused Triton `LigerMHC`, and the plain
residual add `x + F(x)`; stand-in sublayer F(h) = 1.5 h, n = 4, bf16 stream,
T tokens. Median milliseconds over CUDA events (triton.testing.do_bench).

    python3 mhc-cuda/bench/peers.py --tokens 16384 --widths 1024 4096 --json peers.json

Liger-Kernel is pip-installed from a wheel sent along (BENCH.md); if it is
missing its rows are skipped with a message.
"""
import argparse
import json

import torch
import torch.nn as nn
import triton.testing


class Scale(nn.Module):
    def forward(self, h):
        return 1.5 * h


def sinkhorn(logits, iters, eps=1e-6):
    m = torch.exp(logits - logits.amax(dim=-2, keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(eps)
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(eps)
    return m


class NaiveMHC(nn.Module):
    """mHC dynamic exactly as DESIGN.md §1, in plain PyTorch ops."""

    def __init__(self, layer, n, c, iters=20):
        super().__init__()
        self.layer, self.n, self.c, self.iters = layer, n, c, iters
        k = n * n + 2 * n
        self.phi = nn.Parameter(torch.randn(n * c, k) / (n * c) ** 0.5)
        self.gamma = nn.Parameter(torch.ones(n * c))
        self.b = nn.Parameter(torch.zeros(k))
        self.alpha = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x):
        t, n, c = x.shape
        v = x.reshape(t, n * c).float()
        r = (v.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        p = (v * self.gamma) @ self.phi / r
        h_pre = torch.sigmoid(self.alpha[0] * p[:, :n] + self.b[:n])
        h_post = 2 * torch.sigmoid(self.alpha[1] * p[:, n:2 * n] + self.b[n:2 * n])
        h_res = sinkhorn((self.alpha[2] * p[:, 2 * n:] + self.b[2 * n:]).view(t, n, n), self.iters)
        h = (h_pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)
        y = self.layer(h)
        out = torch.bmm(h_res, x.float()) + h_post.unsqueeze(-1) * y.float().unsqueeze(1)
        return out.to(x.dtype)


def time_ms(fn):
    return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")


def bench(model, x, g):
    fwd = time_ms(lambda: model(x))

    def both():
        x.grad = None
        model(x).backward(g)

    return fwd, time_ms(both)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--json")
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    try:
        from liger_kernel.transformers.mhc import LigerMHC
    except Exception as e:  # noqa: BLE001
        print(f"Liger-Kernel unavailable ({e}); its rows are skipped")
        LigerMHC = None
    for c in args.widths:
        torch.manual_seed(c)
        x = torch.randn(args.tokens, args.n, c, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        row = {"c": c, "n": args.n, "tokens": args.tokens, "dtype": "bf16"}
        eager = NaiveMHC(Scale(), args.n, c).to(dev)
        row["eager_fwd_ms"], row["eager_fwd_bwd_ms"] = bench(eager, x, g)
        if not args.skip_compile:
            compiled = torch.compile(NaiveMHC(Scale(), args.n, c).to(dev))
            row["compile_fwd_ms"], row["compile_fwd_bwd_ms"] = bench(compiled, x, g)
        if LigerMHC is not None:
            liger = LigerMHC(Scale(), hc=args.n, c=c, phi_dtype=torch.bfloat16).to(dev)
            row["liger_fwd_ms"], row["liger_fwd_bwd_ms"] = bench(liger, x, g)
        xr = torch.randn(args.tokens, c, device=dev, dtype=torch.bfloat16, requires_grad=True)
        gr = torch.randn_like(xr)
        layer = Scale()
        row["residual_fwd_ms"], row["residual_fwd_bwd_ms"] = bench(lambda z: z + layer(z), xr, gr)
        rows.append(row)
        print(json.dumps(row))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
