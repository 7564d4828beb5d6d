//! The JavaScript API of mhc-wasm in headless Chromium (wasm-bindgen-test):
//! trainers of the three schemes train, report metrics, coefficients with
//! their shapes and composite gains, sample text, and every bad input
//! becomes a JS `Error` with a message that says what to fix.
//!
//! Run: `CHROMEDRIVER=/usr/bin/chromedriver CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
//! cargo test -p mhc-wasm --target wasm32-unknown-unknown` (scripts/test.sh does).
#![cfg(target_arch = "wasm32")]

use js_sys::{Array, Float32Array, Float64Array, Reflect};
use mhc_wasm::{
    WasmTrainer, build_info, create_trainer, default_config, synthetic_text, webgpu_adapter,
};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

fn get(o: &JsValue, k: &str) -> JsValue {
    Reflect::get(o, &k.into()).unwrap()
}

fn num(o: &JsValue, k: &str) -> f64 {
    get(o, k)
        .as_f64()
        .unwrap_or_else(|| panic!("{k} is not a number"))
}

fn f32s(o: &JsValue, k: &str) -> Vec<f32> {
    get(o, k).dyn_into::<Float32Array>().unwrap().to_vec()
}

fn f64s(o: &JsValue, k: &str) -> Vec<f64> {
    get(o, k).dyn_into::<Float64Array>().unwrap().to_vec()
}

fn dims(o: &JsValue, k: &str) -> Vec<usize> {
    get(o, k)
        .dyn_into::<Array>()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as usize)
        .collect()
}

/// The default configuration with some fields replaced.
fn config(fields: &[(&str, JsValue)]) -> JsValue {
    let c = default_config();
    for (k, v) in fields {
        Reflect::set(&c, &(*k).into(), v).unwrap();
    }
    c
}

fn text() -> String {
    synthetic_text(7, 40_000).unwrap()
}

/// A model small enough that no test keeps the page busy for long (the
/// tests run on the page's main thread, which the runner polls).
const SMALL: [(&str, f64); 6] = [
    ("layers", 2.0),
    ("width", 16.0),
    ("heads", 2.0),
    ("context", 16.0),
    ("batch", 4.0),
    ("warmup", 5.0),
];

/// A trainer of the [`SMALL`] model on the CPU core unless `fields` say otherwise.
async fn trainer(fields: &[(&str, JsValue)]) -> WasmTrainer {
    let mut all: Vec<(&str, JsValue)> = SMALL.iter().map(|(k, v)| (*k, (*v).into())).collect();
    all.push(("backend", "cpu".into()));
    all.extend(fields.iter().cloned());
    match create_trainer(config(&all), text()).await {
        Ok(t) => t,
        Err(e) => panic!("create_trainer: {}", message(e)),
    }
}

/// The message of the JS `Error` a call threw.
fn message(e: wasm_bindgen::JsError) -> String {
    let v: JsValue = e.into();
    let e: js_sys::Error = v.dyn_into().expect("errors reach JS as Error objects");
    e.message().into()
}

async fn create_error(fields: &[(&str, JsValue)], text: &str) -> String {
    match create_trainer(config(fields), text.to_string()).await {
        Ok(_) => panic!("{fields:?} was accepted"),
        Err(e) => message(e),
    }
}

#[wasm_bindgen_test]
async fn mhc_trains_and_reports_every_layer() {
    let mut t = trainer(&[("scheme", "mhc".into())]).await;
    assert_eq!(t.backend(), "cpu");
    assert!(t.num_params().await.unwrap() > 10_000.0);
    let first = t.step(1).await.unwrap();
    assert_eq!(num(&first, "step"), 1.0);
    let r = t.step(30).await.unwrap();
    assert_eq!(num(&r, "step"), 31.0);
    assert_eq!(t.step_count(), 31.0);
    let losses = f64s(&r, "losses");
    assert_eq!(losses.len(), 30);
    assert_eq!(f64s(&r, "grad_norms").len(), 30);
    let late = losses[20..].iter().sum::<f64>() / 10.0;
    assert!(
        late < num(&first, "loss") - 0.5,
        "loss did not fall: {losses:?}"
    );

    // 2 blocks = 4 wrapped sublayers, n = 4, batch·context = 64 tokens.
    let c = t.coefficients(false).unwrap();
    assert_eq!(dims(&c, "h_res_shape"), [4, 4, 4]);
    assert_eq!(dims(&c, "h_pre_shape"), [4, 4]);
    let h_res = f32s(&c, "h_res");
    assert_eq!(h_res.len(), 4 * 16);
    for row in h_res.chunks_exact(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{row:?}");
    }
    let per_token = t.coefficients(true).unwrap();
    assert_eq!(dims(&per_token, "h_res_shape"), [4, 64, 4, 4]);
    assert_eq!(f32s(&per_token, "h_post").len(), 4 * 64 * 4);
    assert!(
        f32s(&per_token, "h_post")
            .iter()
            .all(|v| (0.0..=2.0).contains(v))
    );

    let g = t.gains();
    assert_eq!(f64s(&g, "composite_bwd_max").len(), 4);
    assert_eq!(f64s(&g, "amax_fwd").len(), 4);
    let full = *f64s(&g, "composite_bwd_max").last().unwrap();
    assert!((0.9..1.6).contains(&full), "mHC composite gain {full}");
    assert!(num(&g, "sk_residual") < 0.1);

    let val = t.evaluate().await.unwrap();
    assert!(val.is_finite() && val < num(&first, "loss"));
    let s = t.sample("the ".into(), 40, 0.8).await.unwrap();
    assert!(!s.is_empty());
}

#[wasm_bindgen_test]
async fn residual_and_hc_report_their_gains() {
    let mut r = trainer(&[("scheme", "residual".into()), ("n", 1.into())]).await;
    r.step(2).await.unwrap();
    let g = r.gains();
    assert!(f64s(&g, "composite_bwd_max").iter().all(|v| *v == 1.0));
    assert!(
        f32s(&r.coefficients(false).unwrap(), "h_res")
            .iter()
            .all(|v| *v == 1.0)
    );

    let mut hc = trainer(&[("scheme", "hc".into()), ("n", 4.into())]).await;
    hc.step(2).await.unwrap();
    let g = hc.gains();
    assert_eq!(num(&g, "sk_residual"), 0.0, "no Sinkhorn–Knopp in HC");
    // HC's H_res starts near the identity plus a small bias; it is not
    // doubly stochastic, so its gains differ from 1.
    assert!(f64s(&g, "amax_bwd").iter().all(|v| *v != 1.0));
}

#[wasm_bindgen_test]
async fn same_config_same_losses() {
    let run = || async {
        let mut t = trainer(&[("scheme", "hc".into()), ("seed", 3.into())]).await;
        f64s(&t.step(3).await.unwrap(), "losses")
    };
    assert_eq!(run().await, run().await);
}

#[wasm_bindgen_test]
async fn bad_input_throws_errors_with_clear_messages() {
    let cases: [(&[(&str, JsValue)], &str); 7] = [
        (
            &[("n", 0.into())],
            "expansion rate n (number of streams) must be at least 1",
        ),
        (
            &[("heads", 5.into())],
            "heads (5) must divide the width (32)",
        ),
        (&[("scheme", "residual".into())], "exactly one stream"),
        (&[("scheme", "mhcc".into())], "unknown scheme 'mhcc'"),
        (
            &[("width", 3.5.into())],
            "config.width must be a whole number",
        ),
        (&[("lr", "fast".into())], "config.lr must be a number"),
        (&[("backend", "cuda".into())], "unknown backend 'cuda'"),
    ];
    for (fields, expected) in cases {
        let m = create_error(fields, &text()).await;
        assert!(m.contains(expected), "{m:?} lacks {expected:?}");
    }
    let m = create_error(&[], "").await;
    assert!(m.contains("the text is empty"), "{m}");
    let m = create_error(&[], "abc").await;
    assert!(m.contains("too few for a context of 32"), "{m}");
    match create_trainer(JsValue::from(4), text()).await {
        Ok(_) => panic!("a number was accepted as configuration"),
        Err(e) => assert!(message(e).contains("must be an object")),
    }

    let mut t = trainer(&[]).await;
    let m = t.coefficients(false).err().map(message).unwrap();
    assert!(m.contains("run at least one step first"), "{m}");
    assert!(t.gains().is_null());
    let m = t.step(0).await.err().map(message).unwrap();
    assert!(m.contains("k ≥ 1"), "{m}");
    let m = t
        .sample("x".into(), 5000, 1.0)
        .await
        .err()
        .map(message)
        .unwrap();
    assert!(m.contains("at most 4096"), "{m}");
}

#[wasm_bindgen_test]
async fn default_model_shapes() {
    let mut t = match create_trainer(default_config(), text()).await {
        Ok(t) => t,
        Err(e) => panic!("{}", message(e)),
    };
    t.step(1).await.unwrap();
    // 4 blocks = 8 wrapped sublayers, n = 4, batch·context = 8·32 tokens.
    assert_eq!(
        dims(&t.coefficients(false).unwrap(), "h_res_shape"),
        [8, 4, 4]
    );
    assert_eq!(
        dims(&t.coefficients(true).unwrap(), "h_res_shape"),
        [8, 256, 4, 4]
    );
    assert_eq!(f64s(&t.gains(), "composite_fwd_mean").len(), 8);
    let cfg = t.config();
    assert_eq!(num(&cfg, "sublayers"), 8.0);
    assert_eq!(
        num(&cfg, "train_bytes") + num(&cfg, "validation_bytes"),
        40_000.0
    );
}

#[wasm_bindgen_test]
async fn backend_report_matches_the_adapter_probe() {
    let t = trainer(&[("backend", "auto".into())]).await;
    assert_eq!(get(&build_info(), "webgpu_built").as_bool(), Some(true));
    match webgpu_adapter().await {
        None => {
            assert_eq!(t.backend(), "cpu");
            assert!(
                t.backend_note().contains("no WebGPU adapter"),
                "{}",
                t.backend_note()
            );
        }
        Some(a) => {
            assert_eq!(t.backend(), "webgpu");
            assert_eq!(t.backend_note(), format!("WebGPU: {a}"));
        }
    }
}

/// WebGPU (webdriver.json starts Chromium with --enable-unsafe-webgpu:
/// SwiftShader) against the CPU core on the same run: every loss within
/// 1e-3, the coefficients' structure, the validation loss, sampling.
/// Without an adapter, asking for WebGPU must fail with a message instead.
#[wasm_bindgen_test]
async fn webgpu_matches_the_cpu_core() {
    let Some(adapter) = webgpu_adapter().await else {
        wasm_bindgen_test::console_log!(
            "no WebGPU adapter: checking the error instead of the GPU path"
        );
        let m = create_error(&[("backend", "webgpu".into())], &text()).await;
        assert!(m.contains("navigator.gpu gave no adapter"), "{m}");
        return;
    };
    let fields = [("scheme", JsValue::from("mhc")), ("seed", 5.into())];
    let mut cpu = trainer(&fields).await;
    let mut all = fields.to_vec();
    all.push(("backend", "webgpu".into()));
    let mut gpu = trainer(&all).await;
    assert_eq!(gpu.backend(), "webgpu");
    assert!(
        gpu.backend_note().contains(&adapter),
        "{}",
        gpu.backend_note()
    );
    assert_eq!(
        gpu.num_params().await.unwrap(),
        cpu.num_params().await.unwrap()
    );
    let want = f64s(&cpu.step(6).await.unwrap(), "losses");
    let got = f64s(&gpu.step(6).await.unwrap(), "losses");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-3,
            "step {}: WebGPU loss {g} vs CPU {w}",
            i + 1
        );
    }
    let (c, w) = (
        gpu.coefficients(true).unwrap(),
        cpu.coefficients(true).unwrap(),
    );
    assert_eq!(dims(&c, "h_res_shape"), [4, 64, 4, 4]);
    let worst = f32s(&c, "h_res")
        .iter()
        .zip(f32s(&w, "h_res"))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "H_res differs by {worst}");
    let (gv, cv) = (gpu.evaluate().await.unwrap(), cpu.evaluate().await.unwrap());
    assert!((gv - cv).abs() < 1e-3, "validation loss {gv} vs {cv}");
    let s = gpu.sample("the ".into(), 20, 0.8).await.unwrap();
    assert!(!s.is_empty());
    // The run goes on after sampling (the weights were copied, not moved).
    assert_eq!(num(&gpu.step(1).await.unwrap(), "step"), 7.0);
}
