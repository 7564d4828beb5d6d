//! `mhc-gpu-bench`: times the wgpu mHC wrapper (forward, forward+backward)
//! at BENCH.md's shapes in f32 with the stand-in sublayer `F(h) = 1.5h`,
//! after checking it against mhc-core, and the reference model's training
//! tokens/s on wgpu and on the CPU reference (same model, same batches).
//!
//! ```text
//! mhc-gpu-bench [--tokens 16384] [--n 4] [--widths 1024,4096] [--reps 20]
//!               [--train-steps 5] [--check-tokens 64] [--json out.json]
//! ```
//!
//! Times are wall clock around submit + wait (median of `--reps` after two
//! warm-up runs): they include the submission overhead that a GPU timestamp
//! would hide, so they are upper bounds of the kernels' time.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    match native::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::Arc;
    use std::time::Instant;

    use mhc_core::model::data::sample_batch;
    use mhc_core::model::optim::{AdamWConfig, Schedule};
    use mhc_core::model::{ModelConfig, TrainConfig, Trainer};
    use mhc_core::{
        ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, Rng, Scheme, Sublayer,
        Workspace,
    };
    use mhc_gpu::{GpuContext, GpuWrapper, ScaleSublayer, WgpuTrainer};
    use serde_json::json;

    struct Args {
        tokens: usize,
        n: usize,
        widths: Vec<usize>,
        reps: usize,
        train_steps: usize,
        check_tokens: usize,
        json: Option<String>,
    }

    fn parse() -> Result<Args, String> {
        let mut a = Args {
            tokens: 16384,
            n: 4,
            widths: vec![1024, 4096],
            reps: 20,
            train_steps: 5,
            check_tokens: 64,
            json: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value"));
            let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
            match flag.as_str() {
                "--tokens" => a.tokens = num(value()?)?,
                "--n" => a.n = num(value()?)?,
                "--widths" => {
                    a.widths = value()?
                        .split(',')
                        .map(|w| {
                            w.trim()
                                .parse::<usize>()
                                .map_err(|e| format!("--widths: {e}"))
                        })
                        .collect::<Result<_, _>>()?
                }
                "--reps" => a.reps = num(value()?)?.max(1),
                "--train-steps" => a.train_steps = num(value()?)?,
                "--check-tokens" => a.check_tokens = num(value()?)?.max(1),
                "--json" => a.json = Some(value()?),
                "-h" | "--help" => {
                    println!(
                        "mhc-gpu-bench [--tokens 16384] [--n 4] [--widths 1024,4096] [--reps 20] [--train-steps 5] [--check-tokens 64] [--json out.json]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown flag {other} (see --help)")),
            }
        }
        Ok(a)
    }

    struct Scale;
    impl Sublayer<f32> for Scale {
        fn forward(&mut self, h: &[f32], y: &mut [f32]) -> mhc_core::Result<()> {
            y.iter_mut().zip(h).for_each(|(y, h)| *y = 1.5 * h);
            Ok(())
        }
        fn vjp(&mut self, _: &[f32], gy: &[f32], gh: &mut [f32]) -> mhc_core::Result<()> {
            gh.iter_mut().zip(gy).for_each(|(g, y)| *g = 1.5 * y);
            Ok(())
        }
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    fn time(
        ctx: &GpuContext,
        reps: usize,
        mut f: impl FnMut() -> mhc_gpu::GpuResult<()>,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        for _ in 0..2 {
            f()?;
            ctx.finish_blocking()?;
        }
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            f()?;
            ctx.finish_blocking()?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(ms))
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(b) {
            num += (*x as f64 - *y as f64).powi(2);
            den += (*y as f64).powi(2);
        }
        (num / den.max(1e-300)).sqrt()
    }

    pub fn run() -> Result<(), Box<dyn std::error::Error>> {
        let args = parse()?;
        let ctx = Arc::new(GpuContext::new_blocking()?);
        let adapter = ctx.adapter_name();
        println!("adapter: {adapter}");
        let n = args.n;
        // Copy bandwidth (read + write counted), for the floors.
        let copy_len =
            (64usize << 20).min(ctx.limits().max_storage_buffer_binding_size as usize / 4);
        let bandwidth = {
            let a = ctx.zeros("copy src", copy_len)?;
            let b = ctx.zeros("copy dst", copy_len)?;
            let ms = time(&ctx, args.reps, || ctx.copy(&a, 0, &b, 0, copy_len))?;
            (2 * copy_len * 4) as f64 / (ms * 1e-3) / 1e9
        };
        println!("copy bandwidth: {bandwidth:.1} GB/s");
        let mut rows = Vec::new();
        for &c in &args.widths {
            let t = args.tokens;
            let config = ConnectionConfig::new(Scheme::MhcDynamic, n, c);
            let mut rng = Rng::new(7);
            let mut params =
                ConnectionParams::<f32>::init(&config, &InitConfig::default(), &mut rng);
            params.alpha.iter_mut().for_each(|a| *a = 0.5);
            let len = t * n * c;
            let x: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let g: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let mut w = GpuWrapper::new(ctx.clone(), &config, &params, t)?;
            let xd = ctx.upload("x", &x)?;
            let gd = ctx.upload("grad out", &g)?;
            let od = ctx.zeros("out", len)?;
            let gxd = ctx.zeros("grad x", len)?;
            let mut f = ScaleSublayer {
                factor: 1.5,
                width: c,
            };
            // Check the first tokens against mhc-core (each token's output and ∂x depend on it alone).
            w.forward(&mut f, &xd, &od, t)?;
            w.backward(&mut f, &xd, &gd, &gxd, t)?;
            let ct = args.check_tokens.min(t);
            let cl = ct * n * c;
            let out_gpu: Vec<f32> = pollster::block_on(ctx.read(&od, 0, cl))?;
            let gx_gpu: Vec<f32> = pollster::block_on(ctx.read(&gxd, 0, cl))?;
            let conn = HyperConnection::new(config, params.clone())?;
            let mut ws = Workspace::new(&config, ct);
            let mut out = vec![0.0; cl];
            conn.forward(&mut Scale, &x[..cl], &mut out, &mut ws)?;
            let mut gx = vec![0.0; cl];
            let mut grads = ConnectionParams::zeros(&config);
            conn.backward(&mut Scale, &x[..cl], &g[..cl], &mut gx, &mut grads, &mut ws)?;
            let (e_out, e_gx) = (rel_l2(&out_gpu, &out), rel_l2(&gx_gpu, &gx));
            if !(e_out < 1e-4 && e_gx < 1e-4) {
                return Err(format!(
                    "C = {c}: the wgpu wrapper does not match mhc-core (relative L2 error: out {e_out:.2e}, grad x {e_gx:.2e}); not timing it"
                )
                .into());
            }
            let fwd = time(&ctx, args.reps, || w.forward(&mut f, &xd, &od, t))?;
            let fwd_bwd = time(&ctx, args.reps, || {
                w.zero_grads()?;
                w.forward(&mut f, &xd, &od, t)?;
                w.backward(&mut f, &xd, &gd, &gxd, t)
            })?;
            // Floors (DESIGN.md §4), f32: forward moves (3n+2)·C elements a token;
            // the backward reads x, ∂x', y, writes ∂x, ∂y and reads them again: (5n+3)·C.
            let floor_fwd = (t * (3 * n + 2) * c * 4) as f64 / (bandwidth * 1e9) * 1e3;
            let floor_fb = floor_fwd + (t * (5 * n + 3) * c * 4) as f64 / (bandwidth * 1e9) * 1e3;
            println!(
                "C = {c}: forward {fwd:.3} ms ({:.2}× floor), forward+backward {fwd_bwd:.3} ms ({:.2}× floor); parity rel. L2 out {e_out:.1e}, grad x {e_gx:.1e}",
                fwd / floor_fwd,
                fwd_bwd / floor_fb
            );
            rows.push(json!({
                "c": c, "n": n, "tokens": t, "dtype": "f32",
                "forward_ms": fwd, "forward_backward_ms": fwd_bwd,
                "forward_floor_ms": floor_fwd, "forward_backward_floor_ms": floor_fb,
                "parity_rel_l2_out": e_out, "parity_rel_l2_grad_x": e_gx,
            }));
        }
        // Training tokens/s of the tiny preset (mHC n = 4 and residual), wgpu vs the CPU reference.
        let mut train_rows = Vec::new();
        if args.train_steps > 0 {
            let data: Vec<u8> = mhc_core::model::data::synthetic_corpus(1234, 1 << 16);
            for (scheme, streams) in [(Scheme::MhcDynamic, 4), (Scheme::Residual, 1)] {
                let model = ModelConfig {
                    vocab: 256,
                    width: 64,
                    layers: 2,
                    heads: 4,
                    context: 64,
                    streams,
                    scheme,
                    sinkhorn_iterations: 20,
                };
                let train = TrainConfig {
                    batch: 16,
                    schedule: Schedule {
                        max_lr: 1e-3,
                        min_lr: 1e-4,
                        warmup: 0,
                        total: 1000,
                    },
                    adamw: AdamWConfig::default(),
                    clip: 1.0,
                    seed: 1,
                };
                let tokens_per_step = (train.batch * model.context) as f64;
                let mut cpu = Trainer::<f32>::new(model, train)?;
                let mut gpu = WgpuTrainer::from_cpu(ctx.clone(), &cpu)?;
                let mut rng = Rng::new(3);
                let mut batch = vec![0u32; train.batch * (model.context + 1)];
                sample_batch(&data, train.batch, model.context, &mut rng, &mut batch)?;
                gpu.step(&batch)?; // warm-up (pipelines)
                let t0 = Instant::now();
                for _ in 0..args.train_steps {
                    sample_batch(&data, train.batch, model.context, &mut rng, &mut batch)?;
                    gpu.step(&batch)?;
                }
                ctx.finish_blocking()?;
                let gpu_tps =
                    tokens_per_step * args.train_steps as f64 / t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                for _ in 0..args.train_steps {
                    cpu.step(&data)?;
                }
                let cpu_tps =
                    tokens_per_step * args.train_steps as f64 / t0.elapsed().as_secs_f64();
                println!(
                    "training, tiny preset ({scheme}, n = {streams}, C = 64, 2 blocks, batch 16 × 64): wgpu {gpu_tps:.0} tokens/s, CPU reference (1 thread) {cpu_tps:.0} tokens/s"
                );
                train_rows.push(json!({
                    "scheme": scheme.name(), "n": streams, "width": 64, "layers": 2,
                    "batch": 16, "context": 64, "steps": args.train_steps,
                    "wgpu_tokens_per_s": gpu_tps, "cpu_tokens_per_s": cpu_tps,
                }));
            }
        }
        println!("\n| C | n | T | fwd ms | fwd+bwd ms | fwd / floor | fwd+bwd / floor |");
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.2}× | {:.2}× |",
                r["c"],
                r["n"],
                r["tokens"],
                f("forward_ms"),
                f("forward_backward_ms"),
                f("forward_ms") / f("forward_floor_ms"),
                f("forward_backward_ms") / f("forward_backward_floor_ms")
            );
        }
        if let Some(path) = args.json {
            let doc = json!({
                "device": adapter,
                "timing": "wall clock around submit + wait, median",
                "reps": args.reps,
                "copy_bandwidth_gb_s": bandwidth,
                "rows": rows,
                "training": train_rows,
            });
            std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
            println!("wrote {path}");
        }
        Ok(())
    }
}
