//! One training run in the browser, independent of JavaScript: the backend
//! ([`Backend`]), the text, the last step's coefficients and gains, sampling.
//!
//! Everything here is plain Rust, so it is unit-tested natively (the WebGPU
//! backend natively on whatever wgpu adapter there is, e.g. lavapipe); the
//! `wasm_bindgen` layer ([`crate::WasmTrainer`]) only converts to and from JS.
//! The methods that wait on the GPU (`step`, `evaluate`, `sample`,
//! `refresh_snapshot`) are `async`: the CPU backend finishes them in the
//! first poll, the WebGPU backend awaits its readbacks (`map_async`; in a
//! browser the event loop completes them, nothing blocks).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use mhc_core::Rng;
use mhc_core::model::data::{sample_batch, split_train_validation};
use mhc_core::model::{GainReport, Model, StepStats, Trainer};
use mhc_gpu::{GpuContext, WgpuTrainer};

use crate::settings::{BackendChoice, TrainerSettings, WebError};

/// Fixed seed of the validation windows: every evaluation of a run, and of
/// the three schemes, sees the same bytes (the seed `mhc-train` uses).
pub const VALIDATION_SEED: u64 = 0x005E_ED0F_7A11;

/// Validation batches per [`Session::evaluate`].
pub const VALIDATION_BATCHES: usize = 4;

/// Whether this build contains the WebGPU backend (`mhc-gpu` on wgpu's
/// WebGPU backend). It does.
pub const WEBGPU_BUILT: bool = true;

/// The device a session trains on.
pub enum Backend {
    /// The reference trainer of `mhc-core`, in f32.
    Cpu(Box<Trainer<f32>>),
    /// `mhc-gpu`'s trainer on wgpu (WebGPU in a browser). The CPU trainer
    /// keeps the batch RNG, so both backends draw the same batches (as
    /// `mhc-train`'s GPU paths do), and receives the weights before sampling.
    WebGpu {
        /// The model, its gradients and AdamW state on the device.
        gpu: Box<WgpuTrainer>,
        /// Batch RNG; the weights as of the last [`Backend::cpu_trainer`].
        cpu: Box<Trainer<f32>>,
        /// Whether `cpu` holds the device's current weights.
        cpu_current: bool,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu(t) => f.debug_tuple("Cpu").field(t).finish(),
            Self::WebGpu {
                gpu, cpu_current, ..
            } => f
                .debug_struct("WebGpu")
                .field("adapter", &gpu.context().adapter_name())
                .field("step", &gpu.step_count())
                .field("cpu_current", cpu_current)
                .finish_non_exhaustive(),
        }
    }
}

impl Backend {
    /// The WebGPU backend for `trainer`'s model and settings: opens the
    /// default adapter (`navigator.gpu` in a browser, window or worker) and
    /// uploads the model. Typed errors: no adapter, a refused device, a
    /// buffer over the adapter's limits.
    pub async fn webgpu(trainer: Trainer<f32>) -> Result<Self, WebError> {
        // On wasm32 the context is not `Send` (WebGPU objects live on one
        // thread); the trainer shares it through an `Arc` on every target.
        #[allow(clippy::arc_with_non_send_sync)]
        let ctx = Arc::new(GpuContext::new().await?);
        let gpu = WgpuTrainer::from_cpu(ctx, &trainer)?;
        Ok(Self::WebGpu {
            gpu: Box::new(gpu),
            cpu: Box::new(trainer),
            cpu_current: true,
        })
    }

    /// One optimisation step on a random batch of `data`.
    pub async fn step(&mut self, data: &[u8]) -> Result<StepStats, WebError> {
        match self {
            Self::Cpu(t) => Ok(t.step(data)?),
            Self::WebGpu {
                gpu,
                cpu,
                cpu_current,
            } => {
                let (batch, seq) = (cpu.config.batch, cpu.model.config().context);
                let mut tokens = alloc::vec![0u32; batch * (seq + 1)];
                sample_batch(data, batch, seq, &mut cpu.rng, &mut tokens)?;
                *cpu_current = false;
                Ok(gpu.step_async(&tokens).await?)
            }
        }
    }

    /// Mean loss over the fixed validation batches.
    pub async fn evaluate(&mut self, data: &[u8]) -> Result<f64, WebError> {
        match self {
            Self::Cpu(t) => Ok(t.evaluate(data, VALIDATION_BATCHES, VALIDATION_SEED)?),
            Self::WebGpu { gpu, .. } => Ok(gpu
                .evaluate_async(data, VALIDATION_BATCHES, VALIDATION_SEED)
                .await?),
        }
    }

    /// The CPU trainer holding the current weights (for the GPU: copied
    /// back from the device first, when steps ran since the last copy).
    pub async fn cpu_trainer(&mut self) -> Result<&mut Trainer<f32>, WebError> {
        match self {
            Self::Cpu(t) => Ok(t),
            Self::WebGpu {
                gpu,
                cpu,
                cpu_current,
            } => {
                if !*cpu_current {
                    gpu.sync_to_cpu_async(cpu).await?;
                    *cpu_current = true;
                }
                Ok(cpu)
            }
        }
    }

    /// The CPU model: its shape and configuration (its weights may lag the
    /// device's; [`Self::cpu_trainer`] brings them up to date).
    pub fn cpu_model(&self) -> &Model<f32> {
        match self {
            Self::Cpu(t) => &t.model,
            Self::WebGpu { cpu, .. } => &cpu.model,
        }
    }

    /// Every wrapped sublayer's coefficients of the last training step
    /// (`[tokens, n² + 2n]` each) and their gain report.
    pub async fn last_coefficients(&self) -> Result<(Vec<Vec<f32>>, GainReport), WebError> {
        match self {
            Self::Cpu(t) => {
                let layers = t.model.config().sublayers();
                let coefficients = (0..layers)
                    .map(|l| {
                        t.model
                            .sublayer_coefficients(l)
                            .map(<[f32]>::to_vec)
                            .unwrap_or_default()
                    })
                    .collect();
                Ok((coefficients, t.model.gain_report()?))
            }
            Self::WebGpu { gpu, .. } => {
                let coefficients = gpu.coefficients_async().await?;
                let gains = gpu.gain_report_of(&coefficients)?;
                Ok((coefficients, gains))
            }
        }
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        match self {
            Self::Cpu(t) => t.step_count(),
            Self::WebGpu { gpu, .. } => gpu.step_count(),
        }
    }

    /// `"cpu"` or `"webgpu"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu(_) => "cpu",
            Self::WebGpu { .. } => "webgpu",
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
    match (choice, adapter) {
        (BackendChoice::Cpu, _) => Ok(("cpu", String::from("CPU core (chosen)"))),
        (BackendChoice::WebGpu, None) => Err(WebError::Backend(String::from(
            "WebGPU was asked for but navigator.gpu gave no adapter (in Chromium start it with --enable-unsafe-webgpu)",
        ))),
        (BackendChoice::Auto, None) => Ok((
            "cpu",
            String::from("CPU core (navigator.gpu gave no WebGPU adapter)"),
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
    num_params: usize,
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
        let (name, mut backend_note) = choose_backend(settings.backend, adapter)?;
        let mut trainer = Trainer::<f32>::new(settings.model_config(), settings.train_config())?;
        let num_params = trainer.model.num_params();
        let backend = if name == "webgpu" {
            match Backend::webgpu(trainer.clone()).await {
                Ok(b) => b,
                // Auto falls back to the CPU core, and says why.
                Err(e) if settings.backend == BackendChoice::Auto => {
                    backend_note = format!("CPU core — {backend_note} failed: {e}");
                    Backend::Cpu(Box::new(trainer))
                }
                Err(e) => return Err(e),
            }
        } else {
            Backend::Cpu(Box::new(trainer))
        };
        Ok(Self {
            settings,
            backend,
            backend_note,
            num_params,
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
        Ok(self.num_params)
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
        let model = self.backend.cpu_model();
        let n = model.config().streams;
        let layers = model.config().sublayers();
        let tokens = self.settings.batch * self.settings.context;
        let k = n * n + 2 * n;
        let (coefficients, gains) = self.backend.last_coefficients().await?;
        let mut snap = CoefficientSnapshot {
            step,
            layers,
            tokens,
            n,
            h_pre: Vec::with_capacity(layers * tokens * n),
            h_post: Vec::with_capacity(layers * tokens * n),
            h_res: Vec::with_capacity(layers * tokens * n * n),
        };
        for c in &coefficients {
            for row in c.chunks_exact(k) {
                snap.h_pre.extend_from_slice(&row[..n]);
                snap.h_post.extend_from_slice(&row[n..2 * n]);
                snap.h_res.extend_from_slice(&row[2 * n..]);
            }
        }
        self.gains = Some(gains);
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
        self.backend.evaluate(&self.validation).await
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
        assert_eq!((name, note.as_str()), ("webgpu", "WebGPU: SwiftShader"));
        let (name, _) = choose_backend(BackendChoice::WebGpu, &adapter).unwrap();
        assert_eq!(name, "webgpu");
        let (name, note) = choose_backend(BackendChoice::Cpu, &adapter).unwrap();
        assert_eq!((name, note.as_str()), ("cpu", "CPU core (chosen)"));
        let (name, note) = choose_backend(BackendChoice::Auto, &None).unwrap();
        assert_eq!(name, "cpu");
        assert!(note.contains("no WebGPU adapter"), "{note}");
        let e = choose_backend(BackendChoice::WebGpu, &None).unwrap_err();
        assert!(e.to_string().contains("gave no adapter"), "{e}");
    }

    /// The WebGPU session natively, on wgpu's default adapter (lavapipe
    /// here): the same batches, losses, coefficients and validation loss as
    /// the CPU session within f32 tolerances, and sampling after copying the
    /// weights back. Skips without an adapter.
    #[test]
    #[cfg(not(target_arch = "wasm32"))]
    fn webgpu_session_matches_the_cpu_session() {
        let text = synthetic_corpus(3, 20_000);
        let settings = TrainerSettings {
            backend: BackendChoice::WebGpu,
            ..small(Scheme::MhcDynamic, 4)
        };
        let probe = Some(String::from("native wgpu adapter"));
        let mut gpu = match pollster::block_on(Session::new(settings, &text, &probe)) {
            Ok(s) => s,
            Err(WebError::Backend(m)) if m.contains("no adapter") => {
                std::eprintln!("skipping: {m}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(gpu.backend_name(), "webgpu");
        assert_eq!(gpu.backend_note(), "WebGPU: native wgpu adapter");
        let cpu_settings = TrainerSettings {
            backend: BackendChoice::Cpu,
            ..settings
        };
        let mut cpu = ready(Session::new(cpu_settings, &text, &None)).unwrap();
        assert_eq!(
            ready(cpu.num_params()),
            pollster::block_on(gpu.num_params())
        );

        let want = ready(cpu.step(12)).unwrap();
        let got = pollster::block_on(gpu.step(12)).unwrap();
        assert_eq!(got.step, 12);
        for (i, (g, w)) in got.losses.iter().zip(&want.losses).enumerate() {
            assert!((g - w).abs() < 2e-3, "step {}: loss {g} vs {w}", i + 1);
        }
        assert!(got.losses[0] != got.losses[11], "the GPU model trains");
        let (c, w) = (gpu.coefficients(), cpu.coefficients());
        assert_eq!(
            (c.layers, c.tokens, c.n, c.step),
            (w.layers, w.tokens, w.n, 12)
        );
        for (name, g, w) in [
            ("H_res", &c.h_res, &w.h_res),
            ("H_pre", &c.h_pre, &w.h_pre),
            ("H_post", &c.h_post, &w.h_post),
        ] {
            assert_eq!(g.len(), w.len());
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-2, "{name}: max |Δ| {worst}");
        }
        let (gg, wg) = (gpu.gains().unwrap(), cpu.gains().unwrap());
        assert!((gg.composite[3].forward_max - wg.composite[3].forward_max).abs() < 1e-2);

        let (gv, wv) = (
            pollster::block_on(gpu.evaluate()).unwrap(),
            ready(cpu.evaluate()).unwrap(),
        );
        assert!((gv - wv).abs() < 5e-3, "validation loss {gv} vs {wv}");
        // Sampling copies the weights back first: they are the CPU run's
        // (within f32 drift), not the initial ones.
        let text = pollster::block_on(gpu.sample("the ", 16, 0.0)).unwrap();
        assert_eq!(text.chars().count(), 16, "{text:?}");
        let mut fresh =
            Trainer::<f32>::new(settings.model_config(), settings.train_config()).unwrap();
        let flat = |t: &mut Trainer<f32>| {
            let mut all = Vec::new();
            t.model.for_each_param(|_, p, _| all.extend_from_slice(p));
            all
        };
        let want = flat(ready(cpu.backend.cpu_trainer()).unwrap());
        let initial = flat(&mut fresh);
        match &mut gpu.backend {
            Backend::WebGpu {
                cpu, cpu_current, ..
            } => {
                assert!(*cpu_current);
                assert_eq!(cpu.optimizer.step, 12);
                let got = flat(cpu);
                let drift = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                let moved = got
                    .iter()
                    .zip(&initial)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(drift < 1e-2 && moved > 1e-2, "drift {drift}, moved {moved}");
            }
            Backend::Cpu(_) => unreachable!(),
        }
        // Training on after sampling marks the CPU copy stale again.
        pollster::block_on(gpu.step(1)).unwrap();
        assert!(matches!(
            &gpu.backend,
            Backend::WebGpu {
                cpu_current: false,
                ..
            }
        ));
    }
}
