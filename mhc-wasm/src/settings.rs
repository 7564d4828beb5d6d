//! What a browser trainer is: the model shape, the optimiser settings, the
//! backend choice ([`TrainerSettings`]), with the demo's defaults and the
//! checks that turn bad input into a clear [`WebError`].

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;
use core::str::FromStr;

use mhc_core::model::optim::{AdamWConfig, Schedule};
use mhc_core::model::{ModelConfig, TrainConfig};
use mhc_core::{MhcError, Scheme};

/// Which device a trainer should run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// WebGPU when this build has the WebGPU backend and `navigator.gpu`
    /// gives an adapter, the CPU core otherwise.
    Auto,
    /// Always the CPU core (`mhc_core::model::Trainer`).
    Cpu,
    /// WebGPU or an error saying why not.
    WebGpu,
}

impl FromStr for BackendChoice {
    type Err = WebError;
    fn from_str(s: &str) -> Result<Self, WebError> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "webgpu" => Ok(Self::WebGpu),
            other => Err(WebError::Config(format!(
                "unknown backend '{other}': use auto, cpu or webgpu"
            ))),
        }
    }
}

/// Everything that defines one browser training run (bit for bit on the
/// CPU path, with its seed and text).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainerSettings {
    /// Residual-stream scheme (`residual` needs `n = 1`).
    pub scheme: Scheme,
    /// Streams `n` (the expansion rate).
    pub n: usize,
    /// Blocks `L`; each has two wrapped sublayers (attention, MLP).
    pub layers: usize,
    /// Model width `C`.
    pub width: usize,
    /// Attention heads (must divide `C`).
    pub heads: usize,
    /// Context length in bytes.
    pub context: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps (linear from 0 to `lr`).
    pub warmup: u64,
    /// Steps of the cosine schedule (to `lr / 10`); training may go on after it at `lr / 10`.
    pub steps: u64,
    /// Sinkhorn–Knopp iterations (mHC).
    pub sinkhorn_iters: usize,
    /// Seed of initialisation, batches and sampling.
    pub seed: u64,
    /// Fraction of the text held out for the validation loss (the tail).
    pub validation_fraction: f64,
    /// Which device to train on.
    pub backend: BackendChoice,
}

impl Default for TrainerSettings {
    /// The demo's default model: mHC, `n = 4`, 4 blocks (8 wrapped
    /// sublayers) of width 32 with 4 heads, 32-byte context, 8 sequences a
    /// step — small enough for a few tens of steps a second on a laptop CPU,
    /// deep enough that HC's composite gain grows visibly.
    fn default() -> Self {
        Self {
            scheme: Scheme::MhcDynamic,
            n: 4,
            layers: 4,
            width: 32,
            heads: 4,
            context: 32,
            batch: 8,
            lr: 3e-3,
            warmup: 20,
            steps: 2000,
            sinkhorn_iters: 20,
            seed: 0,
            validation_fraction: 0.1,
            backend: BackendChoice::Auto,
        }
    }
}

impl TrainerSettings {
    /// The core's model configuration (bytes: vocabulary 256).
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            vocab: 256,
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            context: self.context,
            streams: self.n,
            scheme: self.scheme,
            sinkhorn_iterations: self.sinkhorn_iters,
        }
    }

    /// The core's training configuration: AdamW defaults, clipping at 1,
    /// warm-up then cosine from `lr` to `lr / 10` over `steps`.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            batch: self.batch,
            schedule: Schedule {
                max_lr: self.lr,
                min_lr: self.lr / 10.0,
                warmup: self.warmup,
                total: self.steps,
            },
            adamw: AdamWConfig::default(),
            clip: 1.0,
            seed: self.seed,
        }
    }

    /// Checks every field; the message names the field and the fix.
    ///
    /// The model's own checks ([`ModelConfig::validate`]: `n = 0`, heads
    /// not dividing the width, residual with `n ≠ 1`, …) come back as
    /// [`WebError::Core`] with mhc-core's message.
    pub fn validate(&self) -> Result<(), WebError> {
        if self.batch == 0 {
            return Err(WebError::Config("batch must be at least 1".to_string()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(WebError::Config(format!(
                "learning rate must be positive and finite, got {}",
                self.lr
            )));
        }
        if !(self.validation_fraction.is_finite() && (0.0..1.0).contains(&self.validation_fraction))
        {
            return Err(WebError::Config(format!(
                "validation_fraction must be in [0, 1), got {}",
                self.validation_fraction
            )));
        }
        // Keep the browser from being asked for gigabytes.
        let tokens = self.batch.saturating_mul(self.context);
        let state = tokens
            .saturating_mul(self.n)
            .saturating_mul(self.width)
            .saturating_mul(2 * self.layers + 3);
        if tokens > 1 << 16 || state > 1 << 26 {
            return Err(WebError::Config(format!(
                "model too large for the browser demo: batch · context = {tokens} tokens and \
                 {state} stream values; keep batch · context ≤ 65536 and \
                 batch · context · n · width · (2·layers + 3) ≤ 2^26"
            )));
        }
        self.model_config().validate().map_err(WebError::Core)
    }
}

/// Why a call of the browser API failed; its `Display` text is the message
/// of the JavaScript exception.
#[derive(Clone, Debug, PartialEq)]
pub enum WebError {
    /// mhc-core rejected the model, the data or a step (its typed error).
    Core(MhcError),
    /// A setting of the browser API is invalid.
    Config(String),
    /// The training text cannot be used (empty, too short for the context).
    Data(String),
    /// The requested backend is not available (not built, or no adapter).
    Backend(String),
    /// The WebGPU backend failed: a limit of the adapter, a validation or
    /// readback error (`mhc-gpu`'s typed error).
    Gpu(mhc_gpu::GpuError),
}

impl fmt::Display for WebError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Core(e) => write!(f, "{e}"),
            Self::Config(m) => write!(f, "invalid configuration: {m}"),
            Self::Data(m) => write!(f, "training text: {m}"),
            Self::Backend(m) => write!(f, "backend: {m}"),
            Self::Gpu(e) => write!(f, "WebGPU: {e}"),
        }
    }
}

impl From<MhcError> for WebError {
    fn from(e: MhcError) -> Self {
        Self::Core(e)
    }
}

impl From<mhc_gpu::GpuError> for WebError {
    /// Core errors (a diverged step, a bad token) stay [`WebError::Core`];
    /// a missing adapter, a refused or lost device become
    /// [`WebError::Backend`] with what to do in a browser; the rest (limits,
    /// validation, readback) [`WebError::Gpu`].
    fn from(e: mhc_gpu::GpuError) -> Self {
        use mhc_gpu::GpuError;
        match e {
            GpuError::Core(e) => Self::Core(e),
            GpuError::NoAdapter(m) => Self::Backend(format!(
                "WebGPU gave no adapter ({m}); enable WebGPU in the browser (Chromium: \
                 --enable-unsafe-webgpu) or choose the CPU backend"
            )),
            GpuError::DeviceRequest(m) => Self::Backend(format!(
                "the WebGPU adapter refused to create a device ({m}); choose the CPU backend"
            )),
            GpuError::DeviceLost(m) => Self::Backend(format!(
                "the WebGPU device was lost ({m}) and its weights with it: press Reset and \
                 start again, or choose the CPU backend"
            )),
            other => Self::Gpu(other),
        }
    }
}

impl core::error::Error for WebError {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn gpu_errors_become_browser_messages() {
        use mhc_gpu::GpuError;
        let e = WebError::from(GpuError::NoAdapter("none".into()));
        assert!(e.to_string().contains("--enable-unsafe-webgpu"), "{e}");
        let e = WebError::from(GpuError::DeviceLost("Destroyed".into()));
        assert!(e.to_string().contains("press Reset"), "{e}");
        let e = WebError::from(GpuError::Core(MhcError::ZeroStreams));
        assert_eq!(e, WebError::Core(MhcError::ZeroStreams));
        let e = WebError::from(GpuError::Readback("map failed".into()));
        assert!(
            e.to_string()
                .starts_with("WebGPU: reading a GPU buffer back failed"),
            "{e}"
        );
    }

    #[test]
    fn defaults_are_valid() {
        TrainerSettings::default().validate().unwrap();
    }

    #[test]
    fn bad_settings_give_messages_that_name_the_field() {
        let base = TrainerSettings::default();
        let cases: [(TrainerSettings, &str); 6] = [
            (TrainerSettings { n: 0, ..base }, "expansion rate n"),
            (
                TrainerSettings { heads: 5, ..base },
                "heads (5) must divide",
            ),
            (
                TrainerSettings {
                    scheme: Scheme::Residual,
                    ..base
                },
                "exactly one stream",
            ),
            (TrainerSettings { batch: 0, ..base }, "batch must be"),
            (TrainerSettings { lr: -1.0, ..base }, "learning rate"),
            (
                TrainerSettings {
                    width: 4096,
                    context: 4096,
                    ..base
                },
                "too large",
            ),
        ];
        for (settings, expected) in cases {
            let message = settings.validate().unwrap_err().to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("auto".parse::<BackendChoice>(), Ok(BackendChoice::Auto));
        assert_eq!("cpu".parse::<BackendChoice>(), Ok(BackendChoice::Cpu));
        assert_eq!("webgpu".parse::<BackendChoice>(), Ok(BackendChoice::WebGpu));
        let e = "cuda".parse::<BackendChoice>().unwrap_err().to_string();
        assert!(e.contains("unknown backend 'cuda'"), "{e}");
    }
}
