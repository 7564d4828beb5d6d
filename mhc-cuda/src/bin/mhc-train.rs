//! `mhc-train`: train GPT-style byte-level language models whose residual
//! stream is plain, HC or mHC, and compare them the way the paper does.
//!
//! ```text
//! mhc-train --compare                  # residual vs HC vs mHC on the embedded data (tiny preset)
//! mhc-train --preset deep --compare    # 24 wrapped sublayers
//! mhc-train --scheme mhc --data data/fortunes --steps 2000
//! mhc-train sample --checkpoint runs/tiny-…/mhc/checkpoint.safetensors --prompt "the "
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::MultiProgress;
use mhc_core::Rng;
use mhc_core::model::Model;
use std::sync::Arc;

use mhc_cuda::checkpoint;
use mhc_cuda::cuda::{CudaDevice, CudaError, GemmPrecision, StreamDtype};
use mhc_cuda::data::{Corpus, load_text};
use mhc_cuda::metrics::read_jsonl;
use mhc_cuda::plot::plot_runs;
use mhc_cuda::spec::{Preset, RunSpec};
use mhc_cuda::train::{self, CHECKPOINT_FILE, RunError, RunOutcome};
use mhc_gpu::GpuContext;

#[derive(Parser)]
#[command(
    name = "mhc-train",
    version,
    about = "Train residual / HC / mHC language models (byte level) and compare them."
)]
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
    /// Draw the plots of finished or running runs (e.g. runs trained by separate processes).
    Plot(PlotArgs),
}

#[derive(Args)]
struct PlotArgs {
    /// Folder holding one sub-folder per run (`<dir>/<scheme>/metrics.jsonl`); plots go to `<dir>/plots`.
    dir: PathBuf,
    /// Title of the figures (default: the folder's name).
    #[arg(long)]
    title: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    /// CUDA when a driver is found (residual, hc and mhc), else the CPU.
    Auto,
    /// The mhc-core reference on the CPU.
    Cpu,
    /// NVIDIA GPU (residual, hc and mhc; the static variants run on the CPU).
    Cuda,
    /// Any GPU through wgpu (Vulkan, Metal, DX12; every scheme), or Mesa's lavapipe.
    Wgpu,
}

#[derive(Args)]
struct TrainArgs {
    /// Preset to start from: tiny (2 blocks, C = 64) or deep (12 blocks = 24 wrapped sublayers).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Residual-stream scheme: residual, hc, mhc, hc-static or mhc-static.
    #[arg(long)]
    scheme: Option<String>,
    /// Train residual, HC and mHC on the same data and seed, then print a table and plot them.
    #[arg(long)]
    compare: bool,
    /// Streams n of HC / mHC (the residual scheme always has 1).
    #[arg(long)]
    n: Option<usize>,
    /// Blocks (each wraps attention and MLP: 2 sublayers).
    #[arg(long)]
    layers: Option<usize>,
    /// Model width C.
    #[arg(long)]
    width: Option<usize>,
    /// Attention heads (must divide the width).
    #[arg(long)]
    heads: Option<usize>,
    /// Context length in bytes.
    #[arg(long)]
    context: Option<usize>,
    /// Sequences per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate (warm-up, then cosine to a tenth of it).
    #[arg(long)]
    lr: Option<f64>,
    /// Sinkhorn–Knopp iterations of mHC.
    #[arg(long)]
    sinkhorn_iters: Option<usize>,
    /// Seed of initialisation and batch sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// UTF-8 text file or folder (default: the embedded synthetic language).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder (default: runs/PRESET-UNIXTIME); one sub-folder per scheme.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run(s) in --out from their checkpoints, bit for bit.
    #[arg(long)]
    resume: bool,
    /// Start over in an --out that already holds a run (its checkpoints are replaced).
    #[arg(long)]
    force: bool,
    /// Stop after this many steps in this invocation (with a checkpoint), to --resume later.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Log metrics every this many steps.
    #[arg(long)]
    log_every: Option<u64>,
    /// Evaluate the validation loss every this many steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Checkpoint every this many steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Where to train.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Precision of the GPU's matrix products (storage stays f32): bf16 or tf32
    /// tensor cores, or f32 (bit-for-bit closest to the CPU reference).
    #[arg(long, default_value = "bf16")]
    precision: GemmPrecision,
    /// Element type of the GPU's residual streams (the state x, each
    /// sublayer's input and output, their gradients): bf16 (needs bf16
    /// products) or f32. Default: bf16 where possible — at bf16 products, for
    /// residual and mHC; HC's kernels have f32 streams only.
    #[arg(long)]
    streams: Option<StreamDtype>,
    /// Data-parallel training on the CPU: this many replicas (threads), each
    /// on batch / N sequences of every step, gradients all-reduced (the batch
    /// must be a multiple of N). Same loss curve as one replica up to rounding.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Data-parallel training on this many CUDA GPUs of this host (NCCL); 1
    /// is the single-GPU trainer. Refused when fewer GPUs are present.
    #[arg(long)]
    gpus: Option<usize>,
}

#[derive(Args)]
struct SampleArgs {
    /// Checkpoint written by a training run.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "the ")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    length: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Schemes the CUDA trainer runs (the others run on the CPU reference).
const GPU_SCHEMES: [&str; 3] = ["residual", "hc", "mhc"];

/// An error that ends the program: its message and exit code.
struct Fatal(String, u8);

impl From<RunError> for Fatal {
    fn from(e: RunError) -> Self {
        Fatal(e.to_string(), e.exit_code() as u8)
    }
}

fn bad_input(message: impl Into<String>) -> Fatal {
    Fatal(message.into(), 2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Sample(args)) => sample(&args),
        Some(Command::Plot(args)) => plot(&args),
        None => train_main(&cli.train),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal(message, code)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

fn resolve(args: &TrainArgs, scheme: &str) -> Result<RunSpec, Fatal> {
    let mut spec = Preset::parse(&args.preset).map_err(bad_input)?.spec();
    spec.scheme = scheme.to_string();
    macro_rules! set {
        ($($field:ident <- $arg:ident),*) => { $(if let Some(v) = args.$arg.clone() { spec.$field = v; })* };
    }
    set!(streams <- n, layers <- layers, width <- width, heads <- heads, context <- context, batch <- batch,
         steps <- steps, lr <- lr, sinkhorn_iters <- sinkhorn_iters, seed <- seed, log_every <- log_every,
         eval_every <- eval_every, checkpoint_every <- checkpoint_every);
    if args.lr.is_some() {
        spec.min_lr = spec.lr / 10.0;
    }
    spec.warmup = spec.warmup.min(spec.steps / 10);
    if scheme == "residual" {
        spec.streams = 1;
    }
    if let Some(path) = &args.data {
        spec.data = path.display().to_string();
    }
    spec.validate().map_err(bad_input)?;
    Ok(spec)
}

fn load_corpus(spec: &RunSpec) -> Result<Corpus, Fatal> {
    let corpus = if spec.data == "embedded" {
        Corpus::embedded_default(spec.context)
    } else {
        let path = Path::new(&spec.data);
        load_text(path).and_then(|bytes| {
            Corpus::from_bytes(
                spec.data.clone(),
                bytes,
                spec.validation_fraction,
                spec.context,
            )
        })
    };
    corpus.map_err(|e| bad_input(e.to_string()))
}

fn train_main(args: &TrainArgs) -> Result<(), Fatal> {
    let schemes: Vec<String> = if args.compare {
        if args.scheme.is_some() {
            return Err(bad_input(
                "--compare trains residual, hc and mhc; drop --scheme",
            ));
        }
        vec!["residual".into(), "hc".into(), "mhc".into()]
    } else {
        vec![args.scheme.clone().unwrap_or_else(|| "mhc".into())]
    };
    let specs = schemes
        .iter()
        .map(|s| resolve(args, s))
        .collect::<Result<Vec<_>, _>>()?;
    if args.resume && args.out.is_none() {
        return Err(bad_input(
            "--resume needs --out: the folder of the run to continue",
        ));
    }
    if args.resume && args.force {
        return Err(bad_input("--resume and --force contradict each other"));
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("runs/{}-{secs}", args.preset))
    });
    for spec in &specs {
        let ckpt = out.join(&spec.scheme).join(CHECKPOINT_FILE);
        if args.resume && !ckpt.exists() {
            return Err(bad_input(format!(
                "--resume: no checkpoint at {}",
                ckpt.display()
            )));
        }
        if !args.resume && !args.force && ckpt.exists() {
            return Err(bad_input(format!(
                "{} already holds a run; pass --resume to continue it or --force to start over",
                out.join(&spec.scheme).display()
            )));
        }
    }
    if args.replicas == 0 {
        return Err(bad_input(
            "--replicas must be at least 1 (1: no data parallelism)",
        ));
    }
    if args.replicas > 1 && !matches!(args.device, Device::Cpu | Device::Auto) {
        return Err(bad_input(
            "--replicas trains data-parallel on the CPU; drop --device, or use --gpus N for CUDA GPUs",
        ));
    }
    if args.replicas > 1 && args.gpus.is_some() {
        return Err(bad_input(
            "--replicas (CPU threads) and --gpus (CUDA GPUs) exclude each other",
        ));
    }
    for spec in &specs {
        mhc_core::model::parallel::shard_len(spec.batch, args.replicas.max(args.gpus.unwrap_or(1)))
            .map_err(|e| bad_input(e.to_string()))?;
    }
    let gpus = match args.gpus {
        None => None,
        Some(0) => return Err(bad_input("--gpus must be at least 1")),
        Some(_) if !matches!(args.device, Device::Cuda | Device::Auto) => {
            return Err(bad_input("--gpus N trains on CUDA GPUs; drop --device"));
        }
        Some(n) => match CudaDevice::count() {
            Err(e) => return Err(bad_input(format!("--gpus {n}: {e}"))),
            Ok(found) if found < n => {
                return Err(bad_input(format!(
                    "--gpus {n}: only {found} CUDA device(s) found on this host; ask for at most {found}"
                )));
            }
            Ok(_) => Some(n),
        },
    };
    if let Some(n) = gpus.filter(|&n| n > 1) {
        return Err(Fatal(
            format!(
                "--gpus {n}: the data-parallel CUDA trainer (NCCL) is not wired into mhc-train yet; see README \"Data-parallel training\". Use --gpus 1, or --replicas {n} --device cpu"
            ),
            1,
        ));
    }
    let device = if gpus.is_some() {
        Device::Cuda
    } else if args.replicas > 1 {
        Device::Cpu
    } else {
        args.device
    };
    let corpus = load_corpus(&specs[0])?;
    // The GPU, when asked for (or found, with auto); schemes without a GPU path run on the CPU.
    let precision = args.precision;
    let wgpu: Option<Arc<GpuContext>> = match device {
        Device::Wgpu => match GpuContext::new_blocking() {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => return Err(bad_input(format!("--device wgpu: {e}"))),
        },
        _ => None,
    };
    let gpu: Option<Arc<CudaDevice>> = match device {
        Device::Cpu | Device::Wgpu => None,
        Device::Auto | Device::Cuda => match CudaDevice::new(0) {
            Ok(d) => Some(Arc::new(d)),
            Err(CudaError::NoDriver(_)) if device == Device::Auto => None,
            Err(e) => return Err(bad_input(format!("--device cuda: {e}; use --device cpu"))),
        },
    };
    // Checked for every GPU run before the device line is printed.
    let streams_of = |spec: &RunSpec| -> Result<StreamDtype, Fatal> {
        let scheme: mhc_core::Scheme = spec.scheme.parse().map_err(bad_input)?;
        StreamDtype::resolve(args.streams, scheme, precision).map_err(|e| bad_input(e.to_string()))
    };
    let on_gpu = |spec: &RunSpec| {
        wgpu.is_some() || (gpu.is_some() && GPU_SCHEMES.contains(&spec.scheme.as_str()))
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (gpu_runs, cpu_runs): (Vec<&RunSpec>, Vec<&RunSpec>) =
        specs.iter().partition(|s| on_gpu(s));
    let names = |v: &[&RunSpec]| {
        v.iter()
            .map(|s| s.scheme.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut line = Vec::new();
    if let Some(d) = &gpu
        && !gpu_runs.is_empty()
    {
        let flash = gpu_runs
            .iter()
            .all(|s| mhc_cuda::cuda::ModelKernels::flash_for(s.width, s.heads, precision));
        let streams = gpu_runs
            .iter()
            .map(|s| Ok(format!("{} {}", s.scheme, streams_of(s)?.name())))
            .collect::<Result<Vec<_>, Fatal>>()?;
        line.push(format!(
            "cuda ({}, f32 weights, {} matrix products, {} attention, streams: {}) for {}",
            d.name(),
            precision.name(),
            if flash { "flash" } else { "GEMM" },
            streams.join(", "),
            names(&gpu_runs)
        ));
    }
    if let Some(c) = &wgpu
        && !gpu_runs.is_empty()
    {
        line.push(format!(
            "wgpu ({}, f32) for {}",
            c.adapter_name(),
            names(&gpu_runs)
        ));
    }
    if !cpu_runs.is_empty() {
        let why = match (&gpu, device) {
            (Some(_), _) => " (no GPU path for this scheme)",
            (None, Device::Auto) => " (no CUDA driver found)",
            _ => "",
        };
        let replicas = if args.replicas > 1 {
            format!(", data-parallel over {} replicas", args.replicas)
        } else {
            String::new()
        };
        line.push(format!(
            "cpu (mhc-core reference model, f32, {threads} thread(s){replicas}) for {}{why}",
            names(&cpu_runs)
        ));
    }
    println!("device: {}", line.join("; "));
    let first = &specs[0];
    println!(
        "data: {} ({} train / {} validation bytes) | model: {} blocks ({} wrapped sublayers), C = {}, {} heads, context {} | batch {} | {} steps | out: {}",
        corpus.name,
        corpus.train.len(),
        corpus.validation.len(),
        first.layers,
        2 * first.layers,
        first.width,
        first.heads,
        first.context,
        first.batch,
        first.steps,
        out.display()
    );
    let multi = MultiProgress::new();
    let run_one = |spec: &RunSpec,
                   device: Option<(Arc<CudaDevice>, GemmPrecision, StreamDtype)>,
                   wgpu: Option<Arc<GpuContext>>| {
        let pb = multi.add(train::progress_bar(spec.steps, &spec.scheme));
        train::run(
            spec,
            &corpus,
            &out.join(&spec.scheme),
            args.resume,
            args.stop_after,
            &pb,
            device,
            wgpu,
            args.replicas,
        )
    };
    // CPU runs in parallel threads; GPU runs one after another on one thread (one device).
    let outcomes: Vec<Result<RunOutcome, RunError>> = std::thread::scope(|scope| {
        let run_one = &run_one;
        let cpu_handles: Vec<_> = cpu_runs
            .iter()
            .map(|&spec| scope.spawn(move || run_one(spec, None, None)))
            .collect();
        let gpu_handle = scope.spawn(|| {
            gpu_runs
                .iter()
                .map(|&spec| {
                    // streams_of succeeded for every GPU run when the device line was printed.
                    let cuda = match (&gpu, streams_of(spec)) {
                        (Some(d), Ok(s)) => Some((d.clone(), precision, s)),
                        _ => None,
                    };
                    run_one(spec, cuda, wgpu.clone())
                })
                .collect::<Vec<_>>()
        });
        let panicked = || Err(RunError::Config("a training thread panicked".into()));
        let mut cpu_results = cpu_handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panicked()));
        let mut gpu_results = gpu_handle
            .join()
            .unwrap_or_else(|_| gpu_runs.iter().map(|_| panicked()).collect())
            .into_iter();
        // Back in the order of `specs`.
        specs
            .iter()
            .map(|spec| {
                let next = if on_gpu(spec) {
                    gpu_results.next()
                } else {
                    cpu_results.next()
                };
                next.unwrap_or_else(panicked)
            })
            .collect()
    });
    let mut done = Vec::new();
    let mut first_error = None;
    for o in outcomes {
        match o {
            Ok(run) => done.push(run),
            Err(e) => {
                eprintln!("error: {e}");
                first_error.get_or_insert(Fatal(e.to_string(), e.exit_code() as u8));
            }
        }
    }
    report(&done);
    if !done.is_empty() {
        let runs = done
            .iter()
            .filter_map(|r| {
                read_jsonl(r.dir.join("metrics.jsonl"))
                    .ok()
                    .map(|recs| (r.scheme.clone(), mhc_cuda::metrics::drop_superseded(&recs)))
            })
            .collect::<Vec<_>>();
        let plots = out.join("plots");
        match std::fs::create_dir_all(&plots)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                plot_runs(
                    &runs,
                    &plots,
                    &format!(
                        "{} preset, {} wrapped sublayers",
                        args.preset,
                        2 * first.layers
                    ),
                )
                .map_err(|e| e.to_string())
            }) {
            Ok(files) => println!(
                "plots: {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => eprintln!("warning: plots not written: {e}"),
        }
        println!(
            "metrics: {}/<scheme>/metrics.jsonl and .csv; checkpoints: {}/<scheme>/{CHECKPOINT_FILE}",
            out.display(),
            out.display()
        );
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn report(runs: &[RunOutcome]) {
    if runs.is_empty() {
        return;
    }
    println!();
    println!(
        "| scheme | n | steps | train loss | val loss | composite Amax gain (bwd, max) | max layer gain | SK residual | tokens/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let Some(last) = &r.last else { continue };
        println!(
            "| {} | {} | {} | {:.4} | {} | {:.4} | {:.4} | {:.1e} | {:.0} |",
            r.scheme,
            r.streams,
            r.steps,
            last.train_loss,
            last.val_loss
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into()),
            last.composite_bwd_max.last().copied().unwrap_or(f64::NAN),
            last.amax_bwd.iter().copied().fold(0.0, f64::max),
            last.sk_residual,
            r.tokens_per_s
        );
    }
}

fn plot(args: &PlotArgs) -> Result<(), Fatal> {
    let entries = std::fs::read_dir(&args.dir)
        .map_err(|e| bad_input(format!("{}: {e}", args.dir.display())))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("metrics.jsonl").is_file())
        .collect();
    // The paper's order when present: residual, hc, mhc, then the rest by name.
    let rank = |p: &PathBuf| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        (
            ["residual", "hc", "mhc"]
                .iter()
                .position(|s| *s == name)
                .unwrap_or(3),
            name.to_string(),
        )
    };
    dirs.sort_by_key(rank);
    if dirs.is_empty() {
        return Err(bad_input(format!(
            "{} holds no run (no <scheme>/metrics.jsonl); pass the --out folder of a training run",
            args.dir.display()
        )));
    }
    let mut runs = Vec::new();
    for d in &dirs {
        let name = d
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("run")
            .to_string();
        let recs = read_jsonl(d.join("metrics.jsonl")).map_err(|e| bad_input(e.to_string()))?;
        runs.push((name, mhc_cuda::metrics::drop_superseded(&recs)));
    }
    let plots = args.dir.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| bad_input(format!("{}: {e}", plots.display())))?;
    let title = args.title.clone().unwrap_or_else(|| {
        args.dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("runs")
            .to_string()
    });
    let files = plot_runs(&runs, &plots, &title).map_err(|e| bad_input(e.to_string()))?;
    println!(
        "plots: {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn sample(args: &SampleArgs) -> Result<(), Fatal> {
    let loaded = checkpoint::load(&args.checkpoint).map_err(|e| bad_input(e.to_string()))?;
    let spec = &loaded.spec;
    let mut trainer = mhc_core::model::Trainer::<f32>::new(
        spec.model_config().map_err(bad_input)?,
        spec.train_config(),
    )
    .map_err(|e| bad_input(format!("checkpoint configuration: {e}")))?;
    loaded
        .restore(&args.checkpoint, &mut trainer)
        .map_err(|e| bad_input(e.to_string()))?;
    if args.prompt.is_empty() {
        return Err(bad_input("--prompt must not be empty"));
    }
    let model: &mut Model<f32> = &mut trainer.model;
    let prompt: Vec<u32> = args.prompt.bytes().map(u32::from).collect();
    let mut rng = Rng::new(args.seed);
    let out = model
        .generate(&prompt, args.length, args.temperature, &mut rng)
        .map_err(|e| Fatal(e.to_string(), 1))?;
    let bytes: Vec<u8> = out.iter().map(|&t| t as u8).collect();
    println!("{}{}", args.prompt, String::from_utf8_lossy(&bytes));
    Ok(())
}
