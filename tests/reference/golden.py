#!/usr/bin/env python3
"""Golden test vectors for the mHC Rust crates (independent PyTorch reference).

What it computes
----------------
Forward values and reverse-mode gradients (PyTorch autograd, float64, CPU)
for three things, on small random inputs (fixed seed, never zeros):

* ``sinkhorn``: the truncated Sinkhorn-Knopp projection SK(L) of a batch of
  n x n logit matrices, and the vector-Jacobian product of a random
  ``grad_output`` through it.
* ``mhc``: the mHC wrapper (paper arXiv 2512.24880, Eqs. 7-9) with dynamic
  coefficients around the test sublayer F(h) = tanh(h @ W).
* ``hc``: the dynamic Hyper-Connections wrapper (arXiv 2409.19606, Eq. 5)
  around the same sublayer.

For the wrappers the loss is ``L = sum(out * grad_out)`` with a random
``grad_out`` of the output's shape, so every ``grad_*`` array is the VJP of
``grad_out`` with respect to that input/parameter.

Conventions (the Rust side follows these exactly)
-------------------------------------------------
All arrays are flattened row-major into JSON lists of floats.

* T tokens, n streams, width C. Stream state x: [T, n, C]. Per token
  v = vec(x_t) has length nC, index i*C + c.
* SK(L) for an n x n logit matrix L[o, i] (row-major):
  M = exp(L - colmax(L)), colmax = max over o of each COLUMN (not detached;
  its gradient contribution is zero up to rounding). Then ``iters`` times:
  (a) column normalisation M[o,i] /= max(sum_o M[o,i], eps);
  (b) row normalisation    M[o,i] /= max(sum_i M[o,i], eps).
  The output is M (rows sum to 1 exactly up to rounding).
* mHC coefficients per token:
  r = sqrt(mean(v^2) + eps_rms) (mean over nC);
  p = (v * gamma) @ phi, gamma [nC], phi [nC, n*n + 2n] row-major;
  p_pre = p[0:n], p_post = p[n:2n], p_res = p[2n:2n+n*n] as [n, n] (p_res[o,i]);
  Ht_pre = alpha[0]*p_pre/r + b_pre; Ht_post = alpha[1]*p_post/r + b_post;
  Ht_res = alpha[2]*p_res/r + b_res (b_res [n, n] row-major);
  H_pre = sigmoid(Ht_pre), H_post = 2*sigmoid(Ht_post), H_res = SK(Ht_res).
* HC coefficients per token:
  xt[i,c] = x[i,c] / sqrt(mean_c x[i,c]^2 + eps_rms) (per-stream RMSNorm, no weight);
  H_pre[i]    = alpha[0]*tanh(sum_c theta_pre[c]  * xt[i,c]) + b_pre[i];
  H_post[i]   = alpha[1]*tanh(sum_c theta_post[c] * xt[i,c]) + b_post[i];
  H_res[o,i]  = alpha[2]*tanh(sum_c theta_res[o,c]* xt[i,c]) + b_res[o,i];
  theta_pre, theta_post [C], theta_res [n, C].
* Wrapper per token: h = sum_i H_pre[i] * x[i,:] ([C]); y = F(h);
  out[o,:] = sum_i H_res[o,i] * x[i,:] + H_post[o] * y.
* Test sublayer: F(h) = tanh(h @ W), W [C, C] row-major,
  y[c2] = tanh(sum_c h[c] * W[c, c2]), per token.

JSON layout: top-level keys "generator", "sinkhorn", "mhc", "hc"; see
tests/reference/README.md. Coefficient outputs h_pre/h_post are [T, n],
h_res is [T, n, n], out and grad_x are [T, n, C].

Sanity checks run before writing: SK row sums within 1e-9 of 1, and
torch.autograd.gradcheck (float64) on one small SK case and one small mHC
case (and one small HC case).

Regenerate
----------
    python3 tests/reference/golden.py            # writes golden.json next to this script
    python3 tests/reference/golden.py --out PATH # or anywhere else

Requires only PyTorch (any recent version; CPU is enough). The output is
deterministic for a given torch version (fixed seed, CPU, float64).
"""

import argparse
import json
import os

import torch

DT = torch.float64
DEV = torch.device("cpu")
SEED = 20251231


# ----------------------------------------------------------------------------
# Reference math
# ----------------------------------------------------------------------------

def sinkhorn(logits, iters, eps):
    """SK over the last two dims of logits [..., n, n] (L[..., o, i])."""
    colmax = logits.amax(dim=-2, keepdim=True)  # max over o, per column i
    m = torch.exp(logits - colmax)
    for _ in range(iters):
        m = m / torch.clamp_min(m.sum(dim=-2, keepdim=True), eps)  # columns
        m = m / torch.clamp_min(m.sum(dim=-1, keepdim=True), eps)  # rows
    return m


def sublayer(h, w):
    """F(h) = tanh(h @ W), h [T, C], W [C, C]."""
    return torch.tanh(h @ w)


def wrap(x, h_pre, h_post, h_res, w):
    """x [T,n,C], h_pre/h_post [T,n], h_res [T,n,n] -> out [T,n,C]."""
    h = torch.einsum("ti,tic->tc", h_pre, x)
    y = sublayer(h, w)
    return torch.einsum("toi,tic->toc", h_res, x) + h_post[:, :, None] * y[:, None, :]


def mhc_coeffs(x, phi, gamma, alpha, b_pre, b_post, b_res, iters, eps, eps_rms):
    t, n, c = x.shape
    v = x.reshape(t, n * c)
    r = torch.sqrt((v * v).mean(dim=-1, keepdim=True) + eps_rms)  # [T,1]
    p = (v * gamma) @ phi  # [T, n*n+2n]
    p_pre = p[:, 0:n]
    p_post = p[:, n:2 * n]
    p_res = p[:, 2 * n:2 * n + n * n].reshape(t, n, n)
    ht_pre = alpha[0] * p_pre / r + b_pre
    ht_post = alpha[1] * p_post / r + b_post
    ht_res = alpha[2] * p_res / r[:, :, None] + b_res.reshape(n, n)
    h_pre = torch.sigmoid(ht_pre)
    h_post = 2.0 * torch.sigmoid(ht_post)
    h_res = sinkhorn(ht_res, iters, eps)
    return h_pre, h_post, h_res


def mhc_forward(x, phi, gamma, alpha, b_pre, b_post, b_res, w, iters, eps, eps_rms):
    h_pre, h_post, h_res = mhc_coeffs(x, phi, gamma, alpha, b_pre, b_post, b_res,
                                      iters, eps, eps_rms)
    return wrap(x, h_pre, h_post, h_res, w), (h_pre, h_post, h_res)


def hc_coeffs(x, theta_pre, theta_post, theta_res, alpha, b_pre, b_post, b_res, eps_rms):
    t, n, c = x.shape
    xt = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps_rms)  # [T,n,C]
    h_pre = alpha[0] * torch.tanh(xt @ theta_pre) + b_pre  # [T,n]
    h_post = alpha[1] * torch.tanh(xt @ theta_post) + b_post  # [T,n]
    # s[t,o,i] = sum_c theta_res[o,c] * xt[t,i,c]
    s = torch.einsum("oc,tic->toi", theta_res.reshape(n, c), xt)
    h_res = alpha[2] * torch.tanh(s) + b_res.reshape(n, n)
    return h_pre, h_post, h_res


def hc_forward(x, theta_pre, theta_post, theta_res, alpha, b_pre, b_post, b_res, w, eps_rms):
    h_pre, h_post, h_res = hc_coeffs(x, theta_pre, theta_post, theta_res, alpha,
                                     b_pre, b_post, b_res, eps_rms)
    return wrap(x, h_pre, h_post, h_res, w), (h_pre, h_post, h_res)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def randn(*shape, std=1.0, mean=0.0):
    return (torch.randn(*shape, dtype=DT, device=DEV) * std + mean)


def uniform(*shape, lo=0.0, hi=1.0):
    return torch.rand(*shape, dtype=DT, device=DEV) * (hi - lo) + lo


def flat(tensor):
    return [float(v) for v in tensor.detach().reshape(-1).tolist()]


def check_rows(m, what):
    dev = (m.sum(dim=-1) - 1.0).abs().max().item()
    assert dev <= 1e-9, f"{what}: SK row sums off by {dev}"
    assert (m >= 0).all(), f"{what}: SK output negative"


# ----------------------------------------------------------------------------
# Case generators
# ----------------------------------------------------------------------------

SK_CASES = [  # (n, iters, logit std); std is not written to the JSON
    (1, 5, 2.0),
    (2, 1, 0.5),
    (2, 20, 4.0),
    (4, 1, 2.0),
    (4, 5, 0.5),
    (4, 20, 4.0),
    (8, 5, 2.0),
    (8, 20, 4.0),
]

MHC_CASES = [  # (n, C, iters)
    (1, 4, 20),
    (2, 3, 20),
    (4, 8, 20),
    (4, 8, 7),
    (8, 4, 20),
]

HC_CASES = [  # (n, C)
    (1, 4),
    (2, 3),
    (4, 8),
]

TOKENS = 3
EPS = 1e-6
EPS_RMS = 1e-6


def sk_case(n, iters, std, eps=EPS, tokens=TOKENS):
    logits = randn(tokens, n, n, std=std).requires_grad_(True)
    g = randn(tokens, n, n)
    out = sinkhorn(logits, iters, eps)
    check_rows(out, f"sinkhorn n={n} iters={iters} std={std}")
    (grad_logits,) = torch.autograd.grad(out, logits, grad_outputs=g)
    return {
        "n": n, "iters": iters, "eps": eps, "tokens": tokens,
        "logits": flat(logits), "output": flat(out),
        "grad_output": flat(g), "grad_logits": flat(grad_logits),
    }


def mhc_inputs(n, c, tokens=TOKENS):
    k = n * n + 2 * n
    return dict(
        x=randn(tokens, n, c),
        phi=randn(n * c, k, std=0.3),
        gamma=randn(n * c, std=0.1, mean=1.0),
        alpha=uniform(3, lo=0.5, hi=1.5),
        b_pre=randn(n),
        b_post=randn(n),
        b_res=randn(n * n),
        w=randn(c, c, std=0.5),
    )


MHC_PARAMS = ["x", "phi", "gamma", "alpha", "b_pre", "b_post", "b_res", "w"]


def mhc_case(n, c, iters, eps=EPS, eps_rms=EPS_RMS, tokens=TOKENS):
    inp = mhc_inputs(n, c, tokens)
    for v in inp.values():
        v.requires_grad_(True)
    grad_out = randn(tokens, n, c)
    out, (h_pre, h_post, h_res) = mhc_forward(
        *[inp[k] for k in MHC_PARAMS], iters=iters, eps=eps, eps_rms=eps_rms)
    check_rows(h_res, f"mhc n={n} C={c} H_res")
    grads = torch.autograd.grad(out, [inp[k] for k in MHC_PARAMS], grad_outputs=grad_out)
    case = {"n": n, "c": c, "tokens": tokens, "iters": iters, "eps": eps, "eps_rms": eps_rms}
    for k in MHC_PARAMS:
        case[k] = flat(inp[k])
    case["grad_out"] = flat(grad_out)
    case["h_pre"] = flat(h_pre)
    case["h_post"] = flat(h_post)
    case["h_res"] = flat(h_res)
    case["out"] = flat(out)
    for k, g in zip(MHC_PARAMS, grads):
        case["grad_" + k] = flat(g)
    return case


HC_PARAMS = ["x", "theta_pre", "theta_post", "theta_res", "alpha", "b_pre", "b_post",
             "b_res", "w"]


def hc_inputs(n, c, tokens=TOKENS):
    return dict(
        x=randn(tokens, n, c),
        theta_pre=randn(c, std=0.5),
        theta_post=randn(c, std=0.5),
        theta_res=randn(n * c, std=0.5),
        alpha=uniform(3, lo=0.5, hi=1.5),
        b_pre=randn(n),
        b_post=randn(n),
        b_res=randn(n * n),
        w=randn(c, c, std=0.5),
    )


def hc_case(n, c, eps_rms=EPS_RMS, tokens=TOKENS):
    inp = hc_inputs(n, c, tokens)
    for v in inp.values():
        v.requires_grad_(True)
    grad_out = randn(tokens, n, c)
    out, (h_pre, h_post, h_res) = hc_forward(*[inp[k] for k in HC_PARAMS], eps_rms=eps_rms)
    grads = torch.autograd.grad(out, [inp[k] for k in HC_PARAMS], grad_outputs=grad_out)
    case = {"n": n, "c": c, "tokens": tokens, "eps_rms": eps_rms}
    for k in HC_PARAMS:
        case[k] = flat(inp[k])
    case["grad_out"] = flat(grad_out)
    case["h_pre"] = flat(h_pre)
    case["h_post"] = flat(h_post)
    case["h_res"] = flat(h_res)
    case["out"] = flat(out)
    for k, g in zip(HC_PARAMS, grads):
        case["grad_" + k] = flat(g)
    return case


# ----------------------------------------------------------------------------
# Self checks
# ----------------------------------------------------------------------------

def self_checks():
    gen_state = torch.get_rng_state()
    torch.manual_seed(SEED + 1)  # separate stream: does not perturb the vectors

    # Sinkhorn: small, truncated (iters 5), moderate logits.
    logits = randn(2, 3, 3, std=2.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l: sinkhorn(l, 5, EPS), (logits,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5), "SK gradcheck"

    # mHC: n=2, C=3, 2 tokens, iters 7.
    inp = mhc_inputs(2, 3, tokens=2)
    args = tuple(inp[k].requires_grad_(True) for k in MHC_PARAMS)
    assert torch.autograd.gradcheck(
        lambda *a: mhc_forward(*a, iters=7, eps=EPS, eps_rms=EPS_RMS)[0], args,
        eps=1e-6, atol=1e-7, rtol=1e-5), "mHC gradcheck"

    # HC: n=2, C=3, 2 tokens.
    inp = hc_inputs(2, 3, tokens=2)
    args = tuple(inp[k].requires_grad_(True) for k in HC_PARAMS)
    assert torch.autograd.gradcheck(
        lambda *a: hc_forward(*a, eps_rms=EPS_RMS)[0], args,
        eps=1e-6, atol=1e-7, rtol=1e-5), "HC gradcheck"

    # Column-shift invariance of SK (forward), a cheap convention check.
    l = randn(4, 4, std=4.0)
    shifted = l + randn(1, 4, std=3.0)
    d = (sinkhorn(l, 20, EPS) - sinkhorn(shifted, 20, EPS)).abs().max().item()
    assert d < 1e-12, f"SK column-shift invariance off by {d}"

    torch.set_rng_state(gen_state)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "golden.json"),
                    help="output path (default: golden.json next to this script)")
    args = ap.parse_args()

    torch.set_default_dtype(DT)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)

    doc = {
        "generator": f"tests/reference/golden.py (torch {torch.__version__}, float64 autograd)",
        "sinkhorn": [sk_case(n, it, std) for (n, it, std) in SK_CASES],
        "mhc": [mhc_case(n, c, it) for (n, c, it) in MHC_CASES],
        "hc": [hc_case(n, c) for (n, c) in HC_CASES],
    }

    self_checks()

    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size} bytes): {len(doc['sinkhorn'])} sinkhorn, "
          f"{len(doc['mhc'])} mhc, {len(doc['hc'])} hc cases; gradchecks passed")


if __name__ == "__main__":
    main()
