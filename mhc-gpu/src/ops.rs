//! The reference model's kernels on wgpu (`shaders/model.wgsl`): tiled
//! matmul and its two gradients, RMSNorm, causal attention, GELU,
//! cross-entropy, embeddings, the mean over streams, AdamW and sums of
//! squares — each the GPU twin of a function of [`mhc_core::model::ops`] or
//! [`mhc_core::model::blocks`], checked against it in `tests/parity.rs`.

use mhc_core::model::optim::AdamWConfig;

use crate::context::{GpuBuffer, GpuContext, Kernel, Module, Params};
use crate::error::{GpuError, GpuResult};

const fn k(entry: &'static str, access: &'static str) -> Kernel {
    Kernel {
        module: Module::Model,
        entry,
        access,
    }
}

const MATMUL: Kernel = k("matmul", "rrw");
const MATMUL_SERIAL: Kernel = k("matmul_serial", "rrw");
const RMSNORM: Kernel = k("rmsnorm", "rrww");
const RMSNORM_SERIAL: Kernel = k("rmsnorm_serial", "rrww");
const RMSNORM_BWD: Kernel = k("rmsnorm_backward", "rrrrw");
const RMSNORM_BWD_SERIAL: Kernel = k("rmsnorm_backward_serial", "rrrrw");
const RMSNORM_GW: Kernel = k("rmsnorm_grad_weight", "rrrw");
const GELU: Kernel = k("gelu", "rw");
const GELU_BWD: Kernel = k("gelu_backward", "rrw");
const ATTN_FWD: Kernel = k("attention_forward", "rww");
const ATTN_BWD_Q: Kernel = k("attention_backward_q", "rrrww");
const ATTN_BWD_KV: Kernel = k("attention_backward_kv", "rrrrw");
const CROSS_ENTROPY: Kernel = k("cross_entropy", "wrw");
const CROSS_ENTROPY_SERIAL: Kernel = k("cross_entropy_serial", "wrw");
const EMBED: Kernel = k("embed", "rrrw");
const EMBED_BWD_TOK: Kernel = k("embed_backward_tokens", "rrrw");
const EMBED_BWD_POS: Kernel = k("embed_backward_positions", "rw");
const STREAMS_MEAN: Kernel = k("streams_mean", "rw");
const STREAMS_MEAN_BWD: Kernel = k("streams_mean_backward", "rw");
const ADAMW: Kernel = k("adamw", "wrww");
const SUM_SQUARES: Kernel = k("sum_squares", "rw");

/// Elements a [`sum_squares`] partial covers.
pub const SUM_SQUARES_CHUNK: usize = 1024;

fn need(what: &'static str, buf: &GpuBuffer, len: usize) -> GpuResult<()> {
    if buf.len() < len {
        return Err(GpuError::Shape {
            what,
            expected: len,
            got: buf.len(),
        });
    }
    Ok(())
}

fn u(v: usize, what: &str) -> GpuResult<u32> {
    u32::try_from(v).map_err(|_| GpuError::LimitExceeded {
        what: format!("{what} (indexed with 32 bits in the shaders)"),
        requested: v as u64,
        limit: u64::from(u32::MAX),
        hint: "use a smaller batch or model",
    })
}

/// Shape and strides of one [`matmul_strided`]: `out[o0 + i·ldo + j] (+)= Σ_r
/// a[a0 + i·sai + r·sar] · b[b0 + r·sbr + j·sbj]` for `i < m`, `j < n`, `r < k`.
#[derive(Clone, Copy, Debug)]
pub struct Strides {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Stride of `a` along the output rows.
    pub sai: usize,
    /// Stride of `a` along the inner dimension.
    pub sar: usize,
    /// Stride of `b` along the inner dimension.
    pub sbr: usize,
    /// Stride of `b` along the output columns.
    pub sbj: usize,
    /// Row stride of the output.
    pub ldo: usize,
    /// First element of `a`.
    pub a0: usize,
    /// First element of `b`.
    pub b0: usize,
    /// First element of the output.
    pub o0: usize,
    /// Add to the output instead of overwriting it.
    pub accumulate: bool,
}

/// The general tiled matmul every product of the model uses.
pub fn matmul_strided(
    ctx: &GpuContext,
    a: &GpuBuffer,
    b: &GpuBuffer,
    out: &GpuBuffer,
    s: Strides,
) -> GpuResult<()> {
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    let last = |base: usize, i: usize, si: usize, r: usize, sr: usize| {
        base + i.saturating_sub(1) * si + r.saturating_sub(1) * sr + 1
    };
    need("matmul A", a, last(s.a0, s.m, s.sai, s.k, s.sar))?;
    need("matmul B", b, last(s.b0, s.k, s.sbr, s.n, s.sbj))?;
    need("matmul output", out, last(s.o0, s.m, s.ldo, s.n, 1))?;
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let (gx, gy) = (s.n.div_ceil(16), s.m.div_ceil(16));
    if !ctx.serial_kernels() && (gx > max || gy > max) {
        return Err(GpuError::LimitExceeded {
            what: format!("matmul workgroups for a {}×{} output", s.m, s.n),
            requested: gx.max(gy) as u64,
            limit: max as u64,
            hint: "use fewer tokens per batch",
        });
    }
    let p = Params::new(
        &[
            u(s.m, "matmul rows")?,
            u(s.n, "matmul columns")?,
            u(s.k, "matmul inner")?,
            u(s.sai, "stride")?,
            u(s.sar, "stride")?,
            u(s.sbr, "stride")?,
            u(s.sbj, "stride")?,
            u(s.ldo, "stride")?,
            u(s.a0, "offset")?,
            u(s.b0, "offset")?,
            u32::from(s.accumulate),
            u(s.o0, "offset")?,
        ],
        &[],
    );
    if ctx.serial_kernels() {
        // One invocation a 4×4 block of the output.
        let blocks = s.m.div_ceil(4) * s.n.div_ceil(4);
        let g = ctx.groups("matmul_serial", blocks.div_ceil(64))?;
        return ctx.dispatch(&MATMUL_SERIAL, &[a, b, out], p, g);
    }
    ctx.dispatch(&MATMUL, &[a, b, out], p, (gx as u32, gy as u32))
}

/// `out[m, n] = a[m, k]·b[k, n]` ([`mhc_core::model::ops::matmul`]).
pub fn matmul(
    ctx: &GpuContext,
    a: &GpuBuffer,
    b: &GpuBuffer,
    out: &GpuBuffer,
    m: usize,
    k: usize,
    n: usize,
) -> GpuResult<()> {
    matmul_strided(ctx, a, b, out, row_major(m, k, n, false))
}

fn row_major(m: usize, k: usize, n: usize, accumulate: bool) -> Strides {
    Strides {
        m,
        n,
        k,
        sai: k,
        sar: 1,
        sbr: n,
        sbj: 1,
        ldo: n,
        a0: 0,
        b0: 0,
        o0: 0,
        accumulate,
    }
}

/// `grad_a[m, k] = grad_out[m, n]·b[k, n]ᵀ` ([`mhc_core::model::ops::matmul_grad_a`]).
pub fn matmul_grad_a(
    ctx: &GpuContext,
    grad_out: &GpuBuffer,
    b: &GpuBuffer,
    grad_a: &GpuBuffer,
    m: usize,
    k: usize,
    n: usize,
) -> GpuResult<()> {
    let s = Strides {
        m,
        n: k,
        k: n,
        sai: n,
        sar: 1,
        sbr: 1,
        sbj: n,
        ldo: k,
        a0: 0,
        b0: 0,
        o0: 0,
        accumulate: false,
    };
    matmul_strided(ctx, grad_out, b, grad_a, s)
}

/// `grad_b[k, n] += a[m, k]ᵀ·grad_out[m, n]` ([`mhc_core::model::ops::matmul_grad_b`]).
pub fn matmul_grad_b(
    ctx: &GpuContext,
    a: &GpuBuffer,
    grad_out: &GpuBuffer,
    grad_b: &GpuBuffer,
    m: usize,
    k: usize,
    n: usize,
) -> GpuResult<()> {
    let s = Strides {
        m: k,
        n,
        k: m,
        sai: 1,
        sar: k,
        sbr: n,
        sbj: 1,
        ldo: n,
        a0: 0,
        b0: 0,
        o0: 0,
        accumulate: true,
    };
    matmul_strided(ctx, a, grad_out, grad_b, s)
}

/// RMSNorm per row ([`mhc_core::model::ops::rmsnorm`]): `y = x/rms ⊙ w`, `inv_rms` per row.
pub fn rmsnorm(
    ctx: &GpuContext,
    x: &GpuBuffer,
    w: &GpuBuffer,
    rows: usize,
    width: usize,
    eps: f32,
    y: &GpuBuffer,
    inv_rms: &GpuBuffer,
) -> GpuResult<()> {
    need("rmsnorm x", x, rows * width)?;
    need("rmsnorm weight", w, width)?;
    need("rmsnorm y", y, rows * width)?;
    need("rmsnorm inv_rms", inv_rms, rows)?;
    let p = Params::new(&[u(rows, "rows")?, u(width, "width")?], &[eps]);
    if ctx.serial_kernels() {
        let g = ctx.groups("rmsnorm_serial", rows.div_ceil(64))?;
        return ctx.dispatch(&RMSNORM_SERIAL, &[x, w, y, inv_rms], p, g);
    }
    ctx.dispatch(
        &RMSNORM,
        &[x, w, y, inv_rms],
        p,
        ctx.groups("rmsnorm", rows)?,
    )
}

/// Backward of [`rmsnorm`] ([`mhc_core::model::ops::rmsnorm_backward`]):
/// overwrites `grad_x`, accumulates `grad_w`.
pub fn rmsnorm_backward(
    ctx: &GpuContext,
    x: &GpuBuffer,
    w: &GpuBuffer,
    inv_rms: &GpuBuffer,
    grad_y: &GpuBuffer,
    rows: usize,
    width: usize,
    grad_x: &GpuBuffer,
    grad_w: &GpuBuffer,
) -> GpuResult<()> {
    need("rmsnorm x", x, rows * width)?;
    need("rmsnorm grad_y", grad_y, rows * width)?;
    need("rmsnorm grad_x", grad_x, rows * width)?;
    need("rmsnorm grad_w", grad_w, width)?;
    let p = Params::new(&[u(rows, "rows")?, u(width, "width")?], &[]);
    let (kernel, g) = if ctx.serial_kernels() {
        (&RMSNORM_BWD_SERIAL, rows.div_ceil(64))
    } else {
        (&RMSNORM_BWD, rows)
    };
    ctx.dispatch(
        kernel,
        &[x, w, inv_rms, grad_y, grad_x],
        p,
        ctx.groups(kernel.entry, g)?,
    )?;
    ctx.dispatch(
        &RMSNORM_GW,
        &[x, inv_rms, grad_y, grad_w],
        p,
        ctx.groups("rmsnorm_grad_weight", width.div_ceil(64))?,
    )
}

fn elementwise(
    ctx: &GpuContext,
    kernel: &Kernel,
    bufs: &[&GpuBuffer],
    len: usize,
) -> GpuResult<()> {
    for b in bufs {
        need("element-wise operand", b, len)?;
    }
    let p = Params::new(&[u(len, "elements")?], &[]);
    ctx.dispatch(
        kernel,
        bufs,
        p,
        ctx.groups(kernel.entry, len.div_ceil(256))?,
    )
}

/// GELU (tanh form, [`mhc_core::model::ops::gelu`]) of `len` elements.
pub fn gelu(ctx: &GpuContext, input: &GpuBuffer, out: &GpuBuffer, len: usize) -> GpuResult<()> {
    elementwise(ctx, &GELU, &[input, out], len)
}

/// `grad_pre = grad_act ⊙ GELU'(pre)` ([`mhc_core::model::ops::gelu_grad`]).
pub fn gelu_backward(
    ctx: &GpuContext,
    pre: &GpuBuffer,
    grad_act: &GpuBuffer,
    grad_pre: &GpuBuffer,
    len: usize,
) -> GpuResult<()> {
    elementwise(ctx, &GELU_BWD, &[pre, grad_act, grad_pre], len)
}

/// Shape of causal multi-head attention: `batch` sequences of `seq`, `heads` of width `head_dim`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl AttentionShape {
    fn params(&self) -> GpuResult<Params> {
        let total = self.batch * self.heads * self.seq * self.seq.max(self.head_dim);
        u(total, "attention probabilities")?;
        Ok(Params::new(
            &[
                self.batch as u32,
                self.seq as u32,
                self.heads as u32,
                self.head_dim as u32,
            ],
            &[1.0 / (self.head_dim as f32).sqrt()],
        ))
    }
    fn checks(&self, qkv: &GpuBuffer, probs: &GpuBuffer) -> GpuResult<()> {
        let rows = self.batch * self.seq;
        let c = self.heads * self.head_dim;
        need("attention qkv [B·S, 3C]", qkv, rows * 3 * c)?;
        need(
            "attention probs [B, H, S, S]",
            probs,
            self.batch * self.heads * self.seq * self.seq,
        )
    }
}

/// Causal attention forward (as [`mhc_core::model::blocks::Attention`]):
/// `probs = softmax(q·kᵀ/√d)` (causal) and `o = probs·v` per head.
pub fn attention(
    ctx: &GpuContext,
    qkv: &GpuBuffer,
    shape: AttentionShape,
    probs: &GpuBuffer,
    o: &GpuBuffer,
) -> GpuResult<()> {
    shape.checks(qkv, probs)?;
    need(
        "attention output [B·S, C]",
        o,
        shape.batch * shape.seq * shape.heads * shape.head_dim,
    )?;
    let g = ctx.groups(
        "attention_forward",
        (shape.batch * shape.heads * shape.seq).div_ceil(64),
    )?;
    ctx.dispatch(&ATTN_FWD, &[qkv, probs, o], shape.params()?, g)
}

/// Backward of [`attention`]: `dqkv` (overwritten) from `grad_o`; `ds` is
/// scratch of the size of `probs`.
pub fn attention_backward(
    ctx: &GpuContext,
    qkv: &GpuBuffer,
    probs: &GpuBuffer,
    grad_o: &GpuBuffer,
    shape: AttentionShape,
    ds: &GpuBuffer,
    dqkv: &GpuBuffer,
) -> GpuResult<()> {
    shape.checks(qkv, probs)?;
    shape.checks(dqkv, ds)?;
    let rows = shape.batch * shape.seq;
    need(
        "attention grad_o [B·S, C]",
        grad_o,
        rows * shape.heads * shape.head_dim,
    )?;
    let p = shape.params()?;
    let bhs = shape.batch * shape.heads * shape.seq;
    ctx.dispatch(
        &ATTN_BWD_Q,
        &[qkv, probs, grad_o, ds, dqkv],
        p,
        ctx.groups("attention_backward_q", bhs.div_ceil(64))?,
    )?;
    ctx.dispatch(
        &ATTN_BWD_KV,
        &[qkv, probs, grad_o, ds, dqkv],
        p,
        ctx.groups("attention_backward_kv", (bhs * shape.head_dim).div_ceil(64))?,
    )
}

/// Softmax cross-entropy per row ([`mhc_core::model::ops::cross_entropy`]):
/// `loss_rows[r]` gets row `r`'s loss; `logits` become `∂(mean loss)/∂logits`.
pub fn cross_entropy(
    ctx: &GpuContext,
    logits: &GpuBuffer,
    targets: &GpuBuffer,
    rows: usize,
    vocab: usize,
    loss_rows: &GpuBuffer,
) -> GpuResult<()> {
    need("cross-entropy logits", logits, rows * vocab)?;
    need("cross-entropy targets", targets, rows)?;
    need("cross-entropy losses", loss_rows, rows)?;
    let p = Params::new(
        &[u(rows, "rows")?, u(vocab, "vocab")?],
        &[1.0 / rows as f32],
    );
    let (kernel, g) = if ctx.serial_kernels() {
        (&CROSS_ENTROPY_SERIAL, rows.div_ceil(64))
    } else {
        (&CROSS_ENTROPY, rows)
    };
    ctx.dispatch(
        kernel,
        &[logits, targets, loss_rows],
        p,
        ctx.groups(kernel.entry, g)?,
    )
}

/// `x0[t, s] = E[tokens[t]] + P[t mod seq]` for every stream `s`.
pub fn embed(
    ctx: &GpuContext,
    tokens: &GpuBuffer,
    token_embedding: &GpuBuffer,
    position_embedding: &GpuBuffer,
    rows: usize,
    seq: usize,
    n: usize,
    width: usize,
    x0: &GpuBuffer,
) -> GpuResult<()> {
    need("token ids", tokens, rows)?;
    need("stream state x0", x0, rows * n * width)?;
    need("position embedding", position_embedding, seq * width)?;
    let p = Params::new(&[u(rows, "rows")?, seq as u32, n as u32, width as u32], &[]);
    ctx.dispatch(
        &EMBED,
        &[tokens, token_embedding, position_embedding, x0],
        p,
        ctx.groups("embed", (rows * width).div_ceil(256))?,
    )
}

/// Backward of [`embed`]: accumulates into both embeddings' gradients.
/// `offsets [vocab + 1]` and `rows_by_token [rows]` list, per token id, the
/// rows holding it in ascending order (see [`token_rows`]).
pub fn embed_backward(
    ctx: &GpuContext,
    grad: &GpuBuffer,
    offsets: &GpuBuffer,
    rows_by_token: &GpuBuffer,
    vocab: usize,
    batch: usize,
    seq: usize,
    n: usize,
    width: usize,
    grad_token: &GpuBuffer,
    grad_position: &GpuBuffer,
) -> GpuResult<()> {
    need("token offsets", offsets, vocab + 1)?;
    need("grad of the token embedding", grad_token, vocab * width)?;
    need("grad of the position embedding", grad_position, seq * width)?;
    need("grad of x0", grad, batch * seq * n * width)?;
    let p = Params::new(&[vocab as u32, seq as u32, n as u32, width as u32], &[]);
    ctx.dispatch(
        &EMBED_BWD_TOK,
        &[offsets, rows_by_token, grad, grad_token],
        p,
        ctx.groups("embed_backward_tokens", (vocab * width).div_ceil(256))?,
    )?;
    let p = Params::new(&[batch as u32, seq as u32, n as u32, width as u32], &[]);
    ctx.dispatch(
        &EMBED_BWD_POS,
        &[grad, grad_position],
        p,
        ctx.groups("embed_backward_positions", (seq * width).div_ceil(256))?,
    )
}

/// The CSR list [`embed_backward`] takes: `(offsets [vocab + 1], rows [len])`.
pub fn token_rows(tokens: &[u32], vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; vocab + 1];
    for &t in tokens {
        counts[t as usize + 1] += 1;
    }
    for v in 0..vocab {
        counts[v + 1] += counts[v];
    }
    let mut next = counts.clone();
    let mut rows = vec![0u32; tokens.len()];
    for (i, &t) in tokens.iter().enumerate() {
        rows[next[t as usize] as usize] = i as u32;
        next[t as usize] += 1;
    }
    (counts, rows)
}

/// `out[t] = mean_s x[t, s]` (the model's reduction before the head), or with
/// `backward` its gradient `out[t, s] = x[t]/n`.
pub fn streams_mean(
    ctx: &GpuContext,
    x: &GpuBuffer,
    rows: usize,
    n: usize,
    width: usize,
    out: &GpuBuffer,
    backward: bool,
) -> GpuResult<()> {
    let (inp, outp) = if backward {
        (rows * width, rows * n * width)
    } else {
        (rows * n * width, rows * width)
    };
    need("streams mean input", x, inp)?;
    need("streams mean output", out, outp)?;
    let p = Params::new(
        &[u(rows, "rows")?, 0, n as u32, width as u32],
        &[1.0 / n as f32],
    );
    let kernel = if backward {
        &STREAMS_MEAN_BWD
    } else {
        &STREAMS_MEAN
    };
    ctx.dispatch(
        kernel,
        &[x, out],
        p,
        ctx.groups(kernel.entry, outp.div_ceil(256))?,
    )
}

/// One AdamW update of `len` elements ([`mhc_core::model::optim::AdamW::update`] after
/// `begin_step`, so `step ≥ 1`), with the gradient scaled by `scale` (clipping).
pub fn adamw(
    ctx: &GpuContext,
    value: &GpuBuffer,
    grad: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
    len: usize,
    config: &AdamWConfig,
    lr: f64,
    step: u64,
    decay: bool,
    scale: f32,
) -> GpuResult<()> {
    for b in [value, grad, m, v] {
        need("AdamW tensor", b, len)?;
    }
    if len == 0 {
        return Ok(());
    }
    let t = step as i32 as f64;
    let bc1 = 1.0 - config.beta1.powf(t);
    let bc2 = 1.0 - config.beta2.powf(t);
    let shrink = if decay {
        1.0 - lr * config.weight_decay
    } else {
        1.0
    };
    let p = Params::new(
        &[u(len, "elements")?, scale.to_bits()],
        &[
            config.beta1 as f32,
            config.beta2 as f32,
            (1.0 - config.beta1) as f32,
            (1.0 - config.beta2) as f32,
            (lr / bc1) as f32,
            (1.0 / bc2) as f32,
            config.eps as f32,
            shrink as f32,
        ],
    );
    ctx.dispatch(
        &ADAMW,
        &[value, grad, m, v],
        p,
        ctx.groups("adamw", len.div_ceil(256))?,
    )
}

/// Partial sums of squares of `x[..len]` into `partials[offset..offset + ⌈len/1024⌉]`.
pub fn sum_squares(
    ctx: &GpuContext,
    x: &GpuBuffer,
    len: usize,
    partials: &GpuBuffer,
    offset: usize,
) -> GpuResult<usize> {
    let parts = len.div_ceil(SUM_SQUARES_CHUNK);
    need("sum of squares input", x, len)?;
    need("sum of squares partials", partials, offset + parts)?;
    if parts == 0 {
        return Ok(0);
    }
    let p = Params::new(&[u(len, "elements")?, u(offset, "offset")?], &[]);
    ctx.dispatch(
        &SUM_SQUARES,
        &[x, partials],
        p,
        ctx.groups("sum_squares", parts)?,
    )?;
    Ok(parts)
}
