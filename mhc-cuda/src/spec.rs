//! What a training run is: the model shape, the optimiser settings and the
//! data, as one serialisable record ([`RunSpec`]) kept in every checkpoint, and
//! the presets the CLI starts from.

use mhc_core::Scheme;
use mhc_core::model::optim::{AdamWConfig, Schedule};
use mhc_core::model::{ModelConfig, TrainConfig};
use serde::{Deserialize, Serialize};

/// Everything that determines a run (bit for bit, with its seed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Scheme name: `residual`, `hc`, `hc-static`, `mhc`, `mhc-static`.
    pub scheme: String,
    /// Vocabulary (256: bytes).
    pub vocab: usize,
    /// Model width `C`.
    pub width: usize,
    /// Blocks `L` (2L wrapped sublayers).
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Context length.
    pub context: usize,
    /// Streams `n` (1 for residual).
    pub streams: usize,
    /// Sinkhorn–Knopp iterations.
    pub sinkhorn_iters: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Optimiser steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate (cosine floor).
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub clip: f64,
    /// Seed of initialisation and batches.
    pub seed: u64,
    /// `embedded` or the path of the text file/folder.
    pub data: String,
    /// Fraction of the data held out for validation.
    pub validation_fraction: f64,
    /// Log metrics (and Amax gains) every this many steps.
    pub log_every: u64,
    /// Evaluate validation loss every this many steps.
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
}

/// A named starting point for the CLI's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// 2 blocks (4 wrapped sublayers), C = 64: a three-scheme compare in about 2 minutes on 2 cores.
    Tiny,
    /// 12 blocks (24 wrapped sublayers), C = 64: where composite gains over depth show.
    Deep,
}

impl Preset {
    /// The preset's run (scheme `mhc`, embedded data, seed 0).
    pub fn spec(self) -> RunSpec {
        let base = RunSpec {
            scheme: "mhc".into(),
            vocab: 256,
            width: 64,
            layers: 2,
            heads: 4,
            context: 64,
            streams: 4,
            sinkhorn_iters: 20,
            batch: 16,
            steps: 300,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 30,
            weight_decay: 0.1,
            clip: 1.0,
            seed: 0,
            data: "embedded".into(),
            validation_fraction: 0.1,
            log_every: 10,
            eval_every: 50,
            eval_batches: 4,
            checkpoint_every: 100,
        };
        match self {
            Self::Tiny => base,
            Self::Deep => RunSpec {
                layers: 12,
                steps: 300,
                ..base
            },
        }
    }

    /// Parses `tiny` or `deep`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "tiny" => Ok(Self::Tiny),
            "deep" => Ok(Self::Deep),
            other => Err(format!("unknown preset '{other}': use tiny or deep")),
        }
    }
}

impl RunSpec {
    /// The scheme, parsed.
    pub fn scheme(&self) -> Result<Scheme, String> {
        self.scheme.parse()
    }

    /// The core's model configuration.
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        Ok(ModelConfig {
            vocab: self.vocab,
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            context: self.context,
            streams: self.streams,
            scheme: self.scheme()?,
            sinkhorn_iterations: self.sinkhorn_iters,
        })
    }

    /// The core's training configuration.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            batch: self.batch,
            schedule: Schedule {
                max_lr: self.lr,
                min_lr: self.min_lr,
                warmup: self.warmup,
                total: self.steps,
            },
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            clip: self.clip,
            seed: self.seed,
        }
    }

    /// Checks every hyperparameter; the message names the flag to fix.
    pub fn validate(&self) -> Result<(), String> {
        let scheme = self.scheme()?;
        if self.steps == 0 {
            return Err("--steps must be at least 1".into());
        }
        if self.batch == 0 {
            return Err("--batch must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("--lr must be a positive number, got {}", self.lr));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(format!(
                "the final learning rate must lie in [0, --lr], got {}",
                self.min_lr
            ));
        }
        if !(self.clip.is_finite()
            && self.clip >= 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0)
        {
            return Err("clip and weight decay must be finite and non-negative".into());
        }
        if !(self.validation_fraction > 0.0 && self.validation_fraction < 1.0) {
            return Err(format!(
                "the validation fraction must lie in (0, 1), got {}",
                self.validation_fraction
            ));
        }
        if scheme == Scheme::Residual && self.streams != 1 {
            return Err(format!(
                "the residual scheme has one stream; got --n {}",
                self.streams
            ));
        }
        if self.log_every == 0
            || self.eval_every == 0
            || self.checkpoint_every == 0
            || self.eval_batches == 0
        {
            return Err(
                "--log-every, --eval-every, --checkpoint-every and eval batches must be at least 1"
                    .into(),
            );
        }
        self.model_config()?
            .validate()
            .map_err(|e| e.to_string().replacen("invalid configuration: ", "", 1))
    }
}
