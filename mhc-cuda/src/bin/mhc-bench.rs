//! `mhc-bench`: times the fused CUDA mHC wrapper at BENCH.md's shapes and
//! writes JSON. Before timing, each shape is checked against mhc-core (f64)
//! on a smaller batch of the same width.
//!
//! ```text
//! mhc-bench [--tokens 16384] [--n 4] [--widths 1024,4096] [--dtype bf16|f32] [--reps 30] [--json out.json]
//! ```
//!
//! Floors (DESIGN.md §4): forward `(3n+2)·C` elements per token; backward
//! `(5n+3)·C` (merge backward reads g, x, y and writes dy; pre backward reads
//! dh, x, g and writes dx); bytes over the measured device-to-device copy
//! bandwidth (read + write counted).

use std::sync::Arc;

use clap::Parser;
use cudarc::driver::CudaSlice;
use cudarc::driver::sys::CUevent_flags;
use mhc_core::{
    ConnectionConfig, ConnectionParams, HyperConnection, Rng, Scheme, Sublayer, Workspace,
};
use mhc_cuda::cuda::{CudaDevice, CudaError, MhcCuda, ScaleSublayer, StreamElement};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "mhc-bench",
    about = "Time the fused CUDA mHC wrapper against its memory floor."
)]
struct Args {
    /// Tokens per call.
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Streams.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Widths C, comma-separated.
    #[arg(long, default_value = "1024,4096", value_delimiter = ',')]
    widths: Vec<usize>,
    /// Stream dtype: bf16 or f32 (of the wrapper; with --train-width, of the
    /// model's residual streams: bf16 needs bf16 products, and HC, which has
    /// no bf16-stream kernels, runs f32 streams).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed repetitions (median reported) after 5 warm-up runs.
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// Also write the results here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Instead of the wrapper, time GPT training steps (random tokens) at this width;
    /// with --schemes, --precision, --layers, --heads, --batch, --context, --vocab.
    #[arg(long)]
    train_width: Option<usize>,
    /// Blocks of the --train-width model.
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Heads of the --train-width model.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Sequences per step of the --train-width model.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Context of the --train-width model.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Vocabulary of the --train-width model.
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    /// Schemes of the --train-width timing.
    #[arg(long, default_value = "residual,mhc", value_delimiter = ',')]
    schemes: Vec<String>,
    /// Precision of the --train-width model's matrix products: bf16, tf32 or f32.
    #[arg(long, default_value = "bf16")]
    precision: mhc_cuda::cuda::GemmPrecision,
}

#[derive(Serialize)]
struct TrainRow {
    scheme: String,
    streams: usize,
    width: usize,
    layers: usize,
    heads: usize,
    batch: usize,
    context: usize,
    vocab: usize,
    precision: String,
    /// Element type of the residual streams: "bf16" or "f32".
    stream_dtype: String,
    /// "flash" or "gemm" (see `GpuTrainer::attention_kind`).
    attention: String,
    step_ms: f64,
    tokens_per_s: f64,
    /// Device memory the trainer holds after warm-up (its buffers are static: also the peak).
    memory_gib: f64,
}

/// Three warm-up steps, then the median of `reps` (5 to 20) timed steps of
/// `gpu` on `tokens`: (ms per step, free device memory after the warm-up,
/// attention kind). The trainer is dropped before returning.
fn time_steps<S: StreamElement>(
    dev: &CudaDevice,
    mut gpu: mhc_cuda::cuda::GpuTrainer<S>,
    tokens: &[u32],
    reps: usize,
) -> Result<(f64, usize, &'static str), CudaError> {
    for _ in 0..3 {
        gpu.step(tokens)?;
    }
    let (free_after, _) = dev.memory()?;
    let steps = reps.clamp(5, 20);
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = std::time::Instant::now();
        gpu.step(tokens)?; // each step ends with host copies (loss, norms): synchronous
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(times), free_after, gpu.attention_kind()))
}

/// Times training steps of the GPU model (random tokens) for each scheme.
fn bench_train(dev: &Arc<CudaDevice>, args: &Args, width: usize) -> Result<(), CudaError> {
    use mhc_core::model::optim::{AdamWConfig, Schedule};
    use mhc_core::model::{ModelConfig, TrainConfig, Trainer};
    use mhc_cuda::cuda::GpuTrainer;
    println!(
        "| scheme | d | layers | batch × context | vocab | products | streams | attention | step ms | tokens/s | GPU memory GiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for name in &args.schemes {
        let scheme: Scheme = name.parse().map_err(CudaError::Unsupported)?;
        let n = if scheme == Scheme::Residual {
            1
        } else {
            args.n
        };
        let model = ModelConfig {
            vocab: args.vocab,
            width,
            layers: args.layers,
            heads: args.heads,
            context: args.context,
            streams: n,
            scheme,
            sinkhorn_iterations: 20,
        };
        let train = TrainConfig {
            batch: args.batch,
            schedule: Schedule {
                max_lr: 3e-4,
                min_lr: 3e-5,
                warmup: 10,
                total: 1000,
            },
            adamw: AdamWConfig::default(),
            clip: 1.0,
            seed: 0,
        };
        let mut cpu = Trainer::<f32>::new(model, train)?;
        // Memory freed by the previous model stays cached by the stream-ordered
        // allocator: release it, or the next model's delta would reuse it unseen.
        if let Err(e) = dev.release_cached_memory() {
            eprintln!(
                "note: the allocator cache was not released ({e}); later models' memory may read low"
            );
        }
        let (free_before, _) = dev.memory()?;
        let mut rng = Rng::new(1);
        let tokens: Vec<u32> = (0..args.batch * (args.context + 1))
            .map(|_| rng.below(args.vocab as u64) as u32)
            .collect();
        let bf16_streams = args.dtype == "bf16"
            && args.precision == mhc_cuda::cuda::GemmPrecision::Bf16
            && scheme != Scheme::HcDynamic;
        let (ms, free_after, attention) = if bf16_streams {
            let gpu = GpuTrainer::from_cpu_bf16_streams(dev.clone(), &mut cpu)?;
            drop(cpu);
            time_steps(dev, gpu, &tokens, args.reps)?
        } else {
            let gpu = GpuTrainer::from_cpu_with(dev.clone(), &mut cpu, args.precision)?;
            drop(cpu);
            time_steps(dev, gpu, &tokens, args.reps)?
        };
        let stream_dtype = if bf16_streams { "bf16" } else { "f32" };
        let tokens_per_s = (args.batch * args.context) as f64 / (ms / 1e3);
        let memory_gib = free_before.saturating_sub(free_after) as f64 / (1u64 << 30) as f64;
        println!(
            "| {scheme} | {width} | {} | {} × {} | {} | {} | {stream_dtype} | {attention} | {ms:.1} | {:.0}k | {memory_gib:.1} |",
            args.layers,
            args.batch,
            args.context,
            args.vocab,
            args.precision.name(),
            tokens_per_s / 1e3,
        );
        rows.push(TrainRow {
            scheme: scheme.to_string(),
            streams: n,
            width,
            layers: args.layers,
            heads: args.heads,
            batch: args.batch,
            context: args.context,
            vocab: args.vocab,
            precision: args.precision.name().into(),
            stream_dtype: stream_dtype.into(),
            attention: attention.into(),
            step_ms: ms,
            tokens_per_s,
            memory_gib,
        });
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "device": dev.name(), "rows": rows });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| CudaError::Driver(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}

#[derive(Serialize)]
struct Row {
    c: usize,
    n: usize,
    tokens: usize,
    dtype: String,
    recompute: bool,
    forward_ms: f64,
    forward_backward_ms: f64,
    forward_floor_ms: f64,
    forward_backward_floor_ms: f64,
    parity_rel_l2_out: f64,
    parity_rel_l2_grad_x: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    copy_bandwidth_gb_s: f64,
    rows: Vec<Row>,
}

struct Scale64;
impl Sublayer<f64> for Scale64 {
    fn forward(&mut self, h: &[f64], y: &mut [f64]) -> mhc_core::Result<()> {
        y.iter_mut().zip(h).for_each(|(y, h)| *y = 1.5 * h);
        Ok(())
    }
    fn vjp(&mut self, _: &[f64], gy: &[f64], gh: &mut [f64]) -> mhc_core::Result<()> {
        gh.iter_mut().zip(gy).for_each(|(g, gy)| *g = 1.5 * gy);
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_ms(
    dev: &CudaDevice,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    for _ in 0..5 {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let end = dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    Ok(median(times))
}

fn copy_bandwidth(dev: &CudaDevice) -> Result<f64, CudaError> {
    let len = 256 << 20; // 1 GiB of f32
    let st = dev.stream().clone();
    let src: CudaSlice<f32> = st.clone_htod(&vec![1.0f32; len])?;
    let mut dst: CudaSlice<f32> = st.alloc_zeros(len)?;
    let ms = time_ms(dev, 20, || Ok(st.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * (len * 4) as f64 / (ms * 1e-3) / 1e9)
}

fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().max(1e-30);
    if a.iter().any(|v| !v.is_finite()) {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}

fn params_for(config: &ConnectionConfig, rng: &mut Rng) -> ConnectionParams<f32> {
    let mut p = ConnectionParams::<f32>::init(
        config,
        &mhc_core::InitConfig {
            alpha: 0.5,
            ..Default::default()
        },
        rng,
    );
    let nc = (config.n * config.width) as f64;
    p.phi
        .iter_mut()
        .for_each(|v| *v = (rng.normal() / nc.sqrt()) as f32);
    p
}

/// Checks the GPU against mhc-core (f64) on `tokens` tokens; returns (rel. L2 of out, of grad_x).
fn parity<S: StreamElement>(
    dev: &Arc<CudaDevice>,
    config: &ConnectionConfig,
    params: &ConnectionParams<f32>,
    tokens: usize,
) -> Result<(f64, f64), CudaError> {
    let mut rng = Rng::new(7);
    let len = tokens * config.n * config.width;
    let x_h: Vec<S> = (0..len).map(|_| S::from_f32(rng.normal() as f32)).collect();
    let g_h: Vec<S> = (0..len).map(|_| S::from_f32(rng.normal() as f32)).collect();
    let st = dev.stream().clone();
    let (x, g) = (st.clone_htod(&x_h)?, st.clone_htod(&g_h)?);
    let mut out = st.clone_htod(&vec![S::from_f32(f32::NAN); len])?;
    let mut gx = st.clone_htod(&vec![S::from_f32(f32::NAN); len])?;
    let mut gpu = MhcCuda::<S>::new(dev.clone(), config, params, tokens, true)?;
    let mut sub = ScaleSublayer {
        factor: 1.5,
        n: config.n,
    };
    gpu.forward(&mut sub, &x, &mut out)?;
    gpu.backward(&mut sub, &x, &g, &mut gx)?;
    let p64 = params.cast::<f64>();
    let conn = HyperConnection::new(*config, p64)?;
    let x64: Vec<f64> = x_h.iter().map(|v| v.to_f32() as f64).collect();
    let g64: Vec<f64> = g_h.iter().map(|v| v.to_f32() as f64).collect();
    let mut ws = Workspace::new(config, tokens);
    let (mut o64, mut gx64) = (vec![0.0; len], vec![0.0; len]);
    let mut grads = ConnectionParams::zeros(config);
    conn.forward(&mut Scale64, &x64, &mut o64, &mut ws)?;
    conn.backward(&mut Scale64, &x64, &g64, &mut gx64, &mut grads, &mut ws)?;
    let out_h: Vec<f32> = st.clone_dtoh(&out)?.iter().map(|v| v.to_f32()).collect();
    let gx_h: Vec<f32> = st.clone_dtoh(&gx)?.iter().map(|v| v.to_f32()).collect();
    Ok((rel_l2(&out_h, &o64), rel_l2(&gx_h, &gx64)))
}

fn bench<S: StreamElement>(
    dev: &Arc<CudaDevice>,
    args: &Args,
    bandwidth: f64,
) -> Result<Vec<Row>, CudaError> {
    let mut rows = Vec::new();
    let elem = size_of::<S>() as f64;
    for &c in &args.widths {
        let config = ConnectionConfig::new(Scheme::MhcDynamic, args.n, c);
        let mut rng = Rng::new(c as u64);
        let params = params_for(&config, &mut rng);
        let (p_out, p_gx) = parity::<S>(dev, &config, &params, 256)?;
        let tol = if S::BF16 { 2e-2 } else { 1e-4 };
        if p_out > tol || p_gx > tol {
            return Err(CudaError::Driver(format!(
                "parity check failed at C = {c}: rel. L2 out {p_out:.2e}, grad_x {p_gx:.2e}"
            )));
        }
        let len = args.tokens * args.n * c;
        let st = dev.stream().clone();
        let x: CudaSlice<S> = st.clone_htod(
            &(0..len)
                .map(|_| S::from_f32(rng.normal() as f32))
                .collect::<Vec<_>>(),
        )?;
        let g: CudaSlice<S> = st.clone_htod(
            &(0..len)
                .map(|_| S::from_f32(rng.normal() as f32))
                .collect::<Vec<_>>(),
        )?;
        let mut out: CudaSlice<S> = st.alloc_zeros(len)?;
        let mut gx: CudaSlice<S> = st.alloc_zeros(len)?;
        let mut sub = ScaleSublayer {
            factor: 1.5,
            n: args.n,
        };
        for recompute in [false, true] {
            let mut gpu = MhcCuda::<S>::new(dev.clone(), &config, &params, args.tokens, recompute)?;
            let fwd = time_ms(dev, args.reps, || gpu.forward(&mut sub, &x, &mut out))?;
            let both = time_ms(dev, args.reps, || {
                gpu.forward(&mut sub, &x, &mut out)?;
                gpu.backward(&mut sub, &x, &g, &mut gx)
            })?;
            let per_token = |k: usize| (k * c) as f64 * elem * args.tokens as f64;
            let floor_f = per_token(3 * args.n + 2) / (bandwidth * 1e9) * 1e3;
            let floor_b = per_token(5 * args.n + 3) / (bandwidth * 1e9) * 1e3;
            rows.push(Row {
                c,
                n: args.n,
                tokens: args.tokens,
                dtype: S::NAME.into(),
                recompute,
                forward_ms: fwd,
                forward_backward_ms: both,
                forward_floor_ms: floor_f,
                forward_backward_floor_ms: floor_f + floor_b,
                parity_rel_l2_out: p_out,
                parity_rel_l2_grad_x: p_gx,
            });
        }
    }
    Ok(rows)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let dev = match CudaDevice::new(0) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(width) = args.train_width {
        return match bench_train(&dev, &args, width) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    let run = || -> Result<Report, CudaError> {
        let bandwidth = copy_bandwidth(&dev)?;
        let rows = match args.dtype.as_str() {
            "bf16" => bench::<half::bf16>(&dev, &args, bandwidth)?,
            "f32" => bench::<f32>(&dev, &args, bandwidth)?,
            other => {
                return Err(CudaError::Unsupported(format!(
                    "--dtype {other}: use bf16 or f32"
                )));
            }
        };
        Ok(Report {
            device: dev.name(),
            copy_bandwidth_gb_s: bandwidth,
            rows,
        })
    };
    match run() {
        Ok(report) => {
            println!(
                "device: {} | copy bandwidth {:.0} GB/s (read + write)",
                report.device, report.copy_bandwidth_gb_s
            );
            println!(
                "| C | dtype | recompute | fwd ms | fwd floor | fwd / floor | fwd+bwd ms | fwd+bwd floor | fwd+bwd / floor | parity out / grad_x |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|");
            for r in &report.rows {
                println!(
                    "| {} | {} | {} | {:.3} | {:.3} | {:.2}× | {:.3} | {:.3} | {:.2}× | {:.1e} / {:.1e} |",
                    r.c,
                    r.dtype,
                    r.recompute,
                    r.forward_ms,
                    r.forward_floor_ms,
                    r.forward_ms / r.forward_floor_ms,
                    r.forward_backward_ms,
                    r.forward_backward_floor_ms,
                    r.forward_backward_ms / r.forward_backward_floor_ms,
                    r.parity_rel_l2_out,
                    r.parity_rel_l2_grad_x
                );
            }
            let json = serde_json::to_string_pretty(&report).unwrap_or_default();
            if let Some(path) = &args.json
                && let Err(e) = std::fs::write(path, &json)
            {
                eprintln!("error: {}: {e}", path.display());
                return std::process::ExitCode::from(1);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
