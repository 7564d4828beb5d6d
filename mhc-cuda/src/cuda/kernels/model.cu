// Dense kernels of the GPT model for the CUDA trainer (f32), each the GPU
// twin of a function in mhc_core::model::ops / optim and parity-tested
// against it. Reductions use a fixed order (deterministic).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Block-wide sum, fixed order; every thread gets the result. blockDim.x multiple of 32.
__device__ __forceinline__ float block_sum_all(float v, float* scratch /* [32] */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += scratch[w];
    return s;
}

__device__ __forceinline__ float block_max_all(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// y = x / sqrt(mean(x²) + eps) ⊙ w per row; inv_rms[r] = 1/rms. One block per row.
extern "C" __global__ void rmsnorm_fwd(const float* __restrict__ x, const float* __restrict__ w, int C, float eps,
                                       float* __restrict__ y, float* __restrict__ inv_rms)
{
    __shared__ float scratch[32];
    const long r = blockIdx.x;
    const float* xr = x + r * C;
    float ss = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ss += xr[c] * xr[c];
    float inv = rsqrtf(block_sum_all(ss, scratch) / (float)C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) y[r * C + c] = xr[c] * inv * w[c];
    if (threadIdx.x == 0) inv_rms[r] = inv;
}

// dx = (dy⊙w − x̂·mean(dy⊙w⊙x̂))·inv per row (one block per row).
extern "C" __global__ void rmsnorm_bwd_dx(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ inv_rms, const float* __restrict__ dy, int C,
                                          float* __restrict__ dx)
{
    __shared__ float scratch[32];
    const long r = blockIdx.x;
    const float inv = inv_rms[r];
    float m = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) m += dy[r * C + c] * w[c] * x[r * C + c] * inv;
    m = block_sum_all(m, scratch) / (float)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dx[r * C + c] = (dy[r * C + c] * w[c] - x[r * C + c] * inv * m) * inv;
}

// dw[c] += Σ_r dy[r, c]·x[r, c]·inv_rms[r] in two deterministic passes: blocks of
// 32 columns × 8 row lanes sum one chunk of rows each (fixed order) into
// part[chunk, c]; rmsnorm_bwd_dw_sum adds the chunks in order.
extern "C" __global__ void rmsnorm_bwd_dw_part(const float* __restrict__ x, const float* __restrict__ inv_rms,
                                               const float* __restrict__ dy, int R, int C, int rows_per_chunk,
                                               float* __restrict__ part)
{
    __shared__ float sh[8][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx;
    const long r0 = (long)blockIdx.y * rows_per_chunk;
    const long r1 = r0 + rows_per_chunk < (long)R ? r0 + rows_per_chunk : (long)R;
    float s = 0.f;
    if (c < C)
        for (long r = r0 + ty; r < r1; r += 8) s += dy[r * C + c] * x[r * C + c] * inv_rms[r];
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += sh[k][tx];
        part[(long)blockIdx.y * C + c] = t;
    }
}

extern "C" __global__ void rmsnorm_bwd_dw_sum(const float* __restrict__ part, int chunks, int C, float* __restrict__ dw)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.f;
    for (int k = 0; k < chunks; ++k) s += part[(long)k * C + c];
    dw[c] += s;
}

#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f

extern "C" __global__ void gelu_fwd(const float* __restrict__ u, long len, float* __restrict__ a)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x) {
        float v = u[e];
        a[e] = 0.5f * v * (1.f + tanhf(GELU_K * (v + GELU_A * v * v * v)));
    }
}

// du = da · gelu'(u)
extern "C" __global__ void gelu_bwd(const float* __restrict__ u, const float* __restrict__ da, long len, float* __restrict__ du)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x) {
        float v = u[e];
        float t = tanhf(GELU_K * (v + GELU_A * v * v * v));
        float d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_K * (1.f + 3.f * GELU_A * v * v);
        du[e] = da[e] * d;
    }
}

// Softmax cross-entropy per row (one block per row): loss[r] = log Σ exp(l − max) − (l_t − max);
// logits are overwritten with (softmax − onehot)/R, the gradient of the mean loss.
extern "C" __global__ void cross_entropy(float* __restrict__ logits, const unsigned int* __restrict__ targets, int R, int V,
                                         float* __restrict__ loss)
{
    __shared__ float scratch[32];
    const long r = blockIdx.x;
    float* row = logits + r * V;
    float mx = __int_as_float(0xff800000);
    for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, row[v]);
    mx = block_max_all(mx, scratch);
    float s = 0.f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(row[v] - mx);
    s = block_sum_all(s, scratch);
    const unsigned int t = targets[r];
    const float lt = row[t] - mx;
    __syncthreads();
    const float scale = 1.f / (float)R, inv = 1.f / s;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float p = expf(row[v] - mx) * inv * scale;
        row[v] = v == (int)t ? p - scale : p;
    }
    if (threadIdx.x == 0) loss[r] = logf(s) - lt;
}

// AdamW with bias correction (see mhc_core::model::optim::AdamW::update); grad scaled by `gscale` (clipping).
extern "C" __global__ void adamw(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, long len, float lr, float b1, float b2, float eps,
                                 float shrink, float inv_bc1, float inv_bc2, float gscale)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x) {
        float gv = g[e] * gscale;
        float mv = b1 * m[e] + (1.f - b1) * gv;
        float vv = b2 * v[e] + (1.f - b2) * gv * gv;
        m[e] = mv;
        v[e] = vv;
        w[e] = w[e] * shrink - lr * inv_bc1 * mv / (sqrtf(vv * inv_bc2) + eps);
    }
}

// Σ x² in fixed order: per-block partials (grid-stride), then sum_partials.
extern "C" __global__ void sum_squares(const float* __restrict__ x, long len, float* __restrict__ partial)
{
    __shared__ float scratch[32];
    float s = 0.f;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x) s += x[e] * x[e];
    s = block_sum_all(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// ---------------------------------------------------------------------------
// Causal multi-head attention on qkv [B·S, 3C] (columns q | k | v; head h owns
// columns h·D .. (h+1)·D of each), scale 1/sqrt(D). Probabilities are kept,
// [B, H, S, S] (zero above the diagonal), for the backward.

// Blocks of 8 warps share 32-row tiles of K, V (forward) or Q, dO (backward)
// in shared memory; D ≤ 128 (rows padded by one float: conflict-free).
#define AT_W 8
#define AT_T 32
#define AT_D 128

// attn_fwd: grid (ceil(S/8), B·H); warp w takes query t = 8·blockIdx.x + w.
// Pass 1 writes scaled scores into probs and finds the row max; pass 2 sums
// and normalises; pass 3 accumulates O = P·V (lanes own output columns).
extern "C" __global__ void __launch_bounds__(32 * AT_W) attn_fwd(const float* __restrict__ qkv, int B, int S, int H, int D,
                                                               float* __restrict__ probs, float* __restrict__ out)
{
    __shared__ float tile[AT_T][AT_D + 1];
    __shared__ float qs[AT_W][AT_D];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int C = H * D;
    const int t = blockIdx.x * AT_W + w;
    const int t_last = min(S - 1, (int)blockIdx.x * AT_W + AT_W - 1);
    const float scale = rsqrtf((float)D);
    const bool live = t < S;
    for (int j = lane; j < D; j += 32) qs[w][j] = live ? qkv[((long)b * S + t) * 3 * C + h * D + j] : 0.f;
    float* p = probs + ((long)bh * S + (live ? t : 0)) * S;
    float mx = __int_as_float(0xff800000);
    for (int u0 = 0; u0 <= t_last; u0 += AT_T) {
        __syncthreads();
        for (int e = threadIdx.x; e < AT_T * D; e += blockDim.x) {
            int r = e / D, j = e % D, u = u0 + r;
            tile[r][j] = u < S ? qkv[((long)b * S + u) * 3 * C + C + h * D + j] : 0.f;
        }
        __syncthreads();
        const int u = u0 + lane;
        if (live && u <= t) {
            float sc = 0.f;
            for (int j = 0; j < D; ++j) sc += qs[w][j] * tile[lane][j];
            sc *= scale;
            p[u] = sc;
            mx = fmaxf(mx, sc);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    if (live) {
        __syncwarp();
        for (int u = lane; u <= t; u += 32) {
            float e = expf(p[u] - mx);
            p[u] = e;
            sum += e;
        }
    }
    sum = warp_sum(sum);
    if (live) {
        const float inv = 1.f / sum;
        for (int u = lane; u < S; u += 32) p[u] = u <= t ? p[u] * inv : 0.f;
        __syncwarp();
    }
    float o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int u0 = 0; u0 <= t_last; u0 += AT_T) {
        __syncthreads();
        for (int e = threadIdx.x; e < AT_T * D; e += blockDim.x) {
            int r = e / D, j = e % D, u = u0 + r;
            tile[r][j] = u < S ? qkv[((long)b * S + u) * 3 * C + 2 * C + h * D + j] : 0.f;
        }
        __syncthreads();
        const float pu = (live && u0 + lane <= t) ? p[u0 + lane] : 0.f;
        const int n = live ? min(AT_T, t - u0 + 1) : 0;
        for (int r = 0; r < n; ++r) {
            const float pr = __shfl_sync(0xffffffffu, pu, r);
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (lane + 32 * c < D) o[c] += pr * tile[r][lane + 32 * c];
        }
    }
    if (live) {
#pragma unroll
        for (int c = 0; c < 4; ++c)
            if (lane + 32 * c < D) out[((long)b * S + t) * C + h * D + lane + 32 * c] = o[c];
    }
}

// attn_bwd_q: grid (ceil(S/8), B·H); warp w takes query t. delta_t = dO_t·O_t;
// dq_t = scale Σ_{u ≤ t} p_tu (dO_t·v_u − delta_t) k_u. K and V tiles are shared.
extern "C" __global__ void __launch_bounds__(32 * AT_W) attn_bwd_q(const float* __restrict__ qkv, const float* __restrict__ probs,
                                                                 const float* __restrict__ out, const float* __restrict__ dout,
                                                                 int B, int S, int H, int D, float* __restrict__ delta,
                                                                 float* __restrict__ dqkv)
{
    __shared__ float ktile[AT_T][AT_D + 1];
    __shared__ float vtile[AT_T][AT_D + 1];
    __shared__ float dos[AT_W][AT_D];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int C = H * D;
    const int t = blockIdx.x * AT_W + w;
    const int t_last = min(S - 1, (int)blockIdx.x * AT_W + AT_W - 1);
    const float scale = rsqrtf((float)D);
    const bool live = t < S;
    float d = 0.f;
    for (int j = lane; j < D; j += 32) {
        float g = live ? dout[((long)b * S + t) * C + h * D + j] : 0.f;
        dos[w][j] = g;
        d += g * (live ? out[((long)b * S + t) * C + h * D + j] : 0.f);
    }
    d = warp_sum(d);
    if (live && lane == 0) delta[(long)bh * S + t] = d;
    const float* p = probs + ((long)bh * S + (live ? t : 0)) * S;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int u0 = 0; u0 <= t_last; u0 += AT_T) {
        __syncthreads();
        for (int e = threadIdx.x; e < AT_T * D; e += blockDim.x) {
            int r = e / D, j = e % D, u = u0 + r;
            bool ok = u < S;
            ktile[r][j] = ok ? qkv[((long)b * S + u) * 3 * C + C + h * D + j] : 0.f;
            vtile[r][j] = ok ? qkv[((long)b * S + u) * 3 * C + 2 * C + h * D + j] : 0.f;
        }
        __syncthreads();
        float wu = 0.f;
        if (live && u0 + lane <= t) {
            float dp = 0.f;
            for (int j = 0; j < D; ++j) dp += dos[w][j] * vtile[lane][j];
            wu = p[u0 + lane] * (dp - d);
        }
        const int n = live ? min(AT_T, t - u0 + 1) : 0;
        for (int r = 0; r < n; ++r) {
            const float wr = __shfl_sync(0xffffffffu, wu, r);
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (lane + 32 * c < D) acc[c] += wr * ktile[r][lane + 32 * c];
        }
    }
    if (live) {
#pragma unroll
        for (int c = 0; c < 4; ++c)
            if (lane + 32 * c < D) dqkv[((long)b * S + t) * 3 * C + h * D + lane + 32 * c] = scale * acc[c];
    }
}

// attn_bwd_kv: grid (ceil(S/8), B·H); warp w takes key u = 8·blockIdx.x + w.
// dk_u = scale Σ_{t ≥ u} p_tu (dO_t·v_u − delta_t) q_t,  dv_u = Σ_{t ≥ u} p_tu dO_t.
// Q and dO tiles (32 queries) and the matching probabilities are shared.
extern "C" __global__ void __launch_bounds__(32 * AT_W) attn_bwd_kv(const float* __restrict__ qkv, const float* __restrict__ probs,
                                                                  const float* __restrict__ dout, const float* __restrict__ delta,
                                                                  int B, int S, int H, int D, float* __restrict__ dqkv)
{
    __shared__ float qtile[AT_T][AT_D + 1];
    __shared__ float gtile[AT_T][AT_D + 1];
    __shared__ float vs[AT_W][AT_D];
    __shared__ float ptile[AT_T][AT_W + 1];
    __shared__ float dtile[AT_T];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int C = H * D;
    const int u_first = blockIdx.x * AT_W;
    const int u = u_first + w;
    const float scale = rsqrtf((float)D);
    const bool live = u < S;
    for (int j = lane; j < D; j += 32) vs[w][j] = live ? qkv[((long)b * S + u) * 3 * C + 2 * C + h * D + j] : 0.f;
    float dk[4] = {0.f, 0.f, 0.f, 0.f}, dv[4] = {0.f, 0.f, 0.f, 0.f};
    for (int t0 = u_first; t0 < S; t0 += AT_T) {
        __syncthreads();
        for (int e = threadIdx.x; e < AT_T * D; e += blockDim.x) {
            int r = e / D, j = e % D, t = t0 + r;
            bool ok = t < S;
            qtile[r][j] = ok ? qkv[((long)b * S + t) * 3 * C + h * D + j] : 0.f;
            gtile[r][j] = ok ? dout[((long)b * S + t) * C + h * D + j] : 0.f;
        }
        for (int e = threadIdx.x; e < AT_T * AT_W; e += blockDim.x) {
            int r = e / AT_W, k = e % AT_W, t = t0 + r, uu = u_first + k;
            ptile[r][k] = (t < S && uu < S) ? probs[((long)bh * S + t) * S + uu] : 0.f;
        }
        for (int e = threadIdx.x; e < AT_T; e += blockDim.x) dtile[e] = t0 + e < S ? delta[(long)bh * S + t0 + e] : 0.f;
        __syncthreads();
        float wt = 0.f, pt = 0.f;
        const int t = t0 + lane;
        if (live && t < S && t >= u) {
            float dp = 0.f;
            for (int j = 0; j < D; ++j) dp += gtile[lane][j] * vs[w][j];
            pt = ptile[lane][w];
            wt = pt * (dp - dtile[lane]);
        }
        const int n = live ? min(AT_T, S - t0) : 0;
        for (int r = 0; r < n; ++r) {
            const float wr = __shfl_sync(0xffffffffu, wt, r);
            const float pr = __shfl_sync(0xffffffffu, pt, r);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (lane + 32 * c < D) {
                    dk[c] += wr * qtile[r][lane + 32 * c];
                    dv[c] += pr * gtile[r][lane + 32 * c];
                }
            }
        }
    }
    if (live) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            if (lane + 32 * c < D) {
                dqkv[((long)b * S + u) * 3 * C + C + h * D + lane + 32 * c] = scale * dk[c];
                dqkv[((long)b * S + u) * 3 * C + 2 * C + h * D + lane + 32 * c] = dv[c];
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Embedding and streams. x0[r, s, c] = E[tok_r, c] + P[r mod S, c] for every stream s.
extern "C" __global__ void embed_fwd(const unsigned int* __restrict__ tokens, const float* __restrict__ E,
                                     const float* __restrict__ P, long R, int S, int NS, int C, float* __restrict__ x0)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < R * NS * C; e += (long)gridDim.x * blockDim.x) {
        long r = e / ((long)NS * C);
        int c = (int)(e % C);
        x0[e] = E[(long)tokens[r] * C + c] + P[(r % S) * C + c];
    }
}

// dE[v, c] += Σ_{r in rows_of[v]} Σ_s dx0[r, s, c] with a CSR list of the rows of each token
// (row_start [V+1], rows [R], built on the host in row order: deterministic).
extern "C" __global__ void embed_bwd_tokens(const float* __restrict__ dx0, const unsigned int* __restrict__ row_start,
                                            const unsigned int* __restrict__ rows, int V, int NS, int C, float* __restrict__ dE)
{
    long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)V * C) return;
    int v = (int)(e / C), c = (int)(e % C);
    float s = 0.f;
    for (unsigned int i = row_start[v]; i < row_start[v + 1]; ++i) {
        long r = rows[i];
        for (int st = 0; st < NS; ++st) s += dx0[(r * NS + st) * C + c];
    }
    dE[e] += s;
}

// dP[p, c] += Σ_b Σ_s dx0[b·S + p, s, c].
extern "C" __global__ void embed_bwd_positions(const float* __restrict__ dx0, int B, int S, int NS, int C, float* __restrict__ dP)
{
    long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)S * C) return;
    int p = (int)(e / C), c = (int)(e % C);
    float s = 0.f;
    for (int b = 0; b < B; ++b)
        for (int st = 0; st < NS; ++st) s += dx0[(((long)b * S + p) * NS + st) * C + c];
    dP[e] += s;
}

// z[r, c] = mean_s x[r, s, c]
extern "C" __global__ void streams_mean(const float* __restrict__ x, long R, int NS, int C, float* __restrict__ z)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < R * C; e += (long)gridDim.x * blockDim.x) {
        long r = e / C;
        int c = (int)(e % C);
        float s = 0.f;
        for (int st = 0; st < NS; ++st) s += x[(r * NS + st) * C + c];
        z[e] = s / (float)NS;
    }
}

// dx[r, s, c] = dz[r, c] / NS
extern "C" __global__ void streams_mean_bwd(const float* __restrict__ dz, long R, int NS, int C, float* __restrict__ dx)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < R * NS * C; e += (long)gridDim.x * blockDim.x) {
        long r = e / ((long)NS * C);
        int c = (int)(e % C);
        dx[e] = dz[r * C + c] / (float)NS;
    }
}

// out = a + b (the residual connection's merge, and gradient sums).
extern "C" __global__ void add(const float* __restrict__ a, const float* __restrict__ b, long len, float* __restrict__ out)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x) out[e] = a[e] + b[e];
}

// ---------------------------------------------------------------------------
// Attention on tensor cores: scores and products are cuBLAS batched GEMMs; these
// two kernels are the causal softmax between them and its backward.

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// causal_softmax: p [rows = B·H·S, S] in place, one warp per row (query i = row mod S):
// p_j = exp(s_j − max) / Σ over j ≤ i, and 0 for j > i (the GEMMs read whole rows).
extern "C" __global__ void causal_softmax(float* __restrict__ p, long rows, int S)
{
    const long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const int lane = threadIdx.x & 31;
    const int i = (int)(r % S);
    float* row = p + r * S;
    float m = -3.0e38f;
    for (int j = lane; j <= i; j += 32) m = fmaxf(m, row[j]);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j <= i; j += 32) {
        const float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    const float inv = 1.f / warp_sum(sum);
    for (int j = lane; j < S; j += 32) row[j] = j <= i ? row[j] * inv : 0.f;
}

// causal_softmax_bwd: dp [rows, S] in place becomes the gradient of the scaled scores,
// ds_j = p_j (dp_j − Σ_j' p_j' dp_j') · scale (0 above the diagonal). One warp per row.
extern "C" __global__ void causal_softmax_bwd(const float* __restrict__ p, float* __restrict__ dp, long rows, int S,
                                              float scale)
{
    const long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const int lane = threadIdx.x & 31;
    const int i = (int)(r % S);
    const float* pr = p + r * S;
    float* dr = dp + r * S;
    float d = 0.f;
    for (int j = lane; j <= i; j += 32) d += pr[j] * dr[j];
    d = warp_sum(d);
    for (int j = lane; j < S; j += 32) dr[j] = j <= i ? pr[j] * (dr[j] - d) * scale : 0.f;
}
