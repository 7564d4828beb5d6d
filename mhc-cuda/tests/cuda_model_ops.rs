//! Parity of the CUDA model kernels with mhc-core's reference operations, on
//! random inputs (never zeros). Skips with a message when no CUDA driver is
//! present. Tolerance: relative L2 error ≤ 1e-5 (f32 on both sides; the
//! reductions differ only in summation order). Outputs are poisoned first.

use std::sync::Arc;

use mhc_core::Rng;
use mhc_core::model::ops;
use mhc_core::model::optim::{AdamW, AdamWConfig};
use mhc_cuda::cuda::{CudaDevice, CudaError, GemmPrecision, MatMul, ModelKernels};

fn device() -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(0) {
        Ok(d) => Some(Arc::new(d)),
        Err(CudaError::NoDriver(m)) => {
            eprintln!("skipping CUDA model-ops test: {m}");
            None
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    }
}

fn h16_out(
    st: &Arc<cudarc::driver::CudaStream>,
    len: usize,
) -> cudarc::driver::CudaSlice<half::bf16> {
    st.alloc_zeros(len).unwrap()
}

fn randn(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * std) as f32).collect()
}

fn rel_l2(what: &str, gpu: &[f32], reference: &[f32], tol: f64) {
    assert_eq!(gpu.len(), reference.len(), "{what}: length");
    assert!(
        gpu.iter().all(|v| v.is_finite()),
        "{what}: non-finite or unwritten element"
    );
    let num: f64 = gpu
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = reference
        .iter()
        .map(|&b| (b as f64).powi(2))
        .sum::<f64>()
        .max(1e-30);
    let err = (num / den).sqrt();
    assert!(err <= tol, "{what}: relative L2 error {err:.3e} > {tol:e}");
}

#[test]
fn model_kernels_match_mhc_core() {
    let Some(dev) = device() else { return };
    let k = ModelKernels::new(dev.clone()).unwrap();
    let st = dev.stream().clone();
    let mut rng = Rng::new(5);
    // Widths of 4k (vector path) and not (c = 30: the scalar path); rows not a multiple of 8.
    for (rows, c) in [(7usize, 64usize), (33, 260), (128, 768), (9, 30)] {
        // RMSNorm forward and backward.
        let x = randn(&mut rng, rows * c, 1.5);
        let w: Vec<f32> = (0..c).map(|_| 1.0 + 0.2 * rng.normal() as f32).collect();
        let dy = randn(&mut rng, rows * c, 1.0);
        let (mut y_ref, mut inv_ref) = (vec![0.0f32; rows * c], vec![0.0f32; rows]);
        ops::rmsnorm(&x, &w, 1e-6, &mut y_ref, &mut inv_ref);
        let (mut dx_ref, mut dw_ref) = (vec![0.0f32; rows * c], vec![0.0f32; c]);
        ops::rmsnorm_backward(&x, &w, &inv_ref, &dy, &mut dx_ref, &mut dw_ref);
        let (xd, wd, dyd) = (
            st.clone_htod(&x).unwrap(),
            st.clone_htod(&w).unwrap(),
            st.clone_htod(&dy).unwrap(),
        );
        let mut yd = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        let mut invd = st.clone_htod(&vec![f32::NAN; rows]).unwrap();
        k.rmsnorm(&xd, &wd, rows, c, 1e-6, &mut yd, &mut invd)
            .unwrap();
        rel_l2("rmsnorm y", &st.clone_dtoh(&yd).unwrap(), &y_ref, 1e-5);
        rel_l2(
            "rmsnorm 1/rms",
            &st.clone_dtoh(&invd).unwrap(),
            &inv_ref,
            1e-5,
        );
        let mut dxd = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        let mut dwd = st.clone_htod(&vec![0.0f32; c]).unwrap();
        k.rmsnorm_backward(&xd, &wd, &invd, &dyd, rows, c, &mut dxd, &mut dwd)
            .unwrap();
        rel_l2("rmsnorm dx", &st.clone_dtoh(&dxd).unwrap(), &dx_ref, 1e-5);
        rel_l2("rmsnorm dw", &st.clone_dtoh(&dwd).unwrap(), &dw_ref, 1e-5);

        // GELU forward and backward.
        let u = randn(&mut rng, rows * c, 2.0);
        let da = randn(&mut rng, rows * c, 1.0);
        let a_ref: Vec<f32> = u.iter().map(|&v| ops::gelu(v)).collect();
        let du_ref: Vec<f32> = u
            .iter()
            .zip(&da)
            .map(|(&v, &g)| g * ops::gelu_grad(v))
            .collect();
        let (ud, dad) = (st.clone_htod(&u).unwrap(), st.clone_htod(&da).unwrap());
        let mut ad = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        let mut dud = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        k.gelu(&ud, &mut ad).unwrap();
        k.gelu_backward(&ud, &dad, &mut dud).unwrap();
        rel_l2("gelu", &st.clone_dtoh(&ad).unwrap(), &a_ref, 1e-5);
        rel_l2(
            "gelu backward",
            &st.clone_dtoh(&dud).unwrap(),
            &du_ref,
            1e-5,
        );

        // The _bf16 twins write exactly the f32 results rounded to nearest even.
        let bits = |v: Vec<half::bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let round = |v: Vec<f32>| {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect::<Vec<_>>()
        };
        let mut h16 = st.alloc_zeros::<half::bf16>(rows * c).unwrap();
        let mut inv16 = st.clone_htod(&vec![f32::NAN; rows]).unwrap();
        k.rmsnorm_bf16(&xd, &wd, rows, c, 1e-6, &mut h16, &mut inv16)
            .unwrap();
        assert_eq!(
            bits(st.clone_dtoh(&h16).unwrap()),
            round(st.clone_dtoh(&yd).unwrap())
        );
        assert_eq!(
            st.clone_dtoh(&inv16).unwrap(),
            st.clone_dtoh(&invd).unwrap()
        );
        k.gelu_bf16(&ud, &mut h16).unwrap();
        assert_eq!(
            bits(st.clone_dtoh(&h16).unwrap()),
            round(st.clone_dtoh(&ad).unwrap())
        );
        k.gelu_backward_bf16(&ud, &dad, &mut h16).unwrap();
        assert_eq!(
            bits(st.clone_dtoh(&h16).unwrap()),
            round(st.clone_dtoh(&dud).unwrap())
        );

        // Cross-entropy (vocab = c here) and its gradient.
        let logits = randn(&mut rng, rows * c, 3.0);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(c as u64) as u32).collect();
        let mut grad_ref = logits.clone();
        let loss_ref = ops::cross_entropy(&mut grad_ref, &targets, c);
        let mut ld = st.clone_htod(&logits).unwrap();
        let td = st.clone_htod(&targets).unwrap();
        let mut lossd = st.clone_htod(&vec![f32::NAN; rows]).unwrap();
        k.cross_entropy(&mut ld, &td, rows, c, &mut lossd).unwrap();
        let rows_loss: Vec<f32> = st.clone_dtoh(&lossd).unwrap();
        let mean = rows_loss.iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
        assert!(
            (mean - loss_ref as f64).abs() <= 1e-5 * (loss_ref as f64).abs().max(1.0),
            "loss {mean} vs {loss_ref}"
        );
        rel_l2(
            "cross-entropy gradient",
            &st.clone_dtoh(&ld).unwrap(),
            &grad_ref,
            1e-5,
        );
        let bad = st.clone_htod(&vec![c as u32; rows]).unwrap();
        assert!(matches!(
            k.cross_entropy(&mut ld, &bad, rows, c, &mut lossd),
            Err(CudaError::Core(_))
        ));

        // AdamW, three steps with decay and clipping scale, against the core's optimiser.
        let cfg = AdamWConfig::default();
        let mut w_ref = randn(&mut rng, rows * c, 0.5);
        let mut opt = AdamW::<f32>::new(cfg, [w_ref.len()]);
        let mut wd2 = st.clone_htod(&w_ref).unwrap();
        let mut md = st.alloc_zeros::<f32>(w_ref.len()).unwrap();
        let mut vd = st.alloc_zeros::<f32>(w_ref.len()).unwrap();
        // The bf16 twin on the same inputs: identical f32 state, plus the rounded weights.
        let mut wb = st.clone_htod(&w_ref).unwrap();
        let mut wb16 = st.alloc_zeros::<half::bf16>(w_ref.len()).unwrap();
        let mut mb = st.alloc_zeros::<f32>(w_ref.len()).unwrap();
        let mut vb = st.alloc_zeros::<f32>(w_ref.len()).unwrap();
        for step in 1..=3u64 {
            let g = randn(&mut rng, w_ref.len(), 1.0);
            let scale = 0.7f32;
            let scaled: Vec<f32> = g.iter().map(|v| v * scale).collect();
            opt.begin_step();
            opt.update(0, &mut w_ref, &scaled, 1e-2, true);
            let gd = st.clone_htod(&g).unwrap();
            k.adamw(
                &mut wd2, &gd, &mut md, &mut vd, &cfg, 1e-2, step, true, scale,
            )
            .unwrap();
            k.adamw_with(
                &mut wb,
                Some(&mut wb16),
                &gd,
                &mut mb,
                &mut vb,
                &cfg,
                1e-2,
                step,
                true,
                scale,
            )
            .unwrap();
        }
        rel_l2("adamw weights", &st.clone_dtoh(&wd2).unwrap(), &w_ref, 1e-5);
        let w_new = st.clone_dtoh(&wd2).unwrap();
        assert!(
            w_new == st.clone_dtoh(&wb).unwrap(),
            "adamw_with(bf16) weights differ from adamw"
        );
        assert!(st.clone_dtoh(&mb).unwrap() == st.clone_dtoh(&md).unwrap());
        assert!(st.clone_dtoh(&vb).unwrap() == st.clone_dtoh(&vd).unwrap());
        let mut w16_ref = st.alloc_zeros::<half::bf16>(w_ref.len()).unwrap();
        k.to_bf16(&wd2, &mut w16_ref).unwrap();
        let bits = |v: Vec<half::bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(st.clone_dtoh(&wb16).unwrap()),
            bits(st.clone_dtoh(&w16_ref).unwrap()),
            "adamw_with's bf16 weights vs to_bf16"
        );
        let host16: Vec<u16> = w_new
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        assert_eq!(
            bits(st.clone_dtoh(&wb16).unwrap()),
            host16,
            "device vs host bf16 rounding"
        );
        let mut short16 = st.alloc_zeros::<half::bf16>(3).unwrap();
        let ones = st.clone_htod(&vec![1.0f32; w_ref.len()]).unwrap();
        assert!(matches!(
            k.adamw_with(
                &mut wb,
                Some(&mut short16),
                &ones,
                &mut mb,
                &mut vb,
                &cfg,
                1e-2,
                4,
                true,
                1.0
            ),
            Err(CudaError::Shape { .. })
        ));

        // Sum of squares.
        let ss = k.sum_squares(&xd).unwrap();
        let ss_ref: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
        assert!(
            (ss - ss_ref).abs() <= 1e-5 * ss_ref,
            "sum of squares {ss} vs {ss_ref}"
        );
        // Several tensors with one copy: each equal to its own sum_squares, bit for bit.
        let lens = [1usize, 37, 4096, 300_001];
        let hosts: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 1.5)).collect();
        let devs: Vec<_> = hosts.iter().map(|h| st.clone_htod(h).unwrap()).collect();
        let refs: Vec<&_> = devs.iter().collect();
        let many = k.sum_squares_many(&refs).unwrap();
        assert_eq!(many.len(), lens.len());
        for ((h, d), got) in hosts.iter().zip(&devs).zip(&many) {
            assert_eq!(
                *got,
                k.sum_squares(d).unwrap(),
                "sum_squares_many vs sum_squares"
            );
            let want: f64 = h.iter().map(|&v| (v as f64).powi(2)).sum();
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "sum_squares_many {got} vs {want}"
            );
        }
        assert!(k.sum_squares_many(&[]).unwrap().is_empty());
    }
}

#[test]
fn cublas_matmuls_match_mhc_core() {
    let Some(dev) = device() else { return };
    let mm = MatMul::new(&dev).unwrap();
    let st = dev.stream().clone();
    let mut rng = Rng::new(8);
    for (m, k, n) in [(5usize, 7usize, 3usize), (64, 48, 192), (130, 64, 256)] {
        let a = randn(&mut rng, m * k, 1.0);
        let b = randn(&mut rng, k * n, 1.0);
        let g = randn(&mut rng, m * n, 1.0);
        let mut out_ref = vec![0.0f32; m * n];
        ops::matmul(&a, &b, &mut out_ref, m, k, n);
        let mut ga_ref = vec![0.0f32; m * k];
        ops::matmul_grad_a(&g, &b, &mut ga_ref, m, k, n);
        let gb_init = randn(&mut rng, k * n, 0.1);
        let mut gb_ref = gb_init.clone();
        ops::matmul_grad_b(&a, &g, &mut gb_ref, m, k, n);
        let (ad, bd, gd) = (
            st.clone_htod(&a).unwrap(),
            st.clone_htod(&b).unwrap(),
            st.clone_htod(&g).unwrap(),
        );
        let mut od = st.clone_htod(&vec![f32::NAN; m * n]).unwrap();
        let mut gad = st.clone_htod(&vec![f32::NAN; m * k]).unwrap();
        let mut gbd = st.clone_htod(&gb_init).unwrap();
        mm.matmul(&ad, &bd, &mut od, m, k, n).unwrap();
        mm.matmul_grad_a(&gd, &bd, &mut gad, m, k, n).unwrap();
        mm.matmul_grad_b(&ad, &gd, &mut gbd, m, k, n).unwrap();
        rel_l2(
            &format!("matmul {m}x{k}x{n}"),
            &st.clone_dtoh(&od).unwrap(),
            &out_ref,
            1e-5,
        );
        rel_l2(
            &format!("matmul grad_a {m}x{k}x{n}"),
            &st.clone_dtoh(&gad).unwrap(),
            &ga_ref,
            1e-5,
        );
        rel_l2(
            &format!("matmul grad_b (accumulating) {m}x{k}x{n}"),
            &st.clone_dtoh(&gbd).unwrap(),
            &gb_ref,
            1e-5,
        );
        assert!(matches!(
            mm.matmul(&ad, &bd, &mut gad, m, k, n + 1),
            Err(CudaError::Shape { .. })
        ));

        // bf16 products: operands rounded once (ModelKernels::to_bf16) and reused
        // give the very bits of f32 operands rounded per call.
        let kernels = ModelKernels::new(dev.clone()).unwrap();
        let mm16 = MatMul::with_precision(&dev, GemmPrecision::Bf16).unwrap();
        let (mut a16, mut g16) = (
            st.alloc_zeros::<half::bf16>(m * k).unwrap(),
            st.alloc_zeros::<half::bf16>(m * n).unwrap(),
        );
        kernels.to_bf16(&ad, &mut a16).unwrap();
        kernels.to_bf16(&gd, &mut g16).unwrap();
        let mut per_call = st.clone_htod(&gb_init).unwrap();
        let mut once = st.clone_htod(&gb_init).unwrap();
        mm16.matmul_grad_b(&ad, &gd, &mut per_call, m, k, n)
            .unwrap();
        mm16.matmul_grad_b(&a16, &g16, &mut once, m, k, n).unwrap();
        let (x, y) = (
            st.clone_dtoh(&per_call).unwrap(),
            st.clone_dtoh(&once).unwrap(),
        );
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        rel_l2(&format!("bf16 grad_b {m}x{k}x{n}"), &y, &gb_ref, 2e-2);
        let mut o16 = st.clone_htod(&vec![f32::NAN; m * n]).unwrap();
        mm16.matmul(&a16, &bd, &mut o16, m, k, n).unwrap();
        rel_l2(
            &format!("bf16 matmul {m}x{k}x{n}"),
            &st.clone_dtoh(&o16).unwrap(),
            &out_ref,
            2e-2,
        );
        // A bf16 output: the bf16 product's f32 result, rounded once more.
        let mut out16 = st.alloc_zeros::<half::bf16>(m * n).unwrap();
        mm16.matmul_to_bf16(&a16, &bd, &mut out16, m, k, n).unwrap();
        let out16: Vec<f32> = st
            .clone_dtoh(&out16)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        rel_l2(
            &format!("bf16-output matmul {m}x{k}x{n}"),
            &out16,
            &st.clone_dtoh(&o16).unwrap(),
            4e-3,
        );
        assert!(matches!(
            mm.matmul_to_bf16(&ad, &bd, &mut h16_out(&st, m * n), m, k, n),
            Err(CudaError::Unsupported(_))
        ));
        // bf16 operands need bf16 products.
        assert!(matches!(
            mm.matmul(&a16, &bd, &mut od, m, k, n),
            Err(CudaError::Unsupported(_))
        ));
    }
}

#[test]
fn attention_sublayer_matches_mhc_core() {
    use mhc_core::model::blocks::SeqShape;
    use mhc_core::model::{Model, ModelConfig};
    use mhc_core::{Scheme, Sublayer};
    let Some(dev) = device() else { return };
    let k = ModelKernels::new(dev.clone()).unwrap();
    let mm = MatMul::new(&dev).unwrap();
    let st = dev.stream().clone();
    for (batch, seq, heads, c) in [
        (2usize, 9usize, 2usize, 16usize),
        (3, 40, 4, 64),
        (2, 70, 2, 128),
        (1, 33, 1, 128),
    ] {
        let cfg = ModelConfig {
            vocab: 11,
            width: c,
            layers: 1,
            heads,
            context: seq,
            streams: 1,
            scheme: Scheme::Residual,
            sinkhorn_iterations: 20,
        };
        let model = Model::<f32>::new(cfg, batch * seq, 3).unwrap();
        let mut attn = model.blocks[0].attn.clone();
        let mut rng = Rng::new(11);
        attn.wqkv.value = randn(&mut rng, c * 3 * c, 0.3);
        attn.wo.value = randn(&mut rng, c * c, 0.3);
        attn.norm.value = (0..c).map(|_| 1.0 + 0.2 * rng.normal() as f32).collect();
        attn.shape = SeqShape { batch, seq };
        let rows = batch * seq;
        let h = randn(&mut rng, rows * c, 1.0);
        let dy = randn(&mut rng, rows * c, 1.0);
        let mut y_ref = vec![0.0f32; rows * c];
        attn.forward(&h, &mut y_ref).unwrap();
        let mut dh_ref = vec![0.0f32; rows * c];
        attn.vjp(&h, &dy, &mut dh_ref).unwrap();

        // The same sublayer on the GPU: RMSNorm → W_qkv → attention → W_o, and back.
        let hd = st.clone_htod(&h).unwrap();
        let (normd, wqkvd, wod) = (
            st.clone_htod(&attn.norm.value).unwrap(),
            st.clone_htod(&attn.wqkv.value).unwrap(),
            st.clone_htod(&attn.wo.value).unwrap(),
        );
        let mut normed = st.alloc_zeros::<f32>(rows * c).unwrap();
        let mut inv = st.alloc_zeros::<f32>(rows).unwrap();
        let mut qkv = st.alloc_zeros::<f32>(rows * 3 * c).unwrap();
        let mut probs = st.alloc_zeros::<f32>(batch * heads * seq * seq).unwrap();
        let mut o = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        let mut y = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        k.rmsnorm(&hd, &normd, rows, c, 1e-6, &mut normed, &mut inv)
            .unwrap();
        mm.matmul(&normed, &wqkvd, &mut qkv, rows, c, 3 * c)
            .unwrap();
        k.attention(&qkv, batch, seq, heads, c / heads, &mut probs, &mut o)
            .unwrap();
        mm.matmul(&o, &wod, &mut y, rows, c, c).unwrap();
        rel_l2(
            "attention sublayer output",
            &st.clone_dtoh(&y).unwrap(),
            &y_ref,
            1e-5,
        );

        let dyd = st.clone_htod(&dy).unwrap();
        let mut dwo = st.alloc_zeros::<f32>(c * c).unwrap();
        let mut d_o = st.alloc_zeros::<f32>(rows * c).unwrap();
        let mut delta = st.alloc_zeros::<f32>(batch * heads * seq).unwrap();
        let mut dqkv = st.clone_htod(&vec![f32::NAN; rows * 3 * c]).unwrap();
        let mut dwqkv = st.alloc_zeros::<f32>(c * 3 * c).unwrap();
        let mut dnormed = st.alloc_zeros::<f32>(rows * c).unwrap();
        let mut dh = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
        let mut dnorm = st.alloc_zeros::<f32>(c).unwrap();
        mm.matmul_grad_b(&o, &dyd, &mut dwo, rows, c, c).unwrap();
        mm.matmul_grad_a(&dyd, &wod, &mut d_o, rows, c, c).unwrap();
        k.attention_backward(
            &qkv,
            &probs,
            &o,
            &d_o,
            batch,
            seq,
            heads,
            c / heads,
            &mut delta,
            &mut dqkv,
        )
        .unwrap();
        mm.matmul_grad_b(&normed, &dqkv, &mut dwqkv, rows, c, 3 * c)
            .unwrap();
        mm.matmul_grad_a(&dqkv, &wqkvd, &mut dnormed, rows, c, 3 * c)
            .unwrap();
        k.rmsnorm_backward(&hd, &normd, &inv, &dnormed, rows, c, &mut dh, &mut dnorm)
            .unwrap();
        rel_l2(
            "attention sublayer grad of input",
            &st.clone_dtoh(&dh).unwrap(),
            &dh_ref,
            1e-5,
        );
        rel_l2(
            "grad of W_o",
            &st.clone_dtoh(&dwo).unwrap(),
            &attn.wo.grad,
            1e-5,
        );
        rel_l2(
            "grad of W_qkv",
            &st.clone_dtoh(&dwqkv).unwrap(),
            &attn.wqkv.grad,
            1e-5,
        );
        rel_l2(
            "grad of the norm weight",
            &st.clone_dtoh(&dnorm).unwrap(),
            &attn.norm.grad,
            1e-5,
        );

        // The tensor-core path (cuBLAS batched GEMMs + causal softmax kernels):
        // full f32 products match the core like the kernels above. bf16 products
        // (operands rounded to 8 mantissa bits): the output within 2e-2, the
        // gradients within 5e-2 — they pass through four rounded products and the
        // RMSNorm backward's cancellation (2.4e-2 measured on an H200).
        for (precision, tol, grad_tol) in [
            (GemmPrecision::F32, 1e-5, 1e-5),
            (GemmPrecision::Bf16, 2e-2, 5e-2),
        ] {
            let mmp = MatMul::with_precision(&dev, precision).unwrap();
            let mut probs = st
                .clone_htod(&vec![f32::NAN; batch * heads * seq * seq])
                .unwrap();
            let mut dprobs = st
                .clone_htod(&vec![f32::NAN; batch * heads * seq * seq])
                .unwrap();
            let mut o = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
            let mut y = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
            mmp.matmul(&normed, &wqkvd, &mut qkv, rows, c, 3 * c)
                .unwrap();
            k.attention_gemm(&mmp, &qkv, batch, seq, heads, c / heads, &mut probs, &mut o)
                .unwrap();
            mmp.matmul(&o, &wod, &mut y, rows, c, c).unwrap();
            let label = format!("attention (GEMMs, {})", precision.name());
            rel_l2(
                &format!("{label} output"),
                &st.clone_dtoh(&y).unwrap(),
                &y_ref,
                tol,
            );
            let mut dqkv = st.clone_htod(&vec![f32::NAN; rows * 3 * c]).unwrap();
            let mut dwqkv = st.alloc_zeros::<f32>(c * 3 * c).unwrap();
            let mut dwo = st.alloc_zeros::<f32>(c * c).unwrap();
            mmp.matmul_grad_b(&o, &dyd, &mut dwo, rows, c, c).unwrap();
            mmp.matmul_grad_a(&dyd, &wod, &mut d_o, rows, c, c).unwrap();
            k.attention_gemm_backward(
                &mmp,
                &qkv,
                &probs,
                &d_o,
                batch,
                seq,
                heads,
                c / heads,
                &mut dprobs,
                &mut dqkv,
            )
            .unwrap();
            mmp.matmul_grad_b(&normed, &dqkv, &mut dwqkv, rows, c, 3 * c)
                .unwrap();
            mmp.matmul_grad_a(&dqkv, &wqkvd, &mut dnormed, rows, c, 3 * c)
                .unwrap();
            k.rmsnorm_backward_dx(&hd, &normd, &inv, &dnormed, rows, c, &mut dh)
                .unwrap();
            rel_l2(
                &format!("{label} grad of input"),
                &st.clone_dtoh(&dh).unwrap(),
                &dh_ref,
                grad_tol,
            );
            rel_l2(
                &format!("{label} grad of W_o"),
                &st.clone_dtoh(&dwo).unwrap(),
                &attn.wo.grad,
                grad_tol,
            );
            rel_l2(
                &format!("{label} grad of W_qkv"),
                &st.clone_dtoh(&dwqkv).unwrap(),
                &attn.wqkv.grad,
                grad_tol,
            );
        }

        // The flash kernels (bf16 products, no seq × seq scores), with bf16
        // projections as in training: the bf16 tolerances above.
        let head_dim = c / heads;
        if ModelKernels::flash_supported(head_dim) {
            let mmp = MatMul::with_precision(&dev, GemmPrecision::Bf16).unwrap();
            let mut lse = st.clone_htod(&vec![f32::NAN; batch * heads * seq]).unwrap();
            let mut dvec = st.clone_htod(&vec![f32::NAN; batch * heads * seq]).unwrap();
            let mut o = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
            let mut y = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
            mmp.matmul(&normed, &wqkvd, &mut qkv, rows, c, 3 * c)
                .unwrap();
            let mut qkv16 = st.alloc_zeros::<half::bf16>(rows * 3 * c).unwrap();
            let mut dout16 = st.alloc_zeros::<half::bf16>(rows * c).unwrap();
            k.to_bf16(&qkv, &mut qkv16).unwrap();
            k.flash_attention(&qkv16, batch, seq, heads, head_dim, &mut lse, &mut o, None)
                .unwrap();
            mmp.matmul(&o, &wod, &mut y, rows, c, c).unwrap();
            rel_l2(
                "attention (flash) output",
                &st.clone_dtoh(&y).unwrap(),
                &y_ref,
                2e-2,
            );
            let mut dqkv = st.clone_htod(&vec![f32::NAN; rows * 3 * c]).unwrap();
            let mut dwqkv = st.alloc_zeros::<f32>(c * 3 * c).unwrap();
            let mut dwo = st.alloc_zeros::<f32>(c * c).unwrap();
            mmp.matmul_grad_b(&o, &dyd, &mut dwo, rows, c, c).unwrap();
            mmp.matmul_grad_a(&dyd, &wod, &mut d_o, rows, c, c).unwrap();
            k.flash_attention_backward(
                &qkv16,
                &o,
                &lse,
                &d_o,
                batch,
                seq,
                heads,
                head_dim,
                &mut dvec,
                &mut dout16,
                Some(&mut dqkv),
                None,
            )
            .unwrap();
            mmp.matmul_grad_b(&normed, &dqkv, &mut dwqkv, rows, c, 3 * c)
                .unwrap();
            mmp.matmul_grad_a(&dqkv, &wqkvd, &mut dnormed, rows, c, 3 * c)
                .unwrap();
            k.rmsnorm_backward_dx(&hd, &normd, &inv, &dnormed, rows, c, &mut dh)
                .unwrap();
            rel_l2(
                "attention (flash) grad of input",
                &st.clone_dtoh(&dh).unwrap(),
                &dh_ref,
                5e-2,
            );
            rel_l2(
                "attention (flash) grad of W_qkv",
                &st.clone_dtoh(&dwqkv).unwrap(),
                &attn.wqkv.grad,
                5e-2,
            );
        }
    }
}

/// The flash kernels on their own against the f32 GEMM path (itself checked
/// against the core above): several 64-row tiles, ragged lengths, every
/// compiled head dimension, peaked softmaxes (q, k of standard deviation 2);
/// the backward is deterministic (two runs are bit-identical), and
/// unsupported head dimensions are a typed error.
#[test]
fn flash_attention_matches_the_gemm_path() {
    let Some(dev) = device() else { return };
    let k = ModelKernels::new(dev.clone()).unwrap();
    let mm = MatMul::with_precision(&dev, GemmPrecision::F32).unwrap();
    let st = dev.stream().clone();
    let mut rng = Rng::new(23);
    for (batch, seq, heads, head_dim) in [
        (2usize, 200usize, 3usize, 64usize),
        (1, 130, 2, 128),
        (3, 64, 4, 32),
        (2, 17, 2, 16),
        (1, 1, 1, 64),
        (1, 257, 1, 128),
    ] {
        let c = heads * head_dim;
        let rows = batch * seq;
        let qkv_h = randn(&mut rng, rows * 3 * c, 2.0);
        let dout_h = randn(&mut rng, rows * c, 1.0);
        let qkv = st.clone_htod(&qkv_h).unwrap();
        let dout = st.clone_htod(&dout_h).unwrap();
        let nan = |len: usize| st.clone_htod(&vec![f32::NAN; len]).unwrap();
        let (mut probs, mut dprobs) = (
            nan(batch * heads * seq * seq),
            nan(batch * heads * seq * seq),
        );
        let (mut o_ref, mut dqkv_ref) = (nan(rows * c), nan(rows * 3 * c));
        k.attention_gemm(
            &mm, &qkv, batch, seq, heads, head_dim, &mut probs, &mut o_ref,
        )
        .unwrap();
        k.attention_gemm_backward(
            &mm,
            &qkv,
            &probs,
            &dout,
            batch,
            seq,
            heads,
            head_dim,
            &mut dprobs,
            &mut dqkv_ref,
        )
        .unwrap();
        let (mut lse, mut dvec) = (nan(batch * heads * seq), nan(batch * heads * seq));
        let (mut o, mut dqkv) = (nan(rows * c), nan(rows * 3 * c));
        let mut qkv16 = st.alloc_zeros::<half::bf16>(rows * 3 * c).unwrap();
        let mut dout16 = st.alloc_zeros::<half::bf16>(rows * c).unwrap();
        k.to_bf16(&qkv, &mut qkv16).unwrap();
        let qkv16_h = st.clone_dtoh(&qkv16).unwrap();
        assert!(
            qkv16_h
                .iter()
                .zip(&qkv_h)
                .all(|(a, &b)| *a == half::bf16::from_f32(b)),
            "to_bf16 is not round-to-nearest-even"
        );
        let mut o16 = st.alloc_zeros::<half::bf16>(rows * c).unwrap();
        k.flash_attention(
            &qkv16,
            batch,
            seq,
            heads,
            head_dim,
            &mut lse,
            &mut o,
            Some(&mut o16),
        )
        .unwrap();
        let bits = |v: Vec<half::bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let round = |v: &[f32]| {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(st.clone_dtoh(&o16).unwrap()),
            round(&st.clone_dtoh(&o).unwrap()),
            "the bf16 output is not the f32 output rounded"
        );
        let mut backward =
            |dqkv: &mut cudarc::driver::CudaSlice<f32>,
             dqkv16: Option<&mut cudarc::driver::CudaSlice<half::bf16>>| {
                k.flash_attention_backward(
                    &qkv16,
                    &o,
                    &lse,
                    &dout,
                    batch,
                    seq,
                    heads,
                    head_dim,
                    &mut dvec,
                    &mut dout16,
                    Some(dqkv),
                    dqkv16,
                )
                .unwrap()
            };
        let mut dqkv16 = st.alloc_zeros::<half::bf16>(rows * 3 * c).unwrap();
        backward(&mut dqkv, Some(&mut dqkv16));
        let label = format!("flash attention {batch}×{seq}, {heads} heads of {head_dim}");
        let o_ref_h = st.clone_dtoh(&o_ref).unwrap();
        rel_l2(
            &format!("{label}: output"),
            &st.clone_dtoh(&o).unwrap(),
            &o_ref_h,
            1e-2,
        );
        let dqkv_h = st.clone_dtoh(&dqkv).unwrap();
        let dqkv_ref_h = st.clone_dtoh(&dqkv_ref).unwrap();
        for (part, name) in ["q", "k", "v"].iter().enumerate() {
            let pick = |v: &[f32]| -> Vec<f32> {
                v.chunks(3 * c)
                    .flat_map(|r| r[part * c..(part + 1) * c].to_vec())
                    .collect()
            };
            let (got, want) = (pick(&dqkv_h), pick(&dqkv_ref_h));
            if seq == 1 && part < 2 {
                // One key: the probabilities are constant, dq = dk = 0 exactly; the
                // bf16 products leave only rounding (relative error is undefined).
                let worst = got.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(worst < 2e-2, "{label}: grad of {name} {worst:e} ≠ 0");
                assert!(want.iter().all(|v| v.abs() < 1e-6));
            } else {
                rel_l2(&format!("{label}: grad of {name}"), &got, &want, 2e-2);
            }
        }
        assert_eq!(
            bits(st.clone_dtoh(&dqkv16).unwrap()),
            round(&dqkv_h),
            "{label}: the bf16 gradient is not the f32 gradient rounded"
        );
        let mut again = nan(rows * 3 * c);
        backward(&mut again, None);
        let again_h = st.clone_dtoh(&again).unwrap();
        assert!(
            again_h
                .iter()
                .zip(&dqkv_h)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{label}: the backward is not deterministic"
        );
    }
    let qkv = st.alloc_zeros::<half::bf16>(2 * 8 * 3 * 48).unwrap();
    let (mut lse, mut o) = (
        st.alloc_zeros::<f32>(2 * 2 * 8).unwrap(),
        st.alloc_zeros::<f32>(2 * 8 * 48).unwrap(),
    );
    assert!(matches!(
        k.flash_attention(&qkv, 2, 8, 2, 24, &mut lse, &mut o, None),
        Err(CudaError::Unsupported(_))
    ));
    assert!(matches!(
        k.flash_attention(&qkv, 2, 9, 2, 32, &mut lse, &mut o, None),
        Err(CudaError::Shape { .. })
    ));
}

#[test]
fn embedding_and_stream_mean_match_their_definition() {
    let Some(dev) = device() else { return };
    let k = ModelKernels::new(dev.clone()).unwrap();
    let st = dev.stream().clone();
    let mut rng = Rng::new(21);
    let (batch, seq, streams, c, vocab) = (3usize, 7usize, 4usize, 12usize, 9usize);
    let rows = batch * seq;
    let tokens: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let e = randn(&mut rng, vocab * c, 1.0);
    let p = randn(&mut rng, seq * c, 1.0);
    let mut x_ref = vec![0.0f32; rows * streams * c];
    for r in 0..rows {
        for s in 0..streams {
            for j in 0..c {
                x_ref[(r * streams + s) * c + j] =
                    e[tokens[r] as usize * c + j] + p[(r % seq) * c + j];
            }
        }
    }
    let (td, ed, pd) = (
        st.clone_htod(&tokens).unwrap(),
        st.clone_htod(&e).unwrap(),
        st.clone_htod(&p).unwrap(),
    );
    let mut xd = st.clone_htod(&vec![f32::NAN; rows * streams * c]).unwrap();
    k.embed(&td, &ed, &pd, rows, seq, streams, c, &mut xd)
        .unwrap();
    rel_l2("embedding", &st.clone_dtoh(&xd).unwrap(), &x_ref, 1e-6);
    // Backward: every stream's gradient flows to the token's and the position's row.
    let dx = randn(&mut rng, rows * streams * c, 1.0);
    let (mut de_ref, mut dp_ref) = (vec![0.0f32; vocab * c], vec![0.0f32; seq * c]);
    for r in 0..rows {
        for s in 0..streams {
            for j in 0..c {
                de_ref[tokens[r] as usize * c + j] += dx[(r * streams + s) * c + j];
                dp_ref[(r % seq) * c + j] += dx[(r * streams + s) * c + j];
            }
        }
    }
    let dxd = st.clone_htod(&dx).unwrap();
    let mut ded = st.alloc_zeros::<f32>(vocab * c).unwrap();
    let mut dpd = st.alloc_zeros::<f32>(seq * c).unwrap();
    k.embed_backward(&dxd, &tokens, batch, seq, streams, c, &mut ded, &mut dpd)
        .unwrap();
    rel_l2(
        "grad of token embedding",
        &st.clone_dtoh(&ded).unwrap(),
        &de_ref,
        1e-6,
    );
    rel_l2(
        "grad of position embedding",
        &st.clone_dtoh(&dpd).unwrap(),
        &dp_ref,
        1e-6,
    );
    // Mean over streams and its backward.
    let z_ref: Vec<f32> = (0..rows * c)
        .map(|i| {
            (0..streams)
                .map(|s| x_ref[((i / c) * streams + s) * c + i % c])
                .sum::<f32>()
                / streams as f32
        })
        .collect();
    let mut zd = st.clone_htod(&vec![f32::NAN; rows * c]).unwrap();
    k.streams_mean(&xd, rows, streams, c, &mut zd).unwrap();
    rel_l2(
        "mean over streams",
        &st.clone_dtoh(&zd).unwrap(),
        &z_ref,
        1e-6,
    );
    let mut back = st.clone_htod(&vec![f32::NAN; rows * streams * c]).unwrap();
    k.streams_mean_backward(&zd, rows, streams, c, &mut back)
        .unwrap();
    let back_ref: Vec<f32> = (0..rows * streams * c)
        .map(|i| z_ref[(i / (streams * c)) * c + i % c] / streams as f32)
        .collect();
    rel_l2(
        "mean over streams, backward",
        &st.clone_dtoh(&back).unwrap(),
        &back_ref,
        1e-6,
    );
    let bad = st.clone_htod(&vec![vocab as u32; rows]).unwrap();
    assert!(matches!(
        k.embed(&bad, &ed, &pd, rows, seq, streams, c, &mut xd),
        Err(CudaError::Core(_))
    ));
}

/// The bf16-stream (`_bs`) kernels compute in f32 from the widened bf16
/// inputs and round what they write: bit for bit the f32 kernels on the
/// widened inputs, with stream outputs rounded to nearest even.
#[test]
fn bf16_stream_kernels_are_the_f32_ones_rounded() {
    let Some(dev) = device() else { return };
    let k = ModelKernels::new(dev.clone()).unwrap();
    let st = dev.stream().clone();
    let mut rng = Rng::new(33);
    let (batch, seq, streams, c, vocab) = (3usize, 5usize, 4usize, 96usize, 7usize);
    let rows = batch * seq;
    let len = rows * streams * c;
    let bf = |v: &[f32]| {
        v.iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect::<Vec<_>>()
    };
    let widen = |v: &[half::bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let bits = |v: Vec<half::bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let round_bits = |v: Vec<f32>| {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect::<Vec<_>>()
    };
    let f32_of = |v: &[f32]| st.clone_htod(v).unwrap();
    let bf16_of = |v: &[half::bf16]| st.clone_htod(v).unwrap();

    // Embedding.
    let tokens: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let (e, p) = (
        randn(&mut rng, vocab * c, 1.0),
        randn(&mut rng, seq * c, 1.0),
    );
    let (td, ed, pd) = (st.clone_htod(&tokens).unwrap(), f32_of(&e), f32_of(&p));
    let mut x32 = f32_of(&vec![f32::NAN; len]);
    let mut x16 = bf16_of(&vec![half::bf16::NAN; len]);
    k.embed(&td, &ed, &pd, rows, seq, streams, c, &mut x32)
        .unwrap();
    k.embed(&td, &ed, &pd, rows, seq, streams, c, &mut x16)
        .unwrap();
    assert_eq!(
        bits(st.clone_dtoh(&x16).unwrap()),
        round_bits(st.clone_dtoh(&x32).unwrap()),
        "embedding"
    );

    // Streams: random bf16 values, and the same values widened to f32.
    let a16 = bf(&randn(&mut rng, len, 1.0));
    let b16 = bf(&randn(&mut rng, len, 1.0));
    let (a32, b32) = (widen(&a16), widen(&b16));
    let (a16d, b16d, a32d, b32d) = (bf16_of(&a16), bf16_of(&b16), f32_of(&a32), f32_of(&b32));

    let mut sum32 = f32_of(&vec![f32::NAN; len]);
    let mut sum16 = bf16_of(&vec![half::bf16::NAN; len]);
    k.add(&a32d, &b32d, &mut sum32).unwrap();
    k.add(&a16d, &b16d, &mut sum16).unwrap();
    assert_eq!(
        bits(st.clone_dtoh(&sum16).unwrap()),
        round_bits(st.clone_dtoh(&sum32).unwrap()),
        "add"
    );
    let want: Vec<f32> = a32.iter().zip(&b32).map(|(x, y)| x + y).collect();
    assert_eq!(st.clone_dtoh(&sum32).unwrap(), want, "add against the host");
    // A length that is not a multiple of 4: the four-wide loop and the tail.
    let odd = len - 3;
    let (ao, bo) = (f32_of(&a32[..odd]), f32_of(&b32[..odd]));
    let mut so = f32_of(&vec![f32::NAN; odd]);
    k.add(&ao, &bo, &mut so).unwrap();
    assert_eq!(st.clone_dtoh(&so).unwrap(), want[..odd], "add, odd length");

    let mut z32 = f32_of(&vec![f32::NAN; rows * c]);
    let mut z16 = f32_of(&vec![f32::NAN; rows * c]);
    k.streams_mean(&a32d, rows, streams, c, &mut z32).unwrap();
    k.streams_mean(&a16d, rows, streams, c, &mut z16).unwrap();
    assert_eq!(
        st.clone_dtoh(&z16).unwrap(),
        st.clone_dtoh(&z32).unwrap(),
        "mean over streams"
    );
    let dz = f32_of(&randn(&mut rng, rows * c, 1.0));
    let mut back32 = f32_of(&vec![f32::NAN; len]);
    let mut back16 = bf16_of(&vec![half::bf16::NAN; len]);
    k.streams_mean_backward(&dz, rows, streams, c, &mut back32)
        .unwrap();
    k.streams_mean_backward(&dz, rows, streams, c, &mut back16)
        .unwrap();
    assert_eq!(
        bits(st.clone_dtoh(&back16).unwrap()),
        round_bits(st.clone_dtoh(&back32).unwrap()),
        "mean over streams, backward"
    );

    let grads =
        |x: &dyn Fn(&mut cudarc::driver::CudaSlice<f32>, &mut cudarc::driver::CudaSlice<f32>)| {
            let mut de = st.alloc_zeros::<f32>(vocab * c).unwrap();
            let mut dp = st.alloc_zeros::<f32>(seq * c).unwrap();
            x(&mut de, &mut dp);
            (st.clone_dtoh(&de).unwrap(), st.clone_dtoh(&dp).unwrap())
        };
    let g32 = grads(&|de, dp| {
        k.embed_backward(&a32d, &tokens, batch, seq, streams, c, de, dp)
            .unwrap()
    });
    let g16 = grads(&|de, dp| {
        k.embed_backward(&a16d, &tokens, batch, seq, streams, c, de, dp)
            .unwrap()
    });
    assert_eq!(g16, g32, "embedding backward");

    // RMSNorm of a bf16 sublayer input h [rows·streams, c] and its backward.
    let r = rows * streams;
    let w = f32_of(&randn(&mut rng, c, 1.0));
    let dy = f32_of(&randn(&mut rng, r * c, 1.0));
    let (mut y32, mut y16) = (h16_out(&st, r * c), h16_out(&st, r * c));
    let (mut inv32, mut inv16) = (f32_of(&vec![f32::NAN; r]), f32_of(&vec![f32::NAN; r]));
    k.rmsnorm_bf16(&a32d, &w, r, c, 1e-6, &mut y32, &mut inv32)
        .unwrap();
    k.rmsnorm_bf16(&a16d, &w, r, c, 1e-6, &mut y16, &mut inv16)
        .unwrap();
    assert_eq!(
        bits(st.clone_dtoh(&y16).unwrap()),
        bits(st.clone_dtoh(&y32).unwrap()),
        "rmsnorm of a bf16 input"
    );
    assert_eq!(
        st.clone_dtoh(&inv16).unwrap(),
        st.clone_dtoh(&inv32).unwrap()
    );
    let mut dx32 = f32_of(&vec![f32::NAN; r * c]);
    let mut dx16 = bf16_of(&vec![half::bf16::NAN; r * c]);
    let (mut dw32, mut dw16) = (
        st.alloc_zeros::<f32>(c).unwrap(),
        st.alloc_zeros::<f32>(c).unwrap(),
    );
    k.rmsnorm_backward(&a32d, &w, &inv32, &dy, r, c, &mut dx32, &mut dw32)
        .unwrap();
    k.rmsnorm_backward(&a16d, &w, &inv16, &dy, r, c, &mut dx16, &mut dw16)
        .unwrap();
    assert_eq!(
        bits(st.clone_dtoh(&dx16).unwrap()),
        round_bits(st.clone_dtoh(&dx32).unwrap()),
        "rmsnorm backward, input gradient"
    );
    assert_eq!(
        st.clone_dtoh(&dw16).unwrap(),
        st.clone_dtoh(&dw32).unwrap(),
        "rmsnorm backward, weight gradient"
    );
    // A bf16 stream the wrong length is a typed error.
    let mut short = bf16_of(&vec![half::bf16::ZERO; len - 1]);
    assert!(matches!(
        k.streams_mean_backward(&dz, rows, streams, c, &mut short),
        Err(CudaError::Shape { .. })
    ));
}
