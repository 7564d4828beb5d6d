//! CPU benchmark of one training step of the reference model (forward,
//! backward, AdamW) per scheme, at the `tiny` preset's shape: C = 64,
//! 2 blocks, 4 heads, context 64, batch 16 (1024 tokens a step), f32.
//!
//!     cargo bench -p mhc-core --bench train_step
//!
//! Throughput is reported in tokens (elements) per second; mHC's overhead
//! over residual at n = 4 is the ratio of the two times.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mhc_core::Scheme;
use mhc_core::model::optim::{AdamWConfig, Schedule};
use mhc_core::model::{ModelConfig, TrainConfig, Trainer, data::synthetic_corpus};

fn train_step(c: &mut Criterion) {
    let data = synthetic_corpus(1, 1 << 20);
    let mut g = c.benchmark_group("train_step tiny (C=64, 2 blocks, 1024 tokens) f32");
    g.sample_size(10);
    g.throughput(Throughput::Elements(16 * 64));
    for (scheme, n) in [
        (Scheme::Residual, 1),
        (Scheme::HcDynamic, 4),
        (Scheme::MhcDynamic, 4),
    ] {
        let model = ModelConfig {
            vocab: 256,
            width: 64,
            layers: 2,
            heads: 4,
            context: 64,
            streams: n,
            scheme,
            sinkhorn_iterations: 20,
        };
        let config = TrainConfig {
            batch: 16,
            schedule: Schedule {
                max_lr: 1e-3,
                min_lr: 1e-4,
                warmup: 10,
                total: 1_000_000,
            },
            adamw: AdamWConfig::default(),
            clip: 1.0,
            seed: 0,
        };
        let mut trainer = Trainer::<f32>::new(model, config).expect("valid configuration");
        g.bench_function(BenchmarkId::new(scheme.name(), format!("n={n}")), |b| {
            b.iter(|| trainer.step(&data).expect("finite step"))
        });
    }
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
