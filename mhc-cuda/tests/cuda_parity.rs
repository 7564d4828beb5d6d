//! Parity of the CUDA kernels with mhc-core (its f64 path is the reference),
//! on random inputs (never zeros), for n ∈ {1, 2, 3, 4, 5, 8}, two widths and both
//! stream dtypes. Skips with a message when no CUDA driver is present.
//!
//! Tolerances (relative L2 error ‖gpu − ref‖ / ‖ref‖, per tensor):
//! f32 streams 1e-4 (f32 arithmetic, different summation order);
//! bf16 streams 2e-2 (inputs, `h`, `y`, `dy` and outputs rounded to bf16,
//! 8 mantissa bits; gradients summed over tokens of rounded values).
//! Output buffers are poisoned with NaN first, so an unwritten element fails.

use std::sync::Arc;

use mhc_core::{
    ConnectionConfig, ConnectionParams, HyperConnection, Result as CoreResult, Rng, Scheme,
    Sublayer, Workspace,
};
use mhc_cuda::cuda::{CudaDevice, CudaError, HcCuda, MhcCuda, ScaleSublayer, StreamElement};

fn device() -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(0) {
        Ok(d) => Some(Arc::new(d)),
        Err(CudaError::NoDriver(m)) => {
            eprintln!("skipping CUDA parity test: {m}");
            None
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    }
}

struct Scale64(f64);
impl Sublayer<f64> for Scale64 {
    fn forward(&mut self, h: &[f64], y: &mut [f64]) -> CoreResult<()> {
        y.iter_mut().zip(h).for_each(|(y, h)| *y = self.0 * h);
        Ok(())
    }
    fn vjp(&mut self, _: &[f64], gy: &[f64], gh: &mut [f64]) -> CoreResult<()> {
        gh.iter_mut().zip(gy).for_each(|(g, gy)| *g = self.0 * gy);
        Ok(())
    }
}

fn rel_l2(what: &str, gpu: &[f32], reference: &[f64], tol: f64) {
    assert_eq!(gpu.len(), reference.len(), "{what}: length");
    assert!(
        gpu.iter().all(|v| v.is_finite()),
        "{what}: non-finite or unwritten element"
    );
    let num: f64 = gpu
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| b * b).sum::<f64>().max(1e-30);
    let err = (num / den).sqrt();
    assert!(err <= tol, "{what}: relative L2 error {err:.3e} > {tol:e}");
}

fn random_params(config: &ConnectionConfig, rng: &mut Rng) -> ConnectionParams<f32> {
    let mut p = ConnectionParams::<f32>::zeros(config);
    let nc = (config.n * config.width) as f64;
    for (name, t) in p.tensors_mut() {
        for v in t.iter_mut() {
            *v = match name {
                "alpha" => 0.5 + rng.uniform(),
                "gamma" => 1.0 + 0.1 * rng.normal(),
                "phi" => rng.normal() / nc.sqrt(),
                "theta_pre" | "theta_post" | "theta_res" => {
                    rng.normal() / (config.width as f64).sqrt()
                }
                _ => rng.normal(),
            } as f32;
        }
    }
    p
}

fn check<S: StreamElement>(
    dev: &Arc<CudaDevice>,
    n: usize,
    c: usize,
    tokens: usize,
    tol: f64,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let config = ConnectionConfig::new(Scheme::MhcDynamic, n, c);
    let params = random_params(&config, &mut rng);
    let x_host: Vec<S> = (0..tokens * n * c)
        .map(|_| S::from_f32(rng.normal() as f32))
        .collect();
    let g_host: Vec<S> = (0..tokens * n * c)
        .map(|_| S::from_f32(rng.normal() as f32))
        .collect();

    // GPU.
    let st = dev.stream().clone();
    let x = st.clone_htod(&x_host).unwrap();
    let g = st.clone_htod(&g_host).unwrap();
    let poison = vec![S::from_f32(f32::NAN); x_host.len()];
    let mut out = st.clone_htod(&poison).unwrap();
    let mut gx = st.clone_htod(&poison).unwrap();
    let mut sub = ScaleSublayer { factor: 1.5, n };
    let mut gpu = MhcCuda::<S>::new(dev.clone(), &config, &params, tokens, false).unwrap();
    // The parameters as uploaded come back unchanged (the device layouts round-trip).
    assert_eq!(
        gpu.params(&config).unwrap(),
        params,
        "mHC n={n}: parameters round trip"
    );
    gpu.forward(&mut sub, &x, &mut out).unwrap();
    gpu.backward(&mut sub, &x, &g, &mut gx).unwrap();
    let out_h: Vec<f32> = st
        .clone_dtoh(&out)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let gx_h: Vec<f32> = st
        .clone_dtoh(&gx)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let coef = gpu.coefficients_host().unwrap();
    let h_gpu: Vec<f32> = gpu
        .sublayer_input_host()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let grads = gpu.gradients(&config).unwrap();

    // Reference: mhc-core in f64 on the same (rounded) inputs.
    let p64 = params.cast::<f64>();
    let conn = HyperConnection::new(config, p64).unwrap();
    let x64: Vec<f64> = x_host.iter().map(|v| v.to_f32() as f64).collect();
    let g64: Vec<f64> = g_host.iter().map(|v| v.to_f32() as f64).collect();
    let mut ws = Workspace::new(&config, tokens);
    let mut out64 = vec![0.0; x64.len()];
    conn.forward(&mut Scale64(1.5), &x64, &mut out64, &mut ws)
        .unwrap();
    let coef64 = ws.coefficients().to_vec();
    let h64 = ws.sublayer_input().to_vec();
    let mut gx64 = vec![0.0; x64.len()];
    let mut grads64 = ConnectionParams::zeros(&config);
    conn.backward(
        &mut Scale64(1.5),
        &x64,
        &g64,
        &mut gx64,
        &mut grads64,
        &mut ws,
    )
    .unwrap();

    let label = format!("{} n={n} C={c} T={tokens}", S::NAME);
    // Coefficients are f32 in both dtypes (computed from the same stored x).
    rel_l2(
        &format!("{label} coefficients (coeff_fwd)"),
        &coef,
        &coef64,
        1e-4,
    );
    rel_l2(&format!("{label} h (pre_fwd)"), &h_gpu, &h64, tol);
    rel_l2(&format!("{label} out (post_fwd)"), &out_h, &out64, tol);
    rel_l2(
        &format!("{label} grad_x (post_bwd, pre_bwd, coeff_bwd, dx_dphi)"),
        &gx_h,
        &gx64,
        tol,
    );
    for ((name, a), (_, b)) in grads.tensors().iter().zip(grads64.tensors().iter()) {
        if !b.is_empty() {
            rel_l2(
                &format!("{label} grad {name} (dphi_reduce / token_reduce)"),
                a,
                b,
                tol,
            );
        }
    }

    // Deterministic: the same call gives the same bits; recompute mode gives the same bits too.
    let first = (gx_h.clone(), grads.phi.clone(), grads.b_res.clone());
    gpu.forward(&mut sub, &x, &mut out).unwrap();
    gpu.backward(&mut sub, &x, &g, &mut gx).unwrap();
    let again: Vec<f32> = st
        .clone_dtoh(&gx)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let grads2 = gpu.gradients(&config).unwrap();
    assert_eq!(
        first,
        (again, grads2.phi, grads2.b_res),
        "{label}: deterministic"
    );
    let mut gpu_rc = MhcCuda::<S>::new(dev.clone(), &config, &params, tokens, true).unwrap();
    let mut gx_rc = st.clone_htod(&poison).unwrap();
    gpu_rc.forward(&mut sub, &x, &mut out).unwrap();
    gpu_rc.backward(&mut sub, &x, &g, &mut gx_rc).unwrap();
    let rc: Vec<f32> = st
        .clone_dtoh(&gx_rc)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(
        first.0, rc,
        "{label}: recompute mode equals stored mode bit for bit"
    );
}

#[test]
fn kernels_match_mhc_core_f32() {
    let Some(dev) = device() else { return };
    eprintln!("CUDA device: {}", dev.name());
    for n in [1usize, 2, 3, 4, 5, 8] {
        for c in [64usize, 260] {
            check::<f32>(&dev, n, c, 77, 1e-4, 10 * n as u64 + c as u64);
        }
    }
    check::<f32>(&dev, 4, 1024, 300, 1e-4, 99);
}

#[test]
fn kernels_match_mhc_core_bf16() {
    let Some(dev) = device() else { return };
    for n in [1usize, 2, 3, 4, 5, 8] {
        for c in [64usize, 260] {
            check::<half::bf16>(&dev, n, c, 77, 2e-2, 20 * n as u64 + c as u64);
        }
    }
    check::<half::bf16>(&dev, 4, 4096, 300, 2e-2, 98);
}

/// Dynamic HC (the unconstrained baseline) on the GPU against the core in f64.
#[test]
fn hc_kernels_match_mhc_core_f32() {
    let Some(dev) = device() else { return };
    for (n, c, tokens) in [
        (1usize, 64usize, 37usize),
        (2, 68, 77),
        (4, 64, 77),
        (4, 260, 50),
        (8, 64, 33),
    ] {
        let mut rng = Rng::new(500 + 10 * n as u64 + c as u64);
        let config = ConnectionConfig::new(Scheme::HcDynamic, n, c);
        let params = random_params(&config, &mut rng);
        let x_host: Vec<f32> = (0..tokens * n * c).map(|_| rng.normal() as f32).collect();
        let g_host: Vec<f32> = (0..tokens * n * c).map(|_| rng.normal() as f32).collect();
        let st = dev.stream().clone();
        let x = st.clone_htod(&x_host).unwrap();
        let g = st.clone_htod(&g_host).unwrap();
        let poison = vec![f32::NAN; x_host.len()];
        let mut out = st.clone_htod(&poison).unwrap();
        let mut gx = st.clone_htod(&poison).unwrap();
        let mut sub = ScaleSublayer { factor: 1.5, n };
        let mut gpu = HcCuda::new(dev.clone(), &config, &params, tokens).unwrap();
        assert_eq!(
            gpu.params(&config).unwrap(),
            params,
            "HC n={n}: parameters round trip"
        );
        gpu.forward(&mut sub, &x, &mut out).unwrap();
        gpu.backward(&mut sub, &x, &g, &mut gx).unwrap();
        let out_h = st.clone_dtoh(&out).unwrap();
        let gx_h = st.clone_dtoh(&gx).unwrap();
        let coef = gpu.coefficients_host().unwrap();
        let grads = gpu.gradients(&config).unwrap();

        let conn = HyperConnection::new(config, params.cast::<f64>()).unwrap();
        let x64: Vec<f64> = x_host.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = g_host.iter().map(|&v| v as f64).collect();
        let mut ws = Workspace::new(&config, tokens);
        let mut out64 = vec![0.0; x64.len()];
        conn.forward(&mut Scale64(1.5), &x64, &mut out64, &mut ws)
            .unwrap();
        let coef64 = ws.coefficients().to_vec();
        let mut gx64 = vec![0.0; x64.len()];
        let mut grads64 = ConnectionParams::zeros(&config);
        conn.backward(
            &mut Scale64(1.5),
            &x64,
            &g64,
            &mut gx64,
            &mut grads64,
            &mut ws,
        )
        .unwrap();
        let label = format!("hc n={n} C={c} T={tokens}");
        rel_l2(&format!("{label} coefficients"), &coef, &coef64, 1e-4);
        rel_l2(&format!("{label} out"), &out_h, &out64, 1e-4);
        rel_l2(&format!("{label} grad_x"), &gx_h, &gx64, 1e-4);
        for ((name, a), (_, b)) in grads.tensors().iter().zip(grads64.tensors().iter()) {
            if !b.is_empty() {
                rel_l2(&format!("{label} grad {name}"), a, b, 1e-4);
            }
        }
    }
}

#[test]
fn limits_give_typed_errors() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(1);
    let too_many = ConnectionConfig::new(Scheme::MhcDynamic, 9, 8);
    let p = random_params(&too_many, &mut rng);
    assert!(matches!(
        MhcCuda::<f32>::new(dev.clone(), &too_many, &p, 4, false),
        Err(CudaError::Unsupported(_))
    ));
    let odd = ConnectionConfig::new(Scheme::MhcDynamic, 4, 6);
    let p = random_params(&odd, &mut rng);
    assert!(matches!(
        MhcCuda::<f32>::new(dev.clone(), &odd, &p, 4, false),
        Err(CudaError::Unsupported(_))
    ));
    let hc = ConnectionConfig::new(Scheme::HcDynamic, 4, 8);
    let p = ConnectionParams::zeros(&hc);
    assert!(matches!(
        MhcCuda::<f32>::new(dev.clone(), &hc, &p, 4, false),
        Err(CudaError::Unsupported(_))
    ));
    // Too many tokens for the buffers, and backward before forward.
    let ok = ConnectionConfig::new(Scheme::MhcDynamic, 4, 8);
    let p = random_params(&ok, &mut rng);
    let mut gpu = MhcCuda::<f32>::new(dev.clone(), &ok, &p, 2, false).unwrap();
    let st = dev.stream().clone();
    let x = st.clone_htod(&vec![1.0f32; 3 * 32]).unwrap();
    let mut out = st.clone_htod(&vec![0.0f32; 3 * 32]).unwrap();
    let mut sub = ScaleSublayer { factor: 1.5, n: 4 };
    assert!(matches!(
        gpu.forward(&mut sub, &x, &mut out),
        Err(CudaError::Core(
            mhc_core::MhcError::WorkspaceTooSmall { .. }
        ))
    ));
    let x2 = st.clone_htod(&vec![1.0f32; 2 * 32]).unwrap();
    let mut g2 = st.clone_htod(&vec![0.0f32; 2 * 32]).unwrap();
    assert!(matches!(
        gpu.backward(&mut sub, &x2, &x2, &mut g2),
        Err(CudaError::Core(mhc_core::MhcError::BackwardBeforeForward))
    ));
    // Parameters or packed tensors of the wrong shape.
    let mut short = p.clone();
    short.b_res.pop();
    assert!(matches!(
        gpu.set_params(&short),
        Err(CudaError::Shape { what: "b_res", .. })
    ));
    let mut packed = gpu.pack(&p).unwrap();
    packed[1].push(0.0);
    assert!(matches!(
        gpu.unpack(&ok, &packed),
        Err(CudaError::Shape { .. })
    ));
}
