//! The three schemes, their configuration, parameters and initialisation.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use crate::error::{MhcError, Result, check_eps, check_finite, check_len};
use crate::real::Real;
use crate::rng::Rng;
use crate::sinkhorn::{SinkhornConfig, identity_bias_for_diagonal};

/// How the residual stream is carried across a sublayer.
///
/// | scheme | `H_pre` | `H_post` | `H_res` |
/// |---|---|---|---|
/// | [`Residual`](Scheme::Residual) (`n = 1`) | 1 | 1 | 1 |
/// | [`HcStatic`](Scheme::HcStatic) | `b_pre` | `b_post` | `b_res` |
/// | [`HcDynamic`](Scheme::HcDynamic) (Eq. 5) | `α_pre·tanh(θ_pre x̃ᵀ) + b_pre` | same form | `α_res·tanh(θ_res x̃ᵀ) + b_res` |
/// | [`MhcStatic`](Scheme::MhcStatic) | `σ(b_pre)` | `2σ(b_post)` | `SK(b_res)` |
/// | [`MhcDynamic`](Scheme::MhcDynamic) (Eqs. 7–9) | `σ(H̃_pre)` | `2σ(H̃_post)` | `SK(H̃_res)` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// The plain residual connection `x' = x + F(x)`; needs `n = 1`.
    Residual,
    /// Hyper-Connections with static (input-independent) maps.
    HcStatic,
    /// Hyper-Connections with dynamic maps (paper Eq. 5).
    HcDynamic,
    /// mHC with `α = 0`: the maps are projections of the biases alone.
    MhcStatic,
    /// Manifold-constrained Hyper-Connections, the paper's form (Eqs. 7–9).
    MhcDynamic,
}

impl Scheme {
    /// All schemes, in the order of the table above.
    pub const ALL: [Scheme; 5] = [
        Self::Residual,
        Self::HcStatic,
        Self::HcDynamic,
        Self::MhcStatic,
        Self::MhcDynamic,
    ];

    /// Whether the maps depend on the input (`α`, and `φ` or `θ`, are learned).
    pub fn is_dynamic(self) -> bool {
        matches!(self, Self::HcDynamic | Self::MhcDynamic)
    }

    /// Whether the maps are manifold-constrained (σ, 2σ, Sinkhorn–Knopp).
    pub fn is_manifold_constrained(self) -> bool {
        matches!(self, Self::MhcStatic | Self::MhcDynamic)
    }

    /// Short name used on command lines and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Residual => "residual",
            Self::HcStatic => "hc-static",
            Self::HcDynamic => "hc",
            Self::MhcStatic => "mhc-static",
            Self::MhcDynamic => "mhc",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Scheme {
    type Err = alloc::string::String;
    fn from_str(s: &str) -> core::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                alloc::format!(
                    "unknown scheme '{s}': use residual, hc, hc-static, mhc or mhc-static"
                )
            })
    }
}

/// Shape and numerical settings of one wrapped sublayer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionConfig {
    /// Which scheme.
    pub scheme: Scheme,
    /// Expansion rate `n` (number of streams; the paper uses 4).
    pub n: usize,
    /// Stream width `C` (the sublayer's width).
    pub width: usize,
    /// Sinkhorn–Knopp settings (mHC only).
    pub sinkhorn: SinkhornConfig,
    /// `eps` inside the RMS root: `r = √(‖v‖²/(nC) + eps)` (mHC) and HC's RMSNorm.
    pub rms_eps: f64,
}

impl ConnectionConfig {
    /// A configuration with default Sinkhorn–Knopp (20 iterations) and `rms_eps = 1e-6`.
    pub fn new(scheme: Scheme, n: usize, width: usize) -> Self {
        Self {
            scheme,
            n,
            width,
            sinkhorn: SinkhornConfig::default(),
            rms_eps: 1e-6,
        }
    }

    /// Checks `n ≥ 1` (exactly 1 for the residual scheme), `C ≥ 1` and the numerical settings.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(MhcError::ZeroStreams);
        }
        if self.width == 0 {
            return Err(MhcError::ZeroWidth);
        }
        if self.scheme == Scheme::Residual && self.n != 1 {
            return Err(MhcError::ResidualNeedsOneStream { n: self.n });
        }
        if self.scheme.is_manifold_constrained() {
            self.sinkhorn.validate()?;
        }
        check_eps("rms_eps", self.rms_eps)
    }

    /// `K = n² + 2n`, the number of coefficients per token (layout `[H_pre | H_post | H_res]`).
    pub fn coefficient_len(&self) -> usize {
        self.n * self.n + 2 * self.n
    }

    /// Elements of one token's stream state, `nC`.
    pub fn state_len(&self) -> usize {
        self.n * self.width
    }

    /// The shape (element count) of every parameter tensor, in [`ConnectionParams::NAMES`] order.
    pub fn param_lens(&self) -> [usize; 9] {
        let (n, c, k) = (self.n, self.width, self.coefficient_len());
        match self.scheme {
            Scheme::Residual => [0; 9],
            Scheme::HcStatic | Scheme::MhcStatic => [0, n, n, n * n, 0, 0, 0, 0, 0],
            Scheme::HcDynamic => [3, n, n, n * n, 0, 0, c, c, n * c],
            Scheme::MhcDynamic => [3, n, n, n * n, n * c * k, n * c, 0, 0, 0],
        }
    }
}

/// Initialisation of a connection's parameters (DESIGN.md defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InitConfig {
    /// Initial `α_pre = α_post = α_res` (paper: 0.01).
    pub alpha: f64,
    /// Standard deviation of the random projections `φ` (mHC) and `θ` (HC).
    pub projection_std: f64,
    /// Target diagonal of `H_res` at initialisation (mHC: `SK(c·I)`; HC: `b_res = I`).
    pub res_diagonal: f64,
    /// `H_pre` for `n = 1` under mHC, where `σ` cannot reach 1 (default 0.9, `b_pre = ln 9`).
    pub single_stream_pre: f64,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            alpha: 0.01,
            projection_std: 0.02,
            res_diagonal: 0.95,
            single_stream_pre: 0.9,
        }
    }
}

/// The learnable parameters of one wrapped sublayer.
///
/// Tensors a scheme does not use are empty. Shapes (row-major):
/// `alpha [3]` = `(α_pre, α_post, α_res)`, `b_pre [n]`, `b_post [n]`,
/// `b_res [n, n]`, `phi [nC, n² + 2n]` (columns `[pre | post | res]`),
/// `gamma [nC]`, `theta_pre [C]`, `theta_post [C]`, `theta_res [n, C]`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ConnectionParams<T> {
    /// `(α_pre, α_post, α_res)` — dynamic schemes.
    pub alpha: Vec<T>,
    /// `b_pre ∈ R^n`.
    pub b_pre: Vec<T>,
    /// `b_post ∈ R^n`.
    pub b_post: Vec<T>,
    /// `b_res ∈ R^{n×n}`.
    pub b_res: Vec<T>,
    /// `φ ∈ R^{nC×(n²+2n)}` — mHC dynamic.
    pub phi: Vec<T>,
    /// `γ ∈ R^{nC}`, the RMSNorm weight applied before `φ` — mHC dynamic.
    pub gamma: Vec<T>,
    /// `θ_pre ∈ R^{1×C}` — HC dynamic.
    pub theta_pre: Vec<T>,
    /// `θ_post ∈ R^{1×C}` — HC dynamic.
    pub theta_post: Vec<T>,
    /// `θ_res ∈ R^{n×C}` — HC dynamic.
    pub theta_res: Vec<T>,
}

impl<T: Real> ConnectionParams<T> {
    /// Tensor names, stable (used in checkpoints).
    pub const NAMES: [&'static str; 9] = [
        "alpha",
        "b_pre",
        "b_post",
        "b_res",
        "phi",
        "gamma",
        "theta_pre",
        "theta_post",
        "theta_res",
    ];

    /// All-zero parameters of the right shapes (e.g. a gradient accumulator).
    pub fn zeros(config: &ConnectionConfig) -> Self {
        let l = config.param_lens();
        Self {
            alpha: vec![T::zero(); l[0]],
            b_pre: vec![T::zero(); l[1]],
            b_post: vec![T::zero(); l[2]],
            b_res: vec![T::zero(); l[3]],
            phi: vec![T::zero(); l[4]],
            gamma: vec![T::zero(); l[5]],
            theta_pre: vec![T::zero(); l[6]],
            theta_post: vec![T::zero(); l[7]],
            theta_res: vec![T::zero(); l[8]],
        }
    }

    /// The default initialisation of DESIGN.md.
    ///
    /// - mHC: `α = 0.01`; `φ ~ N(0, projection_std²)`; `γ = 1`;
    ///   `b_pre = ln(1/(n−1))` so `H_pre = 1/n` each and `h` equals one copy
    ///   of the (initially identical) streams — for `n = 1`, where σ cannot
    ///   reach 1, `b_pre = logit(single_stream_pre)` (0.9 by default);
    ///   `b_post = 0` so `H_post = 1`; `b_res = c·I` with
    ///   `c = ln(d(n−1)/(1−d))`, so `SK(b_res)` has diagonal `d = res_diagonal` exactly.
    /// - HC: `b_pre = 1/n`, `b_post = 1`, `b_res = I` (the residual connection
    ///   on every stream), `α = 0.01`, `θ ~ N(0, projection_std²)`.
    /// - Residual: no parameters.
    pub fn init(config: &ConnectionConfig, init: &InitConfig, rng: &mut Rng) -> Self {
        let mut p = Self::zeros(config);
        let n = config.n;
        let nf = n as f64;
        p.alpha.iter_mut().for_each(|a| *a = T::of(init.alpha));
        match config.scheme {
            Scheme::Residual => {}
            Scheme::HcStatic | Scheme::HcDynamic => {
                p.b_pre.iter_mut().for_each(|b| *b = T::of(1.0 / nf));
                p.b_post.iter_mut().for_each(|b| *b = T::one());
                for i in 0..n {
                    p.b_res[i * n + i] = T::one();
                }
                for t in [&mut p.theta_pre, &mut p.theta_post, &mut p.theta_res] {
                    t.iter_mut()
                        .for_each(|v| *v = T::of(rng.normal() * init.projection_std));
                }
            }
            Scheme::MhcStatic | Scheme::MhcDynamic => {
                let b_pre = if n >= 2 {
                    libm::log(1.0 / (nf - 1.0))
                } else {
                    let q = init.single_stream_pre;
                    libm::log(q / (1.0 - q))
                };
                p.b_pre.iter_mut().for_each(|b| *b = T::of(b_pre));
                let c = identity_bias_for_diagonal(init.res_diagonal, n);
                for i in 0..n {
                    p.b_res[i * n + i] = T::of(c);
                }
                p.gamma.iter_mut().for_each(|g| *g = T::one());
                p.phi
                    .iter_mut()
                    .for_each(|v| *v = T::of(rng.normal() * init.projection_std));
            }
        }
        p
    }

    /// The tensors with their names, in [`Self::NAMES`] order.
    pub fn tensors(&self) -> [(&'static str, &[T]); 9] {
        [
            ("alpha", &self.alpha),
            ("b_pre", &self.b_pre),
            ("b_post", &self.b_post),
            ("b_res", &self.b_res),
            ("phi", &self.phi),
            ("gamma", &self.gamma),
            ("theta_pre", &self.theta_pre),
            ("theta_post", &self.theta_post),
            ("theta_res", &self.theta_res),
        ]
    }

    /// Mutable tensors with their names, in [`Self::NAMES`] order (for optimisers and loaders).
    pub fn tensors_mut(&mut self) -> [(&'static str, &mut Vec<T>); 9] {
        [
            ("alpha", &mut self.alpha),
            ("b_pre", &mut self.b_pre),
            ("b_post", &mut self.b_post),
            ("b_res", &mut self.b_res),
            ("phi", &mut self.phi),
            ("gamma", &mut self.gamma),
            ("theta_pre", &mut self.theta_pre),
            ("theta_post", &mut self.theta_post),
            ("theta_res", &mut self.theta_res),
        ]
    }

    /// The same parameters in another precision (rounded to nearest when narrowing).
    pub fn cast<U: Real>(&self) -> ConnectionParams<U> {
        let c = |v: &[T]| v.iter().map(|x| U::of(x.as_f64())).collect();
        ConnectionParams {
            alpha: c(&self.alpha),
            b_pre: c(&self.b_pre),
            b_post: c(&self.b_post),
            b_res: c(&self.b_res),
            phi: c(&self.phi),
            gamma: c(&self.gamma),
            theta_pre: c(&self.theta_pre),
            theta_post: c(&self.theta_post),
            theta_res: c(&self.theta_res),
        }
    }

    /// Sets every element to zero (e.g. before accumulating gradients).
    pub fn fill_zero(&mut self) {
        for (_, t) in self.tensors_mut() {
            t.iter_mut().for_each(|v| *v = T::zero());
        }
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.len()).sum()
    }

    /// Whether there are no parameters (the residual scheme).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every tensor's shape against `config` and that all values are finite.
    pub fn validate(&self, config: &ConnectionConfig) -> Result<()> {
        const WHAT: [&str; 9] = [
            "parameter alpha",
            "parameter b_pre",
            "parameter b_post",
            "parameter b_res",
            "parameter phi",
            "parameter gamma",
            "parameter theta_pre",
            "parameter theta_post",
            "parameter theta_res",
        ];
        for ((what, (_, t)), len) in WHAT.iter().zip(self.tensors()).zip(config.param_lens()) {
            check_len(what, t, len)?;
            check_finite(what, t)?;
        }
        Ok(())
    }
}
