#!/usr/bin/env python3
"""Emulates, in float32 on the CPU, one token of the Sinkhorn-Knopp parts of
coeff_finish (the sweep) and coeff_bwd (the stored iterates and the reverse
sweep) in kernels/mhc.cu, for SK_LANES=1 (a lane per row) and SK_LANES=2 (a
lane per element), as the CUDA code is written: shuffles as permutations of
the lanes' values, every operation rounded to float32. It checks that both
lane layouts give the same bits, i.e. that SK_LANES=2's indexing (rows,
columns, the row gathers, the butterflies) matches. It does not model the
compiler's FMA contraction; the GPU A/B (40 steps, 0 differing tensors) does.
It also checks SK_RS=1's reduce-scatter of the column sums against the
butterfly, bit for bit (N = 1…8).

    pip install numpy && python3 mhc-cuda/bench/sk_lanes_emulate.py
"""
import numpy as np
f = np.float32
def G(N): return 1 if N <= 1 else 2 if N <= 2 else 4 if N <= 4 else 8
EPS = f(1e-6)
def rcp(x): return f(1.0) / x
def fmax(a, b): return a if a >= b else b

def rows_version(N, l, gin, iters, eps=EPS):
    g_ = G(N); lanes = range(g_)
    row = [q < N for q in lanes]
    L = [[l[q][i] if row[q] else f(0) for i in range(N)] for q in lanes]
    def grp_sum(v):  # v: list per lane
        v = list(v); o = 1
        while o < g_:
            v = [f(v[q] + v[q ^ o]) for q in lanes]; o <<= 1
        return v
    def grp_max(v):
        v = list(v); o = 1
        while o < g_:
            v = [fmax(v[q], v[q ^ o]) for q in lanes]; o <<= 1
        return v
    m = [[f(0)] * N for _ in lanes]
    for i in range(N):
        mx = grp_max([L[q][i] if row[q] else f(-np.inf) for q in lanes])
        for q in lanes: m[q][i] = f(np.exp(f(L[q][i] - mx[q]))) if row[q] else f(0)
    hist = []
    def half(m, k):
        m = [list(r) for r in m]
        if k % 2 == 0:
            for i in range(N):
                s = grp_sum([m[q][i] for q in lanes])
                for q in lanes:
                    r = rcp(fmax(s[q], eps)); m[q][i] = f(m[q][i] * r) if row[q] else f(0)
        else:
            for q in lanes:
                s = f(0)
                for i in range(N): s = f(s + m[q][i])
                r = rcp(fmax(s, eps))
                for i in range(N): m[q][i] = f(m[q][i] * r) if row[q] else f(0)
        return m
    for k in range(2 * iters):
        hist.append([list(r) for r in m]); m = half(m, k)
    fwd = [list(r) for r in m]
    # backward
    g = [[gin[q][i] if row[q] else f(0) for i in range(N)] for q in lanes]
    outm = [list(r) for r in m]; inn = [list(r) for r in m]
    for k in range(2 * iters - 1, -1, -1):
        inn = [[hist[k][q][i] if row[q] else f(0) for i in range(N)] for q in lanes]
        if k % 2 == 0:
            for i in range(N):
                s = grp_sum([inn[q][i] for q in lanes]); gy = grp_sum([f(g[q][i] * outm[q][i]) for q in lanes])
                for q in lanes:
                    act = f(1) if s[q] > eps else f(0)
                    g[q][i] = f(f(g[q][i] - f(act * gy[q])) * rcp(fmax(s[q], eps))) if row[q] else f(0)
        else:
            for q in lanes:
                s = f(0); gy = f(0)
                for i in range(N): s = f(s + inn[q][i]); gy = f(gy + f(g[q][i] * outm[q][i]))
                act = f(1) if s > eps else f(0); rr = rcp(fmax(s, eps))
                for i in range(N): g[q][i] = f(f(g[q][i] - f(act * gy)) * rr) if row[q] else f(0)
        outm = [list(r) for r in inn]
    dres = [[f(g[q][i] * inn[q][i]) for i in range(N)] for q in lanes]
    return fwd, dres

def elem_version(N, l, gin, iters, eps=EPS):
    g_ = G(N); SL = g_ * g_; lanes = range(SL)
    A = [q // g_ for q in lanes]; I = [q % g_ for q in lanes]
    el = [A[q] < N and I[q] < N for q in lanes]
    row0 = [q - I[q] for q in lanes]
    def col_sum(v):
        v = list(v); o = g_
        while o < SL:
            v = [f(v[q] + v[q ^ o]) for q in lanes]; o <<= 1
        return v
    def col_max(v):
        v = list(v); o = g_
        while o < SL:
            v = [fmax(v[q], v[q ^ o]) for q in lanes]; o <<= 1
        return v
    L = [l[A[q]][I[q]] if el[q] else f(0) for q in lanes]
    mx = col_max([L[q] if el[q] else f(-np.inf) for q in lanes])
    m = [f(np.exp(f(L[q] - mx[q]))) if el[q] else f(0) for q in lanes]
    def half(m, k):
        if k % 2 == 0:
            s = col_sum(m)
        else:
            s = []
            for q in lanes:
                t = f(0)
                for j in range(N): t = f(t + m[row0[q] + j])
                s.append(t)
        return [f(m[q] * rcp(fmax(s[q], eps))) if el[q] else f(0) for q in lanes]
    hist = []
    for k in range(2 * iters):
        hist.append(list(m)); m = half(m, k)
    fwd = [[m[a * g_ + i] for i in range(N)] for a in range(N)]
    g = [gin[A[q]][I[q]] if el[q] else f(0) for q in lanes]
    outm = list(m); inn = list(m)
    for k in range(2 * iters - 1, -1, -1):
        inn = [hist[k][q] if el[q] else f(0) for q in lanes]
        if k % 2 == 0:
            s = col_sum(inn); gy = col_sum([f(g[q] * outm[q]) for q in lanes])
            g = [f(f(g[q] - f((f(1) if s[q] > eps else f(0)) * gy[q])) * rcp(fmax(s[q], eps))) if el[q] else f(0) for q in lanes]
        else:
            ng = []
            for q in lanes:
                s = f(0); gy = f(0)
                for j in range(N):
                    s = f(s + inn[row0[q] + j]); gy = f(gy + f(g[row0[q] + j] * outm[row0[q] + j]))
                act = f(1) if s > eps else f(0); rr = rcp(fmax(s, eps))
                ng.append(f(f(g[q] - f(act * gy)) * rr) if el[q] else f(0))
            g = ng
        outm = list(inn)
    dres = [[f(g[a * g_ + i] * inn[a * g_ + i]) for i in range(N)] for a in range(N)]
    return fwd, dres

rng = np.random.default_rng(1)
for N in (2, 3, 4):
    for trial in range(20):
        scale = [0.5, 3.0, 12.0][trial % 3]
        l = (rng.standard_normal((N, N)) * scale).astype(f)
        gin = rng.standard_normal((N, N)).astype(f)
        iters = 20 if trial % 4 else 3
        a_f, a_b = rows_version(N, l, gin, iters)
        b_f, b_b = elem_version(N, l, gin, iters)
        af = np.array([a_f[q][:N] for q in range(N)], dtype=f); bf = np.array(b_f, dtype=f)
        ab = np.array([a_b[q][:N] for q in range(N)], dtype=f); bb = np.array(b_b, dtype=f)
        assert (af.view(np.uint32) == bf.view(np.uint32)).all(), (N, trial, af, bf)
        assert (ab.view(np.uint32) == bb.view(np.uint32)).all(), (N, trial, ab, bb)
        if iters == 20 and scale < 1: assert np.abs(af.sum(1) - 1).max() < 1e-5 and np.abs(af.sum(0) - 1).max() < 1e-2, (af, af.sum(0), af.sum(1))
print("SK_LANES=2 emulation: same bits as SK_LANES=1 (N = 2, 3, 4; 20 inputs each)")

# SK_RS=1 (sk_grp_rs in kernels/mhc.cu): the column sums by a reduce-scatter, as
# written there, against sk_grp_sum's butterfly: lane q's result must be the
# butterfly's sum of column q, bit for bit (the column half-steps use nothing
# else of the sums: each column's reciprocal and, backward, active·gy come from
# them).
def grp_rs(v, g_):  # v[lane][column], columns padded to g_; returns column q's sum on lane q
    v = [list(r) for r in v]
    o = 1
    while o < g_:
        new = [list(r) for r in v]
        for q in range(g_):
            hi = (q & o) != 0
            for j in range(g_ // (2 * o)):
                keep = v[q][2 * j + 1] if hi else v[q][2 * j]
                p = q ^ o  # the partner sends what lane q keeps: its own `send`
                send_p = v[p][2 * j] if (p & o) != 0 else v[p][2 * j + 1]
                new[q][j] = f(keep + send_p)
        v = new; o <<= 1
    return [v[q][0] for q in range(g_)]

def grp_sum_col(v, g_, c):
    s = [v[q][c] for q in range(g_)]; o = 1
    while o < g_:
        s = [f(s[q] + s[q ^ o]) for q in range(g_)]; o <<= 1
    return s

for N in range(1, 9):
    g_ = G(N)
    for trial in range(50):
        m = (rng.standard_normal((g_, g_)) * [0.01, 1.0, 100.0][trial % 3]).astype(f)
        m[N:, :] = 0; m[:, N:] = 0  # lanes past N hold zeros; columns past N are padding
        rs = grp_rs(m.tolist(), g_)
        rs = [f(x) for x in rs]
        for c in range(N):
            bf_ = grp_sum_col([[f(x) for x in r] for r in m.tolist()], g_, c)
            assert all(np.float32(b).view(np.uint32) == np.float32(rs[c]).view(np.uint32) for b in bf_), (N, trial, c)
print("SK_RS=1 emulation: the reduce-scatter's column sums are the butterfly's bits (N = 1…8; 50 inputs each)")
