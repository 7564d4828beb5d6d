//! Every wgpu shader against mhc-core on random inputs (never zeros), for
//! n ∈ {1, 2, 3, 4, 8} and widths that are not multiples of the workgroup
//! size. Tolerances (f32 on both sides; the orders of summation differ):
//! Sinkhorn–Knopp forward 1e-5 absolute, backward 1e-4 + 1e-3 relative;
//! apply kernels 1e-5 + 1e-5 relative; wrapper forward 1e-5 + 1e-4 relative,
//! its gradients 1e-4 of the tensor's largest value + 1e-3 relative; model
//! kernels 1e-5 + 1e-4 relative (1e-4 of the scale for gradients).
//! Without an adapter every test prints `skipping: no wgpu adapter (...)`.

mod common;

use common::{assert_close, context, max_abs, random};
use mhc_core::apply;
use mhc_core::sinkhorn::sinkhorn_knopp_backward_scratch_len;
use mhc_core::{
    ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, MhcError, Rng, Scheme,
    SinkhornConfig, Sublayer, Workspace,
};
use mhc_gpu::{GpuError, GpuWrapper, ScaleSublayer, wrapper as gw};

#[test]
fn sinkhorn_forward_and_backward_match_the_core() {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(1);
    for n in [1usize, 2, 3, 4, 8] {
        for iterations in [1usize, 20] {
            let cfg = SinkhornConfig {
                iterations,
                eps: 1e-6,
            };
            let batch = 67; // more than one workgroup of 64, not a multiple
            let logits = random(&mut rng, batch * n * n, 2.0);
            let gout = random(&mut rng, batch * n * n, 1.0);
            let mut want = vec![0.0f32; logits.len()];
            mhc_core::sinkhorn_knopp(&logits, n, &cfg, &mut want).unwrap();
            let mut want_g = vec![0.0f32; logits.len()];
            let mut scratch = vec![0.0f32; sinkhorn_knopp_backward_scratch_len(n, iterations)];
            mhc_core::sinkhorn_knopp_backward(&logits, n, &cfg, &gout, &mut want_g, &mut scratch)
                .unwrap();
            let l = ctx.upload("logits", &logits).unwrap();
            let g = ctx.upload("gout", &gout).unwrap();
            let out = ctx.zeros("out", logits.len()).unwrap();
            let gl = ctx.zeros("gl", logits.len()).unwrap();
            gw::sinkhorn_knopp(&ctx, &l, n, batch, &cfg, &out).unwrap();
            gw::sinkhorn_knopp_backward(&ctx, &l, n, batch, &cfg, &g, &gl).unwrap();
            let what = format!("SK n={n} iters={iterations}");
            assert_close(
                &what,
                &ctx.read_f32_blocking(&out).unwrap(),
                &want,
                0.0,
                1e-5,
            );
            assert_close(
                &format!("{what} backward"),
                &ctx.read_f32_blocking(&gl).unwrap(),
                &want_g,
                1e-3,
                1e-4,
            );
        }
    }
}

#[test]
fn apply_kernels_match_the_core() {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(2);
    for n in [1usize, 2, 3, 4, 8] {
        for c in [1usize, 7, 65, 130] {
            let t = 3;
            let k = n * n + 2 * n;
            let x = random(&mut rng, t * n * c, 1.0);
            let coef = random(&mut rng, t * k, 0.7);
            let y = random(&mut rng, t * c, 1.0);
            let g = random(&mut rng, t * n * c, 1.0);
            let gh = random(&mut rng, t * c, 1.0);
            let mut h = vec![0.0; t * c];
            apply::pre_aggregate(n, c, &x, &coef, &mut h).unwrap();
            let mut out = vec![0.0; t * n * c];
            apply::post_res_merge(n, c, &x, &coef, &y, &mut out).unwrap();
            let (mut gx, mut gy, mut gc) = (
                vec![0.0; x.len()],
                vec![0.0; y.len()],
                vec![0.0; coef.len()],
            );
            apply::post_res_merge_backward(n, c, &x, &coef, &y, &g, &mut gx, &mut gy, &mut gc)
                .unwrap();
            apply::pre_aggregate_backward(n, c, &x, &coef, &gh, &mut gx, &mut gc).unwrap();

            let [xd, cd, yd, gd, ghd] =
                [&x, &coef, &y, &g, &gh].map(|v| ctx.upload("input", v).unwrap());
            let hd = ctx.zeros("h", t * c).unwrap();
            let od = ctx.zeros("out", t * n * c).unwrap();
            let (gxd, gyd, gcd) = (
                ctx.zeros("gx", x.len()).unwrap(),
                ctx.zeros("gy", y.len()).unwrap(),
                ctx.zeros("gc", coef.len()).unwrap(),
            );
            gw::pre_aggregate(&ctx, n, c, t, &xd, &cd, &hd).unwrap();
            gw::post_res_merge(&ctx, n, c, t, &xd, &cd, &yd, &od).unwrap();
            gw::post_res_merge_backward(&ctx, n, c, t, &xd, &cd, &yd, &gd, &gxd, &gyd, &gcd)
                .unwrap();
            gw::pre_aggregate_backward(&ctx, n, c, t, &xd, &cd, &ghd, &gxd, &gcd).unwrap();
            let w = format!("n={n} C={c}");
            let r = |b| ctx.read_f32_blocking(b).unwrap();
            assert_close(&format!("pre-aggregate {w}"), &r(&hd), &h, 1e-5, 1e-5);
            assert_close(&format!("post/res merge {w}"), &r(&od), &out, 1e-5, 1e-5);
            assert_close(&format!("grad x {w}"), &r(&gxd), &gx, 1e-5, 1e-5);
            assert_close(&format!("grad y {w}"), &r(&gyd), &gy, 1e-5, 1e-5);
            assert_close(&format!("grad coefficients {w}"), &r(&gcd), &gc, 1e-4, 1e-4);
        }
    }
}

/// F(h) = 1.5·h on the CPU (the GPU twin is [`ScaleSublayer`]).
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

/// Initialised parameters moved away from the initialisation (α = 0.01 would
/// hide the dynamic part), so every gradient path carries weight.
fn perturbed(config: &ConnectionConfig, rng: &mut Rng) -> ConnectionParams<f32> {
    let mut p = ConnectionParams::<f32>::init(config, &InitConfig::default(), rng);
    for (name, t) in p.tensors_mut() {
        let std = match name {
            "alpha" => 0.5,
            "phi" => 0.05,
            "theta_pre" | "theta_post" | "theta_res" => 0.3,
            _ => 0.3,
        };
        for v in t.iter_mut() {
            *v += (rng.normal() * std) as f32;
        }
    }
    p
}

#[test]
fn wrapper_forward_and_backward_match_the_core_for_every_scheme() {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(3);
    for scheme in Scheme::ALL {
        let ns: &[usize] = if scheme == Scheme::Residual {
            &[1]
        } else {
            &[1, 2, 4, 8]
        };
        for &n in ns {
            let (c, t) = (33usize, 5usize);
            let config = ConnectionConfig::new(scheme, n, c);
            let params = perturbed(&config, &mut rng);
            let conn = HyperConnection::new(config, params.clone()).unwrap();
            let x = random(&mut rng, t * n * c, 1.0);
            let gout = random(&mut rng, t * n * c, 1.0);
            let mut ws = Workspace::new(&config, t);
            let mut out = vec![0.0; x.len()];
            conn.forward(&mut Scale, &x, &mut out, &mut ws).unwrap();
            let coef = ws.coefficients().to_vec();
            let mut gx = vec![0.0; x.len()];
            let mut grads = ConnectionParams::zeros(&config);
            conn.backward(&mut Scale, &x, &gout, &mut gx, &mut grads, &mut ws)
                .unwrap();

            let mut wrapper = GpuWrapper::new(ctx.clone(), &config, &params, t).unwrap();
            let xd = ctx.upload("x", &x).unwrap();
            let gd = ctx.upload("gout", &gout).unwrap();
            let od = ctx.zeros("out", x.len()).unwrap();
            let gxd = ctx.zeros("gx", x.len()).unwrap();
            let mut f = ScaleSublayer {
                factor: 1.5,
                width: c,
            };
            wrapper.forward(&mut f, &xd, &od, t).unwrap();
            wrapper.backward(&mut f, &xd, &gd, &gxd, t).unwrap();
            let w = format!("{scheme} n={n}");
            let coef_gpu = pollster::block_on(wrapper.coefficients_host()).unwrap();
            assert_close(&format!("coefficients {w}"), &coef_gpu, &coef, 1e-4, 1e-5);
            assert_close(
                &format!("forward {w}"),
                &ctx.read_f32_blocking(&od).unwrap(),
                &out,
                1e-4,
                1e-5,
            );
            let gxs = max_abs(&gx);
            assert_close(
                &format!("grad x {w}"),
                &ctx.read_f32_blocking(&gxd).unwrap(),
                &gx,
                1e-3,
                1e-4 * gxs,
            );
            let got = pollster::block_on(wrapper.gradients()).unwrap();
            for ((name, g), (_, want)) in got.tensors().into_iter().zip(grads.tensors()) {
                assert_close(
                    &format!("grad {name} {w}"),
                    g,
                    want,
                    1e-3,
                    1e-4 * max_abs(want).max(1e-3),
                );
            }
            if scheme != Scheme::Residual {
                assert!(
                    grads.b_pre.iter().any(|v| *v != 0.0),
                    "{w}: the test must exercise the gradient"
                );
            }
        }
    }
}

#[test]
fn wrapper_n1_residual_is_x_plus_f_bit_for_bit() {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(4);
    let (c, t) = (70usize, 3usize);
    let config = ConnectionConfig::new(Scheme::Residual, 1, c);
    let params = ConnectionParams::<f32>::zeros(&config);
    let mut wrapper = GpuWrapper::new(ctx.clone(), &config, &params, t).unwrap();
    let x = random(&mut rng, t * c, 1.0);
    let xd = ctx.upload("x", &x).unwrap();
    let od = ctx.zeros("out", x.len()).unwrap();
    let mut f = ScaleSublayer {
        factor: 1.5,
        width: c,
    };
    wrapper.forward(&mut f, &xd, &od, t).unwrap();
    let out = ctx.read_f32_blocking(&od).unwrap();
    for (o, x) in out.iter().zip(&x) {
        assert_eq!(*o, x + 1.5 * x);
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    let Some(ctx) = context() else { return };
    let p = ConnectionParams::<f32>::default();
    let zero = ConnectionConfig::new(Scheme::MhcDynamic, 0, 4);
    assert!(matches!(
        GpuWrapper::new(ctx.clone(), &zero, &p, 1),
        Err(GpuError::Core(MhcError::ZeroStreams))
    ));
    let nine = ConnectionConfig::new(Scheme::MhcDynamic, 9, 4);
    let p9 = ConnectionParams::<f32>::zeros(&nine);
    let e = GpuWrapper::new(ctx.clone(), &nine, &p9, 1).err().unwrap();
    assert!(matches!(e, GpuError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("1 ≤ n ≤ 8"), "{e}");
    let mut long = ConnectionConfig::new(Scheme::MhcDynamic, 8, 4);
    long.sinkhorn.iterations = 40;
    let pl = ConnectionParams::<f32>::zeros(&long);
    assert!(matches!(
        GpuWrapper::new(ctx.clone(), &long, &pl, 1),
        Err(GpuError::Unsupported(_))
    ));
    let cfg = ConnectionConfig::new(Scheme::MhcDynamic, 2, 4);
    let good = ConnectionParams::<f32>::init(&cfg, &InitConfig::default(), &mut Rng::new(0));
    let wrong = ConnectionParams::<f32>::zeros(&ConnectionConfig::new(Scheme::MhcDynamic, 2, 5));
    assert!(matches!(
        GpuWrapper::new(ctx.clone(), &cfg, &wrong, 1),
        Err(GpuError::Core(MhcError::ShapeMismatch { .. }))
    ));
    let mut w = GpuWrapper::new(ctx.clone(), &cfg, &good, 2).unwrap();
    let small = ctx.zeros("x", 3).unwrap();
    let out = ctx.zeros("out", 16).unwrap();
    let mut f = ScaleSublayer {
        factor: 1.0,
        width: 4,
    };
    assert!(matches!(
        w.forward(&mut f, &small, &out, 2),
        Err(GpuError::Shape { .. })
    ));
    assert!(matches!(
        w.forward(&mut f, &out, &out, 3),
        Err(GpuError::Core(MhcError::WorkspaceTooSmall { .. }))
    ));
    assert!(matches!(
        w.backward(&mut f, &out, &out, &out, 2),
        Err(GpuError::Core(MhcError::BackwardBeforeForward))
    ));
    // A buffer over the device's binding limit is refused before allocation.
    let limit = ctx.limits().max_storage_buffer_binding_size as usize;
    let e = ctx.zeros("huge", limit / 4 + 1).err().unwrap();
    assert!(matches!(e, GpuError::LimitExceeded { .. }), "{e}");
    assert!(e.to_string().contains("fewer tokens"), "{e}");
}
