//! The reference model on the GPU: the same architecture, parameters and
//! update as [`mhc_core::model::Trainer`], built from the parity-tested
//! kernels of [`super::ModelKernels`], cuBLAS ([`super::MatMul`]) and the fused
//! mHC wrapper ([`super::MhcCuda`]). At f32 products one training step matches
//! the CPU reference (`tests/cuda_trainer.rs`); at bf16 products (the default
//! of `mhc-train`) every activation and gradient a product reads exists once
//! as bf16 — written so by its producer, or rounded once and reused (weights
//! are rounded per product) — and attention runs on the flash
//! kernels where the head dimension allows ([`GpuTrainer::attention_kind`]).
//! Schemes: residual, HC and mHC (dynamic; the static variants give
//! [`CudaError::Unsupported`]).
//!
//! Every parameter, its gradient and its AdamW moments live on the device —
//! the connection parameters (φ, γ, b, α; HC's θ) too, in the wrappers'
//! layouts ([`MhcCuda::pack`], [`HcCuda::pack`]): a step copies one vector of
//! gradient-norm partials and the loss to the host, nothing else. The device
//! AdamW is the core's update in f32 (checked against it in
//! `tests/cuda_model_ops.rs`).
//!
//! The residual streams (the state `x`, each sublayer's input `h` and output
//! `y`, and their gradients) are `S`: f32 ([`GpuTrainer::from_cpu_with`]) or
//! bf16 ([`GpuTrainer::from_cpu_bf16_streams`], DESIGN.md §3's CUDA default,
//! with bf16 products): half the bytes in every pass over the streams, which
//! is what bounds the mHC wrapper. Coefficients, norms, reductions, weights
//! and their gradients stay f32.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use mhc_core::model::optim::Schedule;
use mhc_core::model::parallel::AllReduce;
use mhc_core::model::{ModelConfig, TrainConfig, Trainer};
use mhc_core::{ConnectionConfig, ConnectionParams, Scheme};

use super::{
    CudaDevice, CudaError, CudaResult, CudaSublayer, GemmPrecision, HcCuda, MatMul, MhcCuda,
    ModelKernels, Operand, StreamElement, StreamMut, StreamRef,
};

type Bf16Buf = CudaSlice<half::bf16>;
type Scratch<T> = std::sync::Mutex<T>;

/// A dense tensor on the device with its gradient and AdamW moments.
pub struct DeviceParam {
    /// Values.
    pub value: CudaSlice<f32>,
    /// Gradient of the last step.
    pub grad: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    decay: bool,
    /// A matrix of the bf16 products: its values rounded to bf16 (to nearest
    /// even), rewritten by every AdamW update.
    value16: Option<Bf16Buf>,
}

impl DeviceParam {
    fn upload(dev: &CudaDevice, host: &[f32], decay: bool) -> CudaResult<Self> {
        let st = dev.stream();
        Ok(Self {
            value: st.clone_htod(host)?,
            grad: st.alloc_zeros(host.len())?,
            m: st.alloc_zeros(host.len())?,
            v: st.alloc_zeros(host.len())?,
            decay,
            value16: None,
        })
    }

    /// As [`Self::upload`], for a matrix that is a product operand: at bf16
    /// products it also keeps the bf16 copy of its values.
    fn upload_matrix(dev: &CudaDevice, host: &[f32], bf16: bool) -> CudaResult<Self> {
        let mut p = Self::upload(dev, host, true)?;
        if bf16 {
            let rounded: Vec<half::bf16> = host.iter().map(|&x| half::bf16::from_f32(x)).collect();
            p.value16 = Some(dev.stream().clone_htod(&rounded)?);
        }
        Ok(p)
    }

    /// The values as a product operand: the bf16 copy where there is one.
    fn operand(&self) -> Operand<'_> {
        match &self.value16 {
            Some(w) => Operand::Bf16(w),
            None => Operand::F32(&self.value),
        }
    }
}

struct Ctx {
    k: ModelKernels,
    mm: MatMul,
    /// Attention by the flash kernels (bf16 products, no `seq × seq` scores)
    /// rather than GEMMs around a softmax kernel.
    flash: bool,
    /// Scratch shared by every layer's attention backward: the gradient of the
    /// probabilities (GEMM path) or the per-row `dO·O` (flash path)…
    dprobs: std::sync::Mutex<CudaSlice<f32>>,
    /// …and the bf16 copy of the attention output's gradient (flash path).
    dout16: Scratch<Bf16Buf>,
    /// At bf16 products: the bf16 copies of the gradients a backward feeds to
    /// two products (rows × C, 3C, 4C); each is rounded once, not per product.
    grad16: Scratch<[Bf16Buf; 3]>,
}

impl Ctx {
    /// Whether products run on bf16 copies (made once per tensor and reused).
    fn bf16(&self) -> bool {
        self.mm.precision() == GemmPrecision::Bf16
    }

    /// `x` as a product operand: at bf16, rounded into `copy` (kept for later products).
    fn round<'a>(&self, x: &'a CudaSlice<f32>, copy: &'a mut Bf16Buf) -> CudaResult<Operand<'a>> {
        if self.bf16() {
            self.k.to_bf16(x, copy)?;
            Ok(Operand::Bf16(copy))
        } else {
            Ok(Operand::F32(x))
        }
    }

    /// `x` as a product operand, using the copy a previous [`Self::round`] made.
    fn rounded<'a>(&self, x: &'a CudaSlice<f32>, copy: &'a Bf16Buf) -> Operand<'a> {
        if self.bf16() {
            Operand::Bf16(copy)
        } else {
            Operand::F32(x)
        }
    }

    /// RMSNorm of `x` (f32 or bf16 stream) into the product input: at bf16
    /// straight into `y16` (rounded as written; `y` is not written), else into `y`.
    #[allow(clippy::too_many_arguments)]
    fn norm<S: StreamElement>(
        &self,
        x: &CudaSlice<S>,
        w: &CudaSlice<f32>,
        rows: usize,
        c: usize,
        y: &mut CudaSlice<f32>,
        y16: &mut Bf16Buf,
        inv: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        if self.bf16() {
            self.k.rmsnorm_bf16(x, w, rows, c, 1e-6, y16, inv)
        } else {
            match S::view(x) {
                StreamRef::F32(x) => self.k.rmsnorm(x, w, rows, c, 1e-6, y, inv),
                StreamRef::Bf16(_) => Err(bf16_streams_need_bf16_products()),
            }
        }
    }

    /// `y = a·b` written as the stream type (f32, or bf16 rounded by the product's epilogue).
    fn product_out<S: StreamElement>(
        &self,
        a: Operand,
        b: Operand,
        y: &mut CudaSlice<S>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> CudaResult<()> {
        match S::view_mut(y) {
            StreamMut::F32(y) => self.mm.matmul(a, b, y, rows, k, n),
            StreamMut::Bf16(y) => self.mm.matmul_to_bf16(a, b, y, rows, k, n),
        }
    }

    /// A stream gradient as a product operand: bf16 streams are one already;
    /// f32 ones are rounded into `copy` at bf16 products (see [`Self::round`]).
    fn stream_operand<'a, S: StreamElement>(
        &self,
        dy: &'a CudaSlice<S>,
        copy: &'a mut Bf16Buf,
    ) -> CudaResult<Operand<'a>> {
        match S::view(dy) {
            StreamRef::F32(dy) => self.round(dy, copy),
            StreamRef::Bf16(dy) => Ok(Operand::Bf16(dy)),
        }
    }

    /// Backward of `y = x·W` for a parameter `W [k, n]` over `rows`:
    /// `W.grad += xᵀ·dy` and `dx = dy·Wᵀ`.
    fn linear_backward(
        &self,
        x: Operand,
        w: &mut DeviceParam,
        dy: Operand,
        dx: &mut CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> CudaResult<()> {
        self.mm.matmul_grad_b(x, dy, &mut w.grad, rows, k, n)?;
        self.mm.matmul_grad_a(dy, w.operand(), dx, rows, k, n)
    }

    fn scratch<'a, T>(m: &'a Scratch<T>) -> CudaResult<std::sync::MutexGuard<'a, T>> {
        m.lock()
            .map_err(|_| CudaError::Driver("GPU scratch poisoned".into()))
    }
}

fn bf16_streams_need_bf16_products() -> CudaError {
    CudaError::Unsupported("bf16 streams need bf16 products (--precision bf16)".into())
}

/// RMSNorm → causal attention sublayer on the GPU.
struct GpuAttention {
    ctx: Arc<Ctx>,
    norm: DeviceParam,
    wqkv: DeviceParam,
    wo: DeviceParam,
    batch: usize,
    seq: usize,
    heads: usize,
    normed: CudaSlice<f32>,
    inv: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    /// `qkv` in bf16, the flash kernels' input (then `qkv` itself is one
    /// element; `qkv16` is one element on the GEMM path).
    qkv16: Bf16Buf,
    /// bf16 copies of the products' inputs (one element at f32/tf32 products).
    normed16: Bf16Buf,
    o16: Bf16Buf,
    /// The probabilities `[batch, heads, seq, seq]` (GEMM path) or the row
    /// log-sum-exps `[batch, heads, seq]` (flash path).
    probs: CudaSlice<f32>,
    o: CudaSlice<f32>,
    d_o: CudaSlice<f32>,
    dqkv: CudaSlice<f32>,
    dnormed: CudaSlice<f32>,
}

impl<S: StreamElement> CudaSublayer<S> for GpuAttention {
    fn forward(
        &mut self,
        _: &CudaDevice,
        h: &CudaSlice<S>,
        y: &mut CudaSlice<S>,
        rows: usize,
        c: usize,
    ) -> CudaResult<()> {
        let ctx = &*self.ctx;
        let Ctx { k, mm, .. } = ctx;
        ctx.norm(
            h,
            &self.norm.value,
            rows,
            c,
            &mut self.normed,
            &mut self.normed16,
            &mut self.inv,
        )?;
        let normed = ctx.rounded(&self.normed, &self.normed16);
        if ctx.flash {
            // The flash kernels read bf16: the product writes it directly.
            mm.matmul_to_bf16(normed, self.wqkv.operand(), &mut self.qkv16, rows, c, 3 * c)?;
            k.flash_attention(
                &self.qkv16,
                self.batch,
                self.seq,
                self.heads,
                c / self.heads,
                &mut self.probs,
                &mut self.o,
                Some(&mut self.o16),
            )?;
            return ctx.product_out(Operand::Bf16(&self.o16), self.wo.operand(), y, rows, c, c);
        } else {
            mm.matmul(normed, self.wqkv.operand(), &mut self.qkv, rows, c, 3 * c)?;
            k.attention_gemm(
                mm,
                &self.qkv,
                self.batch,
                self.seq,
                self.heads,
                c / self.heads,
                &mut self.probs,
                &mut self.o,
            )?;
        }
        let o = ctx.round(&self.o, &mut self.o16)?;
        ctx.product_out(o, self.wo.operand(), y, rows, c, c)
    }
    fn vjp(
        &mut self,
        _: &CudaDevice,
        h: &CudaSlice<S>,
        dy: &CudaSlice<S>,
        dh: &mut CudaSlice<S>,
        rows: usize,
        c: usize,
    ) -> CudaResult<()> {
        let Ctx {
            k,
            mm,
            flash,
            dprobs,
            dout16,
            ..
        } = &*self.ctx;
        let ctx = &*self.ctx;
        let mut grad16 = Ctx::scratch(&ctx.grad16)?;
        let [g_c, g_3c, _] = &mut *grad16;
        let dy16 = ctx.stream_operand(dy, g_c)?;
        ctx.linear_backward(
            ctx.rounded(&self.o, &self.o16),
            &mut self.wo,
            dy16,
            &mut self.d_o,
            rows,
            c,
            c,
        )?;
        {
            let mut scratch = dprobs
                .lock()
                .map_err(|_| CudaError::Driver("attention scratch poisoned".into()))?;
            if *flash {
                let mut dout16 = dout16
                    .lock()
                    .map_err(|_| CudaError::Driver("attention scratch poisoned".into()))?;
                k.flash_attention_backward(
                    &self.qkv16,
                    &self.o,
                    &self.probs,
                    &self.d_o,
                    self.batch,
                    self.seq,
                    self.heads,
                    c / self.heads,
                    &mut scratch,
                    &mut dout16,
                    None,
                    Some(g_3c),
                )?;
            } else {
                k.attention_gemm_backward(
                    mm,
                    &self.qkv,
                    &self.probs,
                    &self.d_o,
                    self.batch,
                    self.seq,
                    self.heads,
                    c / self.heads,
                    &mut scratch,
                    &mut self.dqkv,
                )?;
            }
        }
        // The flash backward wrote the bf16 gradient itself.
        let dqkv16 = if *flash {
            Operand::Bf16(g_3c)
        } else {
            ctx.round(&self.dqkv, g_3c)?
        };
        ctx.linear_backward(
            ctx.rounded(&self.normed, &self.normed16),
            &mut self.wqkv,
            dqkv16,
            &mut self.dnormed,
            rows,
            c,
            3 * c,
        )?;
        k.rmsnorm_backward(
            h,
            &self.norm.value,
            &self.inv,
            &self.dnormed,
            rows,
            c,
            dh,
            &mut self.norm.grad,
        )
    }
}

/// RMSNorm → GELU MLP sublayer on the GPU.
struct GpuMlp {
    ctx: Arc<Ctx>,
    norm: DeviceParam,
    w1: DeviceParam,
    w2: DeviceParam,
    normed: CudaSlice<f32>,
    inv: CudaSlice<f32>,
    pre: CudaSlice<f32>,
    act: CudaSlice<f32>,
    /// bf16 copies of the products' inputs (one element at f32/tf32 products).
    normed16: Bf16Buf,
    act16: Bf16Buf,
    dact: CudaSlice<f32>,
    dpre: CudaSlice<f32>,
    dnormed: CudaSlice<f32>,
}

impl<S: StreamElement> CudaSublayer<S> for GpuMlp {
    fn forward(
        &mut self,
        _: &CudaDevice,
        h: &CudaSlice<S>,
        y: &mut CudaSlice<S>,
        rows: usize,
        c: usize,
    ) -> CudaResult<()> {
        let ctx = &*self.ctx;
        let Ctx { k, mm, .. } = ctx;
        ctx.norm(
            h,
            &self.norm.value,
            rows,
            c,
            &mut self.normed,
            &mut self.normed16,
            &mut self.inv,
        )?;
        let normed = ctx.rounded(&self.normed, &self.normed16);
        mm.matmul(normed, self.w1.operand(), &mut self.pre, rows, c, 4 * c)?;
        if ctx.bf16() {
            k.gelu_bf16(&self.pre, &mut self.act16)?;
        } else {
            k.gelu(&self.pre, &mut self.act)?;
        }
        let act = ctx.rounded(&self.act, &self.act16);
        ctx.product_out(act, self.w2.operand(), y, rows, 4 * c, c)
    }
    fn vjp(
        &mut self,
        _: &CudaDevice,
        h: &CudaSlice<S>,
        dy: &CudaSlice<S>,
        dh: &mut CudaSlice<S>,
        rows: usize,
        c: usize,
    ) -> CudaResult<()> {
        let ctx = &*self.ctx;
        let Ctx { k, .. } = ctx;
        let mut grad16 = Ctx::scratch(&ctx.grad16)?;
        let [g_c, _, g_4c] = &mut *grad16;
        let dy16 = ctx.stream_operand(dy, g_c)?;
        ctx.linear_backward(
            ctx.rounded(&self.act, &self.act16),
            &mut self.w2,
            dy16,
            &mut self.dact,
            rows,
            4 * c,
            c,
        )?;
        let dpre16 = if ctx.bf16() {
            k.gelu_backward_bf16(&self.pre, &self.dact, g_4c)?;
            Operand::Bf16(g_4c)
        } else {
            k.gelu_backward(&self.pre, &self.dact, &mut self.dpre)?;
            Operand::F32(&self.dpre)
        };
        ctx.linear_backward(
            ctx.rounded(&self.normed, &self.normed16),
            &mut self.w1,
            dpre16,
            &mut self.dnormed,
            rows,
            c,
            4 * c,
        )?;
        k.rmsnorm_backward(
            h,
            &self.norm.value,
            &self.inv,
            &self.dnormed,
            rows,
            c,
            dh,
            &mut self.norm.grad,
        )
    }
}

/// What the trainer needs of a GPU connection wrapper (mHC or HC) on streams of `S`.
trait GpuConnection<S: StreamElement> {
    fn forward(
        &mut self,
        sub: &mut dyn CudaSublayer<S>,
        x: &CudaSlice<S>,
        out: &mut CudaSlice<S>,
    ) -> CudaResult<()>;
    fn backward(
        &mut self,
        sub: &mut dyn CudaSublayer<S>,
        x: &CudaSlice<S>,
        grad_out: &CudaSlice<S>,
        grad_x: &mut CudaSlice<S>,
    ) -> CudaResult<()>;
    fn coefficients_host(&self) -> CudaResult<Vec<f32>>;
    fn pack(&self, params: &ConnectionParams<f32>) -> CudaResult<Vec<Vec<f32>>>;
    fn unpack(
        &self,
        config: &ConnectionConfig,
        packed: &[Vec<f32>],
    ) -> CudaResult<ConnectionParams<f32>>;
    fn values(&self) -> Vec<&CudaSlice<f32>>;
    fn grads(&self) -> Vec<&CudaSlice<f32>>;
    fn buffers_mut(&mut self) -> Vec<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>;
    fn params_updated(&mut self) -> CudaResult<()>;
}

macro_rules! gpu_connection {
    ($t:ty, $s:ty $(, $g:ident)?) => {
        impl$(<$g: StreamElement>)? GpuConnection<$s> for $t {
            fn forward(
                &mut self,
                sub: &mut dyn CudaSublayer<$s>,
                x: &CudaSlice<$s>,
                out: &mut CudaSlice<$s>,
            ) -> CudaResult<()> {
                <$t>::forward(self, sub, x, out)
            }
            fn backward(
                &mut self,
                sub: &mut dyn CudaSublayer<$s>,
                x: &CudaSlice<$s>,
                grad_out: &CudaSlice<$s>,
                grad_x: &mut CudaSlice<$s>,
            ) -> CudaResult<()> {
                <$t>::backward(self, sub, x, grad_out, grad_x)
            }
            fn coefficients_host(&self) -> CudaResult<Vec<f32>> {
                <$t>::coefficients_host(self)
            }
            fn pack(&self, params: &ConnectionParams<f32>) -> CudaResult<Vec<Vec<f32>>> {
                <$t>::pack(self, params)
            }
            fn unpack(
                &self,
                config: &ConnectionConfig,
                packed: &[Vec<f32>],
            ) -> CudaResult<ConnectionParams<f32>> {
                <$t>::unpack(self, config, packed)
            }
            fn values(&self) -> Vec<&CudaSlice<f32>> {
                <$t>::values(self)
            }
            fn grads(&self) -> Vec<&CudaSlice<f32>> {
                <$t>::grads(self)
            }
            fn buffers_mut(&mut self) -> Vec<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)> {
                <$t>::buffers_mut(self)
            }
            fn params_updated(&mut self) -> CudaResult<()> {
                <$t>::params_updated(self)
            }
        }
    };
}
gpu_connection!(MhcCuda<S>, S, S);
gpu_connection!(HcCuda, f32);

/// The HC wrapper as a connection on `S` streams: its kernels take f32
/// streams only (the product `x̃·θ` is an f32 cuBLAS GEMM), so bf16 gives
/// [`CudaError::Unsupported`].
fn hc_connection<S: StreamElement>(hc: HcCuda) -> CudaResult<Box<dyn GpuConnection<S>>> {
    let boxed: Box<dyn GpuConnection<f32>> = Box::new(hc);
    let any: Box<dyn std::any::Any> = Box::new(boxed);
    any.downcast::<Box<dyn GpuConnection<S>>>()
        .map(|b| *b)
        .map_err(|_| {
            CudaError::Unsupported(
                "HC on the GPU has f32 streams only; train it with --streams f32".into(),
            )
        })
}

/// A wrapped sublayer's connection on the GPU.
enum Connection<S: StreamElement> {
    /// `x' = x + F(x)`.
    Residual { y: CudaSlice<S>, dh: CudaSlice<S> },
    /// The fused mHC or HC wrapper (parameters and gradients on the device)
    /// and the AdamW moments `(m, v)` of each of its parameter buffers.
    Wrapped {
        wrapper: Box<dyn GpuConnection<S>>,
        moments: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    },
}

impl<S: StreamElement> Connection<S> {
    /// A wrapper with zero AdamW moments.
    fn wrapped(dev: &CudaDevice, wrapper: Box<dyn GpuConnection<S>>) -> CudaResult<Self> {
        let st = dev.stream();
        let moments = wrapper
            .values()
            .iter()
            .map(|v| Ok((st.alloc_zeros(v.len())?, st.alloc_zeros(v.len())?)))
            .collect::<CudaResult<_>>()?;
        Ok(Self::Wrapped { wrapper, moments })
    }

    /// How many tensors this connection has in the core's parameter order.
    fn tensor_count(&self, config: &ModelConfig) -> usize {
        match self {
            Connection::Residual { .. } => 0,
            Connection::Wrapped { .. } => ConnectionParams::<f32>::zeros(&config.connection())
                .tensors()
                .iter()
                .filter(|(_, t)| !t.is_empty())
                .count(),
        }
    }
}

struct GpuBlock<S: StreamElement> {
    attn: GpuAttention,
    attn_conn: Connection<S>,
    mlp: GpuMlp,
    mlp_conn: Connection<S>,
}

/// The model and its optimiser state on one GPU, for a fixed batch shape,
/// with residual streams of `S` (f32 or `half::bf16`).
pub struct GpuTrainer<S: StreamElement = f32> {
    dev: Arc<CudaDevice>,
    ctx: Arc<Ctx>,
    config: ModelConfig,
    train: TrainConfig,
    batch: usize,
    token_embedding: DeviceParam,
    position_embedding: DeviceParam,
    blocks: Vec<GpuBlock<S>>,
    final_norm: DeviceParam,
    head: DeviceParam,
    step: u64,
    states: Vec<CudaSlice<S>>,
    grad_a: CudaSlice<S>,
    grad_b: CudaSlice<S>,
    tokens_dev: CudaSlice<u32>,
    targets_dev: CudaSlice<u32>,
    reduced: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    inv: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// bf16 copies of the head's product inputs (one element at f32/tf32 products).
    normed16: Bf16Buf,
    logits16: Bf16Buf,
    loss_rows: CudaSlice<f32>,
    d_normed: CudaSlice<f32>,
    d_reduced: CudaSlice<f32>,
}

/// Element type of the trainer's residual streams (DESIGN.md §3: bf16 on
/// CUDA, f32 as the option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamDtype {
    /// bf16 stream states, sublayer inputs/outputs and their gradients (needs bf16 products).
    #[default]
    Bf16,
    /// f32 streams (any product precision; the parity reference).
    F32,
}

impl StreamDtype {
    /// Name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        }
    }

    /// The streams a run of `scheme` at `precision` gets when `requested`
    /// (`None`: bf16 where it can, else f32): bf16 needs bf16 products, and
    /// HC has f32-stream kernels only. Errors when an explicit request cannot be met
    /// for a reason other than HC's kernels.
    pub fn resolve(
        requested: Option<Self>,
        scheme: Scheme,
        precision: GemmPrecision,
    ) -> CudaResult<Self> {
        let possible = if precision != GemmPrecision::Bf16 {
            if requested == Some(Self::Bf16) {
                return Err(bf16_streams_need_bf16_products());
            }
            Self::F32
        } else if scheme == Scheme::HcDynamic {
            Self::F32
        } else {
            Self::Bf16
        };
        Ok(match requested {
            Some(Self::F32) => Self::F32,
            _ => possible,
        })
    }
}

impl std::str::FromStr for StreamDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            other => Err(format!("stream dtype {other:?}: use bf16 or f32")),
        }
    }
}

/// Statistics of one GPU step (as [`mhc_core::model::StepStats`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuStepStats {
    /// Mean cross-entropy of the batch before the update.
    pub loss: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

impl GpuTrainer<f32> {
    /// Copies a CPU trainer's model and AdamW state (moments, step) to the GPU.
    ///
    /// Matrix products run in full f32 ([`GemmPrecision::F32`]); see [`Self::from_cpu_with`].
    pub fn from_cpu(dev: Arc<CudaDevice>, cpu: &mut Trainer<f32>) -> CudaResult<Self> {
        Self::from_cpu_with(dev, cpu, GemmPrecision::F32)
    }

    /// As [`Self::from_cpu`], with the dense matrix products (projections, MLP,
    /// attention, head) at `precision`; storage (streams included), norms,
    /// softmax, the mHC/HC coefficients and AdamW stay f32.
    pub fn from_cpu_with(
        dev: Arc<CudaDevice>,
        cpu: &mut Trainer<f32>,
        precision: GemmPrecision,
    ) -> CudaResult<Self> {
        Self::replica_from_cpu(dev, cpu, precision, 1)
    }

    /// One of `replicas` data-parallel replicas (see
    /// [`mhc_core::model::parallel`]): as [`Self::from_cpu_with`], with
    /// activation buffers for one shard of `batch / replicas` sequences.
    /// [`CudaError::Core`] with [`mhc_core::MhcError::BatchNotDivisible`] when
    /// the batch does not split evenly.
    pub fn replica_from_cpu(
        dev: Arc<CudaDevice>,
        cpu: &mut Trainer<f32>,
        precision: GemmPrecision,
        replicas: usize,
    ) -> CudaResult<Self> {
        Self::build(dev, cpu, precision, replicas)
    }
}

impl GpuTrainer<half::bf16> {
    /// As [`GpuTrainer::from_cpu_with`] at bf16 products, with bf16 residual
    /// streams (DESIGN.md §3): the stream states, each sublayer's input and
    /// output and their gradients are bf16 (rounded to nearest even as they
    /// are written); every sum is formed in f32. HC has no bf16-stream kernels
    /// ([`CudaError::Unsupported`]).
    pub fn from_cpu_bf16_streams(dev: Arc<CudaDevice>, cpu: &mut Trainer<f32>) -> CudaResult<Self> {
        Self::replica_bf16_streams(dev, cpu, 1)
    }

    /// One of `replicas` data-parallel replicas with bf16 streams (see
    /// [`GpuTrainer::replica_from_cpu`]).
    pub fn replica_bf16_streams(
        dev: Arc<CudaDevice>,
        cpu: &mut Trainer<f32>,
        replicas: usize,
    ) -> CudaResult<Self> {
        Self::build(dev, cpu, GemmPrecision::Bf16, replicas)
    }
}

impl<S: StreamElement> GpuTrainer<S> {
    fn build(
        dev: Arc<CudaDevice>,
        cpu: &mut Trainer<f32>,
        precision: GemmPrecision,
        replicas: usize,
    ) -> CudaResult<Self> {
        if S::BF16 && precision != GemmPrecision::Bf16 {
            return Err(bf16_streams_need_bf16_products());
        }
        let config = *cpu.model.config();
        if config.scheme == Scheme::HcStatic || config.scheme == Scheme::MhcStatic {
            return Err(CudaError::Unsupported(format!(
                "scheme {} has no GPU path (residual, hc and mhc do)",
                config.scheme
            )));
        }
        let train = cpu.config;
        let batch = mhc_core::model::parallel::shard_len(train.batch, replicas)?;
        let (c, n, v, ctxlen) = (config.width, config.streams, config.vocab, config.context);
        let rows = batch * ctxlen;
        let st = dev.stream().clone();
        let flash = Self::attention_kind_for(&config, precision) == "flash";
        let bf16 = precision == GemmPrecision::Bf16;
        // Per (sequence, head): the seq × seq probabilities, or one value per row (flash).
        let att_len = batch * config.heads * if flash { ctxlen } else { ctxlen * ctxlen };
        let ctx = Arc::new(Ctx {
            k: ModelKernels::new(dev.clone())?,
            mm: MatMul::with_precision(&dev, precision)?,
            flash,
            dprobs: std::sync::Mutex::new(st.alloc_zeros(att_len)?),
            dout16: Scratch::new(st.alloc_zeros(if flash { rows * c } else { 1 })?),
            grad16: Scratch::new([
                st.alloc_zeros(if bf16 { rows * c } else { 1 })?,
                st.alloc_zeros(if bf16 { rows * 3 * c } else { 1 })?,
                st.alloc_zeros(if bf16 { rows * 4 * c } else { 1 })?,
            ]),
        });
        let half =
            |len: usize| -> CudaResult<Bf16Buf> { Ok(st.alloc_zeros(if bf16 { len } else { 1 })?) };
        // f32 buffers that only feed products: at bf16 their producers write the
        // bf16 copies directly, and they shrink to one element.
        let f32_operand = |len: usize| -> CudaResult<CudaSlice<f32>> {
            Ok(st.alloc_zeros(if bf16 { 1 } else { len })?)
        };
        let zeros = |len: usize| -> CudaResult<CudaSlice<f32>> { Ok(st.alloc_zeros(len)?) };
        let conn_cfg = config.connection();
        let mut blocks = Vec::new();
        for b in &cpu.model.blocks {
            let attn = GpuAttention {
                ctx: ctx.clone(),
                norm: DeviceParam::upload(&dev, &b.attn.norm.value, false)?,
                wqkv: DeviceParam::upload_matrix(&dev, &b.attn.wqkv.value, bf16)?,
                wo: DeviceParam::upload_matrix(&dev, &b.attn.wo.value, bf16)?,
                batch,
                seq: ctxlen,
                heads: config.heads,
                normed: f32_operand(rows * c)?,
                inv: zeros(rows)?,
                qkv: if flash {
                    zeros(1)?
                } else {
                    zeros(rows * 3 * c)?
                },
                qkv16: st.alloc_zeros(if flash { rows * 3 * c } else { 1 })?,
                normed16: half(rows * c)?,
                o16: half(rows * c)?,
                probs: zeros(att_len)?,
                o: zeros(rows * c)?,
                d_o: zeros(rows * c)?,
                dqkv: if flash {
                    zeros(1)?
                } else {
                    zeros(rows * 3 * c)?
                },
                dnormed: zeros(rows * c)?,
            };
            let mlp = GpuMlp {
                ctx: ctx.clone(),
                norm: DeviceParam::upload(&dev, &b.mlp.norm.value, false)?,
                w1: DeviceParam::upload_matrix(&dev, &b.mlp.w1.value, bf16)?,
                w2: DeviceParam::upload_matrix(&dev, &b.mlp.w2.value, bf16)?,
                normed: f32_operand(rows * c)?,
                inv: zeros(rows)?,
                pre: zeros(rows * 4 * c)?,
                act: f32_operand(rows * 4 * c)?,
                normed16: half(rows * c)?,
                act16: half(rows * 4 * c)?,
                dact: zeros(rows * 4 * c)?,
                dpre: f32_operand(rows * 4 * c)?,
                dnormed: zeros(rows * c)?,
            };
            let conn = |p: &ConnectionParams<f32>| -> CudaResult<Connection<S>> {
                Ok(match config.scheme {
                    Scheme::Residual => Connection::Residual {
                        y: st.alloc_zeros(rows * c)?,
                        dh: st.alloc_zeros(rows * c)?,
                    },
                    Scheme::HcDynamic => Connection::wrapped(
                        &dev,
                        hc_connection(HcCuda::new(dev.clone(), &conn_cfg, p, rows)?)?,
                    )?,
                    _ => Connection::wrapped(
                        &dev,
                        Box::new(MhcCuda::new(dev.clone(), &conn_cfg, p, rows, false)?),
                    )?,
                })
            };
            blocks.push(GpuBlock {
                attn,
                attn_conn: conn(&b.attn_conn.params)?,
                mlp,
                mlp_conn: conn(&b.mlp_conn.params)?,
            });
        }
        let state_len = rows * n * c;
        Ok(Self {
            token_embedding: DeviceParam::upload(&dev, &cpu.model.token_embedding.value, true)?,
            position_embedding: DeviceParam::upload(
                &dev,
                &cpu.model.position_embedding.value,
                true,
            )?,
            final_norm: DeviceParam::upload(&dev, &cpu.model.final_norm.value, false)?,
            head: DeviceParam::upload_matrix(&dev, &cpu.model.head.value, bf16)?,
            blocks,
            step: 0,
            states: (0..=config.sublayers())
                .map(|_| Ok(st.alloc_zeros(state_len)?))
                .collect::<CudaResult<_>>()?,
            grad_a: st.alloc_zeros(state_len)?,
            grad_b: st.alloc_zeros(state_len)?,
            tokens_dev: st.alloc_zeros(rows)?,
            targets_dev: st.alloc_zeros(rows)?,
            reduced: zeros(rows * c)?,
            normed: f32_operand(rows * c)?,
            inv: zeros(rows)?,
            logits: zeros(rows * v)?,
            normed16: half(rows * c)?,
            logits16: half(rows * v)?,
            loss_rows: zeros(rows)?,
            d_normed: zeros(rows * c)?,
            d_reduced: zeros(rows * c)?,
            dev,
            ctx,
            config,
            train,
            batch,
        })
        .and_then(|mut me: Self| {
            me.load_optimizer(cpu)?;
            Ok(me)
        })
    }

    /// Forward of `tokens [batch, context + 1]` to the mean cross-entropy; keeps
    /// what the backward needs and returns the host copy of the input tokens.
    fn forward(&mut self, tokens: &[u32]) -> CudaResult<(f64, Vec<u32>)> {
        let (c, n, v, seq) = (
            self.config.width,
            self.config.streams,
            self.config.vocab,
            self.config.context,
        );
        let rows = self.batch * seq;
        if tokens.len() != self.batch * (seq + 1) {
            return Err(CudaError::Shape {
                what: "token batch [batch, context + 1]",
                expected: self.batch * (seq + 1),
                got: tokens.len(),
            });
        }
        let (mut inputs, mut targets) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for row in tokens.chunks_exact(seq + 1) {
            inputs.extend_from_slice(&row[..seq]);
            targets.extend_from_slice(&row[1..]);
        }
        let st = self.dev.stream().clone();
        st.memcpy_htod(&inputs, &mut self.tokens_dev)?;
        st.memcpy_htod(&targets, &mut self.targets_dev)?;
        let dev = self.dev.clone();
        let ctx = self.ctx.clone();
        let Ctx { k, mm, .. } = &*ctx;
        k.embed(
            &self.tokens_dev,
            &self.token_embedding.value,
            &self.position_embedding.value,
            rows,
            seq,
            n,
            c,
            &mut self.states[0],
        )?;
        for (l, b) in self.blocks.iter_mut().enumerate() {
            for half in 0..2 {
                let s = 2 * l + half;
                let (done, rest) = self.states.split_at_mut(s + 1);
                let (x, out) = (&done[s], &mut rest[0]);
                let (sub, conn): (&mut dyn CudaSublayer<S>, &mut Connection<S>) = if half == 0 {
                    (&mut b.attn, &mut b.attn_conn)
                } else {
                    (&mut b.mlp, &mut b.mlp_conn)
                };
                match conn {
                    Connection::Residual { y, .. } => {
                        sub.forward(&dev, x, y, rows, c)?;
                        k.add(x, y, out)?;
                    }
                    Connection::Wrapped { wrapper, .. } => wrapper.forward(sub, x, out)?,
                }
            }
        }
        let last = &self.states[self.config.sublayers()];
        k.streams_mean(last, rows, n, c, &mut self.reduced)?;
        self.ctx.norm(
            &self.reduced,
            &self.final_norm.value,
            rows,
            c,
            &mut self.normed,
            &mut self.normed16,
            &mut self.inv,
        )?;
        let normed = self.ctx.rounded(&self.normed, &self.normed16);
        mm.matmul(normed, self.head.operand(), &mut self.logits, rows, c, v)?;
        k.cross_entropy(
            &mut self.logits,
            &self.targets_dev,
            rows,
            v,
            &mut self.loss_rows,
        )?;
        let loss = st
            .clone_dtoh(&self.loss_rows)?
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>()
            / rows as f64;
        if !loss.is_finite() {
            return Err(CudaError::Core(mhc_core::MhcError::NonFinite {
                what: "loss",
                index: 0,
            }));
        }
        Ok((loss, inputs))
    }

    /// Mean loss over `batches` fixed windows of `data` (the same windows as
    /// [`mhc_core::model::Trainer::evaluate`] with the same `seed`).
    pub fn evaluate(&mut self, data: &[u8], batches: usize, seed: u64) -> CudaResult<f64> {
        let seq = self.config.context;
        let global = self.train.batch;
        let mut rng = mhc_core::Rng::new(seed);
        let mut tokens = vec![0u32; global * (seq + 1)];
        let mut total = 0.0;
        for _ in 0..batches.max(1) {
            mhc_core::model::data::sample_batch(data, global, seq, &mut rng, &mut tokens)?;
            // A replica holds one shard: the batch in shard-sized pieces, each a mean over equal rows.
            let pieces = tokens.chunks_exact(self.batch * (seq + 1));
            let count = pieces.len();
            let mut sum = 0.0;
            for piece in pieces {
                sum += self.forward(piece)?.0;
            }
            total += sum / count as f64;
        }
        Ok(total / batches.max(1) as f64)
    }

    /// One AdamW step on `tokens [batch, context + 1]` (the same batch the CPU trainer would sample).
    pub fn step(&mut self, tokens: &[u32]) -> CudaResult<GpuStepStats> {
        let loss = self.gradients(tokens)?;
        self.apply(loss, 1.0)
    }

    /// Zeroes the gradients, then forward and backward of `tokens`: every
    /// gradient (dense and connection) is left on the device; returns the loss.
    fn gradients(&mut self, tokens: &[u32]) -> CudaResult<f64> {
        let (c, n, v, seq) = (
            self.config.width,
            self.config.streams,
            self.config.vocab,
            self.config.context,
        );
        let rows = self.batch * seq;
        let st = self.dev.stream().clone();
        // Zero the dense gradients, then the forward.
        self.for_each_dense(|p| Ok(st.memset_zeros(&mut p.grad)?))?;
        let (loss, inputs) = self.forward(tokens)?;
        let dev = self.dev.clone();
        let ctx = self.ctx.clone();
        let Ctx { k, .. } = &*ctx;
        // Backward.
        let dlogits = ctx.round(&self.logits, &mut self.logits16)?;
        ctx.linear_backward(
            ctx.rounded(&self.normed, &self.normed16),
            &mut self.head,
            dlogits,
            &mut self.d_normed,
            rows,
            c,
            v,
        )?;
        k.rmsnorm_backward(
            &self.reduced,
            &self.final_norm.value,
            &self.inv,
            &self.d_normed,
            rows,
            c,
            &mut self.d_reduced,
            &mut self.final_norm.grad,
        )?;
        k.streams_mean_backward(&self.d_reduced, rows, n, c, &mut self.grad_a)?;
        for (l, b) in self.blocks.iter_mut().enumerate().rev() {
            for half in (0..2).rev() {
                let s = 2 * l + half;
                let x = &self.states[s];
                let (sub, conn): (&mut dyn CudaSublayer<S>, &mut Connection<S>) = if half == 0 {
                    (&mut b.attn, &mut b.attn_conn)
                } else {
                    (&mut b.mlp, &mut b.mlp_conn)
                };
                match conn {
                    Connection::Residual { dh, .. } => {
                        sub.vjp(&dev, x, &self.grad_a, dh, rows, c)?;
                        k.add(&self.grad_a, dh, &mut self.grad_b)?;
                    }
                    Connection::Wrapped { wrapper, .. } => {
                        wrapper.backward(sub, x, &self.grad_a, &mut self.grad_b)?
                    }
                }
                std::mem::swap(&mut self.grad_a, &mut self.grad_b);
            }
        }
        k.embed_backward(
            &self.grad_a,
            &inputs,
            self.batch,
            seq,
            n,
            c,
            &mut self.token_embedding.grad,
            &mut self.position_embedding.grad,
        )?;
        Ok(loss)
    }

    /// Every sublayer's connection, in order.
    fn connections_mut(&mut self) -> impl Iterator<Item = &mut Connection<S>> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.attn_conn, &mut b.mlp_conn])
    }

    /// The wrappers' connections, in order (residual sublayers skipped).
    fn wrappers(&self) -> impl Iterator<Item = &dyn GpuConnection<S>> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.attn_conn, &b.mlp_conn])
            .filter_map(|c| match c {
                Connection::Residual { .. } => None,
                Connection::Wrapped { wrapper, .. } => Some(&**wrapper),
            })
    }

    /// Global gradient norm, clipping and AdamW, all on the device (one copy
    /// of the norm's partials to the host). The dense gradients count as
    /// `dense_weight ·` their value (1 for one GPU; `1/N` after an NCCL sum
    /// over `N` replicas), folded into the norm and AdamW's gradient scale;
    /// the connection gradients as they are (the data-parallel step uploads
    /// them already weighted).
    fn apply(&mut self, loss: f64, dense_weight: f32) -> CudaResult<GpuStepStats> {
        let ctx = self.ctx.clone();
        let Ctx { k, .. } = &*ctx;
        let w2 = f64::from(dense_weight) * f64::from(dense_weight);
        let sums = {
            let mut tensors: Vec<&CudaSlice<f32>> = Vec::new();
            tensors.extend(
                [&self.token_embedding, &self.position_embedding]
                    .into_iter()
                    .chain(self.blocks.iter().flat_map(|b| {
                        [
                            &b.attn.norm,
                            &b.attn.wqkv,
                            &b.attn.wo,
                            &b.mlp.norm,
                            &b.mlp.w1,
                            &b.mlp.w2,
                        ]
                    }))
                    .chain([&self.final_norm, &self.head])
                    .map(|p| &p.grad),
            );
            let dense = tensors.len();
            for w in self.wrappers() {
                tensors.extend(w.grads());
            }
            let sums = k.sum_squares_many(&tensors)?;
            sums[..dense].iter().map(|s| s * w2).sum::<f64>() + sums[dense..].iter().sum::<f64>()
        };
        let grad_norm = sums.sqrt();
        if !grad_norm.is_finite() {
            return Err(CudaError::Core(mhc_core::MhcError::NonFinite {
                what: "gradient",
                index: 0,
            }));
        }
        let schedule: Schedule = self.train.schedule;
        let lr = schedule.lr(self.step);
        let clip = self.train.clip;
        let scale = if clip > 0.0 && grad_norm > clip {
            (clip / grad_norm) as f32
        } else {
            1.0
        };
        self.step += 1;
        let (step, adamw) = (self.step, self.train.adamw);
        self.for_each_dense(|p| {
            k.adamw_with(
                &mut p.value,
                p.value16.as_mut(),
                &p.grad,
                &mut p.m,
                &mut p.v,
                &adamw,
                lr,
                step,
                p.decay,
                scale * dense_weight,
            )
        })?;
        for conn in self.connections_mut() {
            if let Connection::Wrapped { wrapper, moments } = conn {
                for ((value, grad), (m, v)) in wrapper.buffers_mut().into_iter().zip(moments) {
                    // Connection parameters take no weight decay (as the core's trainer).
                    k.adamw(value, grad, m, v, &adamw, lr, step, false, scale)?;
                }
                wrapper.params_updated()?;
            }
        }
        Ok(GpuStepStats {
            loss,
            grad_norm,
            lr,
        })
    }

    /// One data-parallel AdamW step of this replica on its shard of `tokens`,
    /// the **global** batch `[batch, context + 1]` (every replica passes the
    /// same; see [`super::nccl`]). Dense gradients are summed on the devices
    /// by parameter group, connection gradients and the loss through the host;
    /// the sum counts as the mean with weight `1/N`. Returns the full batch's
    /// loss (reduced in f32) and gradient norm, the same on every replica.
    ///
    /// Written and compiled; not yet run on GPUs (see [`super::nccl`]).
    pub fn data_parallel_step(
        &mut self,
        tokens: &[u32],
        comm: &mut super::nccl::NcclAllReduce,
    ) -> CudaResult<GpuStepStats> {
        let (rank, ranks) = (comm.rank(), comm.ranks());
        let rows = mhc_core::model::parallel::shard(self.train.batch, ranks, rank)?;
        if rows.len() != self.batch {
            return Err(CudaError::Shape {
                what: "replica shard (make the trainer with replica_from_cpu for this many GPUs)",
                expected: self.batch,
                got: rows.len(),
            });
        }
        let window = self.config.context + 1;
        if tokens.len() != self.train.batch * window {
            return Err(CudaError::Shape {
                what: "global token batch [batch, context + 1]",
                expected: self.train.batch * window,
                got: tokens.len(),
            });
        }
        let weight = rows.len() as f32 / self.train.batch as f32;
        let shard = &tokens[rows.start * window..rows.end * window];
        let (loss, conn_ok) = match self.gradients(shard) {
            Ok(loss) => (loss, true),
            // Reduced as NaN (with zero connection gradients) so that every replica stops at this step together.
            Err(CudaError::Core(mhc_core::MhcError::NonFinite { what: "loss", .. })) => {
                (f64::NAN, false)
            }
            Err(e) => return Err(e),
        };
        // Dense gradients: one NCCL group per parameter group, in place on the device.
        comm.sum_device(&mut [
            &mut self.token_embedding.grad,
            &mut self.position_embedding.grad,
        ])?;
        for b in self.blocks.iter_mut() {
            comm.sum_device(&mut [
                &mut b.attn.norm.grad,
                &mut b.attn.wqkv.grad,
                &mut b.attn.wo.grad,
                &mut b.mlp.norm.grad,
                &mut b.mlp.w1.grad,
                &mut b.mlp.w2.grad,
            ])?;
        }
        comm.sum_device(&mut [&mut self.final_norm.grad, &mut self.head.grad])?;
        // Connection gradients and the loss, weighted, through the host, then back to the devices.
        let mut flat: Vec<f32> = Vec::new();
        {
            let st = self.dev.stream().clone();
            for w in self.wrappers() {
                for g in w.grads() {
                    if conn_ok {
                        flat.extend(st.clone_dtoh(g)?.iter().map(|&x| x * weight));
                    } else {
                        flat.resize(flat.len() + g.len(), 0.0);
                    }
                }
            }
        }
        flat.push(loss as f32 * weight);
        comm.sum(&mut flat)?;
        let loss = f64::from(flat[flat.len() - 1]);
        if !loss.is_finite() {
            return Err(CudaError::Core(mhc_core::MhcError::NonFinite {
                what: "loss",
                index: 0,
            }));
        }
        let st = self.dev.stream().clone();
        let mut offset = 0;
        for conn in self.connections_mut() {
            if let Connection::Wrapped { wrapper, .. } = conn {
                for (_, g) in wrapper.buffers_mut() {
                    let len = g.len();
                    st.memcpy_htod(&flat[offset..offset + len], g)?;
                    offset += len;
                }
            }
        }
        self.apply(loss, weight)
    }

    /// The dense parameters with their index in the core's parameter order.
    fn dense_indexed(&mut self) -> Vec<(usize, &mut DeviceParam)> {
        let conn_count = |c: &Connection<S>| c.tensor_count(&self.config);
        let mut out: Vec<(usize, &mut DeviceParam)> = Vec::new();
        let mut index = 0;
        out.push((index, &mut self.token_embedding));
        index += 1;
        out.push((index, &mut self.position_embedding));
        index += 1;
        for b in self.blocks.iter_mut() {
            let (a, m) = (conn_count(&b.attn_conn), conn_count(&b.mlp_conn));
            for p in [&mut b.attn.norm, &mut b.attn.wqkv, &mut b.attn.wo] {
                out.push((index, p));
                index += 1;
            }
            index += a;
            for p in [&mut b.mlp.norm, &mut b.mlp.w1, &mut b.mlp.w2] {
                out.push((index, p));
                index += 1;
            }
            index += m;
        }
        out.push((index, &mut self.final_norm));
        out.push((index + 1, &mut self.head));
        out
    }

    /// For every sublayer's connection in order, the index (in the core's
    /// parameter order) of its first non-empty tensor; its tensors follow in
    /// [`ConnectionParams::tensors`] order.
    fn connection_starts(&self) -> Vec<usize> {
        let mut index = 2;
        let mut starts = Vec::new();
        for b in &self.blocks {
            for conn in [&b.attn_conn, &b.mlp_conn] {
                index += 3;
                starts.push(index);
                index += conn.tensor_count(&self.config);
            }
        }
        starts
    }

    /// Uploads a CPU trainer's AdamW state (moments and step), e.g. after loading a checkpoint.
    pub fn load_optimizer(&mut self, cpu: &Trainer<f32>) -> CudaResult<()> {
        let st = self.dev.stream().clone();
        let opt = &cpu.optimizer;
        for (index, p) in self.dense_indexed() {
            st.memcpy_htod(&opt.m[index], &mut p.m)?;
            st.memcpy_htod(&opt.v[index], &mut p.v)?;
        }
        let config = self.config.connection();
        let starts = self.connection_starts();
        for (conn, start) in self.connections_mut().zip(starts) {
            let Connection::Wrapped { wrapper, moments } = conn else {
                continue;
            };
            let host = |state: &[Vec<f32>]| -> CudaResult<Vec<Vec<f32>>> {
                let mut p = ConnectionParams::zeros(&config);
                let tensors = p.tensors_mut().into_iter().filter(|(_, t)| !t.is_empty());
                for (j, (name, t)) in tensors.enumerate() {
                    let src = state.get(start + j).ok_or(CudaError::Shape {
                        what: "AdamW state (tensors)",
                        expected: start + j + 1,
                        got: state.len(),
                    })?;
                    if src.len() != t.len() {
                        return Err(CudaError::Shape {
                            what: name,
                            expected: t.len(),
                            got: src.len(),
                        });
                    }
                    t.copy_from_slice(src);
                }
                wrapper.pack(&p)
            };
            let (m_host, v_host) = (host(&opt.m)?, host(&opt.v)?);
            for ((m, v), (mh, vh)) in moments.iter_mut().zip(m_host.iter().zip(&v_host)) {
                st.memcpy_htod(mh, m)?;
                st.memcpy_htod(vh, v)?;
            }
        }
        self.step = opt.step;
        Ok(())
    }

    /// Copies weights, AdamW moments and the step count into `cpu` (for checkpoints and sampling).
    pub fn sync_to_cpu(&mut self, cpu: &mut Trainer<f32>) -> CudaResult<()> {
        let params = self.parameters()?;
        let mut i = 0;
        cpu.model.for_each_param(|_, p, _| {
            p.copy_from_slice(&params[i].1);
            i += 1;
        });
        let mut optimizer = cpu.optimizer.clone();
        optimizer.step = self.step;
        optimizer.config = self.train.adamw;
        let st = self.dev.stream().clone();
        for (index, p) in self.dense_indexed() {
            optimizer.m[index] = st.clone_dtoh(&p.m)?;
            optimizer.v[index] = st.clone_dtoh(&p.v)?;
        }
        let config = self.config.connection();
        let starts = self.connection_starts();
        for (conn, start) in self.connections_mut().zip(starts) {
            let Connection::Wrapped { wrapper, moments } = conn else {
                continue;
            };
            let (mut m_packed, mut v_packed) = (Vec::new(), Vec::new());
            for (m, v) in moments.iter() {
                m_packed.push(st.clone_dtoh(m)?);
                v_packed.push(st.clone_dtoh(v)?);
            }
            for (packed, state) in [(m_packed, &mut optimizer.m), (v_packed, &mut optimizer.v)] {
                let p = wrapper.unpack(&config, &packed)?;
                let tensors = p.tensors().into_iter().filter(|(_, t)| !t.is_empty());
                for (j, (_, t)) in tensors.enumerate() {
                    state[start + j] = t.to_vec();
                }
            }
        }
        cpu.optimizer = optimizer;
        Ok(())
    }

    /// Amax gains of every `H_res` of the last forward (as [`mhc_core::model::Model::gain_report`]).
    pub fn gain_report(&self) -> CudaResult<mhc_core::model::GainReport> {
        let (n, rows) = (self.config.streams, self.batch * self.config.context);
        let k = self.config.connection().coefficient_len();
        let per_layer = self
            .blocks
            .iter()
            .flat_map(|b| [&b.attn_conn, &b.mlp_conn])
            .map(|conn| match conn {
                Connection::Residual { .. } => Ok(vec![1.0f64; rows]),
                Connection::Wrapped { wrapper, .. } => {
                    let coef = wrapper.coefficients_host()?;
                    Ok(coef
                        .chunks_exact(k)
                        .flat_map(|row| row[2 * n..].iter().map(|&v| v as f64))
                        .collect())
                }
            })
            .collect::<CudaResult<Vec<_>>>()?;
        Ok(mhc_core::model::GainReport::from_h_res(
            &per_layer,
            n,
            self.config.scheme.is_manifold_constrained(),
        )?)
    }

    /// How attention is computed: `"flash"` (bf16 products without the
    /// `seq × seq` scores: the kernels of [`ModelKernels::flash_attention`],
    /// chosen at bf16 precision when the head dimension is 16, 32, 64 or 128)
    /// or `"gemm"` (cuBLAS products around a causal-softmax kernel).
    pub fn attention_kind(&self) -> &'static str {
        if self.ctx.flash { "flash" } else { "gemm" }
    }

    /// The [`Self::attention_kind`] a trainer of `config` at `precision` gets.
    pub fn attention_kind_for(config: &ModelConfig, precision: GemmPrecision) -> &'static str {
        if ModelKernels::flash_for(config.width, config.heads, precision) {
            "flash"
        } else {
            "gemm"
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn for_each_dense(
        &mut self,
        mut f: impl FnMut(&mut DeviceParam) -> CudaResult<()>,
    ) -> CudaResult<()> {
        f(&mut self.token_embedding)?;
        f(&mut self.position_embedding)?;
        for b in self.blocks.iter_mut() {
            for p in [
                &mut b.attn.norm,
                &mut b.attn.wqkv,
                &mut b.attn.wo,
                &mut b.mlp.norm,
                &mut b.mlp.w1,
                &mut b.mlp.w2,
            ] {
                f(p)?;
            }
        }
        f(&mut self.final_norm)?;
        f(&mut self.head)
    }

    /// Every parameter, downloaded, in the core's order with the core's names (for comparisons and checkpoints).
    pub fn parameters(&self) -> CudaResult<Vec<(String, Vec<f32>)>> {
        let st = self.dev.stream();
        let mut out = vec![
            (
                "token_embedding".to_string(),
                st.clone_dtoh(&self.token_embedding.value)?,
            ),
            (
                "position_embedding".to_string(),
                st.clone_dtoh(&self.position_embedding.value)?,
            ),
        ];
        for (l, b) in self.blocks.iter().enumerate() {
            for (prefix, dense, conn) in [
                (
                    "attn",
                    [&b.attn.norm, &b.attn.wqkv, &b.attn.wo],
                    &b.attn_conn,
                ),
                ("mlp", [&b.mlp.norm, &b.mlp.w1, &b.mlp.w2], &b.mlp_conn),
            ] {
                let names = if prefix == "attn" {
                    ["norm", "wqkv", "wo"]
                } else {
                    ["norm", "w1", "w2"]
                };
                for (name, p) in names.iter().zip(dense) {
                    out.push((
                        format!("blocks.{l}.{prefix}.{name}"),
                        st.clone_dtoh(&p.value)?,
                    ));
                }
                if let Connection::Wrapped { wrapper, .. } = conn {
                    let packed = super::wrapper::download(&self.dev, wrapper.values())?;
                    let params = wrapper.unpack(&self.config.connection(), &packed)?;
                    for (name, t) in params.tensors() {
                        if !t.is_empty() {
                            out.push((format!("blocks.{l}.{prefix}.conn.{name}"), t.to_vec()));
                        }
                    }
                }
            }
        }
        out.push((
            "final_norm".to_string(),
            st.clone_dtoh(&self.final_norm.value)?,
        ));
        out.push(("head".to_string(), st.clone_dtoh(&self.head.value)?));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_dtype_resolves_as_documented() {
        use GemmPrecision::{Bf16, F32, Tf32};
        use Scheme::{HcDynamic, MhcDynamic, Residual};
        let r = |req, scheme, p| StreamDtype::resolve(req, scheme, p);
        // Default: bf16 where possible.
        assert_eq!(r(None, MhcDynamic, Bf16).unwrap(), StreamDtype::Bf16);
        assert_eq!(r(None, Residual, Bf16).unwrap(), StreamDtype::Bf16);
        assert_eq!(r(None, HcDynamic, Bf16).unwrap(), StreamDtype::F32);
        assert_eq!(r(None, MhcDynamic, F32).unwrap(), StreamDtype::F32);
        assert_eq!(r(None, MhcDynamic, Tf32).unwrap(), StreamDtype::F32);
        // Explicit requests.
        assert_eq!(
            r(Some(StreamDtype::F32), MhcDynamic, Bf16).unwrap(),
            StreamDtype::F32
        );
        assert_eq!(
            r(Some(StreamDtype::Bf16), HcDynamic, Bf16).unwrap(),
            StreamDtype::F32
        );
        assert!(matches!(
            r(Some(StreamDtype::Bf16), MhcDynamic, F32),
            Err(CudaError::Unsupported(_))
        ));
        assert_eq!("bf16".parse::<StreamDtype>(), Ok(StreamDtype::Bf16));
        assert_eq!("f32".parse::<StreamDtype>(), Ok(StreamDtype::F32));
        assert!("f16".parse::<StreamDtype>().is_err());
        assert_eq!(StreamDtype::Bf16.name(), "bf16");
    }
}
