//! Golden vectors from an independent implementation: `tests/reference/golden.py`
//! (PyTorch float64 autograd) wrote `golden.json`; mhc-core must reproduce
//! every forward value and every gradient.
//!
//! Tolerance (stated in tests/reference/README.md): f64 within
//! `1e-10 · max(|golden|, 1)` per element; the f32 path within
//! `2e-4 · max(|golden|, 1)` (single precision through 20 SK iterations).

use mhc_core::{
    ConnectionConfig, ConnectionParams, HyperConnection, Real, Scheme, SinkhornConfig, Workspace,
    sinkhorn::sinkhorn_knopp_backward_scratch_len, sinkhorn_knopp, sinkhorn_knopp_backward,
};
use mhc_tests::TanhLinear;
use serde_json::Value;

fn golden() -> Value {
    let text = include_str!("../reference/golden.json");
    serde_json::from_str(text).expect("tests/reference/golden.json parses")
}

fn arr<T: Real>(case: &Value, key: &str) -> Vec<T> {
    case[key]
        .as_array()
        .unwrap_or_else(|| panic!("golden case lacks '{key}'"))
        .iter()
        .map(|v| T::of(v.as_f64().expect("number")))
        .collect()
}

fn num(case: &Value, key: &str) -> f64 {
    case[key]
        .as_f64()
        .unwrap_or_else(|| panic!("golden case lacks '{key}'"))
}

fn close<T: Real>(what: &str, got: &[T], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g.as_f64() - w).abs();
        assert!(
            err <= tol * w.abs().max(1.0),
            "{what}[{k}]: got {g}, golden {w} (err {err:e})"
        );
    }
}

fn check_sinkhorn<T: Real>(tol: f64) {
    let g = golden();
    let cases = g["sinkhorn"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for (ci, case) in cases.iter().enumerate() {
        let n = num(case, "n") as usize;
        let cfg = SinkhornConfig {
            iterations: num(case, "iters") as usize,
            eps: num(case, "eps"),
        };
        let logits = arr::<T>(case, "logits");
        let mut out = vec![T::zero(); logits.len()];
        sinkhorn_knopp(&logits, n, &cfg, &mut out).unwrap();
        close(
            &format!("sinkhorn case {ci} (n={n}) output"),
            &out,
            &arr::<f64>(case, "output"),
            tol,
        );
        let mut grad = vec![T::zero(); logits.len()];
        let mut scratch = vec![T::zero(); sinkhorn_knopp_backward_scratch_len(n, cfg.iterations)];
        sinkhorn_knopp_backward(
            &logits,
            n,
            &cfg,
            &arr::<T>(case, "grad_output"),
            &mut grad,
            &mut scratch,
        )
        .unwrap();
        close(
            &format!("sinkhorn case {ci} (n={n}) grad_logits"),
            &grad,
            &arr::<f64>(case, "grad_logits"),
            tol,
        );
    }
}

fn check_wrapper<T: Real>(section: &str, scheme: Scheme, tensors: usize, tol: f64) {
    let g = golden();
    let cases = g[section].as_array().unwrap();
    assert!(!cases.is_empty());
    for (ci, case) in cases.iter().enumerate() {
        let (n, c, tokens) = (
            num(case, "n") as usize,
            num(case, "c") as usize,
            num(case, "tokens") as usize,
        );
        let mut config = ConnectionConfig::new(scheme, n, c);
        config.rms_eps = num(case, "eps_rms");
        if scheme == Scheme::MhcDynamic {
            config.sinkhorn = SinkhornConfig {
                iterations: num(case, "iters") as usize,
                eps: num(case, "eps"),
            };
        }
        let mut params = ConnectionParams::<T>::zeros(&config);
        for (name, t) in params.tensors_mut() {
            if !t.is_empty() {
                *t = arr(case, name);
            }
        }
        let conn = HyperConnection::new(config, params).unwrap();
        let mut f = TanhLinear::new(c, arr::<T>(case, "w"));
        let x = arr::<T>(case, "x");
        let mut ws = Workspace::new(&config, tokens);
        let mut out = vec![T::zero(); x.len()];
        conn.forward(&mut f, &x, &mut out, &mut ws).unwrap();
        let label = format!("{section} case {ci} (n={n}, C={c})");
        close(&format!("{label} out"), &out, &arr::<f64>(case, "out"), tol);
        let k = config.coefficient_len();
        let coef = ws.coefficients();
        let pick = |lo: usize, hi: usize| -> Vec<T> {
            (0..tokens)
                .flat_map(|t| coef[t * k + lo..t * k + hi].to_vec())
                .collect()
        };
        close(
            &format!("{label} h_pre"),
            &pick(0, n),
            &arr::<f64>(case, "h_pre"),
            tol,
        );
        close(
            &format!("{label} h_post"),
            &pick(n, 2 * n),
            &arr::<f64>(case, "h_post"),
            tol,
        );
        close(
            &format!("{label} h_res"),
            &pick(2 * n, k),
            &arr::<f64>(case, "h_res"),
            tol,
        );

        let mut grad_x = vec![T::zero(); x.len()];
        let mut grads = ConnectionParams::zeros(&config);
        conn.backward(
            &mut f,
            &x,
            &arr::<T>(case, "grad_out"),
            &mut grad_x,
            &mut grads,
            &mut ws,
        )
        .unwrap();
        close(
            &format!("{label} grad_x"),
            &grad_x,
            &arr::<f64>(case, "grad_x"),
            tol,
        );
        close(
            &format!("{label} grad_w"),
            &f.grad_w,
            &arr::<f64>(case, "grad_w"),
            tol,
        );
        let mut compared = 0;
        for (name, t) in grads.tensors() {
            if !t.is_empty() {
                close(
                    &format!("{label} grad_{name}"),
                    t,
                    &arr::<f64>(case, &format!("grad_{name}")),
                    tol,
                );
                compared += 1;
            }
        }
        assert_eq!(
            compared, tensors,
            "{label}: every parameter gradient compared"
        );
    }
}

#[test]
fn sinkhorn_matches_pytorch_f64() {
    check_sinkhorn::<f64>(1e-10);
}

#[test]
fn sinkhorn_matches_pytorch_f32() {
    check_sinkhorn::<f32>(2e-4);
}

#[test]
fn mhc_wrapper_matches_pytorch_f64() {
    check_wrapper::<f64>("mhc", Scheme::MhcDynamic, 6, 1e-10);
}

#[test]
fn mhc_wrapper_matches_pytorch_f32() {
    check_wrapper::<f32>("mhc", Scheme::MhcDynamic, 6, 2e-4);
}

#[test]
fn hc_wrapper_matches_pytorch_f64() {
    check_wrapper::<f64>("hc", Scheme::HcDynamic, 7, 1e-10);
}

#[test]
fn hc_wrapper_matches_pytorch_f32() {
    check_wrapper::<f32>("hc", Scheme::HcDynamic, 7, 2e-4);
}
