//! One training run in the browser, independent of JavaScript: the backend
//! ([`Backend`]), the text, the last step's coefficients and gains, sampling.
//!
//! Everything here is plain Rust, so it is unit-tested natively; the
//! `wasm_bindgen` layer ([`crate::WasmTrainer`]) only converts to and from JS.
//! The methods that will wait on the GPU (`step`, `evaluate`, `sample`,
//! `refresh_snapshot`) are `async` already: the CPU backend finishes them in
//! the first poll, the WebGPU backend will await its readbacks.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use mhc_core::model::data::split_train_validation;
use mhc_core::model::{GainReport, StepStats, Trainer};
use mhc_core::{MhcError, Rng};

use crate::settings::{BackendChoice, TrainerSettings, WebError};

/// Fixed seed of the validation windows: every evaluation of a run, and of
/// the three schemes, sees the same bytes (the seed `mhc-train` uses).
pub const VALIDATION_SEED: u64 = 0x005E_ED0F_7A11;

/// Validation batches per [`Session::evaluate`].
pub const VALIDATION_BATCHES: usize = 4;

/// Whether this build contains the WebGPU backend (`mhc-gpu`). It does not
/// yet: the crate has not landed, and the CPU core trains.
pub const WEBGPU_BUILT: bool = false;

/// The device a session trains on.
///
/// # Slotting in WebGPU (`mhc-gpu`)
/// A variant `WebGpu { gpu: mhc_gpu::WgpuTrainer, cpu: Box<Trainer<f32>> }`
/// goes beside `Cpu`; `cpu` keeps the batch RNG (so both backends draw the
/// same batches, as `mhc-train`'s CUDA path does) and mirrors the weights for
/// sampling. What it needs from `mhc-gpu`, all usable on `wasm32` without
/// blocking:
/// - `GpuContext::new().await` (wgpu's WebGPU backend; `NoAdapter` error when
///   `navigator.gpu` gives none) and a description of its adapter;
/// - `WgpuTrainer::from_cpu(Arc<GpuContext>, &Trainer<f32>)`;
/// - `step_async(&[u32])` on the `[batch, context + 1]` tokens that
///   `mhc_core::model::data::sample_batch` drew with the CPU trainer's RNG;
/// - `evaluate_async(data, batches, seed)`;
/// - `gain_report_async()` and the per-sublayer coefficients of the last
///   step, `[tokens, n² + 2n]` each (for the heatmaps, without copying every
///   weight back at each chunk);
/// - `sync_to_cpu_async(&mut Trainer<f32>)` before sampling.
///
/// Then [`choose_backend`] returns `"webgpu"` when an adapter is found
/// ([`WEBGPU_BUILT`] becomes `true`), and [`Session::new`] builds the variant.
#[derive(Debug)]
pub enum Backend {
    /// The reference trainer of `mhc-core`, in f32.
    Cpu(Box<Trainer<f32>>),
}

impl Backend {
    /// One optimisation step on a random batch of `data`.
    pub async fn step(&mut self, data: &[u8]) -> Result<StepStats, MhcError> {
        match self {
            Self::Cpu(t) => t.step(data),
        }
    }

    /// Mean loss over the fixed validation batches.
    pub async fn evaluate(&mut self, data: &[u8]) -> Result<f64, MhcError> {
        match self {
            Self::Cpu(t) => t.evaluate(data, VALIDATION_BATCHES, VALIDATION_SEED),
        }
    }

    /// The CPU trainer holding the current weights and the last forward's
    /// coefficients (for the GPU: after copying them back).
    pub async fn cpu_trainer(&mut self) -> Result<&mut Trainer<f32>, MhcError> {
        match self {
            Self::Cpu(t) => Ok(t),
        }
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        match self {
            Self::Cpu(t) => t.step_count(),
        }
    }

    /// `"cpu"` or `"webgpu"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu(_) => "cpu",
        }
    }
}

/// What a WebGPU probe found: `None` when `navigator.gpu` is missing or
/// gave no adapter, else a description of the adapter.
pub type AdapterProbe = Option<String>;

/// Picks the backend for `choice` given what the WebGPU probe found, and
/// says why in one line shown on the page.
pub fn choose_backend(
    choice: BackendChoice,
    adapter: &AdapterProbe,
) -> Result<(&'static str, String), WebError> {
    let not_built =
        "the WebGPU backend is not built into this mhc-wasm yet (it waits for the mhc-gpu crate)";
    match (choice, adapter) {
        (BackendChoice::Cpu, _) => Ok(("cpu", String::from("CPU core (chosen)"))),
        (BackendChoice::WebGpu, _) if !WEBGPU_BUILT => Err(WebError::Backend(format!(
            "{not_built}; choose backend 'auto' or 'cpu'"
        ))),
        (BackendChoice::WebGpu, None) => Err(WebError::Backend(String::from(
            "WebGPU was asked for but navigator.gpu gave no adapter (in Chromium start it with --enable-unsafe-webgpu)",
        ))),
        (BackendChoice::Auto, None) => Ok((
            "cpu",
            String::from("CPU core (navigator.gpu gave no WebGPU adapter)"),
        )),
        (BackendChoice::Auto, Some(a)) if !WEBGPU_BUILT => Ok((
            "cpu",
            format!("CPU core — WebGPU adapter found ({a}), but {not_built}"),
        )),
        (_, Some(a)) => Ok(("webgpu", format!("WebGPU: {a}"))),
    }
}

/// Statistics of a run of steps.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StepsReport {
    /// Steps taken in total after this call.
    pub step: u64,
    /// Loss of each step of this call (nats/byte, before its update).
    pub losses: Vec<f64>,
    /// Global gradient norm of each step (before clipping).
    pub grad_norms: Vec<f64>,
    /// Learning rate of the last step.
    pub lr: f64,
}

/// The coefficients of every wrapped sublayer for the tokens of the last
/// training batch, `H_pre`, `H_post` (`[layers, tokens, n]`) and `H_res`
/// (`[layers, tokens, n, n]`, row-major), in f32.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CoefficientSnapshot {
    /// Step after which they were taken.
    pub step: u64,
    /// Wrapped sublayers `2L`.
    pub layers: usize,
    /// Tokens of the batch.
    pub tokens: usize,
    /// Streams.
    pub n: usize,
    /// `[layers, tokens, n]`.
    pub h_pre: Vec<f32>,
    /// `[layers, tokens, n]`.
    pub h_post: Vec<f32>,
    /// `[layers, tokens, n, n]`.
    pub h_res: Vec<f32>,
}

impl CoefficientSnapshot {
    /// The mean over tokens of `per_token` (`[layers, tokens, m]`): `[layers, m]`.
    pub fn token_mean(&self, per_token: &[f32], m: usize) -> Vec<f32> {
        let mut out = alloc::vec![0.0f32; self.layers * m];
        if self.tokens == 0 {
            return out;
        }
        let inv = 1.0 / self.tokens as f64;
        for l in 0..self.layers {
            for j in 0..m {
                let sum: f64 = (0..self.tokens)
                    .map(|t| f64::from(per_token[(l * self.tokens + t) * m + j]))
                    .sum();
                out[l * m + j] = (sum * inv) as f32;
            }
        }
        out
    }
}

/// A browser training run: backend, text, sampling RNG and the last step's
/// coefficients and gains.
#[derive(Debug)]
pub struct Session {
    settings: TrainerSettings,
    backend: Backend,
    backend_note: String,
    train: Vec<u8>,
    validation: Vec<u8>,
    sample_rng: Rng,
    snapshot: CoefficientSnapshot,
    gains: Option<GainReport>,
}

impl Session {
    /// A fresh run on `text` (UTF-8 bytes are the tokens), on the backend
    /// [`choose_backend`] picks for `adapter`.
    ///
    /// The last `validation_fraction` of the text is held out when it holds
    /// at least `context + 1` bytes; otherwise there is no validation loss.
    pub async fn new(
        settings: TrainerSettings,
        text: &[u8],
        adapter: &AdapterProbe,
    ) -> Result<Self, WebError> {
        settings.validate()?;
        if text.is_empty() {
            return Err(WebError::Data(String::from(
                "the text is empty: pick a built-in dataset or paste some text",
            )));
        }
        let window = settings.context + 1;
        let (mut train, mut validation) =
            split_train_validation(text, settings.validation_fraction);
        if validation.len() < window {
            (train, validation) = (text, &[]);
        }
        if train.len() < window {
            return Err(WebError::Data(format!(
                "{} bytes are too few for a context of {} bytes: give at least {window} bytes or lower the context",
                text.len(),
                settings.context
            )));
        }
        let (name, backend_note) = choose_backend(settings.backend, adapter)?;
        let trainer = Trainer::<f32>::new(settings.model_config(), settings.train_config())?;
        let backend = match name {
            "cpu" => Backend::Cpu(Box::new(trainer)),
            other => {
                return Err(WebError::Backend(format!(
                    "backend '{other}' is not part of this build"
                )));
            }
        };
        Ok(Self {
            settings,
            backend,
            backend_note,
            train: train.to_vec(),
            validation: validation.to_vec(),
            sample_rng: Rng::new(settings.seed ^ 0x5A3F_1E00),
            snapshot: CoefficientSnapshot::default(),
            gains: None,
        })
    }

    /// The settings of the run.
    pub fn settings(&self) -> &TrainerSettings {
        &self.settings
    }

    /// `"cpu"` or `"webgpu"`.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// One line on the device: which, and why.
    pub fn backend_note(&self) -> &str {
        &self.backend_note
    }

    /// Bytes of training and validation text.
    pub fn data_len(&self) -> (usize, usize) {
        (self.train.len(), self.validation.len())
    }

    /// Scalar parameters of the model.
    pub async fn num_params(&mut self) -> Result<usize, WebError> {
        Ok(self.backend.cpu_trainer().await?.model.num_params())
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.backend.step_count()
    }

    /// Runs `k ≥ 1` steps, then takes the coefficients and gains of the last
    /// step's batch. A NaN/Inf loss or gradient stops with an error and
    /// leaves the weights of the last good step.
    pub async fn step(&mut self, k: u32) -> Result<StepsReport, WebError> {
        if k == 0 {
            return Err(WebError::Config(String::from("step(k) needs k ≥ 1 steps")));
        }
        let mut report = StepsReport::default();
        for _ in 0..k {
            let stats = self.backend.step(&self.train).await?;
            report.losses.push(stats.loss);
            report.grad_norms.push(stats.grad_norm);
            report.lr = stats.lr;
        }
        report.step = self.backend.step_count();
        self.refresh_snapshot().await?;
        Ok(report)
    }

    async fn refresh_snapshot(&mut self) -> Result<(), WebError> {
        let step = self.backend.step_count();
        let model = &self.backend.cpu_trainer().await?.model;
        let n = model.config().streams;
        let layers = model.config().sublayers();
        let tokens = model.last_tokens();
        let k = n * n + 2 * n;
        let mut snap = CoefficientSnapshot {
            step,
            layers,
            tokens,
            n,
            h_pre: Vec::with_capacity(layers * tokens * n),
            h_post: Vec::with_capacity(layers * tokens * n),
            h_res: Vec::with_capacity(layers * tokens * n * n),
        };
        for l in 0..layers {
            let coefficients = model.sublayer_coefficients(l).unwrap_or_default();
            for row in coefficients.chunks_exact(k) {
                snap.h_pre.extend_from_slice(&row[..n]);
                snap.h_post.extend_from_slice(&row[n..2 * n]);
                snap.h_res.extend_from_slice(&row[2 * n..]);
            }
        }
        self.gains = Some(model.gain_report()?);
        self.snapshot = snap;
        Ok(())
    }

    /// Coefficients of the last training step's batch (empty before the first step).
    pub fn coefficients(&self) -> &CoefficientSnapshot {
        &self.snapshot
    }

    /// Amax gains of every `H_res` and of their composite over depth, for the
    /// last training step's batch (`None` before the first step).
    pub fn gains(&self) -> Option<&GainReport> {
        self.gains.as_ref()
    }

    /// Validation loss (nats/byte) over fixed windows of the held-out text.
    pub async fn evaluate(&mut self) -> Result<f64, WebError> {
        if self.validation.is_empty() {
            return Err(WebError::Data(format!(
                "no validation split: the text ({} bytes) is too short to hold out {} of it with \
                 at least context + 1 = {} bytes",
                self.train.len(),
                self.settings.validation_fraction,
                self.settings.context + 1
            )));
        }
        Ok(self.backend.evaluate(&self.validation).await?)
    }

    /// `count` bytes sampled after `prompt` at `temperature` (≤ 0: greedy),
    /// decoded as UTF-8 (invalid sequences become U+FFFD). An empty prompt
    /// starts from a newline.
    pub async fn sample(
        &mut self,
        prompt: &str,
        count: usize,
        temperature: f64,
    ) -> Result<String, WebError> {
        if count > 4096 {
            return Err(WebError::Config(format!(
                "sample at most 4096 bytes at a time, got {count}"
            )));
        }
        if !temperature.is_finite() {
            return Err(WebError::Config(format!(
                "temperature must be finite, got {temperature}"
            )));
        }
        let tokens: Vec<u32> = if prompt.is_empty() {
            alloc::vec![u32::from(b'\n')]
        } else {
            prompt.bytes().map(u32::from).collect()
        };
        let model = &mut self.backend.cpu_trainer().await?.model;
        let out = model.generate(&tokens, count, temperature, &mut self.sample_rng)?;
        let bytes: Vec<u8> = out.into_iter().map(|t| t as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use core::future::Future;
    use core::pin::pin;
    use core::task::{Context, Poll, Waker};
    use mhc_core::Scheme;
    use mhc_core::model::data::synthetic_corpus;

    /// Runs a future that the CPU backend finishes in its first poll.
    fn ready<F: Future>(f: F) -> F::Output {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(f).as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the CPU backend never waits"),
        }
    }

    fn small(scheme: Scheme, n: usize) -> TrainerSettings {
        TrainerSettings {
            scheme,
            n,
            layers: 2,
            width: 16,
            heads: 2,
            context: 16,
            batch: 4,
            backend: BackendChoice::Cpu,
            ..TrainerSettings::default()
        }
    }

    #[test]
    fn mhc_trains_and_reports_doubly_stochastic_h_res() {
        let text = synthetic_corpus(1, 20_000);
        let mut s = ready(Session::new(small(Scheme::MhcDynamic, 4), &text, &None)).unwrap();
        assert_eq!(s.backend_name(), "cpu");
        let first = ready(s.step(1)).unwrap().losses[0];
        let report = ready(s.step(40)).unwrap();
        assert_eq!(report.step, 41);
        assert_eq!(report.losses.len(), 40);
        let last: f64 = report.losses[30..].iter().sum::<f64>() / 10.0;
        assert!(last < first - 0.5, "loss {first} -> {last} did not fall");

        let c = s.coefficients();
        assert_eq!((c.layers, c.tokens, c.n, c.step), (4, 64, 4, 41));
        assert_eq!(c.h_res.len(), 4 * 64 * 16);
        assert_eq!(c.h_pre.len(), 4 * 64 * 4);
        for m in c.h_res.chunks_exact(16) {
            for row in m.chunks_exact(4) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            }
            assert!(m.iter().all(|v| *v >= 0.0));
        }
        assert!(c.h_pre.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(c.h_post.iter().all(|v| (0.0..=2.0).contains(v)));
        let mean = c.token_mean(&c.h_res, 16);
        assert_eq!(mean.len(), 4 * 16);

        let g = s.gains().unwrap();
        assert_eq!(g.composite.len(), 4);
        assert!(g.composite[3].backward_max < 1.5, "{:?}", g.composite[3]);

        let val = ready(s.evaluate()).unwrap();
        assert!(val.is_finite() && val < first);
        let text = ready(s.sample("the ", 20, 0.8)).unwrap();
        assert!(!text.is_empty());
        // Sampling and evaluation leave the snapshot of the training batch.
        assert_eq!(s.coefficients().tokens, 64);
    }

    #[test]
    fn same_seed_same_losses_and_residual_is_identity() {
        let text = synthetic_corpus(2, 5_000);
        let run = || {
            let mut s = ready(Session::new(small(Scheme::Residual, 1), &text, &None)).unwrap();
            ready(s.step(3)).unwrap()
        };
        assert_eq!(run(), run());
        let mut s = ready(Session::new(small(Scheme::Residual, 1), &text, &None)).unwrap();
        ready(s.step(1)).unwrap();
        assert!(s.coefficients().h_res.iter().all(|v| *v == 1.0));
        assert_eq!(s.gains().unwrap().composite[3].backward_max, 1.0);
    }

    #[test]
    fn bad_text_and_calls_give_clear_errors() {
        let settings = small(Scheme::HcDynamic, 4);
        let e = ready(Session::new(settings, b"", &None)).unwrap_err();
        assert!(e.to_string().contains("the text is empty"), "{e}");
        let e = ready(Session::new(settings, b"too short", &None)).unwrap_err();
        assert!(e.to_string().contains("too few for a context of 16"), "{e}");

        // 40 bytes: enough to train, too few to hold out a validation split.
        let mut s = ready(Session::new(settings, &[b'a'; 40], &None)).unwrap();
        assert_eq!(s.data_len(), (40, 0));
        let e = ready(s.evaluate()).unwrap_err();
        assert!(e.to_string().contains("no validation split"), "{e}");
        let e = ready(s.step(0)).unwrap_err();
        assert!(e.to_string().contains("k ≥ 1"), "{e}");
        let e = ready(s.sample("x", 5000, 1.0)).unwrap_err();
        assert!(e.to_string().contains("at most 4096"), "{e}");
        assert!(ready(s.sample("", 3, 0.0)).is_ok());
    }

    #[test]
    fn backend_choice_says_why() {
        let adapter = Some(String::from("SwiftShader"));
        let (name, note) = choose_backend(BackendChoice::Auto, &adapter).unwrap();
        assert_eq!(name, "cpu");
        assert!(
            note.contains("SwiftShader") && note.contains("not built"),
            "{note}"
        );
        let (name, note) = choose_backend(BackendChoice::Auto, &None).unwrap();
        assert_eq!(name, "cpu");
        assert!(note.contains("no WebGPU adapter"), "{note}");
        let e = choose_backend(BackendChoice::WebGpu, &adapter).unwrap_err();
        assert!(e.to_string().contains("not built"), "{e}");
    }
}
