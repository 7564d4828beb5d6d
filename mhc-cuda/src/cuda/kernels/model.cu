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

// bf16 bits of f, rounded to nearest even (NaN stays NaN, ±Inf stays ±Inf): one
// cvt instruction from sm_80 on (the integer rounding below takes about seven).
__device__ __forceinline__ unsigned bf16_bits(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    unsigned u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u >> 16) | ((u & 0x007fffffu) ? 0x40u : 0u);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#endif
}
// Stores of an f32 result into f32 or bf16 outputs (kernels with a _bf16 twin).
__device__ __forceinline__ void put(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void put(unsigned short* p, long i, float v) { p[i] = (unsigned short)bf16_bits(v); }
// Loads of f32 or bf16 inputs as f32. Kernels that touch the residual streams (the
// state x, the sublayer input h and output y, and their gradients) are templates
// over the stream type; the `_bs` instances take bf16 streams (DESIGN.md §3).
__device__ __forceinline__ float get(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float get(const unsigned short* p, long i) { return __uint_as_float((unsigned)p[i] << 16); }
typedef unsigned short bs_t; // a bf16 stream element

// RMSNorm runs one warp per row, RN_ROWS rows per block (no block-wide
// synchronisation); rows whose width is a multiple of 4 are read and written
// four elements at a time (16-byte f32 / 8-byte bf16 accesses).
#define RN_ROWS 8
#ifdef EXPECT_RN_ROWS // the host's rows per block (model_ops.rs, RN_ROWS), checked by its unit test
static_assert(RN_ROWS == EXPECT_RN_ROWS, "host and RMSNorm kernels disagree on rows per block");
#endif
__device__ __forceinline__ float4 get4(const float* p, long i) { return *(const float4*)(p + i); }
__device__ __forceinline__ float4 get4(const unsigned short* p, long i) {
    const uint2 u = *(const uint2*)(p + i);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ void put4(float* p, long i, float4 v) { *(float4*)(p + i) = v; }
__device__ __forceinline__ void put4(unsigned short* p, long i, float4 v) {
    *(uint2*)(p + i) = make_uint2(bf16_bits(v.x) | (bf16_bits(v.y) << 16), bf16_bits(v.z) | (bf16_bits(v.w) << 16));
}

// y = x / sqrt(mean(x²) + eps) ⊙ w per row; inv_rms[r] = 1/rms. grid ceil(R / RN_ROWS) × 32·RN_ROWS threads.
// rmsnorm_fwd_bf16 writes y rounded to bf16 (the same f32 values, then rounded).
template <typename X, typename T>
__device__ __forceinline__ void rmsnorm_fwd_impl(const X* __restrict__ x, const float* __restrict__ w, int R, int C,
                                                 float eps, T* __restrict__ y, float* __restrict__ inv_rms)
{
    const long r = (long)blockIdx.x * RN_ROWS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return; // the whole warp
    const long o = r * C;
    float ss = 0.f;
    if (C % 4 == 0) {
        for (int c = 4 * lane; c < C; c += 128) {
            const float4 v = get4(x, o + c);
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int c = lane; c < C; c += 32) ss += get(x, o + c) * get(x, o + c);
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)C + eps);
    if (C % 4 == 0) {
        for (int c = 4 * lane; c < C; c += 128) {
            const float4 v = get4(x, o + c), g = *(const float4*)(w + c);
            put4(y, o + c, make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w));
        }
    } else {
        for (int c = lane; c < C; c += 32) put(y, o + c, get(x, o + c) * inv * w[c]);
    }
    if (lane == 0) inv_rms[r] = inv;
}
extern "C" __global__ void rmsnorm_fwd(const float* __restrict__ x, const float* __restrict__ w, int R, int C,
                                       float eps, float* __restrict__ y, float* __restrict__ inv_rms)
{ rmsnorm_fwd_impl(x, w, R, C, eps, y, inv_rms); }
extern "C" __global__ void rmsnorm_fwd_bf16(const float* __restrict__ x, const float* __restrict__ w, int R, int C,
                                            float eps, unsigned short* __restrict__ y, float* __restrict__ inv_rms)
{ rmsnorm_fwd_impl(x, w, R, C, eps, y, inv_rms); }
extern "C" __global__ void rmsnorm_fwd_bf16_bs(const bs_t* __restrict__ x, const float* __restrict__ w, int R, int C,
                                               float eps, unsigned short* __restrict__ y, float* __restrict__ inv_rms)
{ rmsnorm_fwd_impl(x, w, R, C, eps, y, inv_rms); }

// dx = (dy⊙w − x̂·mean(dy⊙w⊙x̂))·inv per row (one warp per row, as the forward).
template <typename X>
__device__ __forceinline__ void rmsnorm_bwd_dx_impl(const X* __restrict__ x, const float* __restrict__ w,
                                                    const float* __restrict__ inv_rms, const float* __restrict__ dy,
                                                    int R, int C, X* __restrict__ dx)
{
    const long r = (long)blockIdx.x * RN_ROWS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return; // the whole warp
    const long o = r * C;
    const float inv = inv_rms[r];
    float m = 0.f;
    if (C % 4 == 0) {
        for (int c = 4 * lane; c < C; c += 128) {
            const float4 v = get4(x, o + c), d = get4(dy, o + c), g = *(const float4*)(w + c);
            m += d.x * g.x * v.x * inv + d.y * g.y * v.y * inv + d.z * g.z * v.z * inv + d.w * g.w * v.w * inv;
        }
    } else {
        for (int c = lane; c < C; c += 32) m += dy[o + c] * w[c] * get(x, o + c) * inv;
    }
    m = warp_sum(m) / (float)C;
    if (C % 4 == 0) {
        for (int c = 4 * lane; c < C; c += 128) {
            const float4 v = get4(x, o + c), d = get4(dy, o + c), g = *(const float4*)(w + c);
            put4(dx, o + c,
                 make_float4((d.x * g.x - v.x * inv * m) * inv, (d.y * g.y - v.y * inv * m) * inv,
                             (d.z * g.z - v.z * inv * m) * inv, (d.w * g.w - v.w * inv * m) * inv));
        }
    } else {
        for (int c = lane; c < C; c += 32) put(dx, o + c, (dy[o + c] * w[c] - get(x, o + c) * inv * m) * inv);
    }
}
extern "C" __global__ void rmsnorm_bwd_dx(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ inv_rms, const float* __restrict__ dy, int R,
                                          int C, float* __restrict__ dx)
{ rmsnorm_bwd_dx_impl(x, w, inv_rms, dy, R, C, dx); }
extern "C" __global__ void rmsnorm_bwd_dx_bs(const bs_t* __restrict__ x, const float* __restrict__ w,
                                             const float* __restrict__ inv_rms, const float* __restrict__ dy, int R,
                                             int C, bs_t* __restrict__ dx)
{ rmsnorm_bwd_dx_impl(x, w, inv_rms, dy, R, C, dx); }

// dw[c] += Σ_r dy[r, c]·x[r, c]·inv_rms[r] in two deterministic passes: blocks of
// 32 columns × 8 row lanes sum one chunk of rows each (fixed order) into
// part[chunk, c]; rmsnorm_bwd_dw_sum adds the chunks in order.
template <typename X>
__device__ __forceinline__ void rmsnorm_bwd_dw_part_impl(const X* __restrict__ x, const float* __restrict__ inv_rms,
                                                         const float* __restrict__ dy, int R, int C,
                                                         int rows_per_chunk, float* __restrict__ part)
{
    __shared__ float sh[8][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx;
    const long r0 = (long)blockIdx.y * rows_per_chunk;
    const long r1 = r0 + rows_per_chunk < (long)R ? r0 + rows_per_chunk : (long)R;
    float s = 0.f;
    if (c < C)
        for (long r = r0 + ty; r < r1; r += 8) s += dy[r * C + c] * get(x, r * C + c) * inv_rms[r];
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += sh[k][tx];
        part[(long)blockIdx.y * C + c] = t;
    }
}
extern "C" __global__ void rmsnorm_bwd_dw_part(const float* __restrict__ x, const float* __restrict__ inv_rms,
                                               const float* __restrict__ dy, int R, int C, int rows_per_chunk,
                                               float* __restrict__ part)
{ rmsnorm_bwd_dw_part_impl(x, inv_rms, dy, R, C, rows_per_chunk, part); }
extern "C" __global__ void rmsnorm_bwd_dw_part_bs(const bs_t* __restrict__ x, const float* __restrict__ inv_rms,
                                                  const float* __restrict__ dy, int R, int C, int rows_per_chunk,
                                                  float* __restrict__ part)
{ rmsnorm_bwd_dw_part_impl(x, inv_rms, dy, R, C, rows_per_chunk, part); }

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

__device__ __forceinline__ float gelu_f(float v) { return 0.5f * v * (1.f + tanhf(GELU_K * (v + GELU_A * v * v * v))); }
// gelu'(v)
__device__ __forceinline__ float gelu_d(float v) {
    const float t = tanhf(GELU_K * (v + GELU_A * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_K * (1.f + 3.f * GELU_A * v * v);
}

// Grid-stride over groups of four elements (16-byte loads), then the tail of len % 4.
template <typename T>
__device__ __forceinline__ void gelu_fwd_impl(const float* __restrict__ u, long len, T* __restrict__ a)
{
    const long i0 = (long)blockIdx.x * blockDim.x + threadIdx.x, step = (long)gridDim.x * blockDim.x;
    for (long q = i0; q < len / 4; q += step) {
        const float4 v = *(const float4*)(u + 4 * q);
        put4(a, 4 * q, make_float4(gelu_f(v.x), gelu_f(v.y), gelu_f(v.z), gelu_f(v.w)));
    }
    for (long e = len / 4 * 4 + i0; e < len; e += step) put(a, e, gelu_f(u[e]));
}
extern "C" __global__ void gelu_fwd(const float* __restrict__ u, long len, float* __restrict__ a)
{ gelu_fwd_impl(u, len, a); }
extern "C" __global__ void gelu_fwd_bf16(const float* __restrict__ u, long len, unsigned short* __restrict__ a)
{ gelu_fwd_impl(u, len, a); }

// du = da · gelu'(u), as the forward: groups of four, then the tail.
template <typename T>
__device__ __forceinline__ void gelu_bwd_impl(const float* __restrict__ u, const float* __restrict__ da, long len,
                                              T* __restrict__ du)
{
    const long i0 = (long)blockIdx.x * blockDim.x + threadIdx.x, step = (long)gridDim.x * blockDim.x;
    for (long q = i0; q < len / 4; q += step) {
        const float4 v = *(const float4*)(u + 4 * q), g = *(const float4*)(da + 4 * q);
        put4(du, 4 * q, make_float4(g.x * gelu_d(v.x), g.y * gelu_d(v.y), g.z * gelu_d(v.z), g.w * gelu_d(v.w)));
    }
    for (long e = len / 4 * 4 + i0; e < len; e += step) put(du, e, da[e] * gelu_d(u[e]));
}
extern "C" __global__ void gelu_bwd(const float* __restrict__ u, const float* __restrict__ da, long len, float* __restrict__ du)
{ gelu_bwd_impl(u, da, len, du); }
extern "C" __global__ void gelu_bwd_bf16(const float* __restrict__ u, const float* __restrict__ da, long len,
                                         unsigned short* __restrict__ du)
{ gelu_bwd_impl(u, da, len, du); }

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
template <bool W16>
__device__ __forceinline__ void adamw_impl(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, long len, float lr, float b1, float b2, float eps,
                                           float shrink, float inv_bc1, float inv_bc2, float gscale,
                                           unsigned short* __restrict__ w16)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x) {
        float gv = g[e] * gscale;
        float mv = b1 * m[e] + (1.f - b1) * gv;
        float vv = b2 * v[e] + (1.f - b2) * gv * gv;
        m[e] = mv;
        v[e] = vv;
        float wv = w[e] * shrink - lr * inv_bc1 * mv / (sqrtf(vv * inv_bc2) + eps);
        w[e] = wv;
        if (W16) w16[e] = (unsigned short)bf16_bits(wv);
    }
}
extern "C" __global__ void adamw(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, long len, float lr, float b1, float b2, float eps,
                                 float shrink, float inv_bc1, float inv_bc2, float gscale)
{
    adamw_impl<false>(w, g, m, v, len, lr, b1, b2, eps, shrink, inv_bc1, inv_bc2, gscale, nullptr);
}
// adamw_bf16: adamw, and the updated weights rounded to bf16 into w16 (the
// product operand, made once per step instead of once per product).
extern "C" __global__ void adamw_bf16(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, long len, float lr, float b1, float b2, float eps,
                                      float shrink, float inv_bc1, float inv_bc2, float gscale,
                                      unsigned short* __restrict__ w16)
{
    adamw_impl<true>(w, g, m, v, len, lr, b1, b2, eps, shrink, inv_bc1, inv_bc2, gscale, w16);
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
template <typename X>
__device__ __forceinline__ void embed_fwd_impl(const unsigned int* __restrict__ tokens, const float* __restrict__ E,
                                               const float* __restrict__ P, long R, int S, int NS, int C,
                                               X* __restrict__ x0)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < R * NS * C; e += (long)gridDim.x * blockDim.x) {
        long r = e / ((long)NS * C);
        int c = (int)(e % C);
        put(x0, e, E[(long)tokens[r] * C + c] + P[(r % S) * C + c]);
    }
}

// dE[v, c] += Σ_{r in rows_of[v]} Σ_s dx0[r, s, c] with a CSR list of the rows of each token
// (row_start [V+1], rows [R], built on the host in row order: deterministic).
template <typename X>
__device__ __forceinline__ void embed_bwd_tokens_impl(const X* __restrict__ dx0, const unsigned int* __restrict__ row_start,
                                                      const unsigned int* __restrict__ rows, int V, int NS, int C,
                                                      float* __restrict__ dE)
{
    long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)V * C) return;
    int v = (int)(e / C), c = (int)(e % C);
    float s = 0.f;
    for (unsigned int i = row_start[v]; i < row_start[v + 1]; ++i) {
        long r = rows[i];
        for (int st = 0; st < NS; ++st) s += get(dx0, (r * NS + st) * C + c);
    }
    dE[e] += s;
}

// dP[p, c] += Σ_b Σ_s dx0[b·S + p, s, c].
template <typename X>
__device__ __forceinline__ void embed_bwd_positions_impl(const X* __restrict__ dx0, int B, int S, int NS, int C,
                                                         float* __restrict__ dP)
{
    long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)S * C) return;
    int p = (int)(e / C), c = (int)(e % C);
    float s = 0.f;
    for (int b = 0; b < B; ++b)
        for (int st = 0; st < NS; ++st) s += get(dx0, (((long)b * S + p) * NS + st) * C + c);
    dP[e] += s;
}

// z[r, c] = mean_s x[r, s, c]
template <typename X>
__device__ __forceinline__ void streams_mean_impl(const X* __restrict__ x, long R, int NS, int C, float* __restrict__ z)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < R * C; e += (long)gridDim.x * blockDim.x) {
        long r = e / C;
        int c = (int)(e % C);
        float s = 0.f;
        for (int st = 0; st < NS; ++st) s += get(x, (r * NS + st) * C + c);
        z[e] = s / (float)NS;
    }
}

// dx[r, s, c] = dz[r, c] / NS
template <typename X>
__device__ __forceinline__ void streams_mean_bwd_impl(const float* __restrict__ dz, long R, int NS, int C, X* __restrict__ dx)
{
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < R * NS * C; e += (long)gridDim.x * blockDim.x) {
        long r = e / ((long)NS * C);
        int c = (int)(e % C);
        put(dx, e, dz[r * C + c] / (float)NS);
    }
}

// out = a + b (the residual connection's merge, and gradient sums): groups of four, then the tail.
template <typename X>
__device__ __forceinline__ void add_impl(const X* __restrict__ a, const X* __restrict__ b, long len, X* __restrict__ out)
{
    const long i0 = (long)blockIdx.x * blockDim.x + threadIdx.x, step = (long)gridDim.x * blockDim.x;
    for (long q = i0; q < len / 4; q += step) {
        const float4 u = get4(a, 4 * q), v = get4(b, 4 * q);
        put4(out, 4 * q, make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w));
    }
    for (long e = len / 4 * 4 + i0; e < len; e += step) put(out, e, get(a, e) + get(b, e));
}

// The f32-stream kernels and their bf16-stream (`_bs`) twins.
#define STREAM_KERNELS(SFX, X)                                                                                       \
    extern "C" __global__ void embed_fwd##SFX(const unsigned int* __restrict__ tokens, const float* __restrict__ E,   \
                                              const float* __restrict__ P, long R, int S, int NS, int C,             \
                                              X* __restrict__ x0)                                                    \
    { embed_fwd_impl(tokens, E, P, R, S, NS, C, x0); }                                                               \
    extern "C" __global__ void embed_bwd_tokens##SFX(const X* __restrict__ dx0,                                      \
                                                     const unsigned int* __restrict__ row_start,                     \
                                                     const unsigned int* __restrict__ rows, int V, int NS, int C,    \
                                                     float* __restrict__ dE)                                         \
    { embed_bwd_tokens_impl(dx0, row_start, rows, V, NS, C, dE); }                                                   \
    extern "C" __global__ void embed_bwd_positions##SFX(const X* __restrict__ dx0, int B, int S, int NS, int C,     \
                                                        float* __restrict__ dP)                                      \
    { embed_bwd_positions_impl(dx0, B, S, NS, C, dP); }                                                              \
    extern "C" __global__ void streams_mean##SFX(const X* __restrict__ x, long R, int NS, int C, float* __restrict__ z) \
    { streams_mean_impl(x, R, NS, C, z); }                                                                           \
    extern "C" __global__ void streams_mean_bwd##SFX(const float* __restrict__ dz, long R, int NS, int C,           \
                                                     X* __restrict__ dx)                                             \
    { streams_mean_bwd_impl(dz, R, NS, C, dx); }                                                                     \
    extern "C" __global__ void add##SFX(const X* __restrict__ a, const X* __restrict__ b, long len, X* __restrict__ out) \
    { add_impl(a, b, len, out); }
STREAM_KERNELS(, float)
STREAM_KERNELS(_bs, bs_t)

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

// ---------------------------------------------------------------------------
// Flash attention (FlashAttention-2 style): causal attention of qkv [B, S, 3C]
// (bf16 copies; q at column h·D, k at C + h·D, v at 2C + h·D) without
// materialising the S×S scores. bf16 tensor-core products (mma.sync m16n8k16, f32 accumulation),
// online softmax in f32 in the log2 domain. One block = 4 warps = 64 query rows
// (forward, dQ) or 64 key rows (dK/dV); tiles of 64 keys/queries are staged in
// shared memory, row-major, by cp.async into two buffers (the next tile loads
// while this one is used); operands needed transposed are read with ldmatrix.trans.
// The forward keeps L = m + log2(l) per row (scaled-log2 units) for the
// backward, which recomputes P = 2^(S·scale·log2e − L). dQ and dK/dV are two
// kernels so that no atomics are needed: the result is deterministic.
// Fragment layouts (PTX ISA, mma.m16n8k16): g = lane/4, t = lane%4;
//   A (16×16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16×8, col):  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C (16×8):       c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// ---------------------------------------------------------------------------
#define FA_T 64          // rows of a query tile and of a key tile
#define FA_THREADS 128   // threads of every flash block (the host launches 4 warps)
// The backward kernels form S and dP over FA_QW columns of a tile at a time
// (64: the whole tile; 32: two halves, half the live registers), and the
// kernels aim for FA_MINB_* resident blocks per SM (tunable through
// MHC_CUDA_DEFINES). Measured on the H200 (d = 768, head 64, Nsight Compute):
// dK/dV 515 → 464 µs with halves (255 → 201 registers), → 438 µs with 3 blocks
// (168 registers); dQ 350 → 324 → 293 µs; 4 blocks (128 registers) were slower.
// Heads of more than 64 dimensions keep whole tiles and no bound: with both
// knobs the d = 2048 step (heads of 128) went from 76 to 84 ms.
#ifndef FA_QW
#define FA_QW 32
#endif
#ifndef FA_MINB_DKV
#define FA_MINB_DKV 3
#endif
#ifndef FA_MINB_DQ
#define FA_MINB_DQ 3
#endif
#ifndef FA_MINB_FWD
#define FA_MINB_FWD 1
#endif
// The backward kernels hold their block's own rows (K, V for dK/dV; Q, dO for
// dQ) as register fragments up to this head dimension, in shared memory above
// it. The host sizes shared memory from the same value (it reads the define
// from MHC_CUDA_DEFINES), and the kernels trap if given less.
#ifndef FA_REG_ROWS_MAX_D
#define FA_REG_ROWS_MAX_D 64
#endif
// FA_LDSM 1: the A·Bᵀ products read their smem fragments with ldmatrix.x4 (one
// instruction per four 32-bit reads of the LDS path; the same registers, so the
// same results bit for bit). Measured on the H200 (scripts/gpu-ab.sh): the d = 768
// step 33.4 → 32.8 ms, the same weights after 40 steps; FA_LDSM=0 keeps the 32-bit loads.
#ifndef FA_LDSM
#define FA_LDSM 1
#endif
#define FA_INF __int_as_float(0x7f800000)
#define FA_LOG2E 1.4426950408889634f

// bf16(lo) in the low half, bf16(hi) in the high half (one cvt; mma.sync needs sm_80 anyway).
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// 2^x by the MUFU unit alone (flushes results below 2^-126 to zero; exp2f adds
// three instructions to keep them).
__device__ __forceinline__ float fa_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
// Two adjacent results at element e of an f32 and/or a bf16 output (either may be null).
__device__ __forceinline__ void fa_put2(float* f, unsigned short* h, long e, float x, float y) {
    if (f) *(float2*)(f + e) = make_float2(x, y);
    if (h) *(unsigned*)(h + e) = fa_pack(x, y);
}
__device__ __forceinline__ unsigned fa_ld32(const unsigned short* p) { return *(const unsigned*)p; }
__device__ __forceinline__ void fa_mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The shared-state-space address of a pointer into shared memory (the compiler
// folds it into the address arithmetic; an inline cvta would hide it).
__device__ __forceinline__ unsigned fa_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
// 16 bytes global → shared, asynchronously; zero-filled when !valid (nothing is read).
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void fa_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Traps when the launch gave less dynamic shared memory than the layout needs.
__device__ __forceinline__ void fa_need_smem(unsigned bytes) {
    unsigned avail;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(avail));
    if (avail < bytes) asm volatile("trap;");
}

// B fragments of the n-tiles [n0, n0 + 8) and [n0 + 8, n0 + 16) for k rows
// [k0, k0 + 16) of a row-major smem matrix M [k][stride] (ldmatrix.trans).
__device__ __forceinline__ void fa_ldsm_t4(const unsigned short* M, int stride, int k0, int n0, unsigned* b) {
    const int l = threadIdx.x & 31, mi = l >> 3, ri = l & 7;
    const unsigned short* p = M + (k0 + (mi & 1) * 8 + ri) * stride + n0 + (mi >> 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
}

// B fragments of the n-tiles [n0, n0 + 8) and [n0 + 8, n0 + 16) for k columns
// [k0, k0 + 16) of a row-major smem matrix M [n][stride] (ldmatrix, no transpose):
// b[0], b[1] of the first n-tile, b[2], b[3] of the second.
__device__ __forceinline__ void fa_ldsm4(const unsigned short* M, int stride, int n0, int k0, unsigned* b) {
    const int l = threadIdx.x & 31, mi = l >> 3, ri = l & 7;
    const unsigned short* p = M + (n0 + (mi >> 1) * 8 + ri) * stride + k0 + (mi & 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
}

// The A fragment of rows [0, 16) × k columns [16·kc, 16·kc + 16) of a row-major bf16 smem matrix.
__device__ __forceinline__ void fa_frag_a(const unsigned short* M, int stride, int kc, unsigned* a) {
#if FA_LDSM
    const int l = threadIdx.x & 31, mi = l >> 3, ri = l & 7;
    const unsigned short* p = M + ((mi & 1) * 8 + ri) * stride + 16 * kc + (mi >> 1) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
#else
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned short* p = M + g * stride + 16 * kc + 2 * t;
    a[0] = fa_ld32(p);
    a[1] = fa_ld32(p + 8 * stride);
    a[2] = fa_ld32(p + 8);
    a[3] = fa_ld32(p + 8 * stride + 8);
#endif
}

// acc[nt], nt < NT (16 × 8·NT) += a · Bᵀ for the 16 k columns [16·kc, 16·kc + 16):
// B a row-major smem tile [8·NT][D + 8].
template <int D, int NT>
__device__ __forceinline__ void fa_mma_abt_kc(float (*acc)[4], const unsigned* a, const unsigned short* B, int kc)
{
#if FA_LDSM
    static_assert(NT % 2 == 0, "ldmatrix.x4 reads n-tiles in pairs");
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
        unsigned b[4];
        fa_ldsm4(B, D + 8, 16 * np, 16 * kc, b);
        fa_mma(acc[2 * np], a, b[0], b[1]);
        fa_mma(acc[2 * np + 1], a, b[2], b[3]);
    }
#else
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const unsigned short* b = B + (nt * 8 + g) * (D + 8) + 16 * kc + 2 * t;
        fa_mma(acc[nt], a, fa_ld32(b), fa_ld32(b + 8));
    }
#endif
}

// Starts copying rows [r0, r0 + 64) × columns [col, col + D) of a row-major bf16
// matrix (row stride ld) into smem `rm` [64][D + 8]; rows ≥ S become zeros.
template <int D>
__device__ __forceinline__ void fa_stage(const unsigned short* __restrict__ src, long ld, int r0, int S, int col,
                                         unsigned short* rm)
{
    constexpr int CPR = D / 8, RPP = FA_THREADS / CPR; // 16-byte chunks per row, rows per pass
    static_assert(FA_THREADS % CPR == 0 && FA_T % RPP == 0, "fa_stage: tile rows per pass");
    const int r = threadIdx.x / CPR, d = (threadIdx.x % CPR) * 8;
    const unsigned short* s = src + (long)(r0 + r) * ld + col + d;
#pragma unroll
    for (int i = 0; i < FA_T / RPP; ++i) {
        const bool valid = r0 + r + i * RPP < S;
        fa_cp16(rm + (r + i * RPP) * (D + 8) + d, valid ? s + (long)i * RPP * ld : src, valid);
    }
}

// Makes key/value tile kt of a double buffer `bufs` (two × (K, V) [64][D + 8]
// bf16, tile kt in buffer kt & 1) ready for the whole block: first starts
// copying tile kt + 1 into the other buffer when kt < last, then waits for kt.
template <int D>
__device__ __forceinline__ void fa_kv_tile(const unsigned short* __restrict__ base, long ld, int S,
                                                            int C, int h, int kt, int last, unsigned short* bufs)
{
    const int TS = FA_T * (D + 8);
    if (kt < last) {
        unsigned short* next = bufs + ((kt + 1) & 1) * 2 * TS;
        fa_stage<D>(base, ld, (kt + 1) * FA_T, S, C + h * D, next);
        fa_stage<D>(base, ld, (kt + 1) * FA_T, S, 2 * C + h * D, next + TS);
        fa_commit();
        fa_wait<1>();
    } else {
        fa_wait<0>();
    }
    __syncthreads();
}

// A fragments of 16 rows × D columns (bf16, row stride ld; rows ≥ S are zero) from global memory.
template <int D>
__device__ __forceinline__ void fa_frag_a_global(const unsigned short* __restrict__ src, long ld, int row, int S,
                                                 unsigned (*a)[4])
{
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned short* p0 = src + (long)(row + g) * ld + 2 * t;
    const unsigned short* p1 = src + (long)(row + g + 8) * ld + 2 * t;
    const bool v0 = row + g < S, v1 = row + g + 8 < S;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        a[kc][0] = v0 ? fa_ld32(p0 + 16 * kc) : 0u;
        a[kc][1] = v1 ? fa_ld32(p1 + 16 * kc) : 0u;
        a[kc][2] = v0 ? fa_ld32(p0 + 16 * kc + 8) : 0u;
        a[kc][3] = v1 ? fa_ld32(p1 + 16 * kc + 8) : 0u;
    }
}

__device__ __forceinline__ void fa_zero8(float (*x)[4]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.f;
}

// acc (16 × 8·NT) += A · Bᵀ: A = 16 rows × D (register fragments), B a row-major smem tile [8·NT][D + 8].
template <int D, int NT = 8>
__device__ __forceinline__ void fa_mma_abt(float (*acc)[4], const unsigned (*a)[4], const unsigned short* B)
{
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) fa_mma_abt_kc<D, NT>(acc, a[kc], B, kc);
}

// As fa_mma_abt, with A read from a row-major smem matrix (16 rows from `A`, stride D + 8).
template <int D, int NT = 8>
__device__ __forceinline__ void fa_mma_abt_s(float (*acc)[4], const unsigned short* A, const unsigned short* B)
{
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        unsigned a[4];
        fa_frag_a(A, D + 8, kc, a);
        fa_mma_abt_kc<D, NT>(acc, a, B, kc);
    }
}

// acc (16 × D) += P · V: P (16 × 16·KC) in C-fragment registers, V a row-major smem tile [16·KC][D + 8].
template <int D, int KC = FA_T / 16>
__device__ __forceinline__ void fa_mma_pv(float (*acc)[4], const float (*p)[4], const unsigned short* V)
{
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
        const unsigned a[4] = {fa_pack(p[2 * kc][0], p[2 * kc][1]), fa_pack(p[2 * kc][2], p[2 * kc][3]),
                               fa_pack(p[2 * kc + 1][0], p[2 * kc + 1][1]), fa_pack(p[2 * kc + 1][2], p[2 * kc + 1][3])};
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
            unsigned b[4];
            fa_ldsm_t4(V, D + 8, 16 * kc, 16 * np, b);
            fa_mma(acc[2 * np], a, b[0], b[1]);
            fa_mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// The backward's two score products for one part of a tile: s = A·Xᵀ and
// dp = B·Yᵀ (16 own rows × W columns), with the own rows A, B as register
// fragments (ra, rb) or, when SMEM, as the warp's 16 rows of smem tiles (sa, sb).
template <int D, int W, bool SMEM>
__device__ __forceinline__ void fa_scores(float (*s)[4], float (*dp)[4], const unsigned (*ra)[4],
                                          const unsigned (*rb)[4], const unsigned short* sa,
                                          const unsigned short* sb, const unsigned short* X, const unsigned short* Y)
{
#pragma unroll
    for (int i = 0; i < W / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    if constexpr (SMEM) {
        fa_mma_abt_s<D, W / 8>(s, sa, X);
        fa_mma_abt_s<D, W / 8>(dp, sb, Y);
    } else {
        fa_mma_abt<D, W / 8>(s, ra, X);
        fa_mma_abt<D, W / 8>(dp, rb, Y);
    }
}

// Forward. grid (ceil(S/64), B·H), 128 threads, smem 4·64·(D+8) bf16 (K and V, two buffers);
// out [B, S, C] f32; lse [B·H, S] = m + log2(l) in units of log2 of the scaled scores.
template <int D>
__device__ __forceinline__ void flash_fwd_impl(const unsigned short* __restrict__ qkv, int S, int H, float scale,
                                               float* __restrict__ out, unsigned short* __restrict__ out16,
                                               float* __restrict__ lse)
{
    extern __shared__ __align__(16) unsigned short fa_smem[];
    const int TS = FA_T * (D + 8);
    const int C = H * D;
    const long ld = 3L * C;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int qt = gridDim.x - 1 - blockIdx.x; // the longest (diagonal-most) tiles first
    const int q0 = qt * FA_T, warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned short* base = qkv + (long)b * S * ld;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    fa_stage<D>(base, ld, 0, S, C + h * D, fa_smem);
    fa_stage<D>(base, ld, 0, S, 2 * C + h * D, fa_smem + TS);
    fa_commit();
    unsigned qa[D / 16][4];
    fa_frag_a_global<D>(base + h * D, ld, q0 + warp * 16, S, qa);
    const float sl = scale * FA_LOG2E;
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -FA_INF, m1 = -FA_INF, l0 = 0.f, l1 = 0.f;
    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_T;
        const unsigned short* Ks = fa_smem + (kt & 1) * 2 * TS;
        const unsigned short* Vs = Ks + TS;
        fa_kv_tile<D>(base, ld, S, C, h, kt, qt, fa_smem);
        float s[8][4];
        fa_zero8(s);
        fa_mma_abt<D>(s, qa, Ks);
        const bool edge = kt == qt || k0 + FA_T > S;
        float mx0 = -FA_INF, mx1 = -FA_INF;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + nt * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                float v = s[nt][e] * sl;
                if (edge && (key > row || key >= S)) v = -FA_INF;
                s[nt][e] = v;
                if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
            }
        // Key 0 is in the first tile and at or below every row: the maxima are finite from then on.
        const float n0 = fmaxf(m0, fa_quad_max(mx0)), n1 = fmaxf(m1, fa_quad_max(mx1));
        const float al0 = fa_exp2(m0 - n0), al1 = fa_exp2(m1 - n1);
        m0 = n0;
        m1 = n1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            s[nt][0] = fa_exp2(s[nt][0] - n0);
            s[nt][1] = fa_exp2(s[nt][1] - n0);
            s[nt][2] = fa_exp2(s[nt][2] - n1);
            s[nt][3] = fa_exp2(s[nt][3] - n1);
            sum0 += s[nt][0] + s[nt][1];
            sum1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * al0 + fa_quad_sum(sum0);
        l1 = l1 * al1 + fa_quad_sum(sum1);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= al0;
            o[i][1] *= al0;
            o[i][2] *= al1;
            o[i][3] *= al1;
        }
        fa_mma_pv<D>(o, s, Vs);
        __syncthreads(); // this buffer is refilled next iteration
    }
    const float i0 = 1.f / l0, i1 = 1.f / l1;
    const long ob = (long)b * S * C + h * D + 2 * t;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        const float2 v0 = make_float2(o[nt][0] * i0, o[nt][1] * i0), v1 = make_float2(o[nt][2] * i1, o[nt][3] * i1);
        const long e0 = ob + (long)r0 * C + nt * 8, e1 = ob + (long)r1 * C + nt * 8;
        if (r0 < S) *(float2*)(out + e0) = v0;
        if (r1 < S) *(float2*)(out + e1) = v1;
        if (out16 && r0 < S) *(unsigned*)(out16 + e0) = fa_pack(v0.x, v0.y);
        if (out16 && r1 < S) *(unsigned*)(out16 + e1) = fa_pack(v1.x, v1.y);
    }
    if (t == 0) {
        if (r0 < S) lse[(long)bh * S + r0] = m0 + log2f(l0);
        if (r1 < S) lse[(long)bh * S + r1] = m1 + log2f(l1);
    }
}

// dvec [B·H, S] = Σ_d dO·O per row (one warp per row, grid-stride), and dout16 = bf16(dO).
extern "C" __global__ void flash_bwd_dot(const float* __restrict__ o, const float* __restrict__ dout, int B, int S,
                                         int H, int D, float* __restrict__ dvec, unsigned short* __restrict__ dout16)
{
    const long rows = (long)B * H * S;
    const int lane = threadIdx.x & 31;
    for (long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += (long)gridDim.x * (blockDim.x >> 5)) {
        const long bh = r / S;
        const int i = (int)(r % S), b = (int)(bh / H), h = (int)(bh % H);
        const long off = ((long)b * S + i) * (long)H * D + (long)h * D;
        float acc = 0.f;
        for (int d = lane; d < D; d += 32) {
            const float g = dout[off + d];
            acc += o[off + d] * g;
            dout16[off + d] = (unsigned short)bf16_bits(g);
        }
        acc = warp_sum(acc);
        if (lane == 0) dvec[r] = acc;
    }
}

// Starts loading query tile qt (its rows of q and dO, L and dvec) into buffer `buf`
// of the dK/dV kernel (two × (Q [64][D+8], dO [64][D+8]) bf16, then two × (L, dvec) [64] f32).
template <int D>
__device__ __forceinline__ void fa_stage_queries(const unsigned short* __restrict__ base, long ld,
                                                 const unsigned short* __restrict__ dob, int C, int h,
                                                 const float* __restrict__ lse, const float* __restrict__ dvec,
                                                 long bh, int S, int qt, int buf, unsigned short* bufs, float* stats)
{
    const int TS = FA_T * (D + 8), q0 = qt * FA_T;
    fa_stage<D>(base, ld, q0, S, h * D, bufs + buf * 2 * TS);
    fa_stage<D>(dob, C, q0, S, h * D, bufs + buf * 2 * TS + TS);
    float* st = stats + buf * 2 * FA_T;
    for (int i = threadIdx.x; i < FA_T; i += blockDim.x) {
        const bool in = q0 + i < S;
        st[i] = in ? lse[bh * S + q0 + i] : FA_INF;
        st[FA_T + i] = in ? dvec[bh * S + q0 + i] : 0.f;
    }
}

// dK, dV. grid (ceil(S/64) key tiles, B·H), 128 threads; smem 4·64·(D+8) bf16 + 4·64 f32,
// plus 2·64·(D+8) bf16 for the block's keys and values when D > FA_REG_ROWS_MAX_D
// (smaller heads keep them in registers). Each warp owns 16 keys and walks the
// query tiles at or after the diagonal; writes the k and v columns of dqkv (f32).
template <int D>
__device__ __forceinline__ void flash_bwd_dkv_impl(const unsigned short* __restrict__ qkv,
                                                   const unsigned short* __restrict__ dout,
                                                   const float* __restrict__ lse, const float* __restrict__ dvec,
                                                   int S, int H, float scale, float* __restrict__ dqkv,
                                                   unsigned short* __restrict__ dqkv16)
{
    constexpr bool KV_SMEM = D > FA_REG_ROWS_MAX_D;
    constexpr int QW = D > 64 ? FA_T : FA_QW; // halves measured at D = 64 only
    extern __shared__ __align__(16) unsigned short fa_smem[];
    const int RS = D + 8, TS = FA_T * RS;
    unsigned short* bufs = fa_smem;                                 // two × (query tile, its dO)
    float* stats = (float*)(bufs + 4 * TS);                         // two × (L [64], dvec [64])
    unsigned short* Kb = (unsigned short*)(stats + 4 * FA_T);       // KV_SMEM: this block's keys
    unsigned short* Vb = Kb + TS;                                   // and values
    constexpr unsigned SMEM_NEED = (4 + (KV_SMEM ? 2 : 0)) * FA_T * (D + 8) * 2 + 4 * FA_T * 4;
#ifdef EXPECT_FA_D // the host's size (model_ops.rs, flash_backward_smem), checked by its unit test
    static_assert(D != EXPECT_FA_D || SMEM_NEED == EXPECT_FA_SMEM_DKV, "host and dK/dV kernel disagree on smem");
#endif
    fa_need_smem(SMEM_NEED);
    const int C = H * D;
    const long ld = 3L * C;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int tiles = (S + FA_T - 1) / FA_T;
    const int kt = blockIdx.x, k0 = kt * FA_T; // low key tiles walk the most query tiles: first
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned short* base = qkv + (long)b * S * ld;
    const unsigned short* dob = dout + (long)b * S * C;
    const int kr0 = k0 + warp * 16 + g, kr1 = kr0 + 8;
    unsigned ka[KV_SMEM ? 1 : D / 16][4], va[KV_SMEM ? 1 : D / 16][4];
    if constexpr (KV_SMEM) {
        fa_stage<D>(base, ld, k0, S, C + h * D, Kb);
        fa_stage<D>(base, ld, k0, S, 2 * C + h * D, Vb);
    }
    fa_stage_queries<D>(base, ld, dob, C, h, lse, dvec, bh, S, kt, 0, bufs, stats);
    fa_commit();
    if constexpr (!KV_SMEM) {
        fa_frag_a_global<D>(base + C + h * D, ld, k0 + warp * 16, S, ka);
        fa_frag_a_global<D>(base + 2 * C + h * D, ld, k0 + warp * 16, S, va);
    }
    const float sl = scale * FA_LOG2E;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
    for (int qt = kt; qt < tiles; ++qt) {
        const int q0 = qt * FA_T, buf = (qt - kt) & 1;
        if (qt + 1 < tiles) {
            fa_stage_queries<D>(base, ld, dob, C, h, lse, dvec, bh, S, qt + 1, buf ^ 1, bufs, stats);
            fa_commit();
            fa_wait<1>();
        } else {
            fa_wait<0>();
        }
        __syncthreads();
        const unsigned short* Qs = bufs + buf * 2 * TS;
        const unsigned short* dOs = Qs + TS;
        const float* Ls = stats + buf * 2 * FA_T;
        const float* Ds = Ls + FA_T;
        const bool edge = qt == kt || q0 + FA_T > S; // only the diagonal tile and a partial last tile mask
        // Sᵀ (16 keys × QW queries) = K·Qᵀ and dPᵀ = V·dOᵀ, over the query tile
        // in FA_T / QW parts (the same products in the same order; fewer live registers).
#pragma unroll
        for (int part = 0; part < FA_T / QW; ++part) {
            const int qb = part * QW;
            float s[QW / 8][4], dp[QW / 8][4];
            fa_scores<D, QW, KV_SMEM>(s, dp, ka, va, Kb + warp * 16 * RS, Vb + warp * 16 * RS, Qs + qb * RS,
                                      dOs + qb * RS);
#pragma unroll
            for (int nt = 0; nt < QW / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = qb + nt * 8 + 2 * t + (e & 1), key = e < 2 ? kr0 : kr1;
                    const bool in = !edge || (q0 + qi >= key && q0 + qi < S);
                    const float p = in ? fa_exp2(s[nt][e] * sl - Ls[qi]) : 0.f;
                    s[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - Ds[qi]);
                }
            fa_mma_pv<D, QW / 16>(dv, s, dOs + qb * RS); // dV += Pᵀ·dO
            fa_mma_pv<D, QW / 16>(dk, dp, Qs + qb * RS); // dK += dSᵀ·Q (scaled below)
        }
        __syncthreads(); // this buffer is refilled next iteration
    }
    const long db = (long)b * S * ld + h * D + 2 * t;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        if (kr0 < S) {
            fa_put2(dqkv, dqkv16, db + (long)kr0 * ld + C + nt * 8, dk[nt][0] * scale, dk[nt][1] * scale);
            fa_put2(dqkv, dqkv16, db + (long)kr0 * ld + 2 * C + nt * 8, dv[nt][0], dv[nt][1]);
        }
        if (kr1 < S) {
            fa_put2(dqkv, dqkv16, db + (long)kr1 * ld + C + nt * 8, dk[nt][2] * scale, dk[nt][3] * scale);
            fa_put2(dqkv, dqkv16, db + (long)kr1 * ld + 2 * C + nt * 8, dv[nt][2], dv[nt][3]);
        }
    }
}

// dQ. grid (ceil(S/64) query tiles, B·H), 128 threads; smem 4·64·(D+8) bf16, plus
// 2·64·(D+8) for the block's queries and their dO when D > FA_REG_ROWS_MAX_D
// (smaller heads keep them in registers). Each warp owns 16 queries and walks the key tiles at or below the
// diagonal; writes the q columns of dqkv (f32).
template <int D>
__device__ __forceinline__ void flash_bwd_dq_impl(const unsigned short* __restrict__ qkv,
                                                  const unsigned short* __restrict__ dout,
                                                  const float* __restrict__ lse, const float* __restrict__ dvec,
                                                  int S, int H, float scale, float* __restrict__ dqkv,
                                                  unsigned short* __restrict__ dqkv16)
{
    constexpr bool Q_SMEM = D > FA_REG_ROWS_MAX_D;
    constexpr int QW = D > 64 ? FA_T : FA_QW; // halves measured at D = 64 only
    extern __shared__ __align__(16) unsigned short fa_smem[];
    const int RS = D + 8, TS = FA_T * RS;
    unsigned short* bufs = fa_smem;     // two × (key tile, its values)
    unsigned short* Qb = bufs + 4 * TS; // Q_SMEM: this block's queries
    unsigned short* dOb = Qb + TS;      // and their output gradient
    constexpr unsigned SMEM_NEED = (4 + (Q_SMEM ? 2 : 0)) * FA_T * (D + 8) * 2;
#ifdef EXPECT_FA_D
    static_assert(D != EXPECT_FA_D || SMEM_NEED == EXPECT_FA_SMEM_DQ, "host and dQ kernel disagree on smem");
#endif
    fa_need_smem(SMEM_NEED);
    const int C = H * D;
    const long ld = 3L * C;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_T;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const unsigned short* base = qkv + (long)b * S * ld;
    const unsigned short* dob = dout + (long)b * S * C;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    if constexpr (Q_SMEM) {
        fa_stage<D>(base, ld, q0, S, h * D, Qb);
        fa_stage<D>(dob, C, q0, S, h * D, dOb);
    }
    fa_stage<D>(base, ld, 0, S, C + h * D, bufs);
    fa_stage<D>(base, ld, 0, S, 2 * C + h * D, bufs + TS);
    fa_commit();
    unsigned qa[Q_SMEM ? 1 : D / 16][4], da[Q_SMEM ? 1 : D / 16][4];
    if constexpr (!Q_SMEM) {
        fa_frag_a_global<D>(base + h * D, ld, q0 + warp * 16, S, qa);
        fa_frag_a_global<D>(dob + h * D, C, q0 + warp * 16, S, da);
    }
    const float L0 = r0 < S ? lse[(long)bh * S + r0] : FA_INF, L1 = r1 < S ? lse[(long)bh * S + r1] : FA_INF;
    const float D0 = r0 < S ? dvec[(long)bh * S + r0] : 0.f, D1 = r1 < S ? dvec[(long)bh * S + r1] : 0.f;
    const float sl = scale * FA_LOG2E;
    float dq[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_T;
        const unsigned short* Ks = bufs + (kt & 1) * 2 * TS;
        const unsigned short* Vs = Ks + TS;
        fa_kv_tile<D>(base, ld, S, C, h, kt, qt, bufs);
        const bool edge = kt == qt || k0 + FA_T > S; // only the diagonal tile and a partial last tile mask
        // S (16 queries × QW keys) and dP, over the key tile in FA_T / QW parts.
#pragma unroll
        for (int part = 0; part < FA_T / QW; ++part) {
            const int kb = part * QW;
            float s[QW / 8][4], dp[QW / 8][4];
            fa_scores<D, QW, Q_SMEM>(s, dp, qa, da, Qb + warp * 16 * RS, dOb + warp * 16 * RS, Ks + kb * RS,
                                     Vs + kb * RS);
#pragma unroll
            for (int nt = 0; nt < QW / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + kb + nt * 8 + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                    const bool in = !edge || (key <= row && key < S);
                    const float p = in ? fa_exp2(s[nt][e] * sl - (e < 2 ? L0 : L1)) : 0.f;
                    dp[nt][e] = p * (dp[nt][e] - (e < 2 ? D0 : D1));
                }
            fa_mma_pv<D, QW / 16>(dq, dp, Ks + kb * RS); // dQ += dS·K (scaled below)
        }
        __syncthreads(); // this buffer is refilled next iteration
    }
    const long db = (long)b * S * ld + h * D + 2 * t;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        if (r0 < S) fa_put2(dqkv, dqkv16, db + (long)r0 * ld + nt * 8, dq[nt][0] * scale, dq[nt][1] * scale);
        if (r1 < S) fa_put2(dqkv, dqkv16, db + (long)r1 * ld + nt * 8, dq[nt][2] * scale, dq[nt][3] * scale);
    }
}

// bf16 copy (round to nearest even) of n f32 values, grid-stride.
extern "C" __global__ void cast_bf16(const float* __restrict__ x, long n, unsigned short* __restrict__ y)
{
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = (unsigned short)bf16_bits(x[i]);
}

#define FA_INSTANCES(D, FWD_BOUNDS, DKV_BOUNDS, DQ_BOUNDS)                                                   \
    extern "C" __global__ void FWD_BOUNDS flash_fwd_##D(                                                          \
        const unsigned short* __restrict__ qkv, int S, int H, float scale, float* __restrict__ out,                   \
        unsigned short* __restrict__ out16, float* __restrict__ lse)                                                  \
    { flash_fwd_impl<D>(qkv, S, H, scale, out, out16, lse); }                                                        \
    extern "C" __global__ void DKV_BOUNDS flash_bwd_dkv_##D(                                                      \
        const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dout,                              \
        const float* __restrict__ lse, const float* __restrict__ dvec, int S, int H, float scale,                     \
        float* __restrict__ dqkv, unsigned short* __restrict__ dqkv16)                                                \
    { flash_bwd_dkv_impl<D>(qkv, dout, lse, dvec, S, H, scale, dqkv, dqkv16); }                                      \
    extern "C" __global__ void DQ_BOUNDS flash_bwd_dq_##D(                                                        \
        const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dout,                              \
        const float* __restrict__ lse, const float* __restrict__ dvec, int S, int H, float scale,                     \
        float* __restrict__ dqkv, unsigned short* __restrict__ dqkv16)                                                \
    { flash_bwd_dq_impl<D>(qkv, dout, lse, dvec, S, H, scale, dqkv, dqkv16); }
// Heads of up to 64 dimensions take the FA_MINB_* bounds; heads of 128 keep the plain bound (measured slower with them).
#define FA_FWD_B __launch_bounds__(128, FA_MINB_FWD)
#define FA_DKV_B __launch_bounds__(128, FA_MINB_DKV)
#define FA_DQ_B __launch_bounds__(128, FA_MINB_DQ)
FA_INSTANCES(16, FA_FWD_B, FA_DKV_B, FA_DQ_B)
FA_INSTANCES(32, FA_FWD_B, FA_DKV_B, FA_DQ_B)
FA_INSTANCES(64, FA_FWD_B, FA_DKV_B, FA_DQ_B)
FA_INSTANCES(128, __launch_bounds__(128), __launch_bounds__(128), __launch_bounds__(128))
