//! [`MhcCuda`]: one mHC-wrapped sublayer on the GPU — coefficients (projection,
//! RMS, σ / 2σ, Sinkhorn–Knopp) in one kernel, pre-aggregate, post/res merge,
//! and the backward of all three (Sinkhorn–Knopp's iterates recomputed once
//! from the logits and stored for the reverse sweep) with deterministic
//! reductions for the gradients of φ, γ, b and α.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use mhc_core::{ConnectionConfig, ConnectionParams, Scheme};

use super::{CudaDevice, CudaError, CudaResult, StreamElement};

/// A sublayer `F: R^C → R^C` on the GPU, batched over `[tokens, C]` device buffers.
pub trait CudaSublayer<S: StreamElement> {
    /// `y = F(h)`.
    fn forward(
        &mut self,
        dev: &CudaDevice,
        h: &CudaSlice<S>,
        y: &mut CudaSlice<S>,
        tokens: usize,
        width: usize,
    ) -> CudaResult<()>;
    /// `dh = (∂F/∂h)ᵀ dy` at the forward's `h`.
    fn vjp(
        &mut self,
        dev: &CudaDevice,
        h: &CudaSlice<S>,
        dy: &CudaSlice<S>,
        dh: &mut CudaSlice<S>,
        tokens: usize,
        width: usize,
    ) -> CudaResult<()>;
}

/// The benchmark's stand-in sublayer `F(h) = factor · h` (BENCH.md uses 1.5).
#[derive(Clone, Copy, Debug)]
pub struct ScaleSublayer {
    /// The factor.
    pub factor: f32,
    /// Streams of the module the kernel is taken from (any compiled one works).
    pub n: usize,
}

fn launch_scale<S: StreamElement>(
    dev: &CudaDevice,
    n: usize,
    factor: f32,
    input: &CudaSlice<S>,
    out: &mut CudaSlice<S>,
    len: usize,
) -> CudaResult<()> {
    let f = dev.function(n, S::BF16, "scale")?;
    let len_i = len as i64;
    let blocks = (len.div_ceil(256) as u32).clamp(1, dev.multiprocessors()? * 16);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(input).arg(&factor).arg(&len_i).arg(out);
    // SAFETY: `scale(const S*, float, long, S*)` reads and writes `len` elements; both buffers hold at least `len`.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    Ok(())
}

impl<S: StreamElement> CudaSublayer<S> for ScaleSublayer {
    fn forward(
        &mut self,
        dev: &CudaDevice,
        h: &CudaSlice<S>,
        y: &mut CudaSlice<S>,
        tokens: usize,
        width: usize,
    ) -> CudaResult<()> {
        launch_scale(dev, self.n, self.factor, h, y, tokens * width)
    }
    fn vjp(
        &mut self,
        dev: &CudaDevice,
        _h: &CudaSlice<S>,
        dy: &CudaSlice<S>,
        dh: &mut CudaSlice<S>,
        tokens: usize,
        width: usize,
    ) -> CudaResult<()> {
        launch_scale(dev, self.n, self.factor, dy, dh, tokens * width)
    }
}

struct Kernels {
    coeff_fwd: CudaFunction,
    coeff_finish: CudaFunction,
    pre_fwd: CudaFunction,
    post_fwd: CudaFunction,
    post_bwd: CudaFunction,
    pre_bwd: CudaFunction,
    coeff_bwd: CudaFunction,
    dx_dphi: CudaFunction,
    dphi_reduce: CudaFunction,
    token_reduce: CudaFunction,
    split_phi: CudaFunction,
}

/// One mHC-wrapped sublayer on the GPU: parameters, gradients and the
/// buffers of a batch of up to `capacity` tokens, all on the device.
///
/// In **recompute mode** the backward recomputes the coefficients and the
/// aggregate `h` from `x` (paper Table 3) instead of trusting what the forward
/// left in the buffers, so those buffers can be shared between layers; only
/// the sublayer output `y` must survive from the forward.
pub struct MhcCuda<S: StreamElement> {
    dev: Arc<CudaDevice>,
    n: usize,
    c: usize,
    k: usize,
    iterations: i32,
    sk_eps: f32,
    rms_eps: f32,
    recompute: bool,
    capacity: usize,
    chunks: usize,
    /// Launch geometry read once from the kernel defines the kernels were built
    /// with (`MHC_CUDA_DEFINES`): `coeff_fwd`'s column chunk and shared memory,
    /// threads per token of the Sinkhorn–Knopp kernels, `dx_dphi`'s channels per
    /// block, threads and shared memory.
    cf_chunk: usize,
    cf_smem: usize,
    sk_lanes: usize,
    dx: (usize, usize, usize),
    kernels: Kernels,
    phi_raw: CudaSlice<f32>,
    gamma: CudaSlice<f32>,
    phi: CudaSlice<f32>,
    phit_hi: CudaSlice<half::bf16>,
    phit_lo: CudaSlice<half::bf16>,
    params: CudaSlice<f32>,
    dphi: CudaSlice<f32>,
    dgamma: CudaSlice<f32>,
    dparams: CudaSlice<f32>,
    coef_part: CudaSlice<f32>,
    coef: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    rnorm: CudaSlice<f32>,
    h: CudaSlice<S>,
    y: CudaSlice<S>,
    dy: CudaSlice<S>,
    dh: CudaSlice<S>,
    dcoef: CudaSlice<f32>,
    dp: CudaSlice<f32>,
    /// dp's bf16 halves `[tokens][2][k rounded up to 16]` (`DP_HL`, bf16 streams; one element otherwise).
    dphl: CudaSlice<u16>,
    /// `dx_dphi_tc` reads `dphl` instead of `dp`.
    dp_hl: bool,
    xscale: CudaSlice<f32>,
    dtok: CudaSlice<f32>,
    /// Sinkhorn–Knopp iterates of the backward, `[2·iterations][n²][tokens]`.
    sk_hist: CudaSlice<f32>,
    gpart: CudaSlice<f32>,
    forward_tokens: usize,
}

const CF_TOK: usize = 64;

/// Launch geometry of the dx/dφ kernel for `n` streams and `k` coefficients:
/// (channels per block, threads per block, dynamic shared memory in bytes,
/// blocks resident per SM). f32 streams: `dx_dphi` (CUDA cores, static shared
/// memory); bf16 streams: `dx_dphi_tc` (tensor cores; the byte count mirrors
/// its `TC_SMEM`, which the kernel checks).
fn dx_geometry(bf16: bool, n: usize, k: usize) -> (usize, usize, usize, usize) {
    // TC_EPI_SMEM, TC_STAGES and TC_TB: kernel defines (defaults 1, 2 and 32;
    // MHC_CUDA_DEFINES may set them).
    let epi = super::tuning_define("TC_EPI_SMEM").unwrap_or(1) != 0;
    let stages = super::tuning_define("TC_STAGES").unwrap_or(2).clamp(2, 4) as usize;
    let tb = if super::tuning_define("TC_TB") == Some(16) {
        16
    } else {
        32
    };
    dx_geometry_with(bf16, n, k, epi, stages, tb, dp_hl())
}

/// `coeff_bwd` writes dp's bf16 halves for `dx_dphi_tc` (kernel define `DP_HL`,
/// on by default; bf16 streams only).
fn dp_hl() -> bool {
    super::tuning_define("DP_HL").unwrap_or(1) != 0
}

/// [`dx_geometry`] for given `TC_EPI_SMEM`, `TC_STAGES`, `TC_TB` and `DP_HL` settings.
fn dx_geometry_with(
    bf16: bool,
    n: usize,
    k: usize,
    epi: bool,
    stages: usize,
    tb: usize,
    dp_hl: bool,
) -> (usize, usize, usize, usize) {
    if bf16 {
        let ct = if n <= 4 { 32 } else { 16 };
        let (mt, kp) = (n * ct, k.next_multiple_of(16));
        // dp per tile: its bf16 halves (DP_HL) or f32 rows, which the kernel then
        // converts into one pair of half buffers.
        let (dp_tile, dp_once) = if dp_hl {
            (2 * tb * (kp + 8) * 2, 0)
        } else {
            (tb * k * 4, 2 * tb * (kp + 8))
        };
        let tile = 2 * tb * (mt + 8) * 2 + tb * (ct + 8) * 2 + dp_tile + tb * k * 4 + tb * 4;
        // TC_EPI_SMEM adds the f32 results of product (a).
        let epi = if epi { tb * (mt + 8) * 4 } else { 0 };
        let smem = stages * tile + (dp_once + 2 * kp * (mt + 8)) * 2 + epi;
        // Blocks per SM: Hopper's 228 KiB of shared memory per SM, 1 KiB reserved per
        // block; at most the kernel's launch bounds (TC_MINB: 3 at 16-token tiles, else 2).
        let minb = if tb == 16 { 3 } else { 2 };
        (ct, 256, smem, (228 * 1024 / (smem + 1024)).clamp(1, minb))
    } else {
        let ct = if n <= 4 { 64 } else { 32 };
        (ct, n * ct, 0, if n <= 4 { 3 } else { 1 })
    }
}

/// The coefficient kernel's column chunk and dynamic shared memory in bytes:
/// `coeff_fwd`'s cp.async ring of `CA_STAGES` stages (kernel define `CF_ASYNC`,
/// on by default; the byte count mirrors the kernel's `CA_SMEM`, which it
/// checks) or, with `CF_ASYNC=0`, its register version (static shared memory only).
fn cf_geometry(bf16: bool, k: usize) -> (usize, usize) {
    let stages = super::tuning_define("CA_STAGES").map(|v| v.clamp(2, 8) as usize);
    cf_geometry_with(
        bf16,
        k,
        super::tuning_define("CF_ASYNC").unwrap_or(1) != 0,
        stages,
    )
}

/// [`cf_geometry`] for given `CF_ASYNC` and `CA_STAGES` (None: the kernel's default) settings.
fn cf_geometry_with(bf16: bool, k: usize, cf_async: bool, stages: Option<usize>) -> (usize, usize) {
    let kp = k.next_multiple_of(8);
    if !cf_async {
        return (if k <= 24 { 128 } else { 64 }, 0);
    }
    let (tok, kc) = (CF_TOK, 64);
    let stages = stages.unwrap_or(3);
    let x_bytes = tok * (kc + 8) * if bf16 { 2 } else { 4 };
    let phi_bytes = 2 * kp * (kc + 8) * 2;
    (kc, stages * (x_bytes + phi_bytes))
}

/// Most split-K slices of the coefficient kernel.
const MAX_SPLITS: usize = 8;

/// Lets `f` launch with `bytes` of dynamic shared memory (beyond the default
/// 48 KiB). A device that cannot give that much gets an error naming the
/// kernel define that sizes it (a tuning define set too high in `MHC_CUDA_DEFINES`).
fn allow_shared_memory(
    dev: &CudaDevice,
    f: &CudaFunction,
    kernel: &str,
    bytes: usize,
    define: &str,
) -> CudaResult<()> {
    dev.context().bind_to_thread()?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(|e| {
        CudaError::Unsupported(format!(
            "{kernel} needs {bytes} B of shared memory per block, more than this GPU \
             allows ({e:?}); a smaller {define} in MHC_CUDA_DEFINES needs less"
        ))
    })?;
    Ok(())
}

fn launch_error(kernel: &str, e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!("launching {kernel}: {e:?}"))
}

/// With `MHC_CUDA_SYNC=1`, waits for each kernel and names the one that failed
/// (launches are asynchronous, so an error otherwise surfaces at a later call).
fn debug_sync(dev: &CudaDevice, kernel: &str) -> CudaResult<()> {
    static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *SYNC.get_or_init(|| std::env::var_os("MHC_CUDA_SYNC").is_some_and(|v| v == "1")) {
        dev.stream()
            .synchronize()
            .map_err(|e| CudaError::Driver(format!("kernel {kernel} failed: {e:?}")))?;
    }
    Ok(())
}

/// Threads per token of `coeff_finish` and `coeff_bwd` (the kernels'
/// `SK_THREADS`): with `SK_LANES=1` (the default) `SK_G`, the next power of two
/// ≥ `n`, a lane per row; with `SK_LANES=2` and 2 ≤ n ≤ 4 `SK_G²`, a lane per
/// element; with `SK_LANES=0` one (through `MHC_CUDA_DEFINES`).
fn sk_lanes(n: usize) -> usize {
    sk_lanes_with(super::tuning_define("SK_LANES").unwrap_or(1), n)
}

/// [`sk_lanes`] for a given `SK_LANES`.
fn sk_lanes_with(mode: i64, n: usize) -> usize {
    match mode {
        0 => 1,
        2 if (2..=4).contains(&n) => n.next_power_of_two().pow(2),
        _ => n.next_power_of_two(),
    }
}

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What every GPU wrapper's kernels take: `n ≤ 8` streams, a width that is a
/// multiple of 4 (vector loads), and a non-empty batch whose buffers stay
/// below 2³¹ elements (32-bit indices).
pub(crate) fn check_streams_and_capacity(
    config: &ConnectionConfig,
    capacity: usize,
) -> CudaResult<()> {
    let (n, c) = (config.n, config.width);
    if n > 8 {
        return Err(CudaError::Unsupported(format!(
            "n = {n}: at most 8 streams"
        )));
    }
    if c % 4 != 0 {
        return Err(CudaError::Unsupported(format!(
            "C = {c}: the width must be a multiple of 4"
        )));
    }
    if capacity == 0 {
        return Err(CudaError::Core(mhc_core::MhcError::EmptyBatch));
    }
    if capacity
        .checked_mul(n * c)
        .is_none_or(|e| e >= i32::MAX as usize)
    {
        return Err(CudaError::Unsupported(format!(
            "{capacity} tokens × n·C = {} exceeds 2³¹ elements per buffer",
            n * c
        )));
    }
    Ok(())
}

/// Launch shape of the one-warp-per-token kernels (`post_bwd`, `pre_bwd`):
/// blocks of `WR_TOK` = 4 warps.
fn token_warps(tokens: usize) -> (u32, u32) {
    (tokens.div_ceil(4).max(1) as u32, 128)
}

/// `post_bwd` (shared by the mHC and HC wrappers): `dy = Σ_o H_post[o]·g_o` and
/// the post/res entries of `dcoef` (`g_o·y`, `g_o·x_i`), one warp per token.
/// The callers check the shapes: x and g `[tokens, n, C]`, y and dy
/// `[tokens, C]`, coef and dcoef `[tokens, K]`.
/// `out[j] = Σ_t dtok[t, j]` for `j < k + 3` (the per-token parameter
/// gradients of `coeff_bwd` / `hc_coef_bwd`): one block of 1024 threads per
/// output (fixed order; 1024 rather than 256 threads keep four times as many
/// of the strided loads in flight).
pub(crate) fn launch_token_reduce(
    dev: &CudaDevice,
    f: &CudaFunction,
    dtok: &CudaSlice<f32>,
    tokens: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> CudaResult<()> {
    if dtok.len() < tokens * (k + 3) || out.len() < k + 3 {
        return Err(CudaError::Shape {
            what: "token_reduce buffers",
            expected: tokens * (k + 3),
            got: dtok.len(),
        });
    }
    let t = tokens as i32;
    let mut b = dev.stream().launch_builder(f);
    b.arg(dtok).arg(&t).arg(out);
    // SAFETY: one block per output j < k + 3 (out holds k + 3, checked); reads tokens·(k+3) of dtok (checked).
    unsafe { b.launch(cfg(((k + 3) as u32, 1), 1024)) }
        .map_err(|e| launch_error("token_reduce", e))?;
    debug_sync(dev, "token_reduce")
}

/// `post_bwd` (shared by the mHC and HC wrappers): `dy` and the post/res
/// entries of `dcoef`, one warp per token.
pub(crate) fn launch_post_bwd<S: StreamElement>(
    dev: &CudaDevice,
    f: &CudaFunction,
    x: &CudaSlice<S>,
    coef: &CudaSlice<f32>,
    y: &CudaSlice<S>,
    g: &CudaSlice<S>,
    tokens: usize,
    c: usize,
    dy: &mut CudaSlice<S>,
    dcoef: &mut CudaSlice<f32>,
) -> CudaResult<()> {
    let (t, c_i) = (tokens as i32, c as i32);
    let (grid, block) = token_warps(tokens);
    let st = dev.stream();
    let mut b = st.launch_builder(f);
    b.arg(x)
        .arg(coef)
        .arg(y)
        .arg(g)
        .arg(&t)
        .arg(&c_i)
        .arg(dy)
        .arg(dcoef);
    // SAFETY: one warp per token (t < T guarded in the kernel); each reads its token's n·C of x and g, C of y, K of coef; writes C of dy and K−n of dcoef (shapes checked by the callers).
    unsafe { b.launch(cfg((grid, 1), block)) }.map_err(|e| launch_error("post_bwd", e))?;
    debug_sync(dev, "post_bwd")
}

/// `pre_bwd` (shared by the mHC and HC wrappers): the pre entries of `dcoef`
/// (`dh·x_i`), one warp per token. Shapes as [`launch_post_bwd`], dh `[tokens, C]`.
pub(crate) fn launch_pre_bwd<S: StreamElement>(
    dev: &CudaDevice,
    f: &CudaFunction,
    x: &CudaSlice<S>,
    dh: &CudaSlice<S>,
    tokens: usize,
    c: usize,
    dcoef: &mut CudaSlice<f32>,
) -> CudaResult<()> {
    let (t, c_i) = (tokens as i32, c as i32);
    let (grid, block) = token_warps(tokens);
    let st = dev.stream();
    let mut b = st.launch_builder(f);
    b.arg(x).arg(dh).arg(&t).arg(&c_i).arg(dcoef);
    // SAFETY: one warp per token (t < T guarded in the kernel); reads n·C of x and C of dh, writes n entries of dcoef (shapes checked by the callers).
    unsafe { b.launch(cfg((grid, 1), block)) }.map_err(|e| launch_error("pre_bwd", e))?;
    debug_sync(dev, "pre_bwd")
}

/// Length of the backward's Sinkhorn–Knopp history: every half-step's input
/// (`2·iterations` states of `n²`) per token; at least one element.
fn sk_hist_len(config: &ConnectionConfig, capacity: usize) -> usize {
    (2 * config.sinkhorn.iterations * config.n * config.n * capacity).max(1)
}

/// `[α | b_pre | b_post | b_res]`: the layout of both wrappers' `params`
/// buffer (and of their gradient, as `coeff_bwd`/`hc_coef_bwd` write it).
pub(crate) fn pack_alpha_b(p: &ConnectionParams<f32>) -> Vec<f32> {
    let mut v = p.alpha.clone();
    v.extend_from_slice(&p.b_pre);
    v.extend_from_slice(&p.b_post);
    v.extend_from_slice(&p.b_res);
    v
}

/// The inverse of [`pack_alpha_b`] into `p` (whose tensors have their lengths).
pub(crate) fn unpack_alpha_b(v: &[f32], p: &mut ConnectionParams<f32>) {
    let (a, rest) = v.split_at(p.alpha.len());
    let (pre, rest) = rest.split_at(p.b_pre.len());
    let (post, res) = rest.split_at(p.b_post.len());
    p.alpha.copy_from_slice(a);
    p.b_pre.copy_from_slice(pre);
    p.b_post.copy_from_slice(post);
    p.b_res.copy_from_slice(res);
}

/// Copies each buffer to the host, in order.
pub(crate) fn download(dev: &CudaDevice, bufs: Vec<&CudaSlice<f32>>) -> CudaResult<Vec<Vec<f32>>> {
    let st = dev.stream();
    bufs.into_iter().map(|b| Ok(st.clone_dtoh(b)?)).collect()
}

/// Checks that `packed` holds one vector of each length of `lens`, in order.
pub(crate) fn check_packed(packed: &[Vec<f32>], lens: &[usize]) -> CudaResult<()> {
    if packed.len() != lens.len() {
        return Err(CudaError::Shape {
            what: "packed connection tensors",
            expected: lens.len(),
            got: packed.len(),
        });
    }
    for (v, &len) in packed.iter().zip(lens) {
        if v.len() != len {
            return Err(CudaError::Shape {
                what: "packed connection tensor",
                expected: len,
                got: v.len(),
            });
        }
    }
    Ok(())
}

impl<S: StreamElement> MhcCuda<S> {
    /// Uploads `params` (mHC dynamic, `n ≤ 8`, `C % 4 == 0`) and allocates buffers for `capacity` tokens.
    pub fn new(
        dev: Arc<CudaDevice>,
        config: &ConnectionConfig,
        params: &ConnectionParams<f32>,
        capacity: usize,
        recompute: bool,
    ) -> CudaResult<Self> {
        config.validate()?;
        if config.scheme != Scheme::MhcDynamic {
            return Err(CudaError::Unsupported(format!(
                "scheme {}: the CUDA kernels implement mHC dynamic (the paper's form)",
                config.scheme
            )));
        }
        let (n, c) = (config.n, config.width);
        check_streams_and_capacity(config, capacity)?;
        if config.sinkhorn.iterations > 64 {
            return Err(CudaError::Unsupported(format!(
                "{} Sinkhorn–Knopp iterations: at most 64",
                config.sinkhorn.iterations
            )));
        }
        params.validate(config)?;
        let k = config.coefficient_len();
        let sm = dev.multiprocessors()? as usize;
        let (ct, dx_threads, dx_smem, resident) = dx_geometry(S::BF16, n, k);
        let ctiles = c.div_ceil(ct);
        // The dx/dφ kernel's token chunks: about two full waves of its blocks
        // (`resident` per SM), chunks of at least 256 tokens. (Two blocks per
        // SM of dx_dphi, as before, filled 0.7 of one wave at d = 768: 24%
        // achieved occupancy in Nsight Compute on the H200.)
        let chunks = (2 * resident * sm)
            .div_ceil(ctiles)
            .clamp(1, capacity.div_ceil(256).max(1));
        let dp_hl = S::BF16 && dp_hl();
        let dphl_len = if dp_hl {
            capacity * 2 * k.next_multiple_of(16)
        } else {
            1
        };
        let f32s = |len: usize| len * 4;
        let bytes = 2 * dphl_len
            + f32s(3 * n * c * k + 2 * n * c + 2 * (3 + k))
            + f32s(
                capacity * (4 * k + 2 + (k + 3))
                    + MAX_SPLITS * capacity * (k.next_multiple_of(8) + 1),
            )
            + 4 * capacity * c * size_of::<S>()
            + f32s(chunks * n * c * k)
            + f32s(sk_hist_len(config, capacity));
        dev.ensure_free(bytes)?;
        let name = |s: &str| -> CudaResult<CudaFunction> { dev.function(n, S::BF16, s) };
        let (cf_chunk, cf_smem) = cf_geometry(S::BF16, k);
        let kernels = Kernels {
            coeff_fwd: {
                let f = name("coeff_fwd")?;
                if cf_smem > 0 {
                    allow_shared_memory(&dev, &f, "coeff_fwd", cf_smem, "CA_STAGES")?;
                }
                f
            },
            coeff_finish: name("coeff_finish")?,
            pre_fwd: name("pre_fwd")?,
            post_fwd: name("post_fwd")?,
            post_bwd: name("post_bwd")?,
            pre_bwd: name("pre_bwd")?,
            coeff_bwd: name("coeff_bwd")?,
            dx_dphi: if S::BF16 {
                let f = name("dx_dphi_tc")?;
                allow_shared_memory(&dev, &f, "dx_dphi_tc", dx_smem, "TC_STAGES")?;
                f
            } else {
                name("dx_dphi")?
            },
            dphi_reduce: name("dphi_reduce")?,
            token_reduce: name("token_reduce")?,
            split_phi: name("split_phi")?,
        };
        let st = dev.stream().clone();
        let mut me = Self {
            n,
            c,
            k,
            iterations: config.sinkhorn.iterations as i32,
            sk_eps: config.sinkhorn.eps as f32,
            rms_eps: config.rms_eps as f32,
            recompute,
            capacity,
            chunks,
            cf_chunk,
            cf_smem,
            sk_lanes: sk_lanes(n),
            dx: (ct, dx_threads, dx_smem),
            kernels,
            phi_raw: st.alloc_zeros(n * c * k)?,
            gamma: st.alloc_zeros(n * c)?,
            phi: st.alloc_zeros(n * c * k)?,
            phit_hi: st.alloc_zeros(n * c * k.next_multiple_of(8))?,
            phit_lo: st.alloc_zeros(n * c * k.next_multiple_of(8))?,
            params: st.alloc_zeros(3 + k)?,
            dphi: st.alloc_zeros(n * c * k)?,
            dgamma: st.alloc_zeros(n * c)?,
            dparams: st.alloc_zeros(k + 3)?,
            coef_part: st.alloc_zeros(MAX_SPLITS * capacity * (k.next_multiple_of(8) + 1))?,
            coef: st.alloc_zeros(capacity * k)?,
            proj: st.alloc_zeros(capacity * k)?,
            rnorm: st.alloc_zeros(capacity)?,
            h: st.alloc_zeros(capacity * c)?,
            y: st.alloc_zeros(capacity * c)?,
            dy: st.alloc_zeros(capacity * c)?,
            dh: st.alloc_zeros(capacity * c)?,
            dcoef: st.alloc_zeros(capacity * k)?,
            // With DP_HL, coeff_bwd writes only dphl.
            dp: st.alloc_zeros(if dp_hl { 1 } else { capacity * k })?,
            // Zeroed: the columns past k stay zero (coeff_bwd writes only the first k).
            dphl: st.alloc_zeros(dphl_len)?,
            dp_hl,
            xscale: st.alloc_zeros(capacity)?,
            dtok: st.alloc_zeros(capacity * (k + 3))?,
            sk_hist: st.alloc_zeros(sk_hist_len(config, capacity))?,
            gpart: st.alloc_zeros(chunks * n * c * k)?,
            forward_tokens: 0,
            dev,
        };
        me.set_params(params)?;
        Ok(me)
    }

    /// Replaces the parameters (shapes as [`ConnectionParams`] of this configuration).
    pub fn set_params(&mut self, params: &ConnectionParams<f32>) -> CudaResult<()> {
        let packed = self.pack(params)?;
        let st = self.dev.stream().clone();
        for (host, (value, _)) in packed.iter().zip(self.buffers_mut()) {
            st.memcpy_htod(host, value)?;
        }
        self.params_updated()
    }

    /// `params` in the layouts of the device buffers ([`Self::values`]):
    /// `[φ (nC × K, without γ), γ, α | b_pre | b_post | b_res]`. Shapes checked.
    pub fn pack(&self, params: &ConnectionParams<f32>) -> CudaResult<Vec<Vec<f32>>> {
        let (n, c, k) = (self.n, self.c, self.k);
        let expect = [
            (params.phi.len(), n * c * k, "phi"),
            (params.gamma.len(), n * c, "gamma"),
            (params.alpha.len(), 3, "alpha"),
            (params.b_pre.len(), n, "b_pre"),
            (params.b_post.len(), n, "b_post"),
            (params.b_res.len(), n * n, "b_res"),
        ];
        for (got, expected, what) in expect {
            if got != expected {
                return Err(CudaError::Shape {
                    what,
                    expected,
                    got,
                });
            }
        }
        Ok(vec![
            params.phi.clone(),
            params.gamma.clone(),
            pack_alpha_b(params),
        ])
    }

    /// The inverse of [`Self::pack`] (for values, gradients or optimiser moments).
    pub fn unpack(
        &self,
        config: &ConnectionConfig,
        packed: &[Vec<f32>],
    ) -> CudaResult<ConnectionParams<f32>> {
        let (n, c, k) = (self.n, self.c, self.k);
        check_packed(packed, &[n * c * k, n * c, 3 + k])?;
        let mut p = ConnectionParams::zeros(config);
        p.phi.copy_from_slice(&packed[0]);
        p.gamma.copy_from_slice(&packed[1]);
        unpack_alpha_b(&packed[2], &mut p);
        Ok(p)
    }

    /// The parameter buffers on the device, in the layouts of [`Self::pack`].
    pub fn values(&self) -> Vec<&CudaSlice<f32>> {
        vec![&self.phi_raw, &self.gamma, &self.params]
    }

    /// The gradients of the last backward, in the layouts of [`Self::values`].
    pub fn grads(&self) -> Vec<&CudaSlice<f32>> {
        vec![&self.dphi, &self.dgamma, &self.dparams]
    }

    /// (value, gradient) pairs of [`Self::values`] and [`Self::grads`], for an
    /// optimiser that updates them in place (call [`Self::params_updated`] after).
    pub fn buffers_mut(&mut self) -> Vec<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)> {
        vec![
            (&mut self.phi_raw, &mut self.dphi),
            (&mut self.gamma, &mut self.dgamma),
            (&mut self.params, &mut self.dparams),
        ]
    }

    /// Re-derives `φ' = γ·φ` (f32 and the two bf16 halves the coefficient
    /// kernel multiplies) after the parameters changed on the device.
    pub fn params_updated(&mut self) -> CudaResult<()> {
        let (n, c, k) = (self.n, self.c, self.k);
        let st = self.dev.stream().clone();
        let total = (n * c * k.next_multiple_of(8)) as u32;
        let c_i = c as i32;
        let mut b = st.launch_builder(&self.kernels.split_phi);
        b.arg(&self.phi_raw)
            .arg(&self.gamma)
            .arg(&c_i)
            .arg(&mut self.phi)
            .arg(&mut self.phit_hi)
            .arg(&mut self.phit_lo);
        // SAFETY: split_phi reads N·C·K of phi_raw and N·C of gamma; writes N·C·K of phi and N·C·KP of each half (as allocated).
        unsafe { b.launch(cfg((total.div_ceil(256), 1), 256)) }
            .map_err(|e| launch_error("split_phi", e))?;
        debug_sync(&self.dev, "split_phi")?;
        Ok(())
    }

    fn check_tokens(&self, what: &'static str, len: usize, per_token: usize) -> CudaResult<usize> {
        if len == 0 || !len.is_multiple_of(per_token) {
            return Err(CudaError::Shape {
                what,
                expected: (len / per_token).max(1) * per_token,
                got: len,
            });
        }
        let tokens = len / per_token;
        if tokens > self.capacity {
            return Err(CudaError::Core(mhc_core::MhcError::WorkspaceTooSmall {
                tokens,
                capacity: self.capacity,
            }));
        }
        Ok(tokens)
    }

    fn launch_coefficients(&mut self, x: &CudaSlice<S>, tokens: usize) -> CudaResult<()> {
        let splits = self.launch_coeff_partials(x, tokens)?;
        self.launch_coeff_finish(tokens, splits)
    }

    /// `coeff_fwd`: the split-K partials of the coefficients of `x`; returns the splits.
    fn launch_coeff_partials(&mut self, x: &CudaSlice<S>, tokens: usize) -> CudaResult<usize> {
        let (t, c) = (tokens as i32, self.c as i32);
        let (chunk, smem) = (self.cf_chunk, self.cf_smem); // MF_KC or CA_KC of the kernel
        let blocks = tokens.div_ceil(CF_TOK);
        let (splits, span) = self.split_k(blocks, smem, self.n * self.c, chunk)?;
        let span_i = span as i32;
        let st = self.dev.stream().clone();
        {
            let mut b = st.launch_builder(&self.kernels.coeff_fwd);
            b.arg(x)
                .arg(&self.phit_hi)
                .arg(&self.phit_lo)
                .arg(&t)
                .arg(&c)
                .arg(&span_i)
                .arg(&mut self.coef_part);
            // SAFETY: grid (tokens/64, splits) with splits·span ≥ nC and splits ≤ MAX_SPLITS; x holds tokens·nC
            // elements (checked by the caller); coef_part holds MAX_SPLITS·capacity·(KP+1) floats.
            let launch = LaunchConfig {
                shared_mem_bytes: smem as u32,
                ..cfg((blocks as u32, splits as u32), 128)
            };
            unsafe { b.launch(launch) }.map_err(|e| launch_error("coeff_fwd", e))?;
            debug_sync(&self.dev, "coeff_fwd")?;
        }
        Ok(splits)
    }

    /// Split-K of a reduction over `len` columns in units of `unit` for `blocks`
    /// blocks of 64 tokens with `smem` bytes of dynamic shared memory each:
    /// (splits, columns per split, a multiple of `unit`). The grid fills the
    /// resident blocks of one wave (more bytes in flight than one block per 64
    /// tokens can keep), rounding down: a grid just over one wave took two.
    fn split_k(
        &self,
        blocks: usize,
        smem: usize,
        len: usize,
        unit: usize,
    ) -> CudaResult<(usize, usize)> {
        let sm = self.dev.multiprocessors()? as usize;
        // Resident blocks per SM: four for the register coeff_fwd (no dynamic shared
        // memory); otherwise as many as Hopper's 228 KiB of shared memory per SM
        // hold (1 KiB reserved per block).
        let resident = if smem == 0 {
            4
        } else {
            (228 * 1024 / (smem + 1024)).clamp(1, 16)
        };
        let splits = (resident * sm / blocks.max(1))
            .clamp(1, MAX_SPLITS)
            .min(len.div_ceil(unit));
        let span = len.div_ceil(splits).next_multiple_of(unit);
        Ok((len.div_ceil(span), span))
    }

    /// `coeff_finish`: the coefficients from `splits` partials.
    fn launch_coeff_finish(&mut self, tokens: usize, splits: usize) -> CudaResult<()> {
        let (t, c, splits_i) = (tokens as i32, self.c as i32, splits as i32);
        let st = self.dev.stream().clone();
        let mut b = st.launch_builder(&self.kernels.coeff_finish);
        b.arg(&self.coef_part)
            .arg(&splits_i)
            .arg(&self.params)
            .arg(&t)
            .arg(&c);
        b.arg(&self.rms_eps).arg(&self.iterations).arg(&self.sk_eps);
        b.arg(&mut self.coef)
            .arg(&mut self.proj)
            .arg(&mut self.rnorm);
        // SAFETY: sk_lanes threads per token (groups past the last token write nothing); reads
        // splits·tokens·(KP+1) partials; writes tokens rows.
        let threads = tokens * self.sk_lanes;
        unsafe { b.launch(cfg((threads.div_ceil(128) as u32, 1), 128)) }
            .map_err(|e| launch_error("coeff_finish", e))?;
        debug_sync(&self.dev, "coeff_finish")?;
        Ok(())
    }

    fn stream_grid(&self, tokens: usize) -> CudaResult<u32> {
        Ok(((tokens * self.c / 4).div_ceil(256) as u32).clamp(1, self.dev.multiprocessors()? * 16))
    }

    fn launch_pre(&mut self, x: &CudaSlice<S>, tokens: usize) -> CudaResult<()> {
        let (t, c) = (tokens as i32, self.c as i32);
        let grid = self.stream_grid(tokens)?;
        let st = self.dev.stream().clone();
        let mut b = st.launch_builder(&self.kernels.pre_fwd);
        b.arg(x).arg(&self.coef).arg(&t).arg(&c).arg(&mut self.h);
        // SAFETY: reads tokens·N·C of x and tokens·K of coef, writes tokens·C of h (capacity ≥ tokens).
        unsafe { b.launch(cfg((grid, 1), 256)) }.map_err(|e| launch_error("pre_fwd", e))?;
        debug_sync(&self.dev, "pre_fwd")?;
        Ok(())
    }

    /// Coefficients of a batch `x [tokens, n, C]` (kept on the device; see [`Self::coefficients_host`]).
    pub fn coefficients(&mut self, x: &CudaSlice<S>) -> CudaResult<()> {
        let tokens =
            self.check_tokens("stream state x [tokens, n, C]", x.len(), self.n * self.c)?;
        self.launch_coefficients(x, tokens)?;
        self.forward_tokens = tokens;
        Ok(())
    }

    /// Forward of the wrapped sublayer: `out = H_res·x + H_postᵀ·F(H_pre·x)` for `x [tokens, n, C]`.
    pub fn forward(
        &mut self,
        sublayer: &mut dyn CudaSublayer<S>,
        x: &CudaSlice<S>,
        out: &mut CudaSlice<S>,
    ) -> CudaResult<()> {
        let tokens = self.forward_to_sublayer(sublayer, x, out)?;
        let dev = self.dev.clone();
        let (t, c) = (tokens as i32, self.c as i32);
        let grid = self.stream_grid(tokens)?;
        let st = dev.stream().clone();
        let mut b = st.launch_builder(&self.kernels.post_fwd);
        b.arg(x)
            .arg(&self.coef)
            .arg(&self.y)
            .arg(&t)
            .arg(&c)
            .arg(out);
        // SAFETY: reads tokens·N·C of x, tokens·K of coef, tokens·C of y; writes tokens·N·C of out (checked equal to x).
        unsafe { b.launch(cfg((grid, 1), 256)) }.map_err(|e| launch_error("post_fwd", e))?;
        debug_sync(&self.dev, "post_fwd")?;
        self.forward_tokens = tokens;
        Ok(())
    }

    /// The forward up to the sublayer's output `y`: shapes checked, the
    /// coefficients from `x`, `h = H_pre·x` and `y = F(h)`. Returns the tokens.
    fn forward_to_sublayer(
        &mut self,
        sublayer: &mut dyn CudaSublayer<S>,
        x: &CudaSlice<S>,
        out: &CudaSlice<S>,
    ) -> CudaResult<usize> {
        let tokens =
            self.check_tokens("stream state x [tokens, n, C]", x.len(), self.n * self.c)?;
        if out.len() != x.len() {
            return Err(CudaError::Shape {
                what: "output [tokens, n, C]",
                expected: x.len(),
                got: out.len(),
            });
        }
        self.launch_coefficients(x, tokens)?;
        self.launch_pre(x, tokens)?;
        let dev = self.dev.clone();
        sublayer.forward(&dev, &self.h, &mut self.y, tokens, self.c)?;
        Ok(tokens)
    }

    /// Backward of [`Self::forward`] (same `x`): writes `grad_x` and this call's
    /// parameter gradients (read them with [`Self::gradients`]); the sublayer's `vjp` runs in between.
    pub fn backward(
        &mut self,
        sublayer: &mut dyn CudaSublayer<S>,
        x: &CudaSlice<S>,
        grad_out: &CudaSlice<S>,
        grad_x: &mut CudaSlice<S>,
    ) -> CudaResult<()> {
        let tokens =
            self.check_tokens("stream state x [tokens, n, C]", x.len(), self.n * self.c)?;
        if tokens != self.forward_tokens {
            return Err(CudaError::Core(mhc_core::MhcError::BackwardBeforeForward));
        }
        for (what, len) in [
            ("grad of x' [tokens, n, C]", grad_out.len()),
            ("grad of x [tokens, n, C]", grad_x.len()),
        ] {
            if len != x.len() {
                return Err(CudaError::Shape {
                    what,
                    expected: x.len(),
                    got: len,
                });
            }
        }
        if self.recompute {
            self.launch_coefficients(x, tokens)?;
            self.launch_pre(x, tokens)?;
        }
        let (n, c, k) = (self.n, self.c, self.k);
        let (t, c_i) = (tokens as i32, c as i32);
        let dev = self.dev.clone();
        let st = dev.stream().clone();
        launch_post_bwd(
            &self.dev,
            &self.kernels.post_bwd,
            x,
            &self.coef,
            &self.y,
            grad_out,
            tokens,
            c,
            &mut self.dy,
            &mut self.dcoef,
        )?;
        sublayer.vjp(&dev, &self.h, &self.dy, &mut self.dh, tokens, c)?;
        launch_pre_bwd(
            &self.dev,
            &self.kernels.pre_bwd,
            x,
            &self.dh,
            tokens,
            c,
            &mut self.dcoef,
        )?;
        {
            let mut b = st.launch_builder(&self.kernels.coeff_bwd);
            b.arg(&self.coef)
                .arg(&self.proj)
                .arg(&self.rnorm)
                .arg(&self.params)
                .arg(&self.dcoef)
                .arg(&t)
                .arg(&c_i);
            b.arg(&self.iterations)
                .arg(&self.sk_eps)
                .arg(&mut self.dp)
                .arg(&mut self.xscale)
                .arg(&mut self.dtok)
                .arg(&mut self.sk_hist)
                .arg(&mut self.dphl);
            // SAFETY: sk_lanes threads per token (groups past the last token write nothing); every buffer
            // holds capacity ≥ tokens rows, sk_hist 2·iterations·n² per token; with DP_HL and bf16
            // streams (dp_hl) the kernel writes dphl (2·k₁₆ per token) instead of dp, else dp.
            let threads = tokens * self.sk_lanes;
            unsafe { b.launch(cfg((threads.div_ceil(64) as u32, 1), 64)) }
                .map_err(|e| launch_error("coeff_bwd", e))?;
            debug_sync(&self.dev, "coeff_bwd")?;
        }
        let (ct, threads, smem) = self.dx;
        let chunks = self.chunks.min(tokens.div_ceil(256)).max(1);
        let chunk = tokens.div_ceil(chunks) as i32;
        let chunks = tokens.div_ceil(chunk as usize);
        {
            let mut b = st.launch_builder(&self.kernels.dx_dphi);
            b.arg(x).arg(grad_out).arg(&self.dh).arg(&self.coef);
            // dx_dphi_tc with DP_HL reads dp's bf16 halves.
            if self.dp_hl {
                b.arg(&self.dphl);
            } else {
                b.arg(&self.dp);
            }
            b.arg(&self.xscale);
            // dx_dphi_tc reads φ' as split_phi's bf16 halves, dx_dphi in f32.
            if S::BF16 {
                b.arg(&self.phit_hi).arg(&self.phit_lo);
            } else {
                b.arg(&self.phi);
            }
            b.arg(&t)
                .arg(&c_i)
                .arg(&chunk)
                .arg(grad_x)
                .arg(&mut self.gpart);
            let launch = LaunchConfig {
                shared_mem_bytes: smem as u32,
                ..cfg((c.div_ceil(ct) as u32, chunks as u32), threads as u32)
            };
            // SAFETY: grid (C/ct, chunks) with chunks·chunk ≥ tokens and chunks ≤ the allocated gpart chunks; bounds checked in the
            // kernel; the shared memory is the kernel's layout (dx_dphi_tc traps when given less).
            unsafe { b.launch(launch) }.map_err(|e| launch_error("dx_dphi", e))?;
            debug_sync(&self.dev, "dx_dphi")?;
        }
        {
            let chunks_i = chunks as i32;
            let mut b = st.launch_builder(&self.kernels.dphi_reduce);
            b.arg(&self.gpart)
                .arg(&self.phi_raw)
                .arg(&self.gamma)
                .arg(&c_i)
                .arg(&chunks_i)
                .arg(&mut self.dphi)
                .arg(&mut self.dgamma);
            // SAFETY: blocks of DR_M = 8 rows × K threads, one per (m, j) with m < N·C (guarded); reads chunks·N·C·K of gpart.
            unsafe { b.launch(cfg(((n * c).div_ceil(8) as u32, 1), (8 * k) as u32)) }
                .map_err(|e| launch_error("dphi_reduce", e))?;
            debug_sync(&self.dev, "dphi_reduce")?;
        }
        launch_token_reduce(
            &self.dev,
            &self.kernels.token_reduce,
            &self.dtok,
            tokens,
            k,
            &mut self.dparams,
        )
    }

    /// Coefficients of the last forward, `[tokens, K]` rows `[H_pre | H_post | H_res]`, copied to the host.
    pub fn coefficients_host(&self) -> CudaResult<Vec<f32>> {
        let all = self.dev.stream().clone_dtoh(&self.coef)?;
        Ok(all[..self.forward_tokens * self.k].to_vec())
    }

    /// Sublayer input `h` of the last forward, copied to the host.
    pub fn sublayer_input_host(&self) -> CudaResult<Vec<S>> {
        let all = self.dev.stream().clone_dtoh(&self.h)?;
        Ok(all[..self.forward_tokens * self.c].to_vec())
    }

    /// The parameter gradients of the last backward, in the core's layout.
    pub fn gradients(&self, config: &ConnectionConfig) -> CudaResult<ConnectionParams<f32>> {
        self.unpack(config, &download(&self.dev, self.grads())?)
    }

    /// The parameters on the device, downloaded, in the core's layout.
    pub fn params(&self, config: &ConnectionConfig) -> CudaResult<ConnectionParams<f32>> {
        self.unpack(config, &download(&self.dev, self.values())?)
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

#[cfg(test)]
mod geometry_tests {
    use super::{cf_geometry_with, dx_geometry_with, sk_lanes_with};
    use crate::cuda::{KERNEL_SOURCE, compile_offline, offline_nvrtc};

    /// The host's shared-memory size for `dx_dphi_tc` is the kernel's
    /// `TC_SMEM`, for every n and both epilogues (2 or 3 stages and 16- or 32-token tiles at n = 4, 8): the kernel source
    /// `static_assert`s it against the value passed in (NVRTC, no GPU).
    #[test]
    fn dx_tc_shared_memory_matches_the_kernel_layout() {
        if !offline_nvrtc() {
            return;
        }
        for n in 1..=8 {
            let k = n * n + 2 * n;
            // Both epilogues at every n; the other rings and tile heights at n = 4 and 8.
            let variants: &[(bool, usize, usize)] = if n == 4 || n == 8 {
                &[
                    (false, 2, 32),
                    (true, 2, 32),
                    (false, 3, 32),
                    (true, 3, 32),
                    (true, 2, 16),
                    (true, 3, 16),
                ]
            } else {
                &[(false, 2, 32), (true, 2, 32)]
            };
            for &(epi, stages, tb) in variants {
                // dp's halves from coeff_bwd (DP_HL, the default) at every setting; converted in the kernel once.
                for dp_hl in [true, false] {
                    if !dp_hl && (stages, tb) != (2, 32) {
                        continue;
                    }
                    let (_, _, smem, _) = dx_geometry_with(true, n, k, epi, stages, tb, dp_hl);
                    let defines = [
                        format!("-DN={n}"),
                        "-DSTREAM_BF16=1".into(),
                        format!("-DTC_EPI_SMEM={}", u8::from(epi)),
                        format!("-DTC_STAGES={stages}"),
                        format!("-DTC_TB={tb}"),
                        format!("-DDP_HL={}", u8::from(dp_hl)),
                        format!("-DEXPECT_TC_SMEM={smem}"),
                    ];
                    if let Err(e) = compile_offline(KERNEL_SOURCE, &defines, 90, false) {
                        panic!(
                            "n = {n}, epilogue in smem {epi}, {stages} stages, {tb}-token tiles, DP_HL {dp_hl}: host says {smem} bytes: {e}"
                        );
                    }
                }
            }
        }
    }

    /// The host's threads per token for the Sinkhorn–Knopp kernels are the
    /// kernels' `SK_THREADS` (a lane per element with `SK_LANES=2` at every n,
    /// the other modes at n = 3 and 4), and a wrong count does not compile.
    #[test]
    fn sk_threads_match_the_kernels() {
        if !offline_nvrtc() {
            return;
        }
        let mut cases: Vec<(i64, usize)> = (1..=8).map(|n| (2, n)).collect();
        cases.extend([(0, 4), (1, 3), (1, 4)]);
        for (mode, n) in cases {
            let lanes = sk_lanes_with(mode, n);
            let defines = [
                format!("-DN={n}"),
                "-DSTREAM_BF16=1".into(),
                format!("-DSK_LANES={mode}"),
                format!("-DEXPECT_SK_THREADS={lanes}"),
            ];
            if let Err(e) = compile_offline(KERNEL_SOURCE, &defines, 90, false) {
                panic!("n = {n}, SK_LANES={mode}: host says {lanes} threads per token: {e}");
            }
        }
        assert_eq!(sk_lanes_with(2, 4), 16);
        assert_eq!(sk_lanes_with(2, 3), 16);
        assert_eq!(sk_lanes_with(2, 2), 4);
        assert_eq!(sk_lanes_with(2, 8), 8);
        let wrong = [
            "-DN=4",
            "-DSTREAM_BF16=1",
            "-DSK_LANES=2",
            "-DEXPECT_SK_THREADS=4",
        ]
        .map(String::from);
        assert!(compile_offline(KERNEL_SOURCE, &wrong, 90, false).is_err());
    }

    /// The host's shared-memory size for the cp.async `coeff_fwd` is the
    /// kernel's `CA_SMEM`, for every n and both stream types (2…4 stages at n = 4).
    #[test]
    fn cf_async_shared_memory_matches_the_kernel_layout() {
        if !offline_nvrtc() {
            return;
        }
        for n in 1..=8 {
            let k = n * n + 2 * n;
            for bf16 in [false, true] {
                // The kernel's default stages everywhere; the others at n = 4.
                let all: &[Option<usize>] = if n == 4 {
                    &[None, Some(2), Some(3), Some(4)]
                } else {
                    &[None]
                };
                for &stages in all {
                    let (_, smem) = cf_geometry_with(bf16, k, true, stages);
                    let mut defines = vec![
                        format!("-DN={n}"),
                        format!("-DSTREAM_BF16={}", u8::from(bf16)),
                        "-DCF_ASYNC=1".into(),
                        format!("-DEXPECT_CF_SMEM={smem}"),
                    ];
                    if let Some(st) = stages {
                        defines.push(format!("-DCA_STAGES={st}"));
                    }
                    if let Err(e) = compile_offline(KERNEL_SOURCE, &defines, 90, false) {
                        panic!(
                            "n = {n}, bf16 {bf16}, stages {stages:?}: host says {smem} bytes: {e}"
                        );
                    }
                }
            }
        }
    }
}
