//! The model's sublayers and one full training step on wgpu against
//! mhc-core's Trainer, for every scheme, on a tiny model (lavapipe is slow).
//! Tolerances: loss 1e-5 relative; gradient norm 1e-4 relative; every
//! gradient tensor within 1e-3 of its largest value + 1e-3 relative; updated
//! weights within 0.05·lr per step + 1e-4 relative, except where the CPU
//! gradient was ever below 1e-3 of its tensor's scale, where AdamW's update
//! (≈ lr·sign(g) at first) may flip with the rounding: there 2.1·lr per step.

mod common;

use common::{assert_close, context, max_abs, random};
use mhc_core::model::data::sample_batch;
use mhc_core::model::optim::{AdamWConfig, Schedule};
use mhc_core::model::{Model, ModelConfig, TrainConfig, Trainer};
use mhc_core::{Rng, Scheme, Sublayer};
use mhc_gpu::{GpuAttention, GpuMlp, GpuSublayer, WgpuTrainer};

fn tiny(scheme: Scheme, streams: usize) -> ModelConfig {
    ModelConfig {
        vocab: 29,
        width: 24,
        layers: 2,
        heads: 3,
        context: 7,
        streams,
        scheme,
        sinkhorn_iterations: 20,
    }
}

#[test]
fn attention_and_mlp_sublayers_match_the_core() {
    let Some(ctx) = context() else { return };
    let (batch, seq) = (2usize, 9usize);
    let cfg = tiny(Scheme::Residual, 1);
    let c = cfg.width;
    let mut model = Model::<f32>::new(cfg, batch * seq, 5).unwrap();
    let block = &mut model.blocks[0];
    let mut rng = Rng::new(6);
    let rows = batch * seq;
    let h = random(&mut rng, rows * c, 1.0);
    let gy = random(&mut rng, rows * c, 1.0);
    block.attn.shape = mhc_core::model::blocks::SeqShape { batch, seq };
    let mut gattn = GpuAttention::from_cpu(&ctx, &block.attn, c, cfg.heads, batch, seq).unwrap();
    let mut gmlp = GpuMlp::from_cpu(&ctx, &block.mlp, c, rows).unwrap();
    let subs: [(&str, &mut dyn Sublayer<f32>, &mut dyn GpuSublayer); 2] = [
        ("attention", &mut block.attn, &mut gattn),
        ("mlp", &mut block.mlp, &mut gmlp),
    ];
    for (name, cpu, gpu) in subs {
        let mut y = vec![0.0; rows * c];
        cpu.forward(&h, &mut y).unwrap();
        let mut gh = vec![0.0; rows * c];
        cpu.vjp(&h, &gy, &mut gh).unwrap();
        let hd = ctx.upload("h", &h).unwrap();
        let gyd = ctx.upload("gy", &gy).unwrap();
        let yd = ctx.zeros("y", rows * c).unwrap();
        let ghd = ctx.zeros("gh", rows * c).unwrap();
        gpu.forward(&ctx, &hd, &yd, rows).unwrap();
        gpu.vjp(&ctx, &hd, &gyd, &ghd, rows).unwrap();
        let ys = max_abs(&y);
        assert_close(
            name,
            &ctx.read_f32_blocking(&yd).unwrap(),
            &y,
            1e-4,
            1e-4 * ys,
        );
        assert_close(
            &format!("{name} vjp"),
            &ctx.read_f32_blocking(&ghd).unwrap(),
            &gh,
            1e-3,
            1e-4 * max_abs(&gh),
        );
    }
    // The weight gradients the vjp accumulated.
    let pairs = [
        ("attn.norm", &block.attn.norm.grad, &gattn.norm.grad),
        ("attn.wqkv", &block.attn.wqkv.grad, &gattn.wqkv.grad),
        ("attn.wo", &block.attn.wo.grad, &gattn.wo.grad),
        ("mlp.norm", &block.mlp.norm.grad, &gmlp.norm.grad),
        ("mlp.w1", &block.mlp.w1.grad, &gmlp.w1.grad),
        ("mlp.w2", &block.mlp.w2.grad, &gmlp.w2.grad),
    ];
    for (name, want, got) in pairs {
        assert!(want.iter().any(|v| *v != 0.0), "{name}: zero gradient");
        assert_close(
            &format!("grad {name}"),
            &ctx.read_f32_blocking(got).unwrap(),
            want,
            1e-3,
            1e-4 * max_abs(want),
        );
    }
}

fn train_config() -> TrainConfig {
    TrainConfig {
        batch: 2,
        schedule: Schedule {
            max_lr: 1e-3,
            min_lr: 1e-4,
            warmup: 0,
            total: 10,
        },
        adamw: AdamWConfig::default(),
        clip: 1.0,
        seed: 11,
    }
}

const EVERY_SCHEME: [(Scheme, usize); 5] = [
    (Scheme::MhcDynamic, 4),
    (Scheme::Residual, 1),
    (Scheme::HcDynamic, 3),
    (Scheme::MhcStatic, 2),
    (Scheme::HcStatic, 2),
];

#[test]
fn one_training_step_matches_the_core_for_every_scheme() {
    let Some(ctx) = context() else { return };
    training_steps_match_the_core(ctx, &EVERY_SCHEME);
}

/// The same with the serial kernels (no workgroup memory or barriers) that
/// a browser's software adapter uses by default, on a context of their own.
#[test]
fn serial_kernels_match_the_core_for_every_scheme() {
    if context().is_none() {
        return;
    }
    let mut ctx = mhc_gpu::GpuContext::new_blocking().unwrap();
    assert!(
        !ctx.serial_kernels(),
        "native adapters default to cooperative kernels"
    );
    ctx.set_serial_kernels(true);
    // n = 3: K = 15 coefficients, not a multiple of the serial kernels' blocks.
    let mut schemes = EVERY_SCHEME.to_vec();
    schemes.extend([(Scheme::MhcDynamic, 3), (Scheme::HcDynamic, 1)]);
    training_steps_match_the_core(std::sync::Arc::new(ctx), &schemes);
}

fn training_steps_match_the_core(
    ctx: std::sync::Arc<mhc_gpu::GpuContext>,
    schemes: &[(Scheme, usize)],
) {
    let data: Vec<u8> = (0..400u32).map(|i| ((i * 7 + i / 3) % 29) as u8).collect();
    for &(scheme, n) in schemes {
        let cfg = tiny(scheme, n);
        let mut cpu = Trainer::<f32>::new(cfg, train_config()).unwrap();
        let mut gpu = WgpuTrainer::from_cpu(ctx.clone(), &cpu).unwrap();
        // Elements whose gradient was ever tiny (an AdamW sign flip may persist).
        let mut sensitive: Vec<Vec<bool>> = Vec::new();
        // Two steps: the second one starts from updated weights and non-zero moments.
        for step in 0..2 {
            let mut tokens = vec![0u32; 2 * (cfg.context + 1)];
            let mut rng = cpu.rng.clone();
            sample_batch(&data, 2, cfg.context, &mut rng, &mut tokens).unwrap();
            let want = cpu.step(&data).unwrap();
            let got = gpu.step(&tokens).unwrap();
            let w = format!("{scheme} n={n} step {step}");
            assert!(
                (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
                "{w}: loss {} vs {}",
                got.loss,
                want.loss
            );
            assert!(
                (got.grad_norm - want.grad_norm).abs() <= 1e-4 * want.grad_norm,
                "{w}: grad norm {} vs {}",
                got.grad_norm,
                want.grad_norm
            );
            assert_eq!(got.lr, want.lr);
            let grads = gpu.tensors(true).unwrap();
            let params = gpu.tensors(false).unwrap();
            let clip = (want.grad_norm > 1.0).then(|| (1.0 / want.grad_norm) as f32);
            let mut i = 0;
            let lr = want.lr as f32;
            cpu.model.for_each_param(|id, p, g| {
                let name = id.name();
                assert_eq!(grads[i].0, name);
                // The CPU clipped its gradients in place; undo for the comparison.
                let g_raw: Vec<f32> = match clip {
                    Some(s) => g.iter().map(|v| v / s).collect(),
                    None => g.clone(),
                };
                let scale = max_abs(&g_raw);
                assert_close(
                    &format!("{w} grad {name}"),
                    &grads[i].1,
                    &g_raw,
                    1e-3,
                    1e-3 * scale + 1e-7,
                );
                if sensitive.len() <= i {
                    sensitive.push(vec![false; p.len()]);
                }
                for (j, ((&gp, &cp), &gv)) in
                    params[i].1.iter().zip(p.iter()).zip(&g_raw).enumerate()
                {
                    sensitive[i][j] |= gv.abs() < 1e-3 * scale;
                    let tol = if sensitive[i][j] {
                        2.1 * lr * (step + 1) as f32
                    } else {
                        0.05 * lr * (step + 1) as f32 + 1e-4 * cp.abs()
                    };
                    assert!(
                        (gp - cp).abs() <= tol,
                        "{w} {name}[{j}]: updated weight {gp} vs {cp} (grad {gv})"
                    );
                }
                i += 1;
            });
            assert_eq!(i, params.len());
        }
        let report = gpu.gain_report().unwrap();
        assert_eq!(report.amax_fwd.len(), cfg.sublayers());
        // Evaluation uses the same windows as the CPU's.
        let mut cpu_sync = cpu.clone();
        gpu.sync_to_cpu(&mut cpu_sync).unwrap();
        assert_eq!(cpu_sync.optimizer.step, 2);
        let ev_cpu = cpu_sync.evaluate(&data, 2, 99).unwrap();
        let ev_gpu = gpu.evaluate(&data, 2, 99).unwrap();
        assert!(
            (ev_cpu - ev_gpu).abs() <= 1e-5 * ev_cpu.abs(),
            "{scheme}: eval {ev_gpu} vs {ev_cpu}"
        );
    }
}

#[test]
fn bad_token_batches_give_typed_errors() {
    let Some(ctx) = context() else { return };
    let cfg = tiny(Scheme::MhcDynamic, 2);
    let cpu = Trainer::<f32>::new(cfg, train_config()).unwrap();
    let mut gpu = WgpuTrainer::from_cpu(ctx, &cpu).unwrap();
    let e = gpu.step(&[1, 2, 3]).err().unwrap();
    assert!(matches!(e, mhc_gpu::GpuError::Shape { .. }), "{e}");
    let bad = vec![99u32; 2 * (cfg.context + 1)];
    let e = gpu.step(&bad).err().unwrap();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}

#[test]
fn last_step_coefficients_match_the_core() {
    let Some(ctx) = context() else { return };
    let data: Vec<u8> = (0..400u32).map(|i| ((i * 5 + i / 7) % 29) as u8).collect();
    for (scheme, n) in [
        (Scheme::MhcDynamic, 4),
        (Scheme::HcDynamic, 3),
        (Scheme::MhcStatic, 2),
        (Scheme::Residual, 1),
    ] {
        let cfg = tiny(scheme, n);
        let k = n * n + 2 * n;
        let tokens = 2 * cfg.context;
        let mut cpu = Trainer::<f32>::new(cfg, train_config()).unwrap();
        let mut gpu = WgpuTrainer::from_cpu(ctx.clone(), &cpu).unwrap();
        // Step 1 runs on identical weights; step 2 on weights updated once
        // (AdamW may round differently, so a looser bound).
        for (step, tol) in [(1, 2e-5f32), (2, 2e-3)] {
            let mut tokens_batch = vec![0u32; 2 * (cfg.context + 1)];
            let mut rng = cpu.rng.clone();
            sample_batch(&data, 2, cfg.context, &mut rng, &mut tokens_batch).unwrap();
            cpu.step(&data).unwrap();
            gpu.step(&tokens_batch).unwrap();
            let got = gpu.coefficients().unwrap();
            assert_eq!(got.len(), cfg.sublayers(), "{scheme}: one per sublayer");
            for (l, g) in got.iter().enumerate() {
                let want = cpu.model.sublayer_coefficients(l).unwrap();
                assert_eq!(
                    g.len(),
                    tokens * k,
                    "{scheme} sublayer {l}: [tokens, n²+2n]"
                );
                assert_close(
                    &format!("{scheme} n={n} step {step} sublayer {l} coefficients"),
                    g,
                    want,
                    tol,
                    tol,
                );
            }
            if scheme == Scheme::Residual {
                assert!(got.iter().flatten().all(|&v| v == 1.0), "residual: all 1");
            }
            let gains = gpu.gain_report_of(&got).unwrap();
            let want = cpu.model.gain_report().unwrap();
            for (d, (g, w)) in gains.composite.iter().zip(&want.composite).enumerate() {
                assert!(
                    (g.forward_max - w.forward_max).abs() <= 1e-3 * w.forward_max.abs().max(1.0),
                    "{scheme} step {step} depth {d}: composite gain {} vs {}",
                    g.forward_max,
                    w.forward_max
                );
            }
        }
    }
}
