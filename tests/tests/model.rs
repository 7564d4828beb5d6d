//! The reference model: whole-model gradient check against central finite
//! differences in f64 (every tensor, residual / HC / mHC), determinism, and
//! that training lowers the loss.

use mhc_core::model::optim::{AdamWConfig, Schedule};
use mhc_core::model::{Model, ModelConfig, TrainConfig, Trainer};
use mhc_core::{MhcError, Rng, Scheme};

fn tiny(scheme: Scheme, streams: usize) -> ModelConfig {
    ModelConfig {
        vocab: 11,
        width: 8,
        layers: 2,
        heads: 2,
        context: 5,
        streams,
        scheme,
        sinkhorn_iterations: 20,
    }
}

fn random_tokens(rng: &mut Rng, count: usize, vocab: usize) -> Vec<u32> {
    (0..count).map(|_| rng.below(vocab as u64) as u32).collect()
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    for (scheme, n) in [
        (Scheme::Residual, 1),
        (Scheme::HcDynamic, 2),
        (Scheme::MhcDynamic, 4),
        (Scheme::MhcDynamic, 1),
    ] {
        let config = tiny(scheme, n);
        let batch = 2;
        let mut model = Model::<f64>::new(config, batch * config.context, 5).unwrap();
        // Larger-than-default weights so every path carries signal (α = 0.01 and
        // std 0.02 would make most gradients tiny).
        let mut rng = Rng::new(9);
        model.for_each_param(|id, p, _| {
            for v in p.iter_mut() {
                *v = if id.tensor.ends_with("alpha") {
                    0.5 + rng.uniform()
                } else {
                    *v + 0.3 * rng.normal()
                };
            }
        });
        let tokens = random_tokens(&mut rng, batch * (config.context + 1), config.vocab);
        model.zero_grad();
        model.forward(&tokens, batch).unwrap();
        model.backward().unwrap();
        let mut analytic: Vec<(String, Vec<f64>)> = Vec::new();
        model.for_each_param(|id, _, g| analytic.push((id.name(), g.clone())));

        let h = 1e-5;
        let mut checked = 0;
        for (ti, (name, grad)) in analytic.iter().enumerate() {
            // Up to 5 entries of every tensor, spread over it.
            let picks: Vec<usize> = (0..grad.len().min(5))
                .map(|j| j * grad.len() / grad.len().min(5))
                .collect();
            for &k in &picks {
                let eval = |delta: f64| {
                    let mut m = model.clone();
                    let mut idx = 0;
                    m.for_each_param(|_, p, _| {
                        if idx == ti {
                            p[k] += delta;
                        }
                        idx += 1;
                    });
                    m.loss(&tokens, batch).unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                let err = (fd - grad[k]).abs();
                assert!(
                    err < 1e-6 * (1.0 + fd.abs()),
                    "{scheme} n={n} {name}[{k}]: analytic {} vs fd {fd}",
                    grad[k]
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "{scheme}: only {checked} entries checked");
    }
}

#[test]
fn training_lowers_the_loss_and_is_deterministic() {
    let data: Vec<u8> = b"abcabcabdabcabcabd"
        .iter()
        .cycle()
        .take(4000)
        .copied()
        .collect();
    let model = ModelConfig {
        vocab: 256,
        width: 16,
        layers: 1,
        heads: 2,
        context: 12,
        streams: 4,
        scheme: Scheme::MhcDynamic,
        sinkhorn_iterations: 20,
    };
    let config = TrainConfig {
        batch: 4,
        schedule: Schedule {
            max_lr: 1e-2,
            min_lr: 1e-3,
            warmup: 5,
            total: 80,
        },
        adamw: AdamWConfig::default(),
        clip: 1.0,
        seed: 3,
    };
    let run = || {
        let mut t = Trainer::<f32>::new(model, config).unwrap();
        let first = t.evaluate(&data, 2, 1).unwrap();
        let mut losses = Vec::new();
        for _ in 0..80 {
            losses.push(t.step(&data).unwrap().loss);
        }
        (first, t.evaluate(&data, 2, 1).unwrap(), losses)
    };
    let (before, after, losses) = run();
    assert!(after < 0.5 * before, "validation loss {before} → {after}");
    let (_, _, again) = run();
    assert_eq!(losses, again, "same seed, same losses bit for bit");
}

#[test]
fn bad_model_input_is_a_typed_error() {
    let mut bad = tiny(Scheme::MhcDynamic, 4);
    bad.heads = 3;
    assert!(matches!(
        Model::<f32>::new(bad, 10, 0),
        Err(MhcError::InvalidConfig(_))
    ));
    let mut model = Model::<f32>::new(tiny(Scheme::MhcDynamic, 4), 10, 0).unwrap();
    assert_eq!(
        model.forward(&[1, 2, 3, 99, 1, 2], 1),
        Err(MhcError::TokenOutOfRange {
            token: 99,
            vocab: 11
        })
    );
    assert!(
        matches!(model.forward(&[1; 14], 2), Err(MhcError::InvalidConfig(_))),
        "sequence longer than context"
    );
    assert_eq!(model.backward(), Err(MhcError::BackwardBeforeForward));
    assert!(Model::<f32>::new(tiny(Scheme::Residual, 2), 10, 0).is_err());
}

/// Sampling decodes incrementally (cached keys and values) while the sequence
/// fits the context, then falls back to full forwards: the tokens must be
/// exactly those of a full forward per token, for every scheme, in f64 and f32.
#[test]
fn incremental_sampling_equals_full_forwards() {
    use mhc_core::model::sample_token;
    fn check<T: mhc_core::Real>(scheme: Scheme, n: usize) {
        let mut config = tiny(scheme, n);
        config.context = 12;
        config.vocab = 17;
        let mut model = Model::<T>::new(config, 2 * config.context, 3).unwrap();
        // Larger-than-default weights so the logits differ between tokens.
        let mut rng = Rng::new(4);
        model.for_each_param(|_, p, _| {
            for v in p.iter_mut() {
                *v = *v + T::of(0.3 * rng.normal());
            }
        });
        let prompt = [3u32, 1, 4];
        // 20 tokens: 9 decoded incrementally (3 + 9 = 12 = context), the rest by full forwards.
        for temperature in [0.0, 0.9] {
            let fast = model
                .generate(&prompt, 20, temperature, &mut Rng::new(11))
                .unwrap();
            let mut sampler = Rng::new(11);
            let mut seq = prompt.to_vec();
            for _ in 0..20 {
                let logits = model.next_logits(&seq).unwrap().to_vec();
                seq.push(sample_token(&logits, temperature, &mut sampler));
            }
            assert_eq!(fast, seq[prompt.len()..], "{scheme} n={n} t={temperature}");
        }
        assert!(matches!(
            model.generate(&[99], 2, 0.0, &mut Rng::new(1)),
            Err(MhcError::TokenOutOfRange { .. })
        ));
    }
    for (scheme, n) in [
        (Scheme::Residual, 1),
        (Scheme::HcDynamic, 3),
        (Scheme::HcStatic, 2),
        (Scheme::MhcDynamic, 4),
        (Scheme::MhcStatic, 2),
    ] {
        check::<f64>(scheme, n);
        check::<f32>(scheme, n);
    }
}
