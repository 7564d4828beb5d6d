"""The ldmatrix address formulas of model.cu (fa_ldsm4, fa_frag_a with FA_LDSM=1,
and the GPU-verified fa_ldsm_t4) against the mma.m16n8k16 fragments that the
LDS.32 path reads, on an emulation of ldmatrix.x4 (PTX ISA semantics). The
transposed loader, which the device tests cover, checks the emulation. Run:
python3 mhc-cuda/bench/fragments.py (exits 1 on a mismatch)."""
# Emulates ldmatrix.x4 (PTX ISA semantics) and checks fragment address formulas.
def ldsm(addr_of_lane, trans):
    # addr_of_lane(l) -> (row, col) of the 8-element row lane l points at.
    regs = {}
    for L in range(32):
        g, t = L // 4, L % 4
        out = []
        for j in range(4):
            rows = [addr_of_lane(8 * j + r) for r in range(8)]
            if not trans:
                r0, c0 = rows[g]
                out.append(((r0, c0 + 2 * t), (r0, c0 + 2 * t + 1)))
            else:
                ra, ca = rows[2 * t]
                rb, cb = rows[2 * t + 1]
                out.append(((ra, ca + g), (rb, cb + g)))
        regs[L] = out
    return regs

ok = True
# 1. existing trans loader for M[k][n]: should give b0(n0), b1(n0), b0(n0+8), b1(n0+8)
for k0 in (0, 16):
    for n0 in (0, 16):
        def a_t(l):
            mi, ri = l >> 3, l & 7
            return (k0 + (mi & 1) * 8 + ri, n0 + (mi >> 1) * 8)
        regs = ldsm(a_t, True)
        for L in range(32):
            g, t = L // 4, L % 4
            want = []
            for nt in (n0, n0 + 8):
                want.append(((k0 + 2 * t, nt + g), (k0 + 2 * t + 1, nt + g)))        # b0: k 2t.., n g  (M[k][n])
                want.append(((k0 + 2 * t + 8, nt + g), (k0 + 2 * t + 9, nt + g)))    # b1
            if regs[L] != want:
                ok = False; print("trans mismatch", k0, n0, L, regs[L], want)
import sys
print("existing trans loader matches b fragments:", ok)

# 2. new non-trans loader for B row-major [n][k]: b0(n0), b1(n0), b0(n0+8), b1(n0+8);
#    the old code read b0 = M[n0+g][k0+2t..], b1 = M[n0+g][k0+2t+8..]
ok2 = True
for k0 in (0, 16, 48):
    for n0 in (0, 16):
        def a_n(l):
            mi, ri = l >> 3, l & 7
            return (n0 + (mi >> 1) * 8 + ri, k0 + (mi & 1) * 8)
        regs = ldsm(a_n, False)
        for L in range(32):
            g, t = L // 4, L % 4
            want = []
            for nt in (n0, n0 + 8):
                want.append(((nt + g, k0 + 2 * t), (nt + g, k0 + 2 * t + 1)))
                want.append(((nt + g, k0 + 2 * t + 8), (nt + g, k0 + 2 * t + 9)))
            if regs[L] != want:
                ok2 = False; print("B mismatch", k0, n0, L, regs[L], want)
print("new B loader matches the old LDS.32 reads:", ok2)

# 3. new A loader for row-major [m][k], rows 0..15, k cols [k0, k0+16):
#    old: a0 = M[g][k0+2t..], a1 = M[g+8][k0+2t..], a2 = M[g][k0+2t+8..], a3 = M[g+8][k0+2t+8..]
ok3 = True
for k0 in (0, 16, 48):
    def a_a(l):
        mi, ri = l >> 3, l & 7
        return ((mi & 1) * 8 + ri, k0 + (mi >> 1) * 8)
    regs = ldsm(a_a, False)
    for L in range(32):
        g, t = L // 4, L % 4
        want = [((g, k0 + 2 * t), (g, k0 + 2 * t + 1)), ((g + 8, k0 + 2 * t), (g + 8, k0 + 2 * t + 1)),
                ((g, k0 + 2 * t + 8), (g, k0 + 2 * t + 9)), ((g + 8, k0 + 2 * t + 8), (g + 8, k0 + 2 * t + 9))]
        if regs[L] != want:
            ok3 = False; print("A mismatch", k0, L, regs[L], want)
print("new A loader matches the old LDS.32 reads:", ok3)

# bank conflicts: each 8-lane phase, 16-byte rows at stride (D+8)*2 bytes
for D in (16, 32, 64, 128):
    stride = (D + 8) * 2
    banks = set()
    for r in range(8):
        w = (r * stride) // 4
        banks |= {(w + i) % 32 for i in range(4)}
    print(f"D={D}: 8 rows cover {len(banks)} distinct banks (32 = conflict-free)")
sys.exit(0 if ok and ok2 and ok3 else 1)
