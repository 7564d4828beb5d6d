//! A small GPT-style reference model whose residual stream is plain, HC or
//! mHC, with exact manual backward, AdamW and the embedded synthetic data.
//! Needs only `alloc`, so the browser build uses it too.
//!
//! Architecture: token + learned position embedding; the stream state starts
//! as `n` copies of it; `L` blocks of (RMSNorm → causal multi-head attention)
//! and (RMSNorm → GELU MLP, hidden `4C`), **each sublayer wrapped** by the
//! chosen scheme ([`HyperConnection`]), so `2L` wrapped sublayers; the final
//! state is reduced to width `C` by the **mean over streams**, then RMSNorm and
//! an untied LM head.
//!
//! Initialisation (GPT-2 style): embeddings, `W_qkv`, `W_1` and the head
//! `~ N(0, 0.02²)`; the output projections `W_o`, `W_2` `~ N(0, 0.02²/(2L))`;
//! norm weights 1; connections as [`ConnectionParams::init`]. AdamW decays
//! embeddings and matrices; norm weights and connection parameters are not decayed.

pub mod blocks;
pub mod data;
pub mod ops;
pub mod optim;
pub mod parallel;

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::connection::{ConnectionConfig, ConnectionParams, InitConfig, Scheme};
use crate::diagnostics::{CompositeGain, amax_gain_unchecked, composite_gains};
use crate::error::{MhcError, Result};
use crate::real::Real;
use crate::rng::Rng;
use crate::sinkhorn::{SinkhornConfig, column_residual};
use crate::wrapper::{HyperConnection, Workspace};
use blocks::{Attention, Mlp, Param, SeqShape};
use ops::{cross_entropy, matmul, matmul_grad_a, matmul_grad_b, rmsnorm, rmsnorm_backward};
use optim::{AdamW, AdamWConfig, Schedule};

/// Shape and scheme of the reference model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab: usize,
    /// Model width `C`.
    pub width: usize,
    /// Blocks `L` (each has two wrapped sublayers).
    pub layers: usize,
    /// Attention heads (must divide `C`).
    pub heads: usize,
    /// Context length (positions).
    pub context: usize,
    /// Streams `n` (1 for the residual scheme).
    pub streams: usize,
    /// Residual-stream scheme.
    pub scheme: Scheme,
    /// Sinkhorn–Knopp iterations (mHC).
    pub sinkhorn_iterations: usize,
}

impl ModelConfig {
    /// Checks every field; the error says which and why.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(MhcError::InvalidConfig(m));
        if self.vocab == 0 || self.vocab > u32::MAX as usize {
            return bad(format!(
                "vocabulary size must be in 1..=2^32-1, got {}",
                self.vocab
            ));
        }
        if self.width == 0 || self.layers == 0 || self.heads == 0 || self.context == 0 {
            return bad(format!(
                "width, layers, heads and context must all be at least 1 (got width {}, layers {}, heads {}, context {})",
                self.width, self.layers, self.heads, self.context
            ));
        }
        if !self.width.is_multiple_of(self.heads) {
            return bad(format!(
                "heads ({}) must divide the width ({})",
                self.heads, self.width
            ));
        }
        self.connection().validate()
    }

    /// The connection configuration every wrapped sublayer uses.
    pub fn connection(&self) -> ConnectionConfig {
        let mut c = ConnectionConfig::new(self.scheme, self.streams, self.width);
        c.sinkhorn = SinkhornConfig {
            iterations: self.sinkhorn_iterations,
            ..SinkhornConfig::default()
        };
        c
    }

    /// Number of wrapped sublayers, `2L`.
    pub fn sublayers(&self) -> usize {
        2 * self.layers
    }
}

/// One block: attention and MLP, each with its connection, gradients and workspace.
#[derive(Clone, Debug)]
pub struct Block<T> {
    /// Attention sublayer.
    pub attn: Attention<T>,
    /// Attention's connection.
    pub attn_conn: HyperConnection<T>,
    /// Gradients of the attention connection.
    pub attn_grads: ConnectionParams<T>,
    attn_ws: Workspace<T>,
    /// MLP sublayer.
    pub mlp: Mlp<T>,
    /// MLP's connection.
    pub mlp_conn: HyperConnection<T>,
    /// Gradients of the MLP connection.
    pub mlp_grads: ConnectionParams<T>,
    mlp_ws: Workspace<T>,
}

/// Which tensor a parameter is: its stable checkpoint name and whether AdamW decays it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId {
    /// Block index, `None` for embeddings, final norm and head.
    pub block: Option<usize>,
    /// Tensor within its owner, e.g. `"attn.wqkv"`, `"mlp.conn.phi"`, `"token_embedding"`.
    pub tensor: &'static str,
    /// Whether weight decay applies.
    pub decay: bool,
}

impl ParamId {
    /// Stable name used in checkpoints: `blocks.{l}.{tensor}` or `{tensor}`.
    pub fn name(&self) -> String {
        match self.block {
            Some(l) => format!("blocks.{l}.{}", self.tensor),
            None => String::from(self.tensor),
        }
    }
}

const ATTN_CONN: [&str; 9] = [
    "attn.conn.alpha",
    "attn.conn.b_pre",
    "attn.conn.b_post",
    "attn.conn.b_res",
    "attn.conn.phi",
    "attn.conn.gamma",
    "attn.conn.theta_pre",
    "attn.conn.theta_post",
    "attn.conn.theta_res",
];
const MLP_CONN: [&str; 9] = [
    "mlp.conn.alpha",
    "mlp.conn.b_pre",
    "mlp.conn.b_post",
    "mlp.conn.b_res",
    "mlp.conn.phi",
    "mlp.conn.gamma",
    "mlp.conn.theta_pre",
    "mlp.conn.theta_post",
    "mlp.conn.theta_res",
];

/// Amax gains of the last forward (paper §3), for logging.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GainReport {
    /// Per wrapped sublayer: forward gain of `H_res⁽ˡ⁾`, max over tokens.
    pub amax_fwd: Vec<f64>,
    /// Per wrapped sublayer: backward gain of `H_res⁽ˡ⁾`, max over tokens.
    pub amax_bwd: Vec<f64>,
    /// Per depth `d`: gains of `H_res⁽ᵈ⁾ ··· H_res⁽¹⁾`, mean and max over tokens.
    pub composite: Vec<CompositeGain<f64>>,
    /// Max |column sum − 1| over every mHC map of the batch (0 for other schemes).
    pub sk_residual: f64,
}

/// The reference model.
#[derive(Clone, Debug)]
pub struct Model<T> {
    config: ModelConfig,
    /// `[vocab, C]`.
    pub token_embedding: Param<T>,
    /// `[context, C]`.
    pub position_embedding: Param<T>,
    /// The `L` blocks.
    pub blocks: Vec<Block<T>>,
    /// Final RMSNorm weight `[C]`.
    pub final_norm: Param<T>,
    /// LM head `[C, vocab]`.
    pub head: Param<T>,
    capacity: usize,
    shape: SeqShape,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    states: Vec<Vec<T>>,
    reduced: Vec<T>,
    normed: Vec<T>,
    inv_rms: Vec<T>,
    logits: Vec<T>,
    grad_a: Vec<T>,
    grad_b: Vec<T>,
    grad_c: Vec<T>,
}

fn normal_vec<T: Real>(rng: &mut Rng, len: usize, std: f64) -> Vec<T> {
    (0..len).map(|_| T::of(rng.normal() * std)).collect()
}

impl<T: Real> Model<T> {
    /// A freshly initialised model (deterministic for `seed`) with buffers for
    /// batches of up to `max_tokens = batch · context` tokens.
    pub fn new(config: ModelConfig, max_tokens: usize, seed: u64) -> Result<Self> {
        config.validate()?;
        if max_tokens == 0 {
            return Err(MhcError::EmptyBatch);
        }
        let mut rng = Rng::new(seed);
        let (c, v, l) = (config.width, config.vocab, config.layers);
        let eps = T::of(1e-6);
        let out_std = 0.02 / libm::sqrt(2.0 * l as f64);
        let conn_cfg = config.connection();
        let init = InitConfig::default();
        let token_embedding = Param::new(normal_vec(&mut rng, v * c, 0.02));
        let position_embedding = Param::new(normal_vec(&mut rng, config.context * c, 0.02));
        let mut blocks = Vec::with_capacity(l);
        for _ in 0..l {
            let wqkv = normal_vec(&mut rng, c * 3 * c, 0.02);
            let wo = normal_vec(&mut rng, c * c, out_std);
            let attn = Attention::new(c, config.heads, eps, wqkv, wo);
            let attn_conn = HyperConnection::init(conn_cfg, &init, &mut rng)?;
            let w1 = normal_vec(&mut rng, c * 4 * c, 0.02);
            let w2 = normal_vec(&mut rng, 4 * c * c, out_std);
            let mlp = Mlp::new(c, 4 * c, eps, w1, w2);
            let mlp_conn = HyperConnection::init(conn_cfg, &init, &mut rng)?;
            blocks.push(Block {
                attn,
                attn_conn,
                attn_grads: ConnectionParams::zeros(&conn_cfg),
                attn_ws: Workspace::new(&conn_cfg, max_tokens),
                mlp,
                mlp_conn,
                mlp_grads: ConnectionParams::zeros(&conn_cfg),
                mlp_ws: Workspace::new(&conn_cfg, max_tokens),
            });
        }
        let head = Param::new(normal_vec(&mut rng, c * v, 0.02));
        let state_len = max_tokens * config.streams * c;
        Ok(Self {
            config,
            token_embedding,
            position_embedding,
            blocks,
            final_norm: Param::new(vec![T::one(); c]),
            head,
            capacity: max_tokens,
            shape: SeqShape::default(),
            inputs: Vec::new(),
            targets: Vec::new(),
            states: (0..=config.sublayers())
                .map(|_| vec![T::zero(); state_len])
                .collect(),
            reduced: vec![T::zero(); max_tokens * c],
            normed: vec![T::zero(); max_tokens * c],
            inv_rms: vec![T::zero(); max_tokens],
            logits: vec![T::zero(); max_tokens * v],
            grad_a: vec![T::zero(); state_len],
            grad_b: vec![T::zero(); state_len],
            grad_c: vec![T::zero(); max_tokens * c],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Tokens a batch may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Coefficients of wrapped sublayer `l` from the last forward (training
    /// step, evaluation or sampling), `[tokens, n² + 2n]`, each row
    /// `[H_pre | H_post | H_res]` (paper Eq. 3; `H_res` row-major). Sublayer
    /// `2b` is block `b`'s attention, `2b + 1` its MLP; `None` when `l ≥ 2L`.
    pub fn sublayer_coefficients(&self, l: usize) -> Option<&[T]> {
        let block = self.blocks.get(l / 2)?;
        Some(if l.is_multiple_of(2) {
            block.attn_ws.coefficients()
        } else {
            block.mlp_ws.coefficients()
        })
    }

    /// Tokens of the last forward (`batch · seq`; 0 before any).
    pub fn last_tokens(&self) -> usize {
        self.shape.batch * self.shape.seq
    }

    /// Visits every parameter tensor in a fixed order (the optimiser's and
    /// the checkpoint's) with its value and gradient.
    pub fn for_each_param(&mut self, mut f: impl FnMut(ParamId, &mut Vec<T>, &mut Vec<T>)) {
        let top = |tensor, decay| ParamId {
            block: None,
            tensor,
            decay,
        };
        f(
            top("token_embedding", true),
            &mut self.token_embedding.value,
            &mut self.token_embedding.grad,
        );
        f(
            top("position_embedding", true),
            &mut self.position_embedding.value,
            &mut self.position_embedding.grad,
        );
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let id = |tensor, decay| ParamId {
                block: Some(l),
                tensor,
                decay,
            };
            f(
                id("attn.norm", false),
                &mut b.attn.norm.value,
                &mut b.attn.norm.grad,
            );
            f(
                id("attn.wqkv", true),
                &mut b.attn.wqkv.value,
                &mut b.attn.wqkv.grad,
            );
            f(
                id("attn.wo", true),
                &mut b.attn.wo.value,
                &mut b.attn.wo.grad,
            );
            for ((name, (_, p)), (_, g)) in ATTN_CONN
                .iter()
                .zip(b.attn_conn.params.tensors_mut())
                .zip(b.attn_grads.tensors_mut())
            {
                if !p.is_empty() {
                    f(id(name, false), p, g);
                }
            }
            f(
                id("mlp.norm", false),
                &mut b.mlp.norm.value,
                &mut b.mlp.norm.grad,
            );
            f(id("mlp.w1", true), &mut b.mlp.w1.value, &mut b.mlp.w1.grad);
            f(id("mlp.w2", true), &mut b.mlp.w2.value, &mut b.mlp.w2.grad);
            for ((name, (_, p)), (_, g)) in MLP_CONN
                .iter()
                .zip(b.mlp_conn.params.tensors_mut())
                .zip(b.mlp_grads.tensors_mut())
            {
                if !p.is_empty() {
                    f(id(name, false), p, g);
                }
            }
        }
        f(
            top("final_norm", false),
            &mut self.final_norm.value,
            &mut self.final_norm.grad,
        );
        f(top("head", true), &mut self.head.value, &mut self.head.grad);
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        self.for_each_param(|_, _, g| g.iter_mut().for_each(|v| *v = T::zero()));
    }

    /// Total number of scalar parameters.
    pub fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.for_each_param(|_, p, _| n += p.len());
        n
    }

    fn set_batch(&mut self, tokens: &[u32], batch: usize, with_targets: bool) -> Result<()> {
        if batch == 0 || tokens.is_empty() {
            return Err(MhcError::EmptyBatch);
        }
        let extra = usize::from(with_targets);
        if !tokens.len().is_multiple_of(batch) || tokens.len() / batch <= extra {
            return Err(MhcError::ShapeMismatch {
                what: "token batch [batch, seq (+1 for targets)]",
                expected: batch * (self.config.context + extra),
                got: tokens.len(),
            });
        }
        let seq = tokens.len() / batch - extra;
        if seq > self.config.context {
            return Err(MhcError::InvalidConfig(format!(
                "sequence of {seq} tokens is longer than the context ({})",
                self.config.context
            )));
        }
        if batch * seq > self.capacity {
            return Err(MhcError::WorkspaceTooSmall {
                tokens: batch * seq,
                capacity: self.capacity,
            });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(MhcError::TokenOutOfRange {
                token,
                vocab: self.config.vocab,
            });
        }
        self.shape = SeqShape { batch, seq };
        self.inputs.clear();
        self.targets.clear();
        for row in tokens.chunks_exact(seq + extra) {
            self.inputs.extend_from_slice(&row[..seq]);
            if with_targets {
                self.targets.extend_from_slice(&row[1..]);
            }
        }
        Ok(())
    }

    /// Forward to the logits for `inputs [batch, seq]` (no targets).
    fn forward_logits(&mut self) -> Result<()> {
        let (c, n, v) = (self.config.width, self.config.streams, self.config.vocab);
        let SeqShape { batch, seq } = self.shape;
        let tokens = batch * seq;
        let s = n * c;
        {
            let x0 = &mut self.states[0];
            for (i, &tok) in self.inputs.iter().enumerate() {
                let pos = i % seq;
                let e = &self.token_embedding.value[tok as usize * c..(tok as usize + 1) * c];
                let p = &self.position_embedding.value[pos * c..(pos + 1) * c];
                for stream in 0..n {
                    for ((x, &ev), &pv) in x0[i * s + stream * c..i * s + (stream + 1) * c]
                        .iter_mut()
                        .zip(e)
                        .zip(p)
                    {
                        *x = ev + pv;
                    }
                }
            }
        }
        for (l, b) in self.blocks.iter_mut().enumerate() {
            b.attn.shape = self.shape;
            let (done, rest) = self.states.split_at_mut(2 * l + 1);
            b.attn_conn.forward(
                &mut b.attn,
                &done[2 * l][..tokens * s],
                &mut rest[0][..tokens * s],
                &mut b.attn_ws,
            )?;
            let (done, rest) = self.states.split_at_mut(2 * l + 2);
            b.mlp_conn.forward(
                &mut b.mlp,
                &done[2 * l + 1][..tokens * s],
                &mut rest[0][..tokens * s],
                &mut b.mlp_ws,
            )?;
        }
        // Mean over streams, final RMSNorm, head.
        let last = &self.states[self.config.sublayers()];
        let inv_n = T::one() / T::of(n as f64);
        for t in 0..tokens {
            let r = &mut self.reduced[t * c..(t + 1) * c];
            r.copy_from_slice(&last[t * s..t * s + c]);
            for stream in 1..n {
                for (rv, &xv) in r
                    .iter_mut()
                    .zip(&last[t * s + stream * c..t * s + (stream + 1) * c])
                {
                    *rv = *rv + xv;
                }
            }
            r.iter_mut().for_each(|v| *v = *v * inv_n);
        }
        rmsnorm(
            &self.reduced[..tokens * c],
            &self.final_norm.value,
            T::of(1e-6),
            &mut self.normed[..tokens * c],
            &mut self.inv_rms[..tokens],
        );
        matmul(
            &self.normed,
            &self.head.value,
            &mut self.logits,
            tokens,
            c,
            v,
        );
        Ok(())
    }

    /// Mean cross-entropy (nats/token) of `tokens [batch, seq + 1]` (inputs
    /// and next-token targets), keeping what [`Model::backward`] needs.
    pub fn forward(&mut self, tokens: &[u32], batch: usize) -> Result<T> {
        self.set_batch(tokens, batch, true)?;
        self.forward_logits()?;
        let rows = self.shape.batch * self.shape.seq;
        let loss = cross_entropy(
            &mut self.logits[..rows * self.config.vocab],
            &self.targets,
            self.config.vocab,
        );
        if !loss.is_finite() {
            return Err(MhcError::NonFinite {
                what: "loss",
                index: 0,
            });
        }
        Ok(loss)
    }

    /// Backward of the last [`Model::forward`]: **adds** every parameter's gradient.
    pub fn backward(&mut self) -> Result<()> {
        let (c, n, v) = (self.config.width, self.config.streams, self.config.vocab);
        let SeqShape { batch, seq } = self.shape;
        let tokens = batch * seq;
        if tokens == 0 || self.targets.len() != tokens {
            return Err(MhcError::BackwardBeforeForward);
        }
        let s = n * c;
        // logits now hold ∂loss/∂logits (cross_entropy overwrote them).
        matmul_grad_b(
            &self.normed,
            &self.logits,
            &mut self.head.grad,
            tokens,
            c,
            v,
        );
        matmul_grad_a(
            &self.logits,
            &self.head.value,
            &mut self.grad_c,
            tokens,
            c,
            v,
        );
        let d_normed = core::mem::take(&mut self.grad_c);
        rmsnorm_backward(
            &self.reduced[..tokens * c],
            &self.final_norm.value,
            &self.inv_rms,
            &d_normed[..tokens * c],
            &mut self.normed[..tokens * c],
            &mut self.final_norm.grad,
        );
        self.grad_c = d_normed;
        // ∂ of the mean over streams; `normed` now holds ∂reduced.
        let inv_n = T::one() / T::of(n as f64);
        for t in 0..tokens {
            for stream in 0..n {
                for (g, &r) in self.grad_a[t * s + stream * c..t * s + (stream + 1) * c]
                    .iter_mut()
                    .zip(&self.normed[t * c..(t + 1) * c])
                {
                    *g = r * inv_n;
                }
            }
        }
        for (l, b) in self.blocks.iter_mut().enumerate().rev() {
            b.mlp_conn.backward(
                &mut b.mlp,
                &self.states[2 * l + 1][..tokens * s],
                &self.grad_a[..tokens * s],
                &mut self.grad_b[..tokens * s],
                &mut b.mlp_grads,
                &mut b.mlp_ws,
            )?;
            b.attn.shape = self.shape;
            b.attn_conn.backward(
                &mut b.attn,
                &self.states[2 * l][..tokens * s],
                &self.grad_b[..tokens * s],
                &mut self.grad_a[..tokens * s],
                &mut b.attn_grads,
                &mut b.attn_ws,
            )?;
        }
        for (i, &tok) in self.inputs.iter().enumerate() {
            let pos = i % seq;
            for stream in 0..n {
                let g = &self.grad_a[i * s + stream * c..i * s + (stream + 1) * c];
                for (e, &gv) in self.token_embedding.grad[tok as usize * c..(tok as usize + 1) * c]
                    .iter_mut()
                    .zip(g)
                {
                    *e = *e + gv;
                }
                for (p, &gv) in self.position_embedding.grad[pos * c..(pos + 1) * c]
                    .iter_mut()
                    .zip(g)
                {
                    *p = *p + gv;
                }
            }
        }
        Ok(())
    }

    /// Mean cross-entropy of `tokens [batch, seq + 1]` without keeping gradients.
    pub fn loss(&mut self, tokens: &[u32], batch: usize) -> Result<T> {
        let loss = self.forward(tokens, batch)?;
        self.targets.clear(); // no backward from an evaluation
        Ok(loss)
    }

    /// Logits of the next token after `prompt` (the last `context` tokens are used).
    pub fn next_logits(&mut self, prompt: &[u32]) -> Result<&[T]> {
        let ctx = self.config.context;
        let window = &prompt[prompt.len().saturating_sub(ctx)..];
        self.set_batch(window, 1, false)?;
        self.forward_logits()?;
        let v = self.config.vocab;
        let last = window.len() - 1;
        Ok(&self.logits[last * v..(last + 1) * v])
    }

    /// Samples `count` tokens after `prompt` at `temperature` (≤ 0: greedy).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        count: usize,
        temperature: f64,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(MhcError::EmptyBatch);
        }
        let mut seq = prompt.to_vec();
        // While every position fits the context window, decode incrementally:
        // each new token costs one position's forward against the cached keys
        // and values (bit for bit what the full forward gives for the last
        // position). Once the window slides, positions shift: full forwards.
        let mut cache = DecodeCache::new(self);
        let mut logits: Vec<T> = Vec::new();
        for _ in 0..count {
            if seq.len() <= self.config.context {
                while cache.len < seq.len() {
                    let token = seq[cache.len];
                    logits.clear();
                    logits.extend_from_slice(self.decode_next(token, &mut cache)?);
                }
            } else {
                logits.clear();
                logits.extend_from_slice(self.next_logits(&seq)?);
            }
            let next = sample_token(&logits, temperature, rng);
            seq.push(next);
        }
        Ok(seq.split_off(prompt.len()))
    }

    /// Logits after `token` at position `cache.len` (then advanced), from the
    /// keys and values `cache` holds for the positions before it.
    fn decode_next<'s>(&'s mut self, token: u32, cache: &mut DecodeCache<T>) -> Result<&'s [T]> {
        let (c, n, v) = (self.config.width, self.config.streams, self.config.vocab);
        let pos = cache.len;
        if token as usize >= v {
            return Err(MhcError::TokenOutOfRange { token, vocab: v });
        }
        if pos >= self.config.context {
            return Err(MhcError::ShapeMismatch {
                what: "incremental decoding position (< context)",
                expected: self.config.context,
                got: pos + 1,
            });
        }
        let s = n * c;
        let e = &self.token_embedding.value[token as usize * c..(token as usize + 1) * c];
        let p = &self.position_embedding.value[pos * c..(pos + 1) * c];
        for stream in 0..n {
            for ((x, &ev), &pv) in cache.x[stream * c..(stream + 1) * c]
                .iter_mut()
                .zip(e)
                .zip(p)
            {
                *x = ev + pv;
            }
        }
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let mut attn = blocks::CachedAttention {
                attn: &b.attn,
                keys: &mut cache.keys[l],
                values: &mut cache.values[l],
                scratch: &mut cache.scratch,
            };
            b.attn_conn
                .forward(&mut attn, &cache.x[..s], &mut cache.y[..s], &mut cache.ws)?;
            b.mlp_conn
                .forward(&mut b.mlp, &cache.y[..s], &mut cache.x[..s], &mut cache.ws)?;
        }
        let inv_n = T::one() / T::of(n as f64);
        let r = &mut self.reduced[..c];
        r.copy_from_slice(&cache.x[..c]);
        for stream in 1..n {
            for (rv, &xv) in r.iter_mut().zip(&cache.x[stream * c..(stream + 1) * c]) {
                *rv = *rv + xv;
            }
        }
        r.iter_mut().for_each(|v| *v = *v * inv_n);
        rmsnorm(
            &self.reduced[..c],
            &self.final_norm.value,
            T::of(1e-6),
            &mut self.normed[..c],
            &mut self.inv_rms[..1],
        );
        matmul(&self.normed, &self.head.value, &mut self.logits, 1, c, v);
        cache.len += 1;
        Ok(&self.logits[..v])
    }

    /// Amax gains of every `H_res` of the last forward and their composite over depth.
    pub fn gain_report(&self) -> Result<GainReport> {
        let n = self.config.streams;
        let tokens = self.shape.batch * self.shape.seq;
        if tokens == 0 {
            return Err(MhcError::BackwardBeforeForward);
        }
        let per_layer: Vec<Vec<f64>> = self
            .blocks
            .iter()
            .flat_map(|b| [&b.attn_ws, &b.mlp_ws])
            .map(|ws| {
                (0..tokens)
                    .flat_map(|t| ws.h_res(t).unwrap_or_default().iter().map(|v| v.as_f64()))
                    .collect()
            })
            .collect();
        GainReport::from_h_res(&per_layer, n, self.config.scheme.is_manifold_constrained())
    }
}

impl GainReport {
    /// The report of per-layer `H_res` matrices: `per_layer[l]` holds layer `l`'s
    /// `[tokens, n, n]` (any backend's coefficients); `sk` adds the SK residual.
    pub fn from_h_res(per_layer: &[Vec<f64>], n: usize, sk: bool) -> Result<Self> {
        if n == 0 {
            return Err(MhcError::ZeroStreams);
        }
        let nn = n * n;
        let mut report = GainReport::default();
        for h in per_layer {
            let (mut fwd, mut bwd) = (0.0f64, 0.0f64);
            for m in h.chunks_exact(nn) {
                let g = amax_gain_unchecked(m, n);
                fwd = fwd.max(g.forward);
                bwd = bwd.max(g.backward);
                if sk {
                    report.sk_residual = report.sk_residual.max(column_residual(m, n));
                }
            }
            report.amax_fwd.push(fwd);
            report.amax_bwd.push(bwd);
        }
        let layers: Vec<&[f64]> = per_layer.iter().map(|v| v.as_slice()).collect();
        report.composite = vec![CompositeGain::default(); layers.len()];
        composite_gains(&layers, n, &mut report.composite, &mut vec![0.0; 2 * nn])?;
        Ok(report)
    }
}

/// Samples from `softmax(logits / temperature)`; greedy for `temperature ≤ 0`.
pub fn sample_token<T: Real>(logits: &[T], temperature: f64, rng: &mut Rng) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .fold((0usize, T::neg_infinity()), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0;
    if temperature <= 0.0 {
        return argmax as u32;
    }
    let max = logits[argmax].as_f64();
    let weights = logits
        .iter()
        .map(|v| libm::exp((v.as_f64() - max) / temperature));
    let total: f64 = weights.clone().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights.enumerate() {
        u -= w;
        if u <= 0.0 {
            return i as u32;
        }
    }
    argmax as u32
}

/// What incremental decoding keeps between positions: per block the
/// attention's keys and values so far, and one token's buffers.
struct DecodeCache<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
    scratch: blocks::CachedScratch<T>,
    ws: Workspace<T>,
    x: Vec<T>,
    y: Vec<T>,
    len: usize,
}

impl<T: Real> DecodeCache<T> {
    fn new(model: &Model<T>) -> Self {
        let cfg = model.config;
        let s = cfg.streams * cfg.width;
        Self {
            keys: vec![Vec::new(); cfg.layers],
            values: vec![Vec::new(); cfg.layers],
            scratch: blocks::CachedScratch::default(),
            ws: Workspace::new(&cfg.connection(), 1),
            x: vec![T::zero(); s],
            y: vec![T::zero(); s],
            len: 0,
        }
    }
}

/// Settings of a training run (the model's shape lives in [`ModelConfig`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    /// Sequences per step.
    pub batch: usize,
    /// Learning-rate schedule (its `total` is the number of steps).
    pub schedule: Schedule,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value (`≤ 0`: no clipping).
    pub clip: f64,
    /// Seed of initialisation and batch sampling.
    pub seed: u64,
}

/// Statistics of one optimisation step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy of the batch (nats/token), before the update.
    pub loss: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// Model + optimiser + data RNG: everything a deterministic run needs.
#[derive(Clone, Debug)]
pub struct Trainer<T> {
    /// The model.
    pub model: Model<T>,
    /// AdamW state.
    pub optimizer: AdamW<T>,
    /// Batch-sampling RNG (part of the checkpoint).
    pub rng: Rng,
    /// Settings.
    pub config: TrainConfig,
    batch_tokens: Vec<u32>,
    /// Every gradient, flattened in parameter order, for the data-parallel all-reduce.
    flat_grads: Vec<T>,
}

impl<T: Real> Trainer<T> {
    /// A fresh run: the model is initialised from `config.seed`, the batch RNG from a derived seed.
    pub fn new(model: ModelConfig, config: TrainConfig) -> Result<Self> {
        Self::replica(model, config, 1)
    }

    /// One of `replicas` data-parallel replicas of the run [`Trainer::new`]
    /// would start: the same initial weights, optimiser and batch RNG, with
    /// activation buffers for one shard of `batch / replicas` sequences (see
    /// [`parallel`]). `replicas = 1` is [`Trainer::new`].
    pub fn replica(model: ModelConfig, config: TrainConfig, replicas: usize) -> Result<Self> {
        if config.batch == 0 {
            return Err(MhcError::InvalidConfig(String::from(
                "batch must be at least 1",
            )));
        }
        if !(config.schedule.max_lr.is_finite() && config.schedule.max_lr > 0.0) {
            return Err(MhcError::InvalidConfig(format!(
                "learning rate must be positive and finite, got {}",
                config.schedule.max_lr
            )));
        }
        let shard = parallel::shard_len(config.batch, replicas)?;
        let mut model = Model::new(model, shard * model.context, config.seed)?;
        let mut lens = Vec::new();
        model.for_each_param(|_, p, _| lens.push(p.len()));
        Ok(Self {
            model,
            optimizer: AdamW::new(config.adamw, lens),
            rng: Rng::new(config.seed ^ 0xDA7A_5EED),
            config,
            batch_tokens: Vec::new(),
            flat_grads: Vec::new(),
        })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.optimizer.step
    }

    /// One AdamW step on a random batch of `data` (byte tokens). On a
    /// non-finite loss or gradient nothing is updated and an error returned.
    ///
    /// The same as [`Trainer::sample_batch`], [`Trainer::gradients`],
    /// [`Trainer::gradient_norm`] and [`Trainer::apply`] in turn.
    pub fn step(&mut self, data: &[u8]) -> Result<StepStats> {
        self.sample_batch(data)?;
        let tokens = core::mem::take(&mut self.batch_tokens);
        let loss = self.gradients(&tokens, self.config.batch);
        self.batch_tokens = tokens;
        let loss = loss?;
        let grad_norm = self.gradient_norm();
        self.apply(loss, grad_norm)
    }

    /// Draws the next training batch of `config.batch` windows of `data`
    /// with the trainer's RNG (advancing it) into [`Trainer::batch_tokens`].
    pub fn sample_batch(&mut self, data: &[u8]) -> Result<()> {
        let ctx = self.model.config().context;
        self.batch_tokens.resize(self.config.batch * (ctx + 1), 0);
        data::sample_batch(
            data,
            self.config.batch,
            ctx,
            &mut self.rng,
            &mut self.batch_tokens,
        )
    }

    /// The batch of the last [`Trainer::sample_batch`]: `[batch, context + 1]` token ids.
    pub fn batch_tokens(&self) -> &[u32] {
        &self.batch_tokens
    }

    /// Zeroes the gradients, then forward and backward of `tokens
    /// [batch, seq + 1]`: afterwards every parameter's gradient holds
    /// `∂L/∂θ` of the mean cross-entropy `L` of these tokens, which is returned.
    pub fn gradients(&mut self, tokens: &[u32], batch: usize) -> Result<T> {
        self.model.zero_grad();
        let loss = self.model.forward(tokens, batch)?;
        self.model.backward()?;
        Ok(loss)
    }

    /// Global L2 norm of the current gradients, `sqrt(Σ_θ Σ g²)`, accumulated in f64.
    pub fn gradient_norm(&mut self) -> f64 {
        let mut sq = 0.0f64;
        self.model
            .for_each_param(|_, _, g| sq += g.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>());
        libm::sqrt(sq)
    }

    /// Applies the current gradients (whose global norm is `grad_norm`): clips
    /// them to `config.clip` by that norm, then one AdamW update at the
    /// schedule's learning rate. `loss` is only reported. On a non-finite
    /// `grad_norm` nothing is updated and [`MhcError::NonFinite`] returned.
    pub fn apply(&mut self, loss: T, grad_norm: f64) -> Result<StepStats> {
        if !grad_norm.is_finite() {
            return Err(MhcError::NonFinite {
                what: "gradient",
                index: 0,
            });
        }
        let lr = self.config.schedule.lr(self.optimizer.step);
        let scale = if self.config.clip > 0.0 && grad_norm > self.config.clip {
            T::of(self.config.clip / grad_norm)
        } else {
            T::one()
        };
        self.optimizer.begin_step();
        let opt = &mut self.optimizer;
        let mut index = 0;
        self.model.for_each_param(|id, p, g| {
            if scale != T::one() {
                g.iter_mut().for_each(|v| *v = *v * scale);
            }
            opt.update(index, p, g, lr, id.decay);
            index += 1;
        });
        Ok(StepStats {
            loss: loss.as_f64(),
            grad_norm,
            lr,
        })
    }

    /// Mean loss over `batches` fixed validation batches (the same windows at
    /// every call, from `seed`, so evaluations are comparable across steps and schemes).
    ///
    /// A data-parallel replica (activation buffers for one shard, see
    /// [`Trainer::replica`]) evaluates each batch in shard-sized pieces and
    /// weights them by their sequences, so it gives the same mean up to rounding.
    pub fn evaluate(&mut self, data: &[u8], batches: usize, seed: u64) -> Result<f64> {
        let ctx = self.model.config().context;
        let batch = self.config.batch;
        let piece = (self.model.capacity() / ctx).clamp(1, batch);
        let mut rng = Rng::new(seed);
        let mut total = 0.0;
        self.batch_tokens.resize(batch * (ctx + 1), 0);
        for _ in 0..batches.max(1) {
            data::sample_batch(data, batch, ctx, &mut rng, &mut self.batch_tokens)?;
            if piece == batch {
                total += self.model.loss(&self.batch_tokens, batch)?.as_f64();
                continue;
            }
            let mut sum = 0.0;
            for rows in self.batch_tokens.chunks(piece * (ctx + 1)) {
                let seqs = rows.len() / (ctx + 1);
                sum += self.model.loss(rows, seqs)?.as_f64() * seqs as f64;
            }
            total += sum / batch as f64;
        }
        Ok(total / batches.max(1) as f64)
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    /// Incremental decoding gives, bit for bit, the logits of the full
    /// forward's last position, position after position, for every scheme.
    #[test]
    fn cached_logits_equal_full_forward_logits() {
        for (scheme, n) in [
            (Scheme::Residual, 1),
            (Scheme::HcDynamic, 3),
            (Scheme::MhcDynamic, 4),
            (Scheme::MhcStatic, 2),
        ] {
            let config = ModelConfig {
                vocab: 13,
                width: 8,
                layers: 2,
                heads: 2,
                context: 7,
                streams: n,
                scheme,
                sinkhorn_iterations: 20,
            };
            let mut model = Model::<f64>::new(config, config.context, 2).unwrap();
            let mut rng = Rng::new(6);
            model.for_each_param(|_, p, _| {
                p.iter_mut().for_each(|v| *v += 0.3 * rng.normal());
            });
            let tokens = [5u32, 0, 12, 7, 7, 3, 9];
            let mut cache = DecodeCache::new(&model);
            for t in 0..tokens.len() {
                let cached = model.decode_next(tokens[t], &mut cache).unwrap().to_vec();
                let full = model.next_logits(&tokens[..=t]).unwrap().to_vec();
                assert_eq!(cached, full, "{scheme} n={n} position {t}");
            }
            // The window is full: one more position is an error, not a wrong answer.
            assert!(model.decode_next(1, &mut cache).is_err());
        }
    }
}
