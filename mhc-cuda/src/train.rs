//! One training run on the CPU reference: steps, metrics with Amax gains,
//! periodic evaluation, atomic checkpoints, resume, progress bar.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mhc_core::MhcError;
use mhc_core::model::Trainer;

use std::sync::Arc;

use crate::checkpoint::{self, CheckpointError};
use crate::cuda::{CudaDevice, CudaError, GemmPrecision, GpuTrainer, StreamDtype};
use crate::data::Corpus;
use crate::metrics::{MetricsError, MetricsRecord, MetricsWriter};
use crate::parallel::ThreadAllReduce;
use crate::spec::RunSpec;
use mhc_gpu::{GpuContext, GpuError, WgpuTrainer};

/// File name of a run's checkpoint inside its folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Seed of the fixed validation windows (the same for every scheme and step).
pub const VALIDATION_SEED: u64 = 0x005E_ED0F_7A11;

/// Why a run stopped early.
#[derive(Debug)]
pub enum RunError {
    /// A hyperparameter or the data does not fit the model (exit code 2).
    Config(String),
    /// A checkpoint could not be used (exit code 2) or written.
    Checkpoint(CheckpointError),
    /// Metrics could not be written.
    Metrics(MetricsError),
    /// The loss or gradient became NaN/Inf; the last good checkpoint is kept.
    Diverged {
        /// Scheme of the run.
        scheme: String,
        /// The step that failed (1-based).
        step: u64,
        /// What was non-finite.
        what: String,
        /// The checkpoint that remains, if any.
        last_good: Option<(PathBuf, u64)>,
    },
    /// Any other error of the core.
    Core(MhcError),
    /// A folder could not be created.
    Io(PathBuf, std::io::Error),
    /// The CUDA path failed.
    Cuda(CudaError),
    /// The wgpu path failed.
    Wgpu(GpuError),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(m) => f.write_str(m),
            Self::Checkpoint(e) => write!(f, "{e}"),
            Self::Metrics(e) => write!(f, "{e}"),
            Self::Diverged {
                scheme,
                step,
                what,
                last_good,
            } => {
                write!(
                    f,
                    "{scheme}: the {what} became NaN/Inf at step {step}; training stopped (lower --lr or raise clipping). "
                )?;
                match last_good {
                    Some((path, s)) => write!(
                        f,
                        "The last good checkpoint (step {s}) is kept at {}",
                        path.display()
                    ),
                    None => write!(f, "No checkpoint had been written yet"),
                }
            }
            Self::Core(e) => write!(f, "{e}"),
            Self::Io(path, e) => write!(f, "{}: {e}", path.display()),
            Self::Cuda(e) => write!(f, "{e}"),
            Self::Wgpu(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RunError {}

impl RunError {
    /// Process exit code: 2 for bad input (configuration, data, checkpoint), 3 for divergence, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Checkpoint(CheckpointError::Corrupt { .. }) => 2,
            Self::Diverged { .. } => 3,
            _ => 1,
        }
    }
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The run's scheme.
    pub scheme: String,
    /// Streams.
    pub streams: usize,
    /// Steps done in total.
    pub steps: u64,
    /// The last logged record.
    pub last: Option<MetricsRecord>,
    /// Mean training throughput of this invocation.
    pub tokens_per_s: f64,
    /// The run's folder.
    pub dir: PathBuf,
}

const GIB: f64 = (1u64 << 30) as f64;

/// A progress bar styled for training (hidden when stderr is not a terminal).
pub fn progress_bar(total: u64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:28.cyan/blue}] {pos:>5}/{len} {msg} | {elapsed_precise} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix.to_string());
    pb
}

/// Trains `spec` on `corpus` in `dir` (created if needed), from scratch or
/// from `dir`'s checkpoint, for at most `stop_after` steps in this invocation,
/// on the CPU reference or, given a device, on the GPU ([`GpuTrainer`] for
/// CUDA, [`WgpuTrainer`] for a wgpu context).
///
/// `replicas > 1` trains data-parallel on the CPU ([`crate::parallel`]):
/// that many threads, each a replica training on `batch / replicas` of
/// every global batch, gradients all-reduced; this thread is rank 0 and
/// alone logs metrics, evaluates and writes checkpoints. The Amax-gain
/// diagnostics are then those of rank 0's shard. Needs the CPU path.
pub fn run(
    spec: &RunSpec,
    corpus: &Corpus,
    dir: &Path,
    resume: bool,
    stop_after: Option<u64>,
    pb: &ProgressBar,
    cuda: Option<(Arc<CudaDevice>, GemmPrecision, StreamDtype)>,
    wgpu: Option<Arc<GpuContext>>,
    replicas: usize,
) -> Result<RunOutcome, RunError> {
    spec.validate().map_err(RunError::Config)?;
    if replicas > 1 && (cuda.is_some() || wgpu.is_some()) {
        return Err(RunError::Config(
            "--replicas is data-parallel training on the CPU; on several CUDA GPUs use --gpus N"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| RunError::Io(dir.to_path_buf(), e))?;
    let ckpt_path = dir.join(CHECKPOINT_FILE);
    let model_config = spec.model_config().map_err(RunError::Config)?;
    let mut trainer = Trainer::<f32>::replica(model_config, spec.train_config(), replicas)
        .map_err(|e| RunError::Config(e.to_string()))?;
    let mut last_good = None;
    if resume {
        let loaded = checkpoint::load(&ckpt_path).map_err(RunError::Checkpoint)?;
        if loaded.spec != *spec {
            return Err(RunError::Config(format!(
                "checkpoint {} belongs to a different run configuration; resume without changing flags, or start a new --out",
                ckpt_path.display()
            )));
        }
        loaded
            .restore(&ckpt_path, &mut trainer)
            .map_err(RunError::Checkpoint)?;
        last_good = Some((ckpt_path.clone(), loaded.step));
    }
    let mut gpu = match (cuda, wgpu) {
        (Some((dev, precision, StreamDtype::F32)), _) => Some(Accel::Cuda(Box::new(
            GpuTrainer::from_cpu_with(dev, &mut trainer, precision).map_err(RunError::Cuda)?,
        ))),
        (Some((dev, _, StreamDtype::Bf16)), _) => Some(Accel::CudaBf16(Box::new(
            GpuTrainer::from_cpu_bf16_streams(dev, &mut trainer).map_err(RunError::Cuda)?,
        ))),
        (None, Some(ctx)) => Some(Accel::Wgpu(Box::new(
            WgpuTrainer::from_cpu(ctx, &trainer).map_err(RunError::Wgpu)?,
        ))),
        (None, None) => None,
    };
    let mut tokens = vec![0u32; spec.batch * (spec.context + 1)];
    let mut metrics = MetricsWriter::create(dir, resume).map_err(RunError::Metrics)?;
    let tokens_per_step = (spec.batch * spec.context) as u64;
    let start_step = trainer.step_count();
    let steps_here = spec
        .steps
        .saturating_sub(start_step)
        .min(stop_after.unwrap_or(u64::MAX));
    let mut workers =
        Replicas::start(&trainer, replicas, &corpus.train, steps_here).map_err(RunError::Core)?;
    pb.set_length(spec.steps);
    pb.set_position(start_step);
    pb.reset_eta();
    let started = Instant::now();
    let mut interval_start = Instant::now();
    let (mut loss_sum, mut loss_count) = (0.0, 0u64);
    let mut last = None;
    let mut done_here = 0;
    while start_step + done_here < spec.steps && stop_after.is_none_or(|s| done_here < s) {
        let step = start_step + done_here + 1;
        let result = match (gpu.as_mut(), workers.rank0.as_mut()) {
            (Some(g), _) => gpu_step(g, &mut trainer, &corpus.train, &mut tokens),
            (None, Some(rank0)) => trainer.data_parallel_step(&corpus.train, rank0),
            (None, None) => trainer.step(&corpus.train),
        };
        let stats = match result {
            Ok(s) => s,
            Err(MhcError::NonFinite { what, .. }) => {
                return Err(RunError::Diverged {
                    scheme: spec.scheme.clone(),
                    step,
                    what: what.to_string(),
                    last_good,
                });
            }
            Err(e) => return Err(RunError::Core(e)),
        };
        done_here += 1;
        loss_sum += stats.loss;
        loss_count += 1;
        let finished = step == spec.steps || stop_after.is_some_and(|s| done_here == s);
        if step % spec.log_every == 0 || finished {
            let gains = match gpu.as_ref() {
                None => trainer.model.gain_report().map_err(RunError::Core)?,
                Some(g) => g.gain_report()?,
            };
            let val_loss = if step % spec.eval_every == 0 || finished {
                Some(match gpu.as_mut() {
                    None => trainer
                        .evaluate(&corpus.validation, spec.eval_batches, VALIDATION_SEED)
                        .map_err(RunError::Core)?,
                    Some(g) => {
                        g.evaluate(&corpus.validation, spec.eval_batches, VALIDATION_SEED)?
                    }
                })
            } else {
                None
            };
            let interval = interval_start.elapsed().as_secs_f64().max(1e-9);
            let record = MetricsRecord {
                scheme: spec.scheme.clone(),
                step,
                tokens_seen: step * tokens_per_step,
                train_loss: loss_sum / loss_count as f64,
                val_loss,
                grad_norm: stats.grad_norm,
                lr: stats.lr,
                tokens_per_s: (loss_count * tokens_per_step) as f64 / interval,
                elapsed_s: started.elapsed().as_secs_f64(),
                sk_residual: gains.sk_residual,
                amax_fwd: gains.amax_fwd.clone(),
                amax_bwd: gains.amax_bwd.clone(),
                composite_fwd_mean: gains.composite.iter().map(|g| g.forward_mean).collect(),
                composite_fwd_max: gains.composite.iter().map(|g| g.forward_max).collect(),
                composite_bwd_mean: gains.composite.iter().map(|g| g.backward_mean).collect(),
                composite_bwd_max: gains.composite.iter().map(|g| g.backward_max).collect(),
            };
            metrics.write(&record).map_err(RunError::Metrics)?;
            let memory = gpu
                .as_ref()
                .and_then(Accel::memory)
                .map(|(free, total)| {
                    format!(
                        " | GPU {:.1}/{:.0} GiB",
                        (total - free) as f64 / GIB,
                        total as f64 / GIB
                    )
                })
                .unwrap_or_default();
            pb.set_message(format!(
                "loss {:.3}{} | {:.1}k tok/s{memory}",
                record.train_loss,
                record
                    .val_loss
                    .map(|v| format!(" val {v:.3}"))
                    .unwrap_or_default(),
                record.tokens_per_s / 1e3
            ));
            if pb.is_hidden() && record.val_loss.is_some() {
                eprintln!(
                    "{:>9} step {step:>5}/{}  train {:.4}  val {:.4}  grad {:.3}  composite gain {:.3}  {:.0} tok/s",
                    spec.scheme,
                    spec.steps,
                    record.train_loss,
                    record.val_loss.unwrap_or(f64::NAN),
                    record.grad_norm,
                    record.composite_bwd_max.last().copied().unwrap_or(1.0),
                    record.tokens_per_s
                );
            }
            last = Some(record);
            loss_sum = 0.0;
            loss_count = 0;
            interval_start = Instant::now();
        }
        if step % spec.checkpoint_every == 0 || finished {
            if let Some(g) = gpu.as_mut() {
                g.sync_to_cpu(&mut trainer)?;
            }
            checkpoint::save(&ckpt_path, &mut trainer, spec).map_err(RunError::Checkpoint)?;
            last_good = Some((ckpt_path.clone(), step));
        }
        pb.set_position(step);
    }
    pb.finish();
    workers.join();
    let steps_here = done_here;
    Ok(RunOutcome {
        scheme: spec.scheme.clone(),
        streams: spec.streams,
        steps: start_step + done_here,
        last,
        tokens_per_s: (steps_here * tokens_per_step) as f64
            / started.elapsed().as_secs_f64().max(1e-9),
        dir: dir.to_path_buf(),
    })
}

/// Ranks 1.. of a CPU data-parallel run, each a thread with its own replica,
/// and rank 0's end of the all-reduce. Dropping it (also on an early error)
/// drops rank 0's end first, so the workers stop, then joins them.
struct Replicas {
    rank0: Option<ThreadAllReduce>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Replicas {
    /// `replicas - 1` threads, each a copy of `trainer` (same weights,
    /// optimiser and batch RNG) taking `steps` data-parallel steps on `data`;
    /// none for one replica.
    fn start(
        trainer: &Trainer<f32>,
        replicas: usize,
        data: &[u8],
        steps: u64,
    ) -> Result<Self, MhcError> {
        if replicas <= 1 {
            return Ok(Self {
                rank0: None,
                threads: Vec::new(),
            });
        }
        let mut ends = ThreadAllReduce::group(replicas)?.into_iter();
        let rank0 = ends.next();
        let data: Arc<[u8]> = Arc::from(data);
        let threads = ends
            .map(|mut end| {
                let mut replica = trainer.clone();
                let data = data.clone();
                std::thread::spawn(move || {
                    for _ in 0..steps {
                        // Rank 0 reports every error; this replica just stops with it.
                        if replica.data_parallel_step(&data, &mut end).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Ok(Self { rank0, threads })
    }

    fn join(&mut self) {
        self.rank0 = None;
        for t in self.threads.drain(..) {
            // A panicking worker has already broken the group; rank 0 reported it.
            let _ = t.join();
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.join();
    }
}

/// The model on an accelerator: the CUDA trainer (f32 or bf16 streams) or the wgpu one.
enum Accel {
    Cuda(Box<GpuTrainer>),
    CudaBf16(Box<GpuTrainer<half::bf16>>),
    Wgpu(Box<WgpuTrainer>),
}

impl Accel {
    /// Free and total device memory (CUDA only: wgpu does not report it).
    fn memory(&self) -> Option<(usize, usize)> {
        match self {
            Self::Cuda(g) => g.device().memory().ok(),
            Self::CudaBf16(g) => g.device().memory().ok(),
            Self::Wgpu(_) => None,
        }
    }

    fn gain_report(&self) -> Result<mhc_core::model::GainReport, RunError> {
        match self {
            Self::Cuda(g) => g.gain_report().map_err(RunError::Cuda),
            Self::CudaBf16(g) => g.gain_report().map_err(RunError::Cuda),
            Self::Wgpu(g) => g.gain_report().map_err(RunError::Wgpu),
        }
    }

    fn evaluate(&mut self, data: &[u8], batches: usize, seed: u64) -> Result<f64, RunError> {
        match self {
            Self::Cuda(g) => g.evaluate(data, batches, seed).map_err(RunError::Cuda),
            Self::CudaBf16(g) => g.evaluate(data, batches, seed).map_err(RunError::Cuda),
            Self::Wgpu(g) => g.evaluate(data, batches, seed).map_err(RunError::Wgpu),
        }
    }

    fn sync_to_cpu(&mut self, cpu: &mut Trainer<f32>) -> Result<(), RunError> {
        match self {
            Self::Cuda(g) => g.sync_to_cpu(cpu).map_err(RunError::Cuda),
            Self::CudaBf16(g) => g.sync_to_cpu(cpu).map_err(RunError::Cuda),
            Self::Wgpu(g) => g.sync_to_cpu(cpu).map_err(RunError::Wgpu),
        }
    }
}

/// One step on the GPU with the batch the CPU trainer would draw (its RNG
/// advances the same way, so checkpoints and resume behave alike).
fn gpu_step(
    accel: &mut Accel,
    trainer: &mut Trainer<f32>,
    data: &[u8],
    tokens: &mut [u32],
) -> Result<mhc_core::model::StepStats, MhcError> {
    let (batch, context) = (trainer.config.batch, trainer.model.config().context);
    mhc_core::model::data::sample_batch(data, batch, context, &mut trainer.rng, tokens)?;
    let step = match accel {
        Accel::Cuda(g) => g.step(tokens),
        Accel::CudaBf16(g) => g.step(tokens),
        Accel::Wgpu(g) => {
            return match g.step(tokens) {
                Ok(s) => Ok(s),
                Err(GpuError::Core(e)) => Err(e),
                Err(e) => Err(MhcError::Sublayer(format!("wgpu: {e}"))),
            };
        }
    };
    match step {
        Ok(s) => Ok(mhc_core::model::StepStats {
            loss: s.loss,
            grad_norm: s.grad_norm,
            lr: s.lr,
        }),
        Err(CudaError::Core(e)) => Err(e),
        Err(e) => Err(MhcError::Sublayer(format!("CUDA: {e}"))),
    }
}
