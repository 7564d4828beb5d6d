//! Unit tests of the wrapper and the coefficients: finite differences in f64
//! for every scheme and n ∈ {1, 2, 4, 8}, the n = 1 identities, initialisation,
//! diagnostics and typed errors.

use alloc::vec;
use alloc::vec::Vec;

use crate::apply::{post_res_merge, pre_aggregate};
use crate::diagnostics::{amax_gain, composite_gains, composite_gains_scratch_len};
use crate::sinkhorn::identity_bias_diagonal;
use crate::*;

/// `F(h) = tanh(h·W)` per token, `W [C, C]`; accumulates `∂W` in `vjp`.
pub(crate) struct TanhLinear {
    pub c: usize,
    pub w: Vec<f64>,
    pub grad_w: Vec<f64>,
}

impl Sublayer<f64> for TanhLinear {
    fn forward(&mut self, h: &[f64], y: &mut [f64]) -> Result<()> {
        let c = self.c;
        for (ht, yt) in h.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for j in 0..c {
                yt[j] = (0..c)
                    .map(|i| ht[i] * self.w[i * c + j])
                    .sum::<f64>()
                    .tanh();
            }
        }
        Ok(())
    }
    fn vjp(&mut self, h: &[f64], gy: &[f64], gh: &mut [f64]) -> Result<()> {
        let c = self.c;
        for ((ht, gyt), ght) in h
            .chunks_exact(c)
            .zip(gy.chunks_exact(c))
            .zip(gh.chunks_exact_mut(c))
        {
            let mut du = vec![0.0; c];
            for j in 0..c {
                let y = (0..c)
                    .map(|i| ht[i] * self.w[i * c + j])
                    .sum::<f64>()
                    .tanh();
                du[j] = gyt[j] * (1.0 - y * y);
            }
            for i in 0..c {
                ght[i] = (0..c).map(|j| self.w[i * c + j] * du[j]).sum();
                for j in 0..c {
                    self.grad_w[i * c + j] += ht[i] * du[j];
                }
            }
        }
        Ok(())
    }
}

fn randn(rng: &mut Rng, count: usize, std: f64) -> Vec<f64> {
    (0..count).map(|_| rng.normal() * std).collect()
}

/// Parameters with magnitudes that make every path matter (α ≈ 1, not 0.01).
fn random_connection(scheme: Scheme, n: usize, c: usize, rng: &mut Rng) -> HyperConnection<f64> {
    let config = ConnectionConfig::new(scheme, n, c);
    let mut params = ConnectionParams::init(&config, &InitConfig::default(), rng);
    for (name, t) in params.tensors_mut() {
        for v in t.iter_mut() {
            *v = match name {
                "alpha" => 0.5 + rng.uniform(),
                "gamma" => 1.0 + 0.1 * rng.normal(),
                "phi" => 0.3 * rng.normal(),
                "theta_pre" | "theta_post" | "theta_res" => 0.5 * rng.normal(),
                _ => rng.normal(),
            };
        }
    }
    HyperConnection::new(config, params).unwrap()
}

fn loss(conn: &HyperConnection<f64>, f: &mut TanhLinear, x: &[f64], g: &[f64]) -> f64 {
    let mut ws = Workspace::new(conn.config(), x.len() / conn.config().state_len());
    let mut out = vec![0.0; x.len()];
    conn.forward(f, x, &mut out, &mut ws).unwrap();
    out.iter().zip(g).map(|(a, b)| a * b).sum()
}

fn assert_close(what: &str, analytic: f64, numeric: f64, tol: f64) {
    let err = (analytic - numeric).abs();
    assert!(
        err <= tol * (1.0 + numeric.abs()),
        "{what}: analytic {analytic} vs finite difference {numeric} (err {err})"
    );
}

const FD_STEP: f64 = 1e-5;
const FD_TOL: f64 = 1e-6;

fn check_wrapper_gradients(scheme: Scheme, n: usize, c: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let tokens = 3;
    let mut conn = random_connection(scheme, n, c, &mut rng);
    let mut f = TanhLinear {
        c,
        w: randn(&mut rng, c * c, 0.5),
        grad_w: vec![0.0; c * c],
    };
    let x = randn(&mut rng, tokens * n * c, 1.0);
    let g = randn(&mut rng, tokens * n * c, 1.0);

    let config = *conn.config();
    let mut ws = Workspace::new(&config, tokens);
    let mut out = vec![0.0; x.len()];
    conn.forward(&mut f, &x, &mut out, &mut ws).unwrap();
    let mut grad_x = vec![0.0; x.len()];
    let mut grads = ConnectionParams::zeros(&config);
    conn.backward(&mut f, &x, &g, &mut grad_x, &mut grads, &mut ws)
        .unwrap();

    for k in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[k] += FD_STEP;
        xm[k] -= FD_STEP;
        let fd = (loss(&conn, &mut f, &xp, &g) - loss(&conn, &mut f, &xm, &g)) / (2.0 * FD_STEP);
        assert_close(
            &alloc::format!("{scheme} n={n} dx[{k}]"),
            grad_x[k],
            fd,
            FD_TOL,
        );
    }
    for ti in 0..9 {
        let len = grads.tensors()[ti].1.len();
        for k in 0..len {
            let orig = conn.params.tensors()[ti].1[k];
            conn.params.tensors_mut()[ti].1[k] = orig + FD_STEP;
            let lp = loss(&conn, &mut f, &x, &g);
            conn.params.tensors_mut()[ti].1[k] = orig - FD_STEP;
            let lm = loss(&conn, &mut f, &x, &g);
            conn.params.tensors_mut()[ti].1[k] = orig;
            let name = ConnectionParams::<f64>::NAMES[ti];
            assert_close(
                &alloc::format!("{scheme} n={n} d{name}[{k}]"),
                grads.tensors()[ti].1[k],
                (lp - lm) / (2.0 * FD_STEP),
                FD_TOL,
            );
        }
    }
    for k in 0..c * c {
        let orig = f.w[k];
        f.w[k] = orig + FD_STEP;
        let lp = loss(&conn, &mut f, &x, &g);
        f.w[k] = orig - FD_STEP;
        let lm = loss(&conn, &mut f, &x, &g);
        f.w[k] = orig;
        assert_close(
            &alloc::format!("{scheme} n={n} dW[{k}]"),
            f.grad_w[k],
            (lp - lm) / (2.0 * FD_STEP),
            FD_TOL,
        );
    }
}

#[test]
fn wrapper_backward_matches_finite_differences_every_scheme() {
    for n in [1usize, 2, 4, 8] {
        for scheme in [
            Scheme::HcStatic,
            Scheme::HcDynamic,
            Scheme::MhcStatic,
            Scheme::MhcDynamic,
        ] {
            check_wrapper_gradients(scheme, n, 3, 100 + n as u64);
        }
    }
    check_wrapper_gradients(Scheme::Residual, 1, 5, 7);
}

#[test]
fn coefficients_backward_matches_finite_differences() {
    // The coefficients alone: L = Σ H ⊙ G for a random G, every scheme, n ∈ {1, 2, 4, 8}.
    for n in [1usize, 2, 4, 8] {
        for scheme in [Scheme::HcDynamic, Scheme::MhcDynamic, Scheme::MhcStatic] {
            let mut rng = Rng::new(500 + n as u64);
            let (c, tokens) = (4, 2);
            let mut conn = random_connection(scheme, n, c, &mut rng);
            let config = *conn.config();
            let k = config.coefficient_len();
            let x = randn(&mut rng, tokens * n * c, 1.0);
            let g = randn(&mut rng, tokens * k, 1.0);
            let mut ws = Workspace::new(&config, tokens);
            let coef_loss = |conn: &HyperConnection<f64>, x: &[f64]| {
                let mut ws = Workspace::new(conn.config(), tokens);
                conn.coefficients(x, &mut ws)
                    .unwrap()
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
            };
            conn.coefficients(&x, &mut ws).unwrap();
            let mut gx = vec![0.0; x.len()];
            let mut grads = ConnectionParams::zeros(&config);
            conn.coefficients_backward(&x, &g, &mut gx, &mut grads, &mut ws)
                .unwrap();
            for m in 0..x.len() {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[m] += FD_STEP;
                xm[m] -= FD_STEP;
                let fd = (coef_loss(&conn, &xp) - coef_loss(&conn, &xm)) / (2.0 * FD_STEP);
                assert_close(
                    &alloc::format!("coef {scheme} n={n} dx[{m}]"),
                    gx[m],
                    fd,
                    FD_TOL,
                );
            }
            for ti in 0..9 {
                for m in 0..grads.tensors()[ti].1.len() {
                    let orig = conn.params.tensors()[ti].1[m];
                    conn.params.tensors_mut()[ti].1[m] = orig + FD_STEP;
                    let lp = coef_loss(&conn, &x);
                    conn.params.tensors_mut()[ti].1[m] = orig - FD_STEP;
                    let lm = coef_loss(&conn, &x);
                    conn.params.tensors_mut()[ti].1[m] = orig;
                    let fd = (lp - lm) / (2.0 * FD_STEP);
                    assert_close(
                        &alloc::format!("coef {scheme} n={n} param {ti}[{m}]"),
                        grads.tensors()[ti].1[m],
                        fd,
                        FD_TOL,
                    );
                }
            }
        }
    }
}

#[test]
fn single_stream_identity_is_bit_exact_residual() {
    // n = 1: SK returns exactly 1; with H_pre = H_post = 1 the wrapper is x + F(x) bit for bit.
    let mut rng = Rng::new(3);
    let c = 7;
    let tokens = 5;
    let x32: Vec<f32> = (0..tokens * c).map(|_| rng.normal() as f32 * 3.0).collect();
    let mut sk = vec![0.0f32; 4];
    let logits = [-3.7f32, 0.0, 12.5, 88.0];
    sinkhorn_knopp(&logits, 1, &SinkhornConfig::default(), &mut sk).unwrap();
    assert_eq!(sk, vec![1.0; 4]);

    struct Square;
    impl Sublayer<f32> for Square {
        fn forward(&mut self, h: &[f32], y: &mut [f32]) -> Result<()> {
            y.iter_mut()
                .zip(h)
                .for_each(|(y, h)| *y = 0.3 * h * h - 1.1 * h);
            Ok(())
        }
        fn vjp(&mut self, h: &[f32], gy: &[f32], gh: &mut [f32]) -> Result<()> {
            gh.iter_mut()
                .zip(h)
                .zip(gy)
                .for_each(|((g, h), gy)| *g = gy * (0.6 * h - 1.1));
            Ok(())
        }
    }
    let mut expect = vec![0.0f32; x32.len()];
    Square.forward(&x32, &mut expect).unwrap();
    expect.iter_mut().zip(&x32).for_each(|(e, x)| *e += x);

    // The residual scheme, and the generic apply path with coefficients (1, 1, 1).
    let config = ConnectionConfig::new(Scheme::Residual, 1, c);
    let conn = HyperConnection::<f32>::new(config, ConnectionParams::zeros(&config)).unwrap();
    let mut ws = Workspace::new(&config, tokens);
    let mut out = vec![0.0f32; x32.len()];
    conn.forward(&mut Square, &x32, &mut out, &mut ws).unwrap();
    assert_eq!(
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        expect.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    // mHC static at n = 1 with H_pre = H_post = 1 enforced through the apply functions:
    // its H_res is SK(b_res) = 1 exactly, whatever b_res is.
    let mconfig = ConnectionConfig::new(Scheme::MhcStatic, 1, c);
    let mut params = ConnectionParams::zeros(&mconfig);
    params.b_res[0] = 5.25;
    let mconn = HyperConnection::<f32>::new(mconfig, params).unwrap();
    let mut mws = Workspace::new(&mconfig, tokens);
    let coef = mconn.coefficients(&x32, &mut mws).unwrap().to_vec();
    let mut coef_ones = coef.clone();
    for t in 0..tokens {
        assert_eq!(coef[t * 3 + 2], 1.0, "SK of a 1×1 matrix is exactly 1");
        coef_ones[t * 3] = 1.0;
        coef_ones[t * 3 + 1] = 1.0;
    }
    let mut h = vec![0.0f32; x32.len()];
    pre_aggregate(1, c, &x32, &coef_ones, &mut h).unwrap();
    assert_eq!(h, x32);
    let mut y = vec![0.0f32; x32.len()];
    Square.forward(&h, &mut y).unwrap();
    let mut merged = vec![0.0f32; x32.len()];
    post_res_merge(1, c, &x32, &coef_ones, &y, &mut merged).unwrap();
    assert_eq!(
        merged.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        expect.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn default_initialisation_matches_design() {
    for n in [1usize, 2, 4, 8] {
        let c = 6;
        let config = ConnectionConfig::new(Scheme::MhcDynamic, n, c);
        let init = InitConfig::default();
        let conn = HyperConnection::<f64>::init(config, &init, &mut Rng::new(1)).unwrap();
        assert!(conn.params.alpha.iter().all(|&a| a == 0.01));
        // Streams start as n copies of the embedding: the aggregate equals one copy.
        let mut rng = Rng::new(2);
        let e = randn(&mut rng, c, 1.0);
        let x: Vec<f64> = (0..n).flat_map(|_| e.iter().copied()).collect();
        let mut ws = Workspace::new(&config, 1);
        let coef = conn.coefficients(&x, &mut ws).unwrap().to_vec();
        let expect_pre = if n >= 2 {
            1.0 / n as f64
        } else {
            init.single_stream_pre
        };
        for i in 0..n {
            // φ is small (std 0.02) and α = 0.01, so H̃ moves by ~1e-3 from its bias.
            assert!(
                (coef[i] - expect_pre).abs() < 5e-3,
                "n={n} H_pre[{i}] = {}",
                coef[i]
            );
            assert!((coef[n + i] - 1.0).abs() < 5e-3, "H_post = 1");
        }
        if n >= 2 {
            // Static SK of c·I is exactly the closed form.
            let sconfig = ConnectionConfig::new(Scheme::MhcStatic, n, c);
            let sconn = HyperConnection::<f64>::init(sconfig, &init, &mut Rng::new(1)).unwrap();
            let mut sws = Workspace::new(&sconfig, 1);
            let sc = sconn.coefficients(&x, &mut sws).unwrap();
            let bias = sconn.params.b_res[0];
            assert!((identity_bias_diagonal(bias, n) - 0.95).abs() < 1e-12);
            for o in 0..n {
                for i in 0..n {
                    let want = if o == i {
                        0.95
                    } else {
                        0.05 / (n as f64 - 1.0)
                    };
                    assert!((sc[2 * n + o * n + i] - want).abs() < 1e-12);
                }
            }
        }
    }
}

#[test]
fn amax_and_composite_gains() {
    let a = [1.0, -2.0, 0.5, 0.25];
    let g = amax_gain(&a, 2).unwrap();
    assert_eq!(g.forward, 3.0);
    assert_eq!(g.backward, 2.25);
    // Two tokens, two layers; composite of the second depth is H2·H1.
    let h1 = [1.0, 1.0, 0.0, 1.0, /* token 2 */ 1.0, 0.0, 0.0, 1.0];
    let h2 = [2.0, 0.0, 0.0, 1.0, /* token 2 */ 0.5, 0.0, 0.0, 0.5];
    let mut out = [CompositeGain::default(); 2];
    let mut scratch = vec![0.0; composite_gains_scratch_len(2)];
    composite_gains(&[&h1[..], &h2[..]], 2, &mut out, &mut scratch).unwrap();
    assert_eq!(out[0].forward_max, 2.0);
    assert_eq!(out[0].forward_mean, 1.5);
    assert_eq!(out[0].backward_max, 2.0);
    // H2·H1 for token 1 = [[2, 2], [0, 1]] → forward 4, backward 3; token 2 = 0.5·I → 0.5.
    assert_eq!(out[1].forward_max, 4.0);
    assert_eq!(out[1].forward_mean, 2.25);
    assert_eq!(out[1].backward_max, 3.0);
    assert_eq!(out[1].backward_mean, 1.75);
}

#[test]
fn bad_input_gives_typed_errors() {
    let mut rng = Rng::new(9);
    assert_eq!(
        ConnectionConfig::new(Scheme::MhcDynamic, 0, 4).validate(),
        Err(MhcError::ZeroStreams)
    );
    assert_eq!(
        ConnectionConfig::new(Scheme::MhcDynamic, 2, 0).validate(),
        Err(MhcError::ZeroWidth)
    );
    assert_eq!(
        ConnectionConfig::new(Scheme::Residual, 2, 4).validate(),
        Err(MhcError::ResidualNeedsOneStream { n: 2 })
    );
    let mut bad_iters = ConnectionConfig::new(Scheme::MhcDynamic, 2, 4);
    bad_iters.sinkhorn.iterations = 0;
    assert_eq!(bad_iters.validate(), Err(MhcError::ZeroIterations));
    assert!(HyperConnection::<f32>::init(bad_iters, &InitConfig::default(), &mut rng).is_err());

    let config = ConnectionConfig::new(Scheme::MhcDynamic, 2, 4);
    let mut conn = HyperConnection::<f64>::init(config, &InitConfig::default(), &mut rng).unwrap();
    let mut f = TanhLinear {
        c: 4,
        w: randn(&mut rng, 16, 0.5),
        grad_w: vec![0.0; 16],
    };
    let mut ws = Workspace::new(&config, 2);
    let x = randn(&mut rng, 16, 1.0);
    let mut out = vec![0.0; 16];
    assert_eq!(
        conn.forward(&mut f, &[], &mut [], &mut ws),
        Err(MhcError::EmptyBatch)
    );
    assert!(matches!(
        conn.forward(&mut f, &x[..15], &mut out[..15], &mut ws),
        Err(MhcError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        conn.forward(&mut f, &x, &mut out[..8], &mut ws),
        Err(MhcError::ShapeMismatch { .. })
    ));
    let big = randn(&mut rng, 24, 1.0);
    let mut big_out = vec![0.0; 24];
    assert_eq!(
        conn.forward(&mut f, &big, &mut big_out, &mut ws),
        Err(MhcError::WorkspaceTooSmall {
            tokens: 3,
            capacity: 2
        })
    );
    let mut nan_x = x.clone();
    nan_x[5] = f64::NAN;
    assert_eq!(
        conn.forward(&mut f, &nan_x, &mut out, &mut ws),
        Err(MhcError::NonFinite {
            what: "stream state x",
            index: 5
        })
    );
    // H_res of a token that was not in the batch is None, not a panic.
    let mut probe = Workspace::new(&config, 2);
    conn.forward(&mut f, &x, &mut out, &mut probe).unwrap();
    assert!(probe.h_res(1).is_some() && probe.h_res(2).is_none());
    // Backward before any forward.
    let mut gx = vec![0.0; 16];
    let mut grads = ConnectionParams::zeros(&config);
    let mut fresh = Workspace::new(&config, 2);
    assert_eq!(
        conn.backward(&mut f, &x, &x, &mut gx, &mut grads, &mut fresh),
        Err(MhcError::BackwardBeforeForward)
    );
    // A workspace for another n.
    let mut other = Workspace::new(&ConnectionConfig::new(Scheme::MhcDynamic, 4, 4), 4);
    assert!(matches!(
        conn.forward(&mut f, &x, &mut out, &mut other),
        Err(MhcError::ShapeMismatch { .. })
    ));
    // Non-finite parameter, named.
    conn.params.phi[3] = f64::INFINITY;
    assert_eq!(
        conn.forward(&mut f, &x, &mut out, &mut ws),
        Err(MhcError::NonFinite {
            what: "parameter phi",
            index: 3
        })
    );
    conn.params.phi.pop();
    assert!(matches!(
        conn.forward(&mut f, &x, &mut out, &mut ws),
        Err(MhcError::ShapeMismatch {
            what: "parameter phi",
            ..
        })
    ));
    // A sublayer producing NaN is caught.
    struct Broken;
    impl Sublayer<f64> for Broken {
        fn forward(&mut self, _: &[f64], y: &mut [f64]) -> Result<()> {
            y.iter_mut().for_each(|v| *v = f64::NAN);
            Ok(())
        }
        fn vjp(&mut self, _: &[f64], _: &[f64], _: &mut [f64]) -> Result<()> {
            Err(MhcError::Sublayer("no gradient".into()))
        }
    }
    let good = HyperConnection::<f64>::init(config, &InitConfig::default(), &mut rng).unwrap();
    assert_eq!(
        good.forward(&mut Broken, &x, &mut out, &mut ws),
        Err(MhcError::NonFinite {
            what: "sublayer output F(h)",
            index: 0
        })
    );
    // Every error renders a message.
    let msg = alloc::format!(
        "{}",
        MhcError::NonFinite {
            what: "parameter phi",
            index: 3
        }
    );
    assert!(msg.contains("phi") && msg.contains('3'));
}
