//! The `wasm_bindgen` surface: JS objects in, JS objects and typed arrays
//! out, [`WebError`]s thrown as JavaScript `Error`s.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use js_sys::{Array, Float32Array, Float64Array, Object, Reflect};
use mhc_core::Scheme;
use mhc_core::model::GainReport;
use wasm_bindgen::prelude::*;

use crate::session::{AdapterProbe, CoefficientSnapshot, Session, StepsReport, WEBGPU_BUILT};
use crate::settings::{TrainerSettings, WebError};

fn js_error(e: WebError) -> JsError {
    JsError::new(&e.to_string())
}

/// A plain JS object from `(key, value)` pairs.
fn object(entries: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    for (k, v) in entries {
        // Setting a property of a fresh plain object cannot fail.
        let _ = Reflect::set(&o, &JsValue::from_str(k), v);
    }
    o.into()
}

fn f64s(values: &[f64]) -> JsValue {
    Float64Array::from(values).into()
}

fn f32s(values: &[f32]) -> JsValue {
    Float32Array::from(values).into()
}

fn shape(dims: &[usize]) -> JsValue {
    dims.iter()
        .map(|&d| JsValue::from_f64(d as f64))
        .collect::<Array>()
        .into()
}

fn config_field(config: &JsValue, key: &str) -> Result<Option<JsValue>, WebError> {
    let v = Reflect::get(config, &JsValue::from_str(key))
        .map_err(|_| WebError::Config(format!("could not read config.{key}")))?;
    Ok((!v.is_undefined() && !v.is_null()).then_some(v))
}

fn config_uint(config: &JsValue, key: &str, default: u64) -> Result<u64, WebError> {
    let Some(v) = config_field(config, key)? else {
        return Ok(default);
    };
    match v.as_f64() {
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= 9_007_199_254_740_991.0 => Ok(x as u64),
        _ => Err(WebError::Config(format!(
            "config.{key} must be a whole number ≥ 0, got {}",
            describe(&v)
        ))),
    }
}

fn config_float(config: &JsValue, key: &str, default: f64) -> Result<f64, WebError> {
    let Some(v) = config_field(config, key)? else {
        return Ok(default);
    };
    v.as_f64().ok_or_else(|| {
        WebError::Config(format!(
            "config.{key} must be a number, got {}",
            describe(&v)
        ))
    })
}

fn config_string(config: &JsValue, key: &str) -> Result<Option<String>, WebError> {
    let Some(v) = config_field(config, key)? else {
        return Ok(None);
    };
    v.as_string().map(Some).ok_or_else(|| {
        WebError::Config(format!(
            "config.{key} must be a string, got {}",
            describe(&v)
        ))
    })
}

fn describe(v: &JsValue) -> String {
    js_sys::JSON::stringify(v)
        .ok()
        .and_then(|s| s.as_string())
        .unwrap_or_else(|| format!("{v:?}"))
}

/// Reads a [`TrainerSettings`] from a JS object; missing fields take the
/// defaults ([`default_config`]).
pub fn settings_from_js(config: &JsValue) -> Result<TrainerSettings, WebError> {
    if !config.is_object() && !config.is_undefined() && !config.is_null() {
        return Err(WebError::Config(format!(
            "the configuration must be an object, got {}",
            describe(config)
        )));
    }
    let d = TrainerSettings::default();
    let us = |key, default: usize| -> Result<usize, WebError> {
        let v = config_uint(config, key, default as u64)?;
        usize::try_from(v).map_err(|_| WebError::Config(format!("config.{key} is too large")))
    };
    let scheme = match config_string(config, "scheme")? {
        None => d.scheme,
        Some(s) => s.parse::<Scheme>().map_err(WebError::Config)?,
    };
    let backend = match config_string(config, "backend")? {
        None => d.backend,
        Some(s) => s.parse()?,
    };
    Ok(TrainerSettings {
        scheme,
        n: us("n", d.n)?,
        layers: us("layers", d.layers)?,
        width: us("width", d.width)?,
        heads: us("heads", d.heads)?,
        context: us("context", d.context)?,
        batch: us("batch", d.batch)?,
        lr: config_float(config, "lr", d.lr)?,
        warmup: config_uint(config, "warmup", d.warmup)?,
        steps: config_uint(config, "steps", d.steps)?,
        sinkhorn_iters: us("sinkhorn_iters", d.sinkhorn_iters)?,
        seed: config_uint(config, "seed", d.seed)?,
        validation_fraction: config_float(config, "validation_fraction", d.validation_fraction)?,
        backend,
    })
}

/// The default configuration as a JS object: `{scheme, n, layers, width,
/// heads, context, batch, lr, warmup, steps, sinkhorn_iters, seed,
/// validation_fraction, backend}`.
#[wasm_bindgen]
pub fn default_config() -> JsValue {
    let d = TrainerSettings::default();
    object(&[
        ("scheme", d.scheme.name().into()),
        ("n", (d.n as f64).into()),
        ("layers", (d.layers as f64).into()),
        ("width", (d.width as f64).into()),
        ("heads", (d.heads as f64).into()),
        ("context", (d.context as f64).into()),
        ("batch", (d.batch as f64).into()),
        ("lr", d.lr.into()),
        ("warmup", (d.warmup as f64).into()),
        ("steps", (d.steps as f64).into()),
        ("sinkhorn_iters", (d.sinkhorn_iters as f64).into()),
        ("seed", (d.seed as f64).into()),
        ("validation_fraction", d.validation_fraction.into()),
        ("backend", "auto".into()),
    ])
}

/// What this build contains: `{version, webgpu_built}`.
#[wasm_bindgen]
pub fn build_info() -> JsValue {
    object(&[
        ("version", env!("CARGO_PKG_VERSION").into()),
        ("webgpu_built", WEBGPU_BUILT.into()),
    ])
}

/// `len` bytes of mhc-core's embedded synthetic language
/// (`mhc_core::model::data::synthetic_corpus`), the same for a seed everywhere.
#[wasm_bindgen]
pub fn synthetic_text(seed: u64, len: usize) -> Result<String, JsError> {
    if len > 1 << 24 {
        return Err(JsError::new("synthetic_text: ask for at most 16 MiB"));
    }
    let bytes = mhc_core::model::data::synthetic_corpus(seed, len);
    // The generator writes printable ASCII and newlines only.
    String::from_utf8(bytes).map_err(|e| JsError::new(&e.to_string()))
}

/// Asks `navigator.gpu` (in a window or a worker) for an adapter and
/// describes it: `"vendor architecture device description (fallback)"`.
/// `None` when there is no `navigator.gpu` or it gives no adapter.
pub async fn probe_webgpu() -> AdapterProbe {
    let global: JsValue = js_sys::global().into();
    let gpu = Reflect::get(&global, &"navigator".into())
        .and_then(|nav| Reflect::get(&nav, &"gpu".into()))
        .ok()
        .filter(|g| g.is_object())?;
    let request = Reflect::get(&gpu, &"requestAdapter".into())
        .ok()?
        .dyn_into::<js_sys::Function>()
        .ok()?;
    let promise = request
        .call0(&gpu)
        .ok()?
        .dyn_into::<js_sys::Promise>()
        .ok()?;
    let adapter = wasm_bindgen_futures::JsFuture::from(promise).await.ok()?;
    if !adapter.is_object() {
        return None;
    }
    let info = Reflect::get(&adapter, &"info".into()).unwrap_or(JsValue::UNDEFINED);
    let field = |k: &str| {
        Reflect::get(&info, &k.into())
            .ok()
            .and_then(|v| v.as_string())
            .filter(|s| !s.is_empty())
    };
    let mut parts: Vec<String> = ["vendor", "architecture", "device", "description"]
        .iter()
        .filter_map(|k| field(k))
        .collect();
    parts.dedup();
    let fallback = Reflect::get(&info, &"isFallbackAdapter".into())
        .ok()
        .and_then(|v| v.as_bool())
        .or_else(|| {
            Reflect::get(&adapter, &"isFallbackAdapter".into())
                .ok()
                .and_then(|v| v.as_bool())
        })
        .unwrap_or(false);
    let mut text = if parts.is_empty() {
        String::from("unnamed adapter")
    } else {
        parts.join(" ")
    };
    if fallback {
        text.push_str(" (fallback adapter)");
    }
    Some(text)
}

/// Describes the WebGPU adapter `navigator.gpu` gives, or `null`.
#[wasm_bindgen]
pub async fn webgpu_adapter() -> Option<String> {
    probe_webgpu().await
}

fn gains_object(g: Option<&GainReport>) -> JsValue {
    let Some(g) = g else {
        return JsValue::NULL;
    };
    let pick = |f: fn(&mhc_core::CompositeGain<f64>) -> f64| -> Vec<f64> {
        g.composite.iter().map(f).collect()
    };
    object(&[
        ("layers", (g.amax_fwd.len() as f64).into()),
        ("amax_fwd", f64s(&g.amax_fwd)),
        ("amax_bwd", f64s(&g.amax_bwd)),
        ("composite_fwd_mean", f64s(&pick(|c| c.forward_mean))),
        ("composite_fwd_max", f64s(&pick(|c| c.forward_max))),
        ("composite_bwd_mean", f64s(&pick(|c| c.backward_mean))),
        ("composite_bwd_max", f64s(&pick(|c| c.backward_max))),
        ("sk_residual", g.sk_residual.into()),
    ])
}

fn steps_object(r: &StepsReport, gains: JsValue) -> JsValue {
    let mean = r.losses.iter().sum::<f64>() / r.losses.len().max(1) as f64;
    object(&[
        ("step", (r.step as f64).into()),
        ("loss", r.losses.last().copied().unwrap_or(f64::NAN).into()),
        ("mean_loss", mean.into()),
        ("losses", f64s(&r.losses)),
        ("grad_norms", f64s(&r.grad_norms)),
        (
            "grad_norm",
            r.grad_norms.last().copied().unwrap_or(f64::NAN).into(),
        ),
        ("lr", r.lr.into()),
        ("gains", gains),
    ])
}

fn coefficients_object(c: &CoefficientSnapshot, per_token: bool) -> JsValue {
    let (l, t, n) = (c.layers, c.tokens, c.n);
    if per_token {
        object(&[
            ("step", (c.step as f64).into()),
            ("layers", (l as f64).into()),
            ("tokens", (t as f64).into()),
            ("n", (n as f64).into()),
            ("per_token", true.into()),
            ("h_pre", f32s(&c.h_pre)),
            ("h_pre_shape", shape(&[l, t, n])),
            ("h_post", f32s(&c.h_post)),
            ("h_post_shape", shape(&[l, t, n])),
            ("h_res", f32s(&c.h_res)),
            ("h_res_shape", shape(&[l, t, n, n])),
        ])
    } else {
        object(&[
            ("step", (c.step as f64).into()),
            ("layers", (l as f64).into()),
            ("tokens", (t as f64).into()),
            ("n", (n as f64).into()),
            ("per_token", false.into()),
            ("h_pre", f32s(&c.token_mean(&c.h_pre, n))),
            ("h_pre_shape", shape(&[l, n])),
            ("h_post", f32s(&c.token_mean(&c.h_post, n))),
            ("h_post_shape", shape(&[l, n])),
            ("h_res", f32s(&c.token_mean(&c.h_res, n * n))),
            ("h_res_shape", shape(&[l, n, n])),
        ])
    }
}

/// One training run of a residual, HC or mHC byte-level model, on WebGPU
/// or the CPU core. Create it with [`create_trainer`]; call its methods one
/// at a time (each `await`ed before the next).
#[wasm_bindgen]
pub struct WasmTrainer {
    session: Session,
}

/// Creates a trainer: `config` is an object like [`default_config`]'s
/// (missing fields take the defaults), `text` the training text (its UTF-8
/// bytes are the tokens; the tail is held out for validation).
///
/// With `backend: "auto"` it trains on WebGPU when `navigator.gpu` gives an
/// adapter (and a device), else on the CPU core; `backend` / `backend_note`
/// say which and why. `backend: "webgpu"` throws instead of falling back. Throws an `Error`
/// with a message for a bad configuration (e.g. `n = 0`, heads not dividing
/// the width, residual with `n ≠ 1`), an empty or too short text, or an
/// unavailable backend.
#[wasm_bindgen]
pub async fn create_trainer(config: JsValue, text: String) -> Result<WasmTrainer, JsError> {
    let settings = settings_from_js(&config).map_err(js_error)?;
    let adapter = probe_webgpu().await;
    let session = Session::new(settings, text.as_bytes(), &adapter)
        .await
        .map_err(js_error)?;
    Ok(WasmTrainer { session })
}

#[wasm_bindgen]
impl WasmTrainer {
    /// `"cpu"` or `"webgpu"`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.session.backend_name().to_string()
    }

    /// The device in words, and why it was chosen (shown on the page).
    #[wasm_bindgen(getter)]
    pub fn backend_note(&self) -> String {
        self.session.backend_note().to_string()
    }

    /// Steps taken so far.
    #[wasm_bindgen(getter)]
    pub fn step_count(&self) -> f64 {
        self.session.step_count() as f64
    }

    /// The configuration in use, as an object like [`default_config`]'s.
    #[wasm_bindgen(getter)]
    pub fn config(&self) -> JsValue {
        let s = self.session.settings();
        object(&[
            ("scheme", s.scheme.name().into()),
            ("n", (s.n as f64).into()),
            ("layers", (s.layers as f64).into()),
            ("width", (s.width as f64).into()),
            ("heads", (s.heads as f64).into()),
            ("context", (s.context as f64).into()),
            ("batch", (s.batch as f64).into()),
            ("lr", s.lr.into()),
            ("warmup", (s.warmup as f64).into()),
            ("steps", (s.steps as f64).into()),
            ("sinkhorn_iters", (s.sinkhorn_iters as f64).into()),
            ("seed", (s.seed as f64).into()),
            ("validation_fraction", s.validation_fraction.into()),
            ("sublayers", ((2 * s.layers) as f64).into()),
            ("train_bytes", (self.session.data_len().0 as f64).into()),
            (
                "validation_bytes",
                (self.session.data_len().1 as f64).into(),
            ),
        ])
    }

    /// Scalar parameters of the model.
    pub async fn num_params(&mut self) -> Result<f64, JsError> {
        self.session
            .num_params()
            .await
            .map(|n| n as f64)
            .map_err(js_error)
    }

    /// Runs `k ≥ 1` steps. Resolves to `{step, loss, mean_loss, losses,
    /// grad_norms, grad_norm, lr, gains}` (`losses`, `grad_norms`:
    /// Float64Array of the `k` steps; `gains`: as [`WasmTrainer::gains`]).
    pub async fn step(&mut self, k: u32) -> Result<JsValue, JsError> {
        let report = self.session.step(k).await.map_err(js_error)?;
        Ok(steps_object(&report, gains_object(self.session.gains())))
    }

    /// Validation loss (nats/byte) on fixed windows of the held-out text.
    pub async fn evaluate(&mut self) -> Result<f64, JsError> {
        self.session.evaluate().await.map_err(js_error)
    }

    /// `count` bytes sampled after `prompt` at `temperature` (≤ 0: greedy).
    pub async fn sample(
        &mut self,
        prompt: String,
        count: u32,
        temperature: f64,
    ) -> Result<String, JsError> {
        self.session
            .sample(&prompt, count as usize, temperature)
            .await
            .map_err(js_error)
    }

    /// Every wrapped sublayer's `H_pre`, `H_post`, `H_res` for the last
    /// training batch, as Float32Arrays with their shapes: the mean over
    /// tokens (`h_res_shape = [layers, n, n]`) or, with `per_token`, every
    /// token (`[layers, tokens, n, n]`). Throws before the first step.
    pub fn coefficients(&self, per_token: bool) -> Result<JsValue, JsError> {
        let c = self.session.coefficients();
        if c.layers == 0 {
            return Err(JsError::new(
                "no coefficients yet: run at least one step first",
            ));
        }
        Ok(coefficients_object(c, per_token))
    }

    /// Amax gains of the last training batch (paper §3, Fig. 3/7): per
    /// sublayer `amax_fwd` / `amax_bwd` of `H_res⁽ˡ⁾` (max over tokens) and,
    /// per depth `d`, the forward and backward gain of the composite
    /// `H_res⁽ᵈ⁾ ··· H_res⁽¹⁾` (mean and max over tokens), plus the SK
    /// residual. `null` before the first step.
    pub fn gains(&self) -> JsValue {
        gains_object(self.session.gains())
    }
}
