//! Property tests of the invariants listed in DESIGN.md ("Invariants").

use mhc_core::diagnostics::{composite_gains_scratch_len, sinkhorn_residual};
use mhc_core::sinkhorn::{identity_bias_diagonal, sinkhorn_knopp_backward_scratch_len};
use mhc_core::{
    CompositeGain, ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, Rng, Scheme,
    SinkhornConfig, Workspace, amax_gain, composite_gains, sinkhorn_knopp, sinkhorn_knopp_backward,
};
use mhc_tests::{TanhLinear, normal_vec};
use proptest::prelude::*;

fn sk(logits: &[f64], n: usize, iterations: usize) -> (Vec<f64>, f64) {
    let mut out = vec![0.0; logits.len()];
    let cfg = SinkhornConfig {
        iterations,
        eps: 1e-6,
    };
    let res = sinkhorn_knopp(logits, n, &cfg, &mut out).unwrap();
    (out, res)
}

/// Random logits: `count` n×n matrices with standard deviation `std`.
fn logits_strategy() -> impl Strategy<Value = (usize, usize, Vec<f64>)> {
    (
        1usize..=8,
        1usize..=30,
        1usize..=4,
        0.1f64..5.0,
        any::<u64>(),
    )
        .prop_map(|(n, iters, count, std, seed)| {
            let mut rng = Rng::new(seed);
            (n, iters, normal_vec(&mut rng, count * n * n, std))
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Nonnegative, unit row sums (exact up to rounding), column sums within the reported residual.
    #[test]
    fn sinkhorn_output_is_in_the_polytope((n, iters, l) in logits_strategy()) {
        let (m, res) = sk(&l, n, iters);
        for mat in m.chunks_exact(n * n) {
            prop_assert!(mat.iter().all(|&v| v >= 0.0 && v.is_finite()));
            for row in mat.chunks_exact(n) {
                prop_assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-13);
            }
            for i in 0..n {
                let col: f64 = (0..n).map(|o| mat[o * n + i]).sum();
                prop_assert!((col - 1.0).abs() <= res + 1e-15);
            }
            prop_assert!(sinkhorn_residual(mat, n) <= res);
        }
    }

    /// Adding a constant to a column of the logits leaves the output unchanged.
    #[test]
    fn column_shift_does_not_change_the_output((n, iters, l) in logits_strategy(), shift in -30.0f64..30.0, col in 0usize..8) {
        let col = col % n;
        let mut shifted = l.clone();
        for mat in shifted.chunks_exact_mut(n * n) {
            for o in 0..n {
                mat[o * n + col] += shift;
            }
        }
        let (a, _) = sk(&l, n, iters);
        let (b, _) = sk(&shifted, n, iters);
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
    }

    /// n = 1: SK returns exactly 1 for any logit.
    #[test]
    fn single_stream_sinkhorn_is_exactly_one(v in -80.0f64..80.0, iters in 1usize..40) {
        prop_assert_eq!(sk(&[v], 1, iters).0, vec![1.0]);
        let mut out = [0.0f32];
        sinkhorn_knopp(&[v as f32], 1, &SinkhornConfig { iterations: iters, eps: 1e-6 }, &mut out).unwrap();
        prop_assert_eq!(out[0], 1.0f32);
    }

    /// A c·I bias gives the closed form: diagonal e^c/(e^c + n − 1), off-diagonal 1/(e^c + n − 1).
    #[test]
    fn identity_bias_has_the_closed_form(n in 2usize..=8, c in -4.0f64..8.0, iters in 1usize..30) {
        let mut l = vec![0.0; n * n];
        for i in 0..n { l[i * n + i] = c; }
        let (m, res) = sk(&l, n, iters);
        let diag = identity_bias_diagonal(c, n);
        let off = 1.0 / (c.exp() + n as f64 - 1.0);
        for o in 0..n {
            for i in 0..n {
                let want = if o == i { diag } else { off };
                prop_assert!((m[o * n + i] - want).abs() < 1e-14);
            }
        }
        prop_assert!(res < 1e-14);
    }

    /// Products of SK outputs stay in the polytope up to the residual, and the
    /// composite Amax gain stays within (1 + residual)^depth.
    #[test]
    fn products_stay_in_the_polytope(n in 1usize..=8, depth in 1usize..=24, iters in 1usize..=20, std in 0.1f64..4.0, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let l = normal_vec::<f64>(&mut rng, depth * n * n, std);
        let (m, res) = sk(&l, n, iters);
        let layers: Vec<&[f64]> = m.chunks_exact(n * n).collect();
        let mut gains = vec![CompositeGain::default(); depth];
        let mut scratch = vec![0.0; composite_gains_scratch_len(n)];
        composite_gains(&layers, n, &mut gains, &mut scratch).unwrap();
        let mut prod = layers[0].to_vec();
        for (d, g) in gains.iter().enumerate() {
            if d > 0 {
                let h = layers[d];
                let mut next = vec![0.0; n * n];
                for o in 0..n { for i in 0..n { next[o * n + i] = (0..n).map(|j| h[o * n + j] * prod[j * n + i]).sum(); } }
                prod = next;
            }
            let bound = (1.0 + res).powi(d as i32 + 1) - 1.0 + 1e-12;
            prop_assert!(prod.iter().all(|&v| v >= 0.0));
            for row in prod.chunks_exact(n) {
                prop_assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
            prop_assert!(sinkhorn_residual(&prod, n) <= bound);
            // Rows sum to 1 exactly, so the forward gain is 1; the backward gain is the column sum.
            prop_assert!((g.forward_max - 1.0).abs() < 1e-12);
            prop_assert!(g.backward_max <= 1.0 + bound);
            let direct = amax_gain(&prod, n).unwrap();
            prop_assert!((direct.backward - g.backward_max).abs() < 1e-12);
        }
    }

    /// The SK backward matches central finite differences (f64) for any n, iteration count and logit scale.
    #[test]
    fn sinkhorn_backward_matches_finite_differences((n, iters, l) in logits_strategy(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let g = normal_vec::<f64>(&mut rng, l.len(), 1.0);
        let cfg = SinkhornConfig { iterations: iters, eps: 1e-6 };
        let mut grad = vec![0.0; l.len()];
        let mut scratch = vec![0.0; sinkhorn_knopp_backward_scratch_len(n, iters)];
        sinkhorn_knopp_backward(&l, n, &cfg, &g, &mut grad, &mut scratch).unwrap();
        let loss = |l: &[f64]| sk(l, n, iters).0.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>();
        let h = 1e-6;
        for k in 0..l.len() {
            let (mut p, mut m) = (l.clone(), l.clone());
            p[k] += h;
            m[k] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h);
            prop_assert!((fd - grad[k]).abs() < 1e-6 * (1.0 + fd.abs()), "k={k}: fd {fd} vs {}", grad[k]);
        }
    }

    /// The f32 path of the whole wrapper agrees with the f64 oracle on random inputs
    /// (tolerance 1e-4 relative to max(|value|, 1)).
    #[test]
    fn f32_wrapper_matches_f64(n in 1usize..=8, c in 1usize..=16, tokens in 1usize..=4, dynamic_hc in any::<bool>(), seed in any::<u64>()) {
        let scheme = if dynamic_hc { Scheme::HcDynamic } else { Scheme::MhcDynamic };
        let mut rng = Rng::new(seed);
        let config = ConnectionConfig::new(scheme, n, c);
        let mut p64 = ConnectionParams::<f64>::init(&config, &InitConfig { alpha: 0.7, projection_std: 0.2, ..InitConfig::default() }, &mut rng);
        p64.b_res.iter_mut().for_each(|b| *b += rng.normal());
        let p32 = p64.cast::<f32>();
        let x32 = normal_vec::<f32>(&mut rng, tokens * n * c, 1.0);
        let g32 = normal_vec::<f32>(&mut rng, tokens * n * c, 1.0);
        let w32 = normal_vec::<f32>(&mut rng, c * c, 0.5);
        let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = g32.iter().map(|&v| v as f64).collect();
        let w64: Vec<f64> = w32.iter().map(|&v| v as f64).collect();

        let c64 = HyperConnection::new(config, p64).unwrap();
        let c32 = HyperConnection::new(config, p32).unwrap();
        let (mut f64s, mut f32s) = (TanhLinear::new(c, w64), TanhLinear::new(c, w32));
        let (mut ws64, mut ws32) = (Workspace::new(&config, tokens), Workspace::new(&config, tokens));
        let (mut o64, mut o32) = (vec![0.0; x64.len()], vec![0.0f32; x32.len()]);
        c64.forward(&mut f64s, &x64, &mut o64, &mut ws64).unwrap();
        c32.forward(&mut f32s, &x32, &mut o32, &mut ws32).unwrap();
        let (mut gx64, mut gx32) = (vec![0.0; x64.len()], vec![0.0f32; x32.len()]);
        let (mut gp64, mut gp32) = (ConnectionParams::zeros(&config), ConnectionParams::zeros(&config));
        c64.backward(&mut f64s, &x64, &g64, &mut gx64, &mut gp64, &mut ws64).unwrap();
        c32.backward(&mut f32s, &x32, &g32, &mut gx32, &mut gp32, &mut ws32).unwrap();
        let tol = 1e-4;
        for (a, b) in o32.iter().zip(&o64) { prop_assert!((*a as f64 - b).abs() <= tol * b.abs().max(1.0)); }
        for (a, b) in gx32.iter().zip(&gx64) { prop_assert!((*a as f64 - b).abs() <= tol * b.abs().max(1.0)); }
        for ((name, a), (_, b)) in gp32.tensors().iter().zip(gp64.tensors().iter()) {
            let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (u, v) in a.iter().zip(b.iter()) {
                prop_assert!((*u as f64 - v).abs() <= tol * scale, "{name}: {u} vs {v}");
            }
        }
    }
}

#[test]
fn row_shift_changes_the_output_until_convergence() {
    let mut rng = Rng::new(11);
    let n = 4;
    let l = normal_vec::<f64>(&mut rng, n * n, 2.0);
    let mut shifted = l.clone();
    for i in 0..n {
        shifted[n + i] += 1.5; // row 1
    }
    let max_diff = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    let (a, _) = sk(&l, n, 1);
    let (b, _) = sk(&shifted, n, 1);
    assert!(
        max_diff(&a, &b) > 1e-3,
        "a row shift changes a truncated iteration"
    );
    // Sinkhorn scaling D₁·A·D₂ of a positive matrix is unique: at convergence the shift is absorbed.
    let (a, ra) = sk(&l, n, 5000);
    let (b, rb) = sk(&shifted, n, 5000);
    assert!(ra < 1e-12 && rb < 1e-12);
    assert!(max_diff(&a, &b) < 1e-10);
}
