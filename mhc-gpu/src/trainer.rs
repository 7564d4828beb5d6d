//! The reference model's training step on wgpu: the same architecture,
//! parameters, order of parameters and AdamW arithmetic as
//! [`mhc_core::model::Trainer`] (f32), built from the kernels of [`crate::ops`]
//! and the wrapper of [`crate::wrapper`]. Every scheme of the core runs
//! (residual, HC and mHC, static and dynamic). One step matches the CPU
//! reference (`tests/trainer.rs`).
//!
//! Everything lives on the device: weights, gradients, AdamW moments, the
//! connection parameters (packed per wrapped sublayer). A step reads back
//! only the per-row losses and the partial sums of squares of the gradient
//! (for the norm and clipping).

use std::sync::Arc;

use mhc_core::model::blocks::{Attention, Mlp};
use mhc_core::model::{GainReport, ModelConfig, StepStats, TrainConfig, Trainer};
use mhc_core::{MhcError, Rng};

use crate::context::{GpuBuffer, GpuContext};
use crate::error::{GpuError, GpuResult};
use crate::ops::{self, AttentionShape};
use crate::wrapper::{GpuSublayer, GpuWrapper};

const NORM_EPS: f32 = 1e-6;

/// The mean of the per-row losses, or [`MhcError::NonFinite`].
fn mean_loss(rows: &[f32]) -> GpuResult<f64> {
    let loss = rows.iter().map(|&x| x as f64).sum::<f64>() / rows.len().max(1) as f64;
    if !loss.is_finite() {
        return Err(MhcError::NonFinite {
            what: "loss",
            index: 0,
        }
        .into());
    }
    Ok(loss)
}

/// A dense tensor on the device with its gradient and AdamW moments.
pub struct DeviceParam {
    /// Values.
    pub value: GpuBuffer,
    /// Gradient of the last step.
    pub grad: GpuBuffer,
    m: GpuBuffer,
    v: GpuBuffer,
    decay: bool,
}

impl DeviceParam {
    fn upload(ctx: &GpuContext, what: &str, host: &[f32], decay: bool) -> GpuResult<Self> {
        Ok(Self {
            value: ctx.upload(what, host)?,
            grad: ctx.zeros(what, host.len())?,
            m: ctx.zeros(what, host.len())?,
            v: ctx.zeros(what, host.len())?,
            decay,
        })
    }
    fn len(&self) -> usize {
        self.value.len()
    }
}

/// RMSNorm → causal multi-head attention → `W_o`, on the GPU (as
/// [`mhc_core::model::blocks::Attention`]).
pub struct GpuAttention {
    /// RMSNorm weight.
    pub norm: DeviceParam,
    /// `W_qkv [C, 3C]`.
    pub wqkv: DeviceParam,
    /// `W_o [C, C]`.
    pub wo: DeviceParam,
    width: usize,
    shape: AttentionShape,
    normed: GpuBuffer,
    inv: GpuBuffer,
    qkv: GpuBuffer,
    probs: GpuBuffer,
    o: GpuBuffer,
    d_o: GpuBuffer,
    ds: GpuBuffer,
    dqkv: GpuBuffer,
    dnormed: GpuBuffer,
}

impl GpuAttention {
    /// Uploads a CPU attention sublayer for batches of `batch` sequences of `seq`.
    pub fn from_cpu(
        ctx: &GpuContext,
        cpu: &Attention<f32>,
        width: usize,
        heads: usize,
        batch: usize,
        seq: usize,
    ) -> GpuResult<Self> {
        let rows = batch * seq;
        let c = width;
        let z = |what: &str, len: usize| ctx.zeros(what, len);
        Ok(Self {
            norm: DeviceParam::upload(ctx, "attn.norm", &cpu.norm.value, false)?,
            wqkv: DeviceParam::upload(ctx, "attn.wqkv", &cpu.wqkv.value, true)?,
            wo: DeviceParam::upload(ctx, "attn.wo", &cpu.wo.value, true)?,
            width,
            shape: AttentionShape {
                batch,
                seq,
                heads,
                head_dim: c / heads,
            },
            normed: z("attn normed", rows * c)?,
            inv: z("attn inv_rms", rows)?,
            qkv: z("attn qkv", rows * 3 * c)?,
            probs: z("attn probs", batch * heads * seq * seq)?,
            o: z("attn o", rows * c)?,
            d_o: z("attn d_o", rows * c)?,
            ds: z("attn ds", batch * heads * seq * seq)?,
            dqkv: z("attn dqkv", rows * 3 * c)?,
            dnormed: z("attn dnormed", rows * c)?,
        })
    }

    fn rows(&self, tokens: usize) -> GpuResult<usize> {
        let rows = self.shape.batch * self.shape.seq;
        if tokens != rows {
            return Err(GpuError::Shape {
                what: "attention tokens (batch · seq)",
                expected: rows,
                got: tokens,
            });
        }
        Ok(rows)
    }
}

impl GpuSublayer for GpuAttention {
    fn forward(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        y: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()> {
        let rows = self.rows(tokens)?;
        let c = self.width;
        ops::rmsnorm(
            ctx,
            h,
            &self.norm.value,
            rows,
            c,
            NORM_EPS,
            &self.normed,
            &self.inv,
        )?;
        ops::matmul(
            ctx,
            &self.normed,
            &self.wqkv.value,
            &self.qkv,
            rows,
            c,
            3 * c,
        )?;
        ops::attention(ctx, &self.qkv, self.shape, &self.probs, &self.o)?;
        ops::matmul(ctx, &self.o, &self.wo.value, y, rows, c, c)
    }

    fn vjp(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        dy: &GpuBuffer,
        dh: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()> {
        let rows = self.rows(tokens)?;
        let c = self.width;
        ops::matmul_grad_b(ctx, &self.o, dy, &self.wo.grad, rows, c, c)?;
        ops::matmul_grad_a(ctx, dy, &self.wo.value, &self.d_o, rows, c, c)?;
        ops::attention_backward(
            ctx,
            &self.qkv,
            &self.probs,
            &self.d_o,
            self.shape,
            &self.ds,
            &self.dqkv,
        )?;
        ops::matmul_grad_b(
            ctx,
            &self.normed,
            &self.dqkv,
            &self.wqkv.grad,
            rows,
            c,
            3 * c,
        )?;
        ops::matmul_grad_a(
            ctx,
            &self.dqkv,
            &self.wqkv.value,
            &self.dnormed,
            rows,
            c,
            3 * c,
        )?;
        ops::rmsnorm_backward(
            ctx,
            h,
            &self.norm.value,
            &self.inv,
            &self.dnormed,
            rows,
            c,
            dh,
            &self.norm.grad,
        )
    }
}

/// RMSNorm → `W_1` → GELU → `W_2`, on the GPU (as [`mhc_core::model::blocks::Mlp`]).
pub struct GpuMlp {
    /// RMSNorm weight.
    pub norm: DeviceParam,
    /// `W_1 [C, 4C]`.
    pub w1: DeviceParam,
    /// `W_2 [4C, C]`.
    pub w2: DeviceParam,
    width: usize,
    hidden: usize,
    normed: GpuBuffer,
    inv: GpuBuffer,
    pre: GpuBuffer,
    act: GpuBuffer,
    dact: GpuBuffer,
    dpre: GpuBuffer,
    dnormed: GpuBuffer,
}

impl GpuMlp {
    /// Uploads a CPU MLP sublayer for batches of up to `rows` tokens.
    pub fn from_cpu(
        ctx: &GpuContext,
        cpu: &Mlp<f32>,
        width: usize,
        rows: usize,
    ) -> GpuResult<Self> {
        let hidden = cpu.w1.value.len() / width.max(1);
        let z = |what: &str, len: usize| ctx.zeros(what, len);
        Ok(Self {
            norm: DeviceParam::upload(ctx, "mlp.norm", &cpu.norm.value, false)?,
            w1: DeviceParam::upload(ctx, "mlp.w1", &cpu.w1.value, true)?,
            w2: DeviceParam::upload(ctx, "mlp.w2", &cpu.w2.value, true)?,
            width,
            hidden,
            normed: z("mlp normed", rows * width)?,
            inv: z("mlp inv_rms", rows)?,
            pre: z("mlp pre", rows * hidden)?,
            act: z("mlp act", rows * hidden)?,
            dact: z("mlp dact", rows * hidden)?,
            dpre: z("mlp dpre", rows * hidden)?,
            dnormed: z("mlp dnormed", rows * width)?,
        })
    }
}

impl GpuSublayer for GpuMlp {
    fn forward(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        y: &GpuBuffer,
        rows: usize,
    ) -> GpuResult<()> {
        let (c, f) = (self.width, self.hidden);
        ops::rmsnorm(
            ctx,
            h,
            &self.norm.value,
            rows,
            c,
            NORM_EPS,
            &self.normed,
            &self.inv,
        )?;
        ops::matmul(ctx, &self.normed, &self.w1.value, &self.pre, rows, c, f)?;
        ops::gelu(ctx, &self.pre, &self.act, rows * f)?;
        ops::matmul(ctx, &self.act, &self.w2.value, y, rows, f, c)
    }

    fn vjp(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        dy: &GpuBuffer,
        dh: &GpuBuffer,
        rows: usize,
    ) -> GpuResult<()> {
        let (c, f) = (self.width, self.hidden);
        ops::matmul_grad_b(ctx, &self.act, dy, &self.w2.grad, rows, f, c)?;
        ops::matmul_grad_a(ctx, dy, &self.w2.value, &self.dact, rows, f, c)?;
        ops::gelu_backward(ctx, &self.pre, &self.dact, &self.dpre, rows * f)?;
        ops::matmul_grad_b(ctx, &self.normed, &self.dpre, &self.w1.grad, rows, c, f)?;
        ops::matmul_grad_a(ctx, &self.dpre, &self.w1.value, &self.dnormed, rows, c, f)?;
        ops::rmsnorm_backward(
            ctx,
            h,
            &self.norm.value,
            &self.inv,
            &self.dnormed,
            rows,
            c,
            dh,
            &self.norm.grad,
        )
    }
}

/// A wrapped sublayer's connection with the AdamW moments of its packed parameters.
struct Connection {
    wrapper: GpuWrapper,
    m: GpuBuffer,
    v: GpuBuffer,
}

struct GpuBlock {
    attn: GpuAttention,
    attn_conn: Connection,
    mlp: GpuMlp,
    mlp_conn: Connection,
}

/// The reference model, its gradients and AdamW state on one wgpu device, for
/// a fixed batch shape (`batch` sequences of the full context).
pub struct WgpuTrainer {
    ctx: Arc<GpuContext>,
    config: ModelConfig,
    train: TrainConfig,
    batch: usize,
    step: u64,
    token_embedding: DeviceParam,
    position_embedding: DeviceParam,
    blocks: Vec<GpuBlock>,
    final_norm: DeviceParam,
    head: DeviceParam,
    states: Vec<GpuBuffer>,
    grad_a: GpuBuffer,
    grad_b: GpuBuffer,
    tokens_dev: GpuBuffer,
    targets_dev: GpuBuffer,
    offsets_dev: GpuBuffer,
    rows_dev: GpuBuffer,
    reduced: GpuBuffer,
    normed: GpuBuffer,
    inv: GpuBuffer,
    logits: GpuBuffer,
    loss_rows: GpuBuffer,
    d_normed: GpuBuffer,
    d_reduced: GpuBuffer,
    partials: GpuBuffer,
    inputs: Vec<u32>,
}

/// Where one tensor of the core's parameter order lives on the device.
enum Slot<'a> {
    Dense(&'a DeviceParam),
    /// A connection tensor: its connection and `(offset, len)` in the packed buffers.
    Packed(&'a Connection, usize, usize),
}

impl WgpuTrainer {
    /// Copies a CPU trainer's model, settings and AdamW state (moments, step) to the device.
    pub fn from_cpu(ctx: Arc<GpuContext>, cpu: &Trainer<f32>) -> GpuResult<Self> {
        let config = *cpu.model.config();
        let train = cpu.config;
        let batch = train.batch;
        let (c, n, v, seq) = (config.width, config.streams, config.vocab, config.context);
        let rows = batch * seq;
        let conn_cfg = config.connection();
        let z = |what: &str, len: usize| ctx.zeros(what, len);
        let conn = |p: &mhc_core::ConnectionParams<f32>| -> GpuResult<Connection> {
            let wrapper = GpuWrapper::new(ctx.clone(), &conn_cfg, p, rows)?;
            let len = wrapper.layout().total;
            Ok(Connection {
                wrapper,
                m: z("conn m", len)?,
                v: z("conn v", len)?,
            })
        };
        let mut blocks = Vec::new();
        for b in &cpu.model.blocks {
            blocks.push(GpuBlock {
                attn: GpuAttention::from_cpu(&ctx, &b.attn, c, config.heads, batch, seq)?,
                attn_conn: conn(&b.attn_conn.params)?,
                mlp: GpuMlp::from_cpu(&ctx, &b.mlp, c, rows)?,
                mlp_conn: conn(&b.mlp_conn.params)?,
            });
        }
        let state_len = rows * n * c;
        let mut me = Self {
            token_embedding: DeviceParam::upload(
                &ctx,
                "token_embedding",
                &cpu.model.token_embedding.value,
                true,
            )?,
            position_embedding: DeviceParam::upload(
                &ctx,
                "position_embedding",
                &cpu.model.position_embedding.value,
                true,
            )?,
            final_norm: DeviceParam::upload(
                &ctx,
                "final_norm",
                &cpu.model.final_norm.value,
                false,
            )?,
            head: DeviceParam::upload(&ctx, "head", &cpu.model.head.value, true)?,
            blocks,
            step: 0,
            states: (0..=config.sublayers())
                .map(|_| z("stream state", state_len))
                .collect::<GpuResult<_>>()?,
            grad_a: z("grad a", state_len)?,
            grad_b: z("grad b", state_len)?,
            tokens_dev: z("tokens", rows)?,
            targets_dev: z("targets", rows)?,
            offsets_dev: z("token offsets", v + 1)?,
            rows_dev: z("rows by token", rows)?,
            reduced: z("reduced", rows * c)?,
            normed: z("normed", rows * c)?,
            inv: z("inv_rms", rows)?,
            logits: z("logits", rows * v)?,
            loss_rows: z("loss rows", rows)?,
            d_normed: z("d normed", rows * c)?,
            d_reduced: z("d reduced", rows * c)?,
            partials: z("grad partials", 1)?,
            inputs: Vec::new(),
            config,
            train,
            batch,
            ctx: ctx.clone(),
        };
        let parts: usize = me
            .slots()
            .iter()
            .map(|s| match s {
                Slot::Dense(p) => p.len().div_ceil(ops::SUM_SQUARES_CHUNK),
                Slot::Packed(..) => 0,
            })
            .sum::<usize>()
            + me.connections()
                .iter()
                .map(|c| c.wrapper.layout().total.div_ceil(ops::SUM_SQUARES_CHUNK))
                .sum::<usize>();
        me.partials = ctx.zeros("grad partials", parts.max(1))?;
        me.load_optimizer(cpu)?;
        Ok(me)
    }

    /// The context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    fn connections(&self) -> Vec<&Connection> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.attn_conn, &b.mlp_conn])
            .collect()
    }

    /// Every tensor in the core's parameter order ([`mhc_core::model::Model::for_each_param`]).
    fn slots(&self) -> Vec<Slot<'_>> {
        let mut out = vec![
            Slot::Dense(&self.token_embedding),
            Slot::Dense(&self.position_embedding),
        ];
        fn packed<'a>(conn: &'a Connection, out: &mut Vec<Slot<'a>>) {
            let l = conn.wrapper.layout();
            for i in 0..9 {
                if l.lens[i] > 0 {
                    out.push(Slot::Packed(conn, l.offsets[i], l.lens[i]));
                }
            }
        }
        for b in &self.blocks {
            out.extend([
                Slot::Dense(&b.attn.norm),
                Slot::Dense(&b.attn.wqkv),
                Slot::Dense(&b.attn.wo),
            ]);
            packed(&b.attn_conn, &mut out);
            out.extend([
                Slot::Dense(&b.mlp.norm),
                Slot::Dense(&b.mlp.w1),
                Slot::Dense(&b.mlp.w2),
            ]);
            packed(&b.mlp_conn, &mut out);
        }
        out.push(Slot::Dense(&self.final_norm));
        out.push(Slot::Dense(&self.head));
        out
    }

    /// Uploads a CPU trainer's AdamW state (moments and step), e.g. after loading a checkpoint.
    pub fn load_optimizer(&mut self, cpu: &Trainer<f32>) -> GpuResult<()> {
        let ctx = self.ctx.clone();
        let slots = self.slots();
        if slots.len() != cpu.optimizer.m.len() {
            return Err(GpuError::Shape {
                what: "AdamW state (tensors)",
                expected: slots.len(),
                got: cpu.optimizer.m.len(),
            });
        }
        for (i, s) in slots.iter().enumerate() {
            let (m, v) = (&cpu.optimizer.m[i], &cpu.optimizer.v[i]);
            match s {
                Slot::Dense(p) => {
                    ctx.write(&p.m, 0, m)?;
                    ctx.write(&p.v, 0, v)?;
                }
                Slot::Packed(c, off, _) => {
                    ctx.write(&c.m, *off, m)?;
                    ctx.write(&c.v, *off, v)?;
                }
            }
        }
        self.step = cpu.optimizer.step;
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32]) -> GpuResult<()> {
        let (c, n, v, seq) = (
            self.config.width,
            self.config.streams,
            self.config.vocab,
            self.config.context,
        );
        let rows = self.batch * seq;
        if tokens.len() != self.batch * (seq + 1) {
            return Err(GpuError::Shape {
                what: "token batch [batch, context + 1]",
                expected: self.batch * (seq + 1),
                got: tokens.len(),
            });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(MhcError::TokenOutOfRange { token, vocab: v }.into());
        }
        let (mut inputs, mut targets) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for row in tokens.chunks_exact(seq + 1) {
            inputs.extend_from_slice(&row[..seq]);
            targets.extend_from_slice(&row[1..]);
        }
        let ctx = self.ctx.clone();
        ctx.write(&self.tokens_dev, 0, &inputs)?;
        ctx.write(&self.targets_dev, 0, &targets)?;
        ops::embed(
            &ctx,
            &self.tokens_dev,
            &self.token_embedding.value,
            &self.position_embedding.value,
            rows,
            seq,
            n,
            c,
            &self.states[0],
        )?;
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let (x, out) = (&self.states[2 * l], &self.states[2 * l + 1]);
            b.attn_conn.wrapper.forward(&mut b.attn, x, out, rows)?;
            let (x, out) = (&self.states[2 * l + 1], &self.states[2 * l + 2]);
            b.mlp_conn.wrapper.forward(&mut b.mlp, x, out, rows)?;
        }
        let last = &self.states[self.config.sublayers()];
        ops::streams_mean(&ctx, last, rows, n, c, &self.reduced, false)?;
        ops::rmsnorm(
            &ctx,
            &self.reduced,
            &self.final_norm.value,
            rows,
            c,
            NORM_EPS,
            &self.normed,
            &self.inv,
        )?;
        ops::matmul(
            &ctx,
            &self.normed,
            &self.head.value,
            &self.logits,
            rows,
            c,
            v,
        )?;
        ops::cross_entropy(
            &ctx,
            &self.logits,
            &self.targets_dev,
            rows,
            v,
            &self.loss_rows,
        )?;
        self.inputs = inputs;
        Ok(())
    }

    async fn loss(&self) -> GpuResult<f64> {
        let rows = self.batch * self.config.context;
        mean_loss(&self.ctx.read(&self.loss_rows, 0, rows).await?)
    }

    /// One AdamW step on `tokens [batch, context + 1]` (the batch the CPU
    /// trainer would sample). On a non-finite loss or gradient nothing is
    /// updated and [`GpuError::Core`] with [`MhcError::NonFinite`] is returned.
    pub async fn step_async(&mut self, tokens: &[u32]) -> GpuResult<StepStats> {
        let (c, n, v, seq) = (
            self.config.width,
            self.config.streams,
            self.config.vocab,
            self.config.context,
        );
        let rows = self.batch * seq;
        let ctx = self.ctx.clone();
        for s in self.slots() {
            if let Slot::Dense(p) = s {
                ctx.clear(&p.grad)?;
            }
        }
        for conn in self.connections() {
            conn.wrapper.zero_grads()?;
        }
        self.forward(tokens)?;
        // Backward: head, final norm, mean over streams, the wrapped sublayers, embeddings.
        ops::matmul_grad_b(
            &ctx,
            &self.normed,
            &self.logits,
            &self.head.grad,
            rows,
            c,
            v,
        )?;
        ops::matmul_grad_a(
            &ctx,
            &self.logits,
            &self.head.value,
            &self.d_normed,
            rows,
            c,
            v,
        )?;
        ops::rmsnorm_backward(
            &ctx,
            &self.reduced,
            &self.final_norm.value,
            &self.inv,
            &self.d_normed,
            rows,
            c,
            &self.d_reduced,
            &self.final_norm.grad,
        )?;
        ops::streams_mean(&ctx, &self.d_reduced, rows, n, c, &self.grad_a, true)?;
        for (l, b) in self.blocks.iter_mut().enumerate().rev() {
            b.mlp_conn.wrapper.backward(
                &mut b.mlp,
                &self.states[2 * l + 1],
                &self.grad_a,
                &self.grad_b,
                rows,
            )?;
            b.attn_conn.wrapper.backward(
                &mut b.attn,
                &self.states[2 * l],
                &self.grad_b,
                &self.grad_a,
                rows,
            )?;
        }
        let (offsets, by_token) = ops::token_rows(&self.inputs, v);
        ctx.write(&self.offsets_dev, 0, &offsets)?;
        ctx.write(&self.rows_dev, 0, &by_token)?;
        ops::embed_backward(
            &ctx,
            &self.grad_a,
            &self.offsets_dev,
            &self.rows_dev,
            v,
            self.batch,
            seq,
            n,
            c,
            &self.token_embedding.grad,
            &self.position_embedding.grad,
        )?;
        // Global gradient norm from partial sums of squares, then clipping and AdamW.
        let mut at = 0;
        for s in self.slots() {
            if let Slot::Dense(p) = s {
                at += ops::sum_squares(&ctx, &p.grad, p.len(), &self.partials, at)?;
            }
        }
        for conn in self.connections() {
            let g = conn.wrapper.grads_buffer();
            at += ops::sum_squares(&ctx, g, conn.wrapper.layout().total, &self.partials, at)?;
        }
        // One readback for the per-row losses and the partial sums of squares.
        let mut back = ctx
            .read_many::<f32>(&[(&self.loss_rows, 0, rows), (&self.partials, 0, at)])
            .await?;
        let partials = back.pop().unwrap_or_default();
        let loss = mean_loss(&back.pop().unwrap_or_default())?;
        let grad_norm = partials.iter().map(|&x| x as f64).sum::<f64>().sqrt();
        if !grad_norm.is_finite() {
            return Err(MhcError::NonFinite {
                what: "gradient",
                index: 0,
            }
            .into());
        }
        let lr = self.train.schedule.lr(self.step);
        let clip = self.train.clip;
        let scale = if clip > 0.0 && grad_norm > clip {
            (clip / grad_norm) as f32
        } else {
            1.0
        };
        self.step += 1;
        let (step, adamw) = (self.step, self.train.adamw);
        for s in self.slots() {
            if let Slot::Dense(p) = s {
                ops::adamw(
                    &ctx,
                    &p.value,
                    &p.grad,
                    &p.m,
                    &p.v,
                    p.len(),
                    &adamw,
                    lr,
                    step,
                    p.decay,
                    scale,
                )?;
            }
        }
        for conn in self.connections() {
            let w = &conn.wrapper;
            ops::adamw(
                &ctx,
                w.params_buffer(),
                w.grads_buffer(),
                &conn.m,
                &conn.v,
                w.layout().total,
                &adamw,
                lr,
                step,
                false,
                scale,
            )?;
        }
        ctx.flush()?;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
        })
    }

    /// Mean loss over `batches` fixed windows of `data` (the same windows as
    /// [`mhc_core::model::Trainer::evaluate`] with the same `seed`).
    pub async fn evaluate_async(
        &mut self,
        data: &[u8],
        batches: usize,
        seed: u64,
    ) -> GpuResult<f64> {
        let seq = self.config.context;
        let mut rng = Rng::new(seed);
        let mut tokens = vec![0u32; self.batch * (seq + 1)];
        let mut total = 0.0;
        for _ in 0..batches.max(1) {
            mhc_core::model::data::sample_batch(data, self.batch, seq, &mut rng, &mut tokens)?;
            self.forward(&tokens)?;
            total += self.loss().await?;
        }
        Ok(total / batches.max(1) as f64)
    }

    /// Every wrapped sublayer's coefficients of the last forward (a training
    /// step's or an evaluation's), in the model's order (attention, MLP of
    /// block 0, …): `2L` vectors of `[tokens, n² + 2n]`, each row `H_pre (n)`,
    /// `H_post (n)`, `H_res (n × n, row-major)` — the layout of
    /// [`mhc_core::model::Model::sublayer_coefficients`]. One readback.
    pub async fn coefficients_async(&self) -> GpuResult<Vec<Vec<f32>>> {
        let k = self.config.connection().coefficient_len();
        let tokens = self.batch * self.config.context;
        let conns = self.connections();
        let ranges: Vec<(&GpuBuffer, usize, usize)> = conns
            .iter()
            .map(|c| (c.wrapper.coefficients_buffer(), 0, tokens * k))
            .collect();
        self.ctx.read_many(&ranges).await
    }

    /// Amax gains of every `H_res` of the last forward (as [`mhc_core::model::Model::gain_report`]).
    pub async fn gain_report_async(&self) -> GpuResult<GainReport> {
        let coefficients = self.coefficients_async().await?;
        self.gain_report_of(&coefficients)
    }

    /// The gain report of coefficients read with [`Self::coefficients_async`]
    /// (so that a caller needing both reads them once).
    pub fn gain_report_of(&self, coefficients: &[Vec<f32>]) -> GpuResult<GainReport> {
        let n = self.config.streams;
        let k = self.config.connection().coefficient_len();
        let per_layer: Vec<Vec<f64>> = coefficients
            .iter()
            .map(|coef| {
                coef.chunks_exact(k)
                    .flat_map(|row| row[2 * n..].iter().map(|&v| v as f64))
                    .collect()
            })
            .collect();
        Ok(GainReport::from_h_res(
            &per_layer,
            n,
            self.config.scheme.is_manifold_constrained(),
        )?)
    }

    /// Every parameter (`gradients = false`) or its gradient of the last step
    /// (`true`), downloaded in the core's order with the core's names.
    pub async fn tensors_async(&self, gradients: bool) -> GpuResult<Vec<(String, Vec<f32>)>> {
        let mut names = Vec::new();
        {
            // The core's names in its order, from a model of the same shape is
            // costly; build them from the same rules instead.
            names.push("token_embedding".to_string());
            names.push("position_embedding".to_string());
            let conn_names = mhc_core::ConnectionParams::<f32>::NAMES;
            for (l, b) in self.blocks.iter().enumerate() {
                for (prefix, dense, conn) in [
                    ("attn", ["norm", "wqkv", "wo"], &b.attn_conn),
                    ("mlp", ["norm", "w1", "w2"], &b.mlp_conn),
                ] {
                    for d in dense {
                        names.push(format!("blocks.{l}.{prefix}.{d}"));
                    }
                    for (i, name) in conn_names.iter().enumerate() {
                        if conn.wrapper.layout().lens[i] > 0 {
                            names.push(format!("blocks.{l}.{prefix}.conn.{name}"));
                        }
                    }
                }
            }
            names.push("final_norm".to_string());
            names.push("head".to_string());
        }
        let ranges: Vec<(&GpuBuffer, usize, usize)> = self
            .slots()
            .into_iter()
            .map(|s| match s {
                Slot::Dense(p) => {
                    let b = if gradients { &p.grad } else { &p.value };
                    (b, 0, b.len())
                }
                Slot::Packed(c, off, len) => {
                    let b = if gradients {
                        c.wrapper.grads_buffer()
                    } else {
                        c.wrapper.params_buffer()
                    };
                    (b, off, len)
                }
            })
            .collect();
        let data = self.ctx.read_many(&ranges).await?;
        Ok(names.into_iter().zip(data).collect())
    }

    /// Copies weights, AdamW moments and the step count into `cpu` (for checkpoints and sampling).
    pub async fn sync_to_cpu_async(&self, cpu: &mut Trainer<f32>) -> GpuResult<()> {
        let params = self.tensors_async(false).await?;
        let mut i = 0;
        let mut bad = None;
        cpu.model.for_each_param(|_, p, _| {
            match params.get(i) {
                Some((_, v)) if v.len() == p.len() => p.copy_from_slice(v),
                _ => bad = Some(i),
            }
            i += 1;
        });
        if bad.is_some() || i != params.len() {
            return Err(GpuError::Shape {
                what: "CPU model parameters (tensors)",
                expected: params.len(),
                got: i,
            });
        }
        let slots = self.slots();
        let ranges: Vec<(&GpuBuffer, usize, usize)> = slots
            .iter()
            .flat_map(|s| match s {
                Slot::Dense(p) => [(&p.m, 0, p.len()), (&p.v, 0, p.len())],
                Slot::Packed(c, off, len) => [(&c.m, *off, *len), (&c.v, *off, *len)],
            })
            .collect();
        let moments = self.ctx.read_many(&ranges).await?;
        if moments.len() != 2 * cpu.optimizer.m.len()
            || cpu.optimizer.m.len() != cpu.optimizer.v.len()
        {
            return Err(GpuError::Shape {
                what: "AdamW state (tensors)",
                expected: slots.len(),
                got: cpu.optimizer.m.len(),
            });
        }
        let mut moments = moments.into_iter();
        for (m, v) in cpu.optimizer.m.iter_mut().zip(cpu.optimizer.v.iter_mut()) {
            *m = moments.next().unwrap_or_default();
            *v = moments.next().unwrap_or_default();
        }
        cpu.optimizer.step = self.step;
        Ok(())
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl WgpuTrainer {
    /// [`Self::step_async`], blocking.
    pub fn step(&mut self, tokens: &[u32]) -> GpuResult<StepStats> {
        pollster::block_on(self.step_async(tokens))
    }

    /// [`Self::evaluate_async`], blocking.
    pub fn evaluate(&mut self, data: &[u8], batches: usize, seed: u64) -> GpuResult<f64> {
        pollster::block_on(self.evaluate_async(data, batches, seed))
    }

    /// [`Self::coefficients_async`], blocking.
    pub fn coefficients(&self) -> GpuResult<Vec<Vec<f32>>> {
        pollster::block_on(self.coefficients_async())
    }

    /// [`Self::gain_report_async`], blocking.
    pub fn gain_report(&self) -> GpuResult<GainReport> {
        pollster::block_on(self.gain_report_async())
    }

    /// [`Self::tensors_async`], blocking.
    pub fn tensors(&self, gradients: bool) -> GpuResult<Vec<(String, Vec<f32>)>> {
        pollster::block_on(self.tensors_async(gradients))
    }

    /// [`Self::sync_to_cpu_async`], blocking.
    pub fn sync_to_cpu(&self, cpu: &mut Trainer<f32>) -> GpuResult<()> {
        pollster::block_on(self.sync_to_cpu_async(cpu))
    }
}
