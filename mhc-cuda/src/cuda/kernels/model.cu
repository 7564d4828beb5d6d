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

// dw[c] += Σ_r dy[r, c]·x[r, c]·inv_rms[r] (one thread per column, rows in order).
extern "C" __global__ void rmsnorm_bwd_dw(const float* __restrict__ x, const float* __restrict__ inv_rms,
                                          const float* __restrict__ dy, int R, int C, float* __restrict__ dw)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.f;
    for (long r = 0; r < R; ++r) s += dy[r * C + c] * x[r * C + c] * inv_rms[r];
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
