//! GPU twins of the reference model's dense operations
//! ([`mhc_core::model::ops`], [`mhc_core::model::optim`]): RMSNorm, GELU,
//! softmax cross-entropy, AdamW and a deterministic sum of squares — the first
//! building blocks of the CUDA trainer, each parity-tested against the core.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};
use mhc_core::model::optim::AdamWConfig;

use super::{CudaDevice, CudaError, CudaResult, MODEL_KERNEL_SOURCE, StreamElement};

/// The model kernels, compiled for one device.
pub struct ModelKernels {
    dev: Arc<CudaDevice>,
    module: Arc<CudaModule>,
}

fn check(what: &'static str, len: usize, expected: usize) -> CudaResult<()> {
    if len < expected {
        Err(CudaError::Shape {
            what,
            expected,
            got: len,
        })
    } else {
        Ok(())
    }
}

/// Head dimensions the flash-attention kernels are compiled for.
pub const FLASH_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Dynamic shared memory (bytes) of the flash backward's dK/dV and dQ kernels
/// at `head_dim`: two buffers of (query tile, its dO) and (L, dvec) for dK/dV,
/// of (key tile, its values) for dQ; the block's own rows in shared memory too
/// above `reg_rows_max_d` (the kernels' `FA_REG_ROWS_MAX_D`, 64 unless
/// `MHC_CUDA_DEFINES` sets it), in registers below.
fn flash_backward_smem(head_dim: usize, reg_rows_max_d: i64) -> (usize, usize) {
    let own = if head_dim as i64 > reg_rows_max_d {
        2
    } else {
        0
    };
    let tiles = (4 + own) * FLASH_TILE * (head_dim + 8) * 2;
    (tiles + 4 * FLASH_TILE * 4, tiles)
}

/// A failed launch of a flash-attention kernel, with the shared memory it asked for.
fn flash_launch_error(name: &str, smem: usize, e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!(
        "{name} (with {smem} B of dynamic shared memory): {e:?}"
    ))
}

/// Query and key rows per tile of the flash-attention kernels.
const FLASH_TILE: usize = 64;

/// Rows (warps) per block of the warp-per-row kernels: the kernels' `RN_ROWS` (model.cu), which must be equal.
const RN_ROWS: usize = 8;

/// Launch of a warp-per-row kernel over `rows` rows.
fn rows_per_warp(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(RN_ROWS).max(1) as u32, 1, 1),
        block_dim: (32 * RN_ROWS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `v` as a kernel's `int` argument, or an error naming what is too large.
fn dim_i32(what: &str, v: usize) -> CudaResult<i32> {
    i32::try_from(v).map_err(|_| {
        CudaError::Unsupported(format!("{what} {v}: the kernels take at most 2^31 − 1"))
    })
}

fn row_block(width: usize) -> u32 {
    (width.next_multiple_of(32)).clamp(32, 256) as u32
}

impl ModelKernels {
    /// Compiles the kernels (once per device).
    pub fn new(dev: Arc<CudaDevice>) -> CudaResult<Self> {
        let module = dev.module("model", MODEL_KERNEL_SOURCE, Vec::new())?;
        Ok(Self { dev, module })
    }

    fn f(&self, name: &str) -> CudaResult<CudaFunction> {
        Ok(self.module.load_function(name)?)
    }

    /// A kernel that touches the residual streams, in its `S` instance
    /// (`name` for f32 streams, `name_bs` for bf16 streams).
    fn f_stream<S: StreamElement>(&self, name: &str) -> CudaResult<CudaFunction> {
        if S::BF16 {
            self.f(&format!("{name}_bs"))
        } else {
            self.f(name)
        }
    }

    fn grid(&self, len: usize) -> CudaResult<u32> {
        Ok((len.div_ceil(256) as u32).clamp(1, self.dev.multiprocessors()? * 8))
    }

    /// `y = RMSNorm(x)·w` over rows of width `c`; `inv_rms[r] = 1/rms`.
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        eps: f32,
        y: &mut CudaSlice<f32>,
        inv_rms: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        self.rmsnorm_into(self.f("rmsnorm_fwd")?, x, w, rows, c, eps, y, inv_rms)
    }

    /// [`Self::rmsnorm`] with `y` rounded to bf16 as it is written (the same
    /// values as [`Self::to_bf16`] of the f32 result): a product's input.
    /// `x` is an f32 or a bf16 stream.
    pub fn rmsnorm_bf16<S: StreamElement>(
        &self,
        x: &CudaSlice<S>,
        w: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        eps: f32,
        y: &mut CudaSlice<half::bf16>,
        inv_rms: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let f = self.f_stream::<S>("rmsnorm_fwd_bf16")?;
        self.rmsnorm_into(f, x, w, rows, c, eps, y, inv_rms)
    }

    fn rmsnorm_into<X: cudarc::driver::DeviceRepr, T: cudarc::driver::DeviceRepr>(
        &self,
        f: CudaFunction,
        x: &CudaSlice<X>,
        w: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        eps: f32,
        y: &mut CudaSlice<T>,
        inv_rms: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        check("rmsnorm x", x.len(), rows * c)?;
        check("rmsnorm w", w.len(), c)?;
        check("rmsnorm y", y.len(), rows * c)?;
        check("rmsnorm inv_rms", inv_rms.len(), rows)?;
        let (r_i, c_i) = (dim_i32("rmsnorm rows", rows)?, dim_i32("rmsnorm width", c)?);
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(x)
            .arg(w)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&eps)
            .arg(y)
            .arg(inv_rms);
        // SAFETY: one warp per row; warps past the last row return at once; every buffer was checked to hold rows·c (or c, rows) elements.
        unsafe { b.launch(rows_per_warp(rows)) }?;
        Ok(())
    }

    /// Backward of [`Self::rmsnorm`]: overwrites `dx`, **adds** to `dw`.
    /// `x` and `dx` are f32 or bf16 streams.
    pub fn rmsnorm_backward<S: StreamElement>(
        &self,
        x: &CudaSlice<S>,
        w: &CudaSlice<f32>,
        inv_rms: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        dx: &mut CudaSlice<S>,
        dw: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        // The other buffers are checked by the dx half, before its launch.
        check("dw", dw.len(), c)?;
        self.rmsnorm_backward_dx(x, w, inv_rms, dy, rows, c, dx)?;
        let c_i = c as i32;
        let r_i = rows as i32;
        let st = self.dev.stream();
        // Row chunks of at least 64 rows, at most 256 chunks: partials fit a small scratch.
        let chunks = rows.div_ceil(64).clamp(1, 256);
        let per_chunk = rows.div_ceil(chunks);
        let chunks = rows.div_ceil(per_chunk).max(1);
        let mut part: CudaSlice<f32> = st.alloc_zeros(chunks * c)?;
        let per_i = per_chunk as i32;
        let f = self.f_stream::<S>("rmsnorm_bwd_dw_part")?;
        let mut b = st.launch_builder(&f);
        b.arg(x)
            .arg(inv_rms)
            .arg(dy)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&per_i)
            .arg(&mut part);
        // SAFETY: grid (C/32, chunks) with chunks·per_chunk ≥ rows; columns and rows guarded; part holds chunks·C.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (c.div_ceil(32) as u32, chunks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        let chunks_i = chunks as i32;
        let f = self.f("rmsnorm_bwd_dw_sum")?;
        let mut b = st.launch_builder(&f);
        b.arg(&part).arg(&chunks_i).arg(&c_i).arg(dw);
        // SAFETY: one thread per column < C (guarded); reads chunks·C of part, adds into dw (C, checked).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (c.div_ceil(128) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// The `dx` half of [`Self::rmsnorm_backward`] (overwrites `dx`; no weight gradient).
    pub fn rmsnorm_backward_dx<S: StreamElement>(
        &self,
        x: &CudaSlice<S>,
        w: &CudaSlice<f32>,
        inv_rms: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        dx: &mut CudaSlice<S>,
    ) -> CudaResult<()> {
        for (what, len, want) in [
            ("x", x.len(), rows * c),
            ("dy", dy.len(), rows * c),
            ("dx", dx.len(), rows * c),
            ("w", w.len(), c),
            ("inv_rms", inv_rms.len(), rows),
        ] {
            check(what, len, want)?;
        }
        let (r_i, c_i) = (dim_i32("rmsnorm rows", rows)?, dim_i32("rmsnorm width", c)?);
        let f = self.f_stream::<S>("rmsnorm_bwd_dx")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(x)
            .arg(w)
            .arg(inv_rms)
            .arg(dy)
            .arg(&r_i)
            .arg(&c_i)
            .arg(dx);
        // SAFETY: one warp per row; warps past the last row return at once; sizes checked above.
        unsafe { b.launch(rows_per_warp(rows)) }?;
        Ok(())
    }

    fn elementwise<T: cudarc::driver::DeviceRepr>(
        &self,
        name: &str,
        a: &CudaSlice<f32>,
        b2: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<T>,
    ) -> CudaResult<()> {
        let len = a.len();
        check("elementwise output", out.len(), len)?;
        if let Some(b2) = b2 {
            check("elementwise second input", b2.len(), len)?;
        }
        let f = self.f(name)?;
        let len_i = len as i64;
        let grid = self.grid(len)?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(a);
        if let Some(b2) = b2 {
            b.arg(b2);
        }
        b.arg(&len_i).arg(out);
        // SAFETY: grid-stride over len elements; every buffer holds at least len.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// `a = GELU(u)` (tanh approximation), element-wise.
    pub fn gelu(&self, u: &CudaSlice<f32>, a: &mut CudaSlice<f32>) -> CudaResult<()> {
        self.elementwise("gelu_fwd", u, None, a)
    }

    /// `du = da · GELU′(u)`.
    pub fn gelu_backward(
        &self,
        u: &CudaSlice<f32>,
        da: &CudaSlice<f32>,
        du: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        self.elementwise("gelu_bwd", u, Some(da), du)
    }

    /// [`Self::gelu`] written as bf16 (a product's input).
    pub fn gelu_bf16(&self, u: &CudaSlice<f32>, a: &mut CudaSlice<half::bf16>) -> CudaResult<()> {
        self.elementwise("gelu_fwd_bf16", u, None, a)
    }

    /// [`Self::gelu_backward`] written as bf16 (a product's input).
    pub fn gelu_backward_bf16(
        &self,
        u: &CudaSlice<f32>,
        da: &CudaSlice<f32>,
        du: &mut CudaSlice<half::bf16>,
    ) -> CudaResult<()> {
        self.elementwise("gelu_bwd_bf16", u, Some(da), du)
    }

    /// Softmax cross-entropy of `logits [rows, vocab]` against `targets`:
    /// per-row losses into `loss`, and `logits` overwritten with the gradient
    /// of the mean loss. Targets must be `< vocab` (checked on the host copy).
    pub fn cross_entropy(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &CudaSlice<u32>,
        rows: usize,
        vocab: usize,
        loss: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        check("logits", logits.len(), rows * vocab)?;
        check("targets", targets.len(), rows)?;
        check("loss", loss.len(), rows)?;
        let host: Vec<u32> = self.dev.stream().clone_dtoh(targets)?;
        if let Some(&t) = host[..rows].iter().find(|&&t| t as usize >= vocab) {
            return Err(CudaError::Core(mhc_core::MhcError::TokenOutOfRange {
                token: t,
                vocab,
            }));
        }
        let f = self.f("cross_entropy")?;
        let (r_i, v_i) = (rows as i32, vocab as i32);
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(logits).arg(targets).arg(&r_i).arg(&v_i).arg(loss);
        // SAFETY: one block per row; targets < vocab (checked); sizes checked above.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (row_block(vocab), 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// One AdamW update (step `step ≥ 1`, as after [`mhc_core::model::optim::AdamW::begin_step`]),
    /// gradient scaled by `grad_scale` (global-norm clipping).
    pub fn adamw(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        config: &AdamWConfig,
        lr: f64,
        step: u64,
        decay: bool,
        grad_scale: f32,
    ) -> CudaResult<()> {
        self.adamw_with(w, None, g, m, v, config, lr, step, decay, grad_scale)
    }

    /// [`Self::adamw`], and with `w16` also the updated weights rounded to
    /// bf16 into it (round to nearest even, as [`Self::to_bf16`]): the operand
    /// of the bf16 products, made once per step instead of once per product.
    pub fn adamw_with(
        &self,
        w: &mut CudaSlice<f32>,
        w16: Option<&mut CudaSlice<half::bf16>>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        config: &AdamWConfig,
        lr: f64,
        step: u64,
        decay: bool,
        grad_scale: f32,
    ) -> CudaResult<()> {
        let len = w.len();
        for (what, l) in [
            ("grad", g.len()),
            ("first moment", m.len()),
            ("second moment", v.len()),
        ] {
            check(what, l, len)?;
        }
        let t = step.max(1) as f64;
        let inv_bc1 = (1.0 / (1.0 - config.beta1.powf(t))) as f32;
        let inv_bc2 = (1.0 / (1.0 - config.beta2.powf(t))) as f32;
        let shrink = if decay {
            (1.0 - lr * config.weight_decay) as f32
        } else {
            1.0
        };
        let (lr32, b1, b2, eps) = (
            lr as f32,
            config.beta1 as f32,
            config.beta2 as f32,
            config.eps as f32,
        );
        if let Some(w16) = &w16 {
            check("bf16 weights", w16.len(), len)?;
        }
        let f = self.f(if w16.is_some() { "adamw_bf16" } else { "adamw" })?;
        let len_i = len as i64;
        let grid = self.grid(len)?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(w)
            .arg(g)
            .arg(m)
            .arg(v)
            .arg(&len_i)
            .arg(&lr32)
            .arg(&b1)
            .arg(&b2)
            .arg(&eps)
            .arg(&shrink)
            .arg(&inv_bc1)
            .arg(&inv_bc2)
            .arg(&grad_scale);
        if let Some(w16) = w16 {
            b.arg(w16);
        }
        // SAFETY: grid-stride over len elements; all four buffers hold at least len (checked).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// Attention kernels: blocks of 8 warps (8 queries or keys) per (batch, head).
    fn attention_launch(
        &self,
        name: &str,
        batch: usize,
        heads: usize,
        seq: usize,
    ) -> CudaResult<(CudaFunction, LaunchConfig)> {
        let f = self.f(name)?;
        let cfg = LaunchConfig {
            grid_dim: (seq.div_ceil(8) as u32, (batch * heads) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((f, cfg))
    }

    /// Causal multi-head attention of `qkv [batch·seq, 3C]` (C = heads·head_dim):
    /// `out [batch·seq, C]`, and the probabilities `probs [batch, heads, seq, seq]` kept for the backward.
    pub fn attention(
        &self,
        qkv: &CudaSlice<f32>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        probs: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let c = heads * head_dim;
        if head_dim == 0 || head_dim > 128 {
            return Err(CudaError::Unsupported(format!(
                "head dimension {head_dim}: the attention kernels take 1..=128"
            )));
        }
        check("qkv", qkv.len(), batch * seq * 3 * c)?;
        check("probs", probs.len(), batch * heads * seq * seq)?;
        check("attention output", out.len(), batch * seq * c)?;
        let (f, cfg) = self.attention_launch("attn_fwd", batch, heads, seq)?;
        let (b_i, s_i, h_i, d_i) = (batch as i32, seq as i32, heads as i32, head_dim as i32);
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(qkv)
            .arg(&b_i)
            .arg(&s_i)
            .arg(&h_i)
            .arg(&d_i)
            .arg(probs)
            .arg(out);
        // SAFETY: grid (seq/8, batch·heads), one warp per query (guarded t < seq); head_dim ≤ 128; sizes checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Backward of [`Self::attention`]: overwrites `dqkv [batch·seq, 3C]`; `delta [batch·heads·seq]` is scratch.
    pub fn attention_backward(
        &self,
        qkv: &CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        delta: &mut CudaSlice<f32>,
        dqkv: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let c = heads * head_dim;
        if head_dim == 0 || head_dim > 128 {
            return Err(CudaError::Unsupported(format!(
                "head dimension {head_dim}: the attention kernels take 1..=128"
            )));
        }
        check("qkv", qkv.len(), batch * seq * 3 * c)?;
        check("probs", probs.len(), batch * heads * seq * seq)?;
        check("attention output", out.len(), batch * seq * c)?;
        check("grad of attention output", dout.len(), batch * seq * c)?;
        check("delta", delta.len(), batch * heads * seq)?;
        check("grad of qkv", dqkv.len(), batch * seq * 3 * c)?;
        let (b_i, s_i, h_i, d_i) = (batch as i32, seq as i32, heads as i32, head_dim as i32);
        let st = self.dev.stream();
        let (f, cfg) = self.attention_launch("attn_bwd_q", batch, heads, seq)?;
        let mut b = st.launch_builder(&f);
        b.arg(qkv)
            .arg(probs)
            .arg(out)
            .arg(dout)
            .arg(&b_i)
            .arg(&s_i)
            .arg(&h_i)
            .arg(&d_i)
            .arg(&mut *delta)
            .arg(&mut *dqkv);
        // SAFETY: one warp per query (guarded); sizes checked above.
        unsafe { b.launch(cfg) }?;
        let (f, cfg) = self.attention_launch("attn_bwd_kv", batch, heads, seq)?;
        let mut b = st.launch_builder(&f);
        b.arg(qkv)
            .arg(probs)
            .arg(dout)
            .arg(&*delta)
            .arg(&b_i)
            .arg(&s_i)
            .arg(&h_i)
            .arg(&d_i)
            .arg(dqkv);
        // SAFETY: one warp per key (guarded); reads the delta written above on the same stream.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn softmax_launch(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Causal multi-head attention of `qkv [batch·seq, 3C]` on cuBLAS batched
    /// GEMMs (tensor cores at `mm`'s precision) with a causal softmax kernel in
    /// between: `out [batch·seq, C]`, and `probs [batch, heads, seq, seq]` kept for
    /// the backward. The same function as [`Self::attention`].
    pub fn attention_gemm(
        &self,
        mm: &MatMul,
        qkv: &CudaSlice<f32>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        probs: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let c = heads * head_dim;
        if head_dim == 0 || seq == 0 || batch == 0 {
            return Err(CudaError::Unsupported(format!(
                "attention of batch {batch}, sequence {seq}, head dimension {head_dim}: all must be positive"
            )));
        }
        check("qkv", qkv.len(), batch * seq * 3 * c)?;
        check("probs", probs.len(), batch * heads * seq * seq)?;
        check("attention output", out.len(), batch * seq * c)?;
        let st = self.dev.stream().clone();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (ss, f) = (seq * seq, 4u64);
        {
            let (q, _g1) = qkv.device_ptr(&st);
            let (p, _g2) = probs.device_ptr_mut(&st);
            for b in 0..batch {
                let base = q + f * (b * seq * 3 * c) as u64;
                // Sᵀ = K_c · Q (column-major views; row-major S = scale·Q·Kᵀ per head).
                // SAFETY: per head h, K/Q rows b·seq..(b+1)·seq of qkv and the (b, h) block of probs, all checked above.
                unsafe {
                    mm.batched(Batched {
                        trans_a: true,
                        trans_b: false,
                        m: seq,
                        n: seq,
                        k: head_dim,
                        alpha: scale,
                        a: (base + f * c as u64, 3 * c, head_dim),
                        b: (base, 3 * c, head_dim),
                        beta: 0.0,
                        c: (p + f * (b * heads * ss) as u64, seq, ss),
                        batch: heads,
                        bf16_inputs: false,
                        bf16_output: false,
                    })
                }?;
            }
        }
        let rows = batch * heads * seq;
        let (rows_i, seq_i) = (rows as i64, seq as i32);
        let func = self.f("causal_softmax")?;
        let mut lb = st.launch_builder(&func);
        lb.arg(&mut *probs).arg(&rows_i).arg(&seq_i);
        // SAFETY: one warp per row < rows (guarded); probs holds rows·seq (checked).
        unsafe { lb.launch(self.softmax_launch(rows)) }?;
        let (q, _g1) = qkv.device_ptr(&st);
        let (p, _g2) = probs.device_ptr(&st);
        let (o, _g3) = out.device_ptr_mut(&st);
        for b in 0..batch {
            let base = q + f * (b * seq * 3 * c) as u64;
            // Oᵀ = V_c · Pᵀ_c: out rows of batch b, head h at column h·head_dim.
            // SAFETY: V rows of batch b, the (b, ·) probability blocks and out rows of batch b (checked sizes).
            unsafe {
                mm.batched(Batched {
                    trans_a: false,
                    trans_b: false,
                    m: head_dim,
                    n: seq,
                    k: seq,
                    alpha: 1.0,
                    a: (base + f * (2 * c) as u64, 3 * c, head_dim),
                    b: (p + f * (b * heads * ss) as u64, seq, ss),
                    beta: 0.0,
                    c: (o + f * (b * seq * c) as u64, c, head_dim),
                    batch: heads,
                    bf16_inputs: false,
                    bf16_output: false,
                })
            }?;
        }
        Ok(())
    }

    /// Backward of [`Self::attention_gemm`]: overwrites `dqkv [batch·seq, 3C]`;
    /// `dprobs [batch, heads, seq, seq]` is scratch (may be shared between layers).
    pub fn attention_gemm_backward(
        &self,
        mm: &MatMul,
        qkv: &CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        dprobs: &mut CudaSlice<f32>,
        dqkv: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let c = heads * head_dim;
        if head_dim == 0 || seq == 0 || batch == 0 {
            return Err(CudaError::Unsupported(format!(
                "attention of batch {batch}, sequence {seq}, head dimension {head_dim}: all must be positive"
            )));
        }
        check("qkv", qkv.len(), batch * seq * 3 * c)?;
        check("probs", probs.len(), batch * heads * seq * seq)?;
        check("grad of attention output", dout.len(), batch * seq * c)?;
        check(
            "grad of probs (scratch)",
            dprobs.len(),
            batch * heads * seq * seq,
        )?;
        check("grad of qkv", dqkv.len(), batch * seq * 3 * c)?;
        let st = self.dev.stream().clone();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (ss, f) = (seq * seq, 4u64);
        {
            let (q, _g1) = qkv.device_ptr(&st);
            let (p, _g2) = probs.device_ptr(&st);
            let (d_o, _g3) = dout.device_ptr(&st);
            let (dp, _g4) = dprobs.device_ptr_mut(&st);
            let (dq, _g5) = dqkv.device_ptr_mut(&st);
            for b in 0..batch {
                let base = q + f * (b * seq * 3 * c) as u64;
                let dbase = dq + f * (b * seq * 3 * c) as u64;
                let do_b = d_o + f * (b * seq * c) as u64;
                let p_b = p + f * (b * heads * ss) as u64;
                let dp_b = dp + f * (b * heads * ss) as u64;
                // dP = dO·Vᵀ and dV = Pᵀ·dO.
                // SAFETY: all addresses stay inside the buffers checked above (batch b's rows and blocks).
                unsafe {
                    mm.batched(Batched {
                        trans_a: true,
                        trans_b: false,
                        m: seq,
                        n: seq,
                        k: head_dim,
                        alpha: 1.0,
                        a: (base + f * (2 * c) as u64, 3 * c, head_dim),
                        b: (do_b, c, head_dim),
                        beta: 0.0,
                        c: (dp_b, seq, ss),
                        batch: heads,
                        bf16_inputs: false,
                        bf16_output: false,
                    })?;
                    mm.batched(Batched {
                        trans_a: false,
                        trans_b: true,
                        m: head_dim,
                        n: seq,
                        k: seq,
                        alpha: 1.0,
                        a: (do_b, c, head_dim),
                        b: (p_b, seq, ss),
                        beta: 0.0,
                        c: (dbase + f * (2 * c) as u64, 3 * c, head_dim),
                        batch: heads,
                        bf16_inputs: false,
                        bf16_output: false,
                    })
                }?;
            }
        }
        let rows = batch * heads * seq;
        let (rows_i, seq_i) = (rows as i64, seq as i32);
        let func = self.f("causal_softmax_bwd")?;
        let mut lb = st.launch_builder(&func);
        lb.arg(probs)
            .arg(&mut *dprobs)
            .arg(&rows_i)
            .arg(&seq_i)
            .arg(&scale);
        // SAFETY: one warp per row < rows (guarded); probs and dprobs hold rows·seq (checked).
        unsafe { lb.launch(self.softmax_launch(rows)) }?;
        let (q, _g1) = qkv.device_ptr(&st);
        let (dp, _g4) = dprobs.device_ptr(&st);
        let (dq, _g5) = dqkv.device_ptr_mut(&st);
        for b in 0..batch {
            let base = q + f * (b * seq * 3 * c) as u64;
            let dbase = dq + f * (b * seq * 3 * c) as u64;
            let ds_b = dp + f * (b * heads * ss) as u64;
            // dQ = dS·K and dK = dSᵀ·Q (dS already holds the 1/√d scale).
            // SAFETY: all addresses stay inside the buffers checked above.
            unsafe {
                mm.batched(Batched {
                    trans_a: false,
                    trans_b: false,
                    m: head_dim,
                    n: seq,
                    k: seq,
                    alpha: 1.0,
                    a: (base + f * c as u64, 3 * c, head_dim),
                    b: (ds_b, seq, ss),
                    beta: 0.0,
                    c: (dbase, 3 * c, head_dim),
                    batch: heads,
                    bf16_inputs: false,
                    bf16_output: false,
                })?;
                mm.batched(Batched {
                    trans_a: false,
                    trans_b: true,
                    m: head_dim,
                    n: seq,
                    k: seq,
                    alpha: 1.0,
                    a: (base, 3 * c, head_dim),
                    b: (ds_b, seq, ss),
                    beta: 0.0,
                    c: (dbase + f * c as u64, 3 * c, head_dim),
                    batch: heads,
                    bf16_inputs: false,
                    bf16_output: false,
                })
            }?;
        }
        Ok(())
    }

    /// `dst = bf16(src)` (round to nearest even), for the flash kernels' inputs.
    pub fn to_bf16(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<half::bf16>) -> CudaResult<()> {
        check("bf16 copy", dst.len(), src.len())?;
        let f = self.f("cast_bf16")?;
        let n = src.len() as i64;
        let grid = self.grid(src.len())?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(src).arg(&n).arg(dst);
        // SAFETY: grid-stride over src.len() elements; dst holds at least that many (checked).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// Whether [`Self::flash_attention`] is compiled for heads of `head_dim`
    /// (16, 32, 64 or 128).
    pub fn flash_supported(head_dim: usize) -> bool {
        FLASH_HEAD_DIMS.contains(&head_dim)
    }

    /// Whether the trainer runs attention of `width / heads` dimensional heads
    /// at `precision` on the flash kernels: bf16 products and a supported head
    /// dimension (f32 and tf32 keep the GEMM path, the parity reference).
    pub fn flash_for(width: usize, heads: usize, precision: GemmPrecision) -> bool {
        precision == GemmPrecision::Bf16
            && heads > 0
            && width.is_multiple_of(heads)
            && Self::flash_supported(width / heads)
    }

    fn flash_check(
        &self,
        qkv: &CudaSlice<half::bf16>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        lse: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
    ) -> CudaResult<()> {
        if !Self::flash_supported(head_dim) {
            return Err(CudaError::Unsupported(format!(
                "flash attention with head dimension {head_dim} (compiled for {FLASH_HEAD_DIMS:?}; \
                 use a width/heads ratio among them, or f32/tf32 products for the GEMM path)"
            )));
        }
        if seq == 0 || batch == 0 || heads == 0 {
            return Err(CudaError::Unsupported(format!(
                "attention of batch {batch}, sequence {seq}, {heads} heads: all must be positive"
            )));
        }
        if batch * heads > 65_535 || batch * seq * 3 * heads * head_dim >= 1 << 31 {
            return Err(CudaError::Unsupported(format!(
                "flash attention of batch {batch} × {heads} heads × sequence {seq}: at most 65535 \
                 (batch, head) pairs and 2^31 elements of qkv; use a smaller batch per call"
            )));
        }
        let c = heads * head_dim;
        check("qkv", qkv.len(), batch * seq * 3 * c)?;
        check("log-sum-exp rows", lse.len(), batch * heads * seq)?;
        check("attention output", out.len(), batch * seq * c)
    }

    /// The kernel `name_<head_dim>` with `smem` bytes of dynamic shared memory allowed.
    fn flash_function(&self, name: &str, head_dim: usize, smem: usize) -> CudaResult<CudaFunction> {
        use cudarc::driver::sys::CUfunction_attribute as A;
        let full = format!("{name}_{head_dim}");
        let f = self.f(&full)?;
        self.dev.context().bind_to_thread()?;
        f.set_attribute(
            A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| {
            CudaError::Driver(format!("{full}: allowing {smem} B of shared memory: {e:?}"))
        })?;
        Ok(f)
    }

    /// Causal multi-head attention of `qkv [batch·seq, 3C]` (a bf16 copy, see
    /// [`Self::to_bf16`]) without the `seq × seq` scores (FlashAttention-2:
    /// tiles of 64 queries × 64 keys, bf16 tensor-core products with f32
    /// accumulation, online softmax in f32):
    /// `out [batch·seq, C]`, and `lse [batch, heads, seq]` (the row
    /// log-sum-exps, base 2) kept for [`Self::flash_attention_backward`];
    /// `out16`, when given, receives `out` rounded to bf16 (a product's input).
    /// The function of [`Self::attention`], at bf16 product precision; heads
    /// of 16, 32, 64 or 128 ([`Self::flash_supported`]).
    pub fn flash_attention(
        &self,
        qkv: &CudaSlice<half::bf16>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        lse: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        out16: Option<&mut CudaSlice<half::bf16>>,
    ) -> CudaResult<()> {
        self.flash_check(qkv, batch, seq, heads, head_dim, lse, out)?;
        if let Some(o) = &out16 {
            check("bf16 attention output", o.len(), out.len())?;
        }
        let smem = 4 * FLASH_TILE * (head_dim + 8) * 2;
        let f = self.flash_function("flash_fwd", head_dim, smem)?;
        let (seq_i, heads_i) = (seq as i32, heads as i32);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut b = self.dev.stream().launch_builder(&f);
        let null = 0u64;
        b.arg(qkv).arg(&seq_i).arg(&heads_i).arg(&scale).arg(out);
        match out16 {
            Some(o) => b.arg(o),
            None => b.arg(&null),
        };
        b.arg(lse);
        // SAFETY: grid (query tiles, batch·heads); rows ≥ seq are guarded in the kernel;
        // qkv, out and lse hold batch·seq·3C, batch·seq·C and batch·heads·seq (checked).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (seq.div_ceil(FLASH_TILE) as u32, (batch * heads) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            })
        }
        .map_err(|e| flash_launch_error("flash_fwd", smem, e))?;
        Ok(())
    }

    /// Backward of [`Self::flash_attention`]: overwrites `dqkv [batch·seq, 3C]`
    /// (f32, and/or its bf16 rounding `dqkv16`: at least one) from `dout`,
    /// recomputing the probabilities from `qkv` and `lse`; `out` is the
    /// forward's output; `dvec [batch, heads, seq]` and `dout16` (`dout`'s
    /// bf16 copy, `[batch·seq, C]`) are scratch.
    /// Deterministic (no atomics: dQ and dK/dV are separate passes).
    pub fn flash_attention_backward(
        &self,
        qkv: &CudaSlice<half::bf16>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        dvec: &mut CudaSlice<f32>,
        dout16: &mut CudaSlice<half::bf16>,
        mut dqkv: Option<&mut CudaSlice<f32>>,
        mut dqkv16: Option<&mut CudaSlice<half::bf16>>,
    ) -> CudaResult<()> {
        self.flash_check(qkv, batch, seq, heads, head_dim, lse, out)?;
        if dqkv.is_none() && dqkv16.is_none() {
            return Err(CudaError::Unsupported(
                "flash attention backward with neither an f32 nor a bf16 gradient output".into(),
            ));
        }
        let c = heads * head_dim;
        check("grad of attention output", dout.len(), batch * seq * c)?;
        check(
            "bf16 grad of attention output (scratch)",
            dout16.len(),
            batch * seq * c,
        )?;
        check("attention row scratch", dvec.len(), batch * heads * seq)?;
        if let Some(d) = &dqkv {
            check("grad of qkv", d.len(), batch * seq * 3 * c)?;
        }
        if let Some(d) = &dqkv16 {
            check("bf16 grad of qkv", d.len(), batch * seq * 3 * c)?;
        }
        let st = self.dev.stream();
        let null = 0u64;
        let (b_i, seq_i, heads_i, d_i) = (batch as i32, seq as i32, heads as i32, head_dim as i32);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let f = self.f("flash_bwd_dot")?;
        let mut b = st.launch_builder(&f);
        b.arg(out)
            .arg(dout)
            .arg(&b_i)
            .arg(&seq_i)
            .arg(&heads_i)
            .arg(&d_i)
            .arg(&mut *dvec)
            .arg(&mut *dout16);
        // SAFETY: one warp per row < batch·heads·seq (grid-stride, guarded); sizes
        // checked (dvec: batch·heads·seq, dout16: batch·seq·C).
        unsafe { b.launch(self.softmax_launch((batch * heads * seq).min(1 << 20))) }?;
        let tiles = seq.div_ceil(FLASH_TILE) as u32;
        let reg_rows_max_d = super::tuning_define("FA_REG_ROWS_MAX_D").unwrap_or(64);
        let (smem_dkv, smem_dq) = flash_backward_smem(head_dim, reg_rows_max_d);
        // The two passes take the same arguments: dK/dV (over key tiles) writes
        // the k and v columns of the gradient, dQ (over query tiles) the q columns.
        let mut pass = |name: &str, smem: usize| -> CudaResult<()> {
            let f = self.flash_function(name, head_dim, smem)?;
            let mut b = st.launch_builder(&f);
            b.arg(qkv)
                .arg(&*dout16)
                .arg(lse)
                .arg(&*dvec)
                .arg(&seq_i)
                .arg(&heads_i)
                .arg(&scale);
            match &mut dqkv {
                Some(d) => b.arg(&mut **d),
                None => b.arg(&null),
            };
            match &mut dqkv16 {
                Some(d) => b.arg(&mut **d),
                None => b.arg(&null),
            };
            // SAFETY: grid (tiles, batch·heads); rows ≥ seq guarded in the kernels;
            // every buffer checked above; a null output is skipped by the kernels.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (tiles, (batch * heads) as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
            }
            .map_err(|e| flash_launch_error(name, smem, e))?;
            Ok(())
        };
        pass("flash_bwd_dkv", smem_dkv)?;
        pass("flash_bwd_dq", smem_dq)
    }

    /// `x0 [rows, streams, C]`: token plus position embedding, copied to every stream (position = row mod seq).
    pub fn embed<S: StreamElement>(
        &self,
        tokens: &CudaSlice<u32>,
        e: &CudaSlice<f32>,
        p: &CudaSlice<f32>,
        rows: usize,
        seq: usize,
        streams: usize,
        c: usize,
        x0: &mut CudaSlice<S>,
    ) -> CudaResult<()> {
        check("tokens", tokens.len(), rows)?;
        check("position embedding", p.len(), seq * c)?;
        check("stream state", x0.len(), rows * streams * c)?;
        let vocab = e.len() / c.max(1);
        let host: Vec<u32> = self.dev.stream().clone_dtoh(tokens)?;
        if let Some(&t) = host[..rows].iter().find(|&&t| t as usize >= vocab) {
            return Err(CudaError::Core(mhc_core::MhcError::TokenOutOfRange {
                token: t,
                vocab,
            }));
        }
        let f = self.f_stream::<S>("embed_fwd")?;
        let (r_i, s_i, n_i, c_i) = (rows as i64, seq as i32, streams as i32, c as i32);
        let grid = self.grid(rows * streams * c)?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(tokens)
            .arg(e)
            .arg(p)
            .arg(&r_i)
            .arg(&s_i)
            .arg(&n_i)
            .arg(&c_i)
            .arg(x0);
        // SAFETY: tokens < vocab (checked), so every gather is inside E; sizes checked above.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// Backward of [`Self::embed`]: **adds** to `de [vocab, C]` and `dp [seq, C]`. `tokens` is the
    /// batch's host copy (rows in order), from which a per-token row list makes the sums deterministic.
    pub fn embed_backward<S: StreamElement>(
        &self,
        dx0: &CudaSlice<S>,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        streams: usize,
        c: usize,
        de: &mut CudaSlice<f32>,
        dp: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let rows = batch * seq;
        check("tokens", tokens.len(), rows)?;
        check("grad of stream state", dx0.len(), rows * streams * c)?;
        check("grad of position embedding", dp.len(), seq * c)?;
        let vocab = de.len() / c.max(1);
        let mut start = vec![0u32; vocab + 1];
        for &t in &tokens[..rows] {
            if t as usize >= vocab {
                return Err(CudaError::Core(mhc_core::MhcError::TokenOutOfRange {
                    token: t,
                    vocab,
                }));
            }
            start[t as usize + 1] += 1;
        }
        for v in 0..vocab {
            start[v + 1] += start[v];
        }
        let mut fill = start.clone();
        let mut list = vec![0u32; rows];
        for (r, &t) in tokens[..rows].iter().enumerate() {
            list[fill[t as usize] as usize] = r as u32;
            fill[t as usize] += 1;
        }
        let st = self.dev.stream();
        let (start_d, list_d) = (st.clone_htod(&start)?, st.clone_htod(&list)?);
        let (v_i, n_i, c_i, b_i, s_i) = (
            vocab as i32,
            streams as i32,
            c as i32,
            batch as i32,
            seq as i32,
        );
        let f = self.f_stream::<S>("embed_bwd_tokens")?;
        let mut b = st.launch_builder(&f);
        b.arg(dx0)
            .arg(&start_d)
            .arg(&list_d)
            .arg(&v_i)
            .arg(&n_i)
            .arg(&c_i)
            .arg(de);
        // SAFETY: one thread per (v, c) < vocab·C (guarded); the row list indexes rows < batch·seq.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: ((vocab * c).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        let f = self.f_stream::<S>("embed_bwd_positions")?;
        let mut b = st.launch_builder(&f);
        b.arg(dx0).arg(&b_i).arg(&s_i).arg(&n_i).arg(&c_i).arg(dp);
        // SAFETY: one thread per (p, c) < seq·C (guarded); sizes checked above.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: ((seq * c).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// `z [rows, C]` = mean over the streams of `x [rows, streams, C]`.
    pub fn streams_mean<S: StreamElement>(
        &self,
        x: &CudaSlice<S>,
        rows: usize,
        streams: usize,
        c: usize,
        z: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        check("stream state", x.len(), rows * streams * c)?;
        check("reduced state", z.len(), rows * c)?;
        self.streams_launch(self.f_stream::<S>("streams_mean")?, x, rows, streams, c, z)
    }

    /// Backward of [`Self::streams_mean`]: `dx [rows, streams, C] = dz / streams` per stream.
    pub fn streams_mean_backward<S: StreamElement>(
        &self,
        dz: &CudaSlice<f32>,
        rows: usize,
        streams: usize,
        c: usize,
        dx: &mut CudaSlice<S>,
    ) -> CudaResult<()> {
        check("stream state gradient", dx.len(), rows * streams * c)?;
        check("reduced state gradient", dz.len(), rows * c)?;
        self.streams_launch(
            self.f_stream::<S>("streams_mean_bwd")?,
            dz,
            rows,
            streams,
            c,
            dx,
        )
    }

    fn streams_launch<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(
        &self,
        f: CudaFunction,
        input: &CudaSlice<A>,
        rows: usize,
        streams: usize,
        c: usize,
        out: &mut CudaSlice<B>,
    ) -> CudaResult<()> {
        let (r_i, n_i, c_i) = (rows as i64, streams as i32, c as i32);
        let grid = self.grid(rows * streams * c)?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(input).arg(&r_i).arg(&n_i).arg(&c_i).arg(out);
        // SAFETY: grid-stride over rows·streams·C (stream side) and rows·C (reduced side), both checked by the callers.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// `out = a + b`, element-wise (f32 or bf16 streams; bf16 sums are rounded once).
    pub fn add<S: StreamElement>(
        &self,
        a: &CudaSlice<S>,
        b: &CudaSlice<S>,
        out: &mut CudaSlice<S>,
    ) -> CudaResult<()> {
        let len = a.len();
        check("add second input", b.len(), len)?;
        check("add output", out.len(), len)?;
        let f = self.f_stream::<S>("add")?;
        let (len_i, grid) = (len as i64, self.grid(len)?);
        let mut l = self.dev.stream().launch_builder(&f);
        l.arg(a).arg(b).arg(&len_i).arg(out);
        // SAFETY: grid-stride over len elements; every buffer holds len (checked).
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// `Σ x²` in a fixed order (block partials summed on the host in order).
    pub fn sum_squares(&self, x: &CudaSlice<f32>) -> CudaResult<f64> {
        Ok(self.sum_squares_many(&[x])?[0])
    }

    /// `Σ x²` of each tensor of `xs`, as [`Self::sum_squares`] (the same block
    /// partials, each tensor's summed on the host in order), with one
    /// device-to-host copy for all of them: one synchronisation per step
    /// instead of one per tensor.
    pub fn sum_squares_many(&self, xs: &[&CudaSlice<f32>]) -> CudaResult<Vec<f64>> {
        let grids = xs
            .iter()
            .map(|x| self.grid(x.len()))
            .collect::<CudaResult<Vec<u32>>>()?;
        let total: usize = grids.iter().map(|&g| g as usize).sum();
        let st = self.dev.stream();
        let mut partial: CudaSlice<f32> = st.alloc_zeros(total.max(1))?;
        let f = self.f("sum_squares")?;
        let mut at = 0usize;
        for (x, &grid) in xs.iter().zip(&grids) {
            let len_i = x.len() as i64;
            let mut part = partial.slice_mut(at..at + grid as usize);
            let mut b = st.launch_builder(&f);
            b.arg(*x).arg(&len_i).arg(&mut part);
            // SAFETY: grid-stride over x.len(); one partial per block, `grid` entries in this view.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (grid, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }?;
            at += grid as usize;
        }
        let host = st.clone_dtoh(&partial)?;
        let mut at = 0usize;
        Ok(grids
            .iter()
            .map(|&g| {
                let s = host[at..at + g as usize].iter().map(|&p| p as f64).sum();
                at += g as usize;
                s
            })
            .collect())
    }
}

/// How cuBLAS multiplies f32 matrices: the storage is always f32 (weights,
/// activations, gradients); the precision is that of the tensor-core inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPrecision {
    /// Full f32 arithmetic (CUDA cores): the parity reference.
    #[default]
    F32,
    /// TF32 tensor cores (inputs rounded to 10 mantissa bits, f32 accumulation).
    Tf32,
    /// bf16 tensor cores (inputs rounded to bf16, f32 accumulation) — the
    /// arithmetic of bf16 autocast's matrix products.
    Bf16,
}

impl GemmPrecision {
    /// Name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
        }
    }

    fn compute_type(self) -> cudarc::cublas::sys::cublasComputeType_t {
        use cudarc::cublas::sys::cublasComputeType_t as C;
        match self {
            Self::F32 => C::CUBLAS_COMPUTE_32F,
            Self::Tf32 => C::CUBLAS_COMPUTE_32F_FAST_TF32,
            Self::Bf16 => C::CUBLAS_COMPUTE_32F_FAST_16BF,
        }
    }
}

impl std::str::FromStr for GemmPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "tf32" => Ok(Self::Tf32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("precision {other:?}: use f32, tf32 or bf16")),
        }
    }
}

/// Checks the shapes of `out[m, n] = a[m, k] · b[k, n]` (row-major) and gives
/// its cuBLAS configuration: column-major `outᵀ = bᵀ·aᵀ`, so `b` goes first.
fn product_config(
    a: &Operand,
    b: &Operand,
    out_len: usize,
    m: usize,
    k: usize,
    n: usize,
) -> CudaResult<cudarc::cublas::GemmConfig<f32>> {
    use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
    check("matmul a", a.len(), m * k)?;
    check("matmul b", b.len(), k * n)?;
    check("matmul out", out_len, m * n)?;
    Ok(cudarc::cublas::GemmConfig {
        transa: CUBLAS_OP_N,
        transb: CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: 1.0,
        lda: n as i32,
        ldb: k as i32,
        beta: 0.0,
        ldc: n as i32,
    })
}

/// A matrix operand of [`MatMul`]: f32 values (at bf16 precision rounded into
/// a scratch copy on each call), or a bf16 copy made once and reused
/// ([`ModelKernels::to_bf16`]; only at [`GemmPrecision::Bf16`]).
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    /// f32 values.
    F32(&'a CudaSlice<f32>),
    /// bf16 values.
    Bf16(&'a CudaSlice<half::bf16>),
}

impl Operand<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::Bf16(s) => s.len(),
        }
    }
}

impl<'a> From<&'a CudaSlice<f32>> for Operand<'a> {
    fn from(s: &'a CudaSlice<f32>) -> Self {
        Self::F32(s)
    }
}

impl<'a> From<&'a CudaSlice<half::bf16>> for Operand<'a> {
    fn from(s: &'a CudaSlice<half::bf16>) -> Self {
        Self::Bf16(s)
    }
}

impl<'a> From<&'a mut CudaSlice<f32>> for Operand<'a> {
    fn from(s: &'a mut CudaSlice<f32>) -> Self {
        Self::F32(s)
    }
}

impl<'a> From<&'a mut CudaSlice<half::bf16>> for Operand<'a> {
    fn from(s: &'a mut CudaSlice<half::bf16>) -> Self {
        Self::Bf16(s)
    }
}

/// bf16 copies of a product's two operands ([`GemmPrecision::Bf16`]), grown on demand.
struct Bf16Scratch {
    cast: CudaFunction,
    grid: u32,
    a: CudaSlice<u16>,
    b: CudaSlice<u16>,
}

/// One column-major GEMM of a strided batch, on device addresses (cuBLAS conventions).
#[derive(Clone, Copy, Debug)]
struct Batched {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: (u64, usize, usize),
    b: (u64, usize, usize),
    beta: f32,
    c: (u64, usize, usize),
    batch: usize,
    /// A and B hold bf16 (f32 accumulation and output), else f32.
    bf16_inputs: bool,
    /// C is written as bf16 (only with bf16 inputs), else f32.
    bf16_output: bool,
}

/// Row-major f32 matrix products on cuBLAS at a chosen [`GemmPrecision`], the
/// GPU twins of [`mhc_core::model::ops::matmul`], `matmul_grad_a` and `matmul_grad_b`.
pub struct MatMul {
    blas: cudarc::cublas::CudaBlas,
    stream: Arc<cudarc::driver::CudaStream>,
    precision: GemmPrecision,
    bf16: Option<std::sync::Mutex<Bf16Scratch>>,
}

impl MatMul {
    /// A cuBLAS handle on the device's stream (full f32), or [`CudaError::NoDriver`] without libcublas.
    pub fn new(dev: &CudaDevice) -> CudaResult<Self> {
        Self::with_precision(dev, GemmPrecision::F32)
    }

    /// As [`Self::new`], multiplying at `precision`.
    pub fn with_precision(dev: &CudaDevice, precision: GemmPrecision) -> CudaResult<Self> {
        // SAFETY: only tries to dlopen libcublas and reports whether that worked.
        let present =
            std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() })
                .unwrap_or(false);
        if !present {
            return Err(CudaError::NoDriver(
                "libcublas.so not found (CUDA 13's cuBLAS is needed for the trainer's GEMMs)"
                    .into(),
            ));
        }
        let blas = cudarc::cublas::CudaBlas::new(dev.stream().clone())
            .map_err(|e| CudaError::Driver(format!("cuBLAS: {e}")))?;
        let bf16 = if precision == GemmPrecision::Bf16 {
            // The model kernels' cast (round to nearest even), as ModelKernels::to_bf16.
            let module = dev.module("model", MODEL_KERNEL_SOURCE, Vec::new())?;
            let st = dev.stream();
            Some(std::sync::Mutex::new(Bf16Scratch {
                cast: module.load_function("cast_bf16")?,
                grid: dev.multiprocessors()? * 8,
                a: st.alloc_zeros(1)?,
                b: st.alloc_zeros(1)?,
            }))
        } else {
            None
        };
        Ok(Self {
            blas,
            stream: dev.stream().clone(),
            precision,
            bf16,
        })
    }

    /// The precision of the products.
    pub fn precision(&self) -> GemmPrecision {
        self.precision
    }

    /// Runs one strided-batched GEMM.
    ///
    /// # Safety
    /// Every address must point into a live device allocation holding all the
    /// elements the shape, leading dimensions and strides address.
    unsafe fn batched(&self, g: Batched) -> CudaResult<()> {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        use cudarc::cublas::sys::{cublasGemmAlgo_t, cudaDataType};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let f32t = cudaDataType::CUDA_R_32F;
        let (ab_type, compute) = if g.bf16_inputs {
            (
                cudaDataType::CUDA_R_16BF,
                cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        } else {
            (f32t, self.precision.compute_type())
        };
        let i = |v: usize| v as i32;
        // SAFETY: forwarded to the caller's contract; alpha and beta are host scalars that outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                i(g.m),
                i(g.n),
                i(g.k),
                (&g.alpha) as *const f32 as *const _,
                g.a.0 as *const _,
                ab_type,
                i(g.a.1),
                g.a.2 as i64,
                g.b.0 as *const _,
                ab_type,
                i(g.b.1),
                g.b.2 as i64,
                (&g.beta) as *const f32 as *const _,
                g.c.0 as *mut _,
                if g.bf16_output {
                    cudaDataType::CUDA_R_16BF
                } else {
                    f32t
                },
                i(g.c.1),
                g.c.2 as i64,
                i(g.batch),
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Driver(format!("cuBLAS gemm: {e}")))
    }

    fn gemm(
        &self,
        cfg: cudarc::cublas::GemmConfig<f32>,
        a: Operand,
        b: Operand,
        c: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        use cudarc::driver::DevicePtrMut;
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        // SAFETY: the callers check that c holds the m·n elements the configuration addresses.
        unsafe { self.gemm_to(cfg, a, b, pc, false) }
    }

    /// # Safety
    /// `pc` must address the `m·n` elements of the output (`bf16_output`: bf16, else f32).
    unsafe fn gemm_to(
        &self,
        cfg: cudarc::cublas::GemmConfig<f32>,
        a: Operand,
        b: Operand,
        pc: u64,
        bf16_output: bool,
    ) -> CudaResult<()> {
        use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        use cudarc::driver::DevicePtr;
        let st = self.stream.clone();
        let g = |pa, pb, pc, bf16_inputs| Batched {
            trans_a: cfg.transa == CUBLAS_OP_T,
            trans_b: cfg.transb == CUBLAS_OP_T,
            m: cfg.m as usize,
            n: cfg.n as usize,
            k: cfg.k as usize,
            alpha: cfg.alpha,
            a: (pa, cfg.lda as usize, 0),
            b: (pb, cfg.ldb as usize, 0),
            beta: cfg.beta,
            c: (pc, cfg.ldc as usize, 0),
            batch: 1,
            bf16_inputs,
            bf16_output,
        };
        let Some(scratch) = &self.bf16 else {
            let (Operand::F32(a), Operand::F32(b)) = (a, b) else {
                return Err(CudaError::Unsupported(format!(
                    "bf16 operands need bf16 products (this MatMul multiplies at {})",
                    self.precision.name()
                )));
            };
            if bf16_output {
                return Err(CudaError::Unsupported(
                    "bf16 outputs need bf16 products".into(),
                ));
            }
            let (pa, _ga) = a.device_ptr(&st);
            let (pb, _gb) = b.device_ptr(&st);
            // SAFETY: the callers check that a, b and c hold the m·k, k·n and m·n elements the configuration addresses.
            return unsafe { self.batched(g(pa, pb, pc, false)) };
        };
        // bf16 tensor cores: f32 operands are rounded into bf16 copies; f32 accumulation.
        let mut guard = scratch
            .lock()
            .map_err(|_| CudaError::Driver("bf16 GEMM scratch poisoned".into()))?;
        let sc = &mut *guard;
        for (src, dst) in [(a, &mut sc.a), (b, &mut sc.b)] {
            let Operand::F32(src) = src else { continue };
            if dst.len() < src.len() {
                *dst = st.alloc_zeros(src.len())?;
            }
            let n = src.len() as i64;
            let mut lb = st.launch_builder(&sc.cast);
            lb.arg(src).arg(&n).arg(&mut *dst);
            // SAFETY: grid-stride over src.len() elements; dst holds at least that many.
            unsafe {
                lb.launch(LaunchConfig {
                    grid_dim: (sc.grid.max(1), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }?;
        }
        let (pa, _ga) = match a {
            Operand::F32(_) => sc.a.device_ptr(&st),
            Operand::Bf16(x) => x.device_ptr(&st),
        };
        let (pb, _gb) = match b {
            Operand::F32(_) => sc.b.device_ptr(&st),
            Operand::Bf16(x) => x.device_ptr(&st),
        };
        // SAFETY: the bf16 operands (copies or given) hold as many elements as the callers checked.
        unsafe { self.batched(g(pa, pb, pc, true)) }
    }

    /// `out[m, n] = a[m, k] · b[k, n]`.
    pub fn matmul<'a>(
        &self,
        a: impl Into<Operand<'a>>,
        b: impl Into<Operand<'a>>,
        out: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> CudaResult<()> {
        let (a, b) = (a.into(), b.into());
        let cfg = product_config(&a, &b, out.len(), m, k, n)?;
        self.gemm(cfg, b, a, out)
    }

    /// `out[m, n] = a[m, k] · b[k, n]` written as bf16 (rounded by cuBLAS from
    /// the f32 accumulation): a product whose result only feeds bf16 kernels.
    /// Only at [`GemmPrecision::Bf16`].
    pub fn matmul_to_bf16<'a>(
        &self,
        a: impl Into<Operand<'a>>,
        b: impl Into<Operand<'a>>,
        out: &mut CudaSlice<half::bf16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> CudaResult<()> {
        use cudarc::driver::DevicePtrMut;
        let (a, b) = (a.into(), b.into());
        let cfg = product_config(&a, &b, out.len(), m, k, n)?;
        let (pc, _gc) = out.device_ptr_mut(&self.stream);
        // SAFETY: out holds m·n bf16 (checked), a and b their m·k and k·n elements.
        unsafe { self.gemm_to(cfg, b, a, pc, true) }
    }

    /// `grad_a[m, k] = grad_out[m, n] · b[k, n]ᵀ` (overwrites).
    pub fn matmul_grad_a<'a>(
        &self,
        grad_out: impl Into<Operand<'a>>,
        b: impl Into<Operand<'a>>,
        grad_a: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> CudaResult<()> {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (grad_out, b) = (grad_out.into(), b.into());
        check("grad_out", grad_out.len(), m * n)?;
        check("b", b.len(), k * n)?;
        check("grad_a", grad_a.len(), m * k)?;
        let cfg = cudarc::cublas::GemmConfig {
            transa: CUBLAS_OP_T,
            transb: CUBLAS_OP_N,
            m: k as i32,
            n: m as i32,
            k: n as i32,
            alpha: 1.0,
            lda: n as i32,
            ldb: n as i32,
            beta: 0.0,
            ldc: k as i32,
        };
        self.gemm(cfg, b, grad_out, grad_a)
    }

    /// `grad_b[k, n] += a[m, k]ᵀ · grad_out[m, n]` (accumulates).
    pub fn matmul_grad_b<'a>(
        &self,
        a: impl Into<Operand<'a>>,
        grad_out: impl Into<Operand<'a>>,
        grad_b: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> CudaResult<()> {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (a, grad_out) = (a.into(), grad_out.into());
        check("a", a.len(), m * k)?;
        check("grad_out", grad_out.len(), m * n)?;
        check("grad_b", grad_b.len(), k * n)?;
        let cfg = cudarc::cublas::GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_T,
            m: n as i32,
            n: k as i32,
            k: m as i32,
            alpha: 1.0,
            lda: n as i32,
            ldb: k as i32,
            beta: 1.0,
            ldc: n as i32,
        };
        self.gemm(cfg, grad_out, a, grad_b)
    }
}

#[cfg(test)]
mod smem_tests {
    use super::{RN_ROWS, flash_backward_smem};
    use crate::cuda::{MODEL_KERNEL_SOURCE, compile_offline, offline_nvrtc};

    /// The RMSNorm launches' rows per block are the kernels' `RN_ROWS`
    /// (model.cu `static_assert`s the value passed in; NVRTC, no GPU).
    #[test]
    fn rmsnorm_rows_per_block_match_the_kernels() {
        if !offline_nvrtc() {
            return;
        }
        let agree = [format!("-DEXPECT_RN_ROWS={RN_ROWS}")];
        if let Err(e) = compile_offline(MODEL_KERNEL_SOURCE, &agree, 90, false) {
            panic!("host RN_ROWS = {RN_ROWS}: {e}");
        }
        let disagree = [format!("-DEXPECT_RN_ROWS={}", RN_ROWS + 1)];
        assert!(compile_offline(MODEL_KERNEL_SOURCE, &disagree, 90, false).is_err());
    }

    /// The host's shared-memory sizes for the flash backward are the kernels'
    /// (which trap on less at run time): model.cu `static_assert`s them
    /// against the values passed in, per head dimension and both row
    /// placements (NVRTC, no GPU).
    #[test]
    fn flash_backward_shared_memory_matches_the_kernel_layout() {
        if !offline_nvrtc() {
            return;
        }
        // Both placements at heads of 64, and one head size on each side of it.
        for (head_dim, reg_rows_max_d) in [(64, 64), (128, 64), (64, 32), (32, 32)] {
            let (dkv, dq) = flash_backward_smem(head_dim, reg_rows_max_d);
            let defines = [
                format!("-DFA_REG_ROWS_MAX_D={reg_rows_max_d}"),
                format!("-DEXPECT_FA_D={head_dim}"),
                format!("-DEXPECT_FA_SMEM_DKV={dkv}"),
                format!("-DEXPECT_FA_SMEM_DQ={dq}"),
            ];
            if let Err(e) = compile_offline(MODEL_KERNEL_SOURCE, &defines, 90, false) {
                panic!("head {head_dim}, rows in registers up to {reg_rows_max_d}: {e}");
            }
        }
    }
}
