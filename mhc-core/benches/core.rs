//! CPU benchmarks of the core (criterion), at the shape:
//! T = 4096 tokens, n = 4, C = 256, f32, stand-in sublayer `F(h) = 1.5·h`.
//!
//!     cargo bench -p mhc-core --bench core
//!
//! Groups: batched Sinkhorn–Knopp (20 iterations) forward and forward+backward;
//! the whole wrapper (coefficients + SK + pre-aggregate + post/res merge)
//! forward and forward+backward for residual (n = 1), HC and mHC.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mhc_core::sinkhorn::sinkhorn_knopp_backward_scratch_len;
use mhc_core::{
    ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, Result, Rng, Scheme,
    SinkhornConfig, Sublayer, Workspace, sinkhorn_knopp, sinkhorn_knopp_backward,
};
use std::hint::black_box;

const TOKENS: usize = 4096;
const N: usize = 4;
const WIDTH: usize = 256;

/// The stand-in sublayer of BENCH.md: `F(h) = 1.5·h`.
struct Scale;
impl Sublayer<f32> for Scale {
    fn forward(&mut self, h: &[f32], y: &mut [f32]) -> Result<()> {
        y.iter_mut().zip(h).for_each(|(y, h)| *y = 1.5 * h);
        Ok(())
    }
    fn vjp(&mut self, _: &[f32], gy: &[f32], gh: &mut [f32]) -> Result<()> {
        gh.iter_mut().zip(gy).for_each(|(g, gy)| *g = 1.5 * gy);
        Ok(())
    }
}

fn randn(rng: &mut Rng, count: usize, std: f64) -> Vec<f32> {
    (0..count).map(|_| (rng.normal() * std) as f32).collect()
}

fn sinkhorn(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let cfg = SinkhornConfig::default();
    let logits = randn(&mut rng, TOKENS * N * N, 2.0);
    let grad_out = randn(&mut rng, TOKENS * N * N, 1.0);
    let mut out = vec![0.0f32; logits.len()];
    let mut grad = vec![0.0f32; logits.len()];
    let mut scratch = vec![0.0f32; sinkhorn_knopp_backward_scratch_len(N, cfg.iterations)];
    let mut g = c.benchmark_group("sinkhorn_knopp T=4096 n=4 t_max=20 f32");
    g.throughput(Throughput::Elements(TOKENS as u64));
    g.bench_function("forward", |b| {
        b.iter(|| sinkhorn_knopp(black_box(&logits), N, &cfg, &mut out).unwrap())
    });
    g.bench_function("forward+backward", |b| {
        b.iter(|| {
            sinkhorn_knopp(black_box(&logits), N, &cfg, &mut out).unwrap();
            sinkhorn_knopp_backward(&logits, N, &cfg, &grad_out, &mut grad, &mut scratch).unwrap();
        })
    });
    g.finish();
}

fn wrapper(c: &mut Criterion) {
    let mut g = c.benchmark_group("wrapper T=4096 C=256 f32");
    g.throughput(Throughput::Elements(TOKENS as u64));
    g.sample_size(20);
    for (scheme, n) in [
        (Scheme::Residual, 1),
        (Scheme::HcDynamic, N),
        (Scheme::MhcDynamic, N),
    ] {
        let mut rng = Rng::new(2);
        let config = ConnectionConfig::new(scheme, n, WIDTH);
        let conn = HyperConnection::<f32>::init(config, &InitConfig::default(), &mut rng).unwrap();
        let x = randn(&mut rng, TOKENS * n * WIDTH, 1.0);
        let grad_out = randn(&mut rng, TOKENS * n * WIDTH, 1.0);
        let mut out = vec![0.0f32; x.len()];
        let mut grad_x = vec![0.0f32; x.len()];
        let mut grads = ConnectionParams::zeros(&config);
        let mut ws = Workspace::new(&config, TOKENS);
        let id = format!("{scheme} n={n}");
        g.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| {
                conn.forward(&mut Scale, black_box(&x), &mut out, &mut ws)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("forward+backward", &id), |b| {
            b.iter(|| {
                conn.forward(&mut Scale, black_box(&x), &mut out, &mut ws)
                    .unwrap();
                conn.backward(&mut Scale, &x, &grad_out, &mut grad_x, &mut grads, &mut ws)
                    .unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sinkhorn, wrapper);
criterion_main!(benches);
